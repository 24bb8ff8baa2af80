//! virtio-net tests: guest memory and queues built here (`MockSplitQueue`), the tap
//! replaced by a `socketpair(AF_UNIX, SOCK_DGRAM)`, which keeps frame boundaries.

// Lengths and indices here are small test constants.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{LimiterUpdate, NetResources, NetWorker, TAP_TOKEN, TX_LIMITER_TOKEN};
use super::*;
use crate::rate_limiter::TokenBucketConfig;
use crate::virtio::test_support::{
    activate, activate_params, memory, read_guest, DriverEnds, DriverRing, Rng,
};
use crate::virtio::{VirtioInterrupt, WorkerLoop, VIRTIO_F_VERSION_1};

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x8000;
const RX_BUFS: u64 = 0x4_0000;
const TX_BUFS: u64 = 0x8_0000;
const MEM_SIZE: usize = 0x10_0000;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// The device end of the socket pair, recording the offloads it is given.
struct Dgram {
    sock: UnixDatagram,
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl AsRawFd for Dgram {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for Dgram {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sock.send(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// A device end for the worker and the host end for the test, both non-blocking.
fn socket_pair() -> (Dgram, UnixDatagram, Arc<Mutex<Vec<u32>>>) {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let offloads = Arc::new(Mutex::new(Vec::new()));
    (
        Dgram {
            sock: dev,
            offloads: Arc::clone(&offloads),
        },
        host,
        offloads,
    )
}

/// Every frame the host end has.
fn host_frames(host: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0; MAX_FRAME_LEN + 16];
    while let Ok(n) = host.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// A frame: a header with a recognisable num_buffers the device must overwrite on rx,
/// then `payload` bytes.
fn frame(payload: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + payload];
    f[0] = 0; // flags
    f[1] = 0; // gso_type
    f[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&0xbeefu16.to_le_bytes());
    for (i, b) in f[VNET_HDR_LEN..].iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8).wrapping_mul(31);
    }
    f
}

struct Rig {
    worker: NetWorker,
    epoll: Epoll,
    host: UnixDatagram,
    metrics: Arc<NetMetrics>,
    irq: Arc<VirtioInterrupt>,
    _updates: Sender<LimiterUpdate>,
}

impl Rig {
    fn new(
        mem: &GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
        mergeable: bool,
        rx_limit: Option<RateLimiterConfig>,
        tx_limit: Option<RateLimiterConfig>,
    ) -> Rig {
        let (dev, host, _) = socket_pair();
        let limiter = |cfg: Option<RateLimiterConfig>| match cfg {
            Some(cfg) => RateLimiter::new(&cfg).unwrap(),
            None => RateLimiter::unlimited().unwrap(),
        };
        let (updates, receiver) = mpsc::channel();
        let res = NetResources {
            backend: Box::new(dev),
            rx_limiter: limiter(rx_limit),
            tx_limiter: limiter(tx_limit),
            updates: receiver,
            update_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let metrics = Arc::new(NetMetrics::default());
        let irq = Arc::new(VirtioInterrupt::unconnected(2).unwrap());
        let mut worker = NetWorker::new(
            mem.clone(),
            rxq,
            txq,
            Arc::clone(&irq),
            res,
            Arc::clone(&metrics),
            mergeable,
        );
        let epoll = Epoll::new().unwrap();
        worker.register(&epoll).unwrap();
        Rig {
            worker,
            epoll,
            host,
            metrics,
            irq,
            _updates: updates,
        }
    }

    fn kick(&mut self, queue: usize) {
        self.worker.queue_event(queue, &self.epoll);
    }

    fn tap_readable(&mut self) {
        self.worker
            .device_event(TAP_TOKEN, EventSet::IN, &self.epoll);
    }

    fn counters(&self) -> NetCounters {
        self.metrics.snapshot()
    }

    /// Interrupts raised for `queue` since the last call.
    fn interrupts(&self, queue: usize) -> u64 {
        self.irq.queue_eventfd(queue).unwrap().read().unwrap_or(0)
    }

    /// Tokens epoll reports ready right now.
    fn ready_tokens(&self) -> Vec<u64> {
        let mut events = vec![EpollEvent::default(); 8];
        let n = self.epoll.wait(0, &mut events).unwrap();
        events[..n].iter().map(|e| e.data()).collect()
    }
}

fn tx_rig(mem: &GuestMemoryMmap) -> (DriverRing, Rig) {
    let rx = DriverRing::new(mem, RX_RING, 16);
    let tx = DriverRing::new(mem, TX_RING, 16);
    let rig = Rig::new(mem, rx.queue(), tx.queue(), true, None, None);
    (tx, rig)
}

// ---- transmit ----

#[test]
fn tx_frame_over_several_descriptors_reaches_the_tap_intact() {
    let mem = memory(MEM_SIZE);
    let (mut tx, mut rig) = tx_rig(&mem);
    let f = frame(3000, 7);
    // Header alone, then the packet in uneven pieces, one of them empty.
    let cuts = [0, VNET_HDR_LEN, 100, 100, 2000, f.len()];
    let mut bufs = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let addr = TX_BUFS + i as u64 * 0x1000;
        mem.write_slice(&f[w[0]..w[1]], GuestAddress(addr)).unwrap();
        bufs.push((addr, (w[1] - w[0]) as u32, false));
    }
    let head = tx.add_chain(&bufs);
    rig.kick(TX_QUEUE);

