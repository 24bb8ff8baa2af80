//! rig-io's command line.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::transfer::Role;

pub const USAGE: &str = "\
usage: rig-io SUBCOMMAND ARGS... [--timeout SECS]

  mktap NAME                          create a persistent tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)
  tcp-listen PORT ROLE [--bind IP]    accept one TCP connection (default bind 0.0.0.0)
  tcp-connect HOST:PORT ROLE          connect over TCP
  vsock-listen PORT ROLE              accept one AF_VSOCK connection (any CID)
  vsock-connect CID PORT ROLE         connect over AF_VSOCK (CID 2 = the host)
  uds-listen PATH ROLE                accept one unix connection (the host end of a guest's
                                      connection to CID 2: PATH = <uds_path>_<port>)
  uds-connect UDS_PATH PORT ROLE      hybrid vsock: connect to UDS_PATH, CONNECT PORT, transfer
  blk-randread PATH [--count N] [--bs BYTES]
                                      O_DIRECT reads at random aligned offsets (default
                                      1000 reads of 4096 bytes)

ROLE is one of:
  --send N     write N bytes of the test pattern, then wait for the peer to close
  --recv N     read until end of stream and check it is exactly N bytes of the pattern
  --echo       write back everything read, until end of stream
  --rtt COUNT  COUNT round trips of a 64-byte message (the peer runs --echo)
N takes a K, M or G suffix (KiB, MiB, GiB). --timeout (default 60 s) bounds each blocking
step: accept, connect (retried while the peer is not listening yet), each read or write.
Prints one line: RIG-IO <subcommand> bytes=N checksum=<hex> secs=<f> mibps=<f> ok=<0|1>
role=<role>, or RIG-IO rtt count=N p50_us=N p99_us=N max_us=N ok=<0|1> via=<subcommand>.
Exit status 0 when ok=1, 1 on a failure (message on stderr), 2 on a usage error.";

/// Default step timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest transfer accepted (1 TiB): a typo should not run for days.
const MAX_BYTES: u64 = 1 << 40;

/// Most round trips or random reads in one run.
const MAX_COUNT: u64 = 10_000_000;

/// A command line rig-io cannot run.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub(crate) fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// The word after option `name` on the command line: its value.
pub(crate) fn option_value<'a>(
    it: &mut impl Iterator<Item = &'a String>,
    name: &str,
) -> Result<String, UsageError> {
    it.next()
        .cloned()
        .ok_or_else(|| usage(format!("{name} needs a value")))
}

/// Where a transfer's connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    TcpListen { bind: IpAddr, port: u16 },
    TcpConnect { hostport: String },
    VsockListen { port: u32 },
    VsockConnect { cid: u32, port: u32 },
    UdsListen { path: PathBuf },
    UdsConnect { path: PathBuf, port: u32 },
}

/// A parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    MkTap {
        name: String,
    },
    Transfer {
        endpoint: Endpoint,
        role: Role,
        timeout: Duration,
    },
    BlkRandRead {
        path: PathBuf,
        count: u64,
        bs: usize,
    },
    /// `http`, `http-load` or `proxy`.
    Http(crate::http::cli::HttpCommand),
}

/// A byte count: digits with an optional K, M or G (binary) suffix.
pub fn parse_size(s: &str) -> Result<u64, UsageError> {
    let bad = || {
        usage(format!(
            "bad size {s:?}: digits with an optional K, M or G suffix, at most 1T"
        ))
    };
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let n = n.checked_mul(mult).ok_or_else(bad)?;
    if n > MAX_BYTES {
        return Err(bad());
    }
    Ok(n)
}

fn parse_num<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, UsageError> {
    // FromStr for integers accepts a leading '+': insist on plain digits.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage(format!("bad {what} {s:?}: expected a number")));
    }
    s.parse()
        .map_err(|_| usage(format!("bad {what} {s:?}: out of range")))
}

pub(crate) fn parse_count(what: &str, s: &str) -> Result<u64, UsageError> {
    let n: u64 = parse_num(what, s)?;
    if n == 0 || n > MAX_COUNT {
        return Err(usage(format!("bad {what} {n}: from 1 to {MAX_COUNT}")));
    }
    Ok(n)
}

