//! Fault containment in the shared daemon: a request that panics or fails the
//! backend fails alone and exactly once, the executor keeps serving, one tenant
//! cannot fill a model's queue against another, the config refuses limits it cannot
//! honour, and a tenant flooding malformed and looping chains barely moves another
//! tenant's latency.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{Status, TraceCounters};
use ai_infer_scheduler::{Reject, TenantId};
use ai_infer_test_frontend::{FrontendOptions, Pending, RawDesc, TestFrontend};
use ai_inferd::backend::synthetic::{SyntheticModel, FAIL_INPUT, PANIC_INPUT};
use ai_inferd::backend::Backend;
use ai_inferd::config::{Config, ConfigError};
use ai_inferd::executor::FAULTS;
use common::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const WAIT: Duration = Duration::from_secs(10);
const SYNTH: u32 = 50;

/// The synthetic model (y = x) with its fault inputs armed, batches of up to 4.
fn faulty(fixed: Duration) -> Arc<dyn Backend> {
    Arc::new(SyntheticModel::new(SYNTH, "synthetic", 4, fixed, Duration::ZERO).with_faults())
}

fn tenant(name: &str, extra: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\nsocket = \"{{dir}}/{name}.sock\"\n\
         allowed_models = [\"synthetic\", \"gated\"]\n{extra}\n"
    )
}

/// A daemon with one executor serving the faulty synthetic model and a gated
/// add-one, for tenants `a` and `b`.
fn start(gate: &Arc<Gate>, a_extra: &str, b_extra: &str) -> Harness {
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{}{}",
        tenant("a", a_extra),
        tenant("b", b_extra)
    );
    let mut h = Harness::custom(
        &text,
        vec![
            faulty(Duration::from_millis(2)),
            Arc::new(AddOne::new(GATED, "gated", Some(gate.clone()))),
        ],
    );
    // Dropping the harness opens the gate: a failed test never hangs in shutdown.
    h.gate = gate.clone();
    h
}

fn submit(fe: &mut TestFrontend, q: u16, id: u64, value: f32) -> Pending {
    fe.submit(
        q,
        &add_one_request(id, SYNTH, 1),
        &[&f32_bytes(&[value])],
        0,
    )
    .unwrap()
}

/// Holds the only executor in a gated request of `fe`'s, so what is submitted next
/// queues and runs as one batch when the gate opens.
fn hold(fe: &mut TestFrontend, gate: &Gate) -> Pending {
    gate.close();
    let held = fe
        .submit(
            0,
            &add_one_request(9999, GATED, 1),
            &[&f32_bytes(&[0.0])],
            0,
        )
        .unwrap();
    gate.wait_entered(1);
    held
}

/// Waits until `n` INFER requests of the synthetic model reached the scheduler.
fn wait_submitted(h: &Harness, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = h.daemon().shared().engine.scheduler.stats();
        let seen = stats
            .models
            .iter()
            .find(|m| m.model == SYNTH)
            .map_or(0, |m| m.stats.requests);
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} of {n} requests arrived"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether the scheduler ran the synthetic model in a batch of more than one.
fn batched(h: &Harness) -> bool {
    let stats = h.daemon().shared().engine.scheduler.stats();
    let m = stats.models.iter().find(|m| m.model == SYNTH).unwrap();
    m.stats.batch_sizes.sum > m.stats.batch_sizes.count
}

