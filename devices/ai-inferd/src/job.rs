//! An admitted INFER request: what the scheduler queues and an executor runs.

use ai_infer_protocol::{ChainLayout, Request};

use crate::guest_io::TensorPlace;
use crate::ticket::ChainTicket;

/// One INFER request, validated and admitted. It owns everything needed to run and
/// complete it, so it stays safe after its tenant disconnected.
pub struct Job {
    /// How to complete the chain.
    pub ticket: ChainTicket,
    /// The device's copy of the request header and tensor descriptors.
    pub request: Request,
    /// Offsets of every part of the chain.
    pub layout: ChainLayout,
    /// Where each input's bytes are (R stream).
    pub inputs: Vec<TensorPlace>,
    /// Where each output buffer is (W stream).
    pub outputs: Vec<TensorPlace>,
}

impl Job {
    /// Sum of the inputs' `data_len` (TRACE `bytes_in`).
    pub fn input_bytes(&self) -> u64 {
        self.request
            .inputs
            .iter()
            .fold(0u64, |acc, d| acc.saturating_add(d.data_len))
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("tenant", &self.ticket.tenant.spec.name)
            .field("queue", &self.ticket.queue)
            .field("head", &self.ticket.head)
            .field("request_id", &self.request.header.request_id)
            .finish()
    }
}
