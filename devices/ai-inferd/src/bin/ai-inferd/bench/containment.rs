//! Isolation under attack: a well-behaved tenant's p99 latency alone vs beside a
//! hostile neighbour, for three attacks on one daemon, each in turns with the tenant
//! alone so the host's noise hits both:
//!
//! - flood: the neighbour keeps malformed chains (garbage headers) and looping
//!   chains (a descriptor cycle) outstanding and resubmits each as soon as the device
//!   returns it;
//! - queue filling: the neighbour keeps its `max_in_flight` of valid requests queued
//!   on the same model, within a bounded queue share (`max_queued_per_model`);
//! - panicking input: the neighbour sends requests whose input makes the model panic
//!   ([`PANIC_INPUT`]); the executor catches the panic and runs the batch's members
//!   again one by one.
//!
//! The well-behaved tenant sends like the isolation phase's realtime tenant: one
//! request every 20 ms to a synthetic model of a few ms, on 2 executors of which 1 is
//! reserved for interactive and realtime work (the daemon's isolation setup).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ai_infer_protocol::{DType, PriorityClass, Request, Status, TensorDesc};
use ai_infer_test_frontend::load::{self, percentile, Load, LoadRun};
use ai_infer_test_frontend::{FrontendError, FrontendOptions, RawDesc, TestFrontend};
use ai_inferd::backend::synthetic::{SyntheticModel, PANIC_INPUT};
use ai_inferd::executor::FAULTS;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::{
    closed, ms, ok_latencies, realtime, BenchDaemon, BenchError, BenchOptions, Report, Row,
};
use super::{TenantDef, ROUNDS};

const MODEL: u32 = 60;
/// The model's cost: a batch of n sleeps `FIXED_US + PER_REQUEST_US · n`.
const FIXED_US: u64 = 3_000;
const PER_REQUEST_US: u64 = 1_000;
const MAX_BATCH: usize = 8;
/// The queue-filling neighbour's `max_in_flight` and queue share.
const FILL_SHARE: u32 = 64;
/// Looping + malformed chain pairs the flooding neighbour keeps outstanding.
const FLOOD_PAIRS: usize = 32;
/// Panicking requests the third neighbour keeps in flight.
const PANIC_DEPTH: u32 = 4;

/// One of the neighbour's attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Malformed and looping chains.
    Flood,
    /// Its whole in-flight bound of valid requests queued on the same model.
    QueueFill,
    /// Requests that make the backend panic.
    Panic,
}

impl Attack {
    /// Every attack, in run order.
    pub const ALL: [Attack; 3] = [Attack::Flood, Attack::QueueFill, Attack::Panic];

    /// The neighbour's tenant name.
    fn tenant(self) -> &'static str {
        match self {
            Attack::Flood => "flood",
            Attack::QueueFill => "fill",
            Attack::Panic => "panic",
        }
    }

    /// What the neighbour does, for the report.
    pub fn describe(self) -> String {
        match self {
            Attack::Flood => "flooding malformed and looping chains".into(),
            Attack::QueueFill => {
                format!("keeping {FILL_SHARE} valid requests queued (its share)")
            }
            Attack::Panic => "sending requests that panic the backend".into(),
        }
    }
}

/// What one attack's turns measured.
#[derive(Clone, Debug)]
pub struct AttackRun {
    /// The attack.
    pub attack: Attack,
    /// The well-behaved tenant's OK latencies alone, ns.
    pub alone_ns: Vec<u64>,
    /// Its OK latencies beside the neighbour, ns.
    pub attacked_ns: Vec<u64>,
    /// Its requests that did not come back OK (alone or attacked).
    pub failed: usize,
    /// What the neighbour got done: chains returned (flood), requests completed OK
    /// (queue filling) or answered BACKEND_ERROR (panic).
    pub neighbour_done: u64,
    /// The neighbour's requests refused or failed otherwise.
    pub neighbour_other: u64,
    /// Panics the executors contained meanwhile.
    pub panics: u64,
}

/// p99 alone, p99 attacked and their ratio; `None` if either side has no sample.
pub fn p99_ratio(alone: &mut [u64], attacked: &mut [u64]) -> Option<(u64, u64, f64)> {
    let a = percentile(alone, 0.99)?;
    let b = percentile(attacked, 0.99)?;
    Some((a, b, b as f64 / a.max(1) as f64))
}

