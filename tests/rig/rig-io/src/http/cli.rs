//! The command lines of `http`, `http-load` and `proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::client::Request;
use super::load::LoadSpec;
use super::Target;
use crate::cli::{option_value, parse_count, parse_timeout, usage, UsageError, DEFAULT_TIMEOUT};

pub const USAGE: &str = "\
  http TARGET METHOD PATH [--body STR | --body-file FILE] [--header 'K: V']... [--out FILE]
                                      one request; prints RIG-IO http status=N bytes=N us=N
                                      ok=<0|1> (on stderr, and the body on stdout, unless
                                      --out FILE takes the body)
  http-load TARGET METHOD PATH [--body STR | --body-file FILE] [--header 'K: V']...
            [--concurrency N] [--count N] [--secs S]
                                      N clients (default 1) send the request, each on its own
                                      kept-alive connection, COUNT times in all or for S
                                      seconds (default 10); prints RIG-IO http-load ...
                                      requests= ok= errors= rps= p50_us= p99_us= statuses=
  proxy [IP:]PORT TARGET              forward each TCP connection to PORT (IP default
                                      127.0.0.1) to TARGET; runs until stopped
TARGET is tcp:HOST:PORT, vsock:UDS_PATH:PORT (a guest's vsock port through its VMM's
hybrid vsock socket) or unix:PATH.";

/// A parsed `http`, `http-load` or `proxy` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpCommand {
    One {
        target: Target,
        request: Request,
        out: Option<PathBuf>,
        timeout: Duration,
    },
    Load(LoadSpec),
    Proxy {
        listen: SocketAddr,
        target: Target,
        timeout: Duration,
    },
}

/// Parses the arguments after `sub` (one of `http`, `http-load`, `proxy`).
pub fn parse(sub: &str, rest: &[String]) -> Result<HttpCommand, UsageError> {
    let mut positional = Vec::new();
    let mut body: Option<Vec<u8>> = None;
    let mut headers = Vec::new();
    let mut out = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut concurrency = 1usize;
    let mut count = None;
    let mut secs = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || option_value(&mut it, a);
        match a.as_str() {
            "--body" => body = Some(value()?.into_bytes()),
            "--body-file" => {
                let p = value()?;
                body = Some(std::fs::read(&p).map_err(|e| usage(format!("{p}: {e}")))?);
            }
            "--header" => {
                let h = value()?;
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| usage(format!("bad --header {h:?}: 'Name: value'")))?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            "--timeout" => timeout = parse_timeout(&value()?)?,
            "--concurrency" => {
                let n = parse_count("--concurrency", &value()?)?;
                concurrency = usize::try_from(n.min(1024)).unwrap_or(1024);
            }
            "--count" => count = Some(parse_count("--count", &value()?)?),
            "--secs" => secs = Some(parse_timeout(&value()?)?),
            s if s.starts_with("--") => return Err(usage(format!("unknown option {s}"))),
            _ => positional.push(a.clone()),
        }
    }
    let target_at = |i: usize| {
        positional
            .get(i)
            .ok_or_else(|| usage(format!("{sub}: TARGET missing")))
            .and_then(|t| Target::parse(t).map_err(usage))
    };
    match sub {
        "proxy" => {
            if positional.len() != 2 {
                return Err(usage("proxy: [IP:]PORT TARGET"));
            }
            let l = &positional[0];
            let listen = if l.bytes().all(|b| b.is_ascii_digit()) {
                format!("127.0.0.1:{l}")
            } else {
                l.clone()
            };
            let listen = listen
                .parse()
                .map_err(|_| usage(format!("bad proxy address {l:?}")))?;
            Ok(HttpCommand::Proxy {
                listen,
                target: target_at(1)?,
                timeout,
            })
        }
        _ => {
            if positional.len() != 3 {
                return Err(usage(format!("{sub}: TARGET METHOD PATH")));
            }
            let method = positional[1].to_ascii_uppercase();
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(usage(format!("bad method {:?}", positional[1])));
            }
            let path = positional[2].clone();
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ') {
                return Err(usage(format!(
                    "bad path {path:?}: starts with /, no spaces"
                )));
            }
            let request = Request {
                method,
                path,
                headers,
                body: body.unwrap_or_default(),
            };
            let target = target_at(0)?;
            if sub == "http" {
                return Ok(HttpCommand::One {
                    target,
                    request,
                    out,
                    timeout,
                });
            }
            Ok(HttpCommand::Load(LoadSpec {
                target,
                request,
                concurrency,
                duration: secs.unwrap_or(if count.is_some() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs(10)
                }),
                count,
                step: timeout,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<HttpCommand, UsageError> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse(&v[0], &v[1..])
    }

    #[test]
    fn command_lines() {
        match p("http tcp:10.0.0.2:8000 get /v2/health/ready --header X-Priority:batch").unwrap() {
            HttpCommand::One { request, .. } => {
                assert_eq!(request.method, "GET");
                assert_eq!(request.headers, vec![("X-Priority".into(), "batch".into())]);
            }
            other => panic!("{other:?}"),
        }
        match p("http-load vsock:/tmp/v.sock:8000 POST /x --body {} --concurrency 16 --count 100")
            .unwrap()
        {
            HttpCommand::Load(s) => {
                assert_eq!(s.concurrency, 16);
                assert_eq!(s.count, Some(100));
                assert_eq!(s.request.body, b"{}");
            }
            other => panic!("{other:?}"),
        }
        match p("proxy 18000 tcp:169.254.1.2:8000").unwrap() {
            HttpCommand::Proxy { listen, .. } => {
                assert_eq!(listen, "127.0.0.1:18000".parse().unwrap())
            }
            other => panic!("{other:?}"),
        }
        match p("proxy 0.0.0.0:18000 vsock:/tmp/v:8000").unwrap() {
            HttpCommand::Proxy { listen, .. } => assert_eq!(listen.port(), 18000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_command_lines() {
        for bad in [
            "http tcp:1.2.3.4:80 GET",
            "http tcp:1.2.3.4:80 G3T /",
            "http tcp:1.2.3.4:80 GET nopath",
            "http nope GET /",
            "http tcp:1.2.3.4:80 GET / --header novalue",
            "http-load tcp:1.2.3.4:80 GET / --concurrency 0",
            "http-load tcp:1.2.3.4:80 GET / --bogus",
            "proxy tcp:1.2.3.4:80",
            "proxy x:y tcp:1.2.3.4:80",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let e = p("http tcp:1.2.3.4:80 GET / --header").unwrap_err();
        assert_eq!(e.to_string(), "--header needs a value");
    }
}
