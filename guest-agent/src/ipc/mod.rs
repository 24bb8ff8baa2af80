//! The agent daemon and its clients: several guest processes share the device
//! through one owner, with tensors in memory shared with the daemon (no copies).

mod client;
mod fdpass;
mod server;
pub mod wire;

use ai_infer_protocol::{ProtocolError, Status};
use thiserror::Error;

pub use client::DaemonClient;
pub use server::{Daemon, DaemonOptions, SessionMemory};

use crate::dma::DmaError;
use crate::engine::EngineError;
use wire::WireError;

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/ai-agent.sock";

/// Errors between clients and the daemon.
#[derive(Debug, Error)]
pub enum IpcError {
    /// The socket or a frame failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An ai_infer structure failed to encode or decode.
    #[error("ai_infer structure in agent message: {0}")]
    Protocol(#[from] ProtocolError),
    /// Mapping the session memory failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The device side failed in the daemon.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The daemon refused the request.
    #[error("Agent daemon refused the request ({}): {message}", status.map_or("error", Status::name))]
    Daemon {
        /// The ai_infer status it maps to, if any.
        status: Option<Status>,
        /// The daemon's explanation.
        message: String,
    },
    /// A reply of the wrong kind.
    #[error("Agent daemon sent an unexpected message of kind {0}")]
    Unexpected(u32),
    /// The session reply came without its memory descriptor.
    #[error("Agent daemon sent no memory descriptor with the session")]
    NoDescriptor,
    /// A reply that does not fit the request.
    #[error("Agent daemon reply invalid: {0}")]
    BadResponse(String),
    /// A tensor outside the client's session memory.
    #[error("Tensor {index} at offset {offset:#x} with {len} bytes is outside the session memory")]
    OutsideSession {
        /// Tensor index (inputs first).
        index: usize,
        /// Offset given.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Agent, ApiError};
    use crate::engine::tests::fake_engine;
    use crate::engine::InferOptions;
    use crate::testing::{FakeDeviceBehaviour, FakeVirtioPci};
    use ai_infer_protocol::{CancelOutcome, DType, TensorDesc};
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    const MIB2: usize = 2 << 20;

    /// A daemon over a fake device, serving on a socket in a temp dir (removed when the
    /// returned guard drops); session memory is a shareable fake pool the fake device can
    /// reach.
    fn daemon() -> (FakeVirtioPci, std::path::PathBuf, tempfile::TempDir) {
        let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let dir = tempfile::Builder::new()
            .prefix("ga-ipc-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("agent.sock");
        let f2 = fake.clone();
        let base = std::sync::atomic::AtomicU64::new(0x8000_0000);
        let memory: Box<SessionMemory> = Box::new(move |bytes| {
            let pages = bytes / 4096;
            let start = base.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
            let addrs: Vec<u64> = (0..pages as u64).map(|i| start + i * 4096).collect();
            let pool = crate::dma::DmaPool::fake_shareable(4096, &addrs)?;
            f2.state().extra_pools.push(pool.clone());
            Ok(pool)
        });
        let opts = DaemonOptions {
            socket: socket.clone(),
            max_session_bytes: 2 * MIB2,
        };
        let d = Arc::new(Daemon::new(Arc::new(engine), opts, memory));
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || d.serve(listener));
        (fake, socket, dir)
    }

    #[test]
    fn clients_infer_in_shared_memory_through_the_daemon() {
        let (fake, socket, _dir) = daemon();
        let agent = Agent::from_client(DaemonClient::connect(&socket, MIB2).unwrap());
        assert!(agent.is_daemon_client());
        let model = agent.find_model("text-stats").unwrap();
        let text = b"hello daemon";
        let mut input = agent.ai_alloc(text.len(), 0).unwrap();
        input.as_mut_slice().copy_from_slice(text);
        let mut output = agent.ai_alloc(16, 0).unwrap();
        let res = agent
            .ai_infer(
                model.id,
                &[(
                    TensorDesc::input(DType::U8, &[text.len() as u64]).unwrap(),
                    &input,
                )],
                &mut [(
                    TensorDesc::output(DType::F32, &[1, 4], 16).unwrap(),
                    &mut output,
                )],
                &InferOptions {
                    request_id: Some(5),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            (res.status, res.request_id),
            (ai_infer_protocol::Status::Ok, 5)
        );
        let stats: Vec<f32> = output
            .as_slice()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            stats,
            vec![12.0, text.iter().map(|b| f32::from(*b)).sum(), 104.0, 110.0]
        );
        // The device read the client's memory in place: the daemon's id, not the client's.
        assert_ne!(fake.state().seen, vec![5]);
        let trace = agent.ai_trace().unwrap();
        assert_eq!(
            (trace.guest.completed, trace.device.infer_status[0]),
            (1, 1)
        );
        assert_eq!(agent.ai_cancel(5).unwrap(), CancelOutcome::NotFound);

        // A second thread of the same client runs on its own connection.
        let agent = Arc::new(agent);
        let a2 = agent.clone();
        let t = std::thread::spawn(move || a2.ai_models().unwrap().len());
        assert_eq!(agent.ai_models().unwrap().len(), 2);
        assert_eq!(t.join().unwrap(), 2);
    }

    /// Like a shell loop of `ai-agent infer`: one short-lived client after another, each
    /// with its own session, must all be served (no descriptor, session or id leak).
    #[test]
    fn hundreds_of_short_lived_clients_are_all_served() {
        let (_fake, socket, _dir) = daemon();
        for round in 0..300u64 {
            let agent = Agent::from_client(DaemonClient::connect(&socket, MIB2).unwrap());
            let model = agent.find_model("text-stats").unwrap();
            let mut input = agent.ai_alloc(4, 0).unwrap();
            input.as_mut_slice().copy_from_slice(b"abcd");
            let mut output = agent.ai_alloc(16, 0).unwrap();
            let res = agent
                .ai_infer(
                    model.id,
                    &[(TensorDesc::input(DType::U8, &[4]).unwrap(), &input)],
                    &mut [(
                        TensorDesc::output(DType::F32, &[1, 4], 16).unwrap(),
                        &mut output,
                    )],
                    &InferOptions::default(),
                )
                .unwrap_or_else(|e| panic!("client {round}: {e}"));
            assert_eq!(res.status, ai_infer_protocol::Status::Ok, "client {round}");
        }
    }

    #[test]
    fn daemon_refuses_bad_sessions_and_foreign_offsets() {
        let (_fake, socket, _dir) = daemon();
        for bytes in [0, 4096, 4 * MIB2] {
            let err = DaemonClient::connect(&socket, bytes).unwrap_err();
            assert!(matches!(err, IpcError::Daemon { .. }), "{bytes}: {err}");
        }
        let client = DaemonClient::connect(&socket, MIB2).unwrap();
        let desc = TensorDesc::input(DType::U8, &[8]).unwrap();
        let out = TensorDesc::output(DType::F32, &[1, 4], 16).unwrap();
        let err = client
            .infer(
                2,
                &[(desc, MIB2 - 4)],
                &[(out, 0)],
                &InferOptions::default(),
            )
            .unwrap_err();
        assert!(
            matches!(err, IpcError::Daemon { ref message, .. } if message.contains("outside")),
            "{err}"
        );
        // The API refuses offsets of buffers that are not in the session before asking.
        let agent = Agent::from_client(client);
        let (_f, engine) = fake_engine(FakeDeviceBehaviour::default());
        let other = Agent::from_engine(engine);
        let foreign = other.ai_alloc(8, 0).unwrap();
        let mut o = agent.ai_alloc(16, 0).unwrap();
        let err = agent
            .ai_infer(
                2,
                &[(desc, &foreign)],
                &mut [(out, &mut o)],
                &InferOptions::default(),
            )
            .unwrap_err();
        assert!(matches!(err, ApiError::ForeignBuffer(0)));
    }
}
