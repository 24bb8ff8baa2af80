//! Synthetic tenants: one thread per tenant drives a real vhost-user connection
//! ([`TestFrontend`]) with INFER requests of the synthetic model, closed loop (keep
//! `depth` requests in flight) or open loop (one request every `interval`), and
//! records every completion: status, latency seen by the driver (submission to used
//! element) and on the device (`queue_ns + compute_ns`).
//!
//! All tenants of one [`spawn`] start together and stop submitting together; the
//! requests still in flight are then waited for, so every request is accounted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ai_infer_protocol::{DType, PriorityClass, ProtocolError, Request, Status, TensorDesc};
use thiserror::Error;

use crate::{FrontendError, FrontendOptions, Pending, TestFrontend};

/// Why a load could not run, or what it saw go wrong.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A test frontend failed.
    #[error("test frontend: {0}")]
    Frontend(#[from] FrontendError),
    /// A request could not be built.
    #[error("request: {0}")]
    Protocol(#[from] ProtocolError),
    /// A load thread could not be started.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// Something measured is inconsistent (a wrong output, a request lost).
    #[error("{0}")]
    Check(String),
}

/// Elements per request (F32 `[1, ELEMENTS]`).
const ELEMENTS: u64 = 16;

/// How long a finished load waits for its last requests.
const DRAIN: Duration = Duration::from_secs(30);

/// How a tenant sends.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// Keeps `depth` requests in flight (saturating).
    Closed {
        /// Requests in flight.
        depth: u32,
    },
    /// One request every `interval`, the first after `offset`.
    Periodic {
        /// Time between submissions.
        interval: Duration,
        /// Delay of the first submission.
        offset: Duration,
    },
}

/// One synthetic tenant.
#[derive(Clone, Debug)]
pub struct Load {
    /// Its tenant socket.
    pub socket: PathBuf,
    /// The model id to call.
    pub model: u32,
    /// The class asked for (the daemon lowers it to the tenant's ceiling).
    pub class: PriorityClass,
    /// How it sends.
    pub pattern: Pattern,
    /// Relative deadline of every request, µs (0 = none).
    pub deadline_us: u64,
}

/// One completed request.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Its status.
    pub status: Status,
    /// When it was submitted, from the common start.
    pub submitted: Duration,
    /// Submission to used element, as the driver saw it, ns.
    pub latency_ns: u64,
    /// `queue_ns` from the response header.
    pub queue_ns: u64,
    /// `compute_ns` from the response header.
    pub compute_ns: u64,
}

impl Outcome {
    /// Time on the device side, `queue_ns + compute_ns`.
    pub fn device_ns(&self) -> u64 {
        self.queue_ns.saturating_add(self.compute_ns)
    }
}

/// What one tenant did.
#[derive(Clone, Debug, Default)]
pub struct LoadRun {
    /// Every completion, in completion order.
    pub outcomes: Vec<Outcome>,
    /// Periodic submissions skipped because the driver's ring was full.
    pub skipped: u64,
}

impl LoadRun {
    /// OK completions of requests submitted at or after `from`.
    pub fn ok_after(&self, from: Duration) -> impl Iterator<Item = &Outcome> {
        self.outcomes
            .iter()
            .filter(move |o| o.status == Status::Ok && o.submitted >= from)
    }

    /// Completions with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.outcomes.iter().filter(|o| o.status == status).count()
    }
}

/// Loads running; [`Running::join`] waits for them.
pub struct Running {
    start: Instant,
    threads: Vec<JoinHandle<Result<LoadRun, LoadError>>>,
}

impl Running {
    /// When the loads started submitting.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Sleeps until `offset` after the start.
    pub fn sleep_until(&self, offset: Duration) {
        let left = (self.start + offset).saturating_duration_since(Instant::now());
        std::thread::sleep(left);
    }

    /// Waits for every tenant to stop and drain; their runs in `spawn` order.
    pub fn join(self) -> Result<Vec<LoadRun>, LoadError> {
        self.threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| LoadError::Check("a load thread panicked".into()))?
            })
            .collect()
    }
}

/// Connects every load, then starts them together for `duration`.
pub fn spawn(loads: &[Load], duration: Duration) -> Result<Running, LoadError> {
    let mut frontends = Vec::new();
    for load in loads {
        let options = FrontendOptions {
            regions: vec![(0x4000_0000, 4 << 20)],
            ..FrontendOptions::default()
        };
        frontends.push(TestFrontend::connect(&load.socket, options)?);
    }
    // Everybody connected: start together, a little later.
    let start = Instant::now() + Duration::from_millis(20);
    let mut threads = Vec::new();
    for (load, fe) in loads.iter().cloned().zip(frontends) {
        threads.push(
            std::thread::Builder::new()
                .name("bench-tenant".into())
                .spawn(move || drive(fe, &load, start, duration))
                .map_err(LoadError::Io)?,
        );
    }
    Ok(Running { start, threads })
}