    assert_eq!(host_frames(&rig.host), vec![f.clone()]);
    assert_eq!(tx.take_used(), vec![(head, 0)]);
    let c = rig.counters();
    assert_eq!((c.tx_packets, c.tx_bytes), (1, 3000));
    assert_eq!(rig.interrupts(TX_QUEUE), 1);
}

#[test]
fn tx_oversize_frame_is_dropped_and_counted_and_the_queue_goes_on() {
    let mem = memory(MEM_SIZE);
    let (mut tx, mut rig) = tx_rig(&mem);
    let big = tx.add_chain(&[(TX_BUFS, 40000, false), (TX_BUFS, 25563, false)]);
    let f = frame(60, 1);
    mem.write_slice(&f, GuestAddress(TX_BUFS + 0x1_0000))
        .unwrap();
    let ok = tx.add_chain(&[(TX_BUFS + 0x1_0000, f.len() as u32, false)]);
    rig.kick(TX_QUEUE);

    assert_eq!(host_frames(&rig.host), vec![f]);
    assert_eq!(tx.take_used(), vec![(big, 0), (ok, 0)]);
    let c = rig.counters();
    assert_eq!((c.tx_dropped_oversize, c.tx_packets), (1, 1));

    // Exactly the largest frame is fine.
    let max = tx.add_chain(&[(TX_BUFS, 40000, false), (TX_BUFS, 25562, false)]);
    rig.kick(TX_QUEUE);
    assert_eq!(host_frames(&rig.host)[0].len(), MAX_FRAME_LEN);
    assert_eq!(tx.take_used(), vec![(max, 0)]);
}

#[test]
fn tx_chains_that_are_not_frames_are_dropped() {
    let mem = memory(MEM_SIZE);
    let (mut tx, mut rig) = tx_rig(&mem);
    let f = frame(100, 3);
    mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    let len = f.len() as u32;
    // Device-writable descriptor.
    tx.add_chain(&[(TX_BUFS, 12, false), (TX_BUFS + 12, len - 12, true)]);
    // Outside guest memory, and straddling its end.
    tx.add_chain(&[(TX_BUFS, 12, false), (0x1_0000_0000, 100, false)]);
    tx.add_chain(&[(MEM_SIZE as u64 - 50, 100, false)]);
    tx.add_chain(&[(u64::MAX - 4, 100, false)]);
    // Shorter than the header.
    tx.add_chain(&[(TX_BUFS, 11, false)]);
    // A good one after all that.
    tx.add_chain(&[(TX_BUFS, len, false)]);
    rig.kick(TX_QUEUE);

    assert_eq!(host_frames(&rig.host), vec![f]);
    assert_eq!(tx.take_used().len(), 6);
    let c = rig.counters();
    assert_eq!((c.tx_dropped_malformed, c.tx_packets), (5, 1));
}

#[test]
fn gather_tx_frame_reports_each_problem() {
    let mem = memory(MEM_SIZE);
    let vq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let d = |addr, len, flags| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));

    let chain = vq
        .build_desc_chain(&[d(TX_BUFS, 12, 0), d(TX_BUFS, 8, WRITE)])
        .unwrap();
    assert_eq!(
        gather_tx_frame(&mem, chain, &mut buf),
        Err(TxFrameError::WritableDescriptor { index: 1 })
    );
    let chain = vq.build_desc_chain(&[d(0x1_0000_0000, 20, 0)]).unwrap();
    assert!(matches!(
        gather_tx_frame(&mem, chain, &mut buf),
        Err(TxFrameError::OutsideMemory {
            addr: 0x1_0000_0000,
            len: 20
        })
    ));
    let chain = vq.build_desc_chain(&[d(TX_BUFS, 5, 0)]).unwrap();
    assert_eq!(
        gather_tx_frame(&mem, chain, &mut buf),
        Err(TxFrameError::TooShort(5))
    );
    let chain = vq.build_desc_chain(&[d(TX_BUFS, u32::MAX, 0)]).unwrap();
    assert_eq!(
        gather_tx_frame(&mem, chain, &mut buf),
        Err(TxFrameError::TooLarge)
    );
    // A loop: 0 -> 1 -> 0 ...
    vq.desc_table()
        .store(
            0,
            RawDescriptor::from(SplitDescriptor::new(TX_BUFS, 8, NEXT, 1)),
        )
        .unwrap();
    vq.desc_table()
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(TX_BUFS, 8, NEXT, 0)),
        )
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert!(matches!(
        gather_tx_frame(&mem, chain, &mut buf),
        Err(TxFrameError::BrokenChain { .. })
    ));
    // A small buffer caps the frame.
    let chain = vq.build_desc_chain(&[d(TX_BUFS, 64, 0)]).unwrap();
    assert_eq!(
        gather_tx_frame(&mem, chain, &mut buf[..32]),
        Err(TxFrameError::TooLarge)
    );
}

