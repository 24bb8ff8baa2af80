//! rig-io: moves a known byte stream over TCP, vsock or hybrid vsock and prints one
//! machine-readable `RIG-IO` line; also creates taps and reads disks at random. See
//! `rig-io --help` and the library's modules.

use std::process::ExitCode;
use std::time::Duration;

use rig_io::cli::{self, Command, Endpoint};
use rig_io::conn::{self, Conn, Listener, NetError};
use rig_io::http::cli::HttpCommand;
use rig_io::http::{client::Client, load, proxy};
use rig_io::pattern::Pattern;
use rig_io::transfer::{self, Report, Role};
use rig_io::{http, hybrid, sys};

#[cfg(test)]
mod test_sock;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            if !e.0.is_empty() {
                eprintln!("rig-io: {e}");
            }
            eprintln!("{}\n{}", cli::USAGE, http::cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match cmd {
        Command::MkTap { name } => match sys::make_tap(&name) {
            Ok(()) => {
                println!("RIG-IO mktap name={name} ok=1");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("RIG-IO mktap name={name} ok=0");
                eprintln!("rig-io mktap: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BlkRandRead { path, count, bs } => match sys::random_reads(&path, count, bs) {
            Ok(r) => {
                println!(
                    "RIG-IO blk-randread count={} bs={} secs={:.6} iops={:.1} p50_us={} p99_us={} max_us={} ok=1",
                    r.count,
                    r.bs,
                    r.secs,
                    r.iops(),
                    transfer::percentile(&r.samples_us, 50),
                    transfer::percentile(&r.samples_us, 99),
                    r.samples_us.last().copied().unwrap_or(0)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("RIG-IO blk-randread count=0 bs={bs} secs=0 iops=0 p50_us=0 p99_us=0 max_us=0 ok=0");
                eprintln!("rig-io blk-randread: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Http(cmd) => run_http(cmd),
        Command::Transfer {
            endpoint,
            role,
            timeout,
        } => {
            let sub = subcommand(&endpoint);
            let report = transfer_on(&endpoint, role, timeout);
            println!("{}", report.line(sub));
            match report.error() {
                None => ExitCode::SUCCESS,
                Some(e) => {
                    eprintln!("rig-io {sub}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_http(cmd: HttpCommand) -> ExitCode {
    match cmd {
        HttpCommand::One {
            target,
            request,
            out,
            timeout,
        } => {
            let t = std::time::Instant::now();
            let result = Client::new(target, timeout).send(&request);
            let us = t.elapsed().as_micros();
            match result {
                Ok(resp) => {
                    let line = format!(
                        "RIG-IO http status={} bytes={} us={us} ok=1",
                        resp.status,
                        resp.body.len()
                    );
                    let written = match &out {
                        Some(p) => std::fs::write(p, &resp.body)
                            .map_err(|e| format!("{}: {e}", p.display())),
                        None => {
                            use std::io::Write;
                            std::io::stdout()
                                .write_all(&resp.body)
                                .map_err(|e| e.to_string())
                        }
                    };
                    if out.is_some() {
                        println!("{line}");
                    } else {
                        eprintln!("{line}");
                    }
                    match written {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("rig-io http: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    let line = format!("RIG-IO http status=0 bytes=0 us={us} ok=0");
                    if out.is_some() {
                        println!("{line}");
                    } else {
                        eprintln!("{line}");
                    }
                    eprintln!("rig-io http: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        HttpCommand::Load(spec) => {
            let r = load::run(&spec);
            println!("{}", r.line(spec.concurrency));
            if let Some(e) = &r.first_error {
                eprintln!("rig-io http-load: first error: {e}");
            }
            if r.answered() > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        HttpCommand::Proxy {
            listen,
            target,
            timeout,
        } => match proxy::run(listen, &target, timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("RIG-IO proxy listen={listen} target={target} ok=0");
                eprintln!("rig-io proxy: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn subcommand(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::TcpListen { .. } => "tcp-listen",
        Endpoint::TcpConnect { .. } => "tcp-connect",
        Endpoint::VsockListen { .. } => "vsock-listen",
        Endpoint::VsockConnect { .. } => "vsock-connect",
        Endpoint::UdsListen { .. } => "uds-listen",
        Endpoint::UdsConnect { .. } => "uds-connect",
    }
}

/// Sets up the connection, then runs the role on it.
fn transfer_on(endpoint: &Endpoint, role: Role, timeout: Duration) -> Report {
    // Built before the connection: its cost must not count in the measured time.
    let pattern = Pattern::new();
    let conn: Result<Conn, String> = match endpoint {
        Endpoint::TcpListen { bind, port } => accept_one(Listener::tcp(
            std::net::SocketAddr::new(*bind, *port),
            timeout,
        )),
        Endpoint::TcpConnect { hostport } => conn::resolve(hostport)
            .and_then(|addr| conn::tcp_connect(addr, timeout))
            .map_err(|e| e.to_string()),
        Endpoint::VsockListen { port } => accept_one(Listener::vsock(*port, timeout)),
        Endpoint::VsockConnect { cid, port } => {
            conn::vsock_connect(*cid, *port, timeout).map_err(|e| e.to_string())
        }
        Endpoint::UdsListen { path } => accept_one(Listener::unix(path, timeout)),
        Endpoint::UdsConnect { path, port } => hybrid::connect(path, *port, timeout)
            .map(|(c, _host_port)| c)
            .map_err(|e| e.to_string()),
    };
    match conn {
        Ok(mut c) => transfer::run(&mut c, role, &pattern),
        Err(e) => Report::failed(role, e),
    }
}

fn accept_one(listener: Result<Listener, NetError>) -> Result<Conn, String> {
    listener.and_then(|l| l.accept()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::test_sock::sock_path;
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixListener;
    use std::thread;

    const STEP: Duration = Duration::from_secs(20);

    /// A hybrid-vsock VMM with a guest behind it: accepts one connection, expects
    /// `CONNECT <port>\n`, answers `OK 1073741824\n`, then plays `guest` on the stream.
    fn fake_vmm(path: &std::path::Path, port: u32, guest: Role) -> thread::JoinHandle<Report> {
        let l = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            assert_eq!(req, format!("CONNECT {port}\n"));
            // Nothing else may have been sent before the answer.
            assert!(r.buffer().is_empty());
            let mut s = r.into_inner();
            s.write_all(b"OK 1073741824\n").unwrap();
            let mut c = Conn::new(OwnedFd::from(s), STEP).unwrap();
            transfer::run(&mut c, guest, &Pattern::new())
        })
    }

    fn stream(r: &Report) -> (u64, u64) {
        match r {
            Report::Stream {
                bytes,
                checksum,
                error: None,
                ..
            } => (*bytes, *checksum),
            other => panic!("failed: {other:?}"),
        }
    }

    #[test]
    fn uds_connect_sends_to_the_guest() {
        let (_dir, p) = sock_path("send.sock");
        let n = 2 * 1024 * 1024 + 3;
        let guest = fake_vmm(&p, 5, Role::Recv(n));
        let host = transfer_on(
            &Endpoint::UdsConnect { path: p, port: 5 },
            Role::Send(n),
            STEP,
        );
        let g = guest.join().unwrap();
        assert_eq!(stream(&host), stream(&g));
        assert_eq!(stream(&g).0, n);
        assert!(host
            .line("uds-connect")
            .starts_with("RIG-IO uds-connect bytes=2097155 checksum="));
    }

    #[test]
    fn uds_connect_receives_from_the_guest() {
        let (_dir, p) = sock_path("recv.sock");
        let guest = fake_vmm(&p, 5, Role::Send(100_000));
        let host = transfer_on(
            &Endpoint::UdsConnect { path: p, port: 5 },
            Role::Recv(100_000),
            STEP,
        );
        assert_eq!(stream(&host), stream(&guest.join().unwrap()));
    }

    #[test]
    fn uds_connect_rtt_against_a_guest_echo() {
        let (_dir, p) = sock_path("rtt.sock");
        let guest = fake_vmm(&p, 5, Role::Echo);
        let host = transfer_on(
            &Endpoint::UdsConnect { path: p, port: 5 },
            Role::Rtt(20),
            STEP,
        );
        assert_eq!(host.error(), None);
        assert!(
            host.line("uds-connect").starts_with("RIG-IO rtt count=20 "),
            "{}",
            host.line("uds-connect")
        );
        assert_eq!(stream(&guest.join().unwrap()).0, 20 * 64);
    }

    #[test]
    fn uds_connect_fails_on_a_bad_reply() {
        let (_dir, p) = sock_path("bad.sock");
        let l = UnixListener::bind(&p).unwrap();
        let vmm = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            r.get_mut().write_all(b"ERR no\n").unwrap();
        });
        let host = transfer_on(
            &Endpoint::UdsConnect { path: p, port: 5 },
            Role::Send(10),
            STEP,
        );
        vmm.join().unwrap();
        let e = host.error().expect("a bad reply fails");
        assert!(e.contains("not 'OK <port>'"), "{e}");
        assert!(host.line("uds-connect").contains(" ok=0 "));
    }

    #[test]
    fn uds_listen_receives_what_the_guest_sends() {
        // The VMM connects to <uds_path>_<port> when the guest connects to CID 2: here a
        // thread that waits for the socket to appear and sends the pattern.
        let (_dir, p) = sock_path("v.sock_6000");
        // A stale socket file from an earlier run.
        drop(UnixListener::bind(&p).unwrap());
        let n = 300_000;
        let target = p.clone();
        let vmm = thread::spawn(move || {
            let mut c = conn::unix_connect(&target, STEP).unwrap();
            transfer::run(&mut c, Role::Send(n), &Pattern::new())
        });
        let host = transfer_on(
            &Endpoint::UdsListen { path: p.clone() },
            Role::Recv(n),
            STEP,
        );
        assert_eq!(stream(&host), stream(&vmm.join().unwrap()));
        assert!(!p.exists(), "the listener removes its socket");
    }

    #[test]
    fn tcp_endpoints_over_loopback() {
        // Port 0 cannot be asked for on the command line: find a free port first.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let server = thread::spawn(move || {
            transfer_on(
                &Endpoint::TcpListen {
                    bind: std::net::IpAddr::from([127, 0, 0, 1]),
                    port,
                },
                Role::Recv(1 << 20),
                STEP,
            )
        });
        let client = transfer_on(
            &Endpoint::TcpConnect {
                hostport: format!("127.0.0.1:{port}"),
            },
            Role::Send(1 << 20),
            STEP,
        );
        assert_eq!(stream(&client), stream(&server.join().unwrap()));
    }
}
