//! End-to-end tests of aivmm and the driver of the project's test rig.
//!
//! The rig (scripts in `tests/rig/`) boots aivmm guests and prints machine-readable lines;
//! this crate runs it once per test binary and hands the parsed [`RigReport`] to the tests.
//!
//! * [`report`]: the log format and its parser (no I/O, unit-tested).
//! * [`reference`]: the host-side runs of the models the e2e tests compare guests with.
//! * [`rig`]: locating the workspace, installing dependencies, building aivmm, choosing
//!   nested or direct mode, running the rig, and failure messages with log excerpts.

pub mod reference;
pub mod report;
pub mod rig;

pub use report::{RigReport, ScenarioRun};
pub use rig::{rig, Rig, RigMode};
