//! `ai-inferd bench`: the scheduler's figures (docs/PERFORMANCE.md), measured side by side in
//! one run against a real daemon.
//!
//! Each phase starts an in-process [`Daemon`] on temporary sockets with the
//! [`SyntheticModel`] (a batch of n costs `a + b·n` of sleep — synthetic, stated in
//! every figure), and drives synthetic tenants through real vhost-user test
//! frontends ([`load`]): the requests cross the same chain walk, intake, scheduler,
//! executors and used rings as a VM's. The phases:
//!
//! - fairness: 3 saturating tenants of weights 1:2:4 on one executor; shares of
//!   accelerator time (scheduler accounting) and Jain's index over the
//!   weight-normalised shares;
//! - isolation: a realtime tenant (one request every 20 ms) alone, then with 3
//!   saturating batch-class tenants, on 2 executors of which 1 is reserved for
//!   interactive/realtime work; and the same flood without the reservation;
//! - deadlines: the isolated p50 of one request, then 4 tenants sending together
//!   3× what batches of one could serve, each request with a deadline of twice that
//!   p50: share of admitted requests that finish in time, and that every late
//!   finish is counted; with how late the host's timer woke a sleeping thread
//!   meanwhile ([`timer_stretch`]), which is what makes a batch that started in
//!   time finish late;
//! - batching: saturated throughput with `max_batch` 8 vs 1, and the p99 latency
//!   of both at the same offered load (70% of the batch-1 capacity);
//! - scheduler overhead: decision time per request ([`ai_infer_scheduler::overhead`]);
//! - memory: a daemon process with 8 tenants vs 1 on one instance of a model
//!   holding 90 MiB of weights ([`memory`]);
//! - overhead: one small request at a time through the vhost-user path vs a direct
//!   call of the same backend, in alternating rounds, with the host's timer noise
//!   ([`paravirt`]);
//! - containment: a well-behaved tenant's p99 alone vs beside a hostile neighbour
//!   flooding malformed chains, filling its queue share, or sending requests that
//!   panic the backend ([`containment`]);
//! - seccomp: one request at a time against two daemon processes alike but for their
//!   seccomp filters, in alternating slices ([`seccomp_cost`]).

