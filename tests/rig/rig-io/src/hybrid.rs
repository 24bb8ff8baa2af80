//! The host side of Firecracker's hybrid vsock: a host process connects to the VMM's unix
//! socket, writes `CONNECT <port>\n`, and reads `OK <host port>\n`; from then on the unix
//! stream is a stream to the guest's AF_VSOCK listener on `<port>`. When the guest has no
//! listener there, the VMM closes the connection instead of answering.

use std::fmt;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::conn::{unix_connect, Conn, NetError};

/// Longest reply line accepted: "OK " and a u32 in decimal, with room to spare.
const MAX_REPLY: usize = 32;

/// Pause before another attempt when the VMM closed without an answer.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A failed `CONNECT` exchange.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket itself failed.
    Net(NetError),
    /// The VMM closed the connection without a complete reply (no guest listener).
    Closed { partial: String },
    /// The reply did not end within [`MAX_REPLY`] bytes.
    TooLong { partial: String },
    /// The reply is not `OK <u32>`.
    BadReply { line: String },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Net(e) => write!(f, "{e}"),
            HandshakeError::Closed { partial } => {
                write!(
                    f,
                    "the VMM closed the connection before answering CONNECT (got {partial:?})"
                )
            }
            HandshakeError::TooLong { partial } => {
                write!(
                    f,
                    "the reply to CONNECT is longer than {MAX_REPLY} bytes: {partial:?}"
                )
            }
            HandshakeError::BadReply { line } => {
                write!(f, "the reply to CONNECT is not 'OK <port>': {line:?}")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<NetError> for HandshakeError {
    fn from(e: NetError) -> Self {
        HandshakeError::Net(e)
    }
}

/// The request line for guest port `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses a complete reply line (with its `\n`): `OK <port>` gives the host-side port.
pub fn parse_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadReply {
        line: String::from_utf8_lossy(line).into_owned(),
    };
    let body = line.strip_suffix(b"\n").ok_or_else(bad)?;
    let digits = body.strip_prefix(b"OK ").ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(bad)
}

/// Sends `CONNECT port` on `conn` and reads the reply, one byte at a time so that no byte
/// of the stream that follows is consumed. Returns the host-side port.
pub fn handshake(conn: &mut Conn, port: u32) -> Result<u32, HandshakeError> {
    conn.write_all(connect_line(port).as_bytes())?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    let mut byte = [0u8; 1];
    loop {
        let n = match conn.read(&mut byte) {
            Ok(n) => n,
            // A VMM that closes without reading our request resets the connection.
            Err(NetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                0
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(HandshakeError::Closed {
                partial: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return parse_reply(&line);
        }
        if line.len() >= MAX_REPLY {
            return Err(HandshakeError::TooLong {
                partial: String::from_utf8_lossy(&line).into_owned(),
            });
        }
    }
}

/// Connects to the VMM's socket at `uds` and to guest port `port` through it. Retries, for
/// at most the step timeout, while the socket is missing or the VMM closes without an answer
/// (the guest's listener is not up yet); a wrong answer is an error at once.
pub fn connect(uds: &Path, port: u32, step: Duration) -> Result<(Conn, u32), HandshakeError> {
    let start = Instant::now();
    loop {
        let left = step.saturating_sub(start.elapsed());
        let mut conn = unix_connect(uds, left)?;
        match handshake(&mut conn, port) {
            Ok(host_port) => return Ok((conn, host_port)),
            Err(HandshakeError::Closed { .. }) if start.elapsed() + RETRY_PAUSE < step => {
                sleep(RETRY_PAUSE)
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Listener;
    use crate::test_sock::sock_path;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn reply_parser_accepts_ok_and_a_port() {
        assert_eq!(parse_reply(b"OK 1073741824\n").unwrap(), 1_073_741_824);
        assert_eq!(parse_reply(b"OK 0\n").unwrap(), 0);
        assert_eq!(parse_reply(b"OK 4294967295\n").unwrap(), u32::MAX);
    }

    #[test]
    fn reply_parser_rejects_anything_else() {
        for bad in [
            &b"OK 5"[..],
            b"OK\n",
            b"OK \n",
            b"ok 5\n",
            b"OK  5\n",
            b"OK 5 \n",
            b"OK -5\n",
            b"OK 4294967296\n",
            b"OK 99999999999\n",
            b"FAILURE\n",
            b"OK 5\r\n",
            b"CONNECT 5\n",
            b"\n",
        ] {
            assert!(
                matches!(parse_reply(bad), Err(HandshakeError::BadReply { .. })),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A VMM that reads the request and answers `reply` (then closes).
    fn fake_vmm(path: &Path, reply: &'static [u8]) -> std::thread::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            r.get_mut().write_all(reply).unwrap();
            req
        })
    }

    #[test]
    fn handshake_rejects_a_bad_reply() {
        let (_dir, p) = sock_path("bad.sock");
        let vmm = fake_vmm(&p, b"NOPE\n");
        let e = connect(&p, 5, Duration::from_secs(5)).expect_err("a bad reply");
        assert!(matches!(e, HandshakeError::BadReply { .. }), "{e}");
        assert_eq!(vmm.join().unwrap(), "CONNECT 5\n");
    }

    #[test]
    fn handshake_rejects_a_reply_without_end() {
        let (_dir, p) = sock_path("long.sock");
        let _vmm = fake_vmm(&p, b"OK 12345678901234567890123456789012345");
        let e = connect(&p, 5, Duration::from_secs(5)).expect_err("an endless reply");
        assert!(matches!(e, HandshakeError::TooLong { .. }), "{e}");
    }

    #[test]
    fn handshake_retries_while_the_vmm_closes_and_then_times_out() {
        let (_dir, p) = sock_path("closed.sock");
        let l = Listener::unix(&p, Duration::from_secs(1)).unwrap();
        let closer = std::thread::spawn(move || {
            // Accept and drop: what the VMM does when the guest has no listener.
            let mut n = 0;
            while l.accept().is_ok() {
                n += 1;
            }
            n
        });
        let start = Instant::now();
        let e = connect(&p, 5, Duration::from_millis(800)).expect_err("never answered");
        assert!(start.elapsed() < Duration::from_secs(4));
        assert!(
            matches!(e, HandshakeError::Closed { .. } | HandshakeError::Net(_)),
            "{e}"
        );
        // More than one attempt was made.
        assert!(closer.join().unwrap() >= 2);
    }
}
