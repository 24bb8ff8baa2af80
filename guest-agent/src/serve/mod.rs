//! `ai-agent serve`: an inference HTTP endpoint inside the guest, over TCP and vsock.
//!
//! It speaks the Open Inference Protocol (KServe v2 REST, with Triton's binary tensor
//! data extension) and OpenAI's `/v1/embeddings`, and exports its own counters at
//! `/metrics`. One thread per connection (capped); each request is one device request
//! (one per input string for embeddings), so concurrent clients reach the device
//! together and it can batch them. The device is reached through the agent API, in
//! direct or daemon mode.

pub mod backend;
pub mod error;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod oip;
pub mod openai;
pub mod options;
pub mod server;
pub mod tensor;
pub mod vsock;

use std::io;
use std::sync::Arc;

pub use backend::InferBackend;
pub use error::ServeError;
pub use http::Limits;
pub use listen::{ListenAddr, Listener};
pub use server::{ServeOptions, Server};

/// Binds every address, prints `listening on ADDR` for each (with the port chosen
/// for port 0), and serves them all; returns only if binding fails.
pub fn run(
    backend: Arc<dyn InferBackend>,
    addrs: &[ListenAddr],
    options: ServeOptions,
) -> io::Result<()> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for a in addrs {
        let l = Listener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?;
        println!("listening on {}", l.local_addr()?);
        listeners.push(l);
    }
    let server = Arc::new(Server::new(backend, options));
    let last = listeners
        .pop()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no listen address"))?;
    for l in listeners {
        server.spawn(l)?;
    }
    server.serve(last);
    Ok(())
}