#[test]
fn tx_waits_for_a_full_tap_to_become_writable() {
    let mem = memory(MEM_SIZE);
    let (mut tx, mut rig) = tx_rig(&mem);
    // Large frames, so the socket's send buffer fills after a few.
    let f = frame(60_000, 9);
    mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    for _ in 0..15 {
        tx.add_chain(&[(TX_BUFS, f.len() as u32, false)]);
    }
    rig.kick(TX_QUEUE);
    let sent_before = rig.counters().tx_packets;
    assert!(sent_before < 15, "the socket queue should have filled");
    assert!(rig.worker.tx_pending());
    assert_eq!(rig.counters().tx_tap_full, 1);
    assert_eq!(
        rig.worker.tap_interest(),
        Some(EventSet::IN | EventSet::OUT)
    );
    // Another kick does not lose or duplicate anything.
    rig.kick(TX_QUEUE);
    assert_eq!(rig.counters().tx_packets, sent_before);

    let mut got = host_frames(&rig.host).len();
    // The tap is writable again: epoll says so, and the rest goes out.
    assert!(rig.ready_tokens().contains(&TAP_TOKEN));
    while rig.worker.tx_pending() {
        rig.worker
            .device_event(TAP_TOKEN, EventSet::OUT, &rig.epoll);
        got += host_frames(&rig.host).len();
    }
    assert_eq!(got, 15);
    assert_eq!(rig.counters().tx_packets, 15);
    assert_eq!(tx.take_used().len(), 15);
    assert_eq!(rig.worker.tap_interest(), Some(EventSet::IN));
}

#[test]
fn tx_rate_limiter_makes_the_second_frame_wait_for_its_timer() {
    let mem = memory(MEM_SIZE);
    let rx = DriverRing::new(&mem, RX_RING, 16);
    let mut tx = DriverRing::new(&mem, TX_RING, 16);
    let one_per_50ms = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: 50,
        }),
    };
    let mut rig = Rig::new(&mem, rx.queue(), tx.queue(), true, None, Some(one_per_50ms));
    let (a, b) = (frame(40, 1), frame(50, 2));
    mem.write_slice(&a, GuestAddress(TX_BUFS)).unwrap();
    mem.write_slice(&b, GuestAddress(TX_BUFS + 0x1000)).unwrap();
    tx.add_chain(&[(TX_BUFS, a.len() as u32, false)]);
    tx.add_chain(&[(TX_BUFS + 0x1000, b.len() as u32, false)]);
    let start = Instant::now();
    rig.kick(TX_QUEUE);
    assert_eq!(host_frames(&rig.host), vec![a]);
    assert_eq!(rig.counters().tx_throttled, 1);
    assert!(rig.worker.tx_pending());
    // A kick meanwhile does not send it either.
    rig.kick(TX_QUEUE);
    assert!(host_frames(&rig.host).is_empty());

    // Wait for the limiter's timer through the worker's epoll, as the worker thread does.
    let mut events = vec![EpollEvent::default(); 8];
    let mut fired = false;
    while !fired && start.elapsed() < Duration::from_secs(5) {
        let n = rig.epoll.wait(100, &mut events).unwrap();
        for e in &events[..n] {
            if e.data() == TX_LIMITER_TOKEN {
                fired = true;
                rig.worker
                    .device_event(TX_LIMITER_TOKEN, e.event_set(), &rig.epoll);
            }
        }
    }
    assert!(fired, "the limiter's timer never fired");
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert_eq!(host_frames(&rig.host), vec![b]);
    assert_eq!(rig.counters().tx_packets, 2);
    assert_eq!(rig.counters().tx_throttled, 1);
}

// ---- receive ----

fn rx_rig(mem: &GuestMemoryMmap, mergeable: bool) -> (DriverRing, Rig) {
    let rx = DriverRing::new(mem, RX_RING, 16);
    let tx = DriverRing::new(mem, TX_RING, 16);
    let rig = Rig::new(mem, rx.queue(), tx.queue(), mergeable, None, None);
    (rx, rig)
}

/// `f` as the guest must see it: num_buffers replaced by `n`.
fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
    f
}

#[test]
fn rx_frame_into_one_chain() {
    let mem = memory(MEM_SIZE);
    let (mut rx, mut rig) = rx_rig(&mem, false);
    // Header and packet in separate descriptors of one chain.
    let head = rx.add_chain(&[(RX_BUFS, 12, true), (RX_BUFS + 0x100, 1600, true)]);
    let f = frame(500, 4);
    rig.host.send(&f).unwrap();
    rig.tap_readable();

    assert_eq!(rx.take_used(), vec![(head, f.len() as u32)]);
    let mut got = read_guest(&mem, RX_BUFS, 12);
    got.extend(read_guest(&mem, RX_BUFS + 0x100, 500));
    assert_eq!(got, with_num_buffers(&f, 1));
    let c = rig.counters();
    assert_eq!((c.rx_packets, c.rx_bytes), (1, 500));
    assert_eq!(rig.interrupts(RX_QUEUE), 1);
}

#[test]
fn rx_mergeable_frame_spreads_over_three_chains() {
    let mem = memory(MEM_SIZE);
    let (mut rx, mut rig) = rx_rig(&mem, true);
    let heads: Vec<u16> = (0..4)
        .map(|i| rx.add_chain(&[(RX_BUFS + i * 0x100, 40, true)]))
        .collect();
    let f = frame(88, 5); // 100 bytes: 40 + 40 + 20
    rig.host.send(&f).unwrap();
    rig.tap_readable();

    assert_eq!(
        rx.take_used(),
        vec![(heads[0], 40), (heads[1], 40), (heads[2], 20)]
    );
    let mut got = read_guest(&mem, RX_BUFS, 40);
    got.extend(read_guest(&mem, RX_BUFS + 0x100, 40));
    got.extend(read_guest(&mem, RX_BUFS + 0x200, 20));
    assert_eq!(got, with_num_buffers(&f, 3));
    assert_eq!(rig.counters().rx_packets, 1);

    // The fourth chain is still there for the next frame.
    let small = frame(10, 6);
    rig.host.send(&small).unwrap();
    rig.tap_readable();
    assert_eq!(rx.take_used(), vec![(heads[3], 22)]);
    assert_eq!(
        read_guest(&mem, RX_BUFS + 0x300, 22),
        with_num_buffers(&small, 1)
    );
}

