//! The cross-tenant scheduler: between the tenants' queues and the executors.
//!
//! [`SchedulerCore`] is deterministic and single-threaded: every call takes `now` from
//! the caller, so unit tests drive it with a fake clock. [`Scheduler`] wraps it in a
//! mutex and a condition variable for the daemon's threads (connection handlers
//! submit, executors wait for batches).
//!
//! Mechanisms, one module each (docs/scheduling.md explains the reasoning):
//! - [`quota`]: per-tenant token buckets (requests/s, accelerator-seconds/s) and the
//!   in-flight bound, checked at submission → THROTTLED / QUEUE_FULL at once;
//! - [`deadline`]: per-model, per-batch-size execution time estimates; requests that
//!   cannot meet their deadline are rejected at submission or dropped while queued
//!   (DEADLINE), never started late;
//! - [`fair_queue`]: weighted fair sharing of accelerator *time* by virtual time;
//! - [`priority`]: classes with a per-tenant ceiling, strict order, bounded wait;
//! - `batcher`: one queue per model across tenants, batches formed when full or when
//!   the oldest request waited `max_queue_delay`;
//! - [`stats`]: per-tenant and per-model counters and histograms, Prometheus text.
//!
//! A dispatched batch is charged to its tenants at its estimated time (split equally)
//! and corrected when [`SchedulerCore::complete`] reports the measured time, split
//! equally among the batch's requests ([`SchedulerCore::complete_batch`] splits by
//! caller-given weights instead, e.g. input bytes, and releases jobs that were dispatched
//! but not run as dropped).

mod batcher;
pub mod deadline;
pub mod fair_queue;
mod id_map;
pub mod overhead;
pub mod priority;
pub mod quota;
pub mod stats;

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use ai_infer_protocol::{PriorityClass, Status};
use thiserror::Error;

use batcher::{ModelQueue, Queued};
use deadline::{predicted_finish, Backlog, ExecTimeEstimator, OverrunMargin};
use fair_queue::{TenantClock, VirtualTime};
use id_map::IdMap;
use quota::TenantQuota;

pub use deadline::EstimatorConfig;
pub use priority::ClassPolicy;
pub use quota::TokenBucket;
pub use stats::{
    jain_index, render_prometheus, render_prometheus_named, BatchSizeHistogram, Histogram,
    ModelSnapshot, ModelStats, SchedulerStats, SeriesNames, TenantSnapshot, TenantStats,
};

/// Nanoseconds on the scheduler's monotonic clock.
pub type Nanos = u64;

/// A tenant (one VM connection), numbered by the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub u32);

/// A model id as in MODELS / INFER.
pub type ModelId = u32;

/// An executor (one model instance on one device), numbered by the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutorId(pub u32);

/// Largest `max_batch` the scheduler uses; larger values are lowered to it.
pub const MAX_BATCH: u32 = 1024;

/// A model's queue size when its policy does not say ([`ModelPolicy::max_queue`]).
pub const DEFAULT_MAX_QUEUE: u32 = 1024;

/// Dispatched batches remembered per executor until `complete`; beyond this the
/// oldest record is forgotten (an executor that never completes cannot grow memory).
const MAX_RUNNING_PER_EXECUTOR: usize = 64;

/// Why a policy or config value is unusable.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum PolicyError {
    /// A tenant weight of 0.
    #[error("Tenant weight {0} is below 1")]
    Weight(u32),
    /// A tenant `max_in_flight` of 0.
    #[error("Tenant max_in_flight {0} is below 1")]
    MaxInFlight(u32),
    /// A request rate that is not a positive finite number.
    #[error("Tenant rate_rps {0} is not a positive finite number")]
    Rate(f64),
    /// A request burst of 0.
    #[error("Tenant burst {0} is below 1")]
    Burst(u32),
    /// An accelerator share that is not a positive finite number.
    #[error("Tenant accel_share {0} is not a positive finite number")]
    AccelShare(f64),
    /// An accelerator burst that is not a positive finite number.
    #[error("Tenant accel_burst {0} is not a positive finite number of seconds")]
    AccelBurst(f64),
    /// A model `max_batch` outside 1 ..= [`MAX_BATCH`].
    #[error("Model max_batch {0} is outside 1..=1024")]
    MaxBatch(u32),
    /// A model `max_queue` of 0.
    #[error("Model max_queue {0} is below 1")]
    MaxQueue(u32),
    /// A model with no executor.
    #[error("Model has no executors")]
    NoExecutors,
    /// An estimator smoothing factor outside (0, 1].
    #[error("Estimator {name} {value} is outside (0, 1]")]
    Smoothing {
        /// `alpha` or `dev_alpha`.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// A negative or non-finite `dev_factor`.
    #[error("Estimator dev_factor {0} is not a finite number ≥ 0")]
    DevFactor(f64),
    /// A `realtime_stretch` below 1 or not finite.
    #[error("Realtime stretch {0} is not a finite number ≥ 1")]
    RealtimeStretch(f64),
}

fn positive_finite(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// The operator's policy for one tenant (from its TOML config; changeable at run time).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantPolicy {
    /// Share of accelerator time relative to other tenants (≥ 1).
    pub weight: u32,
    /// Highest class this tenant's requests get; higher requests are lowered to it.
    pub priority_ceiling: PriorityClass,
    /// INFER requests queued or running at once.
    pub max_in_flight: u32,
    /// Requests per second (token bucket rate), `None` = unlimited.
    pub rate_rps: Option<f64>,
    /// Token bucket depth for `rate_rps`.
    pub burst: u32,
    /// Accelerator-seconds per second, `None` = unlimited.
    pub accel_share: Option<f64>,
    /// Accelerator-seconds the `accel_share` bucket holds (default 0.1 s).
    pub accel_burst: f64,
    /// Requests this tenant may have queued for any one model (`None`: only the
    /// model's `max_queue` bounds it). When the tenants' bounds add up to at most the
    /// queue size, no tenant can fill a model's queue against another: a tenant
    /// below its bound always finds room (the daemon's config guarantees that).
    pub max_queued_per_model: Option<u32>,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            weight: 1,
            priority_ceiling: PriorityClass::Interactive,
            max_in_flight: 64,
            rate_rps: None,
            burst: 32,
            accel_share: None,
            accel_burst: 0.1,
            max_queued_per_model: None,
        }
    }
}

