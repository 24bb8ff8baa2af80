//! The daemon end to end: a real `Daemon` (in-process threads) on temporary tenant
//! sockets, driven by `ai_infer_test_frontend` over vhost-user with memfd guest memory.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ai_infer_protocol::{
    CancelOutcome, DType, PriorityClass, Request, Status, TensorDesc, TraceCounters, DETAIL_NONE,
};
use ai_infer_test_frontend::{Buffer, Completed, FrontendOptions, Pending, RawDesc, TestFrontend};
use common::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const I: u16 = VRING_DESC_F_INDIRECT as u16;
const WAIT: Duration = Duration::from_secs(10);

/// Runs one add-one INFER of `values` and checks the result in place.
fn check_add_one(fe: &mut TestFrontend, q: u16, id: u64, values: &[f32]) {
    let req = add_one_request(id, ADD_ONE, values.len() as u64);
    let done = fe.call(q, &req, &[&f32_bytes(values)], 0).unwrap();
    let h = done.header().unwrap();
    assert_eq!(h.status, Status::Ok, "{h:?}");
    assert_eq!(h.request_id, id);
    assert_eq!(h.num_outputs, 1);
    assert_eq!(h.payload_len, 4 * values.len() as u64);
    let expected: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
    assert_eq!(f32_values(&done.outputs[0]), expected);
    assert_eq!(done.shapes[0].shape.dims(), &[1, values.len() as u64]);
    assert_eq!(done.shapes[0].data_len, 4 * values.len() as u64);
}

/// Submits a one-value add-one INFER of `value` to `model` on queue 0.
fn submit_one(fe: &mut TestFrontend, id: u64, model: u32, value: f32) -> Pending {
    fe.submit(
        0,
        &add_one_request(id, model, 1),
        &[&f32_bytes(&[value])],
        0,
    )
    .unwrap()
}

/// Runs a one-value add-one INFER of `value` on `model` on queue 0.
fn call_one(fe: &mut TestFrontend, id: u64, model: u32, value: f32) -> Completed {
    fe.call(
        0,
        &add_one_request(id, model, 1),
        &[&f32_bytes(&[value])],
        0,
    )
    .unwrap()
}

#[test]
fn models_config_and_trace_are_per_tenant() {
    let mut b = TenantOpts::new("b", "[\"*\"]");
    b.max_in_flight = 5;
    b.queues = 2;
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"add-one\"]"), b]);
    let mut a = h.connect("a");
    let mut b = h.connect_with(
        "b",
        FrontendOptions {
            num_queues: 2,
            ..FrontendOptions::default()
        },
    );

    let ids = |list: ai_infer_protocol::ModelList| -> Vec<u32> {
        list.models.iter().map(|m| m.id).collect()
    };
    assert_eq!(ids(a.models().unwrap()), vec![ADD_ONE]);
    assert_eq!(ids(b.models().unwrap()), vec![ADD_ONE, GATED, SECRET]);
    let cfg = b.device_config().unwrap();
    assert_eq!((cfg.max_in_flight, cfg.num_request_queues), (5, 2));
    assert_eq!(cfg.validate(), Ok(()));
    assert_eq!(a.device_config().unwrap().max_in_flight, 64);

    check_add_one(&mut a, 0, 1, &[1.0, 2.0, 3.0, 4.0]);
    check_add_one(&mut b, 1, 1, &[5.0]);
    let ta = a.trace().unwrap();
    // MODELS, INFER: this TRACE is not counted.
    assert_eq!(ta.completed, 2);
    assert_eq!(ta.infer_status[Status::Ok as usize], 1);
    assert_eq!((ta.bytes_in, ta.bytes_out), (16, 16));
    assert_eq!(ta.in_flight, 0);
    assert_eq!(ta.in_flight_max, 1);
    let tb = b.trace().unwrap();
    assert_eq!((tb.bytes_in, tb.bytes_out), (4, 4));
    assert_eq!(a.trace().unwrap().completed, 3);
}

