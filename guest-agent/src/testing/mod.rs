//! Fakes of the device side, for tests (the crate's own, and with the `fake-device`
//! feature those of programs built on the agent).

mod device;
mod ring;
mod setup;

pub use device::{fake_models, Corruption, FakeDeviceBehaviour, FakeVirtioPci};
pub use ring::FakeRing;
pub use setup::{fake_daemon, fake_engine};