pub mod containment;
pub mod memory;
pub mod paravirt;
#[cfg(test)]
mod phase_tests;
pub mod seccomp_cost;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{PriorityClass, Status};
use ai_infer_scheduler::overhead;
use ai_infer_scheduler::{jain_index, ModelSnapshot, ModelStats, Reject, SchedulerStats, TenantId};
use ai_infer_test_frontend::load::{self, percentile, Load, LoadError, LoadRun, Outcome, Pattern};
use ai_infer_test_frontend::FrontendError;
use ai_inferd::backend::synthetic::SyntheticModel;
use ai_inferd::backend::Backend;
use ai_inferd::config::{Config, ConfigError};
use ai_inferd::daemon::{Daemon, DaemonError, Shared};
use ai_inferd::models::ModelsError;
use thiserror::Error;

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The daemon could not start.
    #[error("benchmark daemon: {0}")]
    Daemon(#[from] DaemonError),
    /// The generated configuration is invalid (a bug).
    #[error("benchmark config: {0}")]
    Config(#[from] ConfigError),
    /// A test frontend failed.
    #[error("test frontend: {0}")]
    Frontend(#[from] FrontendError),
    /// A request could not be built.
    #[error("request: {0}")]
    Protocol(#[from] ai_infer_protocol::ProtocolError),
    /// A file, process or thread operation failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// A model of the manifest could not be loaded.
    #[error("model: {0}")]
    Models(#[from] ModelsError),
    /// Something measured is inconsistent (a wrong output, a request lost).
    #[error("{0}")]
    Check(String),
    /// A synthetic tenant failed or saw something inconsistent.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// How long and what to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Length of each measured load.
    pub phase: Duration,
    /// Start of each load not counted (queues filling, estimates settling).
    pub warmup: Duration,
    /// The `ai-inferd` executable for the daemon processes of the memory and seccomp
    /// figures; `None` skips them.
    pub daemon_exe: Option<PathBuf>,
    /// Weights of the memory figure's model, MiB.
    pub weights_mib: u32,
    /// The phases to run (all when empty).
    pub only: Vec<Phase>,
    /// Alternating rounds of the overhead figure.
    pub rounds: u32,
    /// Requests of each kind per overhead round.
    pub requests_per_round: u32,
}

/// One phase of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Weighted fair shares.
    Fairness,
    /// Realtime p99 alone vs flooded.
    Isolation,
    /// Deadline admission under overload.
    Deadlines,
    /// Throughput and p99 with and without batching.
    Batching,
    /// Scheduler decision time.
    Decision,
    /// Daemon memory with 8 tenants vs 1 (needs `daemon_exe`).
    Memory,
    /// The vhost-user path's own cost vs a direct backend call.
    Overhead,
    /// A tenant's p99 alone vs beside a hostile neighbour.
    Containment,
    /// The round trip with the seccomp filters on vs off (needs `daemon_exe`).
    Seccomp,
}

impl Phase {
    /// Every phase, in run order, with its command-line name.
    pub const ALL: [(Phase, &'static str); 9] = [
        (Phase::Fairness, "fairness"),
        (Phase::Isolation, "isolation"),
        (Phase::Deadlines, "deadlines"),
        (Phase::Batching, "batching"),
        (Phase::Decision, "decision"),
        (Phase::Memory, "memory"),
        (Phase::Overhead, "overhead"),
        (Phase::Containment, "containment"),
        (Phase::Seccomp, "seccomp"),
    ];
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                let names: Vec<&str> = Phase::ALL.iter().map(|(_, n)| *n).collect();
                format!("unknown phase {s:?} (one of: {})", names.join(", "))
            })
    }
}

impl Default for BenchOptions {
    /// 6 s loads with 1 s of warm-up, no memory figure, 90 MiB of weights (about
    /// all-MiniLM-L6-v2 in F32), 20 overhead rounds of 200 requests each way.
    fn default() -> Self {
        BenchOptions {
            phase: Duration::from_secs(6),
            warmup: Duration::from_secs(1),
            daemon_exe: None,
            weights_mib: 90,
            only: Vec::new(),
            rounds: 20,
            requests_per_round: 200,
        }
    }
}

/// One line of the results table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The figure.
    pub figure: String,
    /// The target.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether the target is met (`None`: a comparison line without a target).
    pub met: Option<bool>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The results table.
    pub rows: Vec<Row>,
    /// Per-phase details (configuration and raw counts), one line each.
    pub details: Vec<String>,
}

impl Report {
    /// The details, then the table (Markdown).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.details {
            let _ = writeln!(out, "{d}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "| Figure | Target | Measured | Met |");
        let _ = writeln!(out, "|---|---|---|---|");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {met} |",
                r.figure, r.target, r.measured
            );
        }
        out
    }
}

/// One tenant of a benchmark daemon.
#[derive(Clone, Debug)]
pub struct TenantDef {
    name: String,
    weight: u32,
    ceiling: &'static str,
    max_in_flight: u32,
    max_queued_per_model: Option<u32>,
}

impl TenantDef {
    /// Tenant `name` of `weight` with priority ceiling `ceiling` ("batch" … "realtime"),
    /// 64 requests in flight and the default queue share.
    pub fn new(name: &str, weight: u32, ceiling: &'static str) -> Self {
        TenantDef {
            name: name.to_owned(),
            weight,
            ceiling,
            max_in_flight: 64,
            max_queued_per_model: None,
        }
    }

    /// The same with `max_in_flight` and a queue share of `max_queued_per_model`.
    pub fn with_limits(mut self, max_in_flight: u32, max_queued_per_model: u32) -> Self {
        self.max_in_flight = max_in_flight;
        self.max_queued_per_model = Some(max_queued_per_model);
        self
    }
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "ai-inferd-bench-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::SeqCst)
    ))
}

/// A daemon on temporary sockets; shut down and cleaned up when dropped.
pub struct BenchDaemon {
    daemon: Option<Daemon>,
    dir: PathBuf,
}

impl BenchDaemon {
    /// A daemon in a fresh temporary directory.
    pub fn start(
        executors: u32,
        reserved: u32,
        tenants: &[TenantDef],
        models: Vec<Arc<dyn Backend>>,
    ) -> Result<Self, BenchError> {
        Self::start_in(scratch_dir(), executors, reserved, tenants, models)
    }

