//! One HTTP/1.1 request and its response, on a kept-alive connection.

use std::time::Duration;

use super::Target;
use crate::conn::Conn;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 256 << 20;
/// Most response headers parsed.
const MAX_HEADERS: usize = 64;

/// A request to send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Extra headers (`Host`, `Content-Length` and `Connection` are added).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: rig\r\n", self.method, self.path);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A response read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server asked to close the connection.
    pub close: bool,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What `parse_head` found in the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// More bytes are needed.
    Partial,
    /// The head is `len` bytes; the body has `body_len` more.
    Complete {
        len: usize,
        body_len: usize,
        status: u16,
        headers: Vec<(String, String)>,
        close: bool,
    },
}

/// Parses a response head; `head_request` responses have no body.
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Head, String> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hs);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!("response head longer than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let status = r.code.ok_or("response without a status")?;
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.trim())
    };
    if find("transfer-encoding").is_some() {
        return Err("chunked responses are not supported".into());
    }
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let body_len = match find("content-length") {
        _ if no_body => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| format!("bad Content-Length {v:?}"))?,
        None => return Err("response without Content-Length".into()),
    };
    if body_len > MAX_BODY {
        return Err(format!("response body of {body_len} bytes is too large"));
    }
    let close =
        r.version == Some(0) || find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok(Head::Complete {
        len,
        body_len,
        status,
        headers,
        close,
    })
}

/// A client of one target that keeps its connection between requests.
pub struct Client {
    target: Target,
    step: Duration,
    conn: Option<Conn>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(target: Target, step: Duration) -> Self {
        Client {
            target,
            step,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// Sends `req` and reads its response. A kept-alive connection the server has closed
    /// meanwhile is replaced once.
    pub fn send(&mut self, req: &Request) -> Result<Response, String> {
        let wire = req.encode();
        let reused = self.conn.is_some();
        match self.exchange(&wire, req.method == "HEAD") {
            Err(Fail::Closed) if reused => {
                self.conn = None;
                self.exchange(&wire, req.method == "HEAD")
                    .map_err(Fail::into)
            }
            other => other.map_err(Fail::into),
        }
    }

    fn exchange(&mut self, wire: &[u8], head_request: bool) -> Result<Response, Fail> {
        if self.conn.is_none() {
            self.conn = Some(self.target.connect(self.step).map_err(Fail::Other)?);
            self.buf.clear();
        }
        let result = self.exchange_on_conn(wire, head_request);
        if !matches!(&result, Ok(r) if !r.close) {
            self.conn = None;
        }
        result
    }

    fn exchange_on_conn(&mut self, wire: &[u8], head_request: bool) -> Result<Response, Fail> {
        let conn = self.conn.as_mut().ok_or(Fail::Closed)?;
        conn.write_all(wire)
            .map_err(|e| Fail::Other(e.to_string()))?;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut got_any = !self.buf.is_empty();
        let (len, body_len, status, headers, close) = loop {
            match parse_head(&self.buf, head_request).map_err(Fail::Other)? {
                Head::Complete {
                    len,
                    body_len,
                    status,
                    headers,
                    close,
                } => break (len, body_len, status, headers, close),
                Head::Partial => {}
            }
            let n = conn
                .read(&mut chunk)
                .map_err(|e| Fail::Other(e.to_string()))?;
            if n == 0 {
                return Err(if got_any {
                    Fail::Other("connection closed in a response head".into())
                } else {
                    Fail::Closed
                });
            }
            got_any = true;
            self.buf.extend_from_slice(&chunk[..n]);
        };
        while self.buf.len() < len + body_len {
            let n = conn
                .read(&mut chunk)
                .map_err(|e| Fail::Other(e.to_string()))?;
            if n == 0 {
                return Err(Fail::Other(format!(
                    "connection closed after {} of {body_len} body bytes",
                    self.buf.len() - len
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = self.buf[len..len + body_len].to_vec();
        self.buf.drain(..len + body_len);
        Ok(Response {
            status,
            headers,
            body,
            close,
        })
    }
}

/// Why an exchange failed: a connection closed before any answer (worth one retry on a
/// kept-alive connection), or anything else.
enum Fail {
    Closed,
    Other(String),
}

impl From<Fail> for String {
    fn from(f: Fail) -> String {
        match f {
            Fail::Closed => "connection closed before a response".into(),
            Fail::Other(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn heads_parse() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false).unwrap();
        assert!(matches!(
            h,
            Head::Complete {
                body_len: 5,
                status: 200,
                close: false,
                ..
            }
        ));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-", false).unwrap(),
            Head::Partial
        );
        let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert!(matches!(
            h,
            Head::Complete {
                body_len: 0,
                status: 204,
                ..
            }
        ));
        let h = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).unwrap();
        assert!(matches!(h, Head::Complete { close: true, .. }));
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n",
            b"SSH-2.0\r\n\r\n",
        ] {
            assert!(
                parse_head(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A server that answers each request on one connection, then closes after `n`.
    fn server(n: usize) -> (std::thread::JoinHandle<Vec<String>>, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while seen.len() < n {
                let k = s.read(&mut chunk).unwrap();
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
                    let cl: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if buf.len() < end + 4 + cl {
                        break;
                    }
                    let body = String::from_utf8(buf[end + 4..end + 4 + cl].to_vec()).unwrap();
                    buf.drain(..end + 4 + cl);
                    let answer = format!("echo:{body}");
                    write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    )
                    .unwrap();
                    seen.push(head.lines().next().unwrap().to_string());
                }
            }
            seen
        });
        (h, addr)
    }

    #[test]
    fn requests_share_a_connection() {
        let (srv, addr) = server(3);
        let mut c = Client::new(Target::Tcp(addr), Duration::from_secs(5));
        for i in 0..3 {
            let r = c
                .send(&Request {
                    method: "POST".into(),
                    path: format!("/p{i}"),
                    body: format!("b{i}").into_bytes(),
                    ..Request::default()
                })
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body, format!("echo:b{i}").into_bytes());
        }
        assert_eq!(
            srv.join().unwrap(),
            vec![
                "POST /p0 HTTP/1.1",
                "POST /p1 HTTP/1.1",
                "POST /p2 HTTP/1.1"
            ]
        );
    }
}
