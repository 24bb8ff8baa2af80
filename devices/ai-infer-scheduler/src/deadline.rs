//! Deadlines: per-model execution time estimates and the admission prediction.
//!
//! Modelled on Clockwork (Gujarati et al., OSDI 2020): inference time of a model at a
//! given batch size is very predictable, so the scheduler measures it, predicts when
//! a new request would finish, and rejects at once (DEADLINE) the request that cannot
//! make it, instead of running it late and wasting the accelerator on a result nobody
//! can use. A queued request whose deadline can no longer be met even if it started
//! now is dropped (`Poll::Drop`) before it reaches an executor, and a batch is only
//! grown while every request in it still finishes in time.
//!
//! The estimate for batch size `n` is a smoothed mean plus `dev_factor` smoothed mean
//! deviations of the measured times (the retransmission-timeout estimator of
//! Jacobson/Karels, RFC 6298), so it is a high percentile rather than the mean when
//! times vary, and exact when they do not. Sizes not measured yet are interpolated
//! between measured ones, or scaled linearly from the nearest one
//! ([`ExecTimeEstimator::estimate`]); a model never measured has no estimate and
//! admission trusts the request.

use crate::Nanos;

/// How measurements are smoothed.
#[derive(Clone, Debug, PartialEq)]
pub struct EstimatorConfig {
    /// Weight of a new measurement in the mean, in (0, 1].
    pub alpha: f64,
    /// Weight of a new deviation in the mean deviation, in (0, 1].
    pub dev_alpha: f64,
    /// Mean deviations added to the mean (0 = the mean itself).
    pub dev_factor: f64,
}

impl Default for EstimatorConfig {
    /// alpha 1/8, dev_alpha 1/4, dev_factor 2 (RFC 6298 uses 1/8, 1/4 and 4; 2 keeps
    /// fewer good requests out when times are noisy).
    fn default() -> Self {
        Self {
            alpha: 0.125,
            dev_alpha: 0.25,
            dev_factor: 2.0,
        }
    }
}

impl EstimatorConfig {
    /// The config with out-of-range values replaced by the defaults.
    fn sanitized(&self) -> Self {
        let d = Self::default();
        let unit = |v: f64, fallback: f64| if v > 0.0 && v <= 1.0 { v } else { fallback };
        Self {
            alpha: unit(self.alpha, d.alpha),
            dev_alpha: unit(self.dev_alpha, d.dev_alpha),
            dev_factor: if self.dev_factor >= 0.0 && self.dev_factor.is_finite() {
                self.dev_factor
            } else {
                d.dev_factor
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Smoothed {
    mean: f64,
    dev: f64,
    /// The fastest measurement so far.
    fastest: f64,
    /// Measurements so far (saturating).
    samples: u32,
}

/// A measurement counts at most this many deviations above the mean …
const STALL_DEVS: f64 = 4.0;
/// … or this share of the mean above it, whichever is more.
const STALL_SHARE: f64 = 0.25;

/// Execution time estimates of one model, per batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecTimeEstimator {
    config: EstimatorConfig,
    /// Index `n - 1` for batch size `n`.
    sizes: Vec<Option<Smoothed>>,
}

impl ExecTimeEstimator {
    /// An estimator for batches of 1 ..= `max_batch` (at least 1) with no measurements.
    pub fn new(config: &EstimatorConfig, max_batch: usize) -> Self {
        Self {
            config: config.sanitized(),
            sizes: vec![None; max_batch.max(1)],
        }
    }

    /// Changes the smoothing of future measurements.
    pub fn set_config(&mut self, config: &EstimatorConfig) {
        self.config = config.sanitized();
    }

    /// Changes the largest batch size, keeping the measurements that still apply.
    pub fn set_max_batch(&mut self, max_batch: usize) {
        self.sizes.resize(max_batch.max(1), None);
    }

    /// Records that a batch of `n` requests took `ns`. Sizes outside 1 ..= max batch
    /// are ignored (the caller reported something the scheduler did not dispatch).
    pub fn record(&mut self, n: usize, ns: Nanos) {
        let Some(slot) = n.checked_sub(1).and_then(|i| self.sizes.get_mut(i)) else {
            return;
        };
        let x = ns as f64;
        *slot = Some(match *slot {
            // The first measurement is taken as exact (RFC 6298 starts the deviation
            // at half of it, which would double the first estimates).
            None => Smoothed {
                mean: x,
                dev: 0.0,
                fastest: x,
                samples: 1,
            },
            Some(s) => {
                // A stall (a descheduled thread, a page-fault storm) counts as a
                // moderately slow batch: one outlier must not move the estimate far
                // beyond every deadline. A real slowdown still raises the ceiling
                // with each sample (through the deviation) and is followed in a few.
                let ceiling = s.mean + (STALL_DEVS * s.dev).max(STALL_SHARE * s.mean);
                let clipped = x.min(ceiling);
                let dev = s.dev + self.config.dev_alpha * ((clipped - s.mean).abs() - s.dev);
                let mean = s.mean + self.config.alpha * (clipped - s.mean);
                Smoothed {
                    mean,
                    dev,
                    fastest: s.fastest.min(x),
                    samples: s.samples.saturating_add(1),
                }
            }
        });
    }

    /// Predicted execution time of a batch of `n` requests; `None` when no size has
    /// been measured.
    ///
    /// A size not measured yet is interpolated linearly between the nearest
    /// measured sizes around it (batch time is close to affine in the size); above
    /// the largest measured size the time per request is kept (an upper bound when
    /// batching amortises a fixed cost); below the smallest one it is scaled down
    /// linearly (a lower bound). The last case is optimistic on purpose: borrowing
    /// the larger size's time instead would make a model whose first batches were
    /// large refuse every small batch with a deadline forever, since a size nobody
    /// runs is never measured. An optimistic guess costs a few late (and counted)
    /// requests until that size is measured.
    pub fn estimate(&self, n: usize) -> Option<Nanos> {
        let n = n.clamp(1, self.sizes.len());
        let value = |s: &Smoothed| s.mean + self.config.dev_factor * s.dev;
        if let Some(s) = &self.sizes[n - 1] {
            return Some(to_nanos(value(s)));
        }
        let below = self.sizes[..n - 1]
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, s)| s.as_ref().map(|s| (i + 1, value(s))));
        let above = self.sizes[n..]
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.as_ref().map(|s| (n + i + 1, value(s))));
        let v = match (below, above) {
            (Some((k1, v1)), Some((k2, v2))) => {
                let slope = (v2 - v1) / (k2 - k1) as f64;
                v1 + slope.max(0.0) * (n - k1) as f64
            }
            (Some((k, v)), None) => v * n as f64 / k as f64,
            (None, Some((k, v))) => v * n as f64 / k as f64,
            (None, None) => return None,
        };
        Some(to_nanos(v))
    }

