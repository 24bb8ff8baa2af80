//! The scheduler inside a running daemon: several test frontends (real vhost-user
//! connections) against an in-process `Daemon`, with the test backends of `common`
//! and the synthetic model (a batch of n sleeps a + b·n).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ai_infer_protocol::{CancelOutcome, PriorityClass, Status};
use ai_infer_scheduler::{Reject, SchedulerStats, TenantId};
use ai_infer_test_frontend::load::{self, Load, Pattern};
use ai_infer_test_frontend::{Pending, TestFrontend};
use ai_inferd::backend::synthetic::SyntheticModel;
use ai_inferd::backend::Backend;
use ai_inferd::config::Config;
use ai_inferd::metrics::scrape::Scrape;
use ai_inferd::metrics::{self, MetricsEndpoint};
use ai_inferd::reload::ReloadError;
use common::*;

const WAIT: Duration = Duration::from_secs(10);
const SYNTH: u32 = 50;

fn synthetic(max_batch: usize, fixed_ms: u64, per_request_us: u64) -> Arc<dyn Backend> {
    Arc::new(SyntheticModel::new(
        SYNTH,
        "synthetic",
        max_batch,
        Duration::from_millis(fixed_ms),
        Duration::from_micros(per_request_us),
    ))
}

fn tenant(name: &str, extra: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\nsocket = \"{{dir}}/{name}.sock\"\n\
         allowed_models = [\"*\"]\n{extra}\n"
    )
}

/// No starvation bound for the classes the fairness tests use: aging promotes a
/// request that waited too long whatever its tenant's weight, and a low-weight
/// tenant's requests wait 32 × 7 service times here, more than Normal's 500 ms
/// when a stalled host stretches 2.5 ms sleeps.
const NO_AGING: &str = "[daemon.max_wait_ms]\nnormal = 0\nbatch = 0\n";

/// A tenant that keeps `depth` requests in flight; the fairness tests use 32, enough
/// queued work (80 ms or more) that a tenant stays backlogged while its client
/// thread waits for a CPU.
fn closed(h: &Harness, name: &str, class: PriorityClass, depth: u32) -> Load {
    Load {
        socket: h.socket(name),
        model: SYNTH,
        class,
        pattern: Pattern::Closed { depth },
        deadline_us: 0,
    }
}

/// The longest batch of the synthetic model between two snapshots, ns: the upper bound
/// of its histogram bucket (log2 buckets, so at most twice the true longest).
fn longest_batch_ns(before: &SchedulerStats, after: &SchedulerStats) -> f64 {
    let compute = |s: &SchedulerStats| {
        s.models
            .iter()
            .find(|m| m.model == SYNTH)
            .map(|m| m.stats.compute.clone())
            .unwrap_or_default()
    };
    compute(after)
        .since(&compute(before))
        .quantile_upper_ns(1.0)
        .expect("batches ran, none for 18 minutes") as f64
}

/// Weighted fair sharing between two snapshots, as fair queueing guarantees it to
/// tenants that stay backlogged: accelerator time divided by weight differs between
/// any two tenants by a few batches of each, not by a share of the window. One batch
/// is the lag bound of start-time fair queueing (Goyal et al. 1996); one more because a
/// batch is charged by its estimate until it completes and then by its measured time;
/// one more for the batches running when the snapshots were taken. Bounding by the
/// longest batch seen keeps the check tight on a quiet host (batches of 2.5 ms against
/// 400 ms of service: a few %) and fair on a host whose steal time stretches a 2.5 ms
/// sleep to 70 ms now and then, since such a batch is charged to whoever ran it and
/// only repaid after it completes.
fn assert_weighted_fair(before: &SchedulerStats, after: &SchedulerStats, weights: &[f64]) {
    let used: Vec<f64> = (0..weights.len() as u32)
        .map(|i| after.busy_ns(TenantId(i)) as f64 - before.busy_ns(TenantId(i)) as f64)
        .collect();
    let service: Vec<f64> = used.iter().zip(weights).map(|(u, w)| u / w).collect();
    let longest = longest_batch_ns(before, after);
    let share = |v: &[f64]| -> Vec<String> {
        let total: f64 = v.iter().sum();
        v.iter().map(|x| format!("{:.3}", x / total)).collect()
    };
    for i in 0..weights.len() {
        for j in i + 1..weights.len() {
            let bound = 3.0 * (longest / weights[i] + longest / weights[j]);
            let lag = (service[i] - service[j]).abs();
            assert!(
                lag <= bound,
                "tenants {i} and {j}: accelerator time per unit of weight {:.1} and {:.1} ms \
                 differ by {:.1} ms, more than the bound {:.1} ms (longest batch ≤ {:.1} ms); \
                 shares {:?} for weight shares {:?}",
                service[i] / 1e6,
                service[j] / 1e6,
                lag / 1e6,
                bound / 1e6,
                longest / 1e6,
                share(&used),
                share(weights),
            );
        }
    }
}

