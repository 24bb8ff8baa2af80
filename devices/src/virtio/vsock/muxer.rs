//! The vsock worker: moves packets between the guest's queues and host unix sockets.
//!
//! Everything runs on one [`VirtioWorker`](crate::virtio::VirtioWorker) thread: the
//! listening socket, every unix stream (while it has something to wait for), a timer for
//! handshake and close deadlines, and the rx/tx/event queue kicks share its epoll.
//!
//! Towards the guest there are two sources: a FIFO of control packets (responses,
//! resets, shutdowns, credit messages) that goes first, and the streams known to be
//! readable, served round robin, one packet each, only while the guest has credit for
//! them. A stream is read only when an rx buffer is at hand, so data waits in the host
//! socket (the unix peer sees back-pressure) rather than in the device. A readable stream
//! is not watched for `EPOLLIN` until a read finds it empty, so level-triggered epoll
//! never spins on data the device cannot deliver yet.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections plus pending host handshakes; guest
//! data buffered per connection is bounded by the credit the device advertised. New
//! connections, the one thing that can add control packets again and again, come from
//! the tx queue and the listening socket; both are left alone while the control FIFO
//! holds [`CONTROL_QUEUE_MAX`] packets, and a live connection adds at most a few (one
//! shutdown, one reset, one deduplicated credit message each way), so the FIFO stays
//! below `CONTROL_QUEUE_MAX` plus a small multiple of the connection limit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{connect_nonblocking, ConnKey, ConnState, Connection, ReadState};
use super::packet::{
    read_tx_packet, PacketError, PacketHeader, RxBuffer, TxPacket, HOST_CID, MAX_PAYLOAD,
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::VsockMetrics;
use crate::virtio::worker::{epoll_add, epoll_delete, epoll_modify, DEVICE_TOKEN_BASE};
use crate::virtio::VirtioInterrupt;

/// Device → guest packets (queue index).
pub const RX_QUEUE: usize = 0;
/// Guest → device packets.
pub const TX_QUEUE: usize = 1;
/// Device → guest events (transport reset); unused.
pub const EVENT_QUEUE: usize = 2;

/// Live connections plus pending host handshakes.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for rx buffers before the tx queue is left alone.
pub const CONTROL_QUEUE_MAX: usize = 1024;
/// A host peer must finish its `CONNECT <port>\n` line within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest must answer a host-initiated request within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// After the guest closed, buffered data may take this long to reach the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = DEVICE_TOKEN_BASE;
const TIMER_TOKEN: u64 = DEVICE_TOKEN_BASE + 1;
const WAKE_TOKEN: u64 = DEVICE_TOKEN_BASE + 2;
const FIRST_STREAM_TOKEN: u64 = DEVICE_TOKEN_BASE + 16;
/// Chains handled per queue pass before other events get a turn.
const QUEUE_BUDGET: usize = 256;
/// Host connections accepted per listener event.
const ACCEPT_BATCH: usize = 64;
/// Pause after the listener fails for a reason other than an empty backlog.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What the worker needs to know about the device.
pub struct MuxerConfig {
    /// The guest's CID: packets from any other source are dropped.
    pub guest_cid: u64,
    /// Guest connections to port `P` go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Live connections plus pending host handshakes allowed at once.
    pub max_connections: usize,
}

/// A host connection that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// A packet without payload, queued for the guest. The header's credit fields are
/// filled at delivery from the connection, if it still exists.
#[derive(Clone, Copy, Debug)]
struct ControlPacket {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// What the worker thread owns while the device runs.
pub struct VsockWorker {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    guest_cid: u64,
    uds_path: PathBuf,
    max_connections: usize,
    listener: UnixListener,
    listener_registered: bool,
    listener_retry: Option<Instant>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    wake: EventFd,
    metrics: Arc<VsockMetrics>,
    connections: BTreeMap<ConnKey, Connection>,
    by_token: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<ControlPacket>,
    readable: VecDeque<ConnKey>,
    tx_paused: bool,
    scratch: Vec<u8>,
}

impl VsockWorker {
    /// State for serving `queues` (rx, tx, event) with connections from `listener`
    /// (a non-blocking clone of the device's).
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        config: MuxerConfig,
        listener: UnixListener,
        metrics: Arc<VsockMetrics>,
    ) -> io::Result<Self> {
        let MuxerConfig {
            guest_cid,
            uds_path,
            max_connections,
        } = config;
        Ok(Self {
            mem,
            queues,
            interrupt,
            guest_cid,
            uds_path,
            max_connections,
            listener,
            listener_registered: false,
            listener_retry: None,
            timer: TimerFd::new()?,
            timer_deadline: None,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            metrics,
            connections: BTreeMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            readable: VecDeque::new(),
            tx_paused: false,
            scratch: vec![0; MAX_PAYLOAD as usize],
        })
    }

    /// The queues, for the transport after a reset. Dropping the rest closes every
    /// host connection.
    pub fn into_queues(self) -> Vec<Queue> {
        self.queues
    }

    /// Live connections (tests).
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    // ---- event entry points -------------------------------------------------------

    fn on_queue(&mut self, index: usize, epoll: &Epoll) {
        // New rx buffers: `pump` delivers. Event queue kicks carry nothing.
        if index == TX_QUEUE {
            self.process_tx(epoll);
        }
        self.pump(epoll);
    }

    fn on_device(&mut self, token: u64, events: EventSet, epoll: &Epoll) {
        match token {
            LISTENER_TOKEN => self.accept(epoll),
            TIMER_TOKEN => self.on_timer(epoll),
            WAKE_TOKEN => {
                let _ = self.wake.read();
                self.process_tx(epoll);
            }
            token => {
                if let Some(key) = self.by_token.get(&token).copied() {
                    self.on_stream(key, events, epoll);
                } else if self.handshakes.contains_key(&token) {
                    self.on_handshake(token, epoll);
                }
            }
        }
        self.pump(epoll);
    }

    /// Delivers what is pending and resumes the tx queue once the control FIFO drained.
    fn pump(&mut self, epoll: &Epoll) {
        self.process_rx(epoll);
        if self.tx_paused && self.control.len() < CONTROL_QUEUE_MAX {
            self.tx_paused = false;
            self.process_tx(epoll);
            self.process_rx(epoll);
            if self.tx_paused && self.control.len() < CONTROL_QUEUE_MAX {
                self.wake_later();
            }
        }
        self.sync_listener(epoll);
    }

    /// Comes back to the loop after other events had their turn.
    fn wake_later(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("vsock: cannot wake the worker: {e}");
        }
    }

    fn signal(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_queue(index) {
                log::error!("vsock: cannot signal queue {index}: {e}");
            }
        }
    }

    // ---- guest → host ---------------------------------------------------------------

    fn process_tx(&mut self, epoll: &Epoll) {
        if !self.queues.get(TX_QUEUE).is_some_and(|q| q.ready()) {
            return;
        }
        let mem = self.mem.clone();
        let mut handled = 0;
        loop {
            if self.control.len() >= CONTROL_QUEUE_MAX {
                self.tx_paused = true;
                break;
            }
            if handled >= QUEUE_BUDGET {
                self.wake_later();
                break;
            }
            let Some(chain) = pop_chain(&mut self.queues[TX_QUEUE], &mem) else {
                break;
            };
            let head = chain.head_index();
            let packet = read_tx_packet(&mem, chain);
            self.handle_tx(packet, epoll);
            if let Err(e) = self.queues[TX_QUEUE].add_used(&mem, head, 0) {
                log::warn!("vsock: cannot return tx chain {head}: {e}");
            }
            handled += 1;
        }
        if handled > 0 {
            self.signal(TX_QUEUE);
        }
    }

    fn handle_tx(&mut self, packet: Result<TxPacket<'_>, PacketError>, epoll: &Epoll) {
        let mut packet = match packet {
            Ok(p) => p,
            Err(e) => {
                bad_packet(&self.metrics, &e);
                // A readable header with a bad length still names a connection whose
                // byte stream is now broken.
                if let Some(h) = e.header() {
                    if self.addressed_to_host(h) && h.op != OP_RST {
                        self.reset(key_of(h), epoll);
                    }
                }
                return;
            }
        };
        let h = packet.header;
        if !self.addressed_to_host(&h) {
            // Spoofed or misrouted: nobody to answer.
            bad_packet(
                &self.metrics,
                &format_args!(
                    "src_cid {} dst_cid {} (guest cid {})",
                    h.src_cid, h.dst_cid, self.guest_cid
                ),
            );
            return;
        }
        let key = key_of(&h);
        if h.type_ != TYPE_STREAM {
            bad_packet(&self.metrics, &format_args!("socket type {}", h.type_));
            if h.op != OP_RST {
                self.reset(key, epoll);
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h, epoll);
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        let fwd_moved = conn.update_peer_credit(&h);
        if fwd_moved && conn.read_state == ReadState::NoCredit {
            if conn.peer_credit() > 0 {
                conn.read_state = ReadState::Queued;
                self.readable.push_back(key);
            } else {
                // Still no room: ask again (once per change of the guest's fwd_cnt).
                conn.credit_requested = true;
                self.push_control(key, OP_CREDIT_REQUEST, 0);
            }
        }
        match h.op {
            OP_RST => self.remove(key, epoll),
            OP_RESPONSE => self.guest_accepted(key, epoll),
            OP_RW => self.guest_data(key, &mut packet, epoll),
            OP_SHUTDOWN => self.guest_shutdown(key, h.flags, epoll),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_credit_update(key),
            op => {
                bad_packet(&self.metrics, &format_args!("operation {op}"));
                self.reset(key, epoll);
            }
        }
    }

    fn addressed_to_host(&self, h: &PacketHeader) -> bool {
        h.src_cid == self.guest_cid && h.dst_cid == HOST_CID
    }

    /// `OP_REQUEST`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &PacketHeader, epoll: &Epoll) {
        if self.connections.contains_key(&key) {
            // A second request on a live connection: the guest lost track of it.
            self.reset(key, epoll);
            return;
        }
        if self.connections.len() + self.handshakes.len() >= self.max_connections {
            log::debug!(
                "vsock: refusing guest connection to port {}",
                key.local_port
            );
            self.push_control(key, OP_RST, 0);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(stream) => {
                let token = self.alloc_token();
                let mut conn = Connection::new(stream, token, ConnState::Established);
                conn.update_peer_credit(h);
                self.connections.insert(key, conn);
                self.by_token.insert(token, key);
                self.metrics.connections.fetch_add(1, Ordering::Relaxed);
                self.push_control(key, OP_RESPONSE, 0);
                self.update_interest(key, epoll);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to port {}: {e}", key.local_port);
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    /// `OP_RESPONSE`: the guest accepted a host-initiated connection.
    fn guest_accepted(&mut self, key: ConnKey, epoll: &Epoll) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.state != ConnState::LocalInit {
            self.reset(key, epoll);
            return;
        }
        let line = format!("OK {}\n", key.local_port);
        // The stream is fresh and empty, so the short line fits; if not, the peer is
        // gone or misbehaving.
        let written = (&conn.stream).write(line.as_bytes());
        if !matches!(written, Ok(n) if n == line.len()) {
            self.reset(key, epoll);
            return;
        }
        conn.state = ConnState::Established;
        conn.deadline = None;
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        self.update_interest(key, epoll);
    }

    /// `OP_RW`: stream data for the host.
    fn guest_data(&mut self, key: ConnKey, packet: &mut TxPacket<'_>, epoll: &Epoll) {
        let len = packet.header.len as usize;
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if !conn.guest_may_send() {
            bad_packet(
                &self.metrics,
                &format_args!(
                    "data on port {} before it was accepted or after shutdown",
                    key.local_port
                ),
            );
            self.reset(key, epoll);
            return;
        }
        if !conn.within_credit(len) {
            bad_packet(
                &self.metrics,
                &format_args!(
                    "credit overrun on port {}: {} bytes with {} buffered",
                    key.local_port,
                    len,
                    conn.buffered()
                ),
            );
            self.reset(key, epoll);
            return;
        }
        if let Err(e) = packet.read_payload(&mut self.scratch) {
            bad_packet(&self.metrics, &e);
            self.reset(key, epoll);
            return;
        }
        let data = &self.scratch[..len];
        if let Err(e) = conn.send_to_host(data) {
            log::debug!("vsock: host stream of port {} failed: {e}", key.local_port);
            self.reset(key, epoll);
            return;
        }
        self.metrics
            .tx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.after_flush(key, epoll);
    }

    /// `OP_SHUTDOWN`: the guest will no longer receive and/or send.
    fn guest_shutdown(&mut self, key: ConnKey, flags: u32, epoll: &Epoll) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.state != ConnState::Established {
            self.reset(key, epoll);
            return;
        }
        conn.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if conn.peer_shutdown == SHUTDOWN_BOTH && !conn.closing {
            conn.closing = true;
            let deadline = Instant::now() + CLOSE_TIMEOUT;
            conn.deadline = Some(deadline);
            self.schedule(deadline);
        }
        self.after_flush(key, epoll);
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.get_mut(&key) {
            if !conn.credit_update_queued {
                conn.credit_update_queued = true;
                self.push_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// After guest data was forwarded (or the guest shut down): tell the guest about
    /// freed space, finish a shutdown whose data is all out, and fix the epoll interest.
    fn after_flush(&mut self, key: ConnKey, epoll: &Epoll) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.buffered() == 0 {
            if conn.closing {
                // A clean close: everything reached the host; the guest waits for RST.
                self.reset(key, epoll);
                return;
            }
            if conn.peer_shutdown & SHUTDOWN_SEND != 0 && !conn.write_shut {
                conn.write_shut = true;
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        if conn.needs_credit_update() {
            self.queue_credit_update(key);
        }
        self.update_interest(key, epoll);
    }

    // ---- host → guest -----------------------------------------------------------------

    fn process_rx(&mut self, epoll: &Epoll) {
        if !self.queues.get(RX_QUEUE).is_some_and(|q| q.ready()) {
            return;
        }
        let mem = self.mem.clone();
        let mut used = 0;
        while !self.control.is_empty() || !self.readable.is_empty() {
            if used >= QUEUE_BUDGET {
                self.wake_later();
                break;
            }
            let Some(chain) = pop_chain(&mut self.queues[RX_QUEUE], &mem) else {
                // Wait for the guest's next rx kick.
                break;
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(&mem, chain) {
                Ok(mut buf) => match self.fill_rx(&mut buf, epoll) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: keep the buffer for later.
                        self.queues[RX_QUEUE].go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    bad_packet(&self.metrics, &e);
                    0
                }
            };
            if let Err(e) = self.queues[RX_QUEUE].add_used(&mem, head, len) {
                log::warn!("vsock: cannot return rx chain {head}: {e}");
            }
            used += 1;
        }
        if used > 0 {
            self.signal(RX_QUEUE);
        }
    }

    /// Puts the next packet for the guest into `buf`: a control packet if one waits,
    /// else data from the next readable stream the guest has credit for. Returns the
    /// bytes written, or `None` if there is nothing to send.
    fn fill_rx(&mut self, buf: &mut RxBuffer<'_>, epoll: &Epoll) -> Option<u32> {
        loop {
            if let Some(c) = self.control.front().copied() {
                let conn = self.connections.get_mut(&c.key);
                if conn.is_none() && c.op != OP_RST {
                    // The connection went away meanwhile; its reset was queued after.
                    self.control.pop_front();
                    continue;
                }
                let header = match &conn {
                    Some(conn) => conn.header(c.key, self.guest_cid, c.op, c.flags),
                    None => PacketHeader {
                        src_cid: HOST_CID,
                        dst_cid: self.guest_cid,
                        src_port: c.key.local_port,
                        dst_port: c.key.peer_port,
                        type_: TYPE_STREAM,
                        op: c.op,
                        flags: c.flags,
                        ..PacketHeader::default()
                    },
                };
                let written = match buf.write_packet(&header, &[]) {
                    Ok(n) => n,
                    Err(e) => {
                        // Too small for any packet: the guest gets it back empty.
                        bad_packet(&self.metrics, &e);
                        return Some(0);
                    }
                };
                self.control.pop_front();
                if let Some(conn) = conn {
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    if c.op == OP_CREDIT_UPDATE {
                        conn.credit_update_queued = false;
                    }
                }
                if c.op == OP_RST {
                    self.metrics.resets_sent.fetch_add(1, Ordering::Relaxed);
                }
                return Some(written);
            }

            let key = self.readable.pop_front()?;
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            if conn.read_state != ReadState::Queued {
                continue;
            }
            conn.read_state = ReadState::Idle;
            if !conn.wants_read() {
                self.update_interest(key, epoll);
                continue;
            }
            let credit = conn.peer_credit();
            if credit == 0 {
                conn.read_state = ReadState::NoCredit;
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.push_control(key, OP_CREDIT_REQUEST, 0);
                }
                continue;
            }
            let room = buf
                .payload_capacity()
                .min(credit as usize)
                .min(self.scratch.len());
            if room == 0 {
                // The guest's buffer cannot carry data; keep the stream's turn.
                conn.read_state = ReadState::Queued;
                self.readable.push_front(key);
                bad_packet(&self.metrics, &"rx buffer too small for data");
                return Some(0);
            }
            match read_some(&conn.stream, &mut self.scratch[..room]) {
                Ok(Some(0)) => {
                    // The host peer will send no more: tell the guest.
                    conn.host_eof = true;
                    self.push_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                    self.update_interest(key, epoll);
                }
                Ok(Some(n)) => {
                    let header = conn.header(key, self.guest_cid, OP_RW, 0);
                    match buf.write_packet(&header, &self.scratch[..n]) {
                        Ok(written) => {
                            // n ≤ MAX_PAYLOAD.
                            #[allow(clippy::cast_possible_truncation)]
                            let sent = n as u32;
                            conn.tx_cnt += Wrapping(sent);
                            conn.fwd_cnt_sent = conn.fwd_cnt;
                            conn.read_state = ReadState::Queued;
                            self.readable.push_back(key);
                            self.metrics.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            return Some(written);
                        }
                        Err(e) => {
                            // The data is lost: the stream cannot go on.
                            bad_packet(&self.metrics, &e);
                            self.reset(key, epoll);
                            return Some(0);
                        }
                    }
                }
                Ok(None) => self.update_interest(key, epoll),
                Err(e) => {
                    log::debug!("vsock: host stream of port {} failed: {e}", key.local_port);
                    self.reset(key, epoll);
                }
            }
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(ControlPacket { key, op, flags });
    }

    /// Sends the guest `OP_RST` for `key` and forgets the connection, if any.
    fn reset(&mut self, key: ConnKey, epoll: &Epoll) {
        self.push_control(key, OP_RST, 0);
        self.remove(key, epoll);
    }

    /// Forgets a connection, closing its unix stream.
    fn remove(&mut self, key: ConnKey, epoll: &Epoll) {
        if let Some(conn) = self.connections.remove(&key) {
            if conn.registered.is_some() {
                let _ = epoll_delete(epoll, &conn.stream);
            }
            self.by_token.remove(&conn.token);
            if conn.read_state == ReadState::Queued {
                // So a later connection with the same ports gets one turn, not two.
                self.readable.retain(|k| *k != key);
            }
        }
    }

    /// Watches the stream for what the connection waits for now, and not at all when
    /// it waits for nothing (so a hung-up stream cannot wake the loop in vain).
    fn update_interest(&mut self, key: ConnKey, epoll: &Epoll) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let want = conn.interest();
        let result = match conn.registered {
            Some(have) if have == want => Ok(()),
            Some(_) if want.is_empty() => epoll_delete(epoll, &conn.stream),
            Some(_) => epoll_modify(epoll, &conn.stream, want, conn.token),
            None if want.is_empty() => Ok(()),
            None => epoll_add(epoll, &conn.stream, want, conn.token),
        };
        match result {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                log::warn!(
                    "vsock: cannot watch the stream of port {}: {e}",
                    key.local_port
                );
                self.reset(key, epoll);
            }
        }
    }

    fn on_stream(&mut self, key: ConnKey, events: EventSet, epoll: &Epoll) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let broken = events.intersects(EventSet::ERROR | EventSet::HANG_UP);
        if (broken || events.contains(EventSet::IN))
            && conn.read_state == ReadState::Idle
            && conn.wants_read()
        {
            conn.read_state = ReadState::Queued;
            self.readable.push_back(key);
        }
        if (broken || events.contains(EventSet::OUT)) && conn.buffered() > 0 {
            if let Err(e) = conn.flush() {
                log::debug!("vsock: host stream of port {} failed: {e}", key.local_port);
                self.reset(key, epoll);
                return;
            }
        }
        if events.contains(EventSet::ERROR) {
            let err = conn.stream.take_error().ok().flatten();
            if let Some(e) = err {
                log::debug!("vsock: host stream of port {}: {e}", key.local_port);
                self.reset(key, epoll);
                return;
            }
        }
        self.after_flush(key, epoll);
    }

    // ---- host-initiated connections ------------------------------------------------

    fn accept(&mut self, epoll: &Epoll) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // E.g. out of file descriptors: the backlog stays readable, so stop
                    // watching it for a while instead of spinning.
                    log::warn!("vsock: cannot accept host connections: {e}");
                    let at = Instant::now() + ACCEPT_RETRY;
                    self.listener_retry = Some(at);
                    self.schedule(at);
                    self.sync_listener(epoll);
                    return;
                }
            };
            if self.connections.len() + self.handshakes.len() >= self.max_connections {
                log::debug!("vsock: too many connections, closing a host connection");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = epoll_add(epoll, &stream, EventSet::IN, token) {
                log::warn!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline,
                },
            );
            self.schedule(deadline);
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time, so nothing the peer sends
    /// after it is consumed here.
    fn on_handshake(&mut self, token: u64, epoll: &Epoll) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match read_some(&hs.stream, &mut byte) {
                Ok(None) => return,
                Ok(Some(0)) | Err(_) => break None,
                Ok(Some(_)) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(Some(_)) => {
                    hs.line.push(byte[0]);
                    if hs.line.len() >= MAX_CONNECT_LINE {
                        break None;
                    }
                }
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let _ = epoll_delete(epoll, &hs.stream);
        let Some(peer_port) = port else {
            self.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "vsock: bad connect line from a host peer: {:?}",
                String::from_utf8_lossy(&hs.line)
            );
            return;
        };
        let Some(local_port) = self.alloc_local_port() else {
            self.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut conn = Connection::new(hs.stream, token, ConnState::LocalInit);
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        conn.deadline = Some(deadline);
        self.connections.insert(key, conn);
        self.by_token.insert(token, key);
        self.schedule(deadline);
        self.push_control(key, OP_REQUEST, 0);
    }

    /// A host port no live connection uses, from [`FIRST_LOCAL_PORT`] up, wrapping.
    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=self.connections.len() {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) => p,
                None => FIRST_LOCAL_PORT,
            };
            let low = ConnKey {
                local_port: port,
                peer_port: 0,
            };
            let high = ConnKey {
                local_port: port,
                peer_port: u32::MAX,
            };
            if self.connections.range(low..=high).next().is_none() {
                return Some(port);
            }
        }
        None
    }

    fn alloc_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_STREAM_TOKEN);
        token
    }

    // ---- deadlines -----------------------------------------------------------------------

    /// Makes sure the timer fires no later than `at`.
    fn schedule(&mut self, at: Instant) {
        if self.timer_deadline.is_some_and(|t| t <= at) {
            return;
        }
        // A zero duration would disarm the timer.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(after, None) {
            Ok(()) => self.timer_deadline = Some(at),
            Err(e) => log::error!("vsock: cannot arm the deadline timer: {e}"),
        }
    }

    /// Drops what ran out of time, then re-arms (or disarms, which also clears the
    /// timer's readiness) for the next deadline.
    fn on_timer(&mut self, epoll: &Epoll) {
        let now = Instant::now();
        self.timer_deadline = None;
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(hs) = self.handshakes.remove(&token) {
                let _ = epoll_delete(epoll, &hs.stream);
                self.metrics
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let expired: Vec<ConnKey> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset(key, epoll);
        }
        if self.listener_retry.is_some_and(|t| t <= now) {
            self.listener_retry = None;
        }
        let next = self
            .handshakes
            .values()
            .map(|hs| hs.deadline)
            .chain(self.connections.values().filter_map(|c| c.deadline))
            .chain(self.listener_retry)
            .min();
        match next {
            Some(at) => self.schedule(at),
            None => {
                if let Err(e) = self.timer.clear() {
                    log::error!("vsock: cannot disarm the deadline timer: {e}");
                }
            }
        }
    }

    /// Watches the listening socket unless accepting must wait: after an accept error,
    /// or while the control FIFO is full (host connections are the one source of new
    /// control packets besides the tx queue, so this keeps the FIFO bounded even when
    /// the guest takes no rx buffers and host peers keep connecting).
    fn sync_listener(&mut self, epoll: &Epoll) {
        let want = self.listener_retry.is_none() && self.control.len() < CONTROL_QUEUE_MAX;
        if want == self.listener_registered {
            return;
        }
        let result = if want {
            epoll_add(epoll, &self.listener, EventSet::IN, LISTENER_TOKEN)
        } else {
            epoll_delete(epoll, &self.listener)
        };
        match result {
            Ok(()) => self.listener_registered = want,
            Err(e) => log::error!("vsock: cannot (un)watch the listening socket: {e}"),
        }
    }
}