    /// A lower bound of the execution time of a batch of `n`, for limits that must
    /// not be loosened by a pessimistic guess: the measured time of `n` if there is
    /// one, else the larger of the nearest smaller size's time (batch time does not
    /// shrink with more requests) and the nearest larger size's time scaled down
    /// linearly (time per request does not grow with the batch). `None` when
    /// nothing is measured.
    pub fn lower_bound(&self, n: usize) -> Option<Nanos> {
        self.bound_by(n, |s| Some(s.mean + self.config.dev_factor * s.dev))
    }

    /// The fastest a batch of `n` has been seen to run: its fastest measurement,
    /// or bounded from other sizes' as in [`ExecTimeEstimator::lower_bound`]; `None`
    /// until some size ran twice (a first batch is often a slow warm-up). What
    /// "cannot make it even if started now" is judged by: only requests that even
    /// the best case would make late are dropped unstarted.
    pub fn fastest(&self, n: usize) -> Option<Nanos> {
        self.bound_by(n, |s| (s.samples >= 2).then_some(s.fastest))
    }

    /// A bound for size `n` from `value` of the measured sizes (`None` = skip).
    fn bound_by(&self, n: usize, value: impl Fn(&Smoothed) -> Option<f64>) -> Option<Nanos> {
        let n = n.clamp(1, self.sizes.len());
        let measured = |s: &Option<Smoothed>| s.as_ref().and_then(&value);
        if let Some(v) = measured(&self.sizes[n - 1]) {
            return Some(to_nanos(v));
        }
        let below = self.sizes[..n - 1].iter().rev().find_map(measured);
        let above = self.sizes[n..]
            .iter()
            .enumerate()
            .find_map(|(i, s)| measured(s).map(|v| v * n as f64 / (n + i + 1) as f64));
        match (below, above) {
            (Some(a), Some(b)) => Some(to_nanos(a.max(b))),
            (a, b) => a.or(b).map(to_nanos),
        }
    }
}

/// Float nanoseconds to [`Nanos`], rounded up, saturating.
fn to_nanos(v: f64) -> Nanos {
    // `as` saturates and maps NaN to 0.
    v.ceil() as Nanos
}

/// How fast [`OverrunMargin`] forgets: the margin halves every this many ns.
const MARGIN_HALF_LIFE_NS: f64 = 1e9;

