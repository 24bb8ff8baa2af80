//! `ai-inferd`: the host side of the ai_infer device (docs/ai_infer.md).
//!
//! One process per host. Every tenant VM's aivmm connects over vhost-user and shares
//! its guest memory; the daemon validates each request chain, hands admitted INFER
//! requests to the [`scheduler`], and executors run the scheduled batches on a
//! [`backend`], reading inputs from and writing outputs to guest memory in place.

pub mod backend;
pub mod models;
pub mod scheduler;
#[cfg(test)]
mod test_models;