impl PolicyError {
    /// The config field the error is about, its value and what is allowed, for a loader
    /// that reports errors by field (`ai-inferd`'s config).
    pub fn field(&self) -> (&'static str, String, &'static str) {
        match self {
            PolicyError::Weight(v) => ("weight", v.to_string(), "≥ 1"),
            PolicyError::MaxInFlight(v) => ("max_in_flight", v.to_string(), "≥ 1"),
            PolicyError::Rate(v) => ("rate_rps", v.to_string(), "a finite number > 0"),
            PolicyError::Burst(v) => ("burst", v.to_string(), "≥ 1"),
            PolicyError::AccelShare(v) => ("accel_share", v.to_string(), "a finite number > 0"),
            PolicyError::AccelBurst(v) => ("accel_burst", v.to_string(), "a finite number > 0"),
            other => (
                "policy",
                other.to_string(),
                "see the scheduler documentation",
            ),
        }
    }
}

impl TenantPolicy {
    /// Checks the values a config loader should refuse. The scheduler itself accepts
    /// any policy (weight 0 counts as 1, invalid rates as 0).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.weight == 0 {
            return Err(PolicyError::Weight(self.weight));
        }
        if self.max_in_flight == 0 {
            return Err(PolicyError::MaxInFlight(self.max_in_flight));
        }
        if let Some(rate) = self.rate_rps.filter(|r| !positive_finite(*r)) {
            return Err(PolicyError::Rate(rate));
        }
        if self.rate_rps.is_some() && self.burst == 0 {
            return Err(PolicyError::Burst(self.burst));
        }
        if let Some(share) = self.accel_share.filter(|s| !positive_finite(*s)) {
            return Err(PolicyError::AccelShare(share));
        }
        if self.accel_share.is_some() && !positive_finite(self.accel_burst) {
            return Err(PolicyError::AccelBurst(self.accel_burst));
        }
        Ok(())
    }
}

/// The operator's policy for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPolicy {
    /// Largest batch formed across requests (and tenants).
    pub max_batch: u32,
    /// Longest a request waits for a batch to fill before it runs in a smaller one.
    pub max_queue_delay_ns: Nanos,
    /// Executors that serve this model.
    pub executors: Vec<ExecutorId>,
    /// Requests queued for the model at once, all tenants (default 1024); more get
    /// QUEUE_FULL.
    pub max_queue: u32,
}

impl Default for ModelPolicy {
    /// No batching (`max_batch` 1, no delay), no executors, a queue of 1024.
    fn default() -> Self {
        Self {
            max_batch: 1,
            max_queue_delay_ns: 0,
            executors: Vec::new(),
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }
}

impl ModelPolicy {
    /// Checks the values a config loader should refuse.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(1..=MAX_BATCH).contains(&self.max_batch) {
            return Err(PolicyError::MaxBatch(self.max_batch));
        }
        if self.max_queue == 0 {
            return Err(PolicyError::MaxQueue(self.max_queue));
        }
        if self.executors.is_empty() {
            return Err(PolicyError::NoExecutors);
        }
        Ok(())
    }

    /// `max_batch` as the scheduler uses it: clamped to 1 ..= [`MAX_BATCH`].
    fn batch_limit(&self) -> usize {
        self.max_batch.clamp(1, MAX_BATCH) as usize
    }
}

/// Scheduler-wide settings (defaults documented on each field).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Longest wait per priority class before a request is promoted.
    pub classes: ClassPolicy,
    /// Accelerator time an idle tenant may be behind the others when it comes back
    /// (default 0: it re-enters exactly at the current virtual time).
    pub idle_credit_ns: Nanos,
    /// Smoothing of the execution time estimates.
    pub estimator: EstimatorConfig,
    /// A batch led by a realtime request only grows while its estimated time stays
    /// within this factor of that request running alone (default 1.5; values below
    /// 1 count as 1, i.e. realtime requests are batched only when that is free).
    pub realtime_stretch: f64,
    /// Executors kept free for high-class work (default none): they only run
    /// requests of class `reserved_min_class` or higher, so such a request never
    /// waits behind a lower-class batch while a reserved executor is idle. A model
    /// served only by reserved executors ignores the reservation (its lower classes
    /// would never run).
    pub reserved_executors: Vec<ExecutorId>,
    /// Lowest class the reserved executors run (default INTERACTIVE).
    pub reserved_min_class: PriorityClass,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            classes: ClassPolicy::default(),
            idle_credit_ns: 0,
            estimator: EstimatorConfig::default(),
            realtime_stretch: 1.5,
            reserved_executors: Vec::new(),
            reserved_min_class: PriorityClass::Interactive,
        }
    }
}

impl SchedulerConfig {
    /// Checks the values a config loader should refuse.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let e = &self.estimator;
        for (name, value) in [("alpha", e.alpha), ("dev_alpha", e.dev_alpha)] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(PolicyError::Smoothing { name, value });
            }
        }
        if !(e.dev_factor.is_finite() && e.dev_factor >= 0.0) {
            return Err(PolicyError::DevFactor(e.dev_factor));
        }
        if !(self.realtime_stretch.is_finite() && self.realtime_stretch >= 1.0) {
            return Err(PolicyError::RealtimeStretch(self.realtime_stretch));
        }
        Ok(())
    }
}

