//! Steps 1–12 of docs/ai_infer.md §9 for one chain that passed the walk: copy and
//! parse the request, check the chain's lengths and overlap, then answer MODELS,
//! TRACE and CANCEL at once, or check and admit an INFER into the scheduler.
//!
//! Every failure becomes a status in the chain's own response; nothing here panics
//! on guest input or touches another chain.

use std::sync::Arc;

use ai_infer_protocol::{
    CancelOutcome, ChainLayout, DeviceConfig, ModelList, Opcode, ProtocolError, Request,
    RequestHeader, ResponseHeader, Status, TraceCounters, MAX_TENSORS, REQUEST_HEADER_LEN,
    TENSOR_DESC_LEN,
};
use ai_infer_scheduler::{JobMeta, Reject};
use log::debug;

use crate::chain::{writable_overlap, Segment};
use crate::engine::Engine;
use crate::guest_io::{read_stream, TensorPlace};
use crate::job::Job;
use crate::tenant::Record;
use crate::ticket::ChainTicket;

/// Most bytes of R the device copies: a header and the largest descriptor list.
pub const REQUEST_PREFIX_MAX: usize = REQUEST_HEADER_LEN + 2 * MAX_TENSORS * TENSOR_DESC_LEN;

/// A response header for a request that never ran, with `queue_ns` up to now.
fn never_ran(engine: &Engine, ticket: &ChainTicket, mut header: ResponseHeader) -> ResponseHeader {
    header.queue_ns = engine.scheduler.now().saturating_sub(ticket.arrival);
    header
}

/// A rejected INFER's record (not registered in flight).
fn infer_record(request_id: u64, header: &ResponseHeader, admitted: bool) -> Record {
    Record::Infer {
        request_id,
        admitted,
        status: header.status,
        queue_ns: header.queue_ns,
        compute_ns: 0,
        batch_size: 0,
        bytes_in: 0,
        bytes_out: 0,
    }
}

/// Processes one walked chain within the connection's `limits`: `readable` (R,
/// `readable_len` bytes) is its device-readable part; `ticket` holds the writable part
/// and completes it.
pub fn handle_chain(
    engine: &Engine,
    readable: &[Segment],
    readable_len: u64,
    ticket: ChainTicket,
    limits: &DeviceConfig,
) {
    // Step 1-6: one copy of the header and descriptors, then only that copy is used.
    let prefix_len = usize::try_from(readable_len)
        .unwrap_or(usize::MAX)
        .min(REQUEST_PREFIX_MAX);
    let mut prefix_buf = [0u8; REQUEST_PREFIX_MAX];
    let prefix = &mut prefix_buf[..prefix_len];
    if let Err(e) = read_stream(&ticket.mem, readable, 0, prefix) {
        debug!("{}: cannot read request: {e}", ticket.tenant.spec.name);
        let h = never_ran(engine, &ticket, ResponseHeader::new(Status::BadRequest, 0));
        ticket.respond(&h, Record::Other);
        return;
    }
    let request_id = RequestHeader::peek_request_id(prefix).unwrap_or(0);
    let fail = |e: &ProtocolError, record_infer: bool| {
        let h = never_ran(engine, &ticket, ResponseHeader::from_error(request_id, e));
        let record = if record_infer {
            infer_record(request_id, &h, false)
        } else {
            Record::Other
        };
        ticket.respond(&h, record);
    };
    let req = match Request::parse(prefix, limits) {
        Ok(req) => req,
        Err(e) => return fail(&e, false),
    };
    let is_infer = req.header.opcode == Opcode::Infer;
    // Step 7: exact lengths.
    let layout = match ChainLayout::from_chain(&req, readable_len, ticket.writable_len) {
        Ok(layout) => layout,
        Err(e) => return fail(&e, is_infer),
    };
    // Step 8: no writable buffer aliases another buffer.
    if writable_overlap(readable, &ticket.writable) {
        let h = never_ran(
            engine,
            &ticket,
            ResponseHeader::new(Status::BadRequest, request_id),
        );
        let record = if is_infer {
            infer_record(request_id, &h, false)
        } else {
            Record::Other
        };
        ticket.respond(&h, record);
        return;
    }
    match req.header.opcode {
        Opcode::Models => models(engine, &ticket, &layout, request_id),
        Opcode::Trace => trace(engine, &ticket, &layout, request_id),
        Opcode::Cancel => cancel(engine, &ticket, req.header.cancel_id, request_id),
        Opcode::Infer => infer(engine, ticket, readable, req, layout),
    }
}

