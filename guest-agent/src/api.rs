//! The agent API: `ai_alloc`, `ai_free`, `ai_infer`, `ai_trace`, `ai_models`,
//! `ai_cancel`, the same whether this process drives the device itself or goes
//! through the agent daemon.
//!
//! Tensors live in [`Buffer`]s from `ai_alloc`: device-addressable memory (huge pages)
//! that the device reads and writes in place, in this process's own pool (direct) or
//! in the pool the daemon shares with this process (daemon mode). Either way no
//! tensor byte is copied between the caller and the device.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ai_infer_protocol::{CancelOutcome, DeviceConfig, ModelInfo, TensorDesc, TraceCounters};
use thiserror::Error;

use crate::chain::TensorRef;
use crate::dma::{DmaBuffer, HUGE_PAGE_SIZE};
use crate::engine::{Engine, EngineError, EngineOptions, InferOptions};
use crate::ipc::wire::WireError;
use crate::ipc::{DaemonClient, IpcError, DEFAULT_SOCKET};
use crate::stats::GuestTrace;

/// `ai_alloc` flag: zero the buffer (buffers are otherwise left as the pool had them).
pub const AI_ALLOC_ZERO: u32 = 1;

/// Errors of the API.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The device side failed (direct mode).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The daemon connection failed (daemon mode).
    #[error(transparent)]
    Ipc(#[from] IpcError),
    /// Unknown `ai_alloc` flags.
    #[error("Unknown ai_alloc flags {0:#x}")]
    BadFlags(u32),
    /// A buffer from another agent's pool.
    #[error("Tensor {0} is in a buffer that does not belong to this agent")]
    ForeignBuffer(usize),
    /// A descriptor needing more bytes than its buffer has.
    #[error("Tensor {index} needs {needed} bytes, its buffer has {got}")]
    BufferTooShort {
        /// Tensor index (inputs first).
        index: usize,
        /// Bytes the descriptor needs.
        needed: u64,
        /// Bytes in the buffer.
        got: usize,
    },
    /// No model of that name.
    #[error("No model {0:?} is available (the MODELS list has its names and ids)")]
    UnknownModel(String),
}

/// Memory for tensors, from [`Agent::ai_alloc`]. Freed when dropped (or with
/// [`Agent::ai_free`]).
#[derive(Debug)]
pub struct Buffer {
    pub(crate) dma: DmaBuffer,
}

impl Buffer {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.dma.len()
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.dma.is_empty()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.dma.as_slice()
    }

    /// The bytes, to fill inputs or read outputs.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.dma.as_mut_slice()
    }
}

/// What `ai_infer` returns: the request id used, the device's status and timings, and
/// the output shapes produced (OK) or needed (BUFFER_TOO_SMALL, BAD_TENSOR).
pub use crate::chain::InferOutcome as InferResult;

/// What `ai_trace` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    /// Counters of the process that drives the device (this one, or the daemon).
    pub guest: GuestTrace,
    /// The device's counters for this tenant (all guest processes together).
    pub device: TraceCounters,
}

/// Which way to reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The daemon if its socket exists, else the device directly.
    #[default]
    Auto,
    /// Drive the device from this process (exclusive: fails if the daemon runs).
    Direct,
    /// Go through the daemon.
    Daemon,
}

/// How to open the agent. Defaults: auto mode, socket `/run/ai-agent.sock`, 2 MiB of
/// shared memory per daemon session, default engine options.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Direct, daemon, or whichever is available.
    pub mode: Mode,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Bytes of tensor memory to ask the daemon for (multiple of 2 MiB).
    pub session_bytes: usize,
    /// Device options for direct mode.
    pub engine: EngineOptions,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            mode: Mode::Auto,
            socket: PathBuf::from(DEFAULT_SOCKET),
            session_bytes: HUGE_PAGE_SIZE,
            engine: EngineOptions::default(),
        }
    }
}

enum Backend {
    // Boxed: the engine is much larger than a client handle.
    Direct(Box<Engine>),
    Daemon(DaemonClient),
}

/// The agent: one per process.
pub struct Agent {
    backend: Backend,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("daemon", &self.is_daemon_client())
            .finish()
    }
}