/// What the scheduler knows about one admitted INFER request.
#[derive(Clone, Debug, PartialEq)]
pub struct JobMeta {
    /// Who sent it.
    pub tenant: TenantId,
    /// The driver's `request_id` (the key for CANCEL).
    pub request_id: u64,
    /// The model to run.
    pub model: ModelId,
    /// The class asked for by the guest; the scheduler clamps it to the ceiling.
    pub priority: PriorityClass,
    /// Absolute deadline on the scheduler clock, if the request has one.
    pub deadline: Option<Nanos>,
    /// When the device took the chain off the available ring.
    pub arrival: Nanos,
}

/// Why a request was not admitted or did not run; each maps to its wire status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// The tenant has `max_in_flight` requests, or its queue is full.
    QueueFull,
    /// Over the request rate or accelerator-time quota.
    Throttled,
    /// The deadline cannot be met, or passed while queued.
    Deadline,
    /// Removed by CANCEL, disconnect or device reset before it ran.
    Cancelled,
    /// The model has no policy / executor.
    UnknownModel,
    /// The tenant is not (or no longer) registered.
    UnknownTenant,
}

impl Reject {
    /// Number of reasons.
    pub const COUNT: usize = 6;

    /// Every reason, in [`Reject::index`] order.
    pub const ALL: [Reject; Reject::COUNT] = [
        Reject::QueueFull,
        Reject::Throttled,
        Reject::Deadline,
        Reject::Cancelled,
        Reject::UnknownModel,
        Reject::UnknownTenant,
    ];

    /// The status the request completes with.
    pub fn status(self) -> Status {
        match self {
            Reject::QueueFull => Status::QueueFull,
            Reject::Throttled => Status::Throttled,
            Reject::Deadline => Status::Deadline,
            Reject::Cancelled | Reject::UnknownTenant => Status::Cancelled,
            Reject::UnknownModel => Status::UnknownModel,
        }
    }

    /// Position in [`Reject::ALL`] and in the statistics arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name used as a metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::QueueFull => "queue_full",
            Reject::Throttled => "throttled",
            Reject::Deadline => "deadline",
            Reject::Cancelled => "cancelled",
            Reject::UnknownModel => "unknown_model",
            Reject::UnknownTenant => "unknown_tenant",
        }
    }
}

/// A batch for one executor: jobs of one model, possibly from several tenants.
#[derive(Debug)]
pub struct Batch<J> {
    /// The model all jobs use.
    pub model: ModelId,
    /// The jobs in the order the backend should see them.
    pub jobs: Vec<(JobMeta, J)>,
}

/// What an executor should do next.
#[derive(Debug)]
pub enum Poll<J> {
    /// Run this batch now.
    Run(Batch<J>),
    /// Complete these jobs with their status without running them (e.g. expired).
    Drop(Vec<(JobMeta, J, Reject)>),
    /// Nothing to do before `Some(t)` (or until something is submitted).
    Wait(Option<Nanos>),
}

/// How one dispatched job of a finished batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEnd {
    /// It ran; `weight` is its share of the batch's cost (equal shares when every job
    /// that ran has weight 0).
    Ran {
        /// Cost weight (e.g. input bytes).
        weight: u64,
    },
    /// Dispatched but not run: its deadline passed before it started (Deadline), or its
    /// queue was reset or its VM left (Cancelled).
    Dropped(Reject),
}

/// Deterministic scheduler state; see the module documentation.
pub struct SchedulerCore<J> {
    config: SchedulerConfig,
    tenants: IdMap<TenantId, TenantState>,
    models: IdMap<ModelId, ModelState<J>>,
    /// Models each executor serves, sorted (derived from the model policies).
    executor_models: IdMap<ExecutorId, Vec<ModelId>>,
    /// Batches dispatched and not yet completed, per executor, oldest first.
    running: IdMap<ExecutorId, VecDeque<Dispatched>>,
    /// Jobs found expired while forming a batch; handed out by the next poll.
    pending_drops: Vec<(JobMeta, J, Reject)>,
    /// Virtual time of the last tenant served first in a batch: where an idle
    /// tenant re-enters when nobody is backlogged.
    system_vt: VirtualTime,
    next_seq: u64,
}

struct TenantState {
    policy: TenantPolicy,
    clock: TenantClock,
    quota: TenantQuota,
    /// Queued or running.
    in_flight: u32,
    /// Queued only (0 = idle for the fair queue).
    queued: u32,
    stats: TenantStats,
}

impl TenantState {
    fn snapshot(&self, tenant: TenantId) -> TenantSnapshot {
        TenantSnapshot {
            tenant,
            weight: self.clock.weight(),
            priority_ceiling: self.policy.priority_ceiling,
            max_in_flight: self.policy.max_in_flight,
            queued: u64::from(self.queued),
            in_flight: u64::from(self.in_flight),
            stats: self.stats.clone(),
        }
    }
}

struct ModelState<J> {
    policy: ModelPolicy,
    queue: ModelQueue<J>,
    estimator: ExecTimeEstimator,
    /// How late recent batches finished against their estimates.
    overruns: OverrunMargin,
    stats: ModelStats,
}

/// A batch between `poll` and `complete`.
struct Dispatched {
    model: ModelId,
    dispatched_at: Nanos,
    estimate_ns: Nanos,
    jobs: Vec<DispatchedJob>,
}

struct DispatchedJob {
    tenant: TenantId,
    /// Virtual time charged at dispatch, refunded at completion.
    charged: VirtualTime,
    deadline: Option<Nanos>,
}

