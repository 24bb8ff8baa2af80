//! Device tests: the test acts as the guest driver (it writes descriptors and avail
//! rings in guest memory and reads the used rings) and as host processes (real unix
//! sockets in a temporary directory).

// Random test data is made by truncating random numbers on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{MuxerConfig, VsockWorker};
use super::packet::*;
use super::*;
use crate::virtio::test_support::{self, memory, DriverRing, Rng};
use crate::virtio::{VirtioDevice, VirtioInterrupt, WorkerLoop};

const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 256;
/// Where the rx, tx and event rings start.
const RING_BASES: [u64; 3] = [0x1000, 0x4000, 0x7000];
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_SIZE: u32 = 4096;
const TX_BUFS: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x11000;
const TX_SLOTS: u16 = 64;
/// Nothing the device may write lies at or above this address.
const CANARY: u64 = 0x70_0000;
const GUEST_CID: u64 = 3;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const WAIT: Duration = Duration::from_secs(10);

// ---- helpers ---------------------------------------------------------------------------

fn new_memory() -> GuestMemoryMmap {
    memory(MEM_SIZE as usize)
}

/// The driver side of the rx, tx and event queues.
fn driver_rings(mem: &GuestMemoryMmap) -> [DriverRing; 3] {
    RING_BASES.map(|at| DriverRing::new(mem, at, QSIZE))
}

/// Where rx buffer `i` is.
fn rx_buf(i: u16) -> u64 {
    RX_BUFS + u64::from(i) * u64::from(RX_BUF_SIZE)
}

/// Gives the device rx buffer `i`, whole.
fn post_rx_buffer(rx: &mut DriverRing, i: u16) {
    rx.write_desc(i, rx_buf(i), RX_BUF_SIZE, VRING_DESC_F_WRITE, 0);
    rx.publish(i);
}

/// Gives the device every rx buffer.
fn post_rx_buffers(rx: &mut DriverRing) {
    for i in 0..QSIZE {
        post_rx_buffer(rx, i);
    }
}

/// The header of the packet the device put in rx buffer `i`.
fn rx_header(mem: &GuestMemoryMmap, i: u16) -> PacketHeader {
    let mut raw = [0u8; HEADER_SIZE];
    mem.read_slice(&mut raw, GuestAddress(rx_buf(i))).unwrap();
    PacketHeader::from_bytes(&raw)
}

/// The test's guest driver.
struct Guest {
    mem: GuestMemoryMmap,
    rx: DriverRing,
    tx: DriverRing,
    kicks: Vec<EventFd>,
    tx_free: Vec<u16>,
    /// rx descriptors the device returned with a packet that had no room in it.
    rx_too_small: usize,
    buf_alloc: u32,
    cid: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: tx kicks follow the device's
    /// `avail_event`, as Linux's `virtqueue_kick_prepare` does.
    event_idx: bool,
}

