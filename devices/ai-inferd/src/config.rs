//! The daemon's TOML configuration: where the models are, how many executors run
//! where, and one `[[tenant]]` entry per VM that may connect.
//!
//! A tenant is bound to the unix socket its VMM connects to; everything the daemon
//! grants a VM (weight, priority ceiling, models, quotas) comes from that entry, never
//! from the guest. The file is parsed and validated as a whole, at start-up and at
//! each reload (SIGHUP); see `reload` for what a reload may change.
//!
//! ```toml
//! [daemon]
//! models = "/etc/aivmm/models.toml"
//! metrics_socket = "/run/ai-inferd/metrics.sock"
//! executor_threads = 2
//! numa_node = 0
//! reserved_executors = 1
//!
//! [[tenant]]
//! name = "vm-a"
//! socket = "/run/ai-inferd/vm-a.sock"
//! weight = 2
//! priority_ceiling = "interactive"
//! allowed_models = ["minilm"]
//! max_in_flight = 32
//! rate_rps = 200.0
//! burst = 50
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ai_infer_protocol::{PriorityClass, MAX_REQUEST_QUEUES};
use ai_infer_scheduler::{ClassPolicy, TenantPolicy, DEFAULT_MAX_QUEUE};
use serde::Deserialize;
use thiserror::Error;

use crate::metrics::MetricsEndpoint;