#[test]
fn infer_outputs_land_in_place_direct_indirect_and_scattered() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mut fe = h.connect("a");
    let values: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5).collect();
    check_add_one(&mut fe, 0, 10, &values);

    // Priority above the ceiling is clamped and counted, not refused.
    let req = add_one_request(11, ADD_ONE, 2).with_priority(PriorityClass::Realtime);
    let done = fe.call(0, &req, &[&f32_bytes(&[1.0, 2.0])], 0).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok);
    assert_eq!(fe.trace().unwrap().priority_clamped, 1);

    // Input split over two separate buffers, output over two: the bounce path.
    let req = add_one_request(12, ADD_ONE, 4);
    let mut head = vec![0u8; req.encoded_len()];
    req.encode(&mut head).unwrap();
    let input = f32_bytes(&[10.0, 20.0, 30.0, 40.0]);
    let parts = [head.len() as u64, 6, 10, 5, 11, 128];
    let addrs: Vec<u64> = parts.iter().map(|l| fe.alloc(*l).unwrap()).collect();
    fe.write(addrs[0], &head).unwrap();
    fe.write(addrs[1], &input[..6]).unwrap();
    fe.write(addrs[2], &input[6..]).unwrap();
    let chain: Vec<Buffer> = parts
        .iter()
        .zip(&addrs)
        .enumerate()
        .map(|(i, (len, addr))| Buffer {
            addr: *addr,
            len: *len as u32,
            writable: i >= 3,
        })
        .collect();
    let head_index = fe.submit_chain(0, &chain).unwrap();
    let used = fe.wait_for(0, head_index, WAIT).unwrap();
    assert_eq!(used.len, 5 + 11 + 128);
    let mut out = fe.read(addrs[3], 5).unwrap();
    out.extend(fe.read(addrs[4], 11).unwrap());
    assert_eq!(f32_values(&out), vec![11.0, 21.0, 31.0, 41.0]);
    let tail = fe.read(addrs[5], 128).unwrap();
    let resp = ai_infer_protocol::Response::decode(&tail).unwrap();
    assert_eq!(resp.header.status, Status::Ok);
    assert_eq!(resp.header.request_id, 12);
    fe.release_chain(0, head_index).unwrap();

    // The same through indirect descriptors, and with EVENT_IDX interrupts.
    drop(fe);
    let mut fe = h.connect_with(
        "a",
        FrontendOptions {
            indirect: true,
            event_idx: true,
            ..FrontendOptions::default()
        },
    );
    assert_ne!(fe.acked_features() & (1 << 29), 0);
    for id in 0..20 {
        check_add_one(&mut fe, 0, id, &[id as f32, 1.0]);
    }
    assert!(fe.interrupts(0).unwrap() > 0);
}

/// Writes `bytes` into fresh guest buffers and returns (addr, len) of each.
fn bufs(fe: &mut TestFrontend, parts: &[&[u8]]) -> Vec<(u64, u32)> {
    parts
        .iter()
        .map(|p| {
            let a = fe.alloc(p.len() as u64).unwrap();
            fe.write(a, p).unwrap();
            (a, p.len() as u32)
        })
        .collect()
}

/// Submits a chain of readable `r` and writable `w` buffers; returns (used, W tail).
fn send(
    fe: &mut TestFrontend,
    r: &[&[u8]],
    w_lens: &[u32],
) -> (ai_infer_test_frontend::UsedElem, Vec<u8>) {
    let rb = bufs(fe, r);
    let w_fill: Vec<Vec<u8>> = w_lens.iter().map(|l| vec![0xaa; *l as usize]).collect();
    let w_refs: Vec<&[u8]> = w_fill.iter().map(|v| v.as_slice()).collect();
    let wb = bufs(fe, &w_refs);
    let chain: Vec<Buffer> = rb
        .iter()
        .map(|(addr, len)| Buffer {
            addr: *addr,
            len: *len,
            writable: false,
        })
        .chain(wb.iter().map(|(addr, len)| Buffer {
            addr: *addr,
            len: *len,
            writable: true,
        }))
        .collect();
    let head = fe.submit_chain(0, &chain).unwrap();
    let used = fe.wait_for(0, head, WAIT).unwrap();
    fe.release_chain(0, head).unwrap();
    let mut w = Vec::new();
    for (addr, len) in &wb {
        w.extend(fe.read(*addr, *len as usize).unwrap());
    }
    (used, w)
}

fn status_of(used: ai_infer_test_frontend::UsedElem, w: &[u8]) -> (Status, u32, u64) {
    assert_eq!(used.len as usize, w.len(), "used.len must be the whole W");
    let h = ai_infer_protocol::ResponseHeader::decode(&w[w.len() - 48..]).unwrap();
    (h.status, h.detail, h.request_id)
}