    /// A daemon with its sockets (`<name>.sock`) in `dir`.
    pub fn start_in(
        dir: PathBuf,
        executors: u32,
        reserved: u32,
        tenants: &[TenantDef],
        models: Vec<Arc<dyn Backend>>,
    ) -> Result<Self, BenchError> {
        std::fs::create_dir_all(&dir).map_err(BenchError::Io)?;
        let mut text = format!(
            "[daemon]\nmodels = \"synthetic\"\nexecutor_threads = {executors}\n\
             reserved_executors = {reserved}\n"
        );
        for t in tenants {
            let _ = write!(
                text,
                "[[tenant]]\nname = \"{}\"\nsocket = \"{}\"\nweight = {}\n\
                 priority_ceiling = \"{}\"\nallowed_models = [\"*\"]\nmax_in_flight = {}\n",
                t.name,
                dir.join(format!("{}.sock", t.name)).display(),
                t.weight,
                t.ceiling,
                t.max_in_flight
            );
            if let Some(n) = t.max_queued_per_model {
                let _ = writeln!(text, "max_queued_per_model = {n}");
            }
        }
        let config = Config::parse(&text)?;
        let daemon = Daemon::start(&config, models)?;
        Ok(BenchDaemon {
            daemon: Some(daemon),
            dir,
        })
    }

    /// The socket of tenant `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// The daemon's shared state (statistics).
    pub fn shared(&self) -> Result<&Arc<Shared>, BenchError> {
        self.daemon
            .as_ref()
            .map(Daemon::shared)
            .ok_or_else(|| BenchError::Check("the daemon stopped".into()))
    }

    fn stats(&self) -> Result<SchedulerStats, BenchError> {
        Ok(self.shared()?.engine.scheduler.stats())
    }

    /// The deadline margin of `model`, every 50 ms for `duration`.
    fn sample_margins(&self, model: u32, duration: Duration) -> Result<Vec<u64>, BenchError> {
        let step = Duration::from_millis(50);
        (0..duration.as_millis() / step.as_millis())
            .map(|_| {
                std::thread::sleep(step);
                Ok(self.model(model)?.deadline_margin_ns)
            })
            .collect()
    }

    fn model(&self, model: u32) -> Result<ModelSnapshot, BenchError> {
        self.stats()?
            .models
            .into_iter()
            .find(|m| m.model == model)
            .ok_or_else(|| BenchError::Check(format!("no model {model}")))
    }

    fn model_stats(&self, model: u32) -> Result<ModelStats, BenchError> {
        Ok(self.model(model)?.stats)
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn synthetic(id: u32, max_batch: usize, fixed_us: u64, per_request_us: u64) -> Arc<dyn Backend> {
    Arc::new(SyntheticModel::new(
        id,
        &format!("synthetic-{id}"),
        max_batch,
        Duration::from_micros(fixed_us),
        Duration::from_micros(per_request_us),
    ))
}

/// Loads compared for latency run in this many alternating turns.
const ROUNDS: u32 = 3;

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

fn closed(socket: PathBuf, model: u32, class: PriorityClass, depth: u32) -> Load {
    Load {
        socket,
        model,
        class,
        pattern: Pattern::Closed { depth },
        deadline_us: 0,
    }
}

/// The isolation phase's realtime tenant: one request every 20 ms, the first at once.
fn realtime(socket: PathBuf, model: u32) -> Load {
    Load {
        socket,
        model,
        class: PriorityClass::Realtime,
        pattern: Pattern::Periodic {
            interval: Duration::from_millis(20),
            offset: Duration::ZERO,
        },
        deadline_us: 0,
    }
}

/// Client-side latencies of OK requests submitted after `from`.
fn ok_latencies(run: &LoadRun, from: Duration) -> Vec<u64> {
    run.ok_after(from).map(|o| o.latency_ns).collect()
}

/// Fairness: 3 saturating tenants of weights 1:2:4 on one executor.
fn fairness(o: &BenchOptions, report: &mut Report) -> Result<(), BenchError> {
    const MODEL: u32 = 10;
    let weights = [1u32, 2, 4];
    let tenants: Vec<TenantDef> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| TenantDef::new(&format!("f{i}"), *w, "normal"))
        .collect();
    let d = BenchDaemon::start(1, 0, &tenants, vec![synthetic(MODEL, 1, 2_000, 500)])?;
    let loads: Vec<Load> = tenants
        .iter()
        .map(|t| closed(d.socket(&t.name), MODEL, PriorityClass::Normal, 16))
        .collect();
    let running = load::spawn(&loads, o.phase)?;
    running.sleep_until(o.warmup);
    let before = d.stats()?;
    running.sleep_until(o.phase);
    let after = d.stats()?;
    let runs = running.join()?;
    let busy: Vec<f64> = (0..weights.len() as u32)
        .map(|i| {
            after
                .busy_ns(TenantId(i))
                .saturating_sub(before.busy_ns(TenantId(i))) as f64
        })
        .collect();
    let total: f64 = busy.iter().sum();
    let weight_total: f64 = weights.iter().map(|w| f64::from(*w)).sum();
    let shares: Vec<f64> = busy.iter().map(|b| b / total.max(1.0)).collect();
    let wanted: Vec<f64> = weights
        .iter()
        .map(|w| f64::from(*w) / weight_total)
        .collect();
    let normalised: Vec<f64> = shares.iter().zip(&wanted).map(|(s, w)| s / w).collect();
    let jain = jain_index(&normalised);
    let within = shares
        .iter()
        .zip(&wanted)
        .all(|(s, w)| (s - w).abs() <= 0.05 * w);
    let done: Vec<usize> = runs.iter().map(|r| r.count(Status::Ok)).collect();
    report.details.push(format!(
        "fairness: synthetic model 2 ms + 0.5 ms/request, max batch 1, 1 executor; tenants of \
         weight 1/2/4 keep 16 requests in flight; {:.0} s measured after {:.0} s; completed {:?}",
        (o.phase - o.warmup).as_secs_f64(),
        o.warmup.as_secs_f64(),
        done
    ));
    let pct = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{:.1}", s * 100.0))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    report.rows.push(Row {
        figure: "Fairness: shares of accelerator time, 3 saturating tenants 1:2:4".into(),
        target: format!("each ±5% of {} %; Jain ≥ 0.99", pct(&wanted)),
        measured: format!("{} %; Jain {jain:.4}", pct(&shares)),
        met: Some(within && jain >= 0.99),
    });
    Ok(())
}

