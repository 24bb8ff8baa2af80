//! Scheduler statistics per tenant and per model, and their Prometheus text form.
//!
//! Latency histograms use the TRACE buckets of the protocol (log2 ranges of whole
//! microseconds, [`latency_bucket`]), so what a guest reads through TRACE and what the
//! operator scrapes can be compared bucket for bucket.

use std::collections::BTreeMap;
use std::fmt::Write;

use ai_infer_protocol::{latency_bucket, latency_bucket_bounds_ns, PriorityClass, LATENCY_BUCKETS};

use crate::{ModelId, Nanos, Reject, TenantId};

/// A latency histogram in TRACE buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Counts per [`latency_bucket`].
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Samples recorded.
    pub count: u64,
    /// Sum of the samples, nanoseconds (wrapping).
    pub sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; LATENCY_BUCKETS],
            count: 0,
            sum_ns: 0,
        }
    }
}

impl Histogram {
    /// Adds one sample.
    pub fn record(&mut self, ns: Nanos) {
        let slot = &mut self.buckets[latency_bucket(ns)];
        *slot = slot.wrapping_add(1);
        self.count = self.count.wrapping_add(1);
        self.sum_ns = self.sum_ns.wrapping_add(ns);
    }

    /// The samples recorded since `earlier`, a snapshot of this same histogram (all
    /// counters only grow, wrapping).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|i| self.buckets[i].wrapping_sub(earlier.buckets[i])),
            count: self.count.wrapping_sub(earlier.count),
            sum_ns: self.sum_ns.wrapping_sub(earlier.sum_ns),
        }
    }

    /// Upper bound (exclusive) of the bucket holding the `q` quantile (0 ≤ q ≤ 1),
    /// `None` when empty or when it falls in the unbounded last bucket.
    pub fn quantile_upper_ns(&self, q: f64) -> Option<Nanos> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (bucket, n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return latency_bucket_bounds_ns(bucket).1;
            }
        }
        None
    }
}

/// Batch sizes in power-of-two buckets: ≤1, ≤2, ≤4 … ≤128, more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSizeHistogram {
    /// Counts per bucket; bucket `i` < 8 holds sizes in (2^(i-1), 2^i], bucket 8 the rest.
    pub buckets: [u64; 9],
    /// Batches recorded.
    pub count: u64,
    /// Sum of the sizes.
    pub sum: u64,
}

impl BatchSizeHistogram {
    /// Upper bounds of the first eight buckets.
    pub const BOUNDS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

    /// Adds one batch of `size` requests.
    pub fn record(&mut self, size: usize) {
        let size = size as u64;
        let bucket = Self::BOUNDS
            .iter()
            .position(|bound| size <= *bound)
            .unwrap_or(Self::BOUNDS.len());
        self.buckets[bucket] = self.buckets[bucket].wrapping_add(1);
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(size);
    }
}

/// Counters of one tenant (since it was added).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// INFER requests submitted (admitted or not).
    pub requests: u64,
    /// Requests admitted to a queue.
    pub admitted: u64,
    /// Requests refused at submission, by reason ([`Reject::index`]).
    pub rejected: [u64; Reject::COUNT],
    /// Admitted requests that left the queue without running, by reason
    /// (deadline expired, cancelled, drained).
    pub dropped: [u64; Reject::COUNT],
    /// Requests whose priority was lowered to the ceiling.
    pub priority_clamped: u64,
    /// Requests that ran (reported through `complete`).
    pub completed: u64,
    /// Requests that ran and completed after their deadline (they had started in
    /// time but the batch took longer than estimated).
    pub deadline_missed: u64,
    /// Time from arrival to dispatch of each request that ran.
    pub queue: Histogram,
    /// Compute time of the batch each request ran in.
    pub compute: Histogram,
    /// Size of the batch each request ran in (one sample per request).
    pub batch_sizes: BatchSizeHistogram,
    /// Accelerator time charged to the tenant (its share of each batch), ns.
    pub busy_ns: u64,
}

