//! Executor threads: take batches from the scheduler, run them on the model's
//! backend with tensors in guest memory, and complete every request of the batch.
//!
//! The scheduler's accounting is updated before the requests' used elements are
//! published, so a driver that submits again as soon as it sees a completion is not
//! refused for in-flight work that has already finished.
//!
//! Faults stay inside the request that caused them. Staging, every backend call and
//! the writing of each response run under `catch_unwind`; a batch whose backend call
//! panics, returns the wrong number of outcomes or fails a request with a runtime
//! error is run again member by member, so only the bad request fails (BACKEND_ERROR).
//! Whatever happens, every dispatched request is accounted to the scheduler and its
//! chain completed exactly once ([`Running::settle`]). An executor thread that dies
//! anyway is replaced by its supervisor ([`run`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ai_infer_protocol::{ProtocolError, ResponseHeader, Status, TensorDesc};
use ai_infer_scheduler::{Batch, ExecutorId, JobEnd, ModelId, Nanos, Poll, Reject, TenantId};
use log::{debug, error, warn};

use crate::backend::{
    Backend, BackendError, InputTensor, OutputBuffer, RequestOutcome, RequestTensors,
};
use crate::engine::Engine;
use crate::guest_io::{tensor_slice, BounceBuffer, GuestIoError, TensorPlace};
use crate::intake::complete_rejected;
use crate::job::Job;
use crate::numa;
use crate::seccomp::{self, ThreadKind};
use crate::tenant::Record;

/// How often an idle executor checks the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Pause before a dead executor thread is replaced, so a fault that kills every
/// new thread at once cannot spin a CPU.
const RESTART_DELAY: Duration = Duration::from_millis(50);

/// Fault counters of the executors: process-wide (one daemon per process).
pub struct FaultCounters {
    /// Panics caught on the batch path (staging, backend calls, responses).
    pub panics: AtomicU64,
    /// Batches run again member by member after a failure.
    pub reruns: AtomicU64,
    /// Executor threads that died and were replaced.
    pub restarts: AtomicU64,
}

/// The executors' fault counters ([`render_fault_metrics`]).
pub static FAULTS: FaultCounters = FaultCounters {
    panics: AtomicU64::new(0),
    reruns: AtomicU64::new(0),
    restarts: AtomicU64::new(0),
};

/// Appends the executors' fault counters in the Prometheus text format.
pub fn render_fault_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let series = [
        (
            "ai_inferd_contained_panics_total",
            "Panics caught on the batch path; each failed only its own request.",
            &FAULTS.panics,
        ),
        (
            "ai_inferd_batch_reruns_total",
            "Batches run again member by member after a panic or runtime failure.",
            &FAULTS.reruns,
        ),
        (
            "ai_inferd_executor_restarts_total",
            "Executor threads that died and were replaced.",
            &FAULTS.restarts,
        ),
    ];
    for (name, help, counter) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.load(Ordering::Relaxed)
        );
    }
}

/// Runs `f`, turning a panic into `None` after counting and logging it as `what`.
/// Callers pass closures over state they either discard or re-check after a panic
/// (hence `AssertUnwindSafe`): a half-written output buffer is rewritten or never
/// published, and a job whose response could not be built fails with BACKEND_ERROR.
fn contain<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            FAULTS.panics.fetch_add(1, Ordering::Relaxed);
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".into());
            error!("{what} panicked: {reason}");
            None
        }
    }
}

/// An executor: a supervisor that runs the executor's loop on its own thread until
/// `stop` is set, and replaces that thread whenever it dies (every batch is
/// contained, so only a fault outside the batch path can kill it).
pub fn run(engine: &Engine, id: ExecutorId, cpus: Option<&[u32]>, stop: &AtomicBool) {
    let name = format!("executor-{}", id.0);
    supervise(&name, stop, || serve(engine, id, cpus, stop));
}

/// Runs `body` on a thread named `name`, again after each time that thread dies,
/// until `body` returns or `stop` is set; each replacement is counted.
fn supervise(name: &str, stop: &AtomicBool, body: impl Fn() + Sync) {
    loop {
        let ended = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn_scoped(scope, &body)
                .map(|thread| thread.join())
        });
        match ended {
            Ok(Ok(())) => return,
            Ok(Err(_)) => error!("{name}: the thread died"),
            Err(e) => error!("{name}: cannot start the thread: {e}"),
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        FAULTS.restarts.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(RESTART_DELAY);
        warn!("{name}: replaced");
    }
}