#[test]
fn rx_without_buffers_keeps_frames_until_the_guest_posts_and_kicks() {
    for mergeable in [false, true] {
        let mem = memory(MEM_SIZE);
        let (mut rx, mut rig) = rx_rig(&mem, mergeable);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i * 10, i as u8)).collect();
        for f in &frames {
            rig.host.send(f).unwrap();
        }
        rig.tap_readable();
        assert!(rig.worker.rx_pending());
        assert_eq!(rig.counters().rx_no_buffer_waits, 1);
        assert_eq!(rig.counters().rx_packets, 0);
        // Reading stopped: the tap has frames but epoll does not report it (no spin).
        assert_eq!(rig.worker.tap_interest(), Some(EventSet::empty()));
        assert!(!rig.ready_tokens().contains(&TAP_TOKEN));

        // One buffer, then a kick: the held frame goes, the next one waits.
        rx.add_chain(&[(RX_BUFS, 2048, true)]);
        rig.kick(RX_QUEUE);
        assert_eq!(rx.take_used().len(), 1);
        assert_eq!(
            read_guest(&mem, RX_BUFS, frames[0].len()),
            with_num_buffers(&frames[0], 1)
        );
        assert!(rig.worker.rx_pending());

        for i in 1..3 {
            rx.add_chain(&[(RX_BUFS + i * 0x1000, 2048, true)]);
        }
        rig.kick(RX_QUEUE);
        assert_eq!(rx.take_used().len(), 2);
        for (i, f) in frames.iter().enumerate().skip(1) {
            let at = RX_BUFS + i as u64 * 0x1000;
            assert_eq!(
                read_guest(&mem, at, f.len()),
                with_num_buffers(f, 1),
                "frame {i}"
            );
        }
        assert!(!rig.worker.rx_pending());
        assert_eq!(rig.counters().rx_packets, 3);
        assert_eq!(rig.worker.tap_interest(), Some(EventSet::IN));
    }
}

#[test]
fn rx_waiting_for_buffers_asks_the_guest_for_a_kick() {
    let mem = memory(MEM_SIZE);
    let rx = DriverRing::new(&mem, RX_RING, 16);
    let tx = DriverRing::new(&mem, TX_RING, 16);
    let mut rxq = rx.queue();
    rxq.set_event_idx(true);
    let mut rig = Rig::new(&mem, rxq, tx.queue(), true, None, None);
    let mut rx = rx;
    // Two small buffers: not enough for the frame, so nothing is used and the device
    // asks for a kick at the guest's current avail index (2), not where it stopped (0).
    rx.add_chain(&[(RX_BUFS, 20, true)]);
    rx.add_chain(&[(RX_BUFS + 0x100, 20, true)]);
    rig.host.send(&frame(100, 1)).unwrap();
    rig.tap_readable();
    assert!(rig.worker.rx_pending());
    assert!(rx.take_used().is_empty());
    assert_eq!(rx.avail_event(), 2);

    // More buffers and a kick: the frame spans all of them, from the first.
    for i in 2..8 {
        rx.add_chain(&[(RX_BUFS + i * 0x100, 20, true)]);
    }
    rig.kick(RX_QUEUE);
    let used = rx.take_used();
    assert_eq!(used.len(), 6, "{used:?}");
    assert_eq!(used[0].0, 0);
    assert_eq!(
        read_guest(&mem, RX_BUFS + NUM_BUFFERS_OFFSET as u64, 2),
        vec![6, 0]
    );
}

#[test]
fn rx_frame_too_big_for_one_chain_without_mergeable_buffers_is_dropped() {
    let mem = memory(MEM_SIZE);
    let (mut rx, mut rig) = rx_rig(&mem, false);
    let small = rx.add_chain(&[(RX_BUFS, 64, true)]);
    let big = rx.add_chain(&[(RX_BUFS + 0x1000, 2048, true)]);
    let (f1, f2) = (frame(100, 1), frame(40, 2));
    rig.host.send(&f1).unwrap();
    rig.host.send(&f2).unwrap();
    rig.tap_readable();

    // The first frame cannot fit its chain: dropped and counted, the chain handed back
    // empty; the second frame goes on to the next chain.
    assert_eq!(rx.take_used(), vec![(small, 0), (big, f2.len() as u32)]);
    assert_eq!(
        read_guest(&mem, RX_BUFS + 0x1000, f2.len()),
        with_num_buffers(&f2, 1)
    );
    let c = rig.counters();
    assert_eq!((c.rx_dropped_oversize, c.rx_packets), (1, 1));
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let mem = memory(MEM_SIZE);
    let (mut rx, mut rig) = rx_rig(&mem, true);
    for i in 0..16 {
        rx.add_chain(&[(RX_BUFS + i * 0x100, 16, true)]);
    }
    rig.host.send(&frame(1000, 1)).unwrap();
    let fits = frame(20, 2);
    rig.host.send(&fits).unwrap();
    rig.tap_readable();
    let c = rig.counters();
    assert_eq!((c.rx_dropped_oversize, c.rx_packets), (1, 1));
    // The ring was left as it was for the next frame: 32 bytes over two chains.
    assert_eq!(rx.take_used(), vec![(0, 16), (1, 16)]);
}

