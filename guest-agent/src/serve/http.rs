//! HTTP/1.1 over any byte stream: the request head parsed by `httparse`, bodies by
//! `Content-Length`, keep-alive and pipelining, and limits on everything a client
//! controls (head size, header count, body size, time to send a request, idle time).
//!
//! `Transfer-Encoding` (chunked bodies) is refused with 411 Length Required: every
//! client this server is for sends `Content-Length`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A connected byte stream with timeouts (TCP, vsock, or a test double).
pub trait Connection: Read + Write + Send {
    /// Bounds each read; `None` waits forever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds each write; `None` waits forever.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sends no more (the peer reads end-of-file after what was sent).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Connection for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// After a refusal: stops sending and reads (and drops) what the client still sends,
/// for at most half a second and 1 MiB, so that closing does not reset the connection
/// before the client has read the answer.
pub fn linger(conn: &mut dyn Connection) {
    if conn.shutdown_write().is_err() {
        return;
    }
    let end = Instant::now() + Duration::from_millis(500);
    let mut scratch = [0u8; 16 << 10];
    let mut total = 0;
    while total < 1 << 20 {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// Limits on what one client may send. Defaults: 16 KiB of request head, 64 headers,
/// 16 MiB of body, 30 s for a whole request once its first byte arrived, 30 s idle
/// between requests, 30 s for each write of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers together.
    pub max_head_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
    /// Body bytes (`Content-Length`).
    pub max_body_bytes: u64,
    /// From a request's first byte to the end of its body.
    pub request_timeout: Duration,
    /// Waiting for the next request on an open connection.
    pub idle_timeout: Duration,
    /// Each write of a response (a client that does not read is dropped).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 << 10,
            max_headers: 64,
            max_body_bytes: 16 << 20,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string after `?` (empty if none).
    pub query: String,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Bytes of head and body on the wire.
    pub wire_bytes: u64,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields other than `Content-Length` and `Connection`.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    /// A response with a body of `content_type`.
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
            close: false,
        }
    }

    /// A JSON response.
    pub fn json(status: u16, value: &Value) -> Self {
        Response::new(status, "application/json", value.to_string().into_bytes())
    }

