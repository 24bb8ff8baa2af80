//! The metrics endpoint: the scheduler's statistics as Prometheus text on a unix
//! socket or a loopback TCP port, served by one small thread, one connection at a
//! time (scrapes are rare and rendering takes microseconds).
//!
//! Per connection the thread waits at most [`REQUEST_WAIT`] for a request:
//! - an HTTP request: `GET`/`HEAD` (any path) get an HTTP/1.0 response with the
//!   text; `POST /-/reload` reloads the configuration (200 or 500 with one line);
//! - the line `reload`: reloads and answers one line, `ok: …` or `error: …`;
//!
//! Reading is open to whoever reaches the endpoint; reloading is the daemon owner's
//! only: on a unix socket the peer's uid (`SO_PEERCRED`) must be the daemon's or
//! root's (else 403 / `error:`), and over TCP, which carries no credentials, reload
//! is refused (405 / `error:`): send SIGHUP, or use a unix metrics socket.
//! - nothing (the client half-closes its side or stays silent), or the line
//!   `metrics`: the raw text, so `socat - UNIX-CONNECT:/run/ai-inferd/metrics.sock`
//!   or `nc -U` show it.
//!
//! Only the operator should reach this socket: its permissions (unix) or the
//! loopback address (TCP, enforced when the config is parsed) keep guests and
//! remote hosts out. A client can still only read statistics and ask for the
//! configuration file to be read again.
//!
//! The client side: [`fetch`] asks an endpoint, [`scrape::Scrape`] reads its text.

pub mod scrape;

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use serde::Deserialize;
use thiserror::Error;

use crate::seccomp::{self, ThreadKind};

/// How long a connection may take to send its request before it gets the raw text.
pub const REQUEST_WAIT: Duration = Duration::from_millis(200);

/// How long writing a response may block on a slow reader.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request read (an HTTP request line and headers, or a command line).
const MAX_REQUEST: usize = 8192;

/// Why the endpoint could not be used.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The `metrics_socket` value is unusable.
    #[error("metrics socket {value:?}: {reason}")]
    Address {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The socket could not be created.
    #[error("cannot listen on metrics socket {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: MetricsEndpoint,
        /// The error.
        source: std::io::Error,
    },
    /// A client could not reach or read the endpoint.
    #[error("cannot read metrics from {endpoint}: {source}")]
    Fetch {
        /// The endpoint.
        endpoint: MetricsEndpoint,
        /// The error.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the metrics thread: {0}")]
    Spawn(std::io::Error),
}

/// Where metrics are served: a unix socket, or a loopback TCP address.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum MetricsEndpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// `tcp:ADDR:PORT` with a loopback address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for MetricsEndpoint {
    type Err = MetricsError;

    /// `tcp:127.0.0.1:9100`, `tcp:[::1]:9100`, or a unix socket path.
    fn from_str(value: &str) -> Result<Self, MetricsError> {
        let bad = |reason: &str| MetricsError::Address {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(addr) = value.strip_prefix("tcp:") {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| bad("expected tcp:IP:PORT, e.g. tcp:127.0.0.1:9100"))?;
            if !addr.ip().is_loopback() {
                return Err(bad("only loopback addresses are served"));
            }
            return Ok(MetricsEndpoint::Tcp(addr));
        }
        if value.is_empty() {
            return Err(bad("empty path"));
        }
        if value.contains('\0') {
            return Err(bad("path contains a NUL byte"));
        }
        Ok(MetricsEndpoint::Unix(PathBuf::from(value)))
    }
}

impl TryFrom<String> for MetricsEndpoint {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        value.parse().map_err(|e: MetricsError| e.to_string())
    }
}

impl fmt::Display for MetricsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsEndpoint::Unix(path) => write!(f, "{}", path.display()),
            MetricsEndpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// What the endpoint serves; the daemon implements it.
pub trait MetricsSource: Send + Sync {
    /// The Prometheus text exposition now.
    fn render(&self) -> String;
    /// Reloads the configuration; a one-line summary or the reason it was refused.
    fn reload(&self) -> Result<String, String>;
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(endpoint: &MetricsEndpoint) -> std::io::Result<Stream> {
        Ok(match endpoint {
            MetricsEndpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            MetricsEndpoint::Tcp(addr) => Stream::Tcp(TcpStream::connect(addr)?),
        })
    }