#[test]
fn rx_bad_chains_are_returned_empty_and_the_frame_goes_to_the_next() {
    for mergeable in [false, true] {
        let mem = memory(MEM_SIZE);
        let (mut rx, mut rig) = rx_rig(&mem, mergeable);
        let readonly = rx.add_chain(&[(RX_BUFS, 2048, false)]);
        let outside = rx.add_chain(&[(0x1_0000_0000, 2048, true)]);
        let good = rx.add_chain(&[(RX_BUFS + 0x1000, 2048, true)]);
        let f = frame(300, 3);
        rig.host.send(&f).unwrap();
        rig.tap_readable();
        assert_eq!(
            rx.take_used(),
            vec![(readonly, 0), (outside, 0), (good, f.len() as u32)]
        );
        assert_eq!(
            read_guest(&mem, RX_BUFS + 0x1000, f.len()),
            with_num_buffers(&f, 1)
        );
        assert_eq!(rig.counters().rx_bad_buffers, 2);
        // Nothing was written to the read-only buffer.
        assert_eq!(read_guest(&mem, RX_BUFS, 16), vec![0; 16]);
    }
}

#[test]
fn rx_runt_frames_from_the_tap_are_dropped() {
    let mem = memory(MEM_SIZE);
    let (mut rx, mut rig) = rx_rig(&mem, false);
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rig.host.send(&[1, 2, 3]).unwrap();
    rig.tap_readable();
    assert_eq!(rig.counters().rx_dropped_malformed, 1);
    assert!(rx.take_used().is_empty());
}

#[test]
fn rx_rate_limiter_holds_the_frame_until_its_timer() {
    let mem = memory(MEM_SIZE);
    let mut rx = DriverRing::new(&mem, RX_RING, 16);
    let tx = DriverRing::new(&mem, TX_RING, 16);
    let hundred_bytes_per_50ms = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 200,
            one_time_burst: 0,
            refill_time: 50,
        }),
        ops: None,
    };
    let mut rig = Rig::new(
        &mem,
        rx.queue(),
        tx.queue(),
        false,
        Some(hundred_bytes_per_50ms),
        None,
    );
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rx.add_chain(&[(RX_BUFS + 0x1000, 2048, true)]);
    rig.host.send(&frame(150, 1)).unwrap();
    rig.host.send(&frame(150, 2)).unwrap();
    rig.tap_readable();
    assert_eq!(rig.counters().rx_packets, 1);
    assert_eq!(rig.counters().rx_throttled, 1);
    assert!(rig.worker.rx_pending());
    assert_eq!(rig.worker.tap_interest(), Some(EventSet::empty()));

    let start = Instant::now();
    let mut events = vec![EpollEvent::default(); 8];
    while rig.counters().rx_packets < 2 && start.elapsed() < Duration::from_secs(5) {
        let n = rig.epoll.wait(100, &mut events).unwrap();
        for e in &events[..n] {
            rig.worker.device_event(e.data(), e.event_set(), &rig.epoll);
        }
    }
    assert_eq!(rig.counters().rx_packets, 2);
    assert_eq!(rx.take_used().len(), 2);
    assert_eq!(rig.counters().rx_throttled, 1);
}

// ---- configuration ----

#[test]
fn config_space_has_mac_status_pairs_and_mtu() {
    let (dev, _host, _) = socket_pair();
    let cfg = NetConfig {
        id: "net0".into(),
        mac: Some([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]),
        mtu: Some(1400),
        ..Default::default()
    };
    let net = Net::with_backend(cfg, Box::new(dev)).unwrap();
    let mut config = [0xffu8; 16];
    net.read_config(0, &mut config);
    assert_eq!(
        config,
        [0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 1, 0, 1, 0, 0x78, 0x05, 0, 0, 0, 0]
    );
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.num_queues(), 2);
    assert_eq!(net.queue_max_size(), 256);
    let f = net.features();
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert!(f & bit(feature) != 0, "feature {feature} not offered");
    }
    assert!(f & VIRTIO_F_VERSION_1 != 0);
}

#[test]
fn default_mac_is_stable_local_unicast_and_mtu_is_optional() {
    let (dev, _host, _) = socket_pair();
    let cfg = NetConfig {
        id: "eth-a".into(),
        ..Default::default()
    };
    let net = Net::with_backend(cfg, Box::new(dev)).unwrap();
    let mac = net.mac();
    assert_eq!(mac, mac_from_id("eth-a"));
    assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    assert_ne!(mac_from_id("eth-a"), mac_from_id("eth-b"));
    // Fixed forever: a guest keeps its address across builds.
    assert_eq!(mac_from_id("net0"), [0xfa, 0xb9, 0x31, 0xa0, 0xba, 0x28]);
    assert_eq!(net.features() & bit(VIRTIO_NET_F_MTU), 0);
    assert!(net.features() & bit(VIRTIO_NET_F_MAC) != 0);
    let mut config = [0u8; 6];
    net.read_config(0, &mut config);
    assert_eq!(config, mac);
}