#[test]
fn saturating_tenants_get_accelerator_time_by_weight() {
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{NO_AGING}{}{}{}",
        tenant("w1", "weight = 1"),
        tenant("w2", "weight = 2"),
        tenant("w4", "weight = 4")
    );
    let h = Harness::custom(&text, vec![synthetic(1, 2, 500)]);
    let loads: Vec<Load> = ["w1", "w2", "w4"]
        .iter()
        .map(|n| closed(&h, n, PriorityClass::Batch, 32))
        .collect();
    let running = load::spawn(&loads, Duration::from_secs(4)).unwrap();
    running.sleep_until(Duration::from_millis(500));
    let before = h.daemon().shared().engine.scheduler.stats();
    running.sleep_until(Duration::from_millis(3_500));
    let after = h.daemon().shared().engine.scheduler.stats();
    let runs = running.join().unwrap();
    for run in &runs {
        assert_eq!(run.count(Status::Ok), run.outcomes.len(), "all OK");
    }
    // 3 s of 2.5 ms requests: about 1200 of them.
    assert_weighted_fair(&before, &after, &[1.0, 2.0, 4.0]);
}

#[test]
fn realtime_overtakes_queued_batch_work_and_the_ceiling_applies() {
    let HeldExecutor {
        h,
        order,
        gate,
        first: mut rt,
        second: mut bulk,
        held,
    } = HeldExecutor::start(
        ("rt", "priority_ceiling = \"realtime\""),
        ("bulk", "priority_ceiling = \"batch\""),
    );
    // Eight requests queue behind the held executor; bulk asks for realtime and
    // is lowered to its batch ceiling.
    let mut queued = Vec::new();
    for i in 0..8u64 {
        let req = add_one_request(10 + i, ADD_ONE, 1).with_priority(PriorityClass::Realtime);
        queued.push(
            bulk.submit(0, &req, &[&f32_bytes(&[100.0 + i as f32])], 0)
                .unwrap(),
        );
    }
    let req = add_one_request(99, ADD_ONE, 1).with_priority(PriorityClass::Realtime);
    let urgent = rt.submit(0, &req, &[&f32_bytes(&[999.0])], 0).unwrap();
    // Everything is queued before the executor is free again.
    wait_queued(&h, 9);
    gate.open();
    assert_eq!(
        rt.wait(urgent, WAIT).unwrap().header().unwrap().status,
        Status::Ok
    );
    for p in queued.into_iter().chain([held]) {
        assert_eq!(
            bulk.wait(p, WAIT).unwrap().header().unwrap().status,
            Status::Ok
        );
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 9);
    assert_eq!(order[0], 999.0, "the realtime request ran first: {order:?}");
    assert_eq!(
        &order[1..],
        &(0..8).map(|i| 100.0 + i as f32).collect::<Vec<_>>()[..],
        "then the batch class, in order"
    );
    // The eight, and the held request (normal, above the batch ceiling too).
    assert_eq!(bulk.trace().unwrap().priority_clamped, 9);
    assert_eq!(rt.trace().unwrap().priority_clamped, 0);
}

