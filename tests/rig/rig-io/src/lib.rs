//! rig-io: the small tool the test rig runs on both ends of a tenant I/O check (L1 or the
//! host, and the L2 guest) to move a known byte stream over TCP (virtio-net), AF_VSOCK and
//! Firecracker's hybrid vsock unix socket, and to create the tap aivmm's virtio-net uses.
//!
//! * [`pattern`]: the deterministic stream, its verifier and checksum;
//! * [`conn`]: sockets with a timeout on every blocking step;
//! * [`hybrid`]: the `CONNECT <port>` / `OK <port>` exchange of hybrid vsock;
//! * [`transfer`]: send, receive, echo and round trips, and the `RIG-IO` result line;
//! * [`sys`]: tap creation and O_DIRECT random reads;
//! * [`http`]: one HTTP request, an HTTP load, and a TCP forwarder to a tenant's endpoint;
//! * [`cli`]: the command line.

pub mod cli;
pub mod conn;
pub mod http;
pub mod hybrid;
pub mod pattern;
pub mod sys;
pub mod transfer;

#[cfg(test)]
mod test_sock;