fn encoded(req: &Request) -> Vec<u8> {
    let mut b = vec![0u8; req.encoded_len()];
    req.encode(&mut b).unwrap();
    b
}

/// Sends a hand-made chain (descriptors as given, `next` = absolute index) whose
/// buffers are preset to 0xaa, and checks it comes back with used.len = 0 (the
/// caller checks that nothing was written and frees the slots).
fn expect_unanswered(fe: &mut TestFrontend, descs: &[RawDesc], slots: &[u16]) {
    for (slot, d) in slots.iter().zip(descs) {
        fe.write_descriptor(0, *slot, *d).unwrap();
    }
    fe.publish(0, slots[0]).unwrap();
    let used = fe.wait_for(0, slots[0], WAIT).unwrap();
    assert_eq!(used.len, 0, "{descs:?}");
}

/// An answered bad request: name, readable parts, writable lengths, status, detail.
type Case = (String, Vec<Vec<u8>>, Vec<u32>, Status, u32);

#[test]
fn every_bad_request_gets_its_status_while_another_tenant_is_served() {
    let h = Harness::start(
        2,
        &[
            TenantOpts::new("a", "[\"add-one\", \"gated\"]"),
            TenantOpts::new("b", "[\"add-one\"]"),
        ],
    );
    let mut a = h.connect("a");

    // Tenant b runs correct requests all along.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut b = h.connect("b");
    let (stop2, served2) = (stop.clone(), served.clone());
    let other = std::thread::spawn(move || {
        let mut id = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            id += 1;
            let v = id as f32;
            check_add_one(&mut b, 0, id, &[v, -v, 0.25]);
            served2.fetch_add(1, Ordering::SeqCst);
        }
        b.trace().unwrap()
    });

    let good = add_one_request(1, ADD_ONE, 4);
    let good_bytes = encoded(&good);
    let input = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let w_good = [16u32, 128];

    // Each answered case: (readable parts, writable lengths, status, detail).
    let mut cases: Vec<Case> = Vec::new();
    let mut short = vec![0u8; 20];
    short[8..16].copy_from_slice(&1u64.to_le_bytes());
    cases.push((
        "R < 40".into(),
        vec![short],
        vec![48],
        Status::BadRequest,
        DETAIL_NONE,
    ));
    let patch = |off: usize, val: &[u8]| {
        let mut b = good_bytes.clone();
        b[off..off + val.len()].copy_from_slice(val);
        b
    };
    cases.push((
        "opcode 9".into(),
        vec![patch(0, &9u32.to_le_bytes()), input.clone()],
        w_good.to_vec(),
        Status::UnknownOpcode,
        DETAIL_NONE,
    ));
    cases.push((
        "priority 7".into(),
        vec![patch(0x24, &[7]), input.clone()],
        w_good.to_vec(),
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "flags".into(),
        vec![patch(0x25, &[1]), input.clone()],
        w_good.to_vec(),
        Status::Unsupported,
        DETAIL_NONE,
    ));
    cases.push((
        "reserved".into(),
        vec![patch(0x26, &[1]), input.clone()],
        w_good.to_vec(),
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "17 inputs".into(),
        vec![patch(0x20, &17u16.to_le_bytes()), input.clone()],
        w_good.to_vec(),
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "input data_len 12".into(),
        vec![patch(40 + 72, &12u64.to_le_bytes()), input.clone()],
        w_good.to_vec(),
        Status::BadRequest,
        0,
    ));
    cases.push((
        "R too long".into(),
        vec![good_bytes.clone(), input.clone(), vec![0; 4]],
        w_good.to_vec(),
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "W too long".into(),
        vec![good_bytes.clone(), input.clone()],
        vec![16, 129],
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "unknown model".into(),
        vec![patch(4, &99u32.to_le_bytes()), input.clone()],
        w_good.to_vec(),
        Status::UnknownModel,
        DETAIL_NONE,
    ));
    cases.push((
        "model not allowed".into(),
        vec![patch(4, &SECRET.to_le_bytes()), input.clone()],
        w_good.to_vec(),
        Status::ModelNotAllowed,
        DETAIL_NONE,
    ));
    let wrong_dtype = Request::infer(
        1,
        ADD_ONE,
        vec![TensorDesc::input(DType::I32, &[1, 4]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[1, 4], 16).unwrap()],
    )
    .unwrap();
    cases.push((
        "input dtype".into(),
        vec![encoded(&wrong_dtype), input.clone()],
        w_good.to_vec(),
        Status::BadTensor,
        0,
    ));
    let too_big = Request::infer(
        1,
        ADD_ONE,
        vec![TensorDesc::input(DType::F32, &[9, 1]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[9, 1], 36).unwrap()],
    )
    .unwrap();
    cases.push((
        "dim out of range".into(),
        vec![encoded(&too_big), f32_bytes(&[0.0; 9])],
        vec![36, 128],
        Status::BadTensor,
        0,
    ));
    let mut small_out = add_one_request(1, ADD_ONE, 4);
    small_out.outputs[0].data_len = 8;
    cases.push((
        "output too small (known shape)".into(),
        vec![encoded(&small_out), input.clone()],
        vec![8, 128],
        Status::BufferTooSmall,
        1,
    ));
    let mut models = encoded(&Request::models(1));
    cases.push((
        "MODELS payload too small".into(),
        vec![models.clone()],
        vec![10 + 48],
        Status::BufferTooSmall,
        DETAIL_NONE,
    ));
    models[4] = 7;
    cases.push((
        "MODELS with a model id".into(),
        vec![models],
        vec![4096],
        Status::BadRequest,
        DETAIL_NONE,
    ));
    cases.push((
        "TRACE payload too small".into(),
        vec![encoded(&Request::trace(1))],
        vec![100 + 48],
        Status::BufferTooSmall,
        DETAIL_NONE,
    ));
    cases.push((
        "CANCEL with a payload".into(),
        vec![encoded(&Request::cancel(1, 5))],
        vec![96],
        Status::BadRequest,
        DETAIL_NONE,
    ));

    for (name, r, w, status, detail) in &cases {
        let r_refs: Vec<&[u8]> = r.iter().map(|v| v.as_slice()).collect();
        let (used, wbytes) = send(&mut a, &r_refs, w);
        let got = status_of(used, &wbytes);
        assert_eq!((got.0, got.1), (*status, *detail), "{name}");
        assert_eq!(got.2, 1, "{name}: request id echoed");
    }

    // Output shape unknown and too small: computed, then BUFFER_TOO_SMALL with shapes.
    let unknown = Request::infer(
        1,
        ADD_ONE,
        vec![TensorDesc::input(DType::F32, &[1, 4]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[0, 0], 8).unwrap()],
    )
    .unwrap();
    let done = a.call(0, &unknown, &[&input], 0).unwrap();
    let hdr = done.header().unwrap();
    assert_eq!(
        (hdr.status, hdr.detail, hdr.payload_len, hdr.num_outputs),
        (Status::BufferTooSmall, 1, 16, 1)
    );
    assert_eq!(done.shapes[0].shape.dims(), &[1, 4]);
    assert_eq!(done.shapes[0].data_len, 16);

    // Overlap: the output buffer aliases the input.
    let rb = bufs(&mut a, &[&good_bytes, &input]);
    let tail = a.alloc(128).unwrap();
    let chain = [
        Buffer {
            addr: rb[0].0,
            len: rb[0].1,
            writable: false,
        },
        Buffer {
            addr: rb[1].0,
            len: rb[1].1,
            writable: false,
        },
        Buffer {
            addr: rb[1].0 + 8,
            len: 16,
            writable: true,
        },
        Buffer {
            addr: tail,
            len: 128,
            writable: true,
        },
    ];
    let head = a.submit_chain(0, &chain).unwrap();
    let used = a.wait_for(0, head, WAIT).unwrap();
    a.release_chain(0, head).unwrap();
    let wbytes = [a.read(rb[1].0 + 8, 16).unwrap(), a.read(tail, 128).unwrap()].concat();
    assert_eq!(status_of(used, &wbytes).0, Status::BadRequest);

    // Duplicate in-flight request id: the first one is held at the gate.
    h.gate.close();
    let held = submit_one(&mut a, 500, GATED, 1.0);
    h.gate.wait_entered(1);
    let dup = call_one(&mut a, 500, ADD_ONE, 1.0);
    assert_eq!(dup.header().unwrap().status, Status::BadRequest);
    h.gate.open();
    let done = a.wait(held, WAIT).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok);
    assert_eq!(f32_values(&done.outputs[0]), vec![2.0]);

    // Step-0 failures: used.len = 0, nothing written.
    let qsize = a.queue_size(0).unwrap();
    let data = a.alloc(4096).unwrap();
    a.write(data, &[0xaa; 4096]).unwrap();
    let s = a.alloc_descriptors(0, 3).unwrap();
    let d = |addr, len, flags, next| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    // next index beyond the queue.
    expect_unanswered(
        &mut a,
        &[d(data, 40, R | N, qsize), d(data, 48, W, 0)],
        &s[..2],
    );
    // A loop.
    expect_unanswered(
        &mut a,
        &[d(data, 40, R | N, s[1]), d(data + 64, 48, W | N, s[0])],
        &s[..2],
    );
    // Readable after writable.
    expect_unanswered(
        &mut a,
        &[d(data, 48, W | N, s[1]), d(data + 64, 40, R, 0)],
        &s[..2],
    );
    // Outside guest memory; addr + len overflowing.
    expect_unanswered(
        &mut a,
        &[d(0x1000, 40, R | N, s[1]), d(data, 48, W, 0)],
        &s[..2],
    );
    expect_unanswered(
        &mut a,
        &[d(u64::MAX - 10, 40, R | N, s[1]), d(data, 48, W, 0)],
        &s[..2],
    );
    // W < 48.
    expect_unanswered(
        &mut a,
        &[d(data, 40, R | N, s[1]), d(data + 64, 47, W, 0)],
        &s[..2],
    );
    // Indirect with NEXT; indirect table of a bad length; too many descriptors.
    let table = a.alloc(16 * 300).unwrap();
    for i in 0..300u16 {
        let raw = [
            (data).to_le_bytes().as_slice(),
            &48u32.to_le_bytes(),
            &(W | N).to_le_bytes(),
            &(i + 1).to_le_bytes(),
        ]
        .concat();
        a.write(table + 16 * u64::from(i), &raw).unwrap();
    }
    expect_unanswered(
        &mut a,
        &[d(table, 32, I | N, s[1]), d(data, 48, W, 0)],
        &s[..2],
    );
    expect_unanswered(&mut a, &[d(table, 24, I, 0)], &s[..1]);
    expect_unanswered(&mut a, &[d(table, 16 * 300, I, 0)], &s[..1]);
    assert_eq!(a.read(data, 4096).unwrap(), vec![0xaa; 4096]);
    a.free_descriptors(0, &s).unwrap();

    // Tenant a still works, and its counters saw everything it sent.
    check_add_one(&mut a, 0, 2, &[7.0]);
    let t: TraceCounters = a.trace().unwrap();
    assert!(t.infer_status[Status::BadRequest as usize] >= 4);
    assert_eq!(t.infer_status[Status::UnknownModel as usize], 1);
    assert_eq!(t.infer_status[Status::ModelNotAllowed as usize], 1);
    assert_eq!(t.in_flight, 0);

    // Under load tenant a can get through all of the above before b's first request
    // completes; b must have been served alongside, so let it finish one.
    let since = std::time::Instant::now();
    while served.load(Ordering::SeqCst) == 0 && since.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    let tb = other.join().unwrap();
    assert!(served.load(Ordering::SeqCst) > 0);
    // Tenant b saw only its own, all-OK requests.
    assert_eq!(
        tb.infer_status.iter().sum::<u64>(),
        tb.infer_status[Status::Ok as usize]
    );
    assert_eq!(
        tb.infer_status[Status::Ok as usize],
        served.load(Ordering::SeqCst)
    );
}

