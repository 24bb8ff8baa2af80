//! Scheduler decision time per request at 4 tenants: submit + poll + complete on
//! [`SchedulerCore`] with a fake clock, so only the scheduler's own work is timed
//! (no inference, no locking, no threads). Target: ≤ 2 µs per request.
//!
//! Run: `cargo bench -p ai-inferd --bench scheduler`.

use std::hint::black_box;
use std::time::Instant;

use ai_infer_protocol::PriorityClass;
use ai_inferd::scheduler::{
    ExecutorId, JobMeta, ModelPolicy, Nanos, Poll, SchedulerCore, TenantId, TenantPolicy,
};

const TENANTS: u32 = 4;
const EXEC: ExecutorId = ExecutorId(0);

/// One benchmark case.
struct Case {
    name: &'static str,
    max_batch: u32,
    /// Requests each tenant keeps queued.
    depth: u32,
    /// Every mechanism on: deadlines, rate and accelerator quotas, mixed classes.
    all_mechanisms: bool,
}

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

/// Runs `requests` requests through the core; returns nanoseconds per request.
fn run(case: &Case, requests: u64) -> f64 {
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
                if core.submit(now, meta, submitted).is_err() {
                    panic!("the benchmark load must be admitted");
                }
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
            other => panic!("the executor must always have work, got {other:?}"),
        }
    }
    let elapsed = start.elapsed().as_nanos() as f64;
    black_box(core.stats());
    elapsed / completed as f64
}

fn main() {
    let cases = [
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
    println!("scheduler decision time per request, {TENANTS} tenants (submit + poll + complete)");
    println!("{:<40} {:>12} {:>8}", "case", "ns/request", "≤ 2 µs");
    for case in &cases {
        // Warm up, then take the best of 5 runs (the machine is shared).
        run(case, 20_000);
        let best = (0..5)
            .map(|_| run(case, 200_000))
            .fold(f64::INFINITY, f64::min);
        println!(
            "{:<40} {:>12.0} {:>8}",
            case.name,
            best,
            if best <= 2_000.0 { "yes" } else { "NO" }
        );
    }
}