fn bump(counter: &mut u64, by: u64) {
    *counter = counter.wrapping_add(by);
}

/// Lowest class `executor` runs for a model with `policy`: the reservation's class
/// on a reserved executor, unless every executor of the model is reserved.
fn min_class_for(
    config: &SchedulerConfig,
    executor: ExecutorId,
    policy: &ModelPolicy,
) -> PriorityClass {
    let reserved = &config.reserved_executors;
    if reserved.contains(&executor) && policy.executors.iter().any(|e| !reserved.contains(e)) {
        config.reserved_min_class
    } else {
        PriorityClass::Batch
    }
}

/// Executors of a model with `policy` that may run a request of `class`.
fn executors_for_class(
    config: &SchedulerConfig,
    policy: &ModelPolicy,
    class: PriorityClass,
) -> usize {
    policy
        .executors
        .iter()
        .filter(|e| class >= min_class_for(config, **e, policy))
        .count()
}

fn vt_of(tenants: &IdMap<TenantId, TenantState>, tenant: TenantId) -> VirtualTime {
    tenants.get(&tenant).map_or(0, |t| t.clock.vt())
}

/// Bookkeeping for an admitted job that leaves the queue without running.
fn note_dropped(
    tenants: &mut IdMap<TenantId, TenantState>,
    stats: &mut ModelStats,
    tenant: TenantId,
    count: usize,
    reason: Reject,
) {
    bump(&mut stats.dropped[reason.index()], count as u64);
    if let Some(t) = tenants.get_mut(&tenant) {
        t.in_flight = t.in_flight.saturating_sub(count as u32);
        t.queued = t.queued.saturating_sub(count as u32);
        bump(&mut t.stats.dropped[reason.index()], count as u64);
    }
}

impl<J> Default for SchedulerCore<J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<J> SchedulerCore<J> {
    /// An empty scheduler: no tenants, no models, default config.
    pub fn new() -> Self {
        Self::with_config(SchedulerConfig::default())
    }

    /// An empty scheduler with `config`.
    pub fn with_config(config: SchedulerConfig) -> Self {
        Self {
            config,
            tenants: IdMap::default(),
            models: IdMap::default(),
            executor_models: IdMap::default(),
            running: IdMap::default(),
            pending_drops: Vec::new(),
            system_vt: 0,
            next_seq: 0,
        }
    }

    /// The scheduler-wide settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Replaces the scheduler-wide settings (hot reconfiguration; queues and
    /// measurements are kept).
    pub fn set_config(&mut self, config: SchedulerConfig) {
        for model in self.models.values_mut() {
            model.estimator.set_config(&config.estimator);
        }
        self.config = config;
    }

    /// Where a tenant with new work re-enters the fair queue: the smallest counter
    /// among tenants with queued work, or the last served counter if none has.
    fn floor(&self) -> VirtualTime {
        self.tenants
            .values()
            .filter(|t| t.queued > 0)
            .map(|t| t.clock.vt())
            .min()
            .unwrap_or(self.system_vt)
    }

    /// Adds a tenant or replaces its policy (hot reconfiguration keeps its queue,
    /// its fair-share counter and what its quota buckets hold).
    pub fn set_tenant(&mut self, tenant: TenantId, policy: TenantPolicy) {
        let floor = self.floor();
        match self.tenants.get_mut(&tenant) {
            Some(state) => {
                state.clock.set_weight(policy.weight);
                state.quota.reconfigure(&policy);
                state.policy = policy;
            }
            None => {
                let state = TenantState {
                    clock: TenantClock::new(policy.weight, floor),
                    quota: TenantQuota::new(&policy),
                    policy,
                    in_flight: 0,
                    queued: 0,
                    stats: TenantStats::default(),
                };
                self.tenants.insert(tenant, state);
            }
        }
    }

    /// Replaces the policy of a registered tenant, like [`SchedulerCore::set_tenant`];
    /// false (and nothing added) when the tenant is not registered.
    pub fn update_tenant(&mut self, tenant: TenantId, policy: TenantPolicy) -> bool {
        if !self.tenants.contains_key(&tenant) {
            return false;
        }
        self.set_tenant(tenant, policy);
        true
    }

    /// The policy of a model.
    pub fn model_policy(&self, model: ModelId) -> Option<&ModelPolicy> {
        self.models.get(&model).map(|m| &m.policy)
    }

    /// Removes a tenant (VM disconnect) and returns its queued jobs, which complete as
    /// cancelled. Its running jobs finish, and the caller discards their results.
    pub fn remove_tenant(&mut self, tenant: TenantId) -> Vec<(JobMeta, J)> {
        let removed = self.drain_tenant(tenant);
        self.tenants.remove(&tenant);
        removed
    }

    /// Removes every queued job of `tenant` (device reset) and returns them; the tenant
    /// stays registered. Jobs already handed to an executor are not touched.
    pub fn drain_tenant(&mut self, tenant: TenantId) -> Vec<(JobMeta, J)> {
        let mut removed = Vec::new();
        for model in self.models.values_mut() {
            let drained = model.queue.drain_tenant(tenant);
            note_dropped(
                &mut self.tenants,
                &mut model.stats,
                tenant,
                drained.len(),
                Reject::Cancelled,
            );
            removed.extend(drained.into_iter().map(|q| (q.meta, q.job)));
        }
        // Expired jobs waiting to be handed out were already accounted for.
        let (mine, others): (Vec<_>, Vec<_>) = self
            .pending_drops
            .drain(..)
            .partition(|(meta, _, _)| meta.tenant == tenant);
        self.pending_drops = others;
        removed.extend(mine.into_iter().map(|(meta, job, _)| (meta, job)));
        removed
    }