impl Guest {
    fn new(mem: &GuestMemoryMmap, rx: DriverRing, tx: DriverRing, kicks: Vec<EventFd>) -> Self {
        let mut g = Self {
            mem: mem.clone(),
            rx,
            tx,
            kicks,
            tx_free: (0..TX_SLOTS).rev().collect(),
            rx_too_small: 0,
            buf_alloc: 64 * 1024,
            cid: GUEST_CID,
            event_idx: false,
        };
        post_rx_buffers(&mut g.rx);
        g.kick(RX_QUEUE);
        g
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: self.buf_alloc,
            ..Default::default()
        }
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            self.tx_free.push(id);
        }
    }

    /// Puts one packet on the tx queue, its `len` set to the payload's.
    fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap();
        self.send_raw(PacketHeader { len, ..h }, payload);
    }

    /// Puts one packet (header and payload in one descriptor) on the tx queue as is.
    fn send_raw(&mut self, h: PacketHeader, payload: &[u8]) {
        let slot = self.tx_slot();
        let addr = TX_BUFS + u64::from(slot) * TX_SLOT;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HEADER_SIZE as u64))
            .unwrap();
        let len = u32::try_from(HEADER_SIZE + payload.len()).unwrap();
        self.send_desc(slot, addr, len);
    }

    /// A free tx descriptor, once the device gave one back.
    fn tx_slot(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        loop {
            self.reclaim_tx();
            if let Some(s) = self.tx_free.pop() {
                return s;
            }
            assert!(Instant::now() < deadline, "tx queue never drained");
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Puts tx descriptor `slot`, covering `len` bytes at `addr`, on the tx queue.
    fn send_desc(&mut self, slot: u16, addr: u64, len: u32) {
        self.tx.write_desc(slot, addr, len, 0, 0);
        let old = self.tx.avail_idx;
        self.tx.publish(slot);
        if self.tx_kick_needed(old) {
            self.kick(TX_QUEUE);
        }
    }

    /// Whether publishing tx chains from available index `old` on needs a kick: always
    /// without EVENT_IDX, else only if the device's `avail_event` lies among them
    /// (`vring_need_event`).
    fn tx_kick_needed(&self, old: u16) -> bool {
        if !self.event_idx {
            return true;
        }
        // Linux's virtio_mb(): the new index is visible before avail_event is read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let new = self.tx.avail_idx;
        let event = self.tx.avail_event();
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// The next packet the device put in the rx queue; the buffer goes back to it.
    fn recv(&mut self, timeout: Duration) -> Option<(PacketHeader, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.rx.pop_used() {
                assert!(len <= RX_BUF_SIZE, "used length {len} past the buffer");
                if len == 0 {
                    self.rx_too_small += 1;
                    post_rx_buffer(&mut self.rx, id);
                    self.kick(RX_QUEUE);
                    continue;
                }
                let mut raw = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut raw, GuestAddress(rx_buf(id)))
                    .unwrap();
                let h = PacketHeader::from_bytes(raw[..HEADER_SIZE].try_into().unwrap());
                assert_eq!(h.len as usize + HEADER_SIZE, len as usize, "{h:?}");
                assert_eq!(
                    (h.src_cid, h.dst_cid, h.type_),
                    (HOST_CID, self.cid, TYPE_STREAM)
                );
                post_rx_buffer(&mut self.rx, id);
                self.kick(RX_QUEUE);
                return Some((h, raw[HEADER_SIZE..].to_vec()));
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// The next packet, which must be `op`.
    fn expect(&mut self, op: u16) -> PacketHeader {
        let (h, _) = self
            .recv(WAIT)
            .unwrap_or_else(|| panic!("no packet while waiting for op {op}"));
        assert_eq!(h.op, op, "{h:?}");
        h
    }

    /// The next packet for guest port `port`, which must be `op`; packets for other
    /// ports are skipped.
    fn expect_on(&mut self, op: u16, port: u32) -> PacketHeader {
        loop {
            let (h, _) = self
                .recv(WAIT)
                .unwrap_or_else(|| panic!("no packet while waiting for op {op}"));
            if h.dst_port == port {
                assert_eq!(h.op, op, "{h:?}");
                return h;
            }
        }
    }

    /// Waits until the device used every tx chain given to it.
    fn tx_drained(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.tx_free.len() < usize::from(TX_SLOTS) {
            self.reclaim_tx();
            assert!(Instant::now() < deadline, "tx queue never drained");
            thread::sleep(Duration::from_micros(200));
        }
    }
}

/// A device activated over fresh queues, with the test's guest driver.
struct Rig {
    dir: tempfile::TempDir,
    dev: Vsock,
    guest: Guest,
    metrics: Arc<VsockMetrics>,
}

impl Rig {
    fn new() -> Self {
        Self::with_cid(GUEST_CID)
    }

    fn with_cid(cid: u64) -> Self {
        Self::with(cid, crate::virtio::VIRTIO_F_VERSION_1)
    }

    /// A device that negotiated VIRTIO_RING_F_EVENT_IDX, as Linux guests do.
    fn with_event_idx() -> Self {
        Self::with(
            GUEST_CID,
            crate::virtio::VIRTIO_F_VERSION_1 | crate::virtio::VIRTIO_RING_F_EVENT_IDX,
        )
    }

    fn with(cid: u64, features: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: dir.path().join("v.sock"),
        })
        .unwrap();
        let mem = new_memory();
        let mut guest = activate_with(&mut dev, &mem, features);
        guest.cid = cid;
        let metrics = dev.metrics();
        Self {
            dir,
            dev,
            guest,
            metrics,
        }
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    /// A host process's stream to the device's socket, `first` written to it.
    fn host_stream(&self, first: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(self.uds()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(first).unwrap();
        s
    }

    /// A host process listening for guest connections to `port`.
    fn host_listener(&self, port: u32) -> UnixListener {
        host_listener(&self.uds(), port)
    }

    /// A host process connects to `port` in the guest, which accepts.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = self.host_stream(format!("CONNECT {port}\n").as_bytes());
        let req = self.guest.expect(OP_REQUEST);
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= FIRST_LOCAL_PORT, "{req:?}");
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        let resp = self.guest.hdr(port, req.src_port, OP_RESPONSE);
        self.guest.send(resp, &[]);
        assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }

    /// The guest connects from `guest_port` to host port `port`, served by `listener`.
    fn guest_connect(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        port: u32,
    ) -> (UnixStream, PacketHeader) {
        let req = self.guest.hdr(guest_port, port, OP_REQUEST);
        self.guest.send(req, &[]);
        let resp = self.guest.expect_on(OP_RESPONSE, guest_port);
        assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        (s, resp)
    }
}

/// `dev` activated over fresh queues in `mem`, and the test's driver of them.
fn activate(dev: &mut Vsock, mem: &GuestMemoryMmap) -> Guest {
    activate_with(dev, mem, crate::virtio::VIRTIO_F_VERSION_1)
}

/// `dev` activated with `features` over fresh queues in `mem`, and the driver.
fn activate_with(dev: &mut Vsock, mem: &GuestMemoryMmap, features: u64) -> Guest {
    let rings = driver_rings(mem);
    let queues = rings.iter().map(DriverRing::queue).collect();
    let ends = test_support::activate(dev, features, mem, queues);
    let [rx, tx, _] = rings;
    let mut guest = Guest::new(mem, rx, tx, ends.kicks);
    guest.event_idx = features & crate::virtio::VIRTIO_RING_F_EVENT_IDX != 0;
    guest
}

/// A host process listening for guest connections to `port` (at `<uds>_<port>`).
fn host_listener(uds: &Path, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", uds.display())).unwrap()
}

/// A worker the test runs synchronously (no thread) over fresh queues in `mem`, its
/// socket at `uds`; and the driver side of its rx, tx and event rings.
fn sync_worker(
    mem: &GuestMemoryMmap,
    uds: &Path,
) -> (VsockWorker, Epoll, Arc<VsockMetrics>, [DriverRing; 3]) {
    let listener = UnixListener::bind(uds).unwrap();
    listener.set_nonblocking(true).unwrap();
    let rings = driver_rings(mem);
    let metrics = Arc::new(VsockMetrics::default());
    let mut worker = VsockWorker::new(
        mem.clone(),
        rings.iter().map(DriverRing::queue).collect(),
        Arc::new(VirtioInterrupt::unconnected(3).unwrap()),
        MuxerConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.to_path_buf(),
            max_connections: MAX_CONNECTIONS,
        },
        listener,
        Arc::clone(&metrics),
    )
    .unwrap();
    let epoll = Epoll::new().unwrap();
    worker.register(&epoll).unwrap();
    (worker, epoll, metrics, rings)
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream closed after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Reads until end of stream (the stream has a read timeout).
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// Whether the device closed `s` without sending anything (a close with unread data
/// shows as a connection reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ---- device surface --------------------------------------------------------------------

#[test]
fn device_surface_and_config_space() {
    let rig = Rig::new();
    assert_eq!(rig.dev.device_type(), 19);
    assert_eq!(rig.dev.num_queues(), 3);
    assert_eq!(rig.dev.queue_max_size(), 256);
    assert_ne!(rig.dev.features() & crate::virtio::VIRTIO_F_VERSION_1, 0);
    assert_eq!(rig.dev.guest_cid(), GUEST_CID);
    let mut cfg = [0xffu8; 12];
    rig.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 4];
    rig.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn new_refuses_an_existing_path_a_missing_directory_and_reserved_cids() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("taken");
    std::fs::write(&existing, b"x").unwrap();
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: existing.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(err, VsockError::SocketExists(_)));
    assert!(
        err.to_string().contains(existing.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"x", "left alone");

    let missing = dir.path().join("nodir").join("v.sock");
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: missing.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(err, VsockError::DirectoryMissing(_)));
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: dir.path().join("c.sock"),
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains(&cid.to_string()), "{err}");
    }
}