#[test]
fn cancel_reports_cancelled_not_found_and_already_running() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mut fe = h.connect("a");
    h.gate.close();
    let running = submit_one(&mut fe, 1, GATED, 1.0);
    h.gate.wait_entered(1);
    // Queued behind the running batch on the only executor.
    let queued = submit_one(&mut fe, 2, ADD_ONE, 2.0);
    assert_eq!(fe.cancel(0, 100, 2).unwrap(), CancelOutcome::Cancelled);
    // The target's used element came before the CANCEL's: it is already there.
    let used = fe
        .poll_used(0)
        .unwrap()
        .expect("cancelled target published first");
    assert_eq!(used.id, queued.head);
    let done = fe.finish(queued, used).unwrap();
    let hdr = done.header().unwrap();
    assert_eq!(
        (hdr.status, hdr.compute_ns, hdr.request_id),
        (Status::Cancelled, 0, 2)
    );
    assert_eq!(done.outputs[0], vec![0u8; 4], "outputs untouched");

    assert_eq!(fe.cancel(0, 101, 1).unwrap(), CancelOutcome::AlreadyRunning);
    assert_eq!(fe.cancel(0, 102, 77).unwrap(), CancelOutcome::NotFound);
    h.gate.open();
    let done = fe.wait(running, WAIT).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok);
    assert_eq!(fe.cancel(0, 103, 1).unwrap(), CancelOutcome::NotFound);
    let t = fe.trace().unwrap();
    assert_eq!(t.infer_status[Status::Cancelled as usize], 1);
    assert_eq!(t.in_flight, 0);
}