/// The realtime tenant's p99 alone and under 3 batch floods, with `reserved` of 2
/// executors reserved.
fn isolation_run(o: &BenchOptions, reserved: u32) -> Result<(u64, u64, usize), BenchError> {
    const MODEL: u32 = 20;
    let mut tenants = vec![TenantDef::new("rt", 1, "realtime")];
    for i in 0..3 {
        tenants.push(TenantDef::new(&format!("flood{i}"), 1, "batch"));
    }
    // 10 ms alone, 31 ms for a batch of 8.
    let d = BenchDaemon::start(
        2,
        reserved,
        &tenants,
        vec![synthetic(MODEL, 8, 7_000, 3_000)],
    )?;
    let rt = realtime(d.socket("rt"), MODEL);
    let mut loads = vec![rt.clone()];
    for i in 0..3 {
        loads.push(closed(
            d.socket(&format!("flood{i}")),
            MODEL,
            PriorityClass::Batch,
            16,
        ));
    }
    // Alone and flooded take turns, so a noisy neighbour hits both alike.
    let (slice, settle) = (o.phase / ROUNDS, o.warmup / 2);
    let mut alone = Vec::new();
    let mut flooded = Vec::new();
    let mut flood_done = 0;
    for _ in 0..ROUNDS {
        let runs = load::spawn(std::slice::from_ref(&rt), slice)?.join()?;
        alone.extend(ok_latencies(&runs[0], Duration::ZERO));
        let runs = load::spawn(&loads, slice)?.join()?;
        flooded.extend(ok_latencies(&runs[0], settle));
        flood_done += runs[1..].iter().map(|r| r.count(Status::Ok)).sum::<usize>();
    }
    let p99 = |l: &mut Vec<u64>| {
        percentile(l, 0.99).ok_or_else(|| BenchError::Check("no realtime request ran".into()))
    };
    Ok((p99(&mut alone)?, p99(&mut flooded)?, flood_done))
}