    fn set_timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Listener {
    fn bind(endpoint: &MetricsEndpoint) -> std::io::Result<(Listener, MetricsEndpoint)> {
        match endpoint {
            MetricsEndpoint::Unix(path) => {
                // Replace a stale socket, never another kind of file.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Ok((Listener::Unix(UnixListener::bind(path)?), endpoint.clone()))
            }
            MetricsEndpoint::Tcp(addr) => {
                let listener = TcpListener::bind(addr)?;
                let bound = listener.local_addr()?;
                Ok((Listener::Tcp(listener), MetricsEndpoint::Tcp(bound)))
            }
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }
}

/// A running metrics endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    endpoint: MetricsEndpoint,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `endpoint` and serves `source` on a thread of its own.
    pub fn start(
        endpoint: &MetricsEndpoint,
        source: Arc<dyn MetricsSource>,
    ) -> Result<MetricsServer, MetricsError> {
        let (listener, bound) = Listener::bind(endpoint).map_err(|source| MetricsError::Bind {
            endpoint: endpoint.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, source.as_ref(), &stop2))
            .map_err(MetricsError::Spawn)?;
        Ok(MetricsServer {
            endpoint: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens (with the port the kernel chose for `tcp:…:0`).
    pub fn endpoint(&self) -> &MetricsEndpoint {
        &self.endpoint
    }

    /// Stops the thread and removes the unix socket.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept(); it sees the flag next.
        let _ = Stream::connect(&self.endpoint);
        let _ = thread.join();
        if let MetricsEndpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn serve(listener: &Listener, source: &dyn MetricsSource, stop: &AtomicBool) {
    seccomp::apply(ThreadKind::Metrics);
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok(stream) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Err(e) = answer(stream, source) {
                    debug!("metrics client: {e}");
                }
            }
            Err(e) => {
                warn!("metrics socket: cannot accept: {e}");
                // Out of descriptors or similar: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What a client asked for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    /// The text, raw.
    Raw,
    /// A configuration reload, answered with one raw line.
    RawReload,
    /// An unknown raw command.
    RawUnknown(String),
    /// The text over HTTP (`head`: headers only).
    Http { head: bool },
    /// A reload over HTTP.
    HttpReload,
    /// An HTTP request we do not serve.
    HttpOther,
}

fn is_http(buf: &[u8]) -> bool {
    [
        "GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ",
    ]
    .iter()
    .any(|m| buf.starts_with(m.as_bytes()))
}

/// Whether `buf` holds a whole request (HTTP head, or one command line).
fn complete(buf: &[u8]) -> bool {
    if is_http(buf) {
        buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
    } else {
        buf.contains(&b'\n')
    }
}

/// Classifies what the client sent (possibly nothing).
fn classify(buf: &[u8]) -> Ask {
    if is_http(buf) {
        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default();
        let path = words.next().unwrap_or_default();
        return match (method, path) {
            ("GET", _) => Ask::Http { head: false },
            ("HEAD", _) => Ask::Http { head: true },
            ("POST", "/-/reload") => Ask::HttpReload,
            _ => Ask::HttpOther,
        };
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    match String::from_utf8_lossy(line).trim() {
        "" | "metrics" => Ask::Raw,
        "reload" => Ask::RawReload,
        other => Ask::RawUnknown(other.chars().take(64).collect()),
    }
}

/// Reads what the client sends within [`REQUEST_WAIT`] (at most [`MAX_REQUEST`]).
fn read_request(stream: &mut Stream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST && !complete(&buf) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

fn http_response(status: &str, body: &str, head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Whether the client of `stream` may reload: the daemon's owner (or root) on a
/// unix socket; nobody over TCP. `Err` says why not.
fn reload_allowed(stream: &Stream) -> Result<(), (&'static str, String)> {
    match stream {
        Stream::Tcp(_) => Err((
            "405 Method Not Allowed",
            "reload is not accepted over TCP (no peer credentials); send SIGHUP to the \
             daemon or use a unix metrics socket"
                .into(),
        )),
        Stream::Unix(s) => {
            let owner = crate::tenant::socket::daemon_uid();
            match crate::tenant::socket::peer_cred(s) {
                Ok(peer) if peer.uid == owner || peer.uid == 0 => Ok(()),
                Ok(peer) => {
                    warn!("metrics: refused a reload from {peer}: not the daemon's uid {owner}");
                    Err((
                        "403 Forbidden",
                        format!("reload is only for the daemon's uid {owner} or root"),
                    ))
                }
                Err(e) => Err(("403 Forbidden", format!("peer credentials unknown: {e}"))),
            }
        }
    }
}

fn answer(mut stream: Stream, source: &dyn MetricsSource) -> std::io::Result<()> {
    stream.set_timeouts(REQUEST_WAIT, WRITE_TIMEOUT)?;
    let request = read_request(&mut stream)?;
    let ask = classify(&request);
    if matches!(ask, Ask::RawReload | Ask::HttpReload) {
        if let Err((status, reason)) = reload_allowed(&stream) {
            let response = if ask == Ask::HttpReload {
                http_response(status, &format!("error: {reason}\n"), false)
            } else {
                format!("error: {reason}\n").into_bytes()
            };
            stream.write_all(&response)?;
            return stream.flush();
        }
    }
    let response = match ask {
        Ask::Raw => source.render().into_bytes(),
        Ask::RawReload => match source.reload() {
            Ok(summary) => format!("ok: {summary}\n").into_bytes(),
            Err(reason) => format!("error: {reason}\n").into_bytes(),
        },
        Ask::RawUnknown(cmd) => {
            format!("error: unknown command {cmd:?}; send nothing, \"metrics\" or \"reload\"\n")
                .into_bytes()
        }
        Ask::Http { head } => http_response("200 OK", &source.render(), head),
        Ask::HttpReload => match source.reload() {
            Ok(summary) => http_response("200 OK", &format!("ok: {summary}\n"), false),
            Err(reason) => http_response(
                "500 Internal Server Error",
                &format!("error: {reason}\n"),
                false,
            ),
        },
        Ask::HttpOther => http_response(
            "405 Method Not Allowed",
            "GET or HEAD any path for metrics; POST /-/reload to reload\n",
            false,
        ),
    };
    stream.write_all(&response)?;
    stream.flush()
}

/// Sends `request` (may be empty) to `endpoint`, half-closes and reads the whole
/// answer: what `ai-inferd top` and tests use.
pub fn fetch(
    endpoint: &MetricsEndpoint,
    request: &str,
    timeout: Duration,
) -> Result<String, MetricsError> {
    let fetch_err = |source| MetricsError::Fetch {
        endpoint: endpoint.clone(),
        source,
    };
    let mut stream = Stream::connect(endpoint).map_err(fetch_err)?;
    stream.set_timeouts(timeout, timeout).map_err(fetch_err)?;
    stream.write_all(request.as_bytes()).map_err(fetch_err)?;
    stream.shutdown_write().map_err(fetch_err)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(fetch_err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fixed {
        reloads: Mutex<u32>,
    }

    impl MetricsSource for Fixed {
        fn render(&self) -> String {
            "# TYPE x gauge\nx 1\n".into()
        }
        fn reload(&self) -> Result<String, String> {
            let mut n = self.reloads.lock().unwrap();
            *n += 1;
            if *n == 1 {
                Ok("1 tenant changed".into())
            } else {
                Err("bad config".into())
            }
        }
    }

    fn fixed() -> Arc<Fixed> {
        Arc::new(Fixed {
            reloads: Mutex::new(0),
        })
    }

    #[test]
    fn endpoints_parse_and_only_loopback_tcp_is_accepted() {
        assert_eq!(
            "tcp:127.0.0.1:9100".parse::<MetricsEndpoint>().unwrap(),
            MetricsEndpoint::Tcp("127.0.0.1:9100".parse().unwrap())
        );
        assert!(matches!(
            "tcp:[::1]:0".parse::<MetricsEndpoint>(),
            Ok(MetricsEndpoint::Tcp(_))
        ));
        assert_eq!(
            "/run/m.sock".parse::<MetricsEndpoint>().unwrap(),
            MetricsEndpoint::Unix("/run/m.sock".into())
        );
        for bad in [
            "tcp:0.0.0.0:9100",
            "tcp:10.1.2.3:80",
            "tcp:localhost:80",
            "",
        ] {
            assert!(bad.parse::<MetricsEndpoint>().is_err(), "{bad:?}");
        }
        assert_eq!(
            MetricsEndpoint::Tcp("127.0.0.1:5".parse().unwrap()).to_string(),
            "tcp:127.0.0.1:5"
        );
    }

    #[test]
    fn requests_are_classified() {
        assert_eq!(classify(b""), Ask::Raw);
        assert_eq!(classify(b"metrics\n"), Ask::Raw);
        assert_eq!(classify(b"reload\r\n"), Ask::RawReload);
        assert_eq!(classify(b"boom\n"), Ask::RawUnknown("boom".into()));
        assert_eq!(
            classify(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ask::Http { head: false }
        );
        assert_eq!(
            classify(b"HEAD / HTTP/1.0\r\n\r\n"),
            Ask::Http { head: true }
        );
        assert_eq!(
            classify(b"POST /-/reload HTTP/1.0\r\n\r\n"),
            Ask::HttpReload
        );
        assert_eq!(classify(b"POST /x HTTP/1.0\r\n\r\n"), Ask::HttpOther);
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!complete(b"GET / HTTP/1.0\r\n"));
        assert!(complete(b"reload\n"));
    }

    #[test]
    fn serves_raw_http_and_reload_on_unix_and_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let unix = MetricsEndpoint::Unix(dir.path().join("m.sock"));
        let tcp: MetricsEndpoint = "tcp:127.0.0.1:0".parse().unwrap();
        for endpoint in [unix, tcp] {
            let source = fixed();
            let server = MetricsServer::start(&endpoint, source).unwrap();
            let at = server.endpoint().clone();
            let wait = Duration::from_secs(5);
            assert_eq!(fetch(&at, "", wait).unwrap(), "# TYPE x gauge\nx 1\n");
            let http = fetch(&at, "GET /metrics HTTP/1.0\r\n\r\n", wait).unwrap();
            assert!(http.starts_with("HTTP/1.0 200 OK\r\n"), "{http}");
            assert!(http.contains("Content-Length: 19\r\n"), "{http}");
            assert!(http.ends_with("\r\n\r\n# TYPE x gauge\nx 1\n"), "{http}");
            if let MetricsEndpoint::Unix(_) = &at {
                // The owner (this process's uid) may reload.
                assert_eq!(
                    fetch(&at, "reload\n", wait).unwrap(),
                    "ok: 1 tenant changed\n"
                );
                let refused = fetch(&at, "POST /-/reload HTTP/1.0\r\n\r\n", wait).unwrap();
                assert!(refused.starts_with("HTTP/1.0 500"), "{refused}");
                assert!(refused.ends_with("error: bad config\n"), "{refused}");
            } else {
                // TCP carries no credentials: read-only.
                let raw = fetch(&at, "reload\n", wait).unwrap();
                assert!(
                    raw.starts_with("error: reload is not accepted over TCP"),
                    "{raw}"
                );
                let post = fetch(&at, "POST /-/reload HTTP/1.0\r\n\r\n", wait).unwrap();
                assert!(post.starts_with("HTTP/1.0 405"), "{post}");
            }
            assert!(fetch(&at, "what\n", wait)
                .unwrap()
                .starts_with("error: unknown"));
            server.stop();
            if let MetricsEndpoint::Unix(path) = &at {
                assert!(!path.exists(), "the socket is removed");
            }
            assert!(fetch(&at, "", wait).is_err(), "stopped");
        }
        // A regular file in the way is not replaced.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep").unwrap();
        let err = MetricsServer::start(&MetricsEndpoint::Unix(file.clone()), fixed());
        assert!(matches!(err, Err(MetricsError::Bind { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn a_silent_client_gets_the_raw_text_after_the_wait() {
        let server = MetricsServer::start(&"tcp:127.0.0.1:0".parse().unwrap(), fixed()).unwrap();
        let MetricsEndpoint::Tcp(addr) = server.endpoint().clone() else {
            panic!("tcp endpoint");
        };
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert_eq!(text, "# TYPE x gauge\nx 1\n");
        server.stop();
    }
}