#[test]
fn max_in_flight_gives_queue_full() {
    let mut t = TenantOpts::new("a", "[\"*\"]");
    t.max_in_flight = 2;
    let h = Harness::start(1, &[t]);
    let mut fe = h.connect("a");
    h.gate.close();
    let p1 = submit_one(&mut fe, 1, GATED, 1.0);
    h.gate.wait_entered(1);
    let p2 = submit_one(&mut fe, 2, ADD_ONE, 2.0);
    let full = call_one(&mut fe, 3, ADD_ONE, 3.0);
    let hdr = full.header().unwrap();
    assert_eq!((hdr.status, hdr.request_id), (Status::QueueFull, 3));
    h.gate.open();
    for p in [p1, p2] {
        assert_eq!(
            fe.wait(p, WAIT).unwrap().header().unwrap().status,
            Status::Ok
        );
    }
    check_add_one(&mut fe, 0, 3, &[3.0]);
}

#[test]
fn disconnect_mid_request_discards_it_and_reconnect_works() {
    let mut a = TenantOpts::new("a", "[\"*\"]");
    a.max_in_flight = 2;
    let h = Harness::start(2, &[a, TenantOpts::new("b", "[\"add-one\"]")]);
    let mut b = h.connect("b");
    let mut fe = h.connect("a");
    h.gate.close();
    let _held = submit_one(&mut fe, 1, GATED, 1.0);
    h.gate.wait_entered(1);
    drop(fe);
    // The other tenant is served on the other executor meanwhile.
    for id in 0..5 {
        check_add_one(&mut b, 0, id, &[id as f32]);
    }
    h.gate.open();

    let mut fe = h.connect("a");
    let t = fe.trace().unwrap();
    assert_eq!((t.completed, t.in_flight), (0, 0), "fresh counters");
    check_add_one(&mut fe, 0, 1, &[4.0]);
    // The abandoned request no longer counts against max_in_flight = 2.
    h.gate.close();
    let p1 = submit_one(&mut fe, 10, GATED, 1.0);
    let p2 = submit_one(&mut fe, 11, GATED, 1.0);
    h.gate.wait_entered(3);
    let full = call_one(&mut fe, 12, ADD_ONE, 1.0);
    assert_eq!(full.header().unwrap().status, Status::QueueFull);
    h.gate.open();
    for p in [p1, p2] {
        assert_eq!(
            fe.wait(p, WAIT).unwrap().header().unwrap().status,
            Status::Ok
        );
    }
    check_add_one(&mut b, 0, 99, &[1.5]);
}