/// `bad` from tenant a shares a batch with three requests of tenant b; b's succeed,
/// a's gets BACKEND_ERROR exactly once, and the executor serves on.
fn bad_request_fails_alone(bad: f32) {
    let gate = Arc::new(Gate::default());
    let h = start(&gate, "", "");
    let mut a = h.connect("a");
    let mut b = h.connect("b");
    let held = hold(&mut b, &gate);
    let reruns = FAULTS.reruns.load(Ordering::Relaxed);

    let bad = submit(&mut a, 0, 1, bad);
    let good: Vec<Pending> = (0..3u64)
        .map(|i| submit(&mut b, 0, 10 + i, 10.0 + i as f32))
        .collect();
    wait_submitted(&h, 4);
    gate.open();
    assert_eq!(
        b.wait(held, WAIT).unwrap().header().unwrap().status,
        Status::Ok
    );

    let done = a.wait(bad, WAIT).unwrap();
    let header = done.header().unwrap();
    assert_eq!(header.status, Status::BackendError, "{header:?}");
    assert_eq!(header.request_id, 1);
    for (i, p) in good.into_iter().enumerate() {
        let done = b.wait(p, WAIT).unwrap();
        assert_eq!(done.header().unwrap().status, Status::Ok, "request {i}");
        assert_eq!(f32_values(&done.outputs[0]), vec![10.0 + i as f32]);
    }
    assert!(batched(&h), "the four requests never shared a batch");
    assert!(FAULTS.reruns.load(Ordering::Relaxed) > reruns);

    // Exactly once: nothing more comes back for the bad chain.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.poll_used(0).unwrap(), None);
    let t: TraceCounters = a.trace().unwrap();
    assert_eq!(t.infer_status[Status::BackendError as usize], 1);
    assert_eq!(t.in_flight, 0);

    // The executor still serves both tenants.
    for (fe, id) in [(&mut a, 2), (&mut b, 20)] {
        let p = submit(fe, 0, id, 5.0);
        let done = fe.wait(p, WAIT).unwrap();
        assert_eq!(done.header().unwrap().status, Status::Ok);
        assert_eq!(f32_values(&done.outputs[0]), vec![5.0]);
    }
}

#[test]
fn a_panicking_request_fails_alone_exactly_once_and_the_executor_serves_on() {
    let panics = FAULTS.panics.load(Ordering::Relaxed);
    bad_request_fails_alone(PANIC_INPUT);
    assert!(FAULTS.panics.load(Ordering::Relaxed) > panics);
}

#[test]
fn a_request_that_fails_its_batch_fails_alone() {
    bad_request_fails_alone(FAIL_INPUT);
}

