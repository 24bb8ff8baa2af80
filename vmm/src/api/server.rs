//! The API socket: created mode 0600 (a stale socket from a dead process is replaced, a
//! live one or any other file is an error), HTTP/1.1 framing by `tiny_http`, bodies
//! bounded to [`MAX_BODY`] bytes.
//!
//! `tiny_http` reads each connection's request head on its own pool thread; here one
//! thread takes complete heads and hands each request to a short-lived thread that reads
//! the body, asks the [`Controller`] (behind a mutex: requests are applied one at a time,
//! as in Firecracker) and writes the answer. A client that stalls in its body or never
//! reads its answer holds only that thread; at most [`MAX_IN_FLIGHT`] exist at once.

use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::metrics::FLUSH_INTERVAL;
use super::{routes, Controller, Response};
use crate::seccomp::{self, ThreadKind};

/// Largest request body accepted (Firecracker's limit).
pub const MAX_BODY: usize = 51_200;
/// Requests being served at once; more are answered 503 at once.
pub const MAX_IN_FLIGHT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("API socket {0}: another process is serving it")]
    InUse(PathBuf),
    #[error("API socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("API socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn lock(c: &Mutex<Controller>) -> MutexGuard<'_, Controller> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds the API socket at `path`, mode 0600. A socket file nobody listens on (left by a
/// process that died) is removed first.
pub fn bind(path: &Path) -> Result<UnixListener, ApiSocketError> {
    let io_err = |source| ApiSocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiSocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiSocketError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
    }
    // The socket is created with the umask's complement: 0600 from its first instant,
    // before anyone could connect. Nothing else creates files at this point of start-up.
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(io_err)
}

