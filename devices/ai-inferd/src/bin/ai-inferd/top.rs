//! `ai-inferd top`: a live terminal view of a daemon's metrics endpoint.
//!
//! It scrapes the Prometheus text ([`ai_inferd::metrics::fetch`]), and between two
//! scrapes shows per tenant the share of accelerator time against its fair share
//! by weight, what is in flight, rejections by reason, and p50/p99 of queue and
//! compute time from the histograms; per model the mean batch size and the
//! throughput. The first frame (and `--once`) covers everything since the tenants
//! connected; later frames cover the last interval. Frames are redrawn in place
//! with two ANSI sequences (home, clear); `--once` prints one frame without them.
//!
//! Quantiles are the upper bound of the histogram bucket holding them (buckets are
//! powers of two of microseconds), printed as `<2ms`.

use std::fmt::Write as _;
use std::time::Duration;

use ai_inferd::metrics::scrape::Scrape;

/// `now - before` of a counter (a reset, i.e. a reconnect, counts from 0).
fn delta(now: f64, before: Option<f64>) -> f64 {
    match before {
        Some(b) if b <= now => now - b,
        _ => now,
    }
}

/// Upper bound of the bucket holding quantile `q` of cumulative `buckets` (already
/// a difference of two scrapes or not); `None` when empty.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = (q * total).ceil().max(1.0);
    buckets.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
}

fn bucket_delta(now: &[(f64, f64)], before: Option<&[(f64, f64)]>) -> Vec<(f64, f64)> {
    now.iter()
        .map(|(le, c)| {
            let b = before.and_then(|bs| bs.iter().find(|(l, _)| l == le).map(|(_, c)| *c));
            (*le, delta(*c, b))
        })
        .collect()
}

/// One tenant's line.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantRow {
    /// Name.
    pub name: String,
    /// VMM connected.
    pub connected: bool,
    /// Weight.
    pub weight: f64,
    /// Share of the accelerator time used in the window.
    pub share: f64,
    /// Weight / sum of the weights of the tenants active in the window.
    pub fair: Option<f64>,
    /// Queued or running now.
    pub in_flight: f64,
    /// Requests completed per second.
    pub done_per_s: f64,
    /// Refused at submission or dropped from the queue: throttled, queue full,
    /// deadline (rejected + dropped), cancelled (dropped).
    pub refused: [f64; 4],
    /// p50 and p99 queue time (bucket upper bounds), seconds.
    pub queue: (Option<f64>, Option<f64>),
    /// p50 and p99 compute time, seconds.
    pub compute: (Option<f64>, Option<f64>),
}

/// One model's line.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRow {
    /// Name.
    pub name: String,
    /// Queued now.
    pub queued: f64,
    /// Requests completed per second.
    pub done_per_s: f64,
    /// Mean batch size in the window.
    pub batch_mean: Option<f64>,
    /// Accelerator seconds used per second.
    pub busy: f64,
}

/// What one frame shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The window's length, or `None` for "since start".
    pub window: Option<Duration>,
    /// Tenants, in the endpoint's order.
    pub tenants: Vec<TenantRow>,
    /// Models, in the endpoint's order.
    pub models: Vec<ModelRow>,
}

