//! The paravirtual path's own cost on the host, without a VM.
//!
//! One small request at a time goes (a) through the vhost-user path: a test frontend
//! lays the chain out in its memfd "guest memory", makes it available and kicks; the
//! daemon's device thread walks and checks it, the scheduler admits and dispatches it,
//! an executor runs the backend on guest memory in place and publishes the used
//! element; the frontend wakes on the call eventfd and reads the response. And (b)
//! through a direct call of the same backend with the same input on host buffers
//! ([`run_local`]: the same signature check, the same [`Backend::run`]). The two take
//! turns in rounds, so a noisy neighbour hits both alike, and between them the host's
//! timer is sampled: how late a 100 µs sleep wakes, which is what every wake-up on the
//! path can cost.
//!
//! The model is the `mlp` of `configs/models.toml` when it is installed (where
//! `models/setup.sh` puts it, or `$AIVMM_MODELS_DIR`); else the synthetic model with
//! no cost at all, which the report then says.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{DType, Request, Status, TensorDesc};
use ai_infer_test_frontend::load::percentile;
use ai_infer_test_frontend::{FrontendOptions, TestFrontend};
use ai_inferd::backend::local::{run_local, LocalRequest};
use ai_inferd::backend::synthetic::SyntheticModel;
use ai_inferd::backend::Backend;
use ai_inferd::models::{load_backend, Manifest, ModelsError};

use super::{sleep_samples, BenchDaemon, BenchError, BenchOptions, Report};
use super::{Row, TenantDef};

/// Id of the synthetic stand-in when the MLP is not installed.
const SYNTHETIC_ID: u32 = 70;

/// Rows of the request: F32 `[1, 16]` in (the MLP's input width).
const WIDTH: u64 = 16;

/// The host timer probe's sleep.
const PROBE_SLEEP: Duration = Duration::from_micros(100);

/// Requests of each kind run before the first round, not counted.
const WARMUP_REQUESTS: u32 = 50;

/// The model measured, and its request.
struct Subject {
    backend: Arc<dyn Backend>,
    /// What the report says about it.
    what: String,
    input: TensorDesc,
    output: TensorDesc,
}

/// The `mlp` of `configs/models.toml` if its file is there; `None` if it is not.
fn installed_mlp() -> Result<Option<Subject>, BenchError> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models.toml");
    if !manifest.exists() {
        return Ok(None);
    }
    let manifest = match Manifest::read(&manifest) {
        // The models are not installed (validation checks every file).
        Err(ModelsError::MissingFile { .. }) => return Ok(None),
        other => other?,
    };
    let Some(entry) = manifest.models.into_iter().find(|m| m.name == "mlp") else {
        return Ok(None);
    };
    let backend = load_backend(&entry)?;
    Ok(Some(Subject {
        what: format!(
            "the test MLP [1,16]→[1,4] of configs/models.toml (tract, {})",
            entry.path.display()
        ),
        backend,
        input: TensorDesc::input(DType::F32, &[1, WIDTH])?,
        output: TensorDesc::output(DType::F32, &[1, 4], 16)?,
    }))
}

fn subject() -> Result<Subject, BenchError> {
    if let Some(mlp) = installed_mlp()? {
        return Ok(mlp);
    }
    Ok(Subject {
        backend: Arc::new(SyntheticModel::new(
            SYNTHETIC_ID,
            "synthetic-free",
            1,
            Duration::ZERO,
            Duration::ZERO,
        )),
        what: "the synthetic model at zero cost (y = x, F32 [1,16]; the MLP is not installed: \
               run devices/ai-inferd/models/setup.sh or set AIVMM_MODELS_DIR)"
            .into(),
        input: TensorDesc::input(DType::F32, &[1, WIDTH])?,
        output: TensorDesc::output(DType::F32, &[1, WIDTH], 4 * WIDTH)?,
    })
}

/// p50 and p99 of one set of samples, ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

impl Quantiles {
    /// Of `samples`; `None` when empty.
    pub fn of(samples: &mut [u64]) -> Option<Self> {
        Some(Quantiles {
            p50: percentile(samples, 0.5)?,
            p99: percentile(samples, 0.99)?,
        })
    }
}

/// What the path adds to the direct call at one quantile, ns (negative: the path
/// measured faster, i.e. within noise).
pub fn added_ns(path: u64, direct: u64) -> i64 {
    i64::try_from(path).unwrap_or(i64::MAX) - i64::try_from(direct).unwrap_or(i64::MAX)
}

/// `ns` as microseconds with one decimal.
pub fn us(ns: i64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
}