/// The running API server.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `listener` for `controller` on a thread of its own, and writes the metrics
    /// file every [`FLUSH_INTERVAL`] once one is configured.
    ///
    /// The server thread installs the `api` seccomp filter first and only then starts the
    /// HTTP server, whose threads (and the request threads) inherit it.
    pub fn spawn(listener: UnixListener, controller: Arc<Mutex<Controller>>) -> io::Result<Self> {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let ctl = controller.clone();
        let (ready, started) = std::sync::mpsc::channel();
        let accept = devices::thread::named("api-server").spawn(move || {
            let server = seccomp::apply(ThreadKind::Api)
                .map_err(io::Error::other)
                .and_then(|()| {
                    tiny_http::Server::from_listener(listener, None)
                        .map(Arc::new)
                        .map_err(|e| io::Error::other(e.to_string()))
                });
            let server = match server {
                Ok(s) => {
                    let _ = ready.send(Ok(s.clone()));
                    s
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            accept_loop(&server, &ctl, &in_flight)
        })?;
        let server = match started.recv() {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => {
                let _ = accept.join();
                return Err(e);
            }
            Err(_) => return Err(io::Error::other("the API server thread ended at start")),
        };
        devices::thread::named("api-metrics").spawn(move || {
            if let Err(e) = seccomp::apply(ThreadKind::Api) {
                log::error!("{e}; metrics are not written");
                return;
            }
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                let mut c = lock(&controller);
                if c.metrics_configured() {
                    if let Err(e) = c.flush_metrics() {
                        log::warn!("{e}");
                    }
                }
            }
        })?;
        Ok(ApiServer {
            server,
            accept: Some(accept),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    server: &tiny_http::Server,
    ctl: &Arc<Mutex<Controller>>,
    in_flight: &Arc<AtomicUsize>,
) {
    for rq in server.incoming_requests() {
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = rq.respond(to_http(Response::error(
                503,
                format!("more than {MAX_IN_FLIGHT} requests in flight; try again"),
            )));
            continue;
        }
        let (ctl, count) = (ctl.clone(), in_flight.clone());
        let spawned = devices::thread::named("api-request").spawn(move || {
            serve(rq, &ctl);
            count.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            log::warn!("API: cannot start a request thread: {e}");
        }
    }
}

/// Reads the body, at most [`MAX_BODY`] bytes.
fn read_body(rq: &mut tiny_http::Request) -> Result<Vec<u8>, Response> {
    let too_large = |n: usize| {
        Response::bad_request(format!(
            "the request body ({n} bytes or more) is larger than the limit of {MAX_BODY} bytes"
        ))
    };
    if let Some(n) = rq.body_length().filter(|n| *n > MAX_BODY) {
        return Err(too_large(n));
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Response::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large(body.len()));
    }
    Ok(body)
}

/// Answers one request.
pub fn handle(ctl: &Mutex<Controller>, method: &str, url: &str, body: &[u8]) -> Response {
    match routes::parse(method, url, body) {
        Ok(req) => lock(ctl).handle(req),
        Err(r) => {
            lock(ctl).count_unparsed(method, url);
            r
        }
    }
}

fn serve(mut rq: tiny_http::Request, ctl: &Mutex<Controller>) {
    let method = rq.method().as_str().to_string();
    let url = rq.url().to_string();
    let response = match read_body(&mut rq) {
        Ok(body) => handle(ctl, &method, &url, &body),
        Err(r) => r,
    };
    if response.status >= 400 {
        log::info!("API: {method} {url}: {}", response.status);
    }
    let _ = rq.respond(to_http(response));
}

fn to_http(r: Response) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    let content_type = if r.text {
        "text/plain; version=0.0.4"
    } else {
        "application/json"
    };
    let has_body = r.body.is_some();
    let mut out = tiny_http::Response::from_data(r.body.unwrap_or_default().into_bytes())
        .with_status_code(r.status);
    if has_body {
        if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
            out = out.with_header(h);
        }
    }
    if let Ok(h) = tiny_http::Header::from_bytes("Server", "aivmm API") {
        out = out.with_header(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A socket path in a fresh directory, which goes away with the returned guard.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        (dir, p)
    }

    struct NoVm;

    impl crate::api::controller::VmBackend for NoVm {
        fn start(&mut self, _: crate::config::ValidatedConfig) -> Result<(), String> {
            Err("no VM in this test".into())
        }
        fn runtime(&mut self, _: crate::vm::RuntimeAction) -> Result<(), String> {
            Ok(())
        }
    }

    /// One request on a fresh connection; the answer's status line.
    fn get_root(path: &Path) -> String {
        use std::io::{BufRead, BufReader, Write};
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn stalled_clients_never_block_another() {
        use std::io::Write;
        use std::time::Duration;
        let (_dir, p) = scratch();
        let sys = crate::test_support::FakeSys::new("api-stall", 4);
        let ctl = Controller::new(
            "stall".into(),
            crate::api::convert::default_config(),
            sys.host(),
            64,
            Box::new(NoVm),
        );
        let _server = ApiServer::spawn(bind(&p).unwrap(), Arc::new(Mutex::new(ctl))).unwrap();
        // Half a request head, then nothing; and requests that promise bodies they never
        // send (each holds a request thread, as many as MAX_IN_FLIGHT allows).
        let mut stalled = vec![UnixStream::connect(&p).unwrap()];
        stalled[0]
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        for _ in 0..MAX_IN_FLIGHT - 1 {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"PUT /vsock HTTP/1.1\r\nContent-Length: 40\r\n\r\n{")
                .unwrap();
            stalled.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
        // Others are still answered: at once with 503 while every request thread is held,
        // never left waiting; the controller is not locked by a stalled body.
        for _ in 0..3 {
            let status = get_root(&p);
            assert!(
                status.contains(" 200 ") || status.contains(" 503 "),
                "{status}"
            );
        }
        // Once the stalled bodies' clients go away, requests are served again.
        drop(stalled);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !get_root(&p).contains(" 200 ") {
            assert!(std::time::Instant::now() < deadline, "never served again");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn socket_is_0600_and_stale_sockets_are_replaced() {
        let (_dir, p) = scratch();
        let l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&p), Err(ApiSocketError::InUse(_))));
        drop(l);
        // The file stays behind, nobody listens: stale, replaced.
        assert!(p.exists());
        let l = bind(&p).unwrap();
        drop(l);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"not a socket").unwrap();
        assert!(matches!(bind(&p), Err(ApiSocketError::NotASocket(_))));
    }
}