/// How late a model's recent batches finished against the estimates they were
/// dispatched with, and the margin admission keeps for that.
///
/// The per-size estimates clip stalls on purpose (one must not lock deadline work
/// out), so on a host whose threads now and then wake late they say how long a batch
/// computes, not how long it takes to finish. Under overload admission fills the
/// queue until the last admitted request is predicted to finish just in time, so
/// every such wake-up, even of a millisecond, turns a request late (and the one queued
/// behind it too). Such wake-ups come in spells (a neighbour busy on the host) and
/// are rare per batch even then — far under 1% of batches, too few for a percentile
/// of recent batches to see. So the margin is a decaying maximum: the largest recent
/// overrun (wall time from dispatch to completion minus the estimate, at most one
/// estimate), halving every [`MARGIN_HALF_LIFE_NS`]: held through a noisy spell,
/// gone a few seconds after it. It costs little throughput: a model kept busy runs
/// as many requests with a queue shorter by the margin, only their deadlines are
/// then kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OverrunMargin {
    /// The overrun the margin decays from …
    peak: Nanos,
    /// … and when it was measured.
    at: Nanos,
}

impl OverrunMargin {
    /// Records a batch dispatched at `dispatched_at` with `estimate_ns` that finished
    /// at `now`.
    pub fn record(&mut self, now: Nanos, dispatched_at: Nanos, estimate_ns: Nanos) {
        let took_ns = now.saturating_sub(dispatched_at);
        // One stall longer than a whole batch says no more than that the host stalls.
        let overrun = took_ns.saturating_sub(estimate_ns).min(estimate_ns);
        if overrun >= self.margin(now) {
            self.peak = overrun;
            self.at = now;
        }
    }

    /// What admission adds to a predicted finish at `now`.
    pub fn margin(&self, now: Nanos) -> Nanos {
        let half_lives = now.saturating_sub(self.at) as f64 / MARGIN_HALF_LIFE_NS;
        to_nanos(self.peak as f64 * (-half_lives).exp2())
    }
}

/// The state of a model's queue that admission looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Requests queued for the model that will go before the new one.
    pub ahead: usize,
    /// The model's largest batch.
    pub max_batch: usize,
    /// Estimated time left of the batches running on the model's executors, summed.
    pub running_left_ns: Nanos,
    /// Executors that serve the model (at least 1 is assumed).
    pub executors: usize,
}