/// The frame for `now`, as differences from `before` over `window` (or since start).
pub fn frame(now: &Scrape, before: Option<&Scrape>, window: Option<Duration>) -> Frame {
    let per_s = |v: f64| match window {
        Some(w) if w.as_secs_f64() > 0.0 => v / w.as_secs_f64(),
        _ => {
            // Since start: rates over the tenants' uptime are not known; show totals.
            v
        }
    };
    let counter = |name: &str, labels: &[(&str, &str)]| {
        let n = now.get(name, labels).unwrap_or(0.0);
        delta(n, before.and_then(|b| b.get(name, labels)))
    };
    let hist = |name: &str, key: (&str, &str)| {
        let n = now.buckets(name, key);
        let b = before.map(|b| b.buckets(name, key));
        bucket_delta(&n, b.as_deref())
    };
    let names = now.label_values("ai_inferd_tenant_weight", "tenant");
    let busy: Vec<f64> = names
        .iter()
        .map(|t| {
            counter(
                "ai_inferd_tenant_accelerator_seconds_total",
                &[("tenant", t)],
            )
        })
        .collect();
    let total_busy: f64 = busy.iter().sum();
    let weights: Vec<f64> = names
        .iter()
        .map(|t| {
            now.get("ai_inferd_tenant_weight", &[("tenant", t)])
                .unwrap_or(1.0)
        })
        .collect();
    let in_flight: Vec<f64> = names
        .iter()
        .map(|t| {
            now.get("ai_inferd_tenant_in_flight", &[("tenant", t)])
                .unwrap_or(0.0)
        })
        .collect();
    let active: Vec<bool> = busy
        .iter()
        .zip(&in_flight)
        .map(|(b, f)| *b > 0.0 || *f > 0.0)
        .collect();
    let active_weight: f64 = weights
        .iter()
        .zip(&active)
        .filter(|(_, a)| **a)
        .map(|(w, _)| w)
        .sum();
    let tenants = names
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let l = [("tenant", t.as_str())];
            let reason = |r: &str| {
                let with = [("tenant", t.as_str()), ("reason", r)];
                counter("ai_inferd_tenant_rejected_total", &with)
                    + counter("ai_inferd_tenant_dropped_total", &with)
            };
            let queue = hist("ai_inferd_tenant_queue_seconds", ("tenant", t));
            let compute = hist("ai_inferd_tenant_compute_seconds", ("tenant", t));
            TenantRow {
                name: t.clone(),
                connected: now.get("ai_inferd_tenant_connected", &l).unwrap_or(0.0) > 0.0,
                weight: weights[i],
                share: if total_busy > 0.0 {
                    busy[i] / total_busy
                } else {
                    0.0
                },
                fair: (active[i] && active_weight > 0.0).then(|| weights[i] / active_weight),
                in_flight: in_flight[i],
                done_per_s: per_s(counter("ai_inferd_tenant_completed_total", &l)),
                refused: [
                    reason("throttled"),
                    reason("queue_full"),
                    reason("deadline"),
                    reason("cancelled"),
                ],
                queue: (quantile(&queue, 0.5), quantile(&queue, 0.99)),
                compute: (quantile(&compute, 0.5), quantile(&compute, 0.99)),
            }
        })
        .collect();
    let models = now
        .label_values("ai_inferd_model_queued", "model")
        .iter()
        .map(|m| {
            let l = [("model", m.as_str())];
            let batches = counter("ai_inferd_model_batch_size_count", &l);
            let sizes = counter("ai_inferd_model_batch_size_sum", &l);
            ModelRow {
                name: m.clone(),
                queued: now.get("ai_inferd_model_queued", &l).unwrap_or(0.0),
                done_per_s: per_s(counter("ai_inferd_model_completed_total", &l)),
                batch_mean: (batches > 0.0).then(|| sizes / batches),
                busy: per_s(counter("ai_inferd_model_busy_seconds_total", &l)),
            }
        })
        .collect();
    Frame {
        window,
        tenants,
        models,
    }
}