    /// Adds a model or replaces its policy (its queue and measurements are kept).
    pub fn set_model(&mut self, model: ModelId, policy: ModelPolicy) {
        let max_batch = policy.batch_limit();
        match self.models.get_mut(&model) {
            Some(state) => {
                state.estimator.set_max_batch(max_batch);
                state.policy = policy;
            }
            None => {
                let state = ModelState {
                    estimator: ExecTimeEstimator::new(&self.config.estimator, max_batch),
                    overruns: OverrunMargin::default(),
                    policy,
                    queue: ModelQueue::default(),
                    stats: ModelStats::default(),
                };
                self.models.insert(model, state);
            }
        }
        self.executor_models.clear();
        for (id, state) in &self.models {
            for executor in &state.policy.executors {
                self.executor_models.entry(*executor).or_default().push(*id);
            }
        }
        for served in self.executor_models.values_mut() {
            served.sort_unstable();
            served.dedup();
        }
    }

    /// Estimated time left of the batches running on `executors`, summed; `None` when
    /// none runs (a batch past its estimate has 0 left but still occupies its executor).
    fn running_left(&self, executors: &[ExecutorId], now: Nanos) -> Option<Nanos> {
        executors
            .iter()
            .filter_map(|e| self.running.get(e))
            .flatten()
            .map(|d| {
                d.dispatched_at
                    .saturating_add(d.estimate_ns)
                    .saturating_sub(now)
            })
            .reduce(Nanos::saturating_add)
    }

    /// Why `meta` (priority already clamped) cannot be admitted at `now`, if so.
    fn admission(&mut self, now: Nanos, meta: &JobMeta) -> Result<(), Reject> {
        let (Some(tenant), Some(model)) =
            (self.tenants.get(&meta.tenant), self.models.get(&meta.model))
        else {
            return Err(Reject::UnknownModel);
        };
        // The tenant's own share of the model queue first, so that it is refused
        // for its own backlog before it can take the room others are owed.
        let share_full = tenant
            .policy
            .max_queued_per_model
            .is_some_and(|share| model.queue.tenant_len(meta.tenant) >= share as usize);
        if tenant.in_flight >= tenant.policy.max_in_flight
            || share_full
            || model.queue.len() >= model.policy.max_queue as usize
        {
            return Err(Reject::QueueFull);
        }
        if let Some(deadline) = meta.deadline {
            if deadline <= now {
                return Err(Reject::Deadline);
            }
            let running = self.running_left(&model.policy.executors, now);
            let backlog = Backlog {
                ahead: model.queue.len_at_or_above(meta.priority),
                max_batch: model.policy.batch_limit(),
                running_left_ns: running.unwrap_or(0),
                executors: executors_for_class(&self.config, &model.policy, meta.priority),
            };
            // Joining the next batch makes it longer for everyone queued in it: the
            // request is refused rather than push an admitted one past its deadline.
            let joins_next = backlog.ahead < backlog.max_batch;
            let limit = match self.models.get_mut(&meta.model) {
                Some(m) if joins_next => m
                    .queue
                    .earliest_deadline()
                    .map_or(deadline, |d| d.min(deadline)),
                _ => deadline,
            };
            // On an idle model the request runs at once: its best case decides. That
            // is its best chance, and it keeps the model measured — otherwise an
            // estimate inflated by a slow first batch could refuse deadline work
            // forever, since refused work is never measured. A batch running past its
            // estimate is stalled, not gone: the model is busy until it completes.
            // Either way the prediction carries the margin for how late batches
            // have lately finished (it decays with time, so it cannot lock work out).
            let idle = backlog.ahead == 0 && running.is_none();
            let finish = self.models.get(&meta.model).and_then(|m| {
                let finish = match idle {
                    true => m.estimator.fastest(1).map(|t| now.saturating_add(t)),
                    false => predicted_finish(now, backlog, &m.estimator),
                };
                finish.map(|f| f.saturating_add(m.overruns.margin(now)))
            });
            if finish.is_some_and(|f| f > limit) {
                return Err(Reject::Deadline);
            }
        }
        // Quotas last, so a request refused for another reason costs no token.
        let quota_ok = self
            .tenants
            .get_mut(&meta.tenant)
            .is_some_and(|t| t.quota.admits(now));
        if !quota_ok {
            return Err(Reject::Throttled);
        }
        Ok(())
    }

    /// Admits a job or says why not (and gives the job back).
    ///
    /// Checks, in order: tenant and model known; in-flight bound, the tenant's share
    /// of the model queue and the queue's size (QUEUE_FULL); deadline passed or predicted to be missed (DEADLINE); request
    /// rate and accelerator-time quotas (THROTTLED).
    pub fn submit(&mut self, now: Nanos, mut meta: JobMeta, job: J) -> Result<(), (Reject, J)> {
        let Some(tenant) = self.tenants.get_mut(&meta.tenant) else {
            return Err((Reject::UnknownTenant, job));
        };
        bump(&mut tenant.stats.requests, 1);
        let (class, clamped) = priority::clamp(meta.priority, tenant.policy.priority_ceiling);
        meta.priority = class;
        if clamped {
            bump(&mut tenant.stats.priority_clamped, 1);
        }
        let was_idle = tenant.queued == 0;
        if let Some(model) = self.models.get_mut(&meta.model) {
            bump(&mut model.stats.requests, 1);
        }
        if let Err(reason) = self.admission(now, &meta) {
            if let Some(t) = self.tenants.get_mut(&meta.tenant) {
                bump(&mut t.stats.rejected[reason.index()], 1);
            }
            if let Some(m) = self.models.get_mut(&meta.model) {
                bump(&mut m.stats.rejected[reason.index()], 1);
            }
            return Err((reason, job));
        }
        let floor = if was_idle { Some(self.floor()) } else { None };
        let credit = self.config.idle_credit_ns;
        let (Some(tenant), Some(model)) = (
            self.tenants.get_mut(&meta.tenant),
            self.models.get_mut(&meta.model),
        ) else {
            return Err((Reject::UnknownModel, job));
        };
        tenant.quota.take_request(now);
        if let Some(floor) = floor {
            tenant.clock.lift(floor, credit);
        }
        tenant.in_flight += 1;
        tenant.queued += 1;
        bump(&mut tenant.stats.admitted, 1);
        bump(&mut model.stats.admitted, 1);
        let seq = self.next_seq;
        self.next_seq += 1;
        model.queue.push(Queued { seq, meta, job });
        Ok(())
    }

