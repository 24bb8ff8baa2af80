//! `rig-io proxy`: accepts TCP connections on a local port and forwards each to a target
//! (a tenant's TCP address or its hybrid vsock port), bytes as they are, both ways. The rig
//! and the demo put tenants' endpoints on L1's (and so the host's) loopback with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Target;
use crate::conn::{Conn, Listener, NetError};

/// Connections forwarded at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;

/// Forwards until the process is stopped; returns only when listening fails.
pub fn run(listen: SocketAddr, target: &Target, idle: Duration) -> Result<(), String> {
    // Accept waits in slices so that a failing listener is noticed; connections get `idle`.
    let listener = Listener::tcp(listen, Duration::from_secs(3600)).map_err(|e| e.to_string())?;
    println!("RIG-IO proxy listen={listen} target={target} ok=1");
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let client = match listener.accept() {
            Ok(c) => c,
            Err(NetError::Timeout { .. }) => continue,
            Err(e) => {
                eprintln!("rig-io proxy: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            eprintln!("rig-io proxy: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let target = target.clone();
        let live = Arc::clone(&live);
        std::thread::spawn(move || {
            if let Err(e) = forward(client, &target, idle) {
                eprintln!("rig-io proxy: {target}: {e}");
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One client connection, both ways, until both sides have ended.
fn forward(client: Conn, target: &Target, idle: Duration) -> Result<(), String> {
    let upstream = target.connect(idle.min(Duration::from_secs(30)))?;
    let (c_read, c_write) = (client.try_clone().map_err(|e| e.to_string())?, client);
    let (u_read, u_write) = (upstream.try_clone().map_err(|e| e.to_string())?, upstream);
    let back = std::thread::spawn(move || pump(u_read, c_write));
    pump(c_read, u_write);
    let _ = back.join();
    Ok(())
}

/// Copies `from` to `to` until end of stream or an error, then ends `to`'s direction.
fn pump(mut from: Conn, mut to: Conn) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown_write();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn forwards_both_ways_and_passes_end_of_stream() {
        // The upstream echoes what it reads, upper-cased, then closes.
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in up.incoming() {
                let mut s = s.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(&got.to_ascii_uppercase()).unwrap();
            }
        });
        // A free port for the proxy.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let target = Target::Tcp(up_addr);
        std::thread::spawn(move || run(listen, &target, Duration::from_secs(10)));
        for round in 0..3 {
            let mut s = loop {
                if let Ok(s) = TcpStream::connect(listen) {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let msg = format!("hello {round} through the proxy");
            s.write_all(msg.as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = String::new();
            s.read_to_string(&mut back).unwrap();
            assert_eq!(back, msg.to_uppercase());
        }
    }
}