/// Everything the overhead figure measured.
#[derive(Clone, Debug)]
pub struct Overhead {
    /// The model, as the report states it.
    pub model: String,
    /// Rounds run, and requests of each kind per round.
    pub rounds: u32,
    /// Requests of each kind per round.
    pub per_round: u32,
    /// Round trip through the vhost-user path, every request, ns.
    pub path_ns: Vec<u64>,
    /// Direct backend call, every request, ns.
    pub direct_ns: Vec<u64>,
    /// How late each timer probe's sleep woke, ns.
    pub timer_late_ns: Vec<u64>,
    /// p50 of the path minus p50 of the direct call, per round, ns.
    pub round_p50_added_ns: Vec<i64>,
}

/// One request through the vhost-user path; its output bytes.
fn through_path(
    fe: &mut TestFrontend,
    request: &Request,
    input: &[u8],
) -> Result<(u64, Vec<u8>), BenchError> {
    let start = Instant::now();
    let pending = fe.submit(0, request, &[input], 0)?;
    let used = fe.wait_for(0, pending.head, Duration::from_secs(10))?;
    let took = start.elapsed().as_nanos() as u64;
    let done = fe.finish(pending, used)?;
    let header = *done.header()?;
    if header.status != Status::Ok {
        return Err(BenchError::Check(format!(
            "overhead: request {} came back {:?}",
            header.request_id, header.status
        )));
    }
    let output = done.outputs.into_iter().next().unwrap_or_default();
    Ok((took, output))
}

/// One direct call; its output bytes.
fn direct(s: &Subject, input: &[u8]) -> Result<(u64, Vec<u8>), BenchError> {
    let start = Instant::now();
    let outputs = run_local(
        s.backend.as_ref(),
        LocalRequest {
            inputs: vec![(s.input, input.to_vec())],
            outputs: vec![s.output],
        },
    );
    let took = start.elapsed().as_nanos() as u64;
    let outputs = outputs.map_err(|e| BenchError::Check(format!("overhead: direct call: {e}")))?;
    Ok((
        took,
        outputs
            .into_iter()
            .next()
            .map(|o| o.data)
            .unwrap_or_default(),
    ))
}

/// Runs the overhead figure: `o.rounds` rounds of `o.requests_per_round` requests
/// each way.
pub fn measure(o: &BenchOptions) -> Result<Overhead, BenchError> {
    let s = subject()?;
    let model = s.backend.info().id;
    let d = BenchDaemon::start(
        1,
        0,
        &[TenantDef::new("p", 1, "normal")],
        vec![s.backend.clone()],
    )?;
    let mut fe = TestFrontend::connect(
        &d.socket("p"),
        FrontendOptions {
            regions: vec![(0x4000_0000, 4 << 20)],
            ..FrontendOptions::default()
        },
    )?;
    let values: Vec<f32> = (0..WIDTH).map(|i| i as f32 * 0.25 - 1.0).collect();
    let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut next_id = 1u64;
    let mut request = || {
        next_id += 1;
        Request::infer(next_id, model, vec![s.input], vec![s.output])
    };

    // Warm both up, and check that both compute the same thing.
    let (_, reference) = direct(&s, &input)?;
    for _ in 0..WARMUP_REQUESTS {
        let (_, out) = through_path(&mut fe, &request()?, &input)?;
        if out.get(..reference.len()) != Some(&reference[..]) {
            return Err(BenchError::Check(
                "overhead: the path's output differs from the direct call's".into(),
            ));
        }
        direct(&s, &input)?;
    }

    let per_round = o.requests_per_round.max(1);
    let mut result = Overhead {
        model: s.what.clone(),
        rounds: o.rounds.max(1),
        per_round,
        path_ns: Vec::new(),
        direct_ns: Vec::new(),
        timer_late_ns: Vec::new(),
        round_p50_added_ns: Vec::new(),
    };
    for _ in 0..result.rounds {
        let mut path = Vec::with_capacity(per_round as usize);
        for _ in 0..per_round {
            let req = request()?;
            path.push(through_path(&mut fe, &req, &input)?.0);
        }
        let mut local = Vec::with_capacity(per_round as usize);
        for _ in 0..per_round {
            local.push(direct(&s, &input)?.0);
        }
        let probes = (per_round as usize / 4).max(1);
        let nominal = PROBE_SLEEP.as_nanos() as u64;
        result.timer_late_ns.extend(
            sleep_samples(PROBE_SLEEP, probes)
                .into_iter()
                .map(|t| t.saturating_sub(nominal)),
        );
        if let (Some(p), Some(l)) = (Quantiles::of(&mut path), Quantiles::of(&mut local)) {
            result.round_p50_added_ns.push(added_ns(p.p50, l.p50));
        }
        result.path_ns.extend(path);
        result.direct_ns.extend(local);
    }
    Ok(result)
}