fn models(engine: &Engine, ticket: &ChainTicket, layout: &ChainLayout, request_id: u64) {
    let list = ModelList {
        models: engine.registry.infos(&ticket.tenant.grant().allowed_ids),
    };
    let needed = list.encoded_len() as u64;
    let mut header = ResponseHeader::new(Status::Ok, request_id);
    header.payload_len = needed;
    if needed > layout.payload.len {
        header.status = Status::BufferTooSmall;
        ticket.respond(&never_ran(engine, ticket, header), Record::Other);
        return;
    }
    let mut payload = vec![0u8; list.encoded_len()];
    if let Err(e) = list.encode(&mut payload) {
        // The registry validated every model; this would be a daemon bug.
        log::error!("cannot encode the model list: {e}");
        let h = ResponseHeader::new(Status::BackendError, request_id);
        ticket.respond(&never_ran(engine, ticket, h), Record::Other);
        return;
    }
    let header = never_ran(engine, ticket, header);
    ticket.respond_with_payload(layout.payload.offset, &payload, &header, Record::Other);
}

fn trace(engine: &Engine, ticket: &ChainTicket, layout: &ChainLayout, request_id: u64) {
    let mut header = ResponseHeader::new(Status::Ok, request_id);
    header.payload_len = TraceCounters::LEN as u64;
    if (TraceCounters::LEN as u64) > layout.payload.len {
        header.status = Status::BufferTooSmall;
        ticket.respond(&never_ran(engine, ticket, header), Record::Other);
        return;
    }
    let id = ticket.tenant.spec.id;
    let mut counters = ticket.tenant.trace(engine.scheduler.now());
    // The scheduler clamps priorities, so its count is the one source of truth.
    counters.priority_clamped = engine
        .scheduler
        .inspect(|core| core.tenant_snapshot(id))
        .map_or(0, |s| s.stats.priority_clamped);
    let mut payload = [0u8; TraceCounters::LEN];
    if counters.encode(&mut payload).is_err() {
        header.status = Status::BackendError;
        header.payload_len = 0;
        ticket.respond(&never_ran(engine, ticket, header), Record::Other);
        return;
    }
    let header = never_ran(engine, ticket, header);
    ticket.respond_with_payload(layout.payload.offset, &payload, &header, Record::Other);
}

fn cancel(engine: &Engine, ticket: &ChainTicket, target: u64, request_id: u64) {
    let tenant = &ticket.tenant;
    let (outcome, cancelled) = {
        let st = tenant.lock();
        match st.conn.in_flight.get(&target) {
            None => (CancelOutcome::NotFound, None),
            Some(f) if f.running => (CancelOutcome::AlreadyRunning, None),
            Some(_) => {
                // Tenant lock, then scheduler lock: the order every path uses.
                let removed = engine
                    .scheduler
                    .with_core(|core| core.cancel(tenant.spec.id, target));
                match removed {
                    Some((_, job)) => (CancelOutcome::Cancelled, Some(job)),
                    // An executor took it between our look-up and the scheduler's.
                    None => (CancelOutcome::AlreadyRunning, None),
                }
            }
        }
    };
    // The target's used element is published before the CANCEL's (§10.4).
    if let Some(job) = cancelled {
        complete_rejected(engine, job, Reject::Cancelled);
    }
    let header = never_ran(engine, ticket, ResponseHeader::cancel(request_id, outcome));
    ticket.respond(&header, Record::Other);
}