/// An executor's loop, until `stop` is set.
fn serve(engine: &Engine, id: ExecutorId, cpus: Option<&[u32]>, stop: &AtomicBool) {
    if let Some(cpus) = cpus {
        match numa::pin_current_thread(cpus) {
            Ok(()) => debug!("executor {}: pinned to CPUs {cpus:?}", id.0),
            Err(e) => warn!("executor {}: cannot pin to CPUs {cpus:?}: {e}", id.0),
        }
    }
    // Pinned first: the filter has no sched_setaffinity.
    seccomp::apply(ThreadKind::Executor);
    while !stop.load(Ordering::SeqCst) {
        match engine.scheduler.next(id, IDLE_POLL) {
            Poll::Run(batch) => run_batch(engine, id, batch),
            Poll::Drop(jobs) => {
                for (_, job, reject) in jobs {
                    contain("completing a dropped request", || {
                        complete_rejected(engine, job, reject)
                    });
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

/// A dispatched batch until every job is accounted for and completed. Owned outside
/// the guarded part of [`run_batch`], so a panic there leaves it intact for
/// [`Running::settle`].
struct Running<'a> {
    engine: &'a Engine,
    executor: ExecutorId,
    model: ModelId,
    /// When the batch was taken (scheduler clock).
    start: Nanos,
    /// How each dispatched job ended, until reported to the scheduler.
    dispatched: Option<Vec<(TenantId, JobEnd)>>,
    /// Jobs that run, each until its chain is completed.
    jobs: Vec<Option<Job>>,
    /// Jobs not started because their deadline passed, until completed.
    expired: Vec<Job>,
}

impl Running<'_> {
    /// Reports the batch to the scheduler (once) with `compute_ns` of work.
    fn account(&mut self, compute_ns: Nanos) {
        if let Some(dispatched) = self.dispatched.take() {
            let (executor, model) = (self.executor, self.model);
            let now = self.engine.scheduler.now();
            contain("scheduler accounting", || {
                self.engine.scheduler.with_core(|core| {
                    core.complete_batch(now, executor, model, &dispatched, compute_ns)
                })
            });
        }
    }

    /// What is left after a fault: accounts the batch and completes every chain not
    /// yet completed (BACKEND_ERROR, or DEADLINE for expired ones), each contained.
    fn settle(&mut self) {
        let elapsed = self.engine.scheduler.now().saturating_sub(self.start);
        self.account(elapsed);
        for job in self.jobs.iter_mut().filter_map(Option::take) {
            let queue_ns = self.start.saturating_sub(job.ticket.arrival);
            contain("failing a request", || fail(&job, queue_ns));
        }
        for job in self.expired.drain(..) {
            contain("completing an expired request", || {
                complete_rejected(self.engine, job, Reject::Deadline)
            });
        }
    }

    /// Runs the batch and completes its jobs; any panic escaping the finer guards
    /// leaves the rest to [`Running::settle`].
    fn run(&mut self) {
        let backend = self.engine.registry.get(self.model);
        let (results, busy_ns) = {
            let jobs: Vec<&Job> = self.jobs.iter().flatten().collect();
            match &backend {
                Some(backend) => compute(self.engine, backend.as_ref(), &jobs),
                None => {
                    error!("scheduled model {} has no backend", self.model);
                    let failed = jobs.iter().map(|_| JobResult::not_run()).collect();
                    (failed, 0)
                }
            }
        };
        self.account(busy_ns);
        for (slot, result) in self.jobs.iter_mut().zip(results) {
            let Some(job) = slot.take() else { continue };
            let timing = Timing {
                queue_ns: self.start.saturating_sub(job.ticket.arrival),
                compute_ns: result.compute_ns,
                batch_size: result.batch_size,
            };
            // Completing the ticket also ends its running state.
            finish(&job, result.outcome, result.staging.as_ref(), timing);
        }
        for job in self.expired.drain(..) {
            contain("completing an expired request", || {
                complete_rejected(self.engine, job, Reject::Deadline)
            });
        }
    }
}

fn run_batch(engine: &Engine, id: ExecutorId, batch: Batch<Job>) {
    let mut running = Running {
        engine,
        executor: id,
        model: batch.model,
        start: engine.scheduler.now(),
        dispatched: None,
        jobs: Vec::with_capacity(batch.jobs.len()),
        expired: Vec::new(),
    };
    let start = running.start;
    let mut dispatched = Vec::with_capacity(batch.jobs.len());
    // Work abandoned by a reset or disconnect is not run and never completed. A
    // request whose deadline passed is not started (§10.1), whatever the policy did.
    for (meta, job) in batch.jobs {
        if !job.ticket.start_running(meta.request_id) {
            dispatched.push((meta.tenant, JobEnd::Dropped(Reject::Cancelled)));
            continue;
        }
        if meta.deadline.is_some_and(|d| d < start) {
            dispatched.push((meta.tenant, JobEnd::Dropped(Reject::Deadline)));
            running.expired.push(job);
        } else {
            dispatched.push((meta.tenant, JobEnd::Ran { weight: 1 }));
            running.jobs.push(Some(job));
        }
    }
    running.dispatched = Some(dispatched);
    if contain("a batch", || running.run()).is_none() {
        running.settle();
    }
}

/// What one job got: the backend's outcome (None if its tensors could not be
/// prepared), its bounce buffers, and the call it was last run in.
struct JobResult {
    outcome: Option<RequestOutcome>,
    staging: Option<Staging>,
    compute_ns: Nanos,
    batch_size: u32,
}

impl JobResult {
    fn not_run() -> Self {
        JobResult {
            outcome: None,
            staging: None,
            compute_ns: 0,
            batch_size: 0,
        }
    }
}

/// Runs `jobs` in one backend call, and again one by one those whose result the
/// call did not settle (all of them after a panic or a wrong outcome count; those
/// failed with a runtime error otherwise). Returns each job's result and the time
/// the executor spent in backend calls.
fn compute(engine: &Engine, backend: &dyn Backend, jobs: &[&Job]) -> (Vec<JobResult>, Nanos) {
    let mut staged: Vec<Option<Staging>> = jobs
        .iter()
        .map(|job| {
            let name = &job.ticket.tenant.spec.name;
            match contain("staging", || Staging::new(job)) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    warn!("{name}: cannot stage tensors: {e}");
                    None
                }
                None => None,
            }
        })
        .collect();
    let mut members = Vec::new();
    let mut tensors = Vec::new();
    for (index, (job, staging)) in jobs.iter().zip(staged.iter_mut()).enumerate() {
        if let Some(staging) = staging {
            let name = &job.ticket.tenant.spec.name;
            match contain("mapping tensors", move || staging.tensors(job)) {
                Some(Ok(t)) => {
                    members.push(index);
                    tensors.push(t);
                }
                Some(Err(e)) => warn!("{name}: cannot map tensors: {e}"),
                None => {}
            }
        }
    }
    let model = backend.info().id;
    let batch_size = u32::try_from(tensors.len()).unwrap_or(u32::MAX);
    let begin = engine.scheduler.now();
    let ran = if tensors.is_empty() {
        Some(Vec::new())
    } else {
        contain("a backend call", || backend.run(&mut tensors))
    };
    let batch_ns = engine.scheduler.now().saturating_sub(begin);
    let mut busy_ns = batch_ns;
    // Each member's outcome and the call it came from (compute_ns, batch size).
    let mut outcomes: Vec<(Option<RequestOutcome>, Nanos, u32)> = match ran {
        Some(outcomes) if outcomes.len() == members.len() => outcomes
            .into_iter()
            .map(|o| (Some(o), batch_ns, batch_size))
            .collect(),
        Some(outcomes) => {
            error!(
                "model {model}: backend returned {} outcomes for {} requests",
                outcomes.len(),
                members.len()
            );
            members
                .iter()
                .map(|_| (None, batch_ns, batch_size))
                .collect()
        }
        None => members
            .iter()
            .map(|_| (None, batch_ns, batch_size))
            .collect(),
    };
    // A whole batch that failed (a panic, outcomes missing, or every member a runtime
    // error, as a runtime that fails the batch's one call reports) may be one member's
    // fault: run each member alone, so only the bad request fails. A batch whose members
    // settled one by one keeps their outcomes (a request that failed on its own is not
    // computed twice), and a request alone has nothing to retry.
    let unsettled =
        |o: &Option<RequestOutcome>| matches!(o, None | Some(Err(BackendError::Runtime(_))));
    if members.len() > 1 && outcomes.iter().all(|(o, _, _)| unsettled(o)) {
        FAULTS.reruns.fetch_add(1, Ordering::Relaxed);
        warn!(
            "model {model}: a batch of {} failed; running its members one by one",
            members.len()
        );
        for (k, slot) in outcomes.iter_mut().enumerate() {
            if !unsettled(&slot.0) {
                continue;
            }
            let begin = engine.scheduler.now();
            let alone = contain("a backend call", || backend.run(&mut tensors[k..=k]));
            let ns = engine.scheduler.now().saturating_sub(begin);
            busy_ns = busy_ns.saturating_add(ns);
            *slot = (alone.and_then(|v| v.into_iter().next()), ns, 1);
        }
    }
    drop(tensors);
    let mut by_job: Vec<Option<(Option<RequestOutcome>, Nanos, u32)>> =
        jobs.iter().map(|_| None).collect();
    for (index, outcome) in members.into_iter().zip(outcomes) {
        by_job[index] = Some(outcome);
    }
    let results = by_job
        .into_iter()
        .zip(staged)
        .map(|(result, staging)| match result {
            // A member whose backend call panicked (or gave no outcome) failed at
            // run time: BACKEND_ERROR with the call's timing.
            Some((outcome, compute_ns, batch_size)) => JobResult {
                outcome: Some(outcome.unwrap_or_else(|| {
                    Err(BackendError::Runtime(
                        "the backend failed this request".into(),
                    ))
                })),
                staging,
                compute_ns,
                batch_size,
            },
            None => JobResult {
                staging,
                ..JobResult::not_run()
            },
        })
        .collect();
    (results, busy_ns)
}

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

/// A response ready to publish: header, output shape entries, accounting record.
type Reply = (ResponseHeader, Option<Vec<TensorDesc>>, Record);

/// Writes one job's outputs and response and publishes it, exactly once: a panic
/// while building the response fails the request (BACKEND_ERROR); a panic while
/// publishing is not retried, as the used element may already be out.
fn finish(job: &Job, outcome: Option<RequestOutcome>, staging: Option<&Staging>, t: Timing) {
    let reply = contain("building a response", || response(job, outcome, staging, t))
        .unwrap_or_else(|| failure(job, t.queue_ns));
    contain("publishing a response", || publish(job, reply));
}

/// Completes `job` with BACKEND_ERROR (its work failed or was lost to a fault).
fn fail(job: &Job, queue_ns: Nanos) {
    publish(job, failure(job, queue_ns));
}

/// A BACKEND_ERROR reply for `job`, nothing written to its outputs.
fn failure(job: &Job, queue_ns: Nanos) -> Reply {
    let request_id = job.request.header.request_id;
    let mut header = ResponseHeader::new(Status::BackendError, request_id);
    header.queue_ns = queue_ns;
    let record = Record::Infer {
        request_id,
        admitted: true,
        status: header.status,
        queue_ns,
        compute_ns: 0,
        batch_size: 0,
        bytes_in: job.input_bytes(),
        bytes_out: 0,
    };
    (header, None, record)
}

/// Publishes `reply` on `job`'s chain.
fn publish(job: &Job, (header, shapes, record): Reply) {
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

/// Writes one job's outputs (bounced ones) and builds its response.
fn response(
    job: &Job,
    outcome: Option<RequestOutcome>,
    staging: Option<&Staging>,
    t: Timing,
) -> Reply {
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
    (header, shapes, record)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_executor_thread_is_replaced_until_its_loop_returns() {
        let runs = AtomicU64::new(0);
        let restarts = FAULTS.restarts.load(Ordering::Relaxed);
        let stop = AtomicBool::new(false);
        supervise("executor-test", &stop, || {
            assert_eq!(std::thread::current().name(), Some("executor-test"));
            if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("injected executor fault");
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(FAULTS.restarts.load(Ordering::Relaxed) >= restarts + 2);
    }

    #[test]
    fn a_stopped_executor_is_not_replaced() {
        let runs = AtomicU64::new(0);
        let stop = AtomicBool::new(true);
        supervise("executor-test", &stop, || {
            runs.fetch_add(1, Ordering::SeqCst);
            panic!("injected executor fault");
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