/// Isolation: realtime p99 alone vs under 3 batch floods, with and without a
/// reserved executor.
fn isolation(o: &BenchOptions, report: &mut Report) -> Result<(), BenchError> {
    let (alone, flooded, flood_done) = isolation_run(o, 1)?;
    let (alone0, flooded0, flood_done0) = isolation_run(o, 0)?;
    report.details.push(format!(
        "isolation: synthetic model 7 ms + 3 ms/request (10 ms alone, 31 ms for 8), max batch 8, \
         2 executors; realtime tenant: 1 request / 20 ms; 3 batch-class tenants keep 16 in \
         flight; alone and flooded in {ROUNDS} alternating turns of {:.1} s each (flooded: \
         the first {:.1} s of a turn not counted); flood requests completed: {flood_done} \
         (1 reserved), {flood_done0} (none reserved)",
        (o.phase / ROUNDS).as_secs_f64(),
        (o.warmup / 2).as_secs_f64()
    ));
    let ratio = flooded as f64 / alone as f64;
    report.rows.push(Row {
        figure: "Isolation: realtime p99 alone vs 3 batch floods, 1 of 2 executors reserved".into(),
        target: "≤ 1.5×".into(),
        measured: format!("{} vs {} ({ratio:.2}×)", ms(alone), ms(flooded)),
        met: Some(ratio <= 1.5),
    });
    let ratio0 = flooded0 as f64 / alone0 as f64;
    report.rows.push(Row {
        figure: "  the same without a reserved executor".into(),
        target: "(comparison)".into(),
        measured: format!("{} vs {} ({ratio0:.2}×)", ms(alone0), ms(flooded0)),
        met: None,
    });
    Ok(())
}