/// Why the configuration cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config at line {line}: {message}")]
    Parse {
        /// 1-based line of the offending item (0 if unknown).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No `[[tenant]]` entry.
    #[error("no [[tenant]] entry: the daemon would serve nobody")]
    NoTenants,
    /// Two tenants share a name.
    #[error("tenant name {0:?} is used twice")]
    DuplicateName(String),
    /// Two tenants share a socket path.
    #[error("socket {0} is used by two tenants")]
    DuplicateSocket(PathBuf),
    /// A tenant name is empty or unusable in logs.
    #[error("tenant name {0:?} must be 1-64 characters of [A-Za-z0-9._-]")]
    BadName(String),
    /// A numeric field is out of its range.
    #[error("tenant {tenant:?}: {field} = {value} is out of range ({range})")]
    OutOfRange {
        /// The tenant.
        tenant: String,
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        range: &'static str,
    },
    /// `allowed_models` mixes `"*"` with names, or lists a name twice, or is empty.
    #[error("tenant {tenant:?}: allowed_models {reason}")]
    BadAllowedModels {
        /// The tenant.
        tenant: String,
        /// What is wrong.
        reason: String,
    },
    /// `executor_threads` is 0 or unreasonably large.
    #[error("daemon.executor_threads = {0} is out of range (1-256)")]
    ExecutorThreads(u32),
    /// `executor_cpus` lists a CPU number the kernel cannot address.
    #[error("daemon.executor_cpus contains {0}, beyond the highest CPU number {max}", max = libc::CPU_SETSIZE - 1)]
    ExecutorCpu(u32),
    /// `handshake_timeout_ms` is 0 or beyond [`MAX_HANDSHAKE_TIMEOUT_MS`].
    #[error("daemon.handshake_timeout_ms = {0} is out of range (1-{MAX_HANDSHAKE_TIMEOUT_MS})")]
    HandshakeTimeout(u64),
    /// Both `numa_node` and `executor_numa_nodes` are set.
    #[error("daemon.numa_node and daemon.executor_numa_nodes are both set; use one")]
    NumaTwice,
    /// A class wait bound beyond [`MAX_CLASS_WAIT_MS`].
    #[error(
        "daemon.max_wait_ms.{class} = {value} is out of range (0 for no bound, or 1-{MAX_CLASS_WAIT_MS})"
    )]
    ClassWait {
        /// The class's name.
        class: &'static str,
        /// The value given.
        value: u64,
    },
    /// The tenants' guaranteed shares of a model queue add up to more than it holds.
    #[error(
        "tenant {tenant:?}: the queue shares (max_queued_per_model) of the tenants up to \
         this one add up to {total}, above the {queue} requests a model queue holds"
    )]
    QueueShares {
        /// The first tenant whose share does not fit.
        tenant: String,
        /// The shares up to and including that tenant.
        total: u64,
        /// The model queue size.
        queue: u32,
    },
    /// A tenant's `max_in_flight` cannot be reached within its queue shares.
    #[error(
        "tenant {tenant:?}: max_in_flight = {max_in_flight} cannot be honoured: it may \
         queue at most {share} requests (max_queued_per_model) on each of its {models} \
         model(s); lower max_in_flight or raise max_queued_per_model"
    )]
    InFlightAboveShare {
        /// The tenant.
        tenant: String,
        /// Its `max_in_flight`.
        max_in_flight: u32,
        /// Its share of one model queue.
        share: u32,
        /// Models it may use (1 for `["*"]`).
        models: u32,
    },
    /// `reserved_executors` leaves no executor for the lower classes.
    #[error("daemon.reserved_executors = {reserved} must be below executor_threads = {threads}")]
    ReservedExecutors {
        /// Reserved executors asked for.
        reserved: u32,
        /// Executor threads.
        threads: u32,
    },
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Daemon-wide settings.
    pub daemon: DaemonSection,
    /// One entry per VM that may connect.
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantConfig>,
    /// The file this was loaded from ([`Config::load`]); a reload reads it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[daemon]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// The models manifest (read by `models::Manifest::read`). Relative paths are
    /// relative to the config file.
    pub models: PathBuf,
    /// Where the Prometheus metrics are served: a unix socket path, or
    /// `tcp:127.0.0.1:PORT` / `tcp:[::1]:PORT` (loopback only). Default: not served.
    #[serde(default)]
    pub metrics_socket: Option<MetricsEndpoint>,
    /// Executor threads (each runs one batch at a time). Default 1.
    #[serde(default = "default_executor_threads")]
    pub executor_threads: u32,
    /// CPUs to pin executors to: executor `i` runs on `executor_cpus[i % len]`.
    /// Overrides the NUMA settings. Default: empty.
    #[serde(default)]
    pub executor_cpus: Vec<u32>,
    /// The NUMA node of the accelerator (or of the memory the CPU backend uses):
    /// every executor is pinned to that node's CPUs. Default: none.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Per executor NUMA node: executor `i` is pinned to the CPUs of node
    /// `executor_numa_nodes[i % len]` (executors of devices on different nodes).
    /// Default: empty.
    #[serde(default)]
    pub executor_numa_nodes: Vec<u32>,
    /// Executors (the last ones) that run only requests of class
    /// `reserved_min_class` or higher, so those never wait behind a lower-class
    /// batch while a reserved executor is free. Must leave at least one executor
    /// unreserved. Default 0.
    #[serde(default)]
    pub reserved_executors: u32,
    /// Lowest class the reserved executors run. Default `"interactive"`.
    #[serde(default = "default_reserved_min_class")]
    pub reserved_min_class: PriorityName,
    /// Longest a request waits for a batch to fill, in microseconds. Default 0 (run
    /// whatever is queued as soon as an executor is free).
    #[serde(default)]
    pub max_batch_delay_us: u64,
    /// `[daemon.max_wait_ms]`: the starvation bound of each priority class.
    #[serde(default)]
    pub max_wait_ms: ClassWaitsMs,
    /// Longest a new connection to a tenant socket may take to reach the handshake
    /// milestone (GET_PROTOCOL_FEATURES), in milliseconds, 1–600000; a connection
    /// that does not is closed and the tenant's slot freed. Default 5000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

fn default_handshake_timeout_ms() -> u64 {
    5000
}

/// Longest `handshake_timeout_ms` accepted: ten minutes.
pub const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 600_000;

/// Longest a queued request of each class waits, in milliseconds, before it is
/// promoted ahead of every request still in time (0 = no bound: the class is only
/// ordered by priority). Defaults: batch 2000, normal 500, interactive 100, realtime 0.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassWaitsMs {
    /// `batch` class.
    pub batch: u64,
    /// `normal` class.
    pub normal: u64,
    /// `interactive` class.
    pub interactive: u64,
    /// `realtime` class (nothing ranks above it, so it needs no bound).
    pub realtime: u64,
}

/// The largest bound accepted: an hour. Longer is "never" in practice; say 0.
pub const MAX_CLASS_WAIT_MS: u64 = 3_600_000;

