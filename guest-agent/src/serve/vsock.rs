//! AF_VSOCK stream sockets: the standard library has none, so this is the one place
//! of the server that makes socket system calls itself.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::http::Connection;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

/// A connected vsock socket.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new AF_VSOCK stream socket and the address of `cid`:`port`.
fn socket_and_address(cid: u32, port: u32) -> io::Result<(OwnedFd, libc::sockaddr_vm)> {
    // SAFETY: creates a socket; no memory is involved.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a new descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    Ok((fd, addr))
}

impl VsockListener {
    /// Listens on `port` for connections to any of this machine's CIDs.
    pub fn bind(port: u32) -> io::Result<Self> {
        let (fd, addr) = socket_and_address(libc::VMADDR_CID_ANY, port)?;
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen on a descriptor we own; no memory is involved.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(VsockListener { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: a NULL address and length are allowed: the peer address is not
            // wanted.
            let ret = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(ret) {
                // SAFETY: accept4 returned a new descriptor that we now own.
                Ok(fd) => {
                    return Ok(VsockStream {
                        fd: unsafe { OwnedFd::from_raw_fd(fd) },
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The port this socket listens on.
    pub fn port(&self) -> io::Result<u32> {
        // SAFETY: sockaddr_vm is plain old data; all zeros is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` has room for `len` bytes, and getsockname writes at most that.
        check(unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_vm).cast(),
                &mut len,
            )
        })?;
        Ok(addr.svm_port)
    }
}

impl VsockStream {
    /// Connects to `port` of `cid` (tests use the loopback CID 1).
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let (fd, addr) = socket_and_address(cid, port)?;
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(VsockStream { fd })
    }

    fn set_timeout(&self, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            // A zero timeval means "forever" to the kernel: use the smallest non-zero.
            Some(t) => libc::timeval {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_usec: t.subsec_micros().max(u32::from(t.is_zero())) as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .map(|_| ())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_RCVTIMEO, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_SNDTIMEO, timeout)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a descriptor we own; no memory is involved.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) }).map(|_| ())
    }
}