#[test]
fn reset_abandons_in_flight_requests_without_completing_them() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mut fe = h.connect("a");
    h.gate.close();
    let held = submit_one(&mut fe, 1, GATED, 1.0);
    h.gate.wait_entered(1);
    let queued = submit_one(&mut fe, 2, ADD_ONE, 2.0);
    let gate = h.gate.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        gate.open();
    });
    // Returns once the running batch finished; its result is discarded.
    fe.reset_device().unwrap();
    opener.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fe.poll_used(0).unwrap(),
        None,
        "abandoned chains are never returned"
    );
    // The running batch may have written its output before the reset completed;
    // the queued request never ran.
    assert_eq!(fe.read_output(&queued, 0).unwrap(), vec![0u8; 4]);
    drop(held);
}

#[test]
fn a_corrupt_ring_stops_only_that_tenant() {
    let h = Harness::start(
        1,
        &[
            TenantOpts::new("a", "[\"*\"]"),
            TenantOpts::new("b", "[\"*\"]"),
        ],
    );
    let mut a = h.connect("a");
    let mut b = h.connect("b");
    check_add_one(&mut a, 0, 1, &[1.0]);
    // The available index jumps by more than the queue size.
    a.set_avail_idx(0, 1 + 300).unwrap();
    let p = submit_one(&mut a, 2, ADD_ONE, 1.0);
    assert!(a.wait_for(0, p.head, Duration::from_millis(300)).is_err());
    check_add_one(&mut b, 0, 1, &[2.0]);
}