impl Overhead {
    /// Adds the figure's details and rows to `report`.
    pub fn report(&self, report: &mut Report) {
        let (Some(path), Some(direct), Some(late)) = (
            Quantiles::of(&mut self.path_ns.clone()),
            Quantiles::of(&mut self.direct_ns.clone()),
            Quantiles::of(&mut self.timer_late_ns.clone()),
        ) else {
            report
                .details
                .push("overhead: nothing was measured".to_owned());
            return;
        };
        let mut rounds = self.round_p50_added_ns.clone();
        rounds.sort_unstable();
        let (lo, hi) = (
            rounds.first().copied().unwrap_or(0),
            rounds.last().copied().unwrap_or(0),
        );
        report.details.push(format!(
            "overhead: {}; one request at a time; (a) vhost-user path: a test frontend lays \
             out the chain in memfd guest memory and kicks, the daemon (1 executor, no batching \
             delay) walks it, admits and schedules it, runs the backend on guest memory and \
             publishes the used element, the frontend wakes on the call eventfd (submission to \
             used element); (b) direct: run_local on host buffers (the same checks and \
             Backend::run); {} alternating rounds of {} each way after {WARMUP_REQUESTS} \
             uncounted; outputs of (a) and (b) compared; per-round p50 overhead {} .. {}; \
             host timer: {} sleeps of 100 µs between the rounds",
            self.model,
            self.rounds,
            self.per_round,
            us(lo),
            us(hi),
            self.timer_late_ns.len()
        ));
        for (name, target_us, path, direct) in [
            ("p50", 10, path.p50, direct.p50),
            ("p99", 50, path.p99, direct.p99),
        ] {
            let added = added_ns(path, direct);
            report.rows.push(Row {
                figure: format!("Paravirtual overhead on the host ({name}): path − direct call"),
                target: format!("≤ {target_us} µs"),
                measured: format!(
                    "{} ({} vs {})",
                    us(added),
                    us(path as i64),
                    us(direct as i64)
                ),
                met: Some(added <= target_us * 1000),
            });
        }
        report.rows.push(Row {
            figure: "— host timer meanwhile: 100 µs sleeps woke late by".into(),
            target: String::new(),
            measured: format!("p50 {}, p99 {}", us(late.p50 as i64), us(late.p99 as i64)),
            met: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overhead(path: Vec<u64>, direct: Vec<u64>, late: Vec<u64>) -> Overhead {
        Overhead {
            model: "m".into(),
            rounds: 1,
            per_round: path.len() as u32,
            path_ns: path,
            direct_ns: direct,
            timer_late_ns: late,
            round_p50_added_ns: vec![-500, 7_000],
        }
    }

    #[test]
    fn added_time_is_signed_and_microseconds_print_with_one_decimal() {
        assert_eq!(added_ns(30_000, 12_500), 17_500);
        assert_eq!(added_ns(10_000, 12_500), -2_500);
        assert_eq!(us(17_549), "17.5 µs");
        assert_eq!(us(-2_500), "-2.5 µs");
    }

    #[test]
    fn quantiles_take_the_rank_and_are_none_without_samples() {
        let mut v: Vec<u64> = (1..=200).rev().collect();
        assert_eq!(
            Quantiles::of(&mut v),
            Some(Quantiles { p50: 100, p99: 198 })
        );
        assert_eq!(Quantiles::of(&mut []), None);
    }

    #[test]
    fn the_report_compares_each_quantile_with_its_target() {
        // path p50 40 µs, p99 100 µs; direct p50 35 µs, p99 40 µs.
        let mut path = vec![40_000; 98];
        path.extend([100_000, 100_000]);
        let mut direct = vec![35_000; 98];
        direct.extend([40_000, 40_000]);
        let mut report = Report::default();
        overhead(path, direct, vec![3_000, 60_000]).report(&mut report);
        assert_eq!(report.rows.len(), 3);
        assert_eq!(report.rows[0].measured, "5.0 µs (40.0 µs vs 35.0 µs)");
        assert_eq!(report.rows[0].met, Some(true));
        assert_eq!(report.rows[1].measured, "60.0 µs (100.0 µs vs 40.0 µs)");
        assert_eq!(report.rows[1].met, Some(false));
        assert_eq!(report.rows[2].measured, "p50 3.0 µs, p99 60.0 µs");
        assert!(
            report.details[0].contains("per-round p50 overhead -0.5 µs .. 7.0 µs"),
            "{}",
            report.details[0]
        );
        let text = report.render();
        assert!(text.contains("| ≤ 10 µs | 5.0 µs"), "{text}");
    }

    #[test]
    fn an_empty_measurement_reports_no_rows() {
        let mut report = Report::default();
        overhead(Vec::new(), Vec::new(), Vec::new()).report(&mut report);
        assert!(report.rows.is_empty());
        assert_eq!(report.details, ["overhead: nothing was measured"]);
    }
}
