//! The server's own counters, in the Prometheus text format: requests by endpoint and
//! status code, requests in flight, a latency histogram per endpoint, bytes in and
//! out, connections, and device statuses of inference requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (b, le) in self.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// The counters. All methods may be called from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    device_status: Mutex<BTreeMap<&'static str, u64>>,
    in_flight: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    connections_refused: AtomicU64,
    connections_open: AtomicI64,
}

/// Counts one request in flight until dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one open connection until dropped.
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// A request starts.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// A request ended with `status` after `elapsed`, having read `bytes_in` and
    /// written `bytes_out` bytes of HTTP.
    pub fn record(
        &self,
        endpoint: &'static str,
        status: u16,
        elapsed: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint, status))
            .or_default() += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint)
            .or_default()
            .observe(elapsed.as_secs_f64());
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    /// An inference request reached the device and ended with `status` (its name).
    pub fn device_status(&self, status: &'static str) {
        *self
            .device_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// A connection was accepted and is served.
    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// A connection was refused (too many open).
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted for `endpoint` with `status` so far.
    pub fn requests(&self, endpoint: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((e, s), _)| *e == endpoint && *s == status)
            .map(|(_, n)| *n)
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let o = &mut out;
        let _ = writeln!(
            o,
            "# HELP ai_agent_http_requests_total HTTP requests by endpoint and status code."
        );
        let _ = writeln!(o, "# TYPE ai_agent_http_requests_total counter");
        for ((endpoint, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "ai_agent_http_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP ai_agent_http_requests_in_flight HTTP requests being served."
        );
        let _ = writeln!(o, "# TYPE ai_agent_http_requests_in_flight gauge");
        let _ = writeln!(
            o,
            "ai_agent_http_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(o, "# HELP ai_agent_http_request_duration_seconds Time from a complete request to its response.");
        let _ = writeln!(o, "# TYPE ai_agent_http_request_duration_seconds histogram");
        for (endpoint, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(o, "ai_agent_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(o, "ai_agent_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(
                o,
                "ai_agent_http_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {}",
                h.sum_seconds
            );
            let _ = writeln!(
                o,
                "ai_agent_http_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {}",
                h.count
            );
        }
        for (name, help, v) in [
            (
                "ai_agent_http_request_bytes_total",
                "Bytes of HTTP requests read (heads and bodies).",
                self.bytes_in.load(Ordering::Relaxed),
            ),
            (
                "ai_agent_http_response_bytes_total",
                "Bytes of HTTP response bodies written.",
                self.bytes_out.load(Ordering::Relaxed),
            ),
            (
                "ai_agent_http_connections_total",
                "Connections accepted and served.",
                self.connections.load(Ordering::Relaxed),
            ),
            (
                "ai_agent_http_connections_refused_total",
                "Connections refused because too many were open.",
                self.connections_refused.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP ai_agent_http_connections_open Connections being served."
        );
        let _ = writeln!(o, "# TYPE ai_agent_http_connections_open gauge");
        let _ = writeln!(
            o,
            "ai_agent_http_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP ai_agent_device_requests_total Inference requests by the device's status."
        );
        let _ = writeln!(o, "# TYPE ai_agent_device_requests_total counter");
        for (status, n) in self
            .device_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "ai_agent_device_requests_total{{status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_and_histograms_render() {
        let m = Metrics::default();
        {
            let _a = m.start();
            let _b = m.start();
            assert_eq!(
                value(&m.render(), "ai_agent_http_requests_in_flight"),
                Some(2.0)
            );
        }
        m.record("infer", 200, Duration::from_millis(3), 100, 50);
        m.record("infer", 200, Duration::from_millis(30), 10, 5);
        m.record("infer", 400, Duration::from_micros(10), 7, 3);
        m.device_status("OK");
        let _c = m.connection_opened();
        m.connection_refused();
        let t = m.render();
        assert_eq!(value(&t, "ai_agent_http_requests_in_flight"), Some(0.0));
        assert_eq!(
            value(
                &t,
                "ai_agent_http_requests_total{endpoint=\"infer\",code=\"200\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "ai_agent_http_requests_total{endpoint=\"infer\",code=\"400\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "ai_agent_http_request_duration_seconds_bucket{endpoint=\"infer\",le=\"0.005\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "ai_agent_http_request_duration_seconds_bucket{endpoint=\"infer\",le=\"0.05\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                &t,
                "ai_agent_http_request_duration_seconds_count{endpoint=\"infer\"}"
            ),
            Some(3.0)
        );
        let sum = value(
            &t,
            "ai_agent_http_request_duration_seconds_sum{endpoint=\"infer\"}",
        )
        .unwrap();
        assert!((sum - 0.03301).abs() < 1e-9, "{sum}");
        assert_eq!(value(&t, "ai_agent_http_request_bytes_total"), Some(117.0));
        assert_eq!(value(&t, "ai_agent_http_response_bytes_total"), Some(58.0));
        assert_eq!(value(&t, "ai_agent_http_connections_open"), Some(1.0));
        assert_eq!(
            value(&t, "ai_agent_http_connections_refused_total"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "ai_agent_device_requests_total{status=\"OK\"}"),
            Some(1.0)
        );
        assert_eq!(m.requests("infer", 200), 2);
        // Every sample line is `name{labels} value` or `name value`.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
