//! The seccomp filters' cost on the request path: two daemon processes
//! (`ai-inferd bench-daemon`) alike but for the filters, one request at a time from a
//! test frontend, driven in alternating slices so that host noise falls on both.
//!
//! The model does no work (0 µs), so the round trip is the paravirtual path itself:
//! the kick, the vring worker's chain walk, the scheduler, the executor and the call.

use std::path::Path;
use std::time::Duration;

use ai_infer_protocol::PriorityClass;
use ai_infer_test_frontend::load::{self, Load, Pattern};

use super::memory::{ChildDaemon, ChildSpec, MODEL};
use super::{ok_latencies, scratch_dir, BenchError, BenchOptions, Report, Row};

/// Per-slice medians of both daemons, ns.
pub struct SeccompCost {
    /// Median round trip of each slice with the filters on.
    pub on: Vec<u64>,
    /// The same with the filters off.
    pub off: Vec<u64>,
    /// Requests measured in all.
    pub requests: usize,
}

fn median(v: &mut [u64]) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// The median of `values` (not empty).
fn median_f(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `o.rounds` rounds; in each, a slice of one request at a time against the daemon with
/// filters, then against the one without (their order swapped every round).
pub fn measure(o: &BenchOptions, exe: &Path) -> Result<SeccompCost, BenchError> {
    let slice = (o.phase / o.rounds.max(1)).max(Duration::from_millis(200));
    let spec = |seccomp| ChildSpec {
        tenants: 1,
        weights_mib: 1,
        work_us: 0,
        seccomp,
    };
    let (dir_on, dir_off) = (scratch_dir(), scratch_dir());
    for dir in [&dir_on, &dir_off] {
        std::fs::create_dir_all(dir).map_err(BenchError::Io)?;
    }
    let on = ChildDaemon::start(exe, &dir_on, spec(true))?;
    let off = ChildDaemon::start(exe, &dir_off, spec(false))?;
    let load = |dir: &Path| Load {
        socket: dir.join("m0.sock"),
        model: MODEL,
        class: PriorityClass::Normal,
        pattern: Pattern::Closed { depth: 1 },
        deadline_us: 0,
    };
    let mut cost = SeccompCost {
        on: Vec::new(),
        off: Vec::new(),
        requests: 0,
    };
    // A connection's first requests are slower (pages, caches): not counted.
    let settle = slice / 5;
    for round in 0..o.rounds.max(1) {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for filtered in order {
            let dir = if filtered { &dir_on } else { &dir_off };
            let running = load::spawn(&[load(dir)], slice)?;
            let runs = running.join()?;
            let mut lat = ok_latencies(&runs[0], settle);
            cost.requests += lat.len();
            let m = median(&mut lat).ok_or_else(|| {
                BenchError::Check(format!(
                    "seccomp cost: no request answered in round {round} (filters {})",
                    if filtered { "on" } else { "off" }
                ))
            })?;
            if filtered {
                cost.on.push(m);
            } else {
                cost.off.push(m);
            }
        }
    }
    // Both must still be serving: a filter violation would have ended the first.
    on.finish()?;
    off.finish()?;
    for dir in [&dir_on, &dir_off] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(cost)
}

impl SeccompCost {
    /// Each round's ratio, filters on / off.
    pub fn ratios(&self) -> Vec<f64> {
        self.on
            .iter()
            .zip(&self.off)
            .map(|(&a, &b)| a as f64 / b.max(1) as f64)
            .collect()
    }

    /// Adds the figure to `report`.
    pub fn report(&self, report: &mut Report) {
        let ratios = self.ratios();
        if ratios.is_empty() {
            return;
        }
        let us = |v: &[u64]| median_f(&v.iter().map(|&n| n as f64 / 1000.0).collect::<Vec<_>>());
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
        report.details.push(format!(
            "seccomp: {} rounds, one request at a time on a model that does no work, {} \
             requests; per-round ratios {lo:.3}..{hi:.3}",
            ratios.len(),
            self.requests
        ));
        report.rows.push(Row {
            figure: "seccomp on the request path: round trip, filters on / off".into(),
            target: "reported (docs/security.md)".into(),
            measured: format!(
                "{:.3}× (medians {:.1} / {:.1} µs; rounds {lo:.3}..{hi:.3})",
                median_f(&ratios),
                us(&self.on),
                us(&self.off)
            ),
            met: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_the_rounds_and_the_report_shows_their_median_and_spread() {
        let cost = SeccompCost {
            on: vec![110, 100, 130],
            off: vec![100, 100, 100],
            requests: 30,
        };
        let r = cost.ratios();
        assert_eq!(r.len(), 3);
        assert!((r[0] - 1.1).abs() < 1e-9 && (r[2] - 1.3).abs() < 1e-9);
        let mut report = Report::default();
        cost.report(&mut report);
        let row = &report.rows[0];
        assert!(row.measured.starts_with("1.100×"), "{}", row.measured);
        assert!(row.measured.contains("1.000..1.300"), "{}", row.measured);
        assert_eq!(row.met, None);
    }
}
