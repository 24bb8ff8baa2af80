//! Stream sockets with a timeout on every blocking step: TCP, unix and AF_VSOCK, through one
//! connection type.
//!
//! Every socket is non-blocking and each wait is a `poll` of at most the step timeout, so a
//! silent peer, a lost packet or a missing listener ends rig-io with an error instead of a
//! hung test. The timeout bounds each step (accept, connect, each read or write), not the
//! whole transfer: a slow but moving transfer is measured, not cut short.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (linux/vm_sockets.h; the `_OLD` value, which on 64-bit
/// takes the same `struct timeval` as the new one). Not in the libc crate.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// Pause between connection attempts while the peer is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Failures of socket set-up and transfer.
#[derive(Debug)]
pub enum NetError {
    /// A step waited longer than the timeout.
    Timeout { what: String, secs: f64 },
    /// A system call failed.
    Io { what: String, source: io::Error },
    /// An address that cannot be used.
    BadAddress { addr: String, why: &'static str },
    /// A path that is not a socket is in the way of a unix listener.
    NotASocket { path: PathBuf },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Timeout { what, secs } => write!(f, "timed out after {secs:.1} s: {what}"),
            NetError::Io { what, source } => write!(f, "{what}: {source}"),
            NetError::BadAddress { addr, why } => write!(f, "bad address {addr}: {why}"),
            NetError::NotASocket { path } => {
                write!(
                    f,
                    "{} exists and is not a socket: not removing it",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for NetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>, source: io::Error) -> NetError {
    NetError::Io {
        what: what.into(),
        source,
    }
}

/// Waits until `fd` has one of `events` (or an error/hang-up, which the following call
/// reports), at most `timeout`.
fn wait_for(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout: Duration,
    what: &str,
) -> Result<(), NetError> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(NetError::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs_f64(),
            });
        }
        // Round up so that a sub-millisecond remainder still waits.
        let ms = libc::c_int::try_from(left.as_millis() + 1).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call, and nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(format!("poll ({what})"), e));
            }
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid descriptor reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a valid descriptor with an int argument touches no memory.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An established stream connection (any family).
#[derive(Debug)]
pub struct Conn {
    file: File,
    step: Duration,
}

impl Conn {
    /// Takes over a connected stream socket.
    pub fn new(fd: OwnedFd, step: Duration) -> Result<Self, NetError> {
        set_nonblocking(fd.as_fd()).map_err(|e| io_err("making the socket non-blocking", e))?;
        Ok(Conn {
            file: File::from(fd),
            step,
        })
    }

    /// Reads what is there (0 = end of stream), waiting at most the step timeout.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_for(
                    self.file.as_fd(),
                    libc::POLLIN,
                    self.step,
                    "waiting for data",
                )?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", e)),
            }
        }
    }

    /// Writes all of `buf`, waiting at most the step timeout each time the socket is full.
    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            match self.file.write(buf) {
                Ok(0) => return Err(io_err("write", io::ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_for(
                    self.file.as_fd(),
                    libc::POLLOUT,
                    self.step,
                    "waiting to send",
                )?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("write", e)),
            }
        }
        Ok(())
    }

    /// A second handle on the same connection (one thread reads while another writes).
    pub fn try_clone(&self) -> Result<Self, NetError> {
        Ok(Conn {
            file: self
                .file
                .try_clone()
                .map_err(|e| io_err("duplicating the socket", e))?,
            step: self.step,
        })
    }

    /// Ends our direction of the stream: the peer reads end-of-stream after our last byte.
    pub fn shutdown_write(&self) -> Result<(), NetError> {
        // SAFETY: shutdown on a valid socket descriptor touches no memory.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(io_err("shutdown", io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// A listening socket that accepts one connection at a time.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    step: Duration,
    /// What it listens on, for messages.
    name: String,
    /// A TCP listener's address (only the tests, which listen on port 0, ask for it).
    #[cfg_attr(not(test), allow(dead_code))]
    local: Option<SocketAddr>,
    /// The socket file of a unix listener, removed on drop.
    path: Option<PathBuf>,
}

impl Listener {
    /// TCP on `addr` (port 0 picks a free port: see [`Listener::tcp_port`]).
    pub fn tcp(addr: SocketAddr, step: Duration) -> Result<Self, NetError> {
        let l = TcpListener::bind(addr).map_err(|e| io_err(format!("bind tcp {addr}"), e))?;
        let local = l.local_addr().map_err(|e| io_err("getsockname", e))?;
        Self::finish(
            OwnedFd::from(l),
            step,
            format!("tcp {local}"),
            Some(local),
            None,
        )
    }