#[test]
fn a_tenant_filling_a_model_queue_leaves_room_for_another() {
    // a may have 1024 requests in flight over its two models (a 512 share of each
    // model queue); the executor is held so everything it sends queues.
    let gate = Arc::new(Gate::default());
    let queues = 8u16;
    let h = start(
        &gate,
        &format!("max_in_flight = 1024\nnum_request_queues = {queues}"),
        "",
    );
    let mut a = h.connect_with(
        "a",
        FrontendOptions {
            num_queues: queues,
            indirect: true,
            ..FrontendOptions::default()
        },
    );
    let mut b = h.connect("b");
    let held = hold(&mut b, &gate);

    let sent = 1024u64;
    let mut pending = Vec::new();
    for id in 0..sent {
        let q = (id % u64::from(queues)) as u16;
        pending.push(submit(&mut a, q, 100 + id, 1.0));
    }
    wait_submitted(&h, sent);
    let stats = h.daemon().shared().engine.scheduler.stats();
    let a_stats = &stats.tenants[0].stats;
    let refused = a_stats.rejected[Reject::QueueFull.index()];
    println!(
        "tenant a: {} admitted, {refused} QUEUE_FULL of {sent}",
        a_stats.admitted
    );
    assert_eq!(stats.tenants[0].tenant, TenantId(0));
    assert_eq!(a_stats.admitted, 512, "a holds its share of the queue");
    assert_eq!(refused, sent - 512);

    // b's first request to the model is admitted.
    let first = submit(&mut b, 0, 1, 3.0);
    wait_submitted(&h, sent + 1);
    let stats = h.daemon().shared().engine.scheduler.stats();
    assert_eq!(
        stats.tenants[1].stats.rejected[Reject::QueueFull.index()],
        0
    );
    gate.open();
    assert_eq!(
        b.wait(held, WAIT).unwrap().header().unwrap().status,
        Status::Ok
    );
    let done = b.wait(first, WAIT).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok);
    assert_eq!(f32_values(&done.outputs[0]), vec![3.0]);
    let mut statuses = [0u64; 2];
    for p in pending {
        let done = a.wait(p, WAIT).unwrap();
        match done.header().unwrap().status {
            Status::Ok => statuses[0] += 1,
            Status::QueueFull => statuses[1] += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(statuses, [512, sent - 512]);
}

#[test]
fn the_config_refuses_limits_it_cannot_honour() {
    let config = |a: &str, b: &str| {
        let text = format!(
            "[daemon]\nmodels = \"m\"\n{}{}",
            tenant("a", a),
            tenant("b", b)
        )
        .replace("{dir}", "/tmp");
        Config::parse(&text)
    };
    // Equal weights: a 512 share of each of two models.
    let c = config("max_in_flight = 1024", "").unwrap();
    assert_eq!(c.tenants[0].policy().max_queued_per_model, Some(512));
    let c = config("weight = 3", "max_queued_per_model = 100").unwrap();
    assert_eq!(c.tenants[0].policy().max_queued_per_model, Some(768));
    assert_eq!(c.tenants[1].policy().max_queued_per_model, Some(100));

    match config("max_in_flight = 1025", "") {
        Err(e @ ConfigError::InFlightAboveShare { .. }) => {
            let text = e.to_string();
            for part in ["\"a\"", "1025", "512", "2 model"] {
                assert!(text.contains(part), "{text}");
            }
        }
        other => panic!("{other:?}"),
    }
    match config("max_queued_per_model = 1000", "max_queued_per_model = 100") {
        Err(e @ ConfigError::QueueShares { .. }) => {
            let text = e.to_string();
            for part in ["\"b\"", "1100", "1024"] {
                assert!(text.contains(part), "{text}");
            }
        }
        other => panic!("{other:?}"),
    }
    for bad in ["max_queued_per_model = 0", "max_queued_per_model = 1025"] {
        assert!(
            matches!(
                config(bad, ""),
                Err(ConfigError::OutOfRange {
                    field: "max_queued_per_model",
                    ..
                })
            ),
            "{bad}"
        );
    }
}

/// The 99th percentile of `samples`.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// `n` sequential requests of `fe`, each's round trip.
fn latencies(fe: &mut TestFrontend, n: u64) -> Vec<Duration> {
    (0..n)
        .map(|id| {
            let start = Instant::now();
            let p = submit(fe, 0, id, 1.0);
            let done = fe.wait(p, WAIT).unwrap();
            assert_eq!(done.header().unwrap().status, Status::Ok);
            start.elapsed()
        })
        .collect()
}

/// Keeps `pairs` looping chains and as many malformed requests outstanding on
/// `fe`'s queue 0, resubmitting each as soon as it comes back, until `stop`.
fn flood(mut fe: TestFrontend, pairs: usize, stop: &AtomicBool) -> u64 {
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    let data = fe.alloc(4096).unwrap();
    fe.write(data, &[0xaa; 4096]).unwrap();
    let slots = fe.alloc_descriptors(0, 4 * pairs).unwrap();
    let mut heads = Vec::new();
    for s in slots.chunks_exact(4) {
        let d = |addr, len, flags, next| RawDesc {
            addr,
            len,
            flags,
            next,
        };
        // A loop, then a garbage header with room for the response.
        fe.write_descriptor(0, s[0], d(data, 40, R | N, s[1]))
            .unwrap();
        fe.write_descriptor(0, s[1], d(data + 64, 48, W | N, s[0]))
            .unwrap();
        fe.write_descriptor(0, s[2], d(data + 128, 64, R | N, s[3]))
            .unwrap();
        fe.write_descriptor(0, s[3], d(data + 1024, 256, W, 0))
            .unwrap();
        heads.extend([s[0], s[2]]);
    }
    for head in &heads {
        fe.publish(0, *head).unwrap();
    }
    let mut sent = heads.len() as u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(used) = fe.wait_any(0, Duration::from_millis(100)) else {
            continue;
        };
        fe.publish(0, used.id).unwrap();
        sent += 1;
    }
    sent
}

#[test]
fn a_flooding_neighbour_barely_moves_another_tenants_p99() {
    let gate = Arc::new(Gate::default());
    let text = format!(
        "[daemon]\nmodels = \"m\"\nexecutor_threads = 1\n{}{}",
        tenant("a", ""),
        tenant("b", "")
    );
    let h = Harness::custom(
        &text,
        vec![
            faulty(Duration::from_millis(5)),
            Arc::new(AddOne::new(GATED, "gated", Some(gate))),
        ],
    );
    let mut b = h.connect("b");
    let samples = 300;
    latencies(&mut b, 20);
    let alone = p99(latencies(&mut b, samples));

    let attacker = h.connect("a");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let flooder = std::thread::spawn(move || flood(attacker, 32, &stop2));
    std::thread::sleep(Duration::from_millis(200));
    let attacked = p99(latencies(&mut b, samples));
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();

    let ratio = attacked.as_secs_f64() / alone.as_secs_f64();
    println!(
        "isolation under a flood of {sent} malformed and looping chains: tenant b p99 \
         {attacked:?} against {alone:?} alone, ratio {ratio:.2}"
    );
    assert!(sent > 1000, "the flood sent only {sent} chains");
    assert!(ratio <= 3.0, "p99 ratio {ratio:.2}");
}