#[test]
fn socket_file_outlives_guest_resets_and_goes_with_the_device() {
    let mut rig = Rig::new();
    let uds = rig.uds();
    let (mut host, _) = rig.host_connect(1234);
    let queues = rig.dev.reset().expect("queues back");
    assert_eq!(queues.len(), 3);
    // The connection went with the worker.
    assert!(closed(&mut host));
    // Still listening while the guest is down, and after it comes back.
    let early = UnixStream::connect(&uds).unwrap();
    let mem = new_memory();
    rig.guest = activate(&mut rig.dev, &mem);
    (&early).write_all(b"CONNECT 77\n").unwrap();
    let req = rig.guest.expect(OP_REQUEST);
    assert_eq!(req.dst_port, 77);
    let (_s, _) = rig.host_connect(1235);
    // A guest kick on the event queue is harmless.
    rig.guest.kick(EVENT_QUEUE);
    assert!(rig.dev.reset().is_some());
    assert!(rig.dev.reset().is_none(), "not serving any more");
    assert!(!rig.dev.needs_reset());
    drop(rig.dev);
    assert!(!uds.exists(), "socket file removed on drop");
}

// ---- host-initiated connections -----------------------------------------------------

#[test]
fn connect_handshake_then_a_megabyte_each_way_within_credit() {
    const N: usize = 1 << 20;
    const GUEST_BUF: u32 = 16 * 1024;
    let mut rig = Rig::new();
    rig.guest.buf_alloc = GUEST_BUF;
    let (host, local) = rig.host_connect(1234);
    let port = 1234;

    let mut rng = Rng(0x1234_5678);
    let to_guest = rng.bytes(N);
    let to_host = rng.bytes(N);

    let mut writer = host.try_clone().unwrap();
    let h2g = to_guest.clone();
    let writer = thread::spawn(move || {
        writer.write_all(&h2g).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = host.try_clone().unwrap();
    let reader = thread::spawn(move || read_to_eof(&mut reader));

    // The guest's side of the credit exchange.
    let mut received = Vec::with_capacity(N);
    let mut advertised: u32 = 0; // fwd_cnt in the latest packet the guest sent
    let mut sent = 0usize;
    let mut dev_buf_alloc = BUF_ALLOC;
    let mut dev_fwd_cnt: u32 = 0;
    let mut asked = false;
    let mut host_eof = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(host_eof && sent == N) {
        assert!(
            Instant::now() < deadline,
            "transfer stalled at {sent} / {}",
            received.len()
        );
        let consumed = u32::try_from(received.len()).unwrap();
        if sent < N {
            let in_flight = u32::try_from(sent).unwrap() - dev_fwd_cnt;
            let credit = dev_buf_alloc.saturating_sub(in_flight) as usize;
            if credit > 0 {
                // Data packets repeat the last advertised fwd_cnt, so the device's view
                // of the guest's credit changes only with explicit updates.
                let n = (1 + rng.below(8192) as usize).min(credit).min(N - sent);
                let mut h = rig.guest.hdr(port, local, OP_RW);
                h.fwd_cnt = advertised;
                rig.guest.send(h, &to_host[sent..sent + n]);
                sent += n;
            } else if !asked {
                let mut h = rig.guest.hdr(port, local, OP_CREDIT_REQUEST);
                h.fwd_cnt = consumed;
                advertised = consumed;
                rig.guest.send(h, &[]);
                asked = true;
            }
        }
        let wait = if sent < N && !asked {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        let Some((h, payload)) = rig.guest.recv(wait) else {
            continue;
        };
        assert_eq!((h.src_port, h.dst_port), (local, port), "{h:?}");
        if h.fwd_cnt != dev_fwd_cnt {
            asked = false;
        }
        dev_buf_alloc = h.buf_alloc;
        dev_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RW => {
                received.extend_from_slice(&payload);
                let unacked = u32::try_from(received.len()).unwrap() - advertised;
                assert!(
                    unacked <= GUEST_BUF,
                    "device sent {unacked} bytes past the guest's last fwd_cnt"
                );
                // The guest consumes at once and says so now and then.
                let consumed = u32::try_from(received.len()).unwrap();
                if consumed - advertised >= GUEST_BUF / 4 {
                    let mut u = rig.guest.hdr(port, local, OP_CREDIT_UPDATE);
                    u.fwd_cnt = consumed;
                    advertised = consumed;
                    rig.guest.send(u, &[]);
                }
            }
            OP_CREDIT_REQUEST => {
                let mut u = rig.guest.hdr(port, local, OP_CREDIT_UPDATE);
                u.fwd_cnt = u32::try_from(received.len()).unwrap();
                advertised = u.fwd_cnt;
                rig.guest.send(u, &[]);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                assert_eq!(h.flags, SHUTDOWN_SEND);
                assert_eq!(received.len(), N, "shutdown before all data");
                host_eof = true;
            }
            op => panic!("unexpected op {op}: {h:?}"),
        }
    }
    writer.join().unwrap();
    assert!(received == to_guest, "host → guest data differs");

    // A clean close: all data reaches the host, then the device resets.
    let mut bye = rig.guest.hdr(port, local, OP_SHUTDOWN);
    bye.flags = SHUTDOWN_BOTH;
    rig.guest.send(bye, &[]);
    loop {
        let (h, _) = rig.guest.recv(WAIT).expect("reset after shutdown");
        if h.op == OP_RST {
            break;
        }
        assert!(
            matches!(h.op, OP_CREDIT_UPDATE | OP_CREDIT_REQUEST),
            "{h:?}"
        );
    }
    let got = reader.join().unwrap();
    assert!(
        got == to_host,
        "guest → host data differs ({} bytes)",
        got.len()
    );
    assert_eq!(counter(&rig.metrics.rx_bytes), N as u64);
    assert_eq!(counter(&rig.metrics.tx_bytes), N as u64);
    assert_eq!(counter(&rig.metrics.connections), 1);
    assert_eq!(counter(&rig.metrics.bad_packets), 0);
}

#[test]
fn device_sends_exactly_the_credit_the_guest_gives() {
    let mut rig = Rig::new();
    rig.guest.buf_alloc = 1000;
    let (mut host, local) = rig.host_connect(50);
    let data = Rng(7).bytes(5000);
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    for round in 1..=5u32 {
        loop {
            let (h, payload) = rig.guest.recv(WAIT).unwrap();
            match h.op {
                OP_RW => got.extend_from_slice(&payload),
                OP_CREDIT_REQUEST => break,
                op => panic!("op {op}"),
            }
        }
        assert_eq!(got.len(), 1000 * round as usize, "round {round}");
        if round < 5 {
            // Consumed everything: 1000 more bytes of credit.
            let mut u = rig.guest.hdr(50, local, OP_CREDIT_UPDATE);
            u.fwd_cnt = 1000 * round;
            rig.guest.send(u, &[]);
        }
    }
    assert!(got == data);
    // A guest that shrinks its buffer to what is in flight gets nothing more.
    let mut u = rig.guest.hdr(50, local, OP_CREDIT_UPDATE);
    u.fwd_cnt = 4500;
    u.buf_alloc = 500;
    rig.guest.send(u, &[]);
    host.write_all(b"more").unwrap();
    assert_eq!(rig.guest.expect(OP_CREDIT_REQUEST).dst_port, 50);
    assert_eq!(rig.guest.recv(Duration::from_millis(100)), None);
}

#[test]
fn guest_refusal_closes_the_host_stream_and_ports_are_unique() {
    let mut rig = Rig::new();
    let (_a, pa) = rig.host_connect(10);
    let (_b, pb) = rig.host_connect(10);
    assert_ne!(pa, pb);
    let mut s = rig.host_stream(b"CONNECT 11\n");
    let req = rig.guest.expect(OP_REQUEST);
    assert!(req.src_port != pa && req.src_port != pb);
    let rst = rig.guest.hdr(11, req.src_port, OP_RST);
    rig.guest.send(rst, &[]);
    assert!(closed(&mut s), "no OK for a refused connection");
}

#[test]
fn data_sent_right_after_the_connect_line_is_kept() {
    let mut rig = Rig::new();
    let mut s = rig.host_stream(b"CONNECT 99\nhello");
    let req = rig.guest.expect(OP_REQUEST);
    let resp = rig.guest.hdr(99, req.src_port, OP_RESPONSE);
    rig.guest.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    let (h, data) = rig.guest.recv(WAIT).unwrap();
    assert_eq!(h.op, OP_RW);
    assert_eq!(data, b"hello");
}

#[test]
fn connect_line_parser() {
    use super::muxer::parse_connect;
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296"[..],
        b"CONNECT",
        b"CONNECT ",
        b"CONNECT +5",
        b"CONNECT 5 ",
        b"connect 5",
        b" CONNECT 5",
        b"CONNECT\t5",
        b"CONNECT \xff",
    ] {
        assert_eq!(
            parse_connect(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn malformed_or_unfinished_connect_lines_are_closed() {
    let rig = Rig::new();
    let lines: [&[u8]; 5] = [
        b"CONNEC 12\n",
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT -1\n",
        &[b'A'; MAX_CONNECT_LINE + 8],
    ];
    for line in lines {
        let mut s = rig.host_stream(line);
        let t = Instant::now();
        assert!(closed(&mut s), "{line:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{line:?} closed late");
    }
    // A peer that never finishes its line is dropped after the handshake timeout,
    // and meanwhile others are served.
    let mut slow = rig.host_stream(b"CONNECT 1");
    let t = Instant::now();
    let mut rig = rig;
    let (_fast, _) = rig.host_connect(5);
    assert!(t.elapsed() < HANDSHAKE_TIMEOUT, "blocked by the slow peer");
    assert!(closed(&mut slow));
    let waited = t.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT - Duration::from_millis(100) && waited < Duration::from_secs(5),
        "dropped after {waited:?}"
    );
    assert_eq!(counter(&rig.metrics.handshake_failures), 6);
    assert_eq!(
        rig.guest.recv(Duration::from_millis(100)),
        None,
        "nothing for the guest"
    );
}

#[test]
fn guest_that_never_answers_a_request_gets_a_reset() {
    let mut rig = Rig::new();
    let mut s = rig.host_stream(b"CONNECT 8\n");
    let req = rig.guest.expect(OP_REQUEST);
    let t = Instant::now();
    let rst = rig.guest.expect(OP_RST);
    assert!(t.elapsed() >= REQUEST_TIMEOUT - Duration::from_millis(200));
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 8));
    assert!(closed(&mut s));
}

// ---- guest-initiated connections -----------------------------------------------------

#[test]
fn guest_connects_to_a_host_listener_and_data_flows() {
    let mut rig = Rig::new();
    let listener = rig.host_listener(5000);
    let (mut host, resp) = rig.guest_connect(&listener, 7000, 5000);
    assert_eq!(resp.buf_alloc, BUF_ALLOC);
    assert_eq!(resp.fwd_cnt, 0);

    let h = rig.guest.hdr(7000, 5000, OP_RW);
    rig.guest.send(h, b"ping");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    host.write_all(b"pong!").unwrap();
    let (h, data) = rig.guest.recv(WAIT).unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 5000, 7000));
    assert_eq!(data, b"pong!");
    assert_eq!(h.fwd_cnt, 4, "the device forwarded 4 bytes");

    // Credit request → credit update.
    let h = rig.guest.hdr(7000, 5000, OP_CREDIT_REQUEST);
    rig.guest.send(h, &[]);
    let upd = rig.guest.expect(OP_CREDIT_UPDATE);
    assert_eq!((upd.buf_alloc, upd.fwd_cnt), (BUF_ALLOC, 4));

    // The guest stops sending: the host reads end of stream, and can still write.
    let mut h = rig.guest.hdr(7000, 5000, OP_SHUTDOWN);
    h.flags = SHUTDOWN_SEND;
    rig.guest.send(h, &[]);
    assert!(read_to_eof(&mut host).is_empty());
    host.write_all(b"late").unwrap();
    let (_, data) = rig.guest.recv(WAIT).unwrap();
    assert_eq!(data, b"late");

    // A guest reset closes the host stream; the device does not answer it.
    let h = rig.guest.hdr(7000, 5000, OP_RST);
    rig.guest.send(h, &[]);
    rig.guest.tx_drained();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + WAIT;
    loop {
        match host.write(b"x") {
            Err(_) => break,
            Ok(_) => assert!(Instant::now() < deadline, "host stream still open"),
        }
        thread::sleep(Duration::from_millis(5));
    }
    assert!(host.read(&mut b).map(|n| n == 0).unwrap_or(true));
    assert_eq!(rig.guest.recv(Duration::from_millis(100)), None);
    assert_eq!(counter(&rig.metrics.connections), 1);
}