#[test]
fn bad_configurations_are_refused() {
    let build = |cfg: NetConfig| Net::with_backend(cfg, Box::new(socket_pair().0));
    let base = NetConfig {
        id: "n".into(),
        ..Default::default()
    };
    assert!(matches!(
        build(NetConfig {
            id: String::new(),
            ..base.clone()
        }),
        Err(NetError::EmptyId)
    ));
    assert!(matches!(
        build(NetConfig {
            mac: Some([0x01, 0, 0, 0, 0, 1]),
            ..base.clone()
        }),
        Err(NetError::InvalidMac(..))
    ));
    assert!(matches!(
        build(NetConfig {
            mtu: Some(67),
            ..base.clone()
        }),
        Err(NetError::InvalidMtu { mtu: 67, .. })
    ));
    let never_refills = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time: 0,
        }),
        ops: None,
    };
    assert!(matches!(
        build(NetConfig {
            tx_rate_limiter: Some(never_refills),
            ..base.clone()
        }),
        Err(NetError::InvalidRateLimiter {
            direction: "tx",
            ..
        })
    ));
    assert!(matches!(
        Net::new(NetConfig {
            tap: "aivmm-absent9".into(),
            ..base
        }),
        Err(NetError::Tap(TapError::NoSuchInterface(_)))
    ));
}

#[test]
fn tap_offloads_follow_the_guest_receive_features() {
    let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, &b| acc | bit(b));
    assert_eq!(tap_offload_flags(0), 0);
    assert_eq!(tap_offload_flags(VIRTIO_F_VERSION_1), 0);
    // Segmentation without checksum offload is refused by the kernel: nothing.
    assert_eq!(
        tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO])),
        0
    );
    assert_eq!(
        tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offload_flags(f(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
    );
    // Host-side (transmit) offloads do not concern the tap's receive side.
    assert_eq!(
        tap_offload_flags(f(&[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO6
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
}

#[test]
fn limit_updates_merge_like_a_patch() {
    let bucket = |size| TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time: 100,
    };
    let off = TokenBucketConfig::default();
    let current = Some(RateLimiterConfig {
        bandwidth: Some(bucket(1000)),
        ops: Some(bucket(10)),
    });
    assert_eq!(merge_limits(current, None), current);
    assert_eq!(
        merge_limits(
            current,
            Some(RateLimiterConfig {
                bandwidth: Some(bucket(5)),
                ops: None
            })
        ),
        Some(RateLimiterConfig {
            bandwidth: Some(bucket(5)),
            ops: Some(bucket(10))
        })
    );
    assert_eq!(
        merge_limits(
            current,
            Some(RateLimiterConfig {
                bandwidth: Some(off),
                ops: Some(off)
            })
        ),
        None
    );
}

// ---- the device on its worker thread ----

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn activated_device_serves_both_directions_and_resets() {
    let mem = memory(MEM_SIZE);
    let mut rx = DriverRing::new(&mem, RX_RING, 16);
    let mut tx = DriverRing::new(&mem, TX_RING, 16);
    let (dev, host, offloads) = socket_pair();
    let mut net = Net::with_backend(
        NetConfig {
            id: "t0".into(),
            ..Default::default()
        },
        Box::new(dev),
    )
    .unwrap();
    let metrics = net.metrics();
    let features = VIRTIO_F_VERSION_1
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4);
    let DriverEnds {
        kicks: guest_kicks,
        interrupt: irq,
    } = activate(&mut net, features, &mem, vec![rx.queue(), tx.queue()]);
    assert_eq!(
        *offloads.lock().unwrap(),
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4]
    );

    // Transmit.
    let out = frame(70, 8);
    mem.write_slice(&out, GuestAddress(TX_BUFS)).unwrap();
    tx.add_chain(&[(TX_BUFS, out.len() as u32, false)]);
    guest_kicks[TX_QUEUE].write(1).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = None;
    wait_for("a transmitted frame", || match host.recv(&mut buf) {
        Ok(n) => {
            got = Some(buf[..n].to_vec());
            true
        }
        Err(_) => false,
    });
    assert_eq!(got.unwrap(), out);

    // Receive: the tap has a frame before the guest has buffers.
    let inbound = frame(90, 9);
    host.send(&inbound).unwrap();
    wait_for("the frame held for buffers", || {
        metrics.rx_no_buffer_waits.load(Ordering::Relaxed) == 1
    });
    rx.add_chain(&[(RX_BUFS, 4096, true)]);
    guest_kicks[RX_QUEUE].write(1).unwrap();
    wait_for("an rx interrupt", || {
        irq.queue_eventfd(RX_QUEUE).unwrap().read().is_ok()
    });
    assert_eq!(rx.take_used(), vec![(0, inbound.len() as u32)]);
    assert_eq!(
        read_guest(&mem, RX_BUFS, inbound.len()),
        with_num_buffers(&inbound, 1)
    );

    // Limits change while serving.
    let limits = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 100,
            one_time_burst: 0,
            refill_time: 1000,
        }),
    };
    net.update_rate_limiters(None, Some(limits)).unwrap();
    assert_eq!(net.rate_limits(), (None, Some(limits)));

    let queues = net.reset().expect("queues back");
    assert_eq!(queues.len(), 2);
    assert!(!net.needs_reset());
    assert!(net.reset().is_none(), "not serving any more");
    // Updates while stopped apply directly.
    net.update_rate_limiters(Some(limits), None).unwrap();
    assert_eq!(net.rate_limits(), (Some(limits), Some(limits)));
    let c = metrics.snapshot();
    assert_eq!((c.tx_packets, c.rx_packets), (1, 1));
}