    /// A unix socket at `path`; a stale socket file there (from an earlier run) is removed
    /// first, anything else at that path is an error.
    pub fn unix(path: &Path, step: Duration) -> Result<Self, NetError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
                .map_err(|e| io_err(format!("removing the stale {}", path.display()), e))?,
            Ok(_) => {
                return Err(NetError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("stat {}", path.display()), e)),
        }
        let l =
            UnixListener::bind(path).map_err(|e| io_err(format!("bind {}", path.display()), e))?;
        let name = path.display().to_string();
        Self::finish(OwnedFd::from(l), step, name, None, Some(path.to_path_buf()))
    }

    /// AF_VSOCK on `port`, any local CID (the guest's side of a vsock test).
    pub fn vsock(port: u32, step: Duration) -> Result<Self, NetError> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                sockaddr_vm_len(),
            )
        };
        if rc < 0 {
            return Err(io_err(
                format!("bind vsock port {port}"),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: listen on a valid bound socket touches no memory.
        if unsafe { libc::listen(fd.as_raw_fd(), 1) } < 0 {
            return Err(io_err("listen vsock", io::Error::last_os_error()));
        }
        Self::finish(fd, step, format!("vsock port {port}"), None, None)
    }

    fn finish(
        fd: OwnedFd,
        step: Duration,
        name: String,
        local: Option<SocketAddr>,
        path: Option<PathBuf>,
    ) -> Result<Self, NetError> {
        set_nonblocking(fd.as_fd()).map_err(|e| io_err("making the listener non-blocking", e))?;
        Ok(Listener {
            fd,
            step,
            name,
            local,
            path,
        })
    }

    /// The port a TCP listener is bound to (the tests listen on port 0).
    #[cfg(test)]
    pub fn tcp_port(&self) -> Option<u16> {
        self.local.map(|a| a.port())
    }

    /// Accepts one connection, waiting at most the step timeout.
    pub fn accept(&self) -> Result<Conn, NetError> {
        loop {
            // SAFETY: accept4 on a valid listening socket; null address pointers are allowed
            // (the peer's address is not wanted).
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                return Conn::new(fd, self.step);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait_for(
                    self.fd.as_fd(),
                    libc::POLLIN,
                    self.step,
                    &format!("waiting for a connection on {}", self.name),
                )?,
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {}
                _ => return Err(io_err(format!("accept on {}", self.name), e)),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// True for the errors a connection attempt gets while the peer is not listening yet.
fn not_listening_yet(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED) | Some(libc::ECONNRESET) | Some(libc::ENOENT)
    )
}

/// Retries `attempt` while the peer is not listening yet, for at most `step`.
fn connect_retrying<T>(
    step: Duration,
    what: &str,
    mut attempt: impl FnMut(Duration) -> io::Result<T>,
) -> Result<T, NetError> {
    let start = Instant::now();
    loop {
        let left = step.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(NetError::Timeout {
                what: what.to_string(),
                secs: step.as_secs_f64(),
            });
        }
        match attempt(left) {
            Ok(v) => return Ok(v),
            Err(e) if not_listening_yet(&e) => {
                if start.elapsed() + RETRY_PAUSE >= step {
                    return Err(NetError::Timeout {
                        what: format!("{what} (last attempt: {e})"),
                        secs: step.as_secs_f64(),
                    });
                }
                sleep(RETRY_PAUSE)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(NetError::Timeout {
                    what: what.to_string(),
                    secs: step.as_secs_f64(),
                })
            }
            Err(e) => return Err(io_err(what, e)),
        }
    }
}

/// Parses `HOST:PORT` (an IP address, `[v6]:port`, or a name the resolver knows).
pub fn resolve(hostport: &str) -> Result<SocketAddr, NetError> {
    let mut addrs = hostport
        .to_socket_addrs()
        .map_err(|e| io_err(format!("resolving {hostport}"), e))?;
    addrs.next().ok_or(NetError::BadAddress {
        addr: hostport.to_string(),
        why: "no address",
    })
}

/// TCP connection to `addr`, retried while nothing listens there yet.
pub fn tcp_connect(addr: SocketAddr, step: Duration) -> Result<Conn, NetError> {
    let s = connect_retrying(step, &format!("connect tcp {addr}"), |left| {
        TcpStream::connect_timeout(&addr, left)
    })?;
    // Small messages (the rtt test) go out at once.
    s.set_nodelay(true).map_err(|e| io_err("TCP_NODELAY", e))?;
    Conn::new(OwnedFd::from(s), step)
}

/// Unix stream connection to `path`, retried while the socket is missing or refuses.
pub fn unix_connect(path: &Path, step: Duration) -> Result<Conn, NetError> {
    let s = connect_retrying(step, &format!("connect {}", path.display()), |_| {
        UnixStream::connect(path)
    })?;
    Conn::new(OwnedFd::from(s), step)
}

/// AF_VSOCK connection to `cid`:`port` (from a guest: CID 2 is the host), retried while
/// the other end refuses.
pub fn vsock_connect(cid: u32, port: u32, step: Duration) -> Result<Conn, NetError> {
    let fd = connect_retrying(step, &format!("connect vsock {cid}:{port}"), |left| {
        let fd = vsock_socket_raw()?;
        // The kernel's own connect timeout is 2 s by default: give it what is left.
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(left.subsec_micros()),
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                std::ptr::from_ref(&tv).cast(),
                socklen_of::<libc::timeval>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = vsock_addr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                sockaddr_vm_len(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    })?;
    Conn::new(fd, step)
}

fn vsock_socket() -> Result<OwnedFd, NetError> {
    vsock_socket_raw().map_err(|e| io_err("socket(AF_VSOCK) (is the vsock driver loaded?)", e))
}

fn vsock_socket_raw() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    libc::sockaddr_vm {
        // AF_VSOCK is 40: it fits sa_family_t.
        svm_family: libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default(),
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    }
}

fn socklen_of<T>() -> libc::socklen_t {
    // Socket address and option structs are a few dozen bytes.
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn sockaddr_vm_len() -> libc::socklen_t {
    socklen_of::<libc::sockaddr_vm>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn loopback0() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
    }

    #[test]
    fn accept_times_out_without_a_peer() {
        let l = Listener::tcp(loopback0(), Duration::from_millis(200)).unwrap();
        let start = Instant::now();
        let e = l.accept().expect_err("nobody connects");
        assert!(matches!(e, NetError::Timeout { .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn read_times_out_on_a_silent_peer() {
        let l = Listener::tcp(loopback0(), Duration::from_millis(200)).unwrap();
        let addr = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::LOCALHOST,
            l.tcp_port().unwrap(),
        ));
        let _client = tcp_connect(addr, Duration::from_secs(5)).unwrap();
        let mut server = l.accept().unwrap();
        let mut buf = [0u8; 16];
        let e = server.read(&mut buf).expect_err("the client sends nothing");
        assert!(matches!(e, NetError::Timeout { .. }), "{e}");
    }

    #[test]
    fn connect_retries_until_the_listener_appears() {
        // Find a free port, free it, and listen on it only after the client started.
        let port = Listener::tcp(loopback0(), Duration::from_secs(1))
            .unwrap()
            .tcp_port()
            .unwrap();
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let server = std::thread::spawn(move || {
            sleep(Duration::from_millis(400));
            let l = Listener::tcp(addr, Duration::from_secs(5)).unwrap();
            let mut c = l.accept().unwrap();
            let mut buf = [0u8; 4];
            let mut got = Vec::new();
            loop {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let mut c = tcp_connect(addr, Duration::from_secs(5)).unwrap();
        c.write_all(b"late").unwrap();
        c.shutdown_write().unwrap();
        assert_eq!(server.join().unwrap(), b"late");
    }

    #[test]
    fn connect_gives_up_after_the_step_timeout() {
        let port = Listener::tcp(loopback0(), Duration::from_secs(1))
            .unwrap()
            .tcp_port()
            .unwrap();
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let start = Instant::now();
        let e = tcp_connect(addr, Duration::from_millis(500)).expect_err("nothing listens");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(e, NetError::Timeout { .. } | NetError::Io { .. }),
            "{e}"
        );
    }

    #[test]
    fn unix_listener_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        // A socket file left behind: std's listener does not remove it on drop.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let l = Listener::unix(&sock, Duration::from_secs(1)).unwrap();
        drop(l);
        assert!(!sock.exists(), "the listener removes its socket file");

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        let e = Listener::unix(&file, Duration::from_secs(1)).expect_err("not a socket");
        assert!(matches!(e, NetError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