/// Counters of one model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// INFER requests submitted for the model.
    pub requests: u64,
    /// Requests admitted.
    pub admitted: u64,
    /// Requests refused at submission, by reason.
    pub rejected: [u64; Reject::COUNT],
    /// Admitted requests that left the queue without running, by reason.
    pub dropped: [u64; Reject::COUNT],
    /// Requests that ran.
    pub completed: u64,
    /// Requests that completed after their deadline.
    pub deadline_missed: u64,
    /// Batches dispatched.
    pub batches: u64,
    /// Sizes of the dispatched batches.
    pub batch_sizes: BatchSizeHistogram,
    /// Queue time of each request that ran.
    pub queue: Histogram,
    /// Compute time of each batch.
    pub compute: Histogram,
    /// Accelerator time used by the model's batches, ns.
    pub busy_ns: u64,
}

/// A snapshot of one tenant: counters and the current queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSnapshot {
    /// The tenant.
    pub tenant: TenantId,
    /// Its weight.
    pub weight: u32,
    /// Its priority ceiling.
    pub priority_ceiling: PriorityClass,
    /// Its `max_in_flight`.
    pub max_in_flight: u32,
    /// Requests queued now.
    pub queued: u64,
    /// Requests queued or running now.
    pub in_flight: u64,
    /// Counters.
    pub stats: TenantStats,
}

/// A snapshot of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSnapshot {
    /// The model.
    pub model: ModelId,
    /// Requests queued now.
    pub queued: u64,
    /// Current execution time estimate at batch size 1, if measured.
    pub estimate_batch1_ns: Option<Nanos>,
    /// What deadline admission adds to its predictions now: the largest recent
    /// overrun of a batch's estimate, decayed (0 on a quiet host).
    pub deadline_margin_ns: Nanos,
    /// Counters.
    pub stats: ModelStats,
}

/// Everything the scheduler counts, at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tenants, by id.
    pub tenants: Vec<TenantSnapshot>,
    /// Models, by id.
    pub models: Vec<ModelSnapshot>,
}

impl SchedulerStats {
    /// Accelerator time charged to `tenant` so far, ns (0 for one not in the snapshot).
    pub fn busy_ns(&self, tenant: TenantId) -> u64 {
        self.tenants
            .iter()
            .find(|t| t.tenant == tenant)
            .map_or(0, |t| t.stats.busy_ns)
    }
}

/// Jain's fairness index of `values`: 1 when all are equal, 1/n when one has all.
pub fn jain_index(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let sum_sq: f64 = values.iter().map(|v| v * v).sum();
    if values.is_empty() || sum_sq == 0.0 {
        return 1.0;
    }
    sum * sum / (values.len() as f64 * sum_sq)
}

/// One metric family: name, type, help.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

impl Family {
    fn header(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn write_latency_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let mut cumulative = 0u64;
    for (bucket, n) in h.buckets.iter().enumerate() {
        cumulative = cumulative.wrapping_add(*n);
        if let (_, Some(upper)) = latency_bucket_bounds_ns(bucket) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
                seconds(upper)
            );
        }
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(h.sum_ns));
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