/// Completes an admitted job that will not run, with `reject`'s status.
pub fn complete_rejected(engine: &Engine, job: Job, reject: Reject) {
    let request_id = job.request.header.request_id;
    let h = never_ran(
        engine,
        &job.ticket,
        ResponseHeader::new(reject.status(), request_id),
    );
    job.ticket.respond(&h, infer_record(request_id, &h, true));
}

fn locate_all(
    ticket: &ChainTicket,
    segments: &[Segment],
    ranges: &[ai_infer_protocol::ByteRange],
    descs: &[ai_infer_protocol::TensorDesc],
) -> Option<Vec<TensorPlace>> {
    ranges
        .iter()
        .zip(descs)
        .map(|(r, d)| {
            TensorPlace::locate(&ticket.mem, segments, r.offset, r.len, d.dtype.size_bytes()).ok()
        })
        .collect()
}

fn infer(
    engine: &Engine,
    ticket: ChainTicket,
    readable: &[Segment],
    req: Request,
    layout: ChainLayout,
) {
    let request_id = req.header.request_id;
    let reject_now = |ticket: &ChainTicket, header: ResponseHeader| {
        let h = never_ran(engine, ticket, header);
        ticket.respond(&h, infer_record(request_id, &h, false));
    };
    // Step 9: the model, then this tenant's right to it.
    let Some(backend) = engine.registry.get(req.header.model_id) else {
        return reject_now(
            &ticket,
            ResponseHeader::new(Status::UnknownModel, request_id),
        );
    };
    if !ticket
        .tenant
        .grant()
        .allowed_ids
        .contains(&req.header.model_id)
    {
        return reject_now(
            &ticket,
            ResponseHeader::new(Status::ModelNotAllowed, request_id),
        );
    }
    // Step 10: the signature.
    if let Err(e) = backend.info().check_request(&req) {
        return reject_now(&ticket, ResponseHeader::from_error(request_id, &e));
    }
    let (Some(inputs), Some(outputs)) = (
        locate_all(&ticket, readable, &layout.inputs, &req.inputs),
        locate_all(&ticket, &ticket.writable, &layout.outputs, &req.outputs),
    ) else {
        // Lengths were checked against the chain; this cannot happen.
        return reject_now(&ticket, ResponseHeader::new(Status::BadRequest, request_id));
    };
    let tenant = Arc::clone(&ticket.tenant);
    let deadline = match req.header.deadline_us {
        0 => None,
        us => Some(ticket.arrival.saturating_add(us.saturating_mul(1000))),
    };
    let meta = JobMeta {
        tenant: tenant.spec.id,
        request_id,
        model: req.header.model_id,
        priority: req.header.priority,
        deadline,
        arrival: ticket.arrival,
    };
    let queue = ticket.queue;
    let generation = ticket.generation;
    let job = Job {
        ticket,
        request: req,
        layout,
        inputs,
        outputs,
    };
    // Steps 11-12 under the tenant lock, so that the id check, the admission and the
    // in-flight registration are one step for CANCEL and the executors.
    let rejected = {
        let mut st = tenant.lock();
        if tenant.generation(queue) != generation {
            // The queue was reset while this chain was being read: drop it unanswered.
            return;
        }
        if st.conn.in_flight.contains_key(&request_id) {
            Some((job, ResponseHeader::new(Status::BadRequest, request_id)))
        } else {
            match engine.scheduler.submit(meta, job) {
                Ok(()) => {
                    st.add_in_flight(request_id, queue);
                    None
                }
                Err((reject, job)) => Some((job, ResponseHeader::new(reject.status(), request_id))),
            }
        }
    };
    if let Some((job, header)) = rejected {
        reject_now(&job.ticket, header);
    }
}
