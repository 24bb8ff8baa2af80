//! Fakes of the device side, for unit tests.

mod device;
mod ring;

pub use device::{fake_models, Corruption, FakeDeviceBehaviour, FakeVirtioPci};
pub use ring::FakeRing;
