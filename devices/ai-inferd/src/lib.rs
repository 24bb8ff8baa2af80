//! `ai-inferd`: the host side of the ai_infer device (docs/ai_infer.md).
//!
//! One process per host. Every tenant VM's aivmm connects over vhost-user to the
//! tenant's own socket and shares its guest memory ([`device`], [`daemon`]); the
//! daemon walks and validates each request chain ([`chain`], [`intake`]), hands
//! admitted INFER requests to the scheduler of its [`engine`] (the
//! `ai-infer-scheduler` crate), and [`executor`] threads run the scheduled batches on
//! a [`backend`], reading inputs from and writing outputs to guest memory in place
//! ([`guest_io`]), pinned next to their device ([`numa`]). The operator watches it
//! through [`metrics`] (and the binary's `top`) and changes tenant policies live
//! ([`reload`]).
//!
//! This library is the daemon only. The `ai-inferd` binary (`src/bin/ai-inferd/`)
//! adds the `top` client and the `bench` command; the vhost-user test frontend that
//! the tests and the bench drive the daemon with is the `ai-infer-test-frontend` crate.

pub mod backend;
pub mod chain;
pub mod config;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod executor;
pub mod guest_io;
pub mod intake;
pub mod job;
pub mod metrics;
pub mod models;
pub mod numa;
pub use sandbox::privilege;
pub mod registry;
pub mod reload;
pub mod seccomp;
pub mod tenant;
#[cfg(test)]
mod test_models;
pub mod ticket;
pub mod vring;