impl AttackRun {
    /// The row of this attack: p99 alone vs attacked, target ≤ 1.5× and no failure.
    pub fn row(&self) -> Row {
        let figure = format!(
            "Containment: well-behaved p99 alone vs beside a neighbour {}",
            self.attack.describe()
        );
        let target = "≤ 1.5×, none of its requests fails".to_owned();
        match p99_ratio(&mut self.alone_ns.clone(), &mut self.attacked_ns.clone()) {
            Some((alone, attacked, ratio)) => Row {
                figure,
                target,
                measured: format!(
                    "{} vs {} ({ratio:.2}×); {} failed",
                    ms(alone),
                    ms(attacked),
                    self.failed
                ),
                met: Some(ratio <= 1.5 && self.failed == 0),
            },
            None => Row {
                figure,
                target,
                measured: format!("no request completed; {} failed", self.failed),
                met: Some(false),
            },
        }
    }

    /// One detail line of the neighbour's activity over `seconds` of attack.
    pub fn activity(&self, seconds: f64) -> String {
        let rate = self.neighbour_done as f64 / seconds.max(1e-3);
        match self.attack {
            Attack::Flood => format!(
                "flood: {} bad chains returned by the device ({rate:.0}/s)",
                self.neighbour_done
            ),
            Attack::QueueFill => format!(
                "queue filling: {} requests OK ({rate:.0}/s), {} refused",
                self.neighbour_done, self.neighbour_other
            ),
            Attack::Panic => format!(
                "panicking input: {} requests answered BACKEND_ERROR ({rate:.0}/s), {} \
                 otherwise, {} panics contained",
                self.neighbour_done, self.neighbour_other, self.panics
            ),
        }
    }
}

/// Everything the containment figure measured.
#[derive(Clone, Debug)]
pub struct Containment {
    /// One per attack, in [`Attack::ALL`] order.
    pub runs: Vec<AttackRun>,
    /// Length of each turn.
    pub turn: Duration,
    /// Start of an attacked turn not counted.
    pub settle: Duration,
}

impl Containment {
    /// Adds the figure's details and rows to `report`.
    pub fn report(&self, report: &mut Report) {
        let attacked_s = (self.turn.saturating_sub(self.settle)).as_secs_f64() * f64::from(ROUNDS);
        let activity: Vec<String> = self
            .runs
            .iter()
            .map(|r| r.activity(self.turn.as_secs_f64() * f64::from(ROUNDS)))
            .collect();
        report.details.push(format!(
            "containment: synthetic model {} ms + {} ms/request ({} ms alone), max batch \
             {MAX_BATCH}, armed with its fault inputs; 2 executors, 1 reserved for \
             interactive/realtime work; well-behaved tenant: ceiling realtime, 1 request / 20 \
             ms; neighbours of ceiling normal; per attack {ROUNDS} turns alone and {ROUNDS} \
             beside the neighbour, alternating, {:.1} s each (attacked: the first {:.1} s not \
             counted, {attacked_s:.1} s counted); {}",
            FIXED_US / 1000,
            PER_REQUEST_US / 1000,
            (FIXED_US + PER_REQUEST_US) / 1000,
            self.turn.as_secs_f64(),
            self.settle.as_secs_f64(),
            activity.join("; ")
        ));
        report.rows.extend(self.runs.iter().map(AttackRun::row));
    }
}