#[test]
fn a_request_whose_deadline_passed_in_the_queue_is_not_run() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mut fe = h.connect("a");
    h.gate.close();
    let held = submit_one(&mut fe, 1, GATED, 1.0);
    h.gate.wait_entered(1);
    // The deadline leaves room for a loaded host between taking the chain and
    // admitting it, and passes long before the gate opens.
    let late = add_one_request(2, ADD_ONE, 1).with_deadline_us(20_000);
    let late = fe.submit(0, &late, &[&f32_bytes(&[2.0])], 0).unwrap();
    // A TRACE behind it on the same queue is answered only after the device took
    // `late`, so the 50 ms below are all spent in the queue (queue_ns counts from then).
    fe.trace().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    h.gate.open();
    for (p, status) in [(held, Status::Ok), (late, Status::Deadline)] {
        let done = fe.wait(p, WAIT).unwrap();
        let hdr = done.header().unwrap();
        assert_eq!(hdr.status, status);
        if status == Status::Deadline {
            assert_eq!((hdr.compute_ns, hdr.batch_size), (0, 0));
            assert!(hdr.queue_ns >= 50_000_000, "{hdr:?}");
            assert_eq!(done.outputs[0], vec![0u8; 4], "never ran");
        }
    }
    assert_eq!(
        fe.trace().unwrap().infer_status[Status::Deadline as usize],
        1
    );
}

/// The manifest's per-model settings reach the scheduler, and a reload of the daemon's
/// batch delay changes only the models that do not set their own.
#[test]
fn per_model_delay_and_instances_shape_the_policies_and_survive_a_reload() {
    use ai_inferd::backend::Backend;
    use ai_inferd::config::Config;
    use ai_inferd::daemon::Daemon;
    use ai_inferd::models::ModelServing;
    let tmp = test_dir();
    let dir = tmp.path();
    let text = |delay_us: u32| {
        format!(
            "[daemon]\nmodels = \"unused.toml\"\nexecutor_threads = 3\nmax_batch_delay_us = {delay_us}\n\
             [[tenant]]\nname = \"a\"\nsocket = \"{}\"\nallowed_models = [\"*\"]\n",
            dir.join("a.sock").display()
        )
    };
    let backends: Vec<Arc<dyn Backend>> = vec![
        Arc::new(AddOne::new(ADD_ONE, "add-one", None)),
        Arc::new(AddOne::new(SECRET, "secret", None)),
    ];
    let serving = [(
        ADD_ONE,
        ModelServing {
            max_queue_delay_ns: Some(7_000_000),
            instances: Some(2),
        },
    )]
    .into_iter()
    .collect();
    let daemon =
        Daemon::start_serving(&Config::parse(&text(100)).unwrap(), backends, serving).unwrap();
    let policy = |id| {
        daemon
            .shared()
            .engine
            .scheduler
            .with_core(|core| core.model_policy(id).cloned().unwrap())
    };
    let (set, unset) = (policy(ADD_ONE), policy(SECRET));
    assert_eq!(set.max_queue_delay_ns, 7_000_000);
    assert_eq!(set.executors.len(), 2, "instances = 2 of 3 executors");
    assert_eq!(unset.max_queue_delay_ns, 100_000, "the daemon's delay");
    assert_eq!(unset.executors.len(), 3, "every executor");

    daemon.reload(Config::parse(&text(300)).unwrap()).unwrap();
    assert_eq!(policy(ADD_ONE).max_queue_delay_ns, 7_000_000);
    assert_eq!(policy(ADD_ONE).executors, set.executors);
    assert_eq!(policy(SECRET).max_queue_delay_ns, 300_000);
    daemon.shutdown();
}