/// A bucket bound as `<2ms`, `<512us`, `<1.0s`; `-` for none; `>1s` style for +Inf.
fn bound(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s.is_infinite() => "inf".into(),
        Some(s) if s < 1e-3 => format!("<{:.0}us", s * 1e6),
        Some(s) if s < 1.0 => format!("<{:.0}ms", s * 1e3),
        Some(s) => format!("<{s:.1}s"),
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The frame as text; `ansi` redraws in place (home, clear screen).
pub fn render(frame: &Frame, source: &str, ansi: bool) -> String {
    let mut out = String::new();
    if ansi {
        out.push_str("\x1b[H\x1b[2J");
    }
    let (window, rate) = match frame.window {
        Some(w) => (format!("last {:.1} s", w.as_secs_f64()), "/s"),
        None => ("since the tenants connected".to_owned(), " total"),
    };
    let _ = writeln!(out, "ai-inferd top  {source}  ({window})");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>4} {:>6} {:>7} {:>7} {:>6} {:>10} {:>17} {:>15} {:>15}",
        "TENANT",
        "CONN",
        "WEIGHT",
        "SHARE",
        "FAIR",
        "INFL",
        format!("DONE{rate}"),
        "THR/FULL/DL/CANC",
        "QUEUE p50/p99",
        "COMPUTE p50/p99"
    );
    for t in &frame.tenants {
        let refused = t
            .refused
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:>6} {:>7} {:>7} {:>6} {:>10.1} {:>17} {:>15} {:>15}",
            t.name.chars().take(16).collect::<String>(),
            if t.connected { "yes" } else { "no" },
            format!("{:.0}", t.weight),
            percent(Some(t.share)),
            percent(t.fair),
            format!("{:.0}", t.in_flight),
            t.done_per_s,
            refused,
            format!("{}/{}", bound(t.queue.0), bound(t.queue.1)),
            format!("{}/{}", bound(t.compute.0), bound(t.compute.1)),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>10} {:>10} {:>12}",
        "MODEL",
        "QUEUED",
        format!("DONE{rate}"),
        "BATCH MEAN",
        format!("BUSY s{rate}")
    );
    for m in &frame.models {
        let _ = writeln!(
            out,
            "{:<16} {:>7.0} {:>10.1} {:>10} {:>12.3}",
            m.name.chars().take(16).collect::<String>(),
            m.queued,
            m.done_per_s,
            m.batch_mean.map_or("-".into(), |b| format!("{b:.2}")),
            m.busy
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_infer_protocol::PriorityClass;
    use ai_infer_scheduler::{
        render_prometheus_named, ModelSnapshot, ModelStats, SchedulerStats, SeriesNames, TenantId,
        TenantSnapshot, TenantStats,
    };
    use ai_inferd::metrics::scrape::ScrapeError;

    fn tenant(id: u32, weight: u32, busy_ms: u64, completed: u64, queue_us: u64) -> TenantSnapshot {
        let mut stats = TenantStats {
            busy_ns: busy_ms * 1_000_000,
            completed,
            ..TenantStats::default()
        };
        for _ in 0..completed {
            stats.queue.record(queue_us * 1000);
            stats.compute.record(3_000_000);
        }
        stats.rejected[ai_infer_scheduler::Reject::Throttled.index()] = id as u64;
        TenantSnapshot {
            tenant: TenantId(id),
            weight,
            priority_ceiling: PriorityClass::Normal,
            max_in_flight: 8,
            queued: 0,
            in_flight: 2,
            stats,
        }
    }

    fn scrape(tenants: Vec<TenantSnapshot>, batches: &[usize]) -> Scrape {
        let mut model = ModelStats::default();
        for b in batches {
            model.batch_sizes.record(*b);
            model.completed += *b as u64;
        }
        let stats = SchedulerStats {
            tenants,
            models: vec![ModelSnapshot {
                model: 3,
                queued: 4,
                estimate_batch1_ns: Some(1_000_000),
                deadline_margin_ns: 0,
                stats: model,
            }],
        };
        let mut names = SeriesNames::default();
        names.tenants.insert(TenantId(1), "vm-a".into());
        names.tenants.insert(TenantId(2), "vm \"b\"".into());
        names.models.insert(3, "minilm".into());
        Scrape::parse(&render_prometheus_named(&stats, &names)).unwrap()
    }

    #[test]
    fn parses_the_daemons_text_with_escaped_labels() {
        let s = scrape(
            vec![tenant(1, 1, 10, 5, 100), tenant(2, 3, 30, 5, 100)],
            &[2],
        );
        assert_eq!(
            s.get("ai_inferd_tenant_weight", &[("tenant", "vm \"b\"")]),
            Some(3.0)
        );
        assert_eq!(
            s.label_values("ai_inferd_tenant_weight", "tenant"),
            vec!["vm-a", "vm \"b\""]
        );
        assert_eq!(
            s.get(
                "ai_inferd_tenant_rejected_total",
                &[("tenant", "vm-a"), ("reason", "throttled")]
            ),
            Some(1.0)
        );
        assert_eq!(
            Scrape::parse("ok 1\nbad line here\n"),
            Err(ScrapeError::Parse {
                line: 2,
                text: "bad line here".into()
            })
        );
    }

    #[test]
    fn shares_quantiles_and_batch_means_over_a_window() {
        let before = scrape(
            vec![tenant(1, 1, 10, 4, 100), tenant(2, 3, 30, 4, 100)],
            &[2, 2],
        );
        // In the window: a got 10 ms, b 30 ms; b's requests waited ~5 ms.
        let now = scrape(
            vec![tenant(1, 1, 20, 8, 100), tenant(2, 3, 60, 104, 5_000)],
            &[2, 2, 4, 4, 4],
        );
        let f = frame(&now, Some(&before), Some(Duration::from_secs(2)));
        let (a, b) = (&f.tenants[0], &f.tenants[1]);
        assert!((a.share - 0.25).abs() < 1e-9 && (b.share - 0.75).abs() < 1e-9);
        assert_eq!((a.fair, b.fair), (Some(0.25), Some(0.75)));
        assert_eq!((a.done_per_s, b.done_per_s), (2.0, 50.0));
        // b: 100 new samples at 5 ms → bucket [4.096, 8.192) ms.
        assert_eq!(b.queue.1, Some(0.008192));
        assert_eq!(a.queue.0, Some(0.000128));
        assert_eq!(a.refused, [0.0; 4]);
        let m = &f.models[0];
        assert_eq!(m.batch_mean, Some(4.0));
        assert_eq!(m.done_per_s, 6.0);
        // Since start (no previous scrape): totals, and the counters as they are.
        let f = frame(&now, None, None);
        assert_eq!(f.tenants[0].refused[0], 1.0);
        assert_eq!(f.models[0].batch_mean, Some(16.0 / 5.0));
        let text = render(&f, "test", false);
        assert!(!text.contains('\x1b'));
        assert!(text.contains("since the tenants connected"), "{text}");
        let line = text.lines().find(|l| l.starts_with("vm-a")).unwrap();
        assert!(line.contains("25.0%"), "{line}");
        assert!(render(&f, "test", true).starts_with("\x1b[H\x1b[2J"));
    }

    #[test]
    fn quantiles_pick_the_bucket_upper_bound() {
        let b = [
            (0.001, 50.0),
            (0.002, 99.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        assert_eq!(quantile(&b, 0.99), Some(0.002));
        assert_eq!(quantile(&b, 1.0), Some(0.004));
        assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
        assert_eq!(bound(Some(0.000512)), "<512us");
        assert_eq!(bound(Some(0.004096)), "<4ms");
    }
}