/// A long guest → host stream with EVENT_IDX, the guest sending as Linux does (as much
/// as its credit allows, one packet per write, a kick only when the device's
/// `avail_event` asks for one) to a host that reads in small pieces with pauses. The
/// device looks at the tx ring while the guest keeps adding to it, so it often finds
/// it empty just before a chain arrives; every time it must leave `avail_event` at the
/// next chain, or the guest's following chains come without a kick and the stream
/// stops for good.
#[test]
fn guest_stream_with_event_idx_never_stalls() {
    const N: usize = 32 << 20;
    /// Nothing moved for this long: the transfer is stuck.
    const STALL: Duration = Duration::from_secs(3);
    let pattern = |i: usize| (i % 251) as u8;

    let mut rig = Rig::with_event_idx();
    let listener = rig.host_listener(5000);
    let (host, resp) = rig.guest_connect(&listener, 7000, 5000);

    // The host reader: small reads, a short pause now and then.
    let read = Arc::new(AtomicUsize::new(0));
    let reader = {
        let read = Arc::clone(&read);
        let mut host = host.try_clone().unwrap();
        thread::spawn(move || {
            let mut rng = Rng(0x5eed);
            let mut buf = vec![0u8; 8192];
            let mut total = 0usize;
            while total < N {
                let want = 1 + rng.below(buf.len() as u64) as usize;
                let n = match host.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(total + k), "byte {}", total + k);
                }
                total += n;
                read.store(total, Ordering::Relaxed);
                if rng.chance(2) {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            total
        })
    };

    let mut rng = Rng(0xfeed);
    let mut chunk = vec![0u8; MAX_PAYLOAD as usize];
    let mut dev_buf_alloc = resp.buf_alloc;
    let mut dev_fwd_cnt = resp.fwd_cnt;
    let mut sent = 0usize;
    let mut last = (0usize, 0usize, 0u16, 0u16);
    let mut last_change = Instant::now();
    while sent < N {
        rig.guest.reclaim_tx();
        let in_flight = (sent as u32).wrapping_sub(dev_fwd_cnt);
        let credit = dev_buf_alloc.saturating_sub(in_flight) as usize;
        if credit > 0 && !rig.guest.tx_free.is_empty() {
            // One write of up to 4 KiB, cut to the credit: many small chains give
            // the device many chances to find the ring empty as one arrives.
            let n = (1 + rng.below(4096) as usize).min(credit).min(N - sent);
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + k);
            }
            let h = rig.guest.hdr(7000, 5000, OP_RW);
            rig.guest.send(h, &chunk[..n]);
            sent += n;
            continue;
        }
        // Blocked on credit or on tx descriptors: take credit from what arrives.
        if let Some((h, _)) = rig.guest.recv(Duration::from_millis(1)) {
            assert_eq!((h.src_port, h.dst_port), (5000, 7000), "{h:?}");
            assert!(matches!(h.op, OP_CREDIT_UPDATE | OP_RW), "{h:?}");
            dev_buf_alloc = h.buf_alloc;
            dev_fwd_cnt = h.fwd_cnt;
        }
        let now = (
            sent,
            read.load(Ordering::Relaxed),
            rig.guest.tx.used_idx(),
            rig.guest.rx.used_idx(),
        );
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        assert!(
            last_change.elapsed() < STALL,
            "stalled: guest sent {sent}, host read {}, device fwd_cnt {dev_fwd_cnt}; \
             tx ring: avail {} used {} avail_event {}",
            now.1,
            rig.guest.tx.avail_idx,
            now.2,
            rig.guest.tx.avail_event(),
        );
    }
    let mut bye = rig.guest.hdr(7000, 5000, OP_SHUTDOWN);
    bye.flags = SHUTDOWN_BOTH;
    rig.guest.send(bye, &[]);
    let deadline = Instant::now() + WAIT;
    while !reader.is_finished() {
        // Keep taking rx packets so the final reset has buffers.
        let _ = rig.guest.recv(Duration::from_millis(5));
        assert!(
            Instant::now() < deadline,
            "host read {} of {N}",
            read.load(Ordering::Relaxed)
        );
    }
    assert_eq!(reader.join().unwrap(), N);
    assert_eq!(counter(&rig.metrics.bad_packets), 0);
}