/// Submits one request and returns its status and how long it took to come back.
fn timed(
    fe: &mut ai_infer_test_frontend::TestFrontend,
    req: &ai_infer_protocol::Request,
) -> (Status, Duration) {
    let start = Instant::now();
    let done = fe.call(0, req, &[&f32_bytes(&[1.0])], 0).unwrap();
    (done.header().unwrap().status, start.elapsed())
}

#[test]
fn throttled_queue_full_and_deadline_come_back_at_once() {
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{}{}{}",
        tenant("slow", "max_in_flight = 1"),
        tenant("limited", "rate_rps = 0.5\nburst = 1"),
        tenant("hurried", "")
    );
    // 300 ms per request: "at once" is far below that.
    let h = Harness::custom(&text, vec![synthetic(1, 300, 0)]);
    let req = |id| add_one_request(id, SYNTH, 1);
    let mut slow = h.connect("slow");
    let mut limited = h.connect("limited");
    let mut hurried = h.connect("hurried");
    // Measure the model once, so deadline admission has an estimate.
    assert_eq!(timed(&mut hurried, &req(1)).0, Status::Ok);

    let running = slow.submit(0, &req(2), &[&f32_bytes(&[1.0])], 0).unwrap();
    let (status, took) = timed(&mut slow, &req(3));
    assert_eq!(status, Status::QueueFull);
    assert!(
        took < Duration::from_millis(150),
        "QUEUE_FULL took {took:?}"
    );

    // The executor is busy for ~300 ms: a 100 ms deadline cannot be met.
    let (status, took) = timed(&mut hurried, &req(4).with_deadline_us(100_000));
    assert_eq!(status, Status::Deadline);
    assert!(took < Duration::from_millis(150), "DEADLINE took {took:?}");

    // One token: the first request is admitted (it queues), the second is not.
    let first = limited
        .submit(0, &req(5), &[&f32_bytes(&[1.0])], 0)
        .unwrap();
    let (status, took) = timed(&mut limited, &req(6));
    assert_eq!(status, Status::Throttled);
    assert!(took < Duration::from_millis(150), "THROTTLED took {took:?}");

    for (fe, p) in [(&mut slow, running), (&mut limited, first)] {
        assert_eq!(
            fe.wait(p, WAIT).unwrap().header().unwrap().status,
            Status::Ok
        );
    }
    let stats = h.daemon().shared().engine.scheduler.stats();
    let rejected = |id: u32, r: Reject| stats.tenants[id as usize].stats.rejected[r.index()];
    assert_eq!(rejected(0, Reject::QueueFull), 1);
    assert_eq!(rejected(1, Reject::Throttled), 1);
    assert_eq!(rejected(2, Reject::Deadline), 1);
}

fn queued_now(h: &Harness) -> u64 {
    h.daemon()
        .shared()
        .engine
        .scheduler
        .stats()
        .models
        .iter()
        .map(|m| m.queued)
        .sum()
}

