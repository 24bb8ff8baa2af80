//! Fakes of the device side, for unit tests.

mod ring;

pub use ring::FakeRing;
