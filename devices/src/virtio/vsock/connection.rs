//! One vsock stream between a guest port and a host unix socket, with its credit
//! accounting (virtio 1.2 §5.10.6.3).
//!
//! The guest may only send `buf_alloc` bytes past the `fwd_cnt` the device last told
//! it, so the device holds at most `buf_alloc` bytes of guest data per connection while
//! the unix peer is slow; the device may only send the guest what the guest's own
//! `buf_alloc`/`fwd_cnt` allow.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use super::packet::{PacketHeader, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive space the device advertises to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The device tells the guest about freed space once this much was forwarded unseen.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Errors opening the host side of a guest-initiated connection.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The socket path does not fit in `sockaddr_un`.
    #[error("Unix socket path {0} is too long")]
    PathTooLong(String),
    /// `socket()` or `connect()` failed.
    #[error("Cannot connect to the unix socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

/// A connection's identity: the host-side and guest-side ports (the CIDs are fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// Where a connection is in its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: `OP_REQUEST` queued for the guest, waiting for its answer.
    LocalInit,
    /// Data may flow.
    Established,
}

/// What the device knows about the unix stream's readability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// Not known to be readable: watched for `EPOLLIN` when reading is wanted.
    Idle,
    /// Readable, waiting in the round-robin queue for an rx buffer.
    Queued,
    /// Readable, but the guest has no credit left for it.
    NoCredit,
}