pub(crate) fn parse_timeout(s: &str) -> Result<Duration, UsageError> {
    let secs: f64 = s
        .parse()
        .map_err(|_| usage(format!("bad --timeout {s:?}: seconds expected")))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(usage(format!("bad --timeout {s}: from 0 to 86400 seconds")));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(usage("no subcommand"));
    };
    if matches!(sub.as_str(), "http" | "http-load" | "proxy") {
        return crate::http::cli::parse(sub, rest).map(Command::Http);
    }
    let mut positional = Vec::new();
    let mut role = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut bind = None;
    let mut count = None;
    let mut bs = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || option_value(&mut it, a);
        let new_role = match a.as_str() {
            "--send" => Some(Role::Send(parse_size(&value()?)?)),
            "--recv" => Some(Role::Recv(parse_size(&value()?)?)),
            "--echo" => Some(Role::Echo),
            "--rtt" => {
                let n = parse_count("--rtt", &value()?)?;
                // MAX_COUNT fits u32.
                Some(Role::Rtt(u32::try_from(n).unwrap_or(u32::MAX)))
            }
            "--timeout" => {
                timeout = parse_timeout(&value()?)?;
                None
            }
            "--bind" => {
                let v = value()?;
                bind = Some(
                    v.parse::<IpAddr>()
                        .map_err(|_| usage(format!("bad --bind address {v:?}")))?,
                );
                None
            }
            "--count" => {
                count = Some(parse_count("--count", &value()?)?);
                None
            }
            "--bs" => {
                bs = Some(parse_num::<usize>("--bs", &value()?)?);
                None
            }
            s if s.starts_with("--") => return Err(usage(format!("unknown option {s}"))),
            _ => {
                positional.push(a.clone());
                None
            }
        };
        if let Some(r) = new_role {
            if role.replace(r).is_some() {
                return Err(usage("give one of --send, --recv, --echo, --rtt"));
            }
        }
    }

    let want = |n: usize, form: &str| -> Result<(), UsageError> {
        if positional.len() == n {
            Ok(())
        } else {
            Err(usage(format!("usage: rig-io {sub} {form}")))
        }
    };
    let transfer_only = |what: &str| -> Result<(), UsageError> {
        if role.is_some() || bind.is_some() {
            return Err(usage(format!("{sub} takes no {what}")));
        }
        Ok(())
    };
    let no_blk = || -> Result<(), UsageError> {
        if count.is_some() || bs.is_some() {
            return Err(usage(format!(
                "--count and --bs are for blk-randread, not {sub}"
            )));
        }
        Ok(())
    };

    let endpoint = match sub.as_str() {
        "mktap" => {
            want(1, "NAME")?;
            transfer_only("role or --bind")?;
            no_blk()?;
            return Ok(Command::MkTap {
                name: positional[0].clone(),
            });
        }
        "blk-randread" => {
            want(1, "PATH [--count N] [--bs BYTES]")?;
            transfer_only("role or --bind")?;
            return Ok(Command::BlkRandRead {
                path: PathBuf::from(&positional[0]),
                count: count.unwrap_or(1000),
                bs: bs.unwrap_or(4096),
            });
        }
        "tcp-listen" => {
            want(1, "PORT ROLE [--bind IP]")?;
            let port: u16 = parse_num("port", &positional[0])?;
            if port == 0 {
                return Err(usage("port 0 is not a port to listen on"));
            }
            Endpoint::TcpListen {
                bind: bind.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                port,
            }
        }
        "tcp-connect" => {
            want(1, "HOST:PORT ROLE")?;
            Endpoint::TcpConnect {
                hostport: positional[0].clone(),
            }
        }
        "vsock-listen" => {
            want(1, "PORT ROLE")?;
            Endpoint::VsockListen {
                port: parse_num("port", &positional[0])?,
            }
        }
        "vsock-connect" => {
            want(2, "CID PORT ROLE")?;
            Endpoint::VsockConnect {
                cid: parse_num("cid", &positional[0])?,
                port: parse_num("port", &positional[1])?,
            }
        }
        "uds-listen" => {
            want(1, "PATH ROLE")?;
            Endpoint::UdsListen {
                path: PathBuf::from(&positional[0]),
            }
        }
        "uds-connect" => {
            want(2, "UDS_PATH PORT ROLE")?;
            Endpoint::UdsConnect {
                path: PathBuf::from(&positional[0]),
                port: parse_num("port", &positional[1])?,
            }
        }
        "-h" | "--help" | "help" => return Err(usage("")),
        other => return Err(usage(format!("unknown subcommand {other:?}"))),
    };
    no_blk()?;
    if bind.is_some() && !matches!(endpoint, Endpoint::TcpListen { .. }) {
        return Err(usage("--bind is for tcp-listen"));
    }
    let role = role.ok_or_else(|| {
        usage(format!(
            "{sub} needs one of --send N, --recv N, --echo, --rtt COUNT"
        ))
    })?;
    Ok(Command::Transfer {
        endpoint,
        role,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, UsageError> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse(&v)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("3k").unwrap(), 3072);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        for bad in [
            "",
            "M",
            "-1",
            "+5",
            "1.5M",
            "16MiB",
            "2000G",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn transfer_commands() {
        assert_eq!(
            p("tcp-listen 5201 --recv 16M").unwrap(),
            Command::Transfer {
                endpoint: Endpoint::TcpListen {
                    bind: IpAddr::from([0, 0, 0, 0]),
                    port: 5201
                },
                role: Role::Recv(16 << 20),
                timeout: DEFAULT_TIMEOUT,
            }
        );
        assert_eq!(
            p("uds-connect /run/v.sock 5000 --send 1K --timeout 2.5").unwrap(),
            Command::Transfer {
                endpoint: Endpoint::UdsConnect {
                    path: "/run/v.sock".into(),
                    port: 5000
                },
                role: Role::Send(1024),
                timeout: Duration::from_millis(2500),
            }
        );
        assert_eq!(
            p("vsock-connect 2 6000 --rtt 100").unwrap(),
            Command::Transfer {
                endpoint: Endpoint::VsockConnect { cid: 2, port: 6000 },
                role: Role::Rtt(100),
                timeout: DEFAULT_TIMEOUT,
            }
        );
        assert!(matches!(
            p("vsock-listen 5000 --echo"),
            Ok(Command::Transfer {
                role: Role::Echo,
                ..
            })
        ));
        assert!(matches!(p("mktap tap0"), Ok(Command::MkTap { .. })));
        assert_eq!(
            p("blk-randread /dev/vdb --count 50").unwrap(),
            Command::BlkRandRead {
                path: "/dev/vdb".into(),
                count: 50,
                bs: 4096
            }
        );
    }

    #[test]
    fn bad_command_lines() {
        for bad in [
            "",
            "nope 1",
            "tcp-listen 5201",
            "tcp-listen 5201 --send 1 --recv 1",
            "tcp-listen 0 --recv 1",
            "tcp-listen 70000 --recv 1",
            "tcp-listen +5 --recv 1",
            "tcp-connect --send 1",
            "vsock-connect 2 --send 1",
            "uds-connect /x --send 1",
            "tcp-connect h:1 --send",
            "tcp-connect h:1 --send 1 --timeout 0",
            "tcp-connect h:1 --send 1 --timeout nan",
            "tcp-connect h:1 --send 1 --bind 1.2.3.4",
            "tcp-connect h:1 --send 1 --count 3",
            "tcp-connect h:1 --rtt 0",
            "tcp-connect h:1 --send 1 --frob",
            "mktap",
            "mktap a b",
            "mktap tap0 --send 1",
            "blk-randread /dev/vdb --count 0",
            "blk-randread /dev/vdb --echo",
        ] {
            assert!(p(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn an_option_without_its_value_is_named() {
        let e = p("tcp-connect h:1 --send 1 --timeout").unwrap_err();
        assert_eq!(e.to_string(), "--timeout needs a value");
    }
}