/// Keeps [`FLOOD_PAIRS`] looping chains and as many garbage requests outstanding on
/// `fe`'s queue 0, resubmitting each as soon as it comes back, until `stop`; the
/// chains the device returned.
fn flood(mut fe: TestFrontend, stop: &AtomicBool) -> Result<u64, BenchError> {
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    let data = fe.alloc(4096)?;
    fe.write(data, &[0x5a; 4096])?;
    let slots = fe.alloc_descriptors(0, 4 * FLOOD_PAIRS)?;
    let mut heads = Vec::new();
    for s in slots.chunks_exact(4) {
        let desc = |addr, len, flags, next| RawDesc {
            addr,
            len,
            flags,
            next,
        };
        // A cycle of two descriptors.
        fe.write_descriptor(0, s[0], desc(data, 40, R | N, s[1]))?;
        fe.write_descriptor(0, s[1], desc(data + 64, 48, W | N, s[0]))?;
        // A header of garbage with room for the response.
        fe.write_descriptor(0, s[2], desc(data + 128, 64, R | N, s[3]))?;
        fe.write_descriptor(0, s[3], desc(data + 1024, 256, W, 0))?;
        heads.extend([s[0], s[2]]);
    }
    for head in &heads {
        fe.publish(0, *head)?;
    }
    let mut returned = 0;
    while !stop.load(Ordering::Relaxed) {
        let used = match fe.wait_any(0, Duration::from_millis(50)) {
            Ok(used) => used,
            Err(FrontendError::Timeout { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        returned += 1;
        fe.publish(0, used.id)?;
    }
    Ok(returned)
}

/// Keeps [`PANIC_DEPTH`] requests whose input is [`PANIC_INPUT`] in flight on `fe`
/// until `stop`; (answered BACKEND_ERROR, answered otherwise).
fn panics(mut fe: TestFrontend, stop: &AtomicBool) -> Result<(u64, u64), BenchError> {
    let input: Vec<u8> = [PANIC_INPUT; 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut next_id = 0u64;
    let mut submit = |fe: &mut TestFrontend| -> Result<_, BenchError> {
        next_id += 1;
        let req = Request::infer(
            next_id,
            MODEL,
            vec![TensorDesc::input(DType::F32, &[1, 4])?],
            vec![TensorDesc::output(DType::F32, &[1, 4], 16)?],
        )?;
        Ok(fe.submit(0, &req, &[&input], 0)?)
    };
    let mut pending = std::collections::HashMap::new();
    for _ in 0..PANIC_DEPTH {
        let p = submit(&mut fe)?;
        pending.insert(p.head, p);
    }
    let (mut errors, mut other) = (0, 0);
    loop {
        let used = match fe.wait_any(0, Duration::from_millis(50)) {
            Ok(used) => used,
            Err(FrontendError::Timeout { .. }) if pending.is_empty() => break,
            Err(FrontendError::Timeout { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(p) = pending.remove(&used.id) else {
            return Err(BenchError::Check(format!(
                "containment: used element for chain {} that is not in flight",
                used.id
            )));
        };
        match fe.finish(p, used)?.header()?.status {
            Status::BackendError => errors += 1,
            _ => other += 1,
        }
        if !stop.load(Ordering::Relaxed) {
            let p = submit(&mut fe)?;
            pending.insert(p.head, p);
        } else if pending.is_empty() {
            break;
        }
    }
    Ok((errors, other))
}

/// An attacker thread: its result when joined.
type Attacker = JoinHandle<Result<(u64, u64), BenchError>>;

fn start_attacker(
    d: &BenchDaemon,
    attack: Attack,
    stop: &Arc<AtomicBool>,
) -> Result<Option<Attacker>, BenchError> {
    let options = FrontendOptions {
        regions: vec![(0x4000_0000, 4 << 20)],
        ..FrontendOptions::default()
    };
    let stop = stop.clone();
    let thread = std::thread::Builder::new().name("bench-attacker".into());
    let handle = match attack {
        Attack::Flood => {
            let fe = TestFrontend::connect(&d.socket(attack.tenant()), options)?;
            thread.spawn(move || flood(fe, &stop).map(|n| (n, 0)))
        }
        Attack::Panic => {
            let fe = TestFrontend::connect(&d.socket(attack.tenant()), options)?;
            thread.spawn(move || panics(fe, &stop))
        }
        // A load of the bench's own driver, started with the victim's.
        Attack::QueueFill => return Ok(None),
    };
    handle.map(Some).map_err(BenchError::Io)
}

fn failed(run: &LoadRun) -> usize {
    run.outcomes.len() - run.count(Status::Ok)
}

/// One attack's alternating turns.
fn attack_turns(
    d: &BenchDaemon,
    attack: Attack,
    victim: &Load,
    turn: Duration,
    settle: Duration,
) -> Result<AttackRun, BenchError> {
    let mut run = AttackRun {
        attack,
        alone_ns: Vec::new(),
        attacked_ns: Vec::new(),
        failed: 0,
        neighbour_done: 0,
        neighbour_other: 0,
        panics: 0,
    };
    let filler = closed(
        d.socket(attack.tenant()),
        MODEL,
        PriorityClass::Normal,
        FILL_SHARE,
    );
    for _ in 0..ROUNDS {
        let alone = load::spawn(std::slice::from_ref(victim), turn)?.join()?;
        run.alone_ns.extend(ok_latencies(&alone[0], Duration::ZERO));
        run.failed += failed(&alone[0]);

        let panics_before = FAULTS.panics.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = start_attacker(d, attack, &stop)?;
        let loads = match attack {
            Attack::QueueFill => vec![victim.clone(), filler.clone()],
            _ => vec![victim.clone()],
        };
        let runs = load::spawn(&loads, turn)?.join();
        stop.store(true, Ordering::Relaxed);
        let neighbour = attacker
            .map(|t| {
                t.join()
                    .map_err(|_| BenchError::Check("an attacker thread panicked".into()))?
            })
            .transpose()?;
        let runs = runs?;
        run.panics += FAULTS
            .panics
            .load(Ordering::Relaxed)
            .wrapping_sub(panics_before);
        run.attacked_ns.extend(ok_latencies(&runs[0], settle));
        run.failed += failed(&runs[0]);
        let (done, other) = match (neighbour, runs.get(1)) {
            (Some(n), _) => n,
            (None, Some(fill)) => (fill.count(Status::Ok) as u64, failed(fill) as u64),
            (None, None) => (0, 0),
        };
        run.neighbour_done += done;
        run.neighbour_other += other;
    }
    Ok(run)
}

/// Runs the containment figure: every attack in turn, each in [`ROUNDS`] turns of
/// `o.phase / ROUNDS` alone and as many attacked.
pub fn measure(o: &BenchOptions) -> Result<Containment, BenchError> {
    let tenants = [
        TenantDef::new("victim", 1, "realtime"),
        TenantDef::new(Attack::Flood.tenant(), 1, "normal"),
        TenantDef::new(Attack::QueueFill.tenant(), 1, "normal").with_limits(FILL_SHARE, FILL_SHARE),
        TenantDef::new(Attack::Panic.tenant(), 1, "normal"),
    ];
    let model = SyntheticModel::new(
        MODEL,
        "synthetic-60",
        MAX_BATCH,
        Duration::from_micros(FIXED_US),
        Duration::from_micros(PER_REQUEST_US),
    )
    .with_faults();
    let d = BenchDaemon::start(2, 1, &tenants, vec![Arc::new(model)])?;
    let victim = realtime(d.socket("victim"), MODEL);
    let (turn, settle) = (o.phase / ROUNDS, o.warmup / 2);
    let runs = Attack::ALL
        .iter()
        .map(|a| attack_turns(&d, *a, &victim, turn, settle))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Containment { runs, turn, settle })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(attack: Attack, alone: Vec<u64>, attacked: Vec<u64>, failed: usize) -> AttackRun {
        AttackRun {
            attack,
            alone_ns: alone,
            attacked_ns: attacked,
            failed,
            neighbour_done: 300,
            neighbour_other: 2,
            panics: 600,
        }
    }

    #[test]
    fn the_ratio_is_attacked_over_alone_at_the_99th_percentile() {
        let mut alone: Vec<u64> = (1..=100).map(|i| i * 100_000).collect();
        let mut attacked: Vec<u64> = (1..=100).map(|i| i * 150_000).collect();
        let (a, b, ratio) = p99_ratio(&mut alone, &mut attacked).unwrap();
        assert_eq!((a, b), (9_900_000, 14_850_000));
        assert!((ratio - 1.5).abs() < 1e-9, "{ratio}");
        assert_eq!(p99_ratio(&mut [], &mut attacked), None);
        assert_eq!(p99_ratio(&mut alone, &mut []), None);
    }

    #[test]
    fn a_row_is_met_only_within_1_5x_and_without_failures() {
        let alone = vec![4_000_000; 100];
        let row = run(Attack::Flood, alone.clone(), vec![5_000_000; 100], 0).row();
        assert_eq!(row.measured, "4.0 ms vs 5.0 ms (1.25×); 0 failed");
        assert_eq!(row.met, Some(true));
        assert!(
            row.figure.contains("malformed and looping"),
            "{}",
            row.figure
        );
        let row = run(Attack::Panic, alone.clone(), vec![5_000_000; 100], 1).row();
        assert_eq!(row.met, Some(false));
        let row = run(Attack::QueueFill, alone.clone(), vec![6_400_000; 100], 0).row();
        assert_eq!(row.measured, "4.0 ms vs 6.4 ms (1.60×); 0 failed");
        assert_eq!(row.met, Some(false));
        let row = run(Attack::QueueFill, alone, Vec::new(), 3).row();
        assert_eq!(row.measured, "no request completed; 3 failed");
        assert_eq!(row.met, Some(false));
    }

    #[test]
    fn the_details_name_each_neighbours_activity() {
        let c = Containment {
            runs: Attack::ALL
                .iter()
                .map(|a| run(*a, vec![1], vec![1], 0))
                .collect(),
            turn: Duration::from_secs(2),
            settle: Duration::from_millis(500),
        };
        let mut report = Report::default();
        c.report(&mut report);
        assert_eq!(report.rows.len(), 3);
        let details = &report.details[0];
        for part in [
            "3 ms + 1 ms/request (4 ms alone)",
            "4.5 s counted",
            "flood: 300 bad chains returned by the device (50/s)",
            "queue filling: 300 requests OK (50/s), 2 refused",
            "600 panics contained",
        ] {
            assert!(details.contains(part), "{part}: {details}");
        }
    }
}
