//! `ai-inferd`: the host side of the ai_infer device (docs/ai_infer.md).
//!
//! One process per host. Every tenant VM's aivmm connects over vhost-user to the
//! tenant's own socket and shares its guest memory ([`device`], [`daemon`]); the
//! daemon walks and validates each request chain ([`chain`], [`intake`]), hands
//! admitted INFER requests to the [`scheduler`], and [`executor`] threads run the
//! scheduled batches on a [`backend`], reading inputs from and writing outputs to
//! guest memory in place ([`guest_io`]), pinned next to their device ([`numa`]).
//! The operator watches it through [`metrics`] and [`top`] and changes tenant
//! policies live ([`reload`]). [`test_frontend`] is a small vhost-user frontend and
//! virtio driver for integration tests and load generation; [`mod@bench`] measures the
//! scheduler's figures with it.

pub mod backend;
pub mod bench;
pub mod chain;
pub mod config;
pub mod daemon;
pub mod device;
pub mod executor;
pub mod guest_io;
pub mod intake;
pub mod job;
pub mod metrics;
pub mod models;
pub mod numa;
pub mod registry;
pub mod reload;
pub mod scheduler;
pub mod tenant;
pub mod test_frontend;
#[cfg(test)]
mod test_models;
pub mod ticket;
pub mod top;