/// One tenant's requests in flight: chain head → (pending, request values, submitted).
struct InFlight {
    pending: HashMap<u16, (Pending, f32, Instant)>,
    next_id: u64,
}

fn request(id: u64, load: &Load) -> Result<Request, LoadError> {
    let req = Request::infer(
        id,
        load.model,
        vec![TensorDesc::input(DType::F32, &[1, ELEMENTS])?],
        vec![TensorDesc::output(
            DType::F32,
            &[1, ELEMENTS],
            4 * ELEMENTS,
        )?],
    )?
    .with_priority(load.class)
    .with_deadline_us(load.deadline_us);
    Ok(req)
}

fn submit(fe: &mut TestFrontend, load: &Load, flight: &mut InFlight) -> Result<bool, LoadError> {
    let id = flight.next_id;
    flight.next_id += 1;
    let value = (id % 1000) as f32;
    let input: Vec<u8> = std::iter::repeat_n(value, ELEMENTS as usize)
        .flat_map(f32::to_le_bytes)
        .collect();
    match fe.submit(0, &request(id, load)?, &[&input], 0) {
        Ok(p) => {
            flight.pending.insert(p.head, (p, value, Instant::now()));
            Ok(true)
        }
        Err(FrontendError::NoDescriptors(_) | FrontendError::NoBuffer(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits at most `timeout` for one completion and records it; false on timeout.
fn complete_one(
    fe: &mut TestFrontend,
    flight: &mut InFlight,
    run: &mut LoadRun,
    start: Instant,
    timeout: Duration,
) -> Result<bool, LoadError> {
    let used = match fe.wait_any(0, timeout) {
        Ok(used) => used,
        Err(FrontendError::Timeout { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let seen = Instant::now();
    let Some((pending, value, submitted)) = flight.pending.remove(&used.id) else {
        return Err(LoadError::Check(format!(
            "used element for chain {} that is not in flight",
            used.id
        )));
    };
    let done = fe.finish(pending, used)?;
    let header = *done.header()?;
    if header.status == Status::Ok {
        let expected: Vec<u8> = std::iter::repeat_n(value, ELEMENTS as usize)
            .flat_map(f32::to_le_bytes)
            .collect();
        if done.outputs.first() != Some(&expected) {
            return Err(LoadError::Check(format!(
                "request {}: output is not its own input",
                header.request_id
            )));
        }
    }
    run.outcomes.push(Outcome {
        status: header.status,
        submitted: submitted.saturating_duration_since(start),
        latency_ns: seen.duration_since(submitted).as_nanos() as u64,
        queue_ns: header.queue_ns,
        compute_ns: header.compute_ns,
    });
    Ok(true)
}

fn drive(
    mut fe: TestFrontend,
    load: &Load,
    start: Instant,
    duration: Duration,
) -> Result<LoadRun, LoadError> {
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let end = start + duration;
    let mut flight = InFlight {
        pending: HashMap::new(),
        next_id: 1,
    };
    let mut run = LoadRun::default();
    match load.pattern {
        Pattern::Closed { depth } => {
            while Instant::now() < end {
                while flight.pending.len() < depth as usize {
                    if !submit(&mut fe, load, &mut flight)? {
                        break;
                    }
                }
                let left = end.saturating_duration_since(Instant::now());
                let before = run.outcomes.len();
                complete_one(&mut fe, &mut flight, &mut run, start, left.min(DRAIN))?;
                // Refused (THROTTLED, QUEUE_FULL, DEADLINE): back off instead of
                // spinning, as a driver would.
                if run.outcomes[before..]
                    .iter()
                    .any(|o| o.status != Status::Ok)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        Pattern::Periodic { interval, offset } => {
            let mut next = start + offset;
            while next < end {
                let now = Instant::now();
                if now >= next {
                    if !submit(&mut fe, load, &mut flight)? {
                        run.skipped += 1;
                    }
                    next += interval;
                    continue;
                }
                complete_one(&mut fe, &mut flight, &mut run, start, next - now)?;
            }
        }
    }
    let drain_end = Instant::now() + DRAIN;
    while !flight.pending.is_empty() {
        let left = drain_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LoadError::Check(format!(
                "{} requests still in flight {} s after the load ended",
                flight.pending.len(),
                DRAIN.as_secs()
            )));
        }
        complete_one(&mut fe, &mut flight, &mut run, start, left)?;
    }
    Ok(run)
}

/// The `p` quantile (0..=1) of `values` by rank; `None` when empty.
pub fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}