/// How long each of `n` sleeps of `nominal` took, ns.
pub fn sleep_samples(nominal: Duration, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            std::thread::sleep(nominal);
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

fn diff(after: u64, before: u64) -> u64 {
    after.wrapping_sub(before)
}

/// How long `n` sleeps of `nominal` take on this host now: (p50, p99, max), ns.
///
/// A synthetic batch is a sleep, and on a shared VM a thread is sometimes woken
/// milliseconds late (steal time, other runnable threads); such a wake-up makes a
/// batch that started in time finish late, which no estimate can foresee.
pub fn timer_stretch(nominal: Duration, n: usize) -> (u64, u64, u64) {
    let mut took = sleep_samples(nominal, n.max(1));
    let mut at = |p| percentile(&mut took, p).unwrap_or(0);
    (at(0.5), at(0.99), at(1.0))
}

/// Deadlines at twice the isolated p50, under overload.
fn deadlines(o: &BenchOptions, report: &mut Report) -> Result<(), BenchError> {
    const MODEL: u32 = 30;
    let tenants: Vec<TenantDef> = (0..4)
        .map(|i| TenantDef::new(&format!("d{i}"), 1, "normal"))
        .collect();
    let d = BenchDaemon::start(1, 0, &tenants, vec![synthetic(MODEL, 8, 4_000, 1_000)])?;
    let isolated_load = closed(d.socket("d0"), MODEL, PriorityClass::Normal, 1);
    let short = o.warmup * 2;
    let isolated = load::spawn(std::slice::from_ref(&isolated_load), short)?.join()?;
    let alone: Vec<&Outcome> = isolated[0].ok_after(o.warmup / 2).collect();
    let mut device: Vec<u64> = alone.iter().map(|x| x.device_ns()).collect();
    let p50 = percentile(&mut device, 0.5)
        .ok_or_else(|| BenchError::Check("no isolated request ran".into()))?;
    let deadline_ns = 2 * p50;
    let deadline_us = deadline_ns.div_ceil(1000);
    // Open loop at 3× what batches of one could serve: an overload that arrives
    // whatever the answers, without a retry storm of refused requests.
    let offered = 3e9 / p50 as f64;
    let interval = Duration::from_secs_f64(tenants.len() as f64 / offered);
    let loads: Vec<Load> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| Load {
            socket: d.socket(&t.name),
            model: MODEL,
            class: PriorityClass::Normal,
            pattern: Pattern::Periodic {
                interval,
                offset: interval * i as u32 / tenants.len() as u32,
            },
            deadline_us,
        })
        .collect();
    let before = d.model_stats(MODEL)?;
    // A thread that only sleeps, beside the load: the wake-ups the executor got.
    let nominal = Duration::from_millis(5);
    let sleeps = (o.phase.as_nanos() / nominal.as_nanos()) as usize;
    let probe = std::thread::spawn(move || timer_stretch(nominal, sleeps));
    let running = load::spawn(&loads, o.phase)?;
    let mut margins = d.sample_margins(MODEL, o.phase)?;
    let runs = running.join()?;
    let margin_p50 = percentile(&mut margins, 0.5).unwrap_or(0);
    let margin_max = percentile(&mut margins, 1.0).unwrap_or(0);
    let (sleep_p50, sleep_p99, sleep_max) = probe
        .join()
        .map_err(|_| BenchError::Check("the timer probe thread panicked".into()))?;
    let after = d.model_stats(MODEL)?;
    let admitted = diff(after.admitted, before.admitted);
    let ran = diff(after.completed, before.completed);
    let missed = diff(after.deadline_missed, before.deadline_missed);
    let dl = Reject::Deadline.index();
    let dropped = diff(after.dropped[dl], before.dropped[dl]);
    let refused = diff(after.rejected[dl], before.rejected[dl]);
    let met = ran.saturating_sub(missed);
    let ok: usize = runs.iter().map(|r| r.count(Status::Ok)).sum();
    let late: Vec<&Outcome> = runs
        .iter()
        .flat_map(|r| r.outcomes.iter())
        .filter(|x| x.status == Status::Ok && x.device_ns() > deadline_ns)
        .collect();
    let late_seen = late.len() as u64;
    // Why they were late: their batch computed longer than a batch of one takes
    // alone (the synthetic model sleeps, so a late wake-up is what stretches it), or
    // they waited in the queue.
    let mut alone_compute: Vec<u64> = alone.iter().map(|x| x.compute_ns).collect();
    let alone_p50 = percentile(&mut alone_compute, 0.5).unwrap_or(0);
    let mut late_compute: Vec<u64> = late.iter().map(|x| x.compute_ns).collect();
    let late_compute_p50 = percentile(&mut late_compute, 0.5).unwrap_or(0);
    let late_compute_max = percentile(&mut late_compute, 1.0).unwrap_or(0);
    let met_share = met as f64 / admitted.max(1) as f64;
    report.details.push(format!(
        "deadlines: synthetic model 4 ms + 1 ms/request, max batch 8, 1 executor; isolated p50 \
         {} (device side), deadline {}; 4 tenants send {offered:.0} requests/s together (3× \
         the batch-1 capacity) for {:.0} s: {} submitted, \
         {refused} refused at submission (DEADLINE), {admitted} admitted, {ran} ran ({ok} OK), \
         {met} finished in time, {missed} finished late and counted, {dropped} dropped from \
         the queue before starting; the guests saw {late_seen} OK responses past the deadline, \
         whose batches computed for {} (p50) and up to {}, against {} (p50) for one request \
         alone; admission's overrun margin {} (p50 of 20 samples/s), up to {}",
        ms(p50),
        ms(deadline_ns),
        o.phase.as_secs_f64(),
        diff(after.requests, before.requests),
        ms(late_compute_p50),
        ms(late_compute_max),
        ms(alone_p50),
        ms(margin_p50),
        ms(margin_max),
    ));
    report.rows.push(Row {
        figure: format!(
            "Deadlines at 2× isolated p50 ({}) under overload",
            ms(deadline_ns)
        ),
        target: "≥ 99% of admitted meet it; none late unreported".into(),
        measured: format!(
            "{:.2}% of {admitted} admitted met it ({dropped} dropped before starting, {missed} \
             late); late seen {late_seen} ≤ counted {missed}",
            met_share * 100.0
        ),
        met: Some(met_share >= 0.99 && late_seen <= missed),
    });
    report.rows.push(Row {
        figure: "— host timer meanwhile: 5 ms sleeps took".into(),
        target: String::new(),
        measured: format!(
            "p50 {}, p99 {}, max {}",
            ms(sleep_p50),
            ms(sleep_p99),
            ms(sleep_max)
        ),
        met: None,
    });
    Ok(())
}