#[test]
fn activation_needs_two_queues_and_version_1() {
    let mem = memory(MEM_SIZE);
    let rx = DriverRing::new(&mem, RX_RING, 16);
    let tx = DriverRing::new(&mem, TX_RING, 16);
    let mut net = Net::with_backend(
        NetConfig {
            id: "t1".into(),
            ..Default::default()
        },
        Box::new(socket_pair().0),
    )
    .unwrap();
    let params = |features, queues: Vec<Queue>| activate_params(features, &mem, queues).0;
    assert!(net
        .activate(params(VIRTIO_F_VERSION_1, vec![rx.queue()]))
        .is_err());
    assert!(net
        .activate(params(0, vec![rx.queue(), tx.queue()]))
        .is_err());
    net.activate(params(VIRTIO_F_VERSION_1, vec![rx.queue(), tx.queue()]))
        .unwrap();
    assert!(net
        .activate(params(VIRTIO_F_VERSION_1, vec![rx.queue(), tx.queue()]))
        .is_err());
    assert!(net.reset().is_some());
}

// ---- hostile guest ----

const CANARY: u8 = 0xa5;
/// Memory with a hole: [0, 1 MiB) and [2 MiB, 2 MiB + 256 KiB).
const HIGH: u64 = 0x20_0000;
const HIGH_SIZE: usize = 0x4_0000;
/// Rings live below this; the device writes used rings and avail_event there.
const RINGS_END: u64 = 0x1_0000;

fn fuzz_memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE),
        (GuestAddress(HIGH), HIGH_SIZE),
    ])
    .unwrap();
    mem.write_slice(&vec![CANARY; MEM_SIZE], GuestAddress(0))
        .unwrap();
    mem.write_slice(&vec![CANARY; HIGH_SIZE], GuestAddress(HIGH))
        .unwrap();
    mem
}

/// A buffer address: mostly real memory, sometimes outside it or across its ends.
fn fuzz_addr(rng: &mut Rng, area: u64, area_len: u64) -> u64 {
    match rng.below(10) {
        0 => MEM_SIZE as u64 - rng.below(64), // across the end of low memory
        1 => HIGH + HIGH_SIZE as u64 - rng.below(64), // across the end of high memory
        2 => MEM_SIZE as u64 + rng.below(0x1000), // in the hole
        3 => u64::MAX - rng.below(64),        // wraps
        _ => area + rng.below(area_len),
    }
}

fn fuzz_len(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0 => 0,
        1 => u32::MAX - rng.below(4) as u32,
        2 => 60_000 + rng.below(10_000) as u32,
        _ => rng.below(2048) as u32,
    }
}