#[test]
fn host_eof_becomes_a_shutdown_for_the_guest() {
    let mut rig = Rig::new();
    let listener = rig.host_listener(6000);
    let (host, _) = rig.guest_connect(&listener, 1, 6000);
    (&host).write_all(b"bye").unwrap();
    drop(host);
    let (h, data) = rig.guest.recv(WAIT).unwrap();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"bye"[..]));
    let h = rig.guest.expect(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    // Writing to the closed host stream resets the connection.
    let d = rig.guest.hdr(1, 6000, OP_RW);
    rig.guest.send(d, b"anyone?");
    rig.guest.expect(OP_RST);
}

#[test]
fn missing_host_listener_and_unknown_connections_get_resets() {
    let mut rig = Rig::new();
    let req = rig.guest.hdr(40, 4444, OP_REQUEST);
    rig.guest.send(req, &[]);
    let rst = rig.guest.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (4444, 40));

    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        let h = rig.guest.hdr(41, 9, op);
        rig.guest.send(h, &[]);
        let rst = rig.guest.expect(OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (9, 41), "op {op}");
    }
    // No reset for a reset.
    let h = rig.guest.hdr(41, 9, OP_RST);
    rig.guest.send(h, &[]);
    assert_eq!(rig.guest.recv(Duration::from_millis(100)), None);
    assert_eq!(counter(&rig.metrics.resets_sent), 6);
}

