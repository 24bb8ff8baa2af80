//! HTTP over the rig's transports: a client for one request (`rig-io http`), a load
//! generator (`rig-io http-load`) and a forwarder (`rig-io proxy`) that puts a tenant's
//! endpoint (its TCP address or its hybrid vsock port) on a local TCP port.
//!
//! Responses are parsed with `httparse`; bodies must come with `Content-Length` (the guest
//! agent's server always sends it), which keeps the client small.

pub mod cli;
pub mod client;
pub mod load;
pub mod proxy;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::conn::{self, Conn, NetError};
use crate::hybrid;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `tcp:HOST:PORT`
    Tcp(String),
    /// `vsock:UDS_PATH:PORT`: a guest's vsock port through its VMM's hybrid vsock socket.
    HybridVsock { uds: PathBuf, port: u32 },
    /// `unix:PATH`: a unix stream socket (a VMM's API socket).
    Unix(PathBuf),
}

impl Target {
    /// Parses `tcp:HOST:PORT`, `vsock:UDS_PATH:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(hp) = s.strip_prefix("tcp:") {
            if !hp.contains(':') {
                return Err(format!("bad target {s:?}: tcp:HOST:PORT"));
            }
            return Ok(Target::Tcp(hp.to_string()));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (uds, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("bad target {s:?}: vsock:UDS_PATH:PORT"))?;
            let port = port
                .parse()
                .map_err(|_| format!("bad vsock port in {s:?}"))?;
            if uds.is_empty() {
                return Err(format!("bad target {s:?}: no socket path"));
            }
            return Ok(Target::HybridVsock {
                uds: PathBuf::from(uds),
                port,
            });
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("bad target {s:?}: no socket path"));
            }
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        Err(format!(
            "bad target {s:?}: tcp:HOST:PORT, vsock:UDS_PATH:PORT or unix:PATH"
        ))
    }

    /// Connects, retrying within `step` while nothing listens yet.
    pub fn connect(&self, step: Duration) -> Result<Conn, String> {
        match self {
            Target::Tcp(hp) => conn::resolve(hp)
                .and_then(|a| conn::tcp_connect(a, step))
                .map_err(|e: NetError| e.to_string()),
            Target::HybridVsock { uds, port } => hybrid::connect(uds, *port, step)
                .map(|(c, _)| c)
                .map_err(|e| e.to_string()),
            Target::Unix(p) => conn::unix_connect(p, step).map_err(|e| e.to_string()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(hp) => write!(f, "tcp:{hp}"),
            Target::HybridVsock { uds, port } => write!(f, "vsock:{}:{port}", uds.display()),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("tcp:10.0.0.2:8000").unwrap(),
            Target::Tcp("10.0.0.2:8000".into())
        );
        assert_eq!(
            Target::parse("vsock:/tmp/a:b.vsock:8000").unwrap(),
            Target::HybridVsock {
                uds: "/tmp/a:b.vsock".into(),
                port: 8000
            }
        );
        assert_eq!(
            Target::parse("unix:/run/api.sock").unwrap(),
            Target::Unix("/run/api.sock".into())
        );
        for bad in [
            "tcp:nohost",
            "vsock:/tmp/x",
            "vsock::80",
            "vsock:/tmp/x:port",
            "unix:",
            "http://x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
