//! Executor threads: take batches from the scheduler, run them on the model's
//! backend with tensors in guest memory, and complete every request of the batch.
//!
//! The scheduler's accounting is updated before the requests' used elements are
//! published, so a driver that submits again as soon as it sees a completion is not
//! refused for in-flight work that has already finished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ai_infer_protocol::{ProtocolError, ResponseHeader, Status, TensorDesc};
use log::{debug, error, warn};

use crate::backend::{
    Backend, BackendError, InputTensor, OutputBuffer, RequestOutcome, RequestTensors,
};
use crate::daemon::Shared;
use crate::guest_io::{tensor_slice, BounceBuffer, GuestIoError, TensorPlace};
use crate::intake::complete_rejected;
use crate::job::Job;
use crate::numa;
use crate::scheduler::{Batch, ExecutorId, JobEnd, Nanos, Poll, Reject};
use crate::tenant::Record;

/// How often an idle executor checks the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// An executor's loop, until `stop` is set.
pub fn run(shared: &Shared, id: ExecutorId, cpus: Option<&[u32]>, stop: &AtomicBool) {
    if let Some(cpus) = cpus {
        match numa::pin_current_thread(cpus) {
            Ok(()) => debug!("executor {}: pinned to CPUs {cpus:?}", id.0),
            Err(e) => warn!("executor {}: cannot pin to CPUs {cpus:?}: {e}", id.0),
        }
    }
    while !stop.load(Ordering::SeqCst) {
        match shared.scheduler.next(id, IDLE_POLL) {
            Poll::Run(batch) => run_batch(shared, id, batch),
            Poll::Drop(jobs) => {
                for (_, job, reject) in jobs {
                    complete_rejected(shared, job, reject);
                }
            }
            Poll::Wait(_) => {}
        }
    }
}

/// Bounce buffers of one job's scattered tensors (None for tensors used in place).
struct Staging {
    inputs: Vec<Option<BounceBuffer>>,
    outputs: Vec<Option<BounceBuffer>>,
}

impl Staging {
    fn new(job: &Job) -> Result<Self, GuestIoError> {
        let mem = &job.ticket.mem;
        let inputs = job
            .inputs
            .iter()
            .map(|place| match place {
                TensorPlace::InPlace { .. } => Ok(None),
                TensorPlace::Scattered(parts) => {
                    let mut b = BounceBuffer::new(place.len())?;
                    b.gather(mem, parts)?;
                    Ok(Some(b))
                }
            })
            .collect::<Result<_, GuestIoError>>()?;
        let outputs = job
            .outputs
            .iter()
            .map(|place| match place {
                TensorPlace::InPlace { .. } => Ok(None),
                TensorPlace::Scattered(_) => BounceBuffer::new(place.len()).map(Some),
            })
            .collect::<Result<_, GuestIoError>>()?;
        Ok(Staging { inputs, outputs })
    }

    fn tensors<'a>(&'a mut self, job: &'a Job) -> Result<RequestTensors<'a>, GuestIoError> {
        let mem = &*job.ticket.mem;
        let inputs = job
            .request
            .inputs
            .iter()
            .zip(&job.inputs)
            .zip(self.inputs.iter_mut())
            .map(|((desc, place), bounce)| {
                Ok(InputTensor {
                    desc,
                    data: tensor_slice(mem, place, bounce.as_mut())?,
                })
            })
            .collect::<Result<_, GuestIoError>>()?;
        let outputs = job
            .request
            .outputs
            .iter()
            .zip(&job.outputs)
            .zip(self.outputs.iter_mut())
            .map(|((desc, place), bounce)| {
                Ok(OutputBuffer {
                    desc,
                    buf: tensor_slice(mem, place, bounce.as_mut())?,
                })
            })
            .collect::<Result<_, GuestIoError>>()?;
        Ok(RequestTensors { inputs, outputs })
    }

    /// Copies produced bytes of bounced outputs back to guest memory.
    fn scatter_outputs(&self, job: &Job, shapes: &[TensorDesc]) -> Result<(), GuestIoError> {
        for ((bounce, place), shape) in self.outputs.iter().zip(&job.outputs).zip(shapes) {
            if let (Some(b), TensorPlace::Scattered(parts)) = (bounce, place) {
                b.scatter(&job.ticket.mem, parts, shape.data_len)?;
            }
        }
        Ok(())
    }
}

