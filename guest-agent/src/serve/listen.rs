//! Where the server listens: `tcp:HOST:PORT` or `vsock:PORT`, and accepting
//! connections from either as the same kind of stream.

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::str::FromStr;

use super::http::Connection;
use super::vsock::VsockListener;

/// A listen address from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `tcp:HOST:PORT` (`tcp:0.0.0.0:8000`, `tcp:[::]:8000`).
    Tcp(String),
    /// `vsock:PORT`, any CID.
    Vsock(u32),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid listen address {s:?} (tcp:HOST:PORT or vsock:PORT)");
        match s.split_once(':') {
            Some(("tcp", rest)) => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(ListenAddr::Tcp(rest.to_string()))
            }
            Some(("vsock", port)) => port.parse().map(ListenAddr::Vsock).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Vsock(p) => write!(f, "vsock:{p}"),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// vsock.
    Vsock(VsockListener),
}

impl Listener {
    /// Binds `addr`.
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => {
                let addrs: Vec<_> = a.to_socket_addrs()?.collect();
                Ok(Listener::Tcp(TcpListener::bind(&addrs[..])?))
            }
            ListenAddr::Vsock(port) => Ok(Listener::Vsock(VsockListener::bind(*port)?)),
        }
    }

    /// The address actually bound (with the port the system chose for port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?.to_string())),
            Listener::Vsock(l) => Ok(ListenAddr::Vsock(l.port()?)),
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Box<dyn Connection>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Responses are written whole; do not hold back their last segment.
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Listener::Vsock(l) => Ok(Box::new(l.accept()?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "tcp:0.0.0.0:8000".parse(),
            Ok(ListenAddr::Tcp("0.0.0.0:8000".into()))
        );
        assert_eq!(
            "tcp:[::1]:80".parse(),
            Ok(ListenAddr::Tcp("[::1]:80".into()))
        );
        assert_eq!("vsock:5000".parse(), Ok(ListenAddr::Vsock(5000)));
        for bad in [
            "",
            "tcp:8000",
            "tcp::80",
            "tcp:h:99999",
            "vsock:x",
            "udp:1:2",
            "8000",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(ListenAddr::Vsock(7).to_string(), "vsock:7");
    }

    #[test]
    fn tcp_binds_port_zero_and_reports_the_port() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        match l.local_addr().unwrap() {
            ListenAddr::Tcp(a) => assert!(!a.ends_with(":0"), "{a}"),
            other => panic!("{other:?}"),
        }
    }
}
