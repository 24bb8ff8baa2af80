//! What rig-io does on an established connection, and the result line it prints.
//!
//! * send N: writes the first N bytes of the pattern, ends its direction, and waits for the
//!   receiver to close (so the time covers delivery, not just the local socket buffer);
//! * recv N: reads until end of stream, checking length and every byte against the pattern;
//! * echo: writes back whatever arrives until end of stream;
//! * rtt COUNT: COUNT round trips of a 64-byte message against an echoing peer.

use std::fmt::Write as _;
use std::time::Instant;

use super::conn::{Conn, NetError};
use super::pattern::{Fnv1a64, Pattern, Verifier};

/// Size of each read and write.
const BUF: usize = 64 * 1024;

/// Size of an rtt message.
pub const RTT_MSG: usize = 64;

/// What to do on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Send(u64),
    Recv(u64),
    Echo,
    Rtt(u32),
}

/// The outcome of a role, printed as one `RIG-IO` line.
#[derive(Debug)]
pub enum Report {
    /// send, recv or echo.
    Stream {
        role: &'static str,
        bytes: u64,
        checksum: u64,
        secs: f64,
        error: Option<String>,
    },
    /// rtt: round-trip times in microseconds, sorted.
    Rtt {
        samples_us: Vec<u64>,
        error: Option<String>,
    },
}

impl Report {
    /// A report for a run that failed before any transfer (set-up, connect, handshake).
    pub fn failed(role: Role, error: String) -> Self {
        match role {
            Role::Rtt(_) => Report::Rtt {
                samples_us: Vec::new(),
                error: Some(error),
            },
            _ => Report::Stream {
                role: role_name(role),
                bytes: 0,
                checksum: 0,
                secs: 0.0,
                error: Some(error),
            },
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Report::Stream { error, .. } | Report::Rtt { error, .. } => error.as_deref(),
        }
    }

    /// The machine-readable line:
    /// `RIG-IO <sub> bytes=N checksum=<hex> secs=<f> mibps=<f> ok=<0|1> role=<role>` or
    /// `RIG-IO rtt count=N p50_us=N p99_us=N max_us=N ok=<0|1> via=<sub>`.
    pub fn line(&self, sub: &str) -> String {
        let ok = u8::from(self.error().is_none());
        let mut s = String::new();
        match self {
            Report::Stream {
                role,
                bytes,
                checksum,
                secs,
                ..
            } => {
                let _ = write!(
                    s,
                    "RIG-IO {sub} bytes={bytes} checksum={checksum:016x} secs={secs:.6} mibps={:.3} ok={ok} role={role}",
                    mibps(*bytes, *secs)
                );
            }
            Report::Rtt { samples_us, .. } => {
                let _ = write!(
                    s,
                    "RIG-IO rtt count={} p50_us={} p99_us={} max_us={} ok={ok} via={sub}",
                    samples_us.len(),
                    percentile(samples_us, 50),
                    percentile(samples_us, 99),
                    samples_us.last().copied().unwrap_or(0)
                );
            }
        }
        s
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Send(_) => "send",
        Role::Recv(_) => "recv",
        Role::Echo => "echo",
        Role::Rtt(_) => "rtt",
    }
}

/// MiB/s, 0 when no time was measured.
pub fn mibps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / secs
    } else {
        0.0
    }
}

/// The `q`th percentile (nearest rank) of sorted samples; 0 for none.
pub fn percentile(sorted: &[u64], q: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs `role` on `conn`.
pub fn run(conn: &mut Conn, role: Role, pattern: &Pattern) -> Report {
    match role {
        Role::Send(n) => send(conn, pattern, n),
        Role::Recv(n) => recv(conn, pattern, n),
        Role::Echo => echo(conn),
        Role::Rtt(count) => rtt(conn, pattern, count),
    }
}

/// Ends this side's direction, then reads until the peer closes; bytes that arrive
/// meanwhile are an error (the peer should only be receiving).
fn shut_down_and_wait_for_close(conn: &mut Conn) -> Result<(), String> {
    conn.shutdown_write().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let mut extra = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => extra += n as u64,
            // The receiver may reset rather than close once it has everything.
            Err(NetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset && extra == 0 =>
            {
                break
            }
            Err(e) => return Err(format!("waiting for the peer to close: {e}")),
        }
        if extra > 1024 * 1024 {
            break;
        }
    }
    if extra > 0 {
        return Err(format!("the peer sent {extra} bytes back"));
    }
    Ok(())
}