impl Agent {
    /// Opens the agent as `options` say.
    pub fn open(options: &AgentOptions) -> Result<Self, ApiError> {
        let use_daemon = match options.mode {
            Mode::Auto => options.socket.exists(),
            Mode::Direct => false,
            Mode::Daemon => true,
        };
        if use_daemon {
            match DaemonClient::connect(&options.socket, options.session_bytes) {
                Ok(client) => return Ok(Agent::from_client(client)),
                // In Auto mode a socket nobody listens on is the leftover of a daemon
                // that died: drive the device directly (its lock says if that is safe).
                Err(IpcError::Wire(WireError::Io(e)))
                    if options.mode == Mode::Auto
                        && e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    log::info!(
                        "{} is stale (nothing listens): using the device directly",
                        options.socket.display()
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        match Engine::open(&options.engine) {
            Ok(engine) => Ok(Agent::from_engine(engine)),
            // The daemon owns the device but is still starting (it binds its socket
            // once the device is up): wait for the socket.
            Err(EngineError::Busy { .. }) if options.mode == Mode::Auto => {
                let deadline = Instant::now() + options.engine.device.connect_timeout;
                while !options.socket.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Agent::from_client(DaemonClient::connect(
                    &options.socket,
                    options.session_bytes,
                )?))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An agent over an engine this process already owns.
    pub fn from_engine(engine: Engine) -> Self {
        Agent {
            backend: Backend::Direct(Box::new(engine)),
        }
    }

    /// An agent over a daemon connection.
    pub fn from_client(client: DaemonClient) -> Self {
        Agent {
            backend: Backend::Daemon(client),
        }
    }

    /// Whether requests go through the daemon.
    pub fn is_daemon_client(&self) -> bool {
        matches!(self.backend, Backend::Daemon(_))
    }

    /// The device's limits for this tenant.
    pub fn config(&self) -> DeviceConfig {
        match &self.backend {
            Backend::Direct(e) => *e.config(),
            Backend::Daemon(c) => *c.config(),
        }
    }

    /// Allocates `size` bytes of tensor memory (64-byte aligned, physically
    /// contiguous). `flags`: [`AI_ALLOC_ZERO`] or 0.
    pub fn ai_alloc(&self, size: usize, flags: u32) -> Result<Buffer, ApiError> {
        if flags & !AI_ALLOC_ZERO != 0 {
            return Err(ApiError::BadFlags(flags));
        }
        let pool = match &self.backend {
            Backend::Direct(e) => e.pool(),
            Backend::Daemon(c) => c.pool(),
        };
        let mut dma = pool.alloc(size).map_err(EngineError::from)?;
        if flags & AI_ALLOC_ZERO != 0 {
            dma.as_mut_slice().fill(0);
        }
        Ok(Buffer { dma })
    }

    /// Frees a buffer (the same as dropping it).
    pub fn ai_free(&self, buffer: Buffer) {
        drop(buffer);
    }

    fn check_buffers(
        &self,
        tensors: impl Iterator<Item = (TensorDesc, usize, bool)>,
    ) -> Result<(), ApiError> {
        for (index, (desc, len, ours)) in tensors.enumerate() {
            if !ours {
                return Err(ApiError::ForeignBuffer(index));
            }
            if desc.data_len > len as u64 {
                return Err(ApiError::BufferTooShort {
                    index,
                    needed: desc.data_len,
                    got: len,
                });
            }
        }
        Ok(())
    }

    /// Runs model `model_id`. Input `i` is `inputs[i].0` with its bytes at the start
    /// of `inputs[i].1`; output `k` is written at the start of `outputs[k].1`, whose
    /// capacity is `outputs[k].0.data_len`. A non-OK status is a result, not an error.
    pub fn ai_infer(
        &self,
        model_id: u32,
        inputs: &[(TensorDesc, &Buffer)],
        outputs: &mut [(TensorDesc, &mut Buffer)],
        options: &InferOptions,
    ) -> Result<InferResult, ApiError> {
        let pool = match &self.backend {
            Backend::Direct(e) => e.pool(),
            Backend::Daemon(c) => c.pool(),
        };
        let all = inputs
            .iter()
            .map(|(d, b)| (*d, b.len(), b.dma.pool().same_pool(pool)))
            .chain(
                outputs
                    .iter()
                    .map(|(d, b)| (*d, b.len(), b.dma.pool().same_pool(pool))),
            );
        self.check_buffers(all)?;
        match &self.backend {
            Backend::Direct(engine) => {
                let refs = |t: &[(TensorDesc, &DmaBuffer)]| -> Result<Vec<TensorRef>, ApiError> {
                    t.iter()
                        .map(|(desc, b)| {
                            Ok(TensorRef {
                                desc: *desc,
                                ranges: pool
                                    .device_ranges(b.offset(), desc.data_len as usize)
                                    .map_err(EngineError::from)?,
                            })
                        })
                        .collect()
                };
                let ins: Vec<_> = inputs.iter().map(|(d, b)| (*d, &b.dma)).collect();
                let outs: Vec<_> = outputs.iter().map(|(d, b)| (*d, &b.dma)).collect();
                Ok(engine.infer(model_id, &refs(&ins)?, &refs(&outs)?, options)?)
            }
            Backend::Daemon(client) => {
                let ins: Vec<_> = inputs.iter().map(|(d, b)| (*d, b.dma.offset())).collect();
                let outs: Vec<_> = outputs.iter().map(|(d, b)| (*d, b.dma.offset())).collect();
                Ok(client.infer(model_id, &ins, &outs, options)?)
            }
        }
    }

    /// The models this tenant may use.
    pub fn ai_models(&self) -> Result<Vec<ModelInfo>, ApiError> {
        Ok(match &self.backend {
            Backend::Direct(e) => e.models()?,
            Backend::Daemon(c) => c.models()?,
        })
    }

    /// The model named `name_or_id`, or else whose MODELS id it is.
    pub fn find_model(&self, name_or_id: &str) -> Result<ModelInfo, ApiError> {
        let mut models = self.ai_models()?;
        let by_id = name_or_id.parse::<u32>().ok();
        let index = models
            .iter()
            .position(|m| m.name == name_or_id)
            .or_else(|| models.iter().position(|m| Some(m.id) == by_id))
            .ok_or_else(|| ApiError::UnknownModel(name_or_id.to_string()))?;
        Ok(models.swap_remove(index))
    }

    /// Guest-side and device-side counters.
    pub fn ai_trace(&self) -> Result<Trace, ApiError> {
        Ok(match &self.backend {
            Backend::Direct(e) => Trace {
                guest: e.guest_trace(),
                device: e.device_trace()?,
            },
            Backend::Daemon(c) => c.trace()?,
        })
    }

    /// Cancels the in-flight request `request_id` (give it in [`InferOptions`] to
    /// know it in advance).
    pub fn ai_cancel(&self, request_id: u64) -> Result<CancelOutcome, ApiError> {
        Ok(match &self.backend {
            Backend::Direct(e) => e.cancel(request_id)?,
            Backend::Daemon(c) => c.cancel(request_id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::fake_engine;
    use crate::testing::FakeDeviceBehaviour;
    use ai_infer_protocol::{DType, Status};

    #[test]
    fn auto_mode_treats_a_socket_nobody_listens_on_as_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let socket = dir.join("agent.sock");
        // A daemon that died leaves its socket file behind.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let options = |mode| AgentOptions {
            mode,
            socket: socket.clone(),
            engine: EngineOptions {
                sysfs_root: dir.join("no-sysfs"),
                lock_path: dir.join("agent.lock"),
                ..EngineOptions::default()
            },
            ..AgentOptions::default()
        };
        // Auto goes on to the device (which this host does not have)...
        let auto = Agent::open(&options(Mode::Auto)).unwrap_err();
        assert!(matches!(auto, ApiError::Engine(_)), "{auto}");
        // ...while a required daemon reports the refused connection.
        let daemon = Agent::open(&options(Mode::Daemon)).unwrap_err();
        assert!(matches!(daemon, ApiError::Ipc(_)), "{daemon}");
    }

    #[test]
    fn direct_agent_end_to_end() {
        let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let agent = Agent::from_engine(engine);
        assert!(matches!(agent.ai_alloc(16, 2), Err(ApiError::BadFlags(2))));
        let mut input = agent.ai_alloc(16, AI_ALLOC_ZERO).unwrap();
        input.as_mut_slice()[..4].copy_from_slice(&1.5f32.to_le_bytes());
        let mut output = agent.ai_alloc(64, 0).unwrap();
        let model = agent.find_model("double").unwrap();
        assert_eq!(agent.find_model(&model.id.to_string()).unwrap(), model);
        let res = agent
            .ai_infer(
                model.id,
                &[(TensorDesc::input(DType::F32, &[1, 4]).unwrap(), &input)],
                &mut [(
                    TensorDesc::output(DType::F32, &[1, 0], 64).unwrap(),
                    &mut output,
                )],
                &InferOptions::default(),
            )
            .unwrap();
        assert_eq!(res.status, Status::Ok);
        assert_eq!(output.as_slice()[..4], 3.0f32.to_le_bytes());
        assert_eq!(agent.ai_trace().unwrap().device.infer_status[0], 1);
        assert!(matches!(
            agent.find_model("nope"),
            Err(ApiError::UnknownModel(_))
        ));
    }

    #[test]
    fn rejects_short_and_foreign_buffers() {
        let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let agent = Agent::from_engine(engine);
        let (_fake2, other) = fake_engine(FakeDeviceBehaviour::default());
        let other = Agent::from_engine(other);
        let input = agent.ai_alloc(8, 0).unwrap();
        let mut output = agent.ai_alloc(64, 0).unwrap();
        let desc = TensorDesc::input(DType::F32, &[1, 4]).unwrap();
        let out = TensorDesc::output(DType::F32, &[1, 0], 64).unwrap();
        let err = agent
            .ai_infer(
                1,
                &[(desc, &input)],
                &mut [(out, &mut output)],
                &InferOptions::default(),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::BufferTooShort {
                    index: 0,
                    needed: 16,
                    got: 8
                }
            ),
            "{err}"
        );
        let foreign = other.ai_alloc(16, 0).unwrap();
        let err = agent
            .ai_infer(
                1,
                &[(desc, &foreign)],
                &mut [(out, &mut output)],
                &InferOptions::default(),
            )
            .unwrap_err();
        assert!(matches!(err, ApiError::ForeignBuffer(0)), "{err}");
    }
}