impl crate::virtio::WorkerLoop for VsockWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, &self.timer, EventSet::IN, TIMER_TOKEN)?;
        epoll_add(epoll, &self.wake, EventSet::IN, WAKE_TOKEN)?;
        self.sync_listener(epoll);
        // Chains the guest queued before activation are served without a kick.
        self.wake_later();
        Ok(())
    }

    fn queue_event(&mut self, index: usize, epoll: &Epoll) {
        self.on_queue(index, epoll);
    }

    fn device_event(&mut self, token: u64, events: EventSet, epoll: &Epoll) {
        self.on_device(token, events, epoll);
    }
}

/// The next chain on `queue`. When it looks empty, notifications are re-enabled and it
/// is looked at once more: a chain added meanwhile would otherwise wait for a kick that
/// never comes.
///
/// This re-arms every time the ring looks empty, not once per pass: with EVENT_IDX,
/// re-enabling sets `avail_event` to the current position, and the driver kicks only
/// for a chain at that index. If a recheck finds a chain, the device moves past the
/// index it asked about; should the ring look empty again in the same pass without a
/// new `avail_event`, the driver's next chains come without a kick and the queue stalls
/// until some unrelated event (for a guest → host stream, nothing else comes). Callers
/// stop at `None`, so a corrupt available index cannot keep a pass here.
fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    if !queue.enable_notification(mem).unwrap_or(false) {
        return None;
    }
    queue.pop_descriptor_chain(mem)
}

/// Counts a packet the device could not use.
fn bad_packet(metrics: &VsockMetrics, what: &dyn std::fmt::Display) {
    metrics.bad_packets.fetch_add(1, Ordering::Relaxed);
    log::debug!("vsock: bad packet: {what}");
}

/// The connection a guest packet belongs to.
fn key_of(h: &PacketHeader) -> ConnKey {
    ConnKey {
        local_port: h.dst_port,
        peer_port: h.src_port,
    }
}

/// One read from a non-blocking stream: `Ok(None)` when it has nothing now,
/// `Ok(Some(0))` at end of stream.
fn read_some(mut stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r` is allowed).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}