fn run_batch(shared: &Shared, id: ExecutorId, batch: Batch<Job>) {
    let model = batch.model;
    // Every dispatched job, and whether it runs (for the scheduler's accounting).
    let mut dispatched = Vec::with_capacity(batch.jobs.len());
    let start = shared.scheduler.now();
    // Work abandoned by a reset or disconnect is not run and never completed. A
    // request whose deadline passed is not started (§10.1), whatever the policy did.
    let mut jobs = Vec::new();
    let mut expired = Vec::new();
    for (meta, job) in batch.jobs {
        if !job.ticket.start_running(meta.request_id) {
            dispatched.push((meta.tenant, JobEnd::Dropped(Reject::Cancelled)));
            continue;
        }
        if meta.deadline.is_some_and(|d| d < start) {
            dispatched.push((meta.tenant, JobEnd::Dropped(Reject::Deadline)));
            expired.push(job);
        } else {
            dispatched.push((meta.tenant, JobEnd::Ran { weight: 1 }));
            jobs.push(job);
        }
    }
    let mut results: Vec<JobResult> = Vec::new();
    let mut compute_ns = 0;
    let mut batch_size = 0;
    match shared.registry.get(model) {
        Some(backend) => {
            (results, compute_ns, batch_size) = compute(shared, backend.as_ref(), &jobs);
        }
        None => {
            error!("scheduled model {model} has no backend");
            results.resize_with(jobs.len(), || (None, None));
        }
    }
    let now = shared.scheduler.now();
    shared
        .scheduler
        .with_core(|core| core.complete_batch(now, id, model, &dispatched, compute_ns));
    for (job, (outcome, staging)) in jobs.iter().zip(results) {
        let timing = Timing {
            queue_ns: start.saturating_sub(job.ticket.arrival),
            compute_ns,
            batch_size,
        };
        // Completing the ticket also ends its running state.
        finish(job, outcome, staging.as_ref(), timing);
    }
    for job in expired {
        complete_rejected(shared, job, Reject::Deadline);
    }
}

/// Runs `jobs` in one backend call. Returns each job's outcome (None if its tensors
/// could not be prepared) with its staging, the call's duration and batch size.
fn compute(shared: &Shared, backend: &dyn Backend, jobs: &[Job]) -> (Vec<JobResult>, Nanos, u32) {
    let mut staged: Vec<Option<Staging>> = jobs
        .iter()
        .map(|job| match Staging::new(job) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("{}: cannot stage tensors: {e}", job.ticket.tenant.spec.name);
                None
            }
        })
        .collect();
    let mut members = Vec::new();
    let mut tensors = Vec::new();
    for (index, (job, staging)) in jobs.iter().zip(staged.iter_mut()).enumerate() {
        if let Some(staging) = staging {
            match staging.tensors(job) {
                Ok(t) => {
                    members.push(index);
                    tensors.push(t);
                }
                Err(e) => warn!("{}: cannot map tensors: {e}", job.ticket.tenant.spec.name),
            }
        }
    }
    let batch_size = u32::try_from(tensors.len()).unwrap_or(u32::MAX);
    let begin = shared.scheduler.now();
    let outcomes = if tensors.is_empty() {
        Vec::new()
    } else {
        backend.run(&mut tensors)
    };
    let compute_ns = shared.scheduler.now().saturating_sub(begin);
    drop(tensors);
    if outcomes.len() != members.len() {
        error!(
            "model {}: backend returned {} outcomes for {} requests",
            backend.info().id,
            outcomes.len(),
            members.len()
        );
    }
    let mut by_job: Vec<Option<RequestOutcome>> = jobs.iter().map(|_| None).collect();
    for (index, outcome) in members.into_iter().zip(outcomes) {
        by_job[index] = Some(outcome);
    }
    let results = by_job.into_iter().zip(staged).collect();
    (results, compute_ns, batch_size)
}

/// What the backend call gave one job, and the job's bounce buffers.
type JobResult = (Option<RequestOutcome>, Option<Staging>);