/// Random transmit and receive traffic from a hostile guest and a busy host: nothing
/// panics, every transmit chain is accounted for, every frame the host sent is either
/// delivered or counted as dropped, and no byte outside the rings and the named receive
/// buffers changes.
#[test]
fn hostile_guest_cannot_make_the_device_panic_or_write_outside_its_buffers() {
    for (seed, mergeable) in [
        (0x9e37_79b9_7f4a_7c15u64, false),
        (0x2545_f491_4f6c_dd1d, true),
    ] {
        let mut rng = Rng(seed);
        let mem = fuzz_memory();
        let size = 32u16;
        let mut rx = DriverRing::new(&mem, RX_RING, size);
        let mut tx = DriverRing::new(&mem, TX_RING, size);
        let mut rig = Rig::new(&mem, rx.queue(), tx.queue(), mergeable, None, None);
        // Receive buffers the guest named (device-writable descriptors), low and high.
        let mut named_low = vec![false; MEM_SIZE];
        let mut named_high = vec![false; HIGH_SIZE];
        let mut name = |addr: u64, len: u32| {
            for a in addr..addr.saturating_add(u64::from(len)) {
                if a < MEM_SIZE as u64 {
                    named_low[a as usize] = true;
                } else if (HIGH..HIGH + HIGH_SIZE as u64).contains(&a) {
                    named_high[(a - HIGH) as usize] = true;
                } else if a > HIGH + HIGH_SIZE as u64 {
                    break;
                }
            }
        };
        let mut tx_chains = 0u64;
        let mut frames_sent = 0u64;
        let mut frames_received = 0u64;

        for _ in 0..2000 {
            // A transmit chain: random descriptors at random table slots, loops and
            // indirect tables (read-only for the device) included.
            if tx.in_flight() < size {
                let n = 1 + rng.below(5) as u16;
                let start = rng.below(u64::from(size)) as u16;
                for i in 0..n {
                    let mut flags = 0;
                    if i + 1 < n || rng.chance(5) {
                        flags |= NEXT;
                    }
                    if rng.chance(5) {
                        flags |= WRITE;
                    }
                    if rng.chance(3) {
                        flags |= INDIRECT;
                    }
                    let next = if rng.chance(10) {
                        rng.below(u64::from(size) + 4) as u16
                    } else {
                        start.wrapping_add(i + 1) % size
                    };
                    let addr = fuzz_addr(&mut rng, 0, MEM_SIZE as u64);
                    tx.write_desc(
                        start.wrapping_add(i) % size,
                        addr,
                        fuzz_len(&mut rng),
                        flags,
                        next,
                    );
                }
                tx.publish(start);
                tx_chains += 1;
                rig.kick(TX_QUEUE);
            }
            frames_received += host_frames(&rig.host).len() as u64;
            if rig.worker.tx_pending() {
                rig.worker
                    .device_event(TAP_TOKEN, EventSet::OUT, &rig.epoll);
            }

            // Receive buffers: only device-writable descriptors are named; addresses
            // stay out of the rings (a buffer over a descriptor table would let frame
            // bytes name other memory).
            if rng.chance(40) && rx.in_flight() < size {
                let n = 1 + rng.below(3) as u16;
                let start = rng.below(u64::from(size)) as u16;
                for i in 0..n {
                    let mut flags = if rng.chance(90) { WRITE } else { 0 };
                    if i + 1 < n || rng.chance(3) {
                        flags |= NEXT;
                    }
                    let next = if rng.chance(5) {
                        rng.below(u64::from(size) + 4) as u16
                    } else {
                        start.wrapping_add(i + 1) % size
                    };
                    // Buffers start in the first 256 bytes of 4 KiB slots and are below
                    // 2 KiB, so each slot keeps unnamed canary bytes after its buffers.
                    let slot = RX_BUFS + rng.below(128) * 0x1000 + rng.below(256);
                    let (addr, len) = match rng.below(20) {
                        0 => (u64::MAX - rng.below(64), fuzz_len(&mut rng)),
                        1 => (MEM_SIZE as u64 + rng.below(0x1000), rng.below(2048) as u32),
                        2 => (MEM_SIZE as u64 - 1 - rng.below(64), rng.below(2048) as u32),
                        // Huge, in high memory, after the buffer the drain uses.
                        3 => (
                            HIGH + 0x2_0000 + rng.below(256),
                            u32::MAX - rng.below(4) as u32,
                        ),
                        _ => (slot, rng.below(2048) as u32),
                    };
                    if flags & WRITE != 0 {
                        // No descriptor ever gets more than a frame: a device writing
                        // past that in a huge buffer trips the canary.
                        name(addr, len.min(MAX_FRAME_LEN as u32));
                    }
                    rx.write_desc(start.wrapping_add(i) % size, addr, len, flags, next);
                }
                rx.publish(start);
            }
            if rng.chance(30) {
                let len = match rng.below(20) {
                    0 => rng.below(VNET_HDR_LEN as u64) as usize,
                    1 => MAX_FRAME_LEN,
                    _ => VNET_HDR_LEN + rng.below(4000) as usize,
                };
                let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if rig.host.send(&payload).is_ok() {
                    frames_sent += 1;
                }
            }
            match rng.below(3) {
                0 => rig.kick(RX_QUEUE),
                1 => rig.tap_readable(),
                _ => {}
            }
        }

        // Drain: large clean buffers until every frame the host sent is accounted for.
        name(HIGH, MAX_FRAME_LEN as u32);
        for _ in 0..10_000 {
            let c = rig.counters();
            if c.rx_packets + c.rx_dropped_malformed + c.rx_dropped_oversize == frames_sent {
                break;
            }
            if rx.in_flight() < size {
                let slot = rx.next_desc;
                rx.write_desc(slot, HIGH, MAX_FRAME_LEN as u32, WRITE, 0);
                rx.next_desc = (slot + 1) % size;
                rx.publish(slot);
            }
            rig.kick(RX_QUEUE);
        }
        while rig.worker.tx_pending() {
            frames_received += host_frames(&rig.host).len() as u64;
            rig.worker
                .device_event(TAP_TOKEN, EventSet::OUT, &rig.epoll);
        }
        frames_received += host_frames(&rig.host).len() as u64;

        let c = rig.counters();
        assert_eq!(
            c.rx_packets + c.rx_dropped_malformed + c.rx_dropped_oversize,
            frames_sent,
            "frames lost: {c:?}"
        );
        assert_eq!(tx.used_idx(), tx.avail_idx, "transmit chains left behind");
        assert_eq!(
            c.tx_packets + c.tx_dropped_malformed + c.tx_dropped_oversize,
            tx_chains,
            "{c:?}"
        );
        assert_eq!(c.tx_packets, frames_received);
        assert!(c.tx_packets > 0 && c.tx_dropped_malformed > 0, "{c:?}");
        assert!(c.rx_packets > 0 && c.rx_bad_buffers > 0, "{c:?}");

        // The canary: every byte outside the rings and the named receive buffers.
        let mut low = vec![0u8; MEM_SIZE];
        mem.read_slice(&mut low, GuestAddress(0)).unwrap();
        for (a, &b) in low.iter().enumerate().skip(RINGS_END as usize) {
            assert!(
                b == CANARY || named_low[a],
                "byte {a:#x} outside any buffer changed ({mergeable})"
            );
        }
        let mut high = vec![0u8; HIGH_SIZE];
        mem.read_slice(&mut high, GuestAddress(HIGH)).unwrap();
        for (a, &b) in high.iter().enumerate() {
            assert!(
                b == CANARY || named_high[a],
                "byte {:#x} outside any buffer changed ({mergeable})",
                HIGH + a as u64
            );
        }
    }
}