/// Batching: saturated throughput and p99 at the same offered load, max batch 8 vs 1.
fn batching(o: &BenchOptions, report: &mut Report) -> Result<(), BenchError> {
    const B1: u32 = 40;
    const B8: u32 = 41;
    let (fixed_us, per_us) = (5_000u64, 1_000u64);
    let tenants: Vec<TenantDef> = (0..4)
        .map(|i| TenantDef::new(&format!("b{i}"), 1, "normal"))
        .collect();
    let d = BenchDaemon::start(
        1,
        0,
        &tenants,
        vec![
            synthetic(B1, 1, fixed_us, per_us),
            synthetic(B8, 8, fixed_us, per_us),
        ],
    )?;
    let measured_s = (o.phase - o.warmup).as_secs_f64();
    let mut throughput = Vec::new();
    for model in [B1, B8] {
        let loads: Vec<Load> = tenants
            .iter()
            .map(|t| closed(d.socket(&t.name), model, PriorityClass::Normal, 16))
            .collect();
        let running = load::spawn(&loads, o.phase)?;
        running.sleep_until(o.warmup);
        let before = d.model_stats(model)?;
        running.sleep_until(o.phase);
        let after = d.model_stats(model)?;
        running.join()?;
        throughput.push(diff(after.completed, before.completed) as f64 / measured_s);
    }
    // 70% of what batch 1 can do, spread evenly over the 4 tenants.
    let capacity = 1e6 / (fixed_us + per_us) as f64;
    let offered = 0.7 * capacity;
    let interval = Duration::from_secs_f64(tenants.len() as f64 / offered);
    let mut latencies = [Vec::new(), Vec::new()];
    let (mut batches, mut sizes) = (0, 0);
    // Batch 1 and batch 8 take turns, so a noisy neighbour hits both alike.
    for _ in 0..ROUNDS {
        for (k, model) in [B1, B8].into_iter().enumerate() {
            let loads: Vec<Load> = tenants
                .iter()
                .enumerate()
                .map(|(i, t)| Load {
                    socket: d.socket(&t.name),
                    model,
                    class: PriorityClass::Normal,
                    pattern: Pattern::Periodic {
                        interval,
                        offset: interval * i as u32 / tenants.len() as u32,
                    },
                    deadline_us: 0,
                })
                .collect();
            let before = d.model_stats(model)?;
            let runs = load::spawn(&loads, o.phase / ROUNDS)?.join()?;
            let after = d.model_stats(model)?;
            if model == B8 {
                batches += diff(after.batch_sizes.count, before.batch_sizes.count);
                sizes += diff(after.batch_sizes.sum, before.batch_sizes.sum);
            }
            latencies[k].extend(runs.iter().flat_map(|r| ok_latencies(r, Duration::ZERO)));
        }
    }
    let batch_mean = sizes as f64 / batches.max(1) as f64;
    let mut p99 = Vec::new();
    for l in &mut latencies {
        p99.push(
            percentile(l, 0.99)
                .ok_or_else(|| BenchError::Check("no request ran at the offered load".into()))?,
        );
    }
    report.details.push(format!(
        "batching: synthetic model {} ms + {} ms/request (ideal: {:.0}/s at batch 1, {:.0}/s at \
         batch 8), 1 executor, no batching delay; saturated: 4 tenants keep 16 in flight; \
         offered load: {offered:.0} requests/s from 4 tenants (one every {:.1} ms each), \
         batch 1 and 8 in {ROUNDS} alternating turns; mean batch at that load {batch_mean:.2}",
        fixed_us / 1000,
        per_us / 1000,
        capacity,
        8e6 / (fixed_us + 8 * per_us) as f64,
        interval.as_secs_f64() * 1e3
    ));
    let gain = throughput[1] / throughput[0];
    report.rows.push(Row {
        figure: "Batching: saturated throughput, max batch 8 vs 1 (synthetic a + b·n)".into(),
        target: "≥ 3×".into(),
        measured: format!(
            "{:.0}/s vs {:.0}/s ({gain:.2}×)",
            throughput[1], throughput[0]
        ),
        met: Some(gain >= 3.0),
    });
    let ratio = p99[1] as f64 / p99[0] as f64;
    report.rows.push(Row {
        figure: format!("Batching: p99 at {offered:.0} requests/s, max batch 8 vs 1"),
        target: "≤ 2×".into(),
        measured: format!("{} vs {} ({ratio:.2}×)", ms(p99[1]), ms(p99[0])),
        met: Some(ratio <= 2.0),
    });
    Ok(())
}

/// Scheduler decision time per request (the cargo bench's cases, worst one).
fn decision_time(report: &mut Report) -> Result<(), BenchError> {
    let mut worst: Option<(f64, &str)> = None;
    for case in &overhead::CASES {
        let ns = overhead::best_of(case, 3, 50_000)
            .ok_or_else(|| BenchError::Check(format!("overhead case {} failed", case.name)))?;
        if worst.is_none_or(|(w, _)| ns > w) {
            worst = Some((ns, case.name));
        }
    }
    let Some((ns, name)) = worst else {
        return Ok(());
    };
    report.rows.push(Row {
        figure: format!(
            "Scheduler decision time per request, {} tenants",
            overhead::TENANTS
        ),
        target: "≤ 2 µs".into(),
        measured: format!("{:.2} µs (worst case: {name})", ns / 1000.0),
        met: Some(ns <= 2000.0),
    });
    Ok(())
}

