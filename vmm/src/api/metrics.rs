//! Metrics: Firecracker-shaped JSON lines in the file `PUT /metrics` names (written every
//! 60 s and on `FlushMetrics`), and the same counters in Prometheus text for
//! `GET /metrics/prometheus`.
//!
//! Counters are named `group.field`; a JSON line holds, per group, what each counter
//! gained since the previous line (Firecracker's incremental metrics), while Prometheus
//! gets the totals. Values that are not counts (start-up times) are written as they are.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::types::Metrics;

/// How often the metrics file gets a line without being asked.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counters by `group.field`.
pub type Counters = BTreeMap<String, u64>;

/// Groups whose values are written as they are, not as increments.
const GAUGE_GROUPS: &[&str] = &["api_server"];

/// The process-wide counters (vCPU exits) added to the control plane's own.
pub fn with_process_counters(mut counters: Counters) -> Counters {
    for (name, n) in crate::vcpu::exit_totals() {
        counters.insert(format!("vcpu.{name}"), n);
    }
    counters
}

/// The open metrics file and what the last line reported.
pub struct MetricsSink {
    pub config: Metrics,
    file: File,
    last: Counters,
}

impl MetricsSink {
    /// Opens (creating if needed) the file or named pipe for appending.
    pub fn open(config: &Metrics) -> Result<Self, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.metrics_path)
            .map_err(|e| {
                format!(
                    "cannot open metrics_path {}: {e}",
                    config.metrics_path.display()
                )
            })?;
        Ok(MetricsSink {
            config: config.clone(),
            file,
            last: Counters::new(),
        })
    }

    /// Writes one line: each counter's increase since the last line.
    pub fn flush(&mut self, id: &str, counters: &Counters) -> Result<(), String> {
        let line = json_line(id, &self.config, counters, &self.last);
        self.last = counters.clone();
        writeln!(self.file, "{line}")
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                format!(
                    "cannot write metrics to {}: {e}",
                    self.config.metrics_path.display()
                )
            })
    }
}

fn json_line(id: &str, config: &Metrics, now: &Counters, last: &Counters) -> String {
    let mut root = Map::new();
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    root.insert("utc_timestamp_ms".into(), Value::from(ms));
    if config.emit_id {
        root.insert("id".into(), Value::from(id));
    }
    if let Some(props) = &config.properties {
        let map: Map<String, Value> = props
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        root.insert("properties".into(), Value::Object(map));
    }
    for (name, value) in now {
        let (group, field) = name.split_once('.').unwrap_or(("vmm", name));
        let reported = if GAUGE_GROUPS.contains(&group) {
            *value
        } else {
            value.saturating_sub(last.get(name).copied().unwrap_or(0))
        };
        let entry = root
            .entry(group.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(field.to_string(), Value::from(reported));
        }
    }
    Value::Object(root).to_string()
}

/// The counters in Prometheus' text format, each `aivmm_<group>_<field>`.
pub fn prometheus(counters: &Counters) -> String {
    let mut out = String::new();
    for (name, value) in counters {
        let (group, field) = name.split_once('.').unwrap_or(("vmm", name));
        let metric = format!("aivmm_{group}_{field}");
        let kind = if GAUGE_GROUPS.contains(&group) {
            "gauge"
        } else {
            "counter"
        };
        out.push_str(&format!("# TYPE {metric} {kind}\n{metric} {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_report_increments_by_group_and_gauges_as_they_are() {
        let cfg = Metrics {
            metrics_path: "/unused".into(),
            emit_id: true,
            properties: Some([("tenant".to_string(), "t1".to_string())].into()),
        };
        let mut now = Counters::new();
        now.insert("put_api_requests.drive_count".into(), 5);
        now.insert("api_server.process_startup_time_us".into(), 900);
        let mut last = Counters::new();
        last.insert("put_api_requests.drive_count".into(), 3);
        let v: Value = serde_json::from_str(&json_line("vm1", &cfg, &now, &last)).unwrap();
        assert_eq!(v["put_api_requests"]["drive_count"], 2);
        assert_eq!(v["api_server"]["process_startup_time_us"], 900);
        assert_eq!(v["id"], "vm1");
        assert_eq!(v["properties"]["tenant"], "t1");
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
    }

    #[test]
    fn prometheus_text_has_a_type_line_per_series() {
        let mut c = Counters::new();
        c.insert("vcpu.exit_io_out".into(), 7);
        c.insert("api_server.process_startup_time_us".into(), 1);
        let text = prometheus(&c);
        assert!(text.contains("# TYPE aivmm_vcpu_exit_io_out counter\naivmm_vcpu_exit_io_out 7\n"));
        assert!(text.contains("# TYPE aivmm_api_server_process_startup_time_us gauge\n"));
    }
}