#[test]
fn credit_overrun_resets_only_that_connection() {
    let mut rig = Rig::new();
    let listener = rig.host_listener(5000);
    // The host side of `a` never reads.
    let (_a, _) = rig.guest_connect(&listener, 100, 5000);
    let (mut b, _) = rig.guest_connect(&listener, 200, 5000);
    let chunk = vec![0xabu8; MAX_PAYLOAD as usize];
    let mut sent = 0usize;
    let mut reset = false;
    // The guest ignores the credit it was given; the packets in flight may carry
    // credit updates it does not read. 4 MiB is far past anything the device can
    // have advertised.
    while sent < 4 << 20 {
        let h = rig.guest.hdr(100, 5000, OP_RW);
        rig.guest.send(h, &chunk);
        sent += chunk.len();
    }
    while let Some((h, _)) = rig.guest.recv(Duration::from_millis(200)) {
        assert_eq!(h.dst_port, 100, "{h:?}");
        if h.op == OP_RST {
            reset = true;
        }
    }
    assert!(reset, "no reset after {sent} bytes");
    assert!(counter(&rig.metrics.bad_packets) >= 1);
    // `b` still works both ways.
    let h = rig.guest.hdr(200, 5000, OP_RW);
    rig.guest.send(h, b"still here");
    let mut buf = [0u8; 10];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    b.write_all(b"yes").unwrap();
    let (h, data) = rig.guest.recv(WAIT).unwrap();
    assert_eq!(
        (h.op, h.dst_port, data.as_slice()),
        (OP_RW, 200, &b"yes"[..])
    );
}

#[test]
fn bad_headers_are_dropped_and_counted() {
    let mut rig = Rig::new();
    let listener = rig.host_listener(5000);
    let (_host, _) = rig.guest_connect(&listener, 300, 5000);

    // len above the maximum, and len past the end of the chain: the connection's
    // stream is broken, so it is reset.
    let mut h = rig.guest.hdr(300, 5000, OP_RW);
    h.len = MAX_PAYLOAD + 1;
    rig.guest.send_raw(h, &[]);
    rig.guest.expect(OP_RST);
    let mut h = rig.guest.hdr(301, 5000, OP_RW);
    h.len = 100;
    rig.guest.send_raw(h, &[0; 10]);
    rig.guest.expect(OP_RST);

    // Wrong addresses: dropped without an answer.
    let mut h = rig.guest.hdr(300, 5000, OP_REQUEST);
    h.src_cid = 9;
    rig.guest.send(h, &[]);
    let mut h = rig.guest.hdr(300, 5000, OP_REQUEST);
    h.dst_cid = 7;
    rig.guest.send(h, &[]);
    // A header in a descriptor too short for it.
    let slot = rig.guest.tx_slot();
    rig.guest
        .send_desc(slot, TX_BUFS + u64::from(slot) * TX_SLOT, 20);
    // A descriptor outside guest memory.
    let slot = rig.guest.tx_slot();
    rig.guest.send_desc(slot, MEM_SIZE - 8, 44);
    rig.guest.tx_drained();
    assert_eq!(rig.guest.recv(Duration::from_millis(100)), None);
    // Wrong socket type: reset.
    let mut h = rig.guest.hdr(302, 5000, OP_REQUEST);
    h.type_ = 2;
    rig.guest.send(h, &[]);
    rig.guest.expect(OP_RST);
    assert_eq!(counter(&rig.metrics.bad_packets), 7);
    // The device still serves.
    let (_h2, _) = rig.guest_connect(&listener, 303, 5000);
}

#[test]
fn tiny_rx_buffers_are_returned_empty() {
    let mut rig = Rig::new();
    // Shrink every rx buffer the device holds below a header.
    for i in 0..QSIZE {
        rig.guest
            .rx
            .write_desc(i, rx_buf(i), 8, VRING_DESC_F_WRITE, 0);
    }
    let req = rig.guest.hdr(2, 4444, OP_REQUEST);
    rig.guest.send(req, &[]);
    // The device returns them empty and keeps the reset for the full-size buffers
    // recv() posts in their place.
    rig.guest.expect(OP_RST);
    assert_eq!(rig.guest.rx_too_small, usize::from(QSIZE));
    assert_eq!(counter(&rig.metrics.bad_packets), u64::from(QSIZE));
}

#[test]
fn connection_limit_refuses_extra_guest_requests_and_host_connects() {
    const LIMIT: usize = 8;
    assert_eq!(MAX_CONNECTIONS, 1024);
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.path().join("v.sock"),
    })
    .unwrap();
    dev.set_max_connections(LIMIT);
    let mem = new_memory();
    let guest = activate(&mut dev, &mem);
    let mut rig = Rig {
        metrics: dev.metrics(),
        dir,
        dev,
        guest,
    };
    let listener = rig.host_listener(5000);
    // One host-initiated connection counts too.
    let (_h, _) = rig.host_connect(1);
    let mut accepted = Vec::new();
    for port in 0..LIMIT as u32 + 2 {
        let h = rig.guest.hdr(10_000 + port, 5000, OP_REQUEST);
        rig.guest.send(h, &[]);
        let (h, _) = rig.guest.recv(WAIT).unwrap();
        if (port as usize) < LIMIT - 1 {
            assert_eq!(h.op, OP_RESPONSE, "request {port}");
            accepted.push(listener.accept().unwrap());
        } else {
            assert_eq!(h.op, OP_RST, "request {port}");
        }
    }
    // Host connections beyond the limit are closed at once.
    let mut extra = rig.host_stream(b"");
    assert!(closed(&mut extra));
    // A closed connection frees its place.
    let h = rig.guest.hdr(10_000, 5000, OP_RST);
    rig.guest.send(h, &[]);
    let h = rig.guest.hdr(20_000, 5000, OP_REQUEST);
    rig.guest.send(h, &[]);
    rig.guest.expect(OP_RESPONSE);
}

