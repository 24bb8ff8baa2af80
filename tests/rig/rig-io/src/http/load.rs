//! `rig-io http-load`: the same request from N clients at once, each on its own kept-alive
//! connection, for a number of requests or a time; latency percentiles and status counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Client, Request};
use super::Target;
use crate::transfer::percentile;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    pub target: Target,
    pub request: Request,
    pub concurrency: usize,
    /// Requests in all (`None`: until `duration` ends).
    pub count: Option<u64>,
    /// Longest run (always bounded).
    pub duration: Duration,
    /// Timeout of each blocking step of a request.
    pub step: Duration,
}

/// What happened.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Requests that got a response, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response (connection or protocol errors).
    pub errors: u64,
    /// The first such error, for the log.
    pub first_error: Option<String>,
    pub secs: f64,
    /// Latency of every answered request, sorted, in µs.
    pub samples_us: Vec<u64>,
}

impl LoadReport {
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Answered with 2xx.
    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// The `RIG-IO http-load` line.
    pub fn line(&self, concurrency: usize) -> String {
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        let rps = if self.secs > 0.0 {
            self.answered() as f64 / self.secs
        } else {
            0.0
        };
        format!(
            "RIG-IO http-load concurrency={concurrency} requests={} ok={} errors={} secs={:.3} rps={rps:.1} p50_us={} p99_us={} max_us={} statuses={}",
            self.answered(),
            self.ok(),
            self.errors,
            self.secs,
            percentile(&self.samples_us, 50),
            percentile(&self.samples_us, 99),
            self.samples_us.last().copied().unwrap_or(0),
            if statuses.is_empty() { "none".to_string() } else { statuses.join(",") }
        )
    }
}

/// Runs the load; never fails as a whole (failures are counted).
pub fn run(spec: &LoadSpec) -> LoadReport {
    let left = Arc::new(AtomicU64::new(spec.count.unwrap_or(u64::MAX)));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let workers: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            let spec = spec.clone();
            let left = Arc::clone(&left);
            std::thread::spawn(move || worker(&spec, &left, deadline))
        })
        .collect();
    let mut total = LoadReport::default();
    for w in workers {
        let r = w.join().unwrap_or_else(|_| LoadReport {
            errors: 1,
            first_error: Some("a client thread panicked".into()),
            ..LoadReport::default()
        });
        for (s, n) in r.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        total.samples_us.extend(r.samples_us);
    }
    total.secs = start.elapsed().as_secs_f64();
    total.samples_us.sort_unstable();
    total
}

fn worker(spec: &LoadSpec, left: &AtomicU64, deadline: Instant) -> LoadReport {
    let mut client = Client::new(spec.target.clone(), spec.step);
    let mut r = LoadReport::default();
    while Instant::now() < deadline
        && left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        let t = Instant::now();
        match client.send(&spec.request) {
            Ok(resp) => {
                *r.statuses.entry(resp.status).or_default() += 1;
                r.samples_us
                    .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
                // A target that refuses outright should not be hammered in a tight loop.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Answers every request with 200, or 400 when its body is "bad"; one thread per
    /// connection, until the listener is dropped with the test.
    fn server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(k) = s.read(&mut chunk) else { return };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            let cl: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            if buf.len() < end + 4 + cl {
                                break;
                            }
                            let bad = &buf[end + 4..end + 4 + cl] == b"bad";
                            buf.drain(..end + 4 + cl);
                            let status = if bad { "400 Bad Request" } else { "200 OK" };
                            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
                        }
                    }
                });
            }
        });
        addr
    }

    fn spec(addr: &str, body: &str, count: u64) -> LoadSpec {
        LoadSpec {
            target: Target::Tcp(addr.to_string()),
            request: Request {
                method: "POST".into(),
                path: "/x".into(),
                body: body.as_bytes().to_vec(),
                ..Request::default()
            },
            concurrency: 4,
            count: Some(count),
            duration: Duration::from_secs(30),
            step: Duration::from_secs(5),
        }
    }

    #[test]
    fn counts_exactly_the_requests_asked_for() {
        let addr = server();
        let r = run(&spec(&addr, "good", 200));
        assert_eq!(r.answered(), 200);
        assert_eq!(r.ok(), 200);
        assert_eq!(r.errors, 0);
        assert_eq!(r.samples_us.len(), 200);
        assert!(
            r.line(4).contains("requests=200 ok=200 errors=0"),
            "{}",
            r.line(4)
        );
    }

    #[test]
    fn statuses_are_counted_by_code() {
        let addr = server();
        let r = run(&spec(&addr, "bad", 50));
        assert_eq!(r.statuses.get(&400), Some(&50));
        assert_eq!(r.ok(), 0);
        assert!(r.line(4).contains("statuses=400:50"), "{}", r.line(4));
    }

    #[test]
    fn a_dead_target_is_counted_as_errors_within_the_time() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let mut s = spec(&addr, "x", 5);
        s.step = Duration::from_millis(200);
        let t = Instant::now();
        let r = run(&s);
        assert_eq!(r.answered(), 0);
        assert_eq!(r.errors, 5);
        assert!(r.first_error.is_some());
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