/// One connection's state.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Its epoll token.
    pub token: u64,
    /// Handshake state.
    pub state: ConnState,
    /// When a host-initiated request or a graceful close gives up.
    pub deadline: Option<Instant>,
    /// `SHUTDOWN_*` flags the guest sent.
    pub peer_shutdown: u32,
    /// The unix peer closed its sending side; the guest was told.
    pub host_eof: bool,
    /// The device shut the unix stream's sending side (the guest will send no more).
    pub write_shut: bool,
    /// The guest shut both directions: forward what is buffered, then reset.
    pub closing: bool,
    /// Bytes of stream data received from the guest (wrapping).
    pub rx_cnt: Wrapping<u32>,
    /// Bytes of guest data written to the unix stream (wrapping).
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` last sent to the guest.
    pub fwd_cnt_sent: Wrapping<u32>,
    /// Guest data not yet written to the unix stream (at most [`BUF_ALLOC`] bytes).
    pending: VecDeque<u8>,
    /// The guest's receive space for this connection.
    pub peer_buf_alloc: u32,
    /// Bytes the guest consumed from that space (wrapping).
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes of stream data sent to the guest (wrapping).
    pub tx_cnt: Wrapping<u32>,
    /// Readability of the unix stream.
    pub read_state: ReadState,
    /// An `OP_CREDIT_REQUEST` was sent and the guest's `fwd_cnt` has not moved since.
    pub credit_requested: bool,
    /// An `OP_CREDIT_UPDATE` is queued for the guest.
    pub credit_update_queued: bool,
    /// Events the stream is registered for on epoll (`None`: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    /// A new connection over `stream` (non-blocking).
    pub fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            token,
            state,
            deadline: None,
            peer_shutdown: 0,
            host_eof: false,
            write_shut: false,
            closing: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            pending: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            read_state: ReadState::Idle,
            credit_requested: false,
            credit_update_queued: false,
            registered: None,
        }
    }

    /// Takes the guest's credit fields from a packet it sent on this connection.
    /// Returns whether its `fwd_cnt` moved.
    pub fn update_peer_credit(&mut self, header: &PacketHeader) -> bool {
        self.peer_buf_alloc = header.buf_alloc;
        let moved = self.peer_fwd_cnt.0 != header.fwd_cnt;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        if moved {
            self.credit_requested = false;
        }
        moved
    }

    /// Bytes the device may still send the guest. A guest that reports more consumed
    /// than was sent, or shrinks its buffer, gets zero rather than a wrapped credit.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes buffered here.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Whether the guest may send `len` more bytes: its credit is what the device last
    /// told it (`buf_alloc` past the `fwd_cnt` of the latest packet put in the rx queue).
    /// As that `fwd_cnt` never exceeds what was forwarded, this also bounds the bytes
    /// buffered here by `buf_alloc`.
    pub fn within_credit(&self, len: usize) -> bool {
        let unacknowledged = (self.rx_cnt - self.fwd_cnt_sent).0 as usize;
        unacknowledged.saturating_add(len) <= BUF_ALLOC as usize
    }

    /// Whether the device wants to read the unix stream (to send the guest data).
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.closing
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the guest may still send data.
    pub fn guest_may_send(&self) -> bool {
        self.state == ConnState::Established
            && !self.closing
            && self.peer_shutdown & SHUTDOWN_SEND == 0
    }

    /// The epoll events the stream should be watched for now.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.wants_read() && self.read_state == ReadState::Idle {
            events |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Whether the guest should hear about the space freed since the last packet.
    pub fn needs_credit_update(&self) -> bool {
        !self.credit_update_queued
            && (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Forwards guest data to the unix stream, buffering what it does not take now.
    /// The caller checked [`Connection::within_credit`]. An error means the stream is
    /// broken.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        self.rx_cnt += Wrapping(count(data.len()));
        let mut done = 0;
        if self.pending.is_empty() {
            done = write_some(&self.stream, data)?;
            self.advance_fwd(done);
        }
        self.pending.extend(&data[done..]);
        Ok(())
    }

    /// Writes buffered guest data to the unix stream until it is drained or the stream
    /// is full. An error means the stream is broken.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = write_some(&self.stream, front)?;
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
            self.advance_fwd(n);
        }
        if self.pending.is_empty() && self.pending.capacity() > 64 * 1024 {
            self.pending = VecDeque::new();
        }
        Ok(())
    }

    fn advance_fwd(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(count(n));
    }

    /// A header for a packet from the host side of this connection to the guest.
    pub fn header(&self, key: ConnKey, guest_cid: u64, op: u16, flags: u32) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

/// A byte count for the wrapping 32-bit stream counters. Callers pass at most
/// `BUF_ALLOC` + `MAX_PAYLOAD` bytes, far below 2^32.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Writes what the non-blocking `stream` takes now: `Ok(0)` when it is full.
fn write_some(mut stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match stream.write(data) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

/// Connects a non-blocking unix stream socket to `path`. Never waits: a listener whose
/// backlog is full fails with `EAGAIN` like any other refusal.
pub fn connect_nonblocking(path: &Path) -> Result<UnixStream, ConnectError> {
    let bytes = path.as_os_str().as_bytes();
    let shown = || path.display().to_string();
    // SAFETY: all-zero bytes are a valid `sockaddr_un` (plain integers and arrays).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // One byte stays zero: the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ConnectError::PathTooLong(shown()));
    }
    // AF_UNIX is 1.
    #[allow(clippy::cast_possible_truncation)]
    {
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let os_err = |source| ConnectError::Connect {
        path: shown(),
        source,
    };
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(os_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len).map_err(|_| ConnectError::PathTooLong(shown()))?;
    // SAFETY: `addr` is an initialised `sockaddr_un` that outlives the call and `len`
    // does not exceed its size (checked against `sun_path` above).
    let ret = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(os_err(io::Error::last_os_error()));
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn credit_never_wraps_past_what_the_guest_allows() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 0, ConnState::Established);
        let mut h = PacketHeader {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Default::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = Wrapping(600);
        assert_eq!(c.peer_credit(), 400);
        // The guest claims to have consumed more than it was sent.
        h.fwd_cnt = 700;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.tx_cnt = Wrapping(5);
        h.fwd_cnt = u32::MAX - 4;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 990);
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener_and_reports_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let s = connect_nonblocking(&path).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (&s).write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        io::Read::read_exact(&mut &peer, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let err = connect_nonblocking(&dir.join("missing.sock")).unwrap_err();
        assert!(err.to_string().contains("missing.sock"), "{err}");
        let long = dir.join("x".repeat(200));
        assert!(matches!(
            connect_nonblocking(&long),
            Err(ConnectError::PathTooLong(_))
        ));
    }
}