/// CPU time (clock ticks) the thread named `name` has used.
fn thread_cpu_ticks(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread named {name}");
}

/// Level-triggered epoll must not spin on streams the device cannot serve now: a
/// closed host end, a guest without credit, a host that does not read, a half-sent
/// connect line, an rx queue without buffers.
#[test]
fn worker_sleeps_while_every_stream_waits() {
    let mut rig = Rig::with_cid(4242);
    let name = "virtio-vsock-42"; // truncated to 15 bytes by the kernel
    let listener = rig.host_listener(5000);

    // Host end closed.
    let (d, dport) = rig.host_connect(1);
    drop(d);
    let h = rig.guest.expect(OP_SHUTDOWN);
    assert_eq!(h.dst_port, 1);
    let _ = dport;

    // No credit: the guest allows 1000 bytes and never updates.
    rig.guest.buf_alloc = 1000;
    let (mut b, _) = rig.guest_connect(&listener, 2, 5000);
    b.write_all(&[7u8; 5000]).unwrap();
    let mut got = 0;
    loop {
        let (h, data) = rig.guest.recv(WAIT).unwrap();
        assert_eq!(h.dst_port, 2);
        match h.op {
            OP_RW => got += data.len(),
            OP_CREDIT_REQUEST => break,
            op => panic!("op {op}"),
        }
    }
    assert_eq!(got, 1000);

    // A host that does not read: the device ends up holding guest data.
    rig.guest.buf_alloc = 64 * 1024;
    let (_c, _) = rig.guest_connect(&listener, 3, 5000);
    for _ in 0..4 {
        let h = rig.guest.hdr(3, 5000, OP_RW);
        rig.guest.send(h, &[1u8; MAX_PAYLOAD as usize]);
    }
    rig.guest.tx_drained();

    // Half a connect line.
    let _e = rig.host_stream(b"CONN");

    // The guest stops reading: the rx queue runs dry under a host that writes a lot.
    rig.guest.buf_alloc = 16 << 20;
    let (a, _) = rig.guest_connect(&listener, 4, 5000);
    let writer = thread::spawn(move || {
        let _ = (&a).write_all(&vec![9u8; 4 << 20]);
        a
    });
    let deadline = Instant::now() + WAIT;
    while rig.guest.rx.used_idx() != rig.guest.rx.used_seen.wrapping_add(QSIZE) {
        assert!(Instant::now() < deadline, "rx queue never filled");
        thread::sleep(Duration::from_millis(10));
    }

    thread::sleep(Duration::from_millis(100));
    let before = thread_cpu_ticks(name);
    thread::sleep(Duration::from_millis(700));
    let used = thread_cpu_ticks(name) - before;
    assert!(used <= 7, "worker used {used} ticks in 700 ms while idle");
    drop(rig);
    let _ = writer.join();
}

// ---- fuzz-style -------------------------------------------------------------------------

/// 2000 random tx chains and headers, some valid, most not (addresses outside memory,
/// loops, indirect tables, writable descriptors over memory the device must not touch),
/// run synchronously through the worker. Nothing panics, and memory outside the rx
/// buffers and rings is unchanged.
#[test]
fn random_tx_chains_never_panic_or_write_outside_rx_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let host_listener = host_listener(&uds, 5000);
    let mem = new_memory();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let canary = rng.bytes((MEM_SIZE - CANARY) as usize);
    mem.write_slice(&canary, GuestAddress(CANARY)).unwrap();
    let (mut worker, epoll, metrics, [mut rx, mut tx, _]) = sync_worker(&mem, &uds);
    post_rx_buffers(&mut rx);
    let ports = [5000u32, 5001, 1 << 30, 7];
    let mut rx_packets = 0;
    for round in 0..2000u32 {
        // A header, mostly plausible.
        let pick =
            |rng: &mut Rng, good: u64, n: u64| if rng.below(10) < n { good } else { rng.next() };
        let h = PacketHeader {
            src_cid: pick(&mut rng, GUEST_CID, 8),
            dst_cid: pick(&mut rng, HOST_CID, 8),
            src_port: ports[rng.below(4) as usize],
            dst_port: ports[rng.below(4) as usize],
            len: match rng.below(4) {
                0 => rng.next() as u32,
                1 => MAX_PAYLOAD + rng.below(16) as u32,
                _ => rng.below(5000) as u32,
            },
            type_: pick(&mut rng, 1, 9) as u16,
            op: rng.below(9) as u16,
            flags: rng.below(4) as u32,
            buf_alloc: rng.next() as u32,
            fwd_cnt: rng.next() as u32,
        };
        // Up to four descriptors: header slots in the tx area, random addresses,
        // memory edges, the canary area (writable flag set: the device must not write).
        let n = 1 + rng.below(4) as u16;
        let first = (round % 32) as u16 * 4;
        for k in 0..n {
            let i = first + k;
            let slot_addr = TX_BUFS + u64::from(i / 4) * TX_SLOT + u64::from(k) * 0x4000;
            let addr = match rng.below(8) {
                0 => rng.next(),
                1 => MEM_SIZE - rng.below(64),
                2 => CANARY + rng.below(MEM_SIZE - CANARY),
                _ => slot_addr,
            };
            let len = match rng.below(6) {
                0 => rng.next() as u32,
                1 => rng.below(44) as u32,
                _ => rng.below(0x4000) as u32,
            };
            let mut flags = 0;
            if k + 1 < n || rng.below(16) == 0 {
                flags |= VRING_DESC_F_NEXT;
            }
            if rng.below(4) == 0 {
                flags |= VRING_DESC_F_WRITE;
            }
            if rng.below(32) == 0 {
                flags |= VRING_DESC_F_INDIRECT;
            }
            let next = match rng.below(8) {
                0 => rng.next() as u16,
                1 => first, // a loop
                _ => i + 1,
            };
            if addr == slot_addr {
                mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
                let plen = rng.below(64) as usize;
                let payload = rng.bytes(plen);
                mem.write_slice(&payload, GuestAddress(addr + 44)).unwrap();
            }
            tx.write_desc(i, addr, len, flags, next);
        }
        let head = if rng.below(64) == 0 {
            rng.next() as u16
        } else {
            first
        };
        tx.publish(head);
        worker.queue_event(TX_QUEUE, &epoll);
        while tx.pop_used().is_some() {}

        // The guest reads what the device sent and gives the buffers back, sometimes
        // as chains the device cannot use.
        while let Some((id, len)) = rx.pop_used() {
            assert!(len <= RX_BUF_SIZE);
            if len > 0 {
                let p = rx_header(&mem, id);
                assert_eq!(p.len as usize + HEADER_SIZE, len as usize);
                assert_eq!((p.src_cid, p.dst_cid), (HOST_CID, GUEST_CID));
                rx_packets += 1;
            }
            let i = id % QSIZE;
            let addr = rx_buf(i);
            match rng.below(16) {
                0 => rx.write_desc(i, MEM_SIZE + rng.below(1 << 20), 64, VRING_DESC_F_WRITE, 0),
                1 => rx.write_desc(i, addr, rng.below(60) as u32, VRING_DESC_F_WRITE, 0),
                2 => rx.write_desc(
                    i,
                    addr,
                    RX_BUF_SIZE,
                    VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    i,
                ),
                _ => rx.write_desc(i, addr, RX_BUF_SIZE, VRING_DESC_F_WRITE, 0),
            }
            rx.publish(i);
        }
        worker.queue_event(RX_QUEUE, &epoll);
        worker.queue_event(EVENT_QUEUE, &epoll);
    }
    let mut after = vec![0u8; canary.len()];
    mem.read_slice(&mut after, GuestAddress(CANARY)).unwrap();
    assert!(after == canary, "memory outside the rx buffers changed");
    assert!(counter(&metrics.bad_packets) > 100);
    assert!(counter(&metrics.resets_sent) > 10);
    assert!(rx_packets > 10);
    assert!(worker.connection_count() <= MAX_CONNECTIONS);
    drop(host_listener);
}