impl Default for ClassWaitsMs {
    fn default() -> Self {
        let ms =
            |class: usize| ClassPolicy::default().max_wait_ns[class].map_or(0, |ns| ns / 1_000_000);
        Self {
            batch: ms(0),
            normal: ms(1),
            interactive: ms(2),
            realtime: ms(3),
        }
    }
}

impl std::fmt::Display for ClassWaitsMs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = self.by_class().map(|(class, ms)| format!("{class} {ms}"));
        f.write_str(&parts.join(", "))
    }
}

impl ClassWaitsMs {
    /// By class wire value (batch = 0 … realtime = 3), with each class's name.
    fn by_class(&self) -> [(&'static str, u64); 4] {
        [
            ("batch", self.batch),
            ("normal", self.normal),
            ("interactive", self.interactive),
            ("realtime", self.realtime),
        ]
    }

    /// The scheduler's form of these bounds.
    pub fn policy(&self) -> ClassPolicy {
        ClassPolicy {
            max_wait_ns: self
                .by_class()
                .map(|(_, ms)| (ms > 0).then(|| ms.saturating_mul(1_000_000))),
        }
    }
}

fn default_reserved_min_class() -> PriorityName {
    PriorityName::Interactive
}

fn default_executor_threads() -> u32 {
    1
}

/// Which models a tenant may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedModels {
    /// `["*"]`: every model in the manifest.
    All,
    /// Only these model names.
    Named(Vec<String>),
}

impl AllowedModels {
    /// Whether the model called `name` is allowed.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            AllowedModels::All => true,
            AllowedModels::Named(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Priority ceiling as written in the file.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PriorityName {
    /// `"batch"`.
    Batch,
    /// `"normal"`.
    Normal,
    /// `"interactive"`.
    Interactive,
    /// `"realtime"`.
    Realtime,
}

impl From<PriorityName> for PriorityClass {
    fn from(p: PriorityName) -> Self {
        match p {
            PriorityName::Batch => PriorityClass::Batch,
            PriorityName::Normal => PriorityClass::Normal,
            PriorityName::Interactive => PriorityClass::Interactive,
            PriorityName::Realtime => PriorityClass::Realtime,
        }
    }
}

/// One `[[tenant]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name used in logs; unique.
    pub name: String,
    /// The unix socket this tenant's VMM connects to; unique. The daemon creates it
    /// (replacing a stale file).
    pub socket: PathBuf,
    /// Share of accelerator time relative to other tenants, ≥ 1. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Highest priority class this tenant gets. Default `"normal"`.
    #[serde(default = "default_ceiling")]
    pub priority_ceiling: PriorityName,
    /// Model names, or `["*"]` for all. Default: none (MODELS lists nothing).
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// INFER requests queued or running at once, 1–65536. Default 64.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Requests per second (token bucket); absent = unlimited.
    #[serde(default)]
    pub rate_rps: Option<f64>,
    /// Token bucket depth for `rate_rps`, ≥ 1. Default 32.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Accelerator-seconds per second; absent = unlimited.
    #[serde(default)]
    pub accel_share: Option<f64>,
    /// Request queues offered to the VM, 1–64. Default 1.
    #[serde(default = "default_queues")]
    pub num_request_queues: u16,
    /// INFER requests this tenant may have queued for any one model, 1–1024 (the
    /// model queue's size). Default: its weight's share of the queue,
    /// max(1, 1024 × weight / sum of all tenants' weights). The tenants' shares may
    /// add up to at most 1024, so no tenant can fill a queue against another.
    #[serde(default)]
    pub max_queued_per_model: Option<u32>,
    /// The `max_queued_per_model` in effect, set by [`Config::parse`] (0 before:
    /// no bound of its own).
    #[serde(skip)]
    pub queue_share: u32,
    /// The only uid whose VMM may connect (`SO_PEERCRED`); absent = any peer that can
    /// open the 0600 socket (the daemon's uid or root). A daemon running as root
    /// gives the socket to this uid/gid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The only gid whose VMM may connect; absent = any.
    #[serde(default)]
    pub gid: Option<u32>,
}

fn default_weight() -> u32 {
    1
}
fn default_ceiling() -> PriorityName {
    PriorityName::Normal
}
fn default_max_in_flight() -> u32 {
    64
}
fn default_burst() -> u32 {
    32
}
fn default_queues() -> u16 {
    1
}

/// Highest `max_in_flight` accepted: far above any sane value, low enough that
/// per-tenant bookkeeping stays small.
pub const MAX_IN_FLIGHT_LIMIT: u32 = 65536;

impl TenantConfig {
    /// The scheduler policy for this tenant.
    pub fn policy(&self) -> TenantPolicy {
        TenantPolicy {
            weight: self.weight,
            priority_ceiling: self.priority_ceiling.into(),
            max_in_flight: self.max_in_flight,
            rate_rps: self.rate_rps,
            burst: self.burst,
            accel_share: self.accel_share,
            max_queued_per_model: (self.queue_share > 0).then_some(self.queue_share),
            ..TenantPolicy::default()
        }
    }