/// When a request submitted at `now` behind `backlog` is predicted to finish; `None`
/// when the model has no estimate yet.
///
/// The requests ahead run in full batches spread over the executors; the new one
/// runs in the batch after them, of size `ahead % max_batch + 1`. This ignores other
/// models sharing the executors and batching delay, so it errs on the side of
/// admitting; the queue-time check at dispatch catches the rest.
pub fn predicted_finish(
    now: Nanos,
    backlog: Backlog,
    estimator: &ExecTimeEstimator,
) -> Option<Nanos> {
    let max_batch = backlog.max_batch.max(1);
    let full_batches = (backlog.ahead / max_batch) as u64;
    let own = estimator.estimate(backlog.ahead % max_batch + 1)?;
    let full = estimator.estimate(max_batch)?;
    let before = full
        .saturating_mul(full_batches)
        .saturating_add(backlog.running_left_ns)
        / backlog.executors.max(1) as u64;
    Some(now.saturating_add(before).saturating_add(own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overrun_margin_holds_the_largest_recent_overrun_and_decays() {
        const S: Nanos = 1_000_000_000;
        // A batch with `estimate` that finished at `now`, `took` after its dispatch.
        let batch = |m: &mut OverrunMargin, now: Nanos, estimate: Nanos, took: Nanos| {
            m.record(now, now - took, estimate)
        };
        let mut m = OverrunMargin::default();
        assert_eq!(m.margin(0), 0);
        // On time or early: nothing to keep back.
        batch(&mut m, S, 5_000_000, 4_000_000);
        batch(&mut m, S, 5_000_000, 5_000_000);
        assert_eq!(m.margin(S), 0);
        // A batch 2 ms late sets it; a smaller overrun meanwhile does not lower it.
        batch(&mut m, S, 5_000_000, 7_000_000);
        assert_eq!(m.margin(S), 2_000_000);
        batch(&mut m, S + S / 10, 5_000_000, 5_500_000);
        assert!(m.margin(S + S / 10) > 1_800_000);
        // It halves every second …
        assert!(
            m.margin(2 * S).abs_diff(1_000_000) <= 1,
            "{}",
            m.margin(2 * S)
        );
        assert!(m.margin(11 * S) < 2_000, "{}", m.margin(11 * S));
        // … and a new overrun above what is left takes over.
        batch(&mut m, 3 * S, 5_000_000, 6_000_000);
        assert_eq!(m.margin(3 * S), 1_000_000);
        // One stall counts as an overrun of one estimate at most.
        batch(&mut m, 3 * S, 5_000_000, 80_000_000);
        assert_eq!(m.margin(3 * S), 5_000_000);
        // A clock that went backwards (another executor's older time) is no age.
        assert_eq!(m.margin(S), 5_000_000);
    }

    #[test]
    fn constant_times_are_estimated_exactly() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 8);
        assert_eq!(e.estimate(1), None);
        for _ in 0..10 {
            e.record(1, 1_000);
        }
        assert_eq!(e.estimate(1), Some(1_000));
    }

    #[test]
    fn noisy_times_are_estimated_above_the_mean() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 1);
        for i in 0..200 {
            e.record(1, if i % 2 == 0 { 900 } else { 1_100 });
        }
        let est = e.estimate(1).unwrap();
        assert!(est > 1_100 && est < 1_500, "estimate {est}");
    }

    #[test]
    fn the_mean_follows_a_change_of_speed() {
        let mut e = ExecTimeEstimator::new(
            &EstimatorConfig {
                dev_factor: 0.0,
                ..EstimatorConfig::default()
            },
            1,
        );
        e.record(1, 1_000);
        for _ in 0..100 {
            e.record(1, 3_000);
        }
        assert!(e.estimate(1).unwrap().abs_diff(3_000) < 10);
    }

    #[test]
    fn unmeasured_sizes_are_interpolated_or_scaled() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 8);
        e.record(2, 2_000);
        e.record(6, 4_000);
        assert_eq!(e.estimate(1), Some(1_000), "scaled down from size 2");
        assert_eq!(e.estimate(3), Some(2_500), "between sizes 2 and 6");
        assert_eq!(e.estimate(5), Some(3_500));
        assert_eq!(e.estimate(8), Some(4_000 * 8 / 6 + 1), "scaled up from 6");
        assert_eq!(e.estimate(100), e.estimate(8), "clamped to max batch");
        // A noisy smaller size measured above a larger one: never decreasing.
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 8);
        e.record(1, 5_000);
        e.record(4, 4_000);
        assert_eq!(e.estimate(2), Some(5_000));
    }

    #[test]
    fn a_stall_moves_the_estimate_little_and_a_real_slowdown_is_followed() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 1);
        for _ in 0..20 {
            e.record(1, 5_000_000);
        }
        e.record(1, 50_000_000);
        let after_stall = e.estimate(1).unwrap();
        assert!(
            after_stall < 7_000_000,
            "estimate {after_stall} after one 50 ms stall"
        );
        assert_eq!(e.fastest(1), Some(5_000_000));
        for _ in 0..12 {
            e.record(1, 10_000_000);
        }
        let after_slowdown = e.estimate(1).unwrap();
        assert!(
            after_slowdown >= 9_500_000,
            "estimate {after_slowdown} after 12 × 10 ms"
        );
        assert_eq!(e.fastest(1), Some(5_000_000), "the fastest stays");
    }

    #[test]
    fn lower_bounds_never_exceed_what_monotone_batches_allow() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 8);
        assert_eq!(e.lower_bound(1), None);
        e.record(8, 8_000);
        assert_eq!(
            e.lower_bound(1),
            Some(1_000),
            "8 µs for 8: at least 1 µs for 1"
        );
        assert_eq!(e.estimate(1), Some(1_000), "so is the estimate below it");
        e.record(2, 3_000);
        assert_eq!(
            e.lower_bound(4),
            Some(4_000),
            "max(3 µs from size 2, 4 µs from size 8)"
        );
        assert_eq!(e.lower_bound(2), Some(3_000), "measured");
    }

    #[test]
    fn out_of_range_sizes_are_ignored() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 4);
        e.record(0, 5);
        e.record(5, 5);
        assert_eq!(e.estimate(1), None);
    }

    #[test]
    fn prediction_counts_full_batches_ahead_and_running_work() {
        let mut e = ExecTimeEstimator::new(&EstimatorConfig::default(), 4);
        e.record(1, 10);
        e.record(2, 15);
        e.record(4, 20);
        let backlog = Backlog {
            ahead: 9,
            max_batch: 4,
            running_left_ns: 7,
            executors: 1,
        };
        // Two full batches (40) + running (7), then a batch of 2 (15).
        assert_eq!(predicted_finish(100, backlog, &e), Some(100 + 47 + 15));
        let two = Backlog {
            executors: 2,
            ..backlog
        };
        assert_eq!(predicted_finish(100, two, &e), Some(100 + 23 + 15));
        let fresh = ExecTimeEstimator::new(&EstimatorConfig::default(), 4);
        assert_eq!(predicted_finish(100, backlog, &fresh), None);
    }

    #[test]
    fn invalid_config_values_fall_back_to_defaults() {
        let bad = EstimatorConfig {
            alpha: f64::NAN,
            dev_alpha: 7.0,
            dev_factor: -1.0,
        };
        let e = ExecTimeEstimator::new(&bad, 1);
        assert_eq!(e.config, EstimatorConfig::default());
    }
}