/// Waits until at least `n` requests are queued in the scheduler.
fn wait_queued(h: &Harness, n: u64) {
    let deadline = Instant::now() + WAIT;
    while queued_now(h) < n {
        assert!(Instant::now() < deadline, "requests never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One executor, held: tenants `first` and `second` (name, extra config lines)
/// share add-one (which logs the inputs it runs, in order) and a gated model, and
/// `second`'s request on the closed gate occupies the executor, so that what they
/// submit next stays queued until `gate` opens.
struct HeldExecutor {
    h: Harness,
    order: Arc<Mutex<Vec<f32>>>,
    gate: Arc<Gate>,
    first: TestFrontend,
    second: TestFrontend,
    held: Pending,
}

impl HeldExecutor {
    fn start(first: (&str, &str), second: (&str, &str)) -> Self {
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Gate::default());
        let text = format!(
            "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{}{}",
            tenant(first.0, first.1),
            tenant(second.0, second.1)
        );
        let backends: Vec<Arc<dyn Backend>> = vec![
            Arc::new(AddOne::new(ADD_ONE, "add-one", None).logging(order.clone())),
            Arc::new(AddOne::new(GATED, "gated", Some(gate.clone()))),
        ];
        let h = Harness::custom(&text, backends);
        let first = h.connect(first.0);
        let mut second = h.connect(second.0);
        gate.close();
        let held = second
            .submit(0, &add_one_request(1, GATED, 1), &[&f32_bytes(&[0.0])], 0)
            .unwrap();
        gate.wait_entered(1);
        HeldExecutor {
            h,
            order,
            gate,
            first,
            second,
            held,
        }
    }
}

#[test]
fn cancel_and_disconnect_remove_queued_work_at_once() {
    let HeldExecutor {
        h,
        order,
        gate,
        first: mut a,
        second: mut b,
        held,
    } = HeldExecutor::start(("a", ""), ("b", ""));
    let mut mine = Vec::new();
    for i in 0..3u64 {
        let req = add_one_request(10 + i, ADD_ONE, 1);
        mine.push(
            a.submit(0, &req, &[&f32_bytes(&[10.0 + i as f32])], 0)
                .unwrap(),
        );
    }
    let theirs = b
        .submit(
            0,
            &add_one_request(2, ADD_ONE, 1),
            &[&f32_bytes(&[20.0])],
            0,
        )
        .unwrap();
    wait_queued(&h, 4);

    // CANCEL removes one queued request, completed CANCELLED before the CANCEL.
    assert_eq!(a.cancel(0, 100, 11).unwrap(), CancelOutcome::Cancelled);
    assert_eq!(queued_now(&h), 3);
    let cancelled = mine.remove(1);
    let used = a.poll_used(0).unwrap().expect("the target completes first");
    let done = a.finish(cancelled, used).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Cancelled);

    // A disconnect removes the tenant's other queued requests, while the
    // executor is still held: they can never run.
    drop(mine);
    drop(a);
    let deadline = Instant::now() + WAIT;
    while queued_now(&h) > 1 {
        assert!(
            Instant::now() < deadline,
            "the disconnected tenant's work stayed queued"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    gate.open();
    for p in [held, theirs] {
        assert_eq!(
            b.wait(p, WAIT).unwrap().header().unwrap().status,
            Status::Ok
        );
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![20.0],
        "only b's queued request ran"
    );
}

#[test]
fn a_reload_changes_weights_live_and_a_bad_one_changes_nothing() {
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{NO_AGING}{}{}",
        tenant("x", "weight = 1"),
        tenant("y", "weight = 1")
    );
    let h = Harness::custom(&text, vec![synthetic(1, 2, 500)]);
    let loads = vec![
        closed(&h, "x", PriorityClass::Normal, 32),
        closed(&h, "y", PriorityClass::Normal, 32),
    ];
    let stats = || h.daemon().shared().engine.scheduler.stats();
    // One load for the whole test: the same two connections before and after.
    let running = load::spawn(&loads, Duration::from_secs(6)).unwrap();
    running.sleep_until(Duration::from_millis(500));
    let s0 = stats();
    running.sleep_until(Duration::from_millis(2_500));
    let s1 = stats();
    assert_weighted_fair(&s0, &s1, &[1.0, 1.0]);

    // Refused: a new tenant, and a changed socket. Nothing changes.
    let added = format!("{}{}", h.text, tenant("z", ""));
    let err = h
        .daemon()
        .reload(Config::parse(&added).unwrap())
        .unwrap_err();
    assert!(matches!(err, ReloadError::Tenants { .. }), "{err}");
    let moved = h.text.replace("x.sock", "x2.sock");
    let err = h
        .daemon()
        .reload(Config::parse(&moved).unwrap())
        .unwrap_err();
    assert!(matches!(err, ReloadError::Fixed { .. }), "{err}");

    let heavier =
        h.text
            .replacen("weight = 1", "weight = 3", 2)
            .replacen("weight = 3", "weight = 1", 1);
    let summary = h.daemon().reload(Config::parse(&heavier).unwrap()).unwrap();
    assert_eq!(summary, "y: weight 1 -> 3");
    running.sleep_until(Duration::from_millis(3_000));
    let s2 = stats();
    running.sleep_until(Duration::from_millis(5_500));
    let s3 = stats();
    let runs = running.join().unwrap();
    assert_weighted_fair(&s2, &s3, &[1.0, 3.0]);
    // The connections were never dropped: every request of the load came back OK
    // and the tenants' counters kept counting from the start.
    for run in &runs {
        assert_eq!(run.count(Status::Ok), run.outcomes.len());
    }
    let y = s3.tenants.iter().find(|t| t.tenant == TenantId(1)).unwrap();
    assert_eq!(y.weight, 3);
    assert!(y.stats.completed > s0.tenants[1].stats.completed);
}

#[test]
fn the_metrics_endpoint_serves_parseable_text_with_every_series() {
    let tmp = test_dir();
    let dir = tmp.path();
    let socket = dir.join("metrics.sock");
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\nmetrics_socket = \"{}\"\n{}{}",
        socket.display(),
        tenant("vm-a", "weight = 2\nrate_rps = 1000.0\nburst = 3"),
        tenant("vm-b", "")
    );
    let h = Harness::custom(&text, vec![synthetic(4, 1, 100)]);
    let endpoint = MetricsEndpoint::Unix(socket.clone());
    assert_eq!(h.daemon().metrics_endpoint(), Some(&endpoint));
    let mut a = h.connect("vm-a");
    for id in 0..5 {
        a.call(
            0,
            &add_one_request(id, SYNTH, 2),
            &[&f32_bytes(&[1.0, 2.0])],
            0,
        )
        .unwrap();
    }
    // More than the burst of 3 at once: some THROTTLED.
    let pending: Vec<_> = (10..20)
        .map(|id| {
            a.submit(0, &add_one_request(id, SYNTH, 1), &[&f32_bytes(&[1.0])], 0)
                .unwrap()
        })
        .collect();
    let mut throttled = 0;
    for p in pending {
        if a.wait(p, WAIT).unwrap().header().unwrap().status == Status::Throttled {
            throttled += 1;
        }
    }
    assert!(throttled > 0);

    let raw = metrics::fetch(&endpoint, "", WAIT).unwrap();
    let s = Scrape::parse(&raw).unwrap();
    let a_ = [("tenant", "vm-a")];
    assert_eq!(s.get("ai_inferd_tenant_requests_total", &a_), Some(15.0));
    assert_eq!(
        s.get(
            "ai_inferd_tenant_rejected_total",
            &[("tenant", "vm-a"), ("reason", "throttled")]
        ),
        Some(throttled as f64)
    );
    assert_eq!(s.get("ai_inferd_tenant_weight", &a_), Some(2.0));
    assert_eq!(s.get("ai_inferd_tenant_connected", &a_), Some(1.0));
    assert_eq!(
        s.get("ai_inferd_tenant_connected", &[("tenant", "vm-b")]),
        Some(0.0)
    );
    let completed = 15.0 - throttled as f64;
    assert_eq!(
        s.get("ai_inferd_tenant_completed_total", &a_),
        Some(completed)
    );
    assert_eq!(
        s.get("ai_inferd_tenant_queue_seconds_count", &a_),
        Some(completed)
    );
    assert_eq!(
        s.get(
            "ai_inferd_tenant_queue_seconds_bucket",
            &[("tenant", "vm-a"), ("le", "+Inf")]
        ),
        Some(completed)
    );
    assert!(
        s.get("ai_inferd_tenant_accelerator_seconds_total", &a_)
            .unwrap()
            > 0.0
    );
    assert!(s.get("ai_inferd_tenant_batch_size_count", &a_).unwrap() > 0.0);
    let m = [("model", "synthetic")];
    assert_eq!(
        s.get("ai_inferd_model_completed_total", &m),
        Some(completed)
    );
    assert!(s.get("ai_inferd_model_batch_size_count", &m).unwrap() >= 1.0);
    assert!(s.get("ai_inferd_model_busy_seconds_total", &m).unwrap() > 0.0);
    assert!(
        s.get("ai_inferd_model_estimate_batch1_seconds", &m)
            .unwrap()
            > 0.0
    );
    // A gauge that is there whether or not batches finished late.
    let margin = s.get("ai_inferd_model_deadline_margin_seconds", &m);
    assert!(margin.is_some_and(|v| v >= 0.0), "{margin:?}");
    assert_eq!(
        s.get("ai_inferd_reloads_total", &[("result", "applied")]),
        Some(0.0)
    );

    let http = metrics::fetch(&endpoint, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).unwrap();
    let (head, body) = http.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(Scrape::parse(body)
        .unwrap()
        .get("ai_inferd_tenant_requests_total", &a_)
        .is_some());

    // `top --once` against the same socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ai-inferd"))
        .args(["top", "--once", "--metrics"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frame = String::from_utf8(out.stdout).unwrap();
    assert!(!frame.contains('\x1b'), "no ANSI with --once");
    let line = frame.lines().find(|l| l.starts_with("vm-a")).unwrap();
    assert!(line.contains("yes") && line.contains("100.0%"), "{frame}");
    assert!(frame.lines().any(|l| l.starts_with("synthetic")), "{frame}");

    // The reload command: no file behind this config, so it is refused.
    let answer = metrics::fetch(&endpoint, "reload\n", WAIT).unwrap();
    assert!(
        answer.starts_with("error: the running configuration was not loaded"),
        "{answer}"
    );
    let s = Scrape::parse(&metrics::fetch(&endpoint, "", WAIT).unwrap()).unwrap();
    assert_eq!(
        s.get("ai_inferd_reloads_total", &[("result", "refused")]),
        Some(1.0)
    );
    drop(a);
    drop(h);
    assert!(
        !socket.exists(),
        "the metrics socket is removed at shutdown"
    );
}

#[test]
fn a_reload_from_the_file_applies_allowed_models_and_limits() {
    let tmp = test_dir();
    let dir = tmp.path();
    let file = dir.join("d.toml");
    let text = |extra: &str| {
        format!(
            "[daemon]\nmodels = \"m\"\n[[tenant]]\nname = \"a\"\nsocket = \"{}\"\n{extra}\n",
            dir.join("a.sock").display()
        )
    };
    std::fs::write(&file, text("allowed_models = [\"add-one\"]")).unwrap();
    let config = Config::load(&file).unwrap();
    let backends: Vec<Arc<dyn Backend>> = vec![
        Arc::new(AddOne::new(ADD_ONE, "add-one", None)),
        Arc::new(AddOne::new(SECRET, "secret", None)),
    ];
    let daemon = ai_inferd::daemon::Daemon::start(&config, backends).unwrap();
    let mut fe =
        ai_infer_test_frontend::TestFrontend::connect(&dir.join("a.sock"), Default::default())
            .unwrap();
    let status = |fe: &mut ai_infer_test_frontend::TestFrontend, id| {
        let done = fe
            .call(0, &add_one_request(id, SECRET, 1), &[&f32_bytes(&[1.0])], 0)
            .unwrap();
        done.header().unwrap().status
    };
    assert_eq!(status(&mut fe, 1), Status::ModelNotAllowed);
    std::fs::write(&file, text("allowed_models = [\"*\"]\nmax_in_flight = 7")).unwrap();
    let summary = daemon.reload_from_source().unwrap();
    assert!(summary.contains("max_in_flight 64 -> 7"), "{summary}");
    assert_eq!(status(&mut fe, 2), Status::Ok, "same connection, new grant");
    assert_eq!(fe.models().unwrap().models.len(), 2);
    // An invalid file keeps what runs.
    std::fs::write(&file, text("weight = 0")).unwrap();
    assert!(matches!(
        daemon.reload_from_source(),
        Err(ReloadError::Config(_))
    ));
    assert_eq!(status(&mut fe, 3), Status::Ok);
    drop(fe);
    daemon.shutdown();
}