/// Memory: a daemon process with 8 tenants vs 1 on one model instance.
fn memory_figure(o: &BenchOptions, exe: &Path, report: &mut Report) -> Result<(), BenchError> {
    let duration = o.warmup.max(Duration::from_secs(1));
    let one = memory::measure(exe, scratch_dir(), 1, o.weights_mib, duration)?;
    let eight = memory::measure(exe, scratch_dir(), 8, o.weights_mib, duration)?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    report.details.push(format!(
        "memory: daemon process, one synthetic model holding {} MiB of weights; with 1 tenant: \
         VmRSS {:.1} MiB (anon {:.1}, file {:.1}, guest pages {:.1}); with 8: VmRSS {:.1} MiB \
         (anon {:.1}, file {:.1}, guest pages {:.1})",
        o.weights_mib,
        mib(one.total_kib),
        mib(one.anon_kib),
        mib(one.file_kib),
        mib(one.shmem_kib),
        mib(eight.total_kib),
        mib(eight.anon_kib),
        mib(eight.file_kib),
        mib(eight.shmem_kib)
    ));
    let ratio = eight.own_kib() as f64 / one.own_kib().max(1) as f64;
    report.rows.push(Row {
        figure: "Sharing: daemon memory (anon + file), 8 tenants vs 1, one model instance".into(),
        target: "≤ 1.1× (a copy per VM: 8×)".into(),
        measured: format!(
            "{:.1} vs {:.1} MiB ({ratio:.3}×); a copy per VM: 8 × {:.1} = {:.1} MiB",
            mib(eight.own_kib()),
            mib(one.own_kib()),
            mib(one.own_kib()),
            8.0 * mib(one.own_kib())
        ),
        met: Some(ratio <= 1.1),
    });
    Ok(())
}

/// Busy and total jiffies of all CPUs, from the first line of `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Runs every phase and returns the report.
pub fn run(o: &BenchOptions) -> Result<Report, BenchError> {
    let mut report = Report::default();
    let start = cpu_jiffies();
    let wanted = |p: Phase| o.only.is_empty() || o.only.contains(&p);
    if wanted(Phase::Fairness) {
        fairness(o, &mut report)?;
    }
    if wanted(Phase::Isolation) {
        isolation(o, &mut report)?;
    }
    if wanted(Phase::Deadlines) {
        deadlines(o, &mut report)?;
    }
    if wanted(Phase::Batching) {
        batching(o, &mut report)?;
    }
    if wanted(Phase::Decision) {
        decision_time(&mut report)?;
    }
    if let (true, Some(exe)) = (wanted(Phase::Memory), &o.daemon_exe) {
        memory_figure(o, exe, &mut report)?;
    }
    if wanted(Phase::Overhead) {
        paravirt::measure(o)?.report(&mut report);
    }
    if wanted(Phase::Containment) {
        containment::measure(o)?.report(&mut report);
    }
    if let (true, Some(exe)) = (wanted(Phase::Seccomp), &o.daemon_exe) {
        seccomp_cost::measure(o, exe)?.report(&mut report);
    }
    if let (Some((b0, t0)), Some((b1, t1))) = (start, cpu_jiffies()) {
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        report.details.push(format!(
            "host: {} CPUs, {:.0}% busy during the run (this benchmark and everything \
             else on the machine)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            busy * 100.0
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_by_name_and_unknown_ones_list_the_choices() {
        for (phase, name) in Phase::ALL {
            assert_eq!(name.parse::<Phase>(), Ok(phase));
        }
        let err = "deadline".parse::<Phase>().unwrap_err();
        assert!(
            err.contains("\"deadline\"") && err.contains("deadlines, batching"),
            "{err}"
        );
    }

    #[test]
    fn timer_stretch_orders_its_figures_and_never_reports_less_than_asked() {
        let (p50, p99, max) = timer_stretch(Duration::from_micros(200), 20);
        assert!(p50 >= 200_000, "{p50}");
        assert!(p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
    }
}