    /// Removes a queued job of `tenant` by `request_id`; `None` if it is not queued
    /// (unknown, or already running).
    pub fn cancel(&mut self, tenant: TenantId, request_id: u64) -> Option<(JobMeta, J)> {
        for model in self.models.values_mut() {
            if let Some(q) = model.queue.cancel(tenant, request_id) {
                note_dropped(
                    &mut self.tenants,
                    &mut model.stats,
                    tenant,
                    1,
                    Reject::Cancelled,
                );
                return Some((q.meta, q.job));
            }
        }
        None
    }

    /// The next thing `executor` should do at time `now`.
    ///
    /// In order: jobs found expired earlier; queued jobs of the executor's models
    /// that can no longer meet their deadline (`Drop`); a batch of the ready model
    /// whose best request ranks first (`Run`); else the time the first model
    /// becomes ready (`Wait`).
    pub fn poll(&mut self, now: Nanos, executor: ExecutorId) -> Poll<J> {
        if !self.pending_drops.is_empty() {
            return Poll::Drop(std::mem::take(&mut self.pending_drops));
        }
        let Some(served) = self.executor_models.get(&executor) else {
            return Poll::Wait(None);
        };
        let mut expired = Vec::new();
        for id in served {
            let Some(model) = self.models.get_mut(id).filter(|m| !m.queue.is_empty()) else {
                continue;
            };
            let shortest = model.estimator.fastest(1).unwrap_or(0);
            while let Some(q) = model.queue.pop_expired(now, shortest) {
                note_dropped(
                    &mut self.tenants,
                    &mut model.stats,
                    q.meta.tenant,
                    1,
                    Reject::Deadline,
                );
                expired.push((q.meta, q.job, Reject::Deadline));
            }
        }
        if !expired.is_empty() {
            return Poll::Drop(expired);
        }

        let mut best = None;
        let mut wake: Option<Nanos> = None;
        for id in served {
            let Some(model) = self.models.get_mut(id) else {
                continue;
            };
            let ModelState {
                policy,
                queue,
                estimator,
                ..
            } = model;
            let min_class = min_class_for(&self.config, executor, policy);
            match queue.ready_at(now, policy, min_class, |n| estimator.estimate(n)) {
                None => {}
                Some(at) if at > now => wake = Some(wake.map_or(at, |w| w.min(at))),
                Some(_) => {
                    let head = queue.best_head(now, &self.config.classes, min_class, |t| {
                        vt_of(&self.tenants, t)
                    });
                    if let Some((_, rank)) = head {
                        if best.is_none_or(|(r, _, _)| rank < r) {
                            best = Some((rank, *id, min_class));
                        }
                    }
                }
            }
        }
        match best {
            Some((_, model, min_class)) => self.form_batch(now, executor, model, min_class),
            None => Poll::Wait(wake),
        }
    }