fn write_batch_histogram(out: &mut String, name: &str, labels: &str, h: &BatchSizeHistogram) {
    let mut cumulative = 0u64;
    for (bound, n) in BatchSizeHistogram::BOUNDS.iter().zip(&h.buckets) {
        cumulative = cumulative.wrapping_add(*n);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// `family` with one sample per item, from `value(item)`.
fn write_family<T>(
    out: &mut String,
    family: Family,
    items: &[T],
    labels: impl Fn(&T) -> String,
    value: impl Fn(&T) -> String,
) {
    family.header(out);
    for item in items {
        let _ = writeln!(out, "{}{{{}}} {}", family.name, labels(item), value(item));
    }
}

/// `family` with one sample per item and reject reason, from `counts(item)`.
fn write_by_reason<T>(
    out: &mut String,
    family: Family,
    items: &[T],
    labels: impl Fn(&T) -> String,
    counts: impl Fn(&T) -> &[u64; Reject::COUNT],
) {
    family.header(out);
    for item in items {
        for reason in Reject::ALL {
            let _ = writeln!(
                out,
                "{}{{{},reason=\"{}\"}} {}",
                family.name,
                labels(item),
                reason.label(),
                counts(item)[reason.index()]
            );
        }
    }
}

/// Names to label series with instead of numeric ids (tenant names from the
/// config, model names from the manifest). Ids without a name keep the number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeriesNames {
    /// Tenant names.
    pub tenants: BTreeMap<TenantId, String>,
    /// Model names.
    pub models: BTreeMap<ModelId, String>,
}

/// A label value with `\`, `"` and newlines escaped as the text format requires.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The Prometheus text exposition (format 0.0.4) of `stats`, labelled by id.
pub fn render_prometheus(stats: &SchedulerStats) -> String {
    render_prometheus_named(stats, &SeriesNames::default())
}

/// The Prometheus text exposition (format 0.0.4) of `stats`, with `tenant` and
/// `model` labels taken from `names` where known.
pub fn render_prometheus_named(stats: &SchedulerStats, names: &SeriesNames) -> String {
    let mut out = String::new();
    let t = &stats.tenants[..];
    let tenant_labels: BTreeMap<TenantId, String> = t
        .iter()
        .map(|s| {
            let name = names.tenants.get(&s.tenant).cloned();
            let value = name.unwrap_or_else(|| s.tenant.0.to_string());
            (s.tenant, format!("tenant=\"{}\"", escape_label(&value)))
        })
        .collect();
    let tl = |s: &TenantSnapshot| tenant_labels.get(&s.tenant).cloned().unwrap_or_default();
    let m = &stats.models[..];
    let model_labels: BTreeMap<ModelId, String> = m
        .iter()
        .map(|s| {
            let name = names.models.get(&s.model).cloned();
            let value = name.unwrap_or_else(|| s.model.to_string());
            (s.model, format!("model=\"{}\"", escape_label(&value)))
        })
        .collect();
    let ml = |s: &ModelSnapshot| model_labels.get(&s.model).cloned().unwrap_or_default();
    let fam = |name, kind, help| Family { name, kind, help };

    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_weight",
            "gauge",
            "Fair-share weight of the tenant.",
        ),
        t,
        tl,
        |s| s.weight.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_priority_ceiling",
            "gauge",
            "Highest priority class of the tenant (0 batch, 1 normal, 2 interactive, 3 realtime).",
        ),
        t,
        tl,
        |s| (s.priority_ceiling as u8).to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_max_in_flight",
            "gauge",
            "INFER requests the tenant may have queued or running at once.",
        ),
        t,
        tl,
        |s| s.max_in_flight.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_queued",
            "gauge",
            "INFER requests queued now.",
        ),
        t,
        tl,
        |s| s.queued.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_in_flight",
            "gauge",
            "INFER requests queued or running now.",
        ),
        t,
        tl,
        |s| s.in_flight.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_requests_total",
            "counter",
            "INFER requests submitted.",
        ),
        t,
        tl,
        |s| s.stats.requests.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_admitted_total",
            "counter",
            "INFER requests admitted to a queue.",
        ),
        t,
        tl,
        |s| s.stats.admitted.to_string(),
    );
    write_by_reason(
        &mut out,
        fam(
            "ai_inferd_tenant_rejected_total",
            "counter",
            "INFER requests refused at submission.",
        ),
        t,
        tl,
        |s| &s.stats.rejected,
    );
    write_by_reason(
        &mut out,
        fam(
            "ai_inferd_tenant_dropped_total",
            "counter",
            "Admitted INFER requests removed from the queue without running.",
        ),
        t,
        tl,
        |s| &s.stats.dropped,
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_priority_clamped_total",
            "counter",
            "INFER requests lowered to the priority ceiling.",
        ),
        t,
        tl,
        |s| s.stats.priority_clamped.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_completed_total",
            "counter",
            "INFER requests that ran.",
        ),
        t,
        tl,
        |s| s.stats.completed.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_deadline_missed_total",
            "counter",
            "INFER requests that ran and finished after their deadline.",
        ),
        t,
        tl,
        |s| s.stats.deadline_missed.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_tenant_accelerator_seconds_total",
            "counter",
            "Accelerator time charged to the tenant.",
        ),
        t,
        tl,
        |s| seconds(s.stats.busy_ns).to_string(),
    );
    fam(
        "ai_inferd_tenant_queue_seconds",
        "histogram",
        "Time from arrival to dispatch.",
    )
    .header(&mut out);
    for s in t {
        write_latency_histogram(
            &mut out,
            "ai_inferd_tenant_queue_seconds",
            &tl(s),
            &s.stats.queue,
        );
    }
    fam(
        "ai_inferd_tenant_compute_seconds",
        "histogram",
        "Compute time of the batch each request ran in.",
    )
    .header(&mut out);
    for s in t {
        write_latency_histogram(
            &mut out,
            "ai_inferd_tenant_compute_seconds",
            &tl(s),
            &s.stats.compute,
        );
    }
    fam(
        "ai_inferd_tenant_batch_size",
        "histogram",
        "Size of the batch each request ran in.",
    )
    .header(&mut out);
    for s in t {
        write_batch_histogram(
            &mut out,
            "ai_inferd_tenant_batch_size",
            &tl(s),
            &s.stats.batch_sizes,
        );
    }

    write_family(
        &mut out,
        fam(
            "ai_inferd_model_queued",
            "gauge",
            "INFER requests queued now.",
        ),
        m,
        ml,
        |s| s.queued.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_requests_total",
            "counter",
            "INFER requests submitted.",
        ),
        m,
        ml,
        |s| s.stats.requests.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_admitted_total",
            "counter",
            "INFER requests admitted to a queue.",
        ),
        m,
        ml,
        |s| s.stats.admitted.to_string(),
    );
    write_by_reason(
        &mut out,
        fam(
            "ai_inferd_model_rejected_total",
            "counter",
            "INFER requests refused at submission.",
        ),
        m,
        ml,
        |s| &s.stats.rejected,
    );
    write_by_reason(
        &mut out,
        fam(
            "ai_inferd_model_dropped_total",
            "counter",
            "Admitted INFER requests removed from the queue without running.",
        ),
        m,
        ml,
        |s| &s.stats.dropped,
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_completed_total",
            "counter",
            "INFER requests that ran.",
        ),
        m,
        ml,
        |s| s.stats.completed.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_deadline_missed_total",
            "counter",
            "INFER requests that ran and finished after their deadline.",
        ),
        m,
        ml,
        |s| s.stats.deadline_missed.to_string(),
    );
    let measured: Vec<&ModelSnapshot> = m
        .iter()
        .filter(|s| s.estimate_batch1_ns.is_some())
        .collect();
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_estimate_batch1_seconds",
            "gauge",
            "Predicted compute time of a batch of one (models measured so far).",
        ),
        &measured,
        |s| ml(s),
        |s| seconds(s.estimate_batch1_ns.unwrap_or(0)).to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_deadline_margin_seconds",
            "gauge",
            "Kept back by deadline admission: the largest recent overrun of a batch's estimate, halving every second.",
        ),
        m,
        ml,
        |s| seconds(s.deadline_margin_ns).to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_batches_total",
            "counter",
            "Batches dispatched.",
        ),
        m,
        ml,
        |s| s.stats.batches.to_string(),
    );
    write_family(
        &mut out,
        fam(
            "ai_inferd_model_busy_seconds_total",
            "counter",
            "Accelerator time used by the model's batches.",
        ),
        m,
        ml,
        |s| seconds(s.stats.busy_ns).to_string(),
    );
    fam(
        "ai_inferd_model_batch_size",
        "histogram",
        "Requests per dispatched batch.",
    )
    .header(&mut out);
    for s in m {
        write_batch_histogram(
            &mut out,
            "ai_inferd_model_batch_size",
            &ml(s),
            &s.stats.batch_sizes,
        );
    }
    fam(
        "ai_inferd_model_queue_seconds",
        "histogram",
        "Time from arrival to dispatch.",
    )
    .header(&mut out);
    for s in m {
        write_latency_histogram(
            &mut out,
            "ai_inferd_model_queue_seconds",
            &ml(s),
            &s.stats.queue,
        );
    }
    fam(
        "ai_inferd_model_compute_seconds",
        "histogram",
        "Compute time per batch.",
    )
    .header(&mut out);
    for s in m {
        write_latency_histogram(
            &mut out,
            "ai_inferd_model_compute_seconds",
            &ml(s),
            &s.stats.compute,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_since_a_snapshot_holds_only_the_later_samples() {
        let mut h = Histogram::default();
        h.record(3_000);
        h.record(900_000);
        let snapshot = h.clone();
        h.record(5_000);
        let window = h.since(&snapshot);
        assert_eq!((window.count, window.sum_ns), (1, 5_000));
        assert_eq!(window.quantile_upper_ns(1.0), Some(8_000));
        assert_eq!(h.quantile_upper_ns(1.0), Some(1_024_000));
    }

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn sample() -> SchedulerStats {
        let mut stats = TenantStats {
            requests: 7,
            admitted: 5,
            busy_ns: 1_500_000_000,
            ..TenantStats::default()
        };
        stats.rejected[Reject::Throttled.index()] = 2;
        stats.queue.record(500); // bucket 0 (< 1 µs)
        stats.queue.record(3_000); // bucket 2 (2..4 µs)
        stats.queue.record(3_500);
        let mut model = ModelStats::default();
        model.batch_sizes.record(1);
        model.batch_sizes.record(3);
        model.batch_sizes.record(300);
        SchedulerStats {
            tenants: vec![TenantSnapshot {
                tenant: TenantId(4),
                weight: 2,
                priority_ceiling: PriorityClass::Normal,
                max_in_flight: 8,
                queued: 1,
                in_flight: 3,
                stats,
            }],
            models: vec![ModelSnapshot {
                model: 9,
                queued: 1,
                estimate_batch1_ns: None,
                deadline_margin_ns: 0,
                stats: model,
            }],
        }
    }

    #[test]
    fn histogram_quantiles_report_bucket_upper_bounds() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_upper_ns(0.5), None);
        for _ in 0..98 {
            h.record(1_500); // bucket 1: [1, 2) µs
        }
        h.record(100_000); // bucket 7: [64, 128) µs
        h.record(100_000);
        assert_eq!(h.quantile_upper_ns(0.5), Some(2_000));
        assert_eq!(h.quantile_upper_ns(0.98), Some(2_000));
        assert_eq!(h.quantile_upper_ns(0.99), Some(128_000));
        assert_eq!(h.count, 100);
        assert_eq!(h.sum_ns, 98 * 1_500 + 200_000);
    }

    #[test]
    fn batch_sizes_land_in_power_of_two_buckets() {
        let mut h = BatchSizeHistogram::default();
        for size in [1, 2, 3, 4, 5, 128, 129] {
            h.record(size);
        }
        assert_eq!(h.buckets, [1, 1, 2, 1, 0, 0, 0, 1, 1]);
        assert_eq!(h.sum, 1 + 2 + 3 + 4 + 5 + 128 + 129);
    }

    #[test]
    fn jain_index_is_one_for_equal_and_one_over_n_for_monopoly() {
        assert!((jain_index(&[2.0, 2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn prometheus_text_has_counters_by_reason_and_cumulative_histograms() {
        let text = render_prometheus(&sample());
        assert_eq!(
            value_of(&text, "ai_inferd_tenant_requests_total{tenant=\"4\"}"),
            Some(7.0)
        );
        assert_eq!(
            value_of(
                &text,
                "ai_inferd_tenant_rejected_total{tenant=\"4\",reason=\"throttled\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value_of(
                &text,
                "ai_inferd_tenant_rejected_total{tenant=\"4\",reason=\"deadline\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value_of(
                &text,
                "ai_inferd_tenant_accelerator_seconds_total{tenant=\"4\"}"
            ),
            Some(1.5)
        );
        let q = "ai_inferd_tenant_queue_seconds";
        assert_eq!(
            value_of(
                &text,
                &format!("{q}_bucket{{tenant=\"4\",le=\"0.000001\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(
                &text,
                &format!("{q}_bucket{{tenant=\"4\",le=\"0.000002\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(
                &text,
                &format!("{q}_bucket{{tenant=\"4\",le=\"0.000004\"}}")
            ),
            Some(3.0)
        );
        assert_eq!(
            value_of(&text, &format!("{q}_bucket{{tenant=\"4\",le=\"+Inf\"}}")),
            Some(3.0)
        );
        assert_eq!(
            value_of(&text, &format!("{q}_count{{tenant=\"4\"}}")),
            Some(3.0)
        );
        assert_eq!(
            value_of(&text, &format!("{q}_sum{{tenant=\"4\"}}")),
            Some(7e-6)
        );
        let b = "ai_inferd_model_batch_size";
        assert_eq!(
            value_of(&text, &format!("{b}_bucket{{model=\"9\",le=\"4\"}}")),
            Some(2.0)
        );
        assert_eq!(
            value_of(&text, &format!("{b}_bucket{{model=\"9\",le=\"128\"}}")),
            Some(2.0)
        );
        assert_eq!(
            value_of(&text, &format!("{b}_bucket{{model=\"9\",le=\"+Inf\"}}")),
            Some(3.0)
        );
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let text = render_prometheus(&sample());
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(
                    typed.insert(name.to_string()),
                    "family {name} declared twice"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "sample {name} before its TYPE line");
        }
    }
}