fn send(conn: &mut Conn, pattern: &Pattern, n: u64) -> Report {
    let start = Instant::now();
    let mut fnv = Fnv1a64::new();
    let mut pos = 0u64;
    let mut error = None;
    while pos < n {
        let max = usize::try_from(n - pos).unwrap_or(BUF).min(BUF);
        let chunk = pattern.chunk(pos, max);
        if let Err(e) = conn.write_all(chunk) {
            error = Some(format!("after {pos} bytes: {e}"));
            break;
        }
        fnv.update(chunk);
        pos += chunk.len() as u64;
    }
    if error.is_none() {
        error = shut_down_and_wait_for_close(conn).err();
    }
    let secs = start.elapsed().as_secs_f64();
    Report::Stream {
        role: "send",
        bytes: pos,
        checksum: fnv.value(),
        secs,
        error,
    }
}

fn recv(conn: &mut Conn, pattern: &Pattern, n: u64) -> Report {
    let start = Instant::now();
    let mut v = Verifier::new(pattern, n);
    let mut buf = vec![0u8; BUF];
    let mut error = None;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => v.update(&buf[..k]),
            Err(e) => {
                error = Some(format!("after {} bytes: {e}", v.received()));
                break;
            }
        }
        if v.overflowed() {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if error.is_none() {
        error = v.fault().map(|f| f.to_string());
    }
    Report::Stream {
        role: "recv",
        bytes: v.received(),
        checksum: v.checksum(),
        secs,
        error,
    }
}

fn echo(conn: &mut Conn) -> Report {
    let start = Instant::now();
    let mut fnv = Fnv1a64::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; BUF];
    let mut error = None;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                if let Err(e) = conn.write_all(&buf[..k]) {
                    error = Some(format!("after {bytes} bytes: {e}"));
                    break;
                }
                fnv.update(&buf[..k]);
                bytes += k as u64;
            }
            Err(e) => {
                error = Some(format!("after {bytes} bytes: {e}"));
                break;
            }
        }
    }
    if error.is_none() {
        error = conn.shutdown_write().err().map(|e| e.to_string());
    }
    let secs = start.elapsed().as_secs_f64();
    Report::Stream {
        role: "echo",
        bytes,
        checksum: fnv.value(),
        secs,
        error,
    }
}

