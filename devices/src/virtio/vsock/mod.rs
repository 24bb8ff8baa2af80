//! virtio-vsock with Firecracker's hybrid host side (virtio 1.2 §5.10).
//!
//! The guest sees a standard vsock device; on the host, its stream sockets map to unix
//! sockets, as in Firecracker's `docs/vsock.md`:
//!
//! - **Host → guest**: a host process connects to `uds_path`, writes `CONNECT <port>\n`
//!   and, once the guest accepted, reads `OK <host port>\n`; the stream then carries the
//!   connection's data. The device picks the host-side port (from 2^30 up).
//! - **Guest → host**: a guest connection to CID 2, port `P` is forwarded to a unix
//!   socket listening at `<uds_path>_P`; if there is none the guest gets a reset.
//!
//! Only stream sockets exist. Data flow respects the credit each side advertises, so a
//! slow peer on either side slows its sender instead of growing buffers (`connection`).
//! One worker thread does all socket and queue I/O (`muxer`).
//!
//! Closing: a host peer's end of stream becomes `OP_SHUTDOWN` with the "send" flag (a
//! half close: the guest may still send, as with `shutdown(SHUT_WR)`); a guest shutdown
//! of both directions is answered with `OP_RST` once its buffered data reached the
//! host (or after a short timeout); either side's reset closes the other.

mod connection;
mod device;
mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

pub use connection::BUF_ALLOC;
pub use device::{Vsock, VsockError};
pub use muxer::{
    EVENT_QUEUE, FIRST_LOCAL_PORT, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECT_LINE,
    REQUEST_TIMEOUT, RX_QUEUE, TX_QUEUE,
};

/// Number of queues: rx (device → guest), tx (guest → device), event.
pub const NUM_QUEUES: usize = 3;
/// Largest ring size the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// How a vsock device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0–2 are reserved, 2^32 − 1 means "any").
    pub guest_cid: u64,
    /// The unix socket host processes connect to; guest connections to port `P` go to
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Counters a running device keeps (relaxed atomics: statistics only).
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Connections established, in both directions.
    pub connections: AtomicU64,
    /// Stream bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Stream bytes received from the guest.
    pub tx_bytes: AtomicU64,
    /// `OP_RST` packets sent to the guest.
    pub resets_sent: AtomicU64,
    /// Guest packets or buffers the device could not use (malformed, misaddressed,
    /// over credit, too small).
    pub bad_packets: AtomicU64,
    /// Host connections closed before or during their `CONNECT` line.
    pub handshake_failures: AtomicU64,
}