/// Control packets wait for rx buffers in a bounded FIFO: once it is full the device
/// leaves tx chains in the ring, and takes them again as the guest gives rx buffers.
#[test]
fn full_control_queue_pauses_the_tx_queue() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mem = new_memory();
    let (mut worker, epoll, metrics, [mut rx, mut tx, _]) = sync_worker(&mem, &uds);
    // One packet for a connection that does not exist, offered over and over: each
    // asks for a reset.
    let h = PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        type_: TYPE_STREAM,
        op: OP_RW,
        ..Default::default()
    };
    mem.write_slice(&h.to_bytes(), GuestAddress(TX_BUFS))
        .unwrap();
    tx.write_desc(0, TX_BUFS, 44, 0, 0);
    let mut offered = 0usize;
    let mut taken = 0usize;
    let fill = |tx: &mut DriverRing, offered: &mut usize, taken: usize| {
        while *offered - taken < usize::from(QSIZE) {
            tx.publish(0);
            *offered += 1;
        }
    };
    for _ in 0..8 {
        fill(&mut tx, &mut offered, taken);
        worker.queue_event(TX_QUEUE, &epoll);
        while tx.pop_used().is_some() {
            taken += 1;
        }
    }
    assert_eq!(
        taken,
        super::muxer::CONTROL_QUEUE_MAX,
        "tx taken while the FIFO was full"
    );
    assert_eq!(counter(&metrics.resets_sent), 0);

    // The guest gives rx buffers: resets flow, and the tx queue moves again.
    post_rx_buffers(&mut rx);
    worker.queue_event(RX_QUEUE, &epoll);
    let mut delivered = 0;
    while let Some((id, len)) = rx.pop_used() {
        let p = rx_header(&mem, id);
        assert_eq!(
            (len as usize, p.op, p.src_port, p.dst_port),
            (HEADER_SIZE, OP_RST, 2, 1)
        );
        delivered += 1;
    }
    assert_eq!(delivered, usize::from(QSIZE));
    while tx.pop_used().is_some() {
        taken += 1;
    }
    assert_eq!(taken, super::muxer::CONTROL_QUEUE_MAX + usize::from(QSIZE));
}

/// The parser alone over arbitrary chains (the entry point a cargo-fuzz target uses).
#[test]
fn tx_parser_checks_every_length() {
    let mem = new_memory();
    let [_, mut tx, _] = driver_rings(&mem);
    let mut q = tx.queue();
    let h = PacketHeader {
        len: 10,
        ..Default::default()
    };
    mem.write_slice(&h.to_bytes(), GuestAddress(TX_BUFS))
        .unwrap();
    // Header split over two descriptors, payload in a third.
    tx.write_desc(0, TX_BUFS, 30, VRING_DESC_F_NEXT, 1);
    tx.write_desc(1, TX_BUFS + 30, 14, VRING_DESC_F_NEXT, 2);
    tx.write_desc(2, TX_BUFS + 100, 10, 0, 0);
    tx.publish(0);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut p = read_tx_packet(&mem, chain).unwrap();
    assert_eq!(p.header.len, 10);
    let mut buf = vec![0u8; MAX_PAYLOAD as usize];
    assert_eq!(p.read_payload(&mut buf).unwrap(), 10);
    // Payload one byte short.
    tx.write_desc(2, TX_BUFS + 100, 9, 0, 0);
    tx.publish(0);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let err = read_tx_packet(&mem, chain).err().unwrap();
    assert!(
        matches!(err, PacketError::PayloadShort { available: 9, .. }),
        "{err}"
    );
    assert_eq!(err.header().map(|h| h.len), Some(10));
    // Header one byte short.
    tx.write_desc(1, TX_BUFS + 30, 13, 0, 0);
    tx.publish(0);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let err = read_tx_packet(&mem, chain).err().unwrap();
    assert!(matches!(err, PacketError::HeaderTooShort(43)), "{err}");
    // Outside memory.
    tx.write_desc(0, MEM_SIZE - 4, 44, 0, 0);
    tx.publish(0);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert!(matches!(
        read_tx_packet(&mem, chain),
        Err(PacketError::Chain(_))
    ));
}
