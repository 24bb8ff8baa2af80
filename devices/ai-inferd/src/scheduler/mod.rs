//! The cross-tenant scheduler: between the tenants' queues and the executors.
//!
//! [`SchedulerCore`] is deterministic and single-threaded: every call takes `now` from
//! the caller, so unit tests drive it with a fake clock. [`Scheduler`] wraps it in a
//! mutex and a condition variable for the daemon's threads (connection handlers
//! submit, executors wait for batches).
//!
//! Placeholder policy: one FIFO per model, batches of up to `max_batch` jobs in
//! arrival order, `max_in_flight` per tenant. The full policy (weighted fair queueing
//! of accelerator time, priority classes with bounded wait, deadline admission, token
//! buckets, batching delay) replaces the internals without changing this API.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use ai_infer_protocol::{PriorityClass, Status};

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
        }
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

/// Deterministic scheduler state; see the module documentation.
pub struct SchedulerCore<J> {
    tenants: HashMap<TenantId, TenantState>,
    models: HashMap<ModelId, ModelPolicy>,
    queues: HashMap<ModelId, VecDeque<(JobMeta, J)>>,
}

struct TenantState {
    policy: TenantPolicy,
    in_flight: u32,
}

impl<J> Default for SchedulerCore<J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<J> SchedulerCore<J> {
    /// An empty scheduler: no tenants, no models.
    pub fn new() -> Self {
        Self {
            tenants: HashMap::new(),
            models: HashMap::new(),
            queues: HashMap::new(),
        }
    }

    /// Adds a tenant or replaces its policy (hot reconfiguration keeps its queue).
    pub fn set_tenant(&mut self, tenant: TenantId, policy: TenantPolicy) {
        self.tenants
            .entry(tenant)
            .and_modify(|state| state.policy = policy.clone())
            .or_insert(TenantState {
                policy,
                in_flight: 0,
            });
    }

    /// Removes a tenant (VM disconnect) and returns its queued jobs, which complete as
    /// cancelled. Its running jobs finish, and the caller discards their results.
    pub fn remove_tenant(&mut self, tenant: TenantId) -> Vec<(JobMeta, J)> {
        self.tenants.remove(&tenant);
        self.drain_tenant(tenant)
    }

    /// Removes every queued job of `tenant` (device reset) and returns them; the tenant
    /// stays registered.
    pub fn drain_tenant(&mut self, tenant: TenantId) -> Vec<(JobMeta, J)> {
        let mut removed = Vec::new();
        for queue in self.queues.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) =
                queue.drain(..).partition(|(meta, _)| meta.tenant == tenant);
            *queue = kept.into();
            removed.extend(gone);
        }
        if let Some(state) = self.tenants.get_mut(&tenant) {
            state.in_flight = state.in_flight.saturating_sub(removed.len() as u32);
        }
        removed
    }

    /// Adds a model or replaces its policy.
    pub fn set_model(&mut self, model: ModelId, policy: ModelPolicy) {
        self.models.insert(model, policy);
    }

    /// Admits a job or says why not (and gives the job back).
    pub fn submit(&mut self, _now: Nanos, mut meta: JobMeta, job: J) -> Result<(), (Reject, J)> {
        let Some(state) = self.tenants.get_mut(&meta.tenant) else {
            return Err((Reject::UnknownTenant, job));
        };
        if !self.models.contains_key(&meta.model) {
            return Err((Reject::UnknownModel, job));
        }
        if state.in_flight >= state.policy.max_in_flight {
            return Err((Reject::QueueFull, job));
        }
        meta.priority = meta.priority.min(state.policy.priority_ceiling);
        state.in_flight += 1;
        self.queues
            .entry(meta.model)
            .or_default()
            .push_back((meta, job));
        Ok(())
    }

    /// Removes a queued job of `tenant` by `request_id`; `None` if it is not queued
    /// (unknown, or already running).
    pub fn cancel(&mut self, tenant: TenantId, request_id: u64) -> Option<(JobMeta, J)> {
        for queue in self.queues.values_mut() {
            if let Some(pos) = queue
                .iter()
                .position(|(meta, _)| meta.tenant == tenant && meta.request_id == request_id)
            {
                let removed = queue.remove(pos);
                if let Some(state) = self.tenants.get_mut(&tenant) {
                    state.in_flight = state.in_flight.saturating_sub(1);
                }
                return removed;
            }
        }
        None
    }

    /// The next thing `executor` should do at time `now`.
    pub fn poll(&mut self, _now: Nanos, executor: ExecutorId) -> Poll<J> {
        let mut models: Vec<_> = self
            .models
            .iter()
            .filter(|(_, policy)| policy.executors.contains(&executor))
            .map(|(id, policy)| (*id, policy.max_batch.max(1) as usize))
            .collect();
        models.sort_unstable();
        for (model, max_batch) in models {
            if let Some(queue) = self.queues.get_mut(&model) {
                if !queue.is_empty() {
                    let take = queue.len().min(max_batch);
                    let jobs = queue.drain(..take).collect();
                    return Poll::Run(Batch { model, jobs });
                }
            }
        }
        Poll::Wait(None)
    }

    /// Records that `executor` finished a batch of `model` that took `compute_ns`,
    /// with the given jobs' tenants (one entry per job, in batch order).
    pub fn complete(
        &mut self,
        _now: Nanos,
        _executor: ExecutorId,
        _model: ModelId,
        tenants: &[TenantId],
        _compute_ns: Nanos,
    ) {
        for tenant in tenants {
            if let Some(state) = self.tenants.get_mut(tenant) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
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
        Self {
            core: Mutex::new(SchedulerCore::new()),
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

    /// Submits a job (see [`SchedulerCore::submit`]) and wakes the executors.
    pub fn submit(&self, meta: JobMeta, job: J) -> Result<(), (Reject, J)> {
        let now = self.now();
        self.with_core(|core| core.submit(now, meta, job))
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