    /// The Open Inference Protocol's error body, `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        Response::json(status, &json!({ "error": message }))
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The response head as sent (with `Content-Length` and, if closing, `Connection`).
    pub fn head(&self, keep_alive_1_0: bool) -> Vec<u8> {
        let mut h = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (n, v) in &self.headers {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if self.close {
            h.push_str("Connection: close\r\n");
        } else if keep_alive_1_0 {
            h.push_str("Connection: keep-alive\r\n");
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// What serves the requests of a connection.
pub trait Handler: Send + Sync {
    /// Answers one request.
    fn handle(&self, request: &Request) -> Response;
    /// Told about a request the connection refused before it was complete (malformed,
    /// too large, too slow), with the bytes it had read.
    fn refused(&self, response: &Response, wire_bytes: u64);
}

enum Next {
    /// A complete request; the connection is kept alive after it if `keep_alive`.
    Request(Request, bool, bool),
    /// The client closed, went idle, or the socket failed: close silently.
    Done,
    /// Answer with this and close.
    Refuse(Response, u64),
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads up to `max` more bytes into `buf`, waiting until `deadline` at the latest.
fn read_more(
    conn: &mut dyn Connection,
    buf: &mut Vec<u8>,
    deadline: Instant,
    max: usize,
) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut chunk = [0u8; 16 << 10];
    let want = max.clamp(1, chunk.len());
    loop {
        match conn.read(&mut chunk[..want]) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn refuse(status: u16, message: &str, read: usize) -> Next {
    let mut r = Response::error(status, message);
    r.close = true;
    Next::Refuse(r, read as u64)
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The head of a request: method, target, version, header fields, and its length.
struct Head {
    method: String,
    target: String,
    minor: u8,
    headers: Vec<(String, String)>,
    len: usize,
}

/// The head if complete; a refusal (status and reason) if it is malformed.
fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, (u16, String)> {
    let mut fields = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if len > limits.max_head_bytes {
                return Err((431, "request head too large".into()));
            }
            Ok(Some(Head {
                method: req.method.unwrap_or_default().to_string(),
                target: req.path.unwrap_or_default().to_string(),
                minor: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                len,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err((
            431,
            format!("more than {} header fields", limits.max_headers),
        )),
        Err(httparse::Error::Version) => Err((505, "only HTTP/1.0 and HTTP/1.1 are served".into())),
        Err(e) => Err((400, format!("malformed request: {e}"))),
    }
}

fn content_length(headers: &[(String, String)]) -> Result<u64, &'static str> {
    let mut length = None;
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err("invalid Content-Length");
            }
            let n: u64 = part.parse().map_err(|_| "invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(length.unwrap_or(0))
}

/// Reads the next request from `conn`; `buf` holds bytes already read (pipelining).
fn next_request(conn: &mut dyn Connection, buf: &mut Vec<u8>, limits: &Limits) -> Next {
    if buf.is_empty() {
        match read_more(conn, buf, Instant::now() + limits.idle_timeout, usize::MAX) {
            Ok(0) | Err(_) => return Next::Done,
            Ok(_) => {}
        }
    }
    let deadline = Instant::now() + limits.request_timeout;
    let head = loop {
        match parse_head(buf, limits) {
            Ok(Some(head)) => break head,
            Ok(None) if buf.len() >= limits.max_head_bytes => {
                return refuse(431, "request head too large", buf.len())
            }
            Ok(None) => {}
            Err((status, reason)) => return refuse(status, &reason, buf.len()),
        }
        match read_more(conn, buf, deadline, limits.max_head_bytes + 1 - buf.len()) {
            Ok(0) => return Next::Done,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return refuse(408, "request head not received in time", buf.len())
            }
            Err(_) => return Next::Done,
        }
    };
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if header("transfer-encoding").is_some() {
        return refuse(
            411,
            "Transfer-Encoding is not supported: send the body with Content-Length",
            buf.len(),
        );
    }
    let length = match content_length(&head.headers) {
        Ok(n) => n,
        Err(msg) => return refuse(400, msg, buf.len()),
    };
    if length > limits.max_body_bytes {
        return refuse(
            413,
            &format!(
                "body of {length} bytes is over the limit of {} bytes",
                limits.max_body_bytes
            ),
            buf.len(),
        );
    }
    // Fits in usize: bounded by max_body_bytes, which is a memory size.
    let total = head.len + length as usize;
    let expect = header("expect");
    if expect.is_some_and(|v| !v.eq_ignore_ascii_case("100-continue")) {
        return refuse(417, "unsupported Expect", buf.len());
    }
    if expect.is_some()
        && buf.len() < total
        && conn
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|_| conn.flush())
            .is_err()
    {
        return Next::Done;
    }
    while buf.len() < total {
        match read_more(conn, buf, deadline, total - buf.len()) {
            Ok(0) => return Next::Done,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return refuse(408, "request body not received in time", buf.len())
            }
            Err(_) => return Next::Done,
        }
    }
    let connection = header("connection").unwrap_or("");
    let keep_alive = if head.minor >= 1 {
        !has_token(connection, "close")
    } else {
        has_token(connection, "keep-alive")
    };
    let keep_alive_1_0 = head.minor == 0 && keep_alive;
    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (head.target.clone(), String::new()),
    };
    let body = buf[head.len..total].to_vec();
    buf.drain(..total);
    Next::Request(
        Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            body,
            wire_bytes: total as u64,
        },
        keep_alive,
        keep_alive_1_0,
    )
}

fn write_response(
    conn: &mut dyn Connection,
    response: &Response,
    keep_alive_1_0: bool,
) -> io::Result<()> {
    let head = response.head(keep_alive_1_0);
    if response.body.len() <= 64 << 10 {
        let mut all = head;
        all.extend_from_slice(&response.body);
        conn.write_all(&all)?;
    } else {
        conn.write_all(&head)?;
        conn.write_all(&response.body)?;
    }
    conn.flush()
}

/// Serves requests on `conn` until the client closes, goes idle, breaks a limit, or
/// asks to close. Never panics on what the client sends.
pub fn serve_connection(conn: &mut dyn Connection, limits: &Limits, handler: &dyn Handler) {
    if conn.set_write_timeout(Some(limits.write_timeout)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        match next_request(conn, &mut buf, limits) {
            Next::Done => return,
            Next::Refuse(response, read) => {
                handler.refused(&response, read);
                if write_response(conn, &response, false).is_ok() {
                    linger(conn);
                }
                return;
            }
            Next::Request(request, keep_alive, keep_alive_1_0) => {
                let mut response = handler.handle(&request);
                response.close |= !keep_alive;
                if write_response(conn, &response, keep_alive_1_0).is_err() || response.close {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A scripted client: reads come from `input` in the given pieces (an empty piece
    /// is a read timeout), writes are collected.
    struct Scripted {
        input: Vec<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return Ok(0);
            }
            let piece = &mut self.input[0];
            if piece.is_empty() {
                self.input.remove(0);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            piece.drain(..n);
            if piece.is_empty() {
                self.input.remove(0);
            }
            Ok(n)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Connection for Scripted {
        fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
        fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Echo {
        seen: Mutex<Vec<Request>>,
        refused: Mutex<Vec<u16>>,
    }

    impl Handler for Echo {
        fn handle(&self, r: &Request) -> Response {
            self.seen.lock().unwrap().push(r.clone());
            Response::new(200, "text/plain", r.body.clone())
        }
        fn refused(&self, response: &Response, _: u64) {
            self.refused.lock().unwrap().push(response.status);
        }
    }

    fn run(pieces: &[&[u8]], limits: &Limits) -> (String, Echo) {
        let mut conn = Scripted {
            input: pieces.iter().map(|p| p.to_vec()).collect(),
            output: Vec::new(),
        };
        let echo = Echo::default();
        serve_connection(&mut conn, limits, &echo);
        (String::from_utf8_lossy(&conn.output).into_owned(), echo)
    }

    fn statuses(out: &str) -> Vec<u16> {
        // Status lines: "HTTP/1.1 " and three digits (bodies may mention "HTTP/1.1").
        out.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| out.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }

    #[test]
    fn keep_alive_and_pipelined_requests() {
        let (out, echo) = run(
            &[
                b"POST /a?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n",
                b"Host: h\r\n\r\n",
                b"POST /c HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nzz",
            ],
            &Limits::default(),
        );
        assert_eq!(statuses(&out), vec![200, 200, 200]);
        let seen = echo.seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            (seen[0].path.as_str(), seen[0].query.as_str()),
            ("/a", "x=1")
        );
        assert_eq!(seen[0].body, b"abc");
        assert_eq!(seen[1].header("HOST"), Some("h"));
        assert_eq!(seen[2].body, b"zz");
        assert!(out.ends_with("Connection: close\r\n\r\nzz"), "{out}");
    }

    #[test]
    fn http_1_0_closes_unless_asked_to_keep_alive() {
        let (out, echo) = run(
            &[b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n"],
            &Limits::default(),
        );
        assert_eq!(statuses(&out), vec![200]);
        assert_eq!(echo.seen.lock().unwrap().len(), 1);
        let (out, _) = run(
            &[b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n"],
            &Limits::default(),
        );
        assert_eq!(statuses(&out), vec![200, 200]);
        assert!(out.contains("Connection: keep-alive"));
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused() {
        let small = Limits {
            max_head_bytes: 256,
            max_headers: 4,
            max_body_bytes: 10,
            ..Limits::default()
        };
        let many_headers = "GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n";
        let long_head = format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(300));
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"\x00\x01garbage\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/2.0\r\n\r\n".to_vec(), 505),
            (many_headers.as_bytes().to_vec(), 431),
            (long_head.into_bytes(), 431),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n".to_vec(),
                413,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                411,
            ),
            (
                b"POST / HTTP/1.1\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx".to_vec(),
                417,
            ),
        ];
        for (input, want) in cases {
            let (out, echo) = run(&[&input], &small);
            assert_eq!(
                statuses(&out),
                vec![want],
                "{}",
                String::from_utf8_lossy(&input)
            );
            assert!(out.contains("Connection: close"), "{out}");
            assert!(out.contains("{\"error\":"), "{out}");
            assert!(echo.seen.lock().unwrap().is_empty());
            assert_eq!(*echo.refused.lock().unwrap(), vec![want]);
        }
    }

    #[test]
    fn slow_or_truncated_requests_end_the_connection() {
        let quick = Limits {
            request_timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        // A head that never completes: the read timeout fires (empty piece), and once
        // the request's time is up the client gets 408.
        let (out, _) = run(
            &[b"GET / HT", b"", b"", b""],
            &Limits {
                request_timeout: Duration::ZERO,
                ..quick
            },
        );
        assert_eq!(statuses(&out), vec![408]);
        // A body shorter than announced, then EOF: nothing to answer.
        let (out, echo) = run(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"], &quick);
        assert!(out.is_empty(), "{out}");
        assert!(echo.seen.lock().unwrap().is_empty());
        // An idle connection just closes.
        let (out, _) = run(&[b""], &quick);
        assert!(out.is_empty());
    }

    #[test]
    fn expect_continue_gets_an_interim_response() {
        let (out, echo) = run(
            &[
                b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
                b"hi",
            ],
            &Limits::default(),
        );
        assert!(
            out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            "{out}"
        );
        assert_eq!(echo.seen.lock().unwrap()[0].body, b"hi");
    }

    /// Seeded random damage to valid requests, delivered in random pieces: every
    /// answer is a well-formed response, and nothing panics.
    #[test]
    fn random_damage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";
        let limits = Limits {
            max_head_bytes: 128,
            max_headers: 8,
            max_body_bytes: 64,
            ..Limits::default()
        };
        for _ in 0..2000 {
            let mut input = valid.to_vec();
            for _ in 0..(next() % 6) {
                let at = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[at] = next() as u8,
                    1 => input.insert(at, next() as u8),
                    2 => {
                        input.remove(at);
                    }
                    _ => input.splice(at..at, b"\r\n".iter().copied()).for_each(drop),
                }
                if input.is_empty() {
                    input.push(b'G');
                }
            }
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + (next() as usize) % rest.len();
                pieces.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let mut conn = Scripted {
                input: pieces,
                output: Vec::new(),
            };
            serve_connection(&mut conn, &limits, &Echo::default());
            let out = String::from_utf8_lossy(&conn.output);
            assert!(out.is_empty() || out.starts_with("HTTP/1.1 "), "{out}");
        }
    }
}