    /// Takes the best requests of `model` into one batch for `executor`.
    ///
    /// Requests are taken in rank order (overdue, class, fair share) while the batch
    /// still finishes before every member's deadline by the estimate, and, when a
    /// realtime request leads it, while it takes at most `realtime_stretch` times
    /// that request's time alone. A request that cannot finish in time even alone
    /// is dropped instead. Only requests of `min_class` or higher are taken.
    fn form_batch(
        &mut self,
        now: Nanos,
        executor: ExecutorId,
        model_id: ModelId,
        min_class: PriorityClass,
    ) -> Poll<J> {
        let Some(model) = self.models.get_mut(&model_id) else {
            return Poll::Wait(None);
        };
        let max_batch = model.policy.batch_limit();
        let target = model.queue.len_at_or_above(min_class).clamp(1, max_batch);
        // Charged at dispatch so that concurrent executors see the tenant as served;
        // at least 1 ns so that requests interleave by weight before any estimate.
        let per_job_ns = model
            .estimator
            .estimate(target)
            .map_or(1, |e| (e / target as u64).max(1));
        // Dropped unstarted only if even the fastest time seen would be late.
        let alone_ns = model.estimator.fastest(1);
        // Growing the batch keeps admission's promise, margin included.
        let margin = model.overruns.margin(now);
        let mut jobs = Vec::with_capacity(target);
        let mut charges = Vec::with_capacity(target);
        let mut batch_deadline: Option<Nanos> = None;
        // Longest the batch may take, set when a realtime request leads it.
        let mut stretch_limit: Option<Nanos> = None;
        let mut first_vt = None;
        while jobs.len() < max_batch {
            let tenants = &self.tenants;
            let Some((at, _)) = model
                .queue
                .best_head(now, &self.config.classes, min_class, |t| vt_of(tenants, t))
            else {
                break;
            };
            let Some(head) = model.queue.peek(at) else {
                break;
            };
            let deadline = head.meta.deadline;
            if let (Some(d), Some(alone)) = (deadline, alone_ns) {
                if now.saturating_add(alone) > d {
                    if let Some(q) = model.queue.pop(at) {
                        note_dropped(
                            &mut self.tenants,
                            &mut model.stats,
                            q.meta.tenant,
                            1,
                            Reject::Deadline,
                        );
                        self.pending_drops.push((q.meta, q.job, Reject::Deadline));
                    }
                    continue;
                }
            }
            let tightest = match (batch_deadline, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let exec = model.estimator.estimate(jobs.len() + 1);
            // The batch grows only while every member still makes it by the
            // estimate; its first request runs alone unless dropped just above.
            if let (false, Some(d), Some(exec)) = (jobs.is_empty(), tightest, exec) {
                if now.saturating_add(exec).saturating_add(margin) > d {
                    break;
                }
            }
            if let (Some(limit), Some(exec)) = (stretch_limit, exec) {
                if exec > limit {
                    break;
                }
            }
            if jobs.is_empty() && head.meta.priority == PriorityClass::Realtime {
                let stretch = self.config.realtime_stretch.max(1.0);
                // A lower bound of the time alone, so that a pessimistic guess
                // (only large batches measured) cannot loosen the limit.
                stretch_limit = model
                    .estimator
                    .lower_bound(1)
                    .map(|alone| (alone as f64 * stretch) as Nanos);
            }
            batch_deadline = tightest;
            let Some(q) = model.queue.pop(at) else {
                break;
            };
            let queue_ns = now.saturating_sub(q.meta.arrival);
            model.stats.queue.record(queue_ns);
            let mut charged = 0;
            if let Some(t) = self.tenants.get_mut(&q.meta.tenant) {
                first_vt.get_or_insert(t.clock.vt());
                charged = t.clock.charge(per_job_ns);
                t.queued = t.queued.saturating_sub(1);
                t.stats.queue.record(queue_ns);
            }
            charges.push(DispatchedJob {
                tenant: q.meta.tenant,
                charged,
                deadline: q.meta.deadline,
            });
            jobs.push((q.meta, q.job));
        }
        if jobs.is_empty() {
            return match self.pending_drops.is_empty() {
                true => Poll::Wait(None),
                false => Poll::Drop(std::mem::take(&mut self.pending_drops)),
            };
        }
        if let Some(vt) = first_vt {
            self.system_vt = self.system_vt.max(vt);
        }
        bump(&mut model.stats.batches, 1);
        model.stats.batch_sizes.record(jobs.len());
        let running = self.running.entry(executor).or_default();
        if running.len() >= MAX_RUNNING_PER_EXECUTOR {
            log::warn!(
                "executor {} has {} batches without completion; forgetting the oldest",
                executor.0,
                running.len()
            );
            running.pop_front();
        }
        running.push_back(Dispatched {
            model: model_id,
            dispatched_at: now,
            estimate_ns: model.estimator.estimate(jobs.len()).unwrap_or(0),
            jobs: charges,
        });
        Poll::Run(Batch {
            model: model_id,
            jobs,
        })
    }

    /// Records that `executor` finished a batch of `model` that took `compute_ns`,
    /// with the given jobs' tenants (one entry per job, in batch order), all of which
    /// ran. The time is split equally among the jobs and charged to their tenants.
    pub fn complete(
        &mut self,
        now: Nanos,
        executor: ExecutorId,
        model: ModelId,
        tenants: &[TenantId],
        compute_ns: Nanos,
    ) {
        self.finish_batch(
            now,
            executor,
            model,
            tenants.len(),
            |i| (tenants[i], JobEnd::Ran { weight: 1 }),
            compute_ns,
        );
    }

    /// Like [`SchedulerCore::complete`], with how each job ended: a job that ran carries
    /// a cost weight (e.g. its input bytes, or tokens after padding) and `compute_ns` is
    /// split among the jobs that ran in proportion to it (equally when all are 0). A
    /// job that was dispatched but not run is released and counted as dropped for its
    /// reason; it is charged nothing, and the estimator behind deadline admission learns
    /// `compute_ns` for the number of jobs that ran only (nothing when none did).
    pub fn complete_batch(
        &mut self,
        now: Nanos,
        executor: ExecutorId,
        model: ModelId,
        jobs: &[(TenantId, JobEnd)],
        compute_ns: Nanos,
    ) {
        self.finish_batch(now, executor, model, jobs.len(), |i| jobs[i], compute_ns);
    }

    fn finish_batch(
        &mut self,
        now: Nanos,
        executor: ExecutorId,
        model_id: ModelId,
        count: usize,
        job: impl Fn(usize) -> (TenantId, JobEnd),
        compute_ns: Nanos,
    ) {
        let ran_weight = |i| match job(i).1 {
            JobEnd::Ran { weight } => Some(weight),
            JobEnd::Dropped(_) => None,
        };
        let record = self.running.get_mut(&executor).and_then(|batches| {
            let pos = batches.iter().position(|b| b.model == model_id)?;
            batches.remove(pos)
        });
        let ran = (0..count).filter(|&i| ran_weight(i).is_some()).count();
        let mut model = self.models.get_mut(&model_id);
        if let Some(record) = record {
            if let (true, Some(m)) = (ran > 0, model.as_mut()) {
                m.overruns
                    .record(now, record.dispatched_at, record.estimate_ns);
            }
            // The record's jobs are in batch order, like `job`.
            for (i, dispatched) in record.jobs.into_iter().enumerate() {
                let late = ran_weight(i).is_some() && dispatched.deadline.is_some_and(|d| now > d);
                if let Some(t) = self.tenants.get_mut(&dispatched.tenant) {
                    t.clock.refund(dispatched.charged);
                    if late {
                        bump(&mut t.stats.deadline_missed, 1);
                    }
                }
                if let (true, Some(m)) = (late, model.as_mut()) {
                    bump(&mut m.stats.deadline_missed, 1);
                }
            }
        }
        if let Some(m) = model.as_mut().filter(|_| ran > 0) {
            m.estimator.record(ran, compute_ns);
            bump(&mut m.stats.completed, ran as u64);
            m.stats.compute.record(compute_ns);
            bump(&mut m.stats.busy_ns, compute_ns);
        }
        let mut total_weight: u128 = (0..count).filter_map(ran_weight).map(u128::from).sum();
        let equal = total_weight == 0;
        if equal {
            total_weight = ran.max(1) as u128;
        }
        let compute = u128::from(compute_ns);
        let mut cumulative = 0u128;
        for i in 0..count {
            let (tenant, end) = job(i);
            let weight = match end {
                JobEnd::Ran { weight } => weight,
                JobEnd::Dropped(reason) => {
                    if let Some(m) = model.as_mut() {
                        bump(&mut m.stats.dropped[reason.index()], 1);
                    }
                    if let Some(t) = self.tenants.get_mut(&tenant) {
                        t.in_flight = t.in_flight.saturating_sub(1);
                        bump(&mut t.stats.dropped[reason.index()], 1);
                    }
                    continue;
                }
            };
            let weight = if equal { 1 } else { u128::from(weight) };
            // Shares from cumulative weights add up to exactly `compute_ns`.
            let before = compute * cumulative / total_weight;
            cumulative += weight;
            let share = (compute * cumulative / total_weight - before) as Nanos;
            if let Some(t) = self.tenants.get_mut(&tenant) {
                t.in_flight = t.in_flight.saturating_sub(1);
                t.clock.charge(share);
                t.quota.charge_accel(now, share);
                bump(&mut t.stats.completed, 1);
                t.stats.batch_sizes.record(ran);
                t.stats.compute.record(compute_ns);
                bump(&mut t.stats.busy_ns, share);
            }
        }
    }

    /// Predicted execution time of a batch of `batch` requests of `model`, from
    /// measurements; `None` for an unknown or never measured model.
    pub fn estimate(&self, model: ModelId, batch: usize) -> Option<Nanos> {
        self.models.get(&model)?.estimator.estimate(batch)
    }

    /// INFER requests of `tenant` queued or running; `None` for an unknown tenant.
    pub fn in_flight(&self, tenant: TenantId) -> Option<u32> {
        self.tenants.get(&tenant).map(|t| t.in_flight)
    }

    /// A snapshot of one registered tenant.
    pub fn tenant_snapshot(&self, tenant: TenantId) -> Option<TenantSnapshot> {
        self.tenants.get(&tenant).map(|t| t.snapshot(tenant))
    }

    /// A snapshot of every counter at `now`, tenants and models sorted by id (the
    /// deadline margin decays with time).
    pub fn stats(&self, now: Nanos) -> SchedulerStats {
        let mut tenants: Vec<_> = self.tenants.iter().map(|(id, t)| t.snapshot(*id)).collect();
        tenants.sort_unstable_by_key(|t| t.tenant);
        let mut models: Vec<_> = self
            .models
            .iter()
            .map(|(id, m)| ModelSnapshot {
                model: *id,
                queued: m.queue.len() as u64,
                estimate_batch1_ns: m.estimator.estimate(1),
                deadline_margin_ns: m.overruns.margin(now),
                stats: m.stats.clone(),
            })
            .collect();
        models.sort_unstable_by_key(|m| m.model);
        SchedulerStats { tenants, models }
    }
}

/// [`SchedulerCore`] shared by the daemon's threads, on the real monotonic clock.
pub struct Scheduler<J> {
    core: Mutex<SchedulerCore<J>>,
    wake: Condvar,
    epoch: Instant,
}

impl<J> Default for Scheduler<J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<J> Scheduler<J> {
    /// An empty scheduler whose clock starts now.
    pub fn new() -> Self {
        Self::with_config(SchedulerConfig::default())
    }