fn rtt(conn: &mut Conn, pattern: &Pattern, count: u32) -> Report {
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut msg = [0u8; RTT_MSG];
    let mut back = [0u8; RTT_MSG];
    let mut error = None;
    'rounds: for i in 0..u64::from(count) {
        pattern.fill(i * RTT_MSG as u64, &mut msg);
        let t = Instant::now();
        if let Err(e) = conn.write_all(&msg) {
            error = Some(format!("round {i}: {e}"));
            break;
        }
        let mut got = 0;
        while got < RTT_MSG {
            match conn.read(&mut back[got..]) {
                Ok(0) => {
                    error = Some(format!(
                        "round {i}: the peer closed after {got} of {RTT_MSG} bytes"
                    ));
                    break 'rounds;
                }
                Ok(k) => got += k,
                Err(e) => {
                    error = Some(format!("round {i}: {e}"));
                    break 'rounds;
                }
            }
        }
        let us = t.elapsed().as_micros();
        if back != msg {
            error = Some(format!("round {i}: the echo differs from the message"));
            break;
        }
        samples.push(u64::try_from(us).unwrap_or(u64::MAX));
    }
    if error.is_none() {
        error = shut_down_and_wait_for_close(conn).err();
    }
    samples.sort_unstable();
    Report::Rtt {
        samples_us: samples,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{tcp_connect, Listener};
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    const STEP: Duration = Duration::from_secs(20);

    /// A loopback TCP pair: the server runs `server_role` in a thread, the client `client_role`.
    fn tcp_pair(server_role: Role, client_role: Role) -> (Report, Report) {
        let pattern = Arc::new(Pattern::new());
        let l = Listener::tcp(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            STEP,
        )
        .unwrap();
        let port = l.tcp_port().unwrap();
        let p = Arc::clone(&pattern);
        let server = thread::spawn(move || {
            let mut c = l.accept().unwrap();
            run(&mut c, server_role, &p)
        });
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let mut c = tcp_connect(addr, STEP).unwrap();
        let client = run(&mut c, client_role, &pattern);
        drop(c);
        (server.join().unwrap(), client)
    }

    fn stream_fields(r: &Report) -> (u64, u64, Option<&str>) {
        match r {
            Report::Stream {
                bytes,
                checksum,
                error,
                ..
            } => (*bytes, *checksum, error.as_deref()),
            Report::Rtt { .. } => panic!("not a stream report: {r:?}"),
        }
    }

    #[test]
    fn tcp_client_to_server_round_trip() {
        let n = 3 * 1024 * 1024 + 17;
        let (server, client) = tcp_pair(Role::Recv(n), Role::Send(n));
        let (sb, sc, se) = stream_fields(&server);
        let (cb, cc, ce) = stream_fields(&client);
        assert_eq!(se, None);
        assert_eq!(ce, None);
        assert_eq!((sb, cb), (n, n));
        assert_eq!(sc, cc, "both ends saw the same bytes");
        assert!(
            server.line("tcp-listen").contains(" ok=1 role=recv"),
            "{}",
            server.line("tcp-listen")
        );
    }

    #[test]
    fn tcp_server_to_client_round_trip() {
        let n = 1_000_000;
        let (server, client) = tcp_pair(Role::Send(n), Role::Recv(n));
        assert_eq!(server.error(), None);
        assert_eq!(client.error(), None);
        assert_eq!(stream_fields(&client).0, n);
    }

    #[test]
    fn receiver_reports_a_short_stream() {
        let (server, client) = tcp_pair(Role::Recv(2000), Role::Send(1000));
        assert_eq!(client.error(), None, "the sender sent what it was told");
        let e = server.error().expect("the receiver wanted more");
        assert!(e.contains("1000 of 2000"), "{e}");
        assert!(server.line("tcp-listen").contains(" ok=0 "));
    }

    #[test]
    fn receiver_reports_a_long_stream() {
        let (server, _client) = tcp_pair(Role::Recv(1000), Role::Send(200_000));
        let e = server.error().expect("too many bytes");
        assert!(e.contains("expected 1000"), "{e}");
    }

    #[test]
    fn rtt_against_an_echo() {
        let (server, client) = tcp_pair(Role::Echo, Role::Rtt(50));
        assert_eq!(server.error(), None);
        assert_eq!(stream_fields(&server).0, 50 * RTT_MSG as u64);
        match &client {
            Report::Rtt { samples_us, error } => {
                assert_eq!(error.as_deref(), None);
                assert_eq!(samples_us.len(), 50);
            }
            other => panic!("{other:?}"),
        }
        let line = client.line("tcp-connect");
        assert!(line.starts_with("RIG-IO rtt count=50 p50_us="), "{line}");
        assert!(line.ends_with(" ok=1 via=tcp-connect"), "{line}");
    }

    #[test]
    fn rtt_fails_against_a_peer_that_does_not_echo() {
        // A peer that reads the first message and closes: no echo comes back.
        let pattern = Pattern::new();
        let l = Listener::tcp(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            STEP,
        )
        .unwrap();
        let port = l.tcp_port().unwrap();
        let server = thread::spawn(move || {
            let mut c = l.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf);
        });
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let mut c = tcp_connect(addr, Duration::from_millis(500)).unwrap();
        let r = run(&mut c, Role::Rtt(3), &pattern);
        server.join().unwrap();
        assert!(r.error().is_some());
        assert!(r.line("tcp-connect").contains(" ok=0 "));
    }

    #[test]
    fn result_line_format() {
        let r = Report::Stream {
            role: "recv",
            bytes: 16 * 1024 * 1024,
            checksum: 0xabc,
            secs: 2.0,
            error: None,
        };
        assert_eq!(
            r.line("vsock-listen"),
            "RIG-IO vsock-listen bytes=16777216 checksum=0000000000000abc secs=2.000000 mibps=8.000 ok=1 role=recv"
        );
        let f = Report::failed(Role::Send(5), "no route".into());
        assert_eq!(
            f.line("tcp-connect"),
            "RIG-IO tcp-connect bytes=0 checksum=0000000000000000 secs=0.000000 mibps=0.000 ok=0 role=send"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
    }
}
