//! The request and response bodies of the control API, in Firecracker's JSON shapes
//! (swagger `firecracker.yaml`, API version 1.17.0-dev), plus aivmm's own extensions.
//!
//! Every body type denies unknown fields, so a misspelt or unsupported field is a 400
//! naming it rather than a setting silently dropped. Fields Firecracker defines but aivmm
//! cannot honour are declared, so that [`super::convert`] can refuse them with a message
//! that says why.

use std::path::PathBuf;

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `huge_pages` of the machine configuration.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages, no transparent hugepages.
    #[default]
    None,
    /// 4 KiB pages with `MADV_HUGEPAGE`.
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /machine-config` (all of it) and the answer of `GET /machine-config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Declared to be refused by name: aivmm has no CPU templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<serde_json::Value>,
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    #[serde(default)]
    pub vcpu_count: Option<u64>,
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
    #[serde(default)]
    pub cpu_template: Option<serde_json::Value>,
}

/// `cache_type` of a drive.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// `io_engine` of a drive.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user-block's backend socket; declared to be refused by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored (there is one vsock device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `level` of the logger (case-insensitive in Firecracker: both spellings accepted).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum LogLevel {
    #[serde(alias = "error", alias = "ERROR")]
    Error,
    #[serde(alias = "warning", alias = "WARNING", alias = "Warn", alias = "warn")]
    Warning,
    #[default]
    #[serde(alias = "info", alias = "INFO")]
    Info,
    #[serde(alias = "debug", alias = "DEBUG")]
    Debug,
    #[serde(alias = "trace", alias = "TRACE")]
    Trace,
    #[serde(alias = "off", alias = "OFF")]
    Off,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default)]
    pub level: LogLevel,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    /// Declared to be refused by name: aivmm does not filter by module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
    /// Add the instance id as a top-level `id` field on each line.
    #[serde(default)]
    pub emit_id: bool,
    /// Operator key-value pairs emitted under `properties` on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// `action_type` of `PUT /actions`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `state` of `PATCH /vm`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    pub state: VmStateRequest,
}

/// The instance's state as `GET /` reports it.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// `GET /version`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `PUT /ai-infer` (aivmm extension): the `[ai_infer]` TOML section.
pub type AiInfer = crate::config::AiInferConfig;

/// `PUT /passthrough/{id}` (aivmm extension): one `[[passthrough]]` entry, with the id the
/// API uses to name it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Passthrough {
    pub id: String,
    /// The host device: a PCI address (`0000:81:00.0`) or its sysfs directory.
    pub device: String,
    #[serde(default = "default_true")]
    pub mmap: bool,
}

fn default_true() -> bool {
    true
}

/// `PUT /memory-zones/{id}` (aivmm extension): one `[[memory.zones]]` entry.
pub type MemoryZone = crate::config::MemoryZoneConfig;

/// Firecracker's `--config-file` and `GET /vm/config`: every resource at once. The
/// extension keys are aivmm's own and optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// aivmm extension: the ai_infer device.
    #[serde(rename = "ai-infer", default, skip_serializing_if = "Option::is_none")]
    pub ai_infer: Option<AiInfer>,
    /// aivmm extension: host PCI devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<Passthrough>,
    /// aivmm extension: guest RAM as explicit zones (replaces `mem_size_mib`'s one zone).
    #[serde(
        rename = "memory-zones",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub memory_zones: Vec<MemoryZone>,
}
