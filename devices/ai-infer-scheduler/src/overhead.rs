//! Scheduler decision time per request, at 4 tenants: submit + poll + complete on
//! a [`SchedulerCore`] with a fake clock, so only the scheduler's own work is timed
//! (no inference, no locking, no threads). Target: ≤ 2 µs per request.
//!
//! Used by `cargo bench -p ai-infer-scheduler --bench scheduler` and by `ai-inferd bench`.

use std::hint::black_box;
use std::time::Instant;

use ai_infer_protocol::PriorityClass;

use crate::{ExecutorId, JobMeta, ModelPolicy, Nanos, Poll, SchedulerCore, TenantId, TenantPolicy};

/// Tenants in every case.
pub const TENANTS: u32 = 4;

const EXEC: ExecutorId = ExecutorId(0);

/// One measured case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// What it measures.
    pub name: &'static str,
    /// The model's largest batch.
    pub max_batch: u32,
    /// Requests each tenant keeps queued.
    pub depth: u32,
    /// Every mechanism on: deadlines, rate and accelerator quotas, mixed classes.
    pub all_mechanisms: bool,
}

/// The cases the cargo bench prints; the last one is the heaviest.
pub const CASES: [Case; 5] = [
    Case {
        name: "batch 1, 1 queued per tenant",
        max_batch: 1,
        depth: 1,
        all_mechanisms: false,
    },
    Case {
        name: "batch 1, 16 queued per tenant",
        max_batch: 1,
        depth: 16,
        all_mechanisms: false,
    },
    Case {
        name: "batch 8, 16 queued per tenant",
        max_batch: 8,
        depth: 16,
        all_mechanisms: false,
    },
    Case {
        name: "batch 8, 64 queued, all mechanisms",
        max_batch: 8,
        depth: 64,
        all_mechanisms: true,
    },
    Case {
        name: "batch 32, 64 queued, all mechanisms",
        max_batch: 32,
        depth: 64,
        all_mechanisms: true,
    },
];

fn core_for(case: &Case) -> SchedulerCore<u64> {
    let mut core = SchedulerCore::new();
    for t in 0..TENANTS {
        let mut policy = TenantPolicy {
            weight: 1 << t,
            priority_ceiling: PriorityClass::Realtime,
            max_in_flight: 4 * case.depth + 64,
            ..TenantPolicy::default()
        };
        if case.all_mechanisms {
            policy.rate_rps = Some(1e9);
            policy.burst = 1_000_000;
            policy.accel_share = Some(1.0);
            policy.accel_burst = 1e6;
        }
        core.set_tenant(TenantId(t), policy);
    }
    let policy = ModelPolicy {
        max_batch: case.max_batch,
        max_queue_delay_ns: 0,
        executors: vec![EXEC],
        max_queue: 1 << 20,
    };
    core.set_model(1, policy);
    core
}

/// Runs `requests` requests through a fresh core; nanoseconds per request, or
/// `None` if the core refused the load or left the executor idle (a bug).
pub fn ns_per_request(case: &Case, requests: u64) -> Option<f64> {
    let mut core = core_for(case);
    let mut now: Nanos = 0;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut tenants = Vec::with_capacity(case.max_batch as usize);
    let start = Instant::now();
    while completed < requests {
        // Each tenant tops its queue up to `depth`.
        for t in 0..TENANTS {
            while core.in_flight(TenantId(t)).unwrap_or(u32::MAX) < case.depth {
                let class = if case.all_mechanisms {
                    PriorityClass::ALL[(submitted % 4) as usize]
                } else {
                    PriorityClass::Normal
                };
                let meta = JobMeta {
                    tenant: TenantId(t),
                    request_id: submitted,
                    model: 1,
                    priority: class,
                    deadline: case.all_mechanisms.then_some(now + 1_000_000_000),
                    arrival: now,
                };
                core.submit(now, meta, submitted).ok()?;
                submitted += 1;
            }
        }
        match core.poll(now, EXEC) {
            Poll::Run(batch) => {
                tenants.clear();
                tenants.extend(batch.jobs.iter().map(|(m, _)| m.tenant));
                black_box(&batch);
                now += 1_000;
                core.complete(now, EXEC, batch.model, &tenants, 1_000);
                completed += tenants.len() as u64;
            }
            _ => return None,
        }
    }
    let elapsed = start.elapsed().as_nanos() as f64;
    black_box(core.stats(now));
    Some(elapsed / completed as f64)
}

/// Warms up, then the best of `runs` runs of `requests` (the machine is shared).
pub fn best_of(case: &Case, runs: u32, requests: u64) -> Option<f64> {
    ns_per_request(case, requests / 10 + 1)?;
    (0..runs.max(1))
        .map(|_| ns_per_request(case, requests))
        .try_fold(f64::INFINITY, |best, r| r.map(|r| best.min(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_runs_its_load() {
        for case in &CASES {
            let ns = ns_per_request(case, 2_000).expect(case.name);
            assert!(ns > 0.0 && ns.is_finite(), "{}: {ns}", case.name);
        }
    }
}