    /// An empty scheduler with `config` whose clock starts now.
    pub fn with_config(config: SchedulerConfig) -> Self {
        Self {
            core: Mutex::new(SchedulerCore::with_config(config)),
            wake: Condvar::new(),
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the scheduler was created.
    pub fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Runs `f` on the core under the lock and wakes the executors afterwards.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut SchedulerCore<J>) -> R) -> R {
        let result = f(&mut self.lock());
        self.wake.notify_all();
        result
    }

    /// Runs `f` on the core under the lock, for reading (wakes nobody).
    pub fn inspect<R>(&self, f: impl FnOnce(&SchedulerCore<J>) -> R) -> R {
        f(&self.lock())
    }

    /// Submits a job (see [`SchedulerCore::submit`]) and wakes the executors.
    pub fn submit(&self, meta: JobMeta, job: J) -> Result<(), (Reject, J)> {
        let now = self.now();
        self.with_core(|core| core.submit(now, meta, job))
    }

    /// A snapshot of the statistics (see [`SchedulerCore::stats`]).
    pub fn stats(&self) -> SchedulerStats {
        let now = self.now();
        self.lock().stats(now)
    }

    /// Blocks until `executor` has something to do or `timeout` passes.
    pub fn next(&self, executor: ExecutorId, timeout: Duration) -> Poll<J> {
        let deadline = Instant::now() + timeout;
        let mut core = self.lock();
        loop {
            let now = self.now();
            match core.poll(now, executor) {
                Poll::Wait(until) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Poll::Wait(until);
                    }
                    let wait = until
                        .map(|t| Duration::from_nanos(t.saturating_sub(now)).min(left))
                        .unwrap_or(left);
                    core = match self.wake.wait_timeout(core, wait) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                other => return other,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SchedulerCore<J>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