    /// The parsed `allowed_models`.
    pub fn allowed(&self) -> AllowedModels {
        if self.allowed_models.iter().any(|m| m == "*") {
            AllowedModels::All
        } else {
            AllowedModels::Named(self.allowed_models.clone())
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        let range = |field, value: String, range| ConfigError::OutOfRange {
            tenant: self.name.clone(),
            field,
            value,
            range,
        };
        // The scheduling rules are the scheduler's own; the loader adds its limits.
        self.policy().validate().map_err(|e| {
            let (field, value, allowed) = e.field();
            range(field, value, allowed)
        })?;
        if self.max_in_flight > MAX_IN_FLIGHT_LIMIT {
            return Err(range(
                "max_in_flight",
                self.max_in_flight.to_string(),
                "1-65536",
            ));
        }
        // A token bucket of depth 0 admits nothing, whether or not a rate is set yet
        // (a reload may add one).
        if self.burst == 0 {
            return Err(range("burst", "0".into(), "≥ 1"));
        }
        if self.num_request_queues == 0 || usize::from(self.num_request_queues) > MAX_REQUEST_QUEUES
        {
            return Err(range(
                "num_request_queues",
                self.num_request_queues.to_string(),
                "1-64",
            ));
        }
        let bad = |reason: String| ConfigError::BadAllowedModels {
            tenant: self.name.clone(),
            reason,
        };
        let has_star = self.allowed_models.iter().any(|m| m == "*");
        if has_star && self.allowed_models.len() > 1 {
            return Err(bad("mixes \"*\" with model names".into()));
        }
        let mut seen = HashSet::new();
        for m in &self.allowed_models {
            if m.is_empty() {
                return Err(bad("contains an empty name".into()));
            }
            if !seen.insert(m) {
                return Err(bad(format!("lists {m:?} twice")));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Parses and validates a config file's text. Relative paths stay relative.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            line: e
                .span()
                .and_then(|span| text.get(..span.start))
                .map(|before| before.matches('\n').count() + 1)
                .unwrap_or(0),
            message: e.message().trim().replace('\n', " "),
        })?;
        config.validate()?;
        config.set_queue_shares()?;
        Ok(config)
    }

    /// Sets each tenant's share of a model queue, and refuses shares that do not fit
    /// in the queue together and in-flight bounds the shares cannot hold.
    fn set_queue_shares(&mut self) -> Result<(), ConfigError> {
        let queue = DEFAULT_MAX_QUEUE;
        let weights: u64 = self.tenants.iter().map(|t| u64::from(t.weight)).sum();
        let mut total = 0u64;
        for t in &mut self.tenants {
            let share = match t.max_queued_per_model {
                Some(n) if n == 0 || n > queue => {
                    return Err(ConfigError::OutOfRange {
                        tenant: t.name.clone(),
                        field: "max_queued_per_model",
                        value: n.to_string(),
                        range: "1-1024",
                    })
                }
                Some(n) => n,
                // Below the queue size, as weight ≤ weights (validated ≥ 1 each).
                None => u32::try_from(u64::from(queue) * u64::from(t.weight) / weights.max(1))
                    .unwrap_or(queue)
                    .max(1),
            };
            total += u64::from(share);
            if total > u64::from(queue) {
                return Err(ConfigError::QueueShares {
                    tenant: t.name.clone(),
                    total,
                    queue,
                });
            }
            // A tenant with no model has nothing in flight; "*" counts as one model,
            // the fewest it can be given.
            let models = match t.allowed() {
                AllowedModels::All => 1,
                AllowedModels::Named(names) => u32::try_from(names.len()).unwrap_or(u32::MAX),
            };
            if models > 0 && u64::from(t.max_in_flight) > u64::from(share) * u64::from(models) {
                return Err(ConfigError::InFlightAboveShare {
                    tenant: t.name.clone(),
                    max_in_flight: t.max_in_flight,
                    share,
                    models,
                });
            }
            t.queue_share = share;
        }
        Ok(())
    }

    /// Reads, parses and validates `path`; the models path is resolved against the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text)?;
        config.source = Some(path.to_owned());
        if config.daemon.models.is_relative() {
            if let Some(dir) = path.parent() {
                config.daemon.models = dir.join(&config.daemon.models);
            }
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        if d.executor_threads == 0 || d.executor_threads > 256 {
            return Err(ConfigError::ExecutorThreads(d.executor_threads));
        }
        if let Some(cpu) = d
            .executor_cpus
            .iter()
            .find(|c| **c as usize >= libc::CPU_SETSIZE as usize)
        {
            return Err(ConfigError::ExecutorCpu(*cpu));
        }
        if !(1..=MAX_HANDSHAKE_TIMEOUT_MS).contains(&d.handshake_timeout_ms) {
            return Err(ConfigError::HandshakeTimeout(d.handshake_timeout_ms));
        }
        if d.numa_node.is_some() && !d.executor_numa_nodes.is_empty() {
            return Err(ConfigError::NumaTwice);
        }
        if d.reserved_executors >= d.executor_threads {
            return Err(ConfigError::ReservedExecutors {
                reserved: d.reserved_executors,
                threads: d.executor_threads,
            });
        }
        if let Some((class, value)) = d
            .max_wait_ms
            .by_class()
            .into_iter()
            .find(|(_, ms)| *ms > MAX_CLASS_WAIT_MS)
        {
            return Err(ConfigError::ClassWait { class, value });
        }
        if self.tenants.is_empty() {
            return Err(ConfigError::NoTenants);
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        for t in &self.tenants {
            t.validate()?;
            if !names.insert(t.name.as_str()) {
                return Err(ConfigError::DuplicateName(t.name.clone()));
            }
            if !sockets.insert(t.socket.as_path()) {
                return Err(ConfigError::DuplicateSocket(t.socket.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [daemon]
        models = "models.toml"
        executor_threads = 2
        executor_cpus = [0, 1]

        [[tenant]]
        name = "vm-a"
        socket = "/tmp/a.sock"
        weight = 3
        priority_ceiling = "realtime"
        allowed_models = ["*"]
        max_in_flight = 8
        rate_rps = 100.0
        burst = 10

        [[tenant]]
        name = "vm-b"
        socket = "/tmp/b.sock"
        allowed_models = ["minilm", "add-one"]
    "#;

    fn with_tenant(extra: &str) -> String {
        format!(
            "[daemon]\nmodels = \"m.toml\"\n[[tenant]]\nname = \"t\"\nsocket = \"/tmp/t.sock\"\n{extra}\n"
        )
    }

    #[test]
    fn peer_credentials_and_handshake_timeout() {
        let c = Config::parse(&with_tenant("")).unwrap();
        assert_eq!(c.daemon.handshake_timeout_ms, 5000);
        assert_eq!((c.tenants[0].uid, c.tenants[0].gid), (None, None));
        let c = Config::parse(&with_tenant("uid = 1000\ngid = 100")).unwrap();
        assert_eq!(
            (c.tenants[0].uid, c.tenants[0].gid),
            (Some(1000), Some(100))
        );
        let timeout = |ms: u64| {
            Config::parse(&format!(
                "[daemon]\nmodels = \"m.toml\"\nhandshake_timeout_ms = {ms}\n\
                 [[tenant]]\nname = \"t\"\nsocket = \"/tmp/t.sock\"\n"
            ))
        };
        assert_eq!(timeout(250).unwrap().daemon.handshake_timeout_ms, 250);
        assert!(matches!(timeout(0), Err(ConfigError::HandshakeTimeout(0))));
        assert!(matches!(
            timeout(MAX_HANDSHAKE_TIMEOUT_MS + 1),
            Err(ConfigError::HandshakeTimeout(_))
        ));
    }

    #[test]
    fn parses_a_full_config_and_applies_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.daemon.executor_threads, 2);
        assert_eq!(c.daemon.executor_cpus, vec![0, 1]);
        assert_eq!(c.daemon.max_batch_delay_us, 0);
        let a = &c.tenants[0];
        assert_eq!(a.allowed(), AllowedModels::All);
        let p = a.policy();
        assert_eq!(p.weight, 3);
        assert_eq!(p.priority_ceiling, PriorityClass::Realtime);
        assert_eq!(p.max_in_flight, 8);
        assert_eq!(p.rate_rps, Some(100.0));
        assert_eq!(p.burst, 10);
        let b = &c.tenants[1];
        assert_eq!(b.weight, 1);
        assert_eq!(b.priority_ceiling, PriorityName::Normal);
        assert_eq!(b.max_in_flight, 64);
        assert_eq!(b.num_request_queues, 1);
        assert!(b.allowed().allows("minilm"));
        assert!(!b.allowed().allows("bert"));
        assert_eq!(b.policy().rate_rps, None);
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::parse(include_str!("../../../configs/ai-inferd.toml")).unwrap();
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].num_request_queues, 2);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::parse(&with_tenant("colour = \"red\"")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::parse("[daemon]\nmodels = \"m\"\nspeed = 1\n").unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
        assert!(matches!(err, ConfigError::Parse { line: 3, .. }), "{err}");
        assert_eq!(err.to_string().lines().count(), 1);
    }

    #[test]
    fn bad_priority_name_is_rejected() {
        let err = Config::parse(&with_tenant("priority_ceiling = \"urgent\"")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for (extra, field) in [
            ("weight = 0", "weight"),
            ("max_in_flight = 0", "max_in_flight"),
            ("max_in_flight = 65537", "max_in_flight"),
            ("burst = 0", "burst"),
            ("rate_rps = 0.0", "rate_rps"),
            ("rate_rps = -1.0", "rate_rps"),
            ("rate_rps = nan", "rate_rps"),
            ("accel_share = inf", "accel_share"),
            ("num_request_queues = 0", "num_request_queues"),
            ("num_request_queues = 65", "num_request_queues"),
        ] {
            match Config::parse(&with_tenant(extra)) {
                Err(ConfigError::OutOfRange { field: f, .. }) => assert_eq!(f, field, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn allowed_models_must_be_consistent() {
        for extra in [
            "allowed_models = [\"*\", \"a\"]",
            "allowed_models = [\"a\", \"a\"]",
            "allowed_models = [\"\"]",
        ] {
            assert!(
                matches!(
                    Config::parse(&with_tenant(extra)),
                    Err(ConfigError::BadAllowedModels { .. })
                ),
                "{extra}"
            );
        }
        let c = Config::parse(&with_tenant("")).unwrap();
        assert_eq!(c.tenants[0].allowed(), AllowedModels::Named(vec![]));
        assert!(!c.tenants[0].allowed().allows("anything"));
    }

    #[test]
    fn duplicates_and_missing_tenants_are_rejected() {
        let dup_name = GOOD.replace("vm-b", "vm-a");
        assert!(matches!(
            Config::parse(&dup_name),
            Err(ConfigError::DuplicateName(n)) if n == "vm-a"
        ));
        let dup_sock = GOOD.replace("/tmp/b.sock", "/tmp/a.sock");
        assert!(matches!(
            Config::parse(&dup_sock),
            Err(ConfigError::DuplicateSocket(p)) if p == Path::new("/tmp/a.sock")
        ));
        assert!(matches!(
            Config::parse("[daemon]\nmodels = \"m\"\n"),
            Err(ConfigError::NoTenants)
        ));
    }

    #[test]
    fn tenant_names_and_daemon_limits_are_checked() {
        for bad in ["", "has space", "slash/name"] {
            let text = with_tenant("").replace("name = \"t\"", &format!("name = {bad:?}"));
            assert!(
                matches!(Config::parse(&text), Err(ConfigError::BadName(_))),
                "{bad:?}"
            );
        }
        let text = with_tenant("").replace("[daemon]\n", "[daemon]\nexecutor_threads = 0\n");
        assert!(matches!(
            Config::parse(&text),
            Err(ConfigError::ExecutorThreads(0))
        ));
        let text = with_tenant("").replace("[daemon]\n", "[daemon]\nexecutor_cpus = [5000]\n");
        assert!(matches!(
            Config::parse(&text),
            Err(ConfigError::ExecutorCpu(5000))
        ));
    }

    #[test]
    fn metrics_numa_and_reservation_settings_are_checked() {
        let daemon =
            |extra: &str| with_tenant("").replace("[daemon]\n", &format!("[daemon]\n{extra}\n"));
        let c = Config::parse(&daemon(
            "metrics_socket = \"tcp:127.0.0.1:9100\"\nexecutor_threads = 3\n\
             reserved_executors = 2\nreserved_min_class = \"realtime\"\nnuma_node = 1",
        ))
        .unwrap();
        assert_eq!(
            c.daemon.metrics_socket,
            Some(MetricsEndpoint::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert_eq!(c.daemon.reserved_min_class, PriorityName::Realtime);
        assert_eq!(c.daemon.numa_node, Some(1));
        let c = Config::parse(&daemon("metrics_socket = \"/run/m.sock\"")).unwrap();
        assert_eq!(
            c.daemon.metrics_socket,
            Some(MetricsEndpoint::Unix("/run/m.sock".into()))
        );
        assert_eq!(c.daemon.reserved_executors, 0);
        assert_eq!(c.daemon.reserved_min_class, PriorityName::Interactive);

        let err = Config::parse(&daemon("metrics_socket = \"tcp:0.0.0.0:9100\"")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(matches!(
            Config::parse(&daemon("numa_node = 0\nexecutor_numa_nodes = [1]")),
            Err(ConfigError::NumaTwice)
        ));
        assert!(matches!(
            Config::parse(&daemon("executor_threads = 2\nreserved_executors = 2")),
            Err(ConfigError::ReservedExecutors {
                reserved: 2,
                threads: 2
            })
        ));
    }

    #[test]
    fn class_wait_bounds_default_parse_and_are_checked() {
        let daemon =
            |extra: &str| with_tenant("").replace("[daemon]\n", &format!("[daemon]\n{extra}\n"));
        let c = Config::parse(&daemon("")).unwrap();
        assert_eq!(c.daemon.max_wait_ms.policy(), ClassPolicy::default());

        // A sub-table after the [daemon] keys; unnamed classes keep their defaults.
        let text = with_tenant("").replace(
            "[[tenant]]",
            "[daemon.max_wait_ms]\nnormal = 1500\nbatch = 0\n\n[[tenant]]",
        );
        let c = Config::parse(&text).unwrap();
        let ms = 1_000_000;
        assert_eq!(
            c.daemon.max_wait_ms.policy().max_wait_ns,
            [None, Some(1500 * ms), Some(100 * ms), None]
        );

        let text = with_tenant("").replace(
            "[[tenant]]",
            "[daemon.max_wait_ms]\ninteractive = 3600001\n\n[[tenant]]",
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::ClassWait {
                    class: "interactive",
                    value: 3_600_001
                }
            ),
            "{err}"
        );
        let text = with_tenant("").replace(
            "[[tenant]]",
            "[daemon.max_wait_ms]\nbulk = 10\n\n[[tenant]]",
        );
        assert!(matches!(
            Config::parse(&text),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn load_resolves_the_models_path_next_to_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = dir.join("d.toml");
        std::fs::write(&file, with_tenant("")).unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.daemon.models, dir.join("m.toml"));
        assert_eq!(c.source.as_deref(), Some(file.as_path()));
        tmp.close().unwrap();
        assert!(matches!(Config::load(&file), Err(ConfigError::Read { .. })));
    }
}
