//! Everything needed to complete one chain, possibly long after it was taken: the
//! queue, the guest memory it lives in, its writable buffers, and the generation it
//! belongs to.
//!
//! A ticket keeps its own reference to the guest memory mapping and to the vring, so
//! it stays safe to use after the VMM disconnected; its completion is then simply
//! discarded because the generation moved on. Completion happens under the tenant's
//! lock, so a reset or disconnect (which moves the generation under the same lock)
//! is either fully before or fully after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ai_infer_protocol::{
    response_range, Response, ResponseHeader, TensorDesc, MAX_TENSORS, RESPONSE_HEADER_LEN,
    TENSOR_DESC_LEN,
};
use ai_infer_scheduler::Nanos;
use log::warn;
use vhost_user_backend::VringT;
use vm_memory::GuestMemoryMmap;

use crate::chain::Segment;
use crate::guest_io::write_stream;
use crate::tenant::{Record, Tenant};

/// The vring type the daemon uses.
pub type Vring = crate::vring::ReportingVring;

/// How to complete one chain.
pub struct ChainTicket {
    /// Whose chain it is.
    pub tenant: Arc<Tenant>,
    /// Queue index it arrived on.
    pub queue: u16,
    /// The queue's generation when the chain was taken.
    pub generation: u64,
    /// The queue.
    pub vring: Vring,
    /// Guest memory as mapped when the chain was taken.
    pub mem: Arc<GuestMemoryMmap>,
    /// Head descriptor index.
    pub head: u16,
    /// Device-writable buffers (the W stream).
    pub writable: Vec<Segment>,
    /// Total length of W (≤ `u32::MAX`, checked by the chain walk).
    pub writable_len: u64,
    /// When the chain was taken (scheduler clock).
    pub arrival: Nanos,
    /// An executor runs this chain's INFER ([`ChainTicket::start_running`]); its
    /// completion, or else the ticket's drop, ends that.
    pub running: AtomicBool,
}

impl Drop for ChainTicket {
    fn drop(&mut self) {
        // Work started but never completed (cannot happen on the executor's paths):
        // never leave a reset waiting for it.
        if self.running.swap(false, Ordering::Relaxed) {
            self.tenant.finish_running(self.queue);
        }
    }
}

impl ChainTicket {
    /// Where the response header goes in W (the walk guaranteed room for it).
    pub fn response_offset(&self) -> u64 {
        response_range(self.writable_len).map_or(0, |r| r.offset)
    }

    /// Writes `writes` (W offset, bytes), publishes the used element with `used_len`,
    /// accounts `record` and notifies the driver if it wants that. Returns false (and
    /// touches nothing) if the chain's work was abandoned.
    pub fn complete(&self, writes: &[(u64, &[u8])], used_len: u32, record: Record) -> bool {
        let mut st = self.tenant.lock();
        let was_running = self.running.swap(false, Ordering::Relaxed);
        if was_running {
            st.finish_running(self.queue);
        }
        if self.tenant.generation(self.queue) != self.generation {
            drop(st);
            if was_running {
                self.tenant.notify_idle();
            }
            return false;
        }
        let mut len = used_len;
        for (offset, bytes) in writes {
            if let Err(e) = write_stream(&self.mem, &self.writable, *offset, bytes) {
                // Cannot happen for a walked chain on its own mapping; never publish a
                // length the device did not write.
                warn!("{}: cannot write response: {e}", self.tenant.spec.name);
                len = 0;
            }
        }
        if let Err(e) = self.vring.add_used(self.head, len) {
            warn!("{}: cannot add used element: {e}", self.tenant.spec.name);
        }
        st.record(record);
        drop(st);
        if was_running {
            self.tenant.notify_idle();
        }
        match self.vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = self.vring.signal_used_queue() {
                    warn!(
                        "{}: cannot signal queue {}: {e}",
                        self.tenant.spec.name, self.queue
                    );
                }
            }
            Ok(false) => {}
            Err(e) => warn!("{}: cannot read event index: {e}", self.tenant.spec.name),
        }
        true
    }

    /// Marks this chain's INFER `request_id` as taken by an executor, unless its work
    /// was abandoned (then false: it must not run). Completing the ticket finishes it.
    pub fn start_running(&self, request_id: u64) -> bool {
        let started = self
            .tenant
            .start_running(request_id, self.queue, self.generation);
        self.running.store(started, Ordering::Relaxed);
        started
    }

    /// Completes with `used.len = 0` and nothing written (§9 step 0).
    pub fn complete_unanswerable(&self) -> bool {
        self.complete(&[], 0, Record::Other)
    }

    /// Completes with a response header only.
    pub fn respond(&self, header: &ResponseHeader, record: Record) -> bool {
        let mut bytes = [0u8; RESPONSE_HEADER_LEN];
        if header.encode(&mut bytes).is_err() {
            return self.complete_unanswerable();
        }
        self.complete(&[(self.response_offset(), &bytes)], self.used_len(), record)
    }

    /// Completes with a payload at W offset `payload_offset` and a response header.
    pub fn respond_with_payload(
        &self,
        payload_offset: u64,
        payload: &[u8],
        header: &ResponseHeader,
        record: Record,
    ) -> bool {
        let mut bytes = [0u8; RESPONSE_HEADER_LEN];
        if header.encode(&mut bytes).is_err() {
            return self.complete_unanswerable();
        }
        self.complete(
            &[(payload_offset, payload), (self.response_offset(), &bytes)],
            self.used_len(),
            record,
        )
    }

    /// Completes with output shape entries (at `shapes_offset`, right before the
    /// response header) and the response header, whose `num_outputs` it sets.
    pub fn respond_with_shapes(
        &self,
        shapes_offset: u64,
        mut header: ResponseHeader,
        shapes: Vec<TensorDesc>,
        record: Record,
    ) -> bool {
        header.num_outputs = u32::try_from(shapes.len()).unwrap_or(u32::MAX);
        let response = Response {
            header,
            outputs: shapes,
        };
        let mut bytes = [0u8; MAX_TENSORS * TENSOR_DESC_LEN + RESPONSE_HEADER_LEN];
        match response.encode(&mut bytes) {
            Ok(n) => self.complete(&[(shapes_offset, &bytes[..n])], self.used_len(), record),
            Err(_) => self.respond(&response.header, record),
        }
    }

    fn used_len(&self) -> u32 {
        // The chain walk rejected W longer than u32::MAX.
        u32::try_from(self.writable_len).unwrap_or(0)
    }
}