#[derive(Clone, Copy)]
struct Timing {
    queue_ns: Nanos,
    compute_ns: Nanos,
    batch_size: u32,
}

/// Shape entries reporting what each output needs (on a failure after compute).
fn needed_shapes(job: &Job, shapes: &[ai_infer_protocol::Shape]) -> Option<Vec<TensorDesc>> {
    if shapes.len() != job.request.outputs.len() {
        return None;
    }
    job.request
        .outputs
        .iter()
        .zip(shapes)
        .map(|(desc, shape)| TensorDesc::produced(desc.dtype, *shape).ok())
        .collect()
}

/// Writes one job's response and publishes it.
fn finish(job: &Job, outcome: Option<RequestOutcome>, staging: Option<&Staging>, t: Timing) {
    let request_id = job.request.header.request_id;
    let num_inputs = job.request.inputs.len() as u32;
    let mut header = ResponseHeader::new(Status::BackendError, request_id);
    header.queue_ns = t.queue_ns;
    header.compute_ns = t.compute_ns;
    header.batch_size = t.batch_size;
    let mut shapes: Option<Vec<TensorDesc>> = None;
    match outcome {
        None => {
            header.compute_ns = 0;
            header.batch_size = 0;
        }
        Some(Ok(produced)) if produced.len() != job.request.outputs.len() => {
            warn!(
                "model {}: backend produced {} outputs, the signature has {}",
                job.request.header.model_id,
                produced.len(),
                job.request.outputs.len()
            );
        }
        Some(Ok(produced)) => match check_outputs(job, &produced) {
            Ok(entries) => match staging.map(|s| s.scatter_outputs(job, &entries)) {
                Some(Err(e)) => warn!("{}: cannot write outputs: {e}", job.ticket.tenant.spec.name),
                _ => {
                    header.status = Status::Ok;
                    header.payload_len = entries.iter().map(|e| e.data_len).sum();
                    shapes = Some(entries);
                }
            },
            Err((index, e)) => {
                header.status = e.status();
                header.detail = num_inputs + index;
                header.payload_len = e.needed_bytes().unwrap_or(0);
                shapes = needed_shapes(job, &produced);
            }
        },
        Some(Err(e)) => match e {
            BackendError::BadInput { index, reason } => {
                header.status = Status::BadTensor;
                header.detail = u32::try_from(index).unwrap_or(u32::MAX);
                log::debug!(
                    "{}: bad input {index}: {reason}",
                    job.ticket.tenant.spec.name
                );
            }
            BackendError::OutputTooSmall {
                index,
                needed,
                shapes: produced,
            } => {
                header.status = Status::BufferTooSmall;
                header.detail = num_inputs.saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
                header.payload_len = needed;
                shapes = needed_shapes(job, &produced);
            }
            BackendError::ShapeMismatch {
                index,
                shapes: produced,
                ..
            } => {
                header.status = Status::BadTensor;
                header.detail = num_inputs.saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
                shapes = needed_shapes(job, &produced);
            }
            BackendError::Runtime(msg) => {
                warn!("model {}: {msg}", job.request.header.model_id);
            }
        },
    }
    let record = Record::Infer {
        request_id,
        admitted: true,
        status: header.status,
        queue_ns: header.queue_ns,
        compute_ns: header.compute_ns,
        batch_size: header.batch_size,
        bytes_in: job.input_bytes(),
        bytes_out: header.payload_len,
    };
    match shapes {
        Some(entries) => {
            job.ticket
                .respond_with_shapes(job.layout.shapes.offset, header, entries, record);
        }
        None => {
            job.ticket.respond(&header, record);
        }
    }
}

/// Checks every produced shape against its output descriptor (same count); the
/// error carries the output's index.
fn check_outputs(
    job: &Job,
    produced: &[ai_infer_protocol::Shape],
) -> Result<Vec<TensorDesc>, (u32, ProtocolError)> {
    job.request
        .outputs
        .iter()
        .zip(produced)
        .enumerate()
        .map(|(k, (desc, shape))| desc.check_produced(shape).map_err(|e| (k as u32, e)))
        .collect()
}
