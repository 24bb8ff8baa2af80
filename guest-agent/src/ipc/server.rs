//! The agent daemon: owns the device (an [`Engine`]) and serves guest processes over a
//! unix socket.
//!
//! Each client session gets its own memory (huge pages, mapped by the daemon to know
//! their physical addresses, and passed to the client with SCM_RIGHTS). Clients put
//! tensors there and name them by offset; the daemon checks each offset against the
//! session's memory, turns it into device addresses, and submits. The device then
//! reads and writes the client's memory in place. A client can reach only its own
//! session's memory through the daemon.
//!
//! One thread per connection, one request at a time per connection; a client with
//! several threads opens several connections to one session (ATTACH), so its requests
//! are in flight together and the device can batch them.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use ai_infer_protocol::{CancelOutcome, ModelList, Status, TraceCounters};

use super::fdpass::send_with_fd;
use super::wire::{
    kind, Frame, InferMessage, SessionInfo, WireError, IPC_VERSION, MAX_REQUEST_FRAME,
};
use super::IpcError;
use crate::chain::{ChainError, TensorRef};
use crate::dma::{DmaError, DmaPool, HUGE_PAGE_SIZE};
use crate::engine::{Engine, EngineError, InferOptions};

/// Pause after a failed accept (e.g. out of descriptors) before trying again.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Makes the memory of a new session (huge pages normally; fakes in tests).
pub type SessionMemory = dyn Fn(usize) -> Result<DmaPool, DmaError> + Send + Sync;

/// Daemon settings. Defaults: socket `/run/ai-agent.sock`, sessions of up to 64 MiB.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Where to listen.
    pub socket: PathBuf,
    /// Largest session a client may ask for.
    pub max_session_bytes: usize,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            socket: PathBuf::from(super::DEFAULT_SOCKET),
            max_session_bytes: 32 * HUGE_PAGE_SIZE,
        }
    }
}

struct Session {
    token: u64,
    pool: DmaPool,
    /// The client's request ids in flight -> the daemon's (for CANCEL).
    ids: Mutex<HashMap<u64, u64>>,
}

impl Session {
    /// Records the client's `client_id` as in flight under `daemon_id` until the guard
    /// drops; an id already in flight in this session is refused (as direct mode does).
    fn begin(&self, client_id: u64, daemon_id: u64) -> Result<SessionId<'_>, IpcError> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.contains_key(&client_id) {
            return Err(EngineError::DuplicateRequestId(client_id).into());
        }
        ids.insert(client_id, daemon_id);
        Ok(SessionId {
            session: self,
            client_id,
        })
    }
}

/// A client request id in flight in a session; removed on drop, however the request ends.
struct SessionId<'a> {
    session: &'a Session,
    client_id: u64,
}

impl Drop for SessionId<'_> {
    fn drop(&mut self) {
        self.session
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.client_id);
    }
}

/// The daemon.
pub struct Daemon {
    engine: Arc<Engine>,
    options: DaemonOptions,
    memory: Box<SessionMemory>,
    sessions: Mutex<HashMap<u64, Weak<Session>>>,
}

fn random_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // Without entropy, still unique per process lifetime; tokens only keep honest
        // clients apart, they are not a security boundary inside one guest.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

fn error_frame(status: Option<Status>, message: impl std::fmt::Display) -> Frame {
    Frame::new(kind::ERROR)
        .u32(status.map_or(0, u32::from))
        .bytes(message.to_string().as_bytes())
}

impl Daemon {
    /// A daemon over `engine`; `memory` makes each session's memory.
    pub fn new(engine: Arc<Engine>, options: DaemonOptions, memory: Box<SessionMemory>) -> Self {
        Daemon {
            engine,
            options,
            memory,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Binds the socket (replacing a stale one) and serves until the listener fails.
    pub fn run(self: Arc<Self>) -> Result<(), IpcError> {
        let path = &self.options.socket;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(WireError::from)?;
        // Root only: the daemon hands out device access.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(WireError::from)?;
        log::info!("agent daemon listening on {}", path.display());
        self.serve(listener)
    }

    /// Serves connections from `listener`.
    pub fn serve(self: Arc<Self>, listener: UnixListener) -> Result<(), IpcError> {
        for conn in listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                // A broken listener ends the daemon...
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::EINVAL)) => {
                    return Err(WireError::from(e).into())
                }
                // ...but clients exhausting descriptors or memory must not: the others
                // keep being served once some connections close.
                Err(e) => {
                    log::warn!("agent daemon: accept failed: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("agent-client".into())
                .spawn(move || {
                    if let Err(e) = me.serve_connection(&stream) {
                        log::debug!("agent client connection ended: {e}");
                    }
                });
            if let Err(e) = spawned {
                // The connection is dropped (closed) with the closure.
                log::warn!("agent daemon: no thread for a client: {e}");
            }
        }
        Ok(())
    }

    fn open_session(&self, f: &Frame) -> Result<Arc<Session>, Frame> {
        let mut r = f.reader();
        let (version, bytes) = match (r.u32(), r.u64()) {
            (Ok(v), Ok(b)) if r.finish().is_ok() => (v, b),
            _ => return Err(error_frame(Some(Status::BadRequest), "malformed HELLO")),
        };
        if version != IPC_VERSION {
            return Err(error_frame(
                None,
                format!(
                    "socket protocol {version} not supported, this daemon speaks {IPC_VERSION}"
                ),
            ));
        }
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        if bytes == 0 || bytes % HUGE_PAGE_SIZE != 0 || bytes > self.options.max_session_bytes {
            return Err(error_frame(
                Some(Status::BadRequest),
                format!(
                    "session of {bytes} bytes: must be a multiple of 2 MiB up to {}",
                    self.options.max_session_bytes
                ),
            ));
        }
        let pool = (self.memory)(bytes)
            .map_err(|e| error_frame(None, format!("cannot make session memory: {e}")))?;
        let session = Arc::new(Session {
            token: random_token(),
            pool,
            ids: Mutex::new(HashMap::new()),
        });
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.strong_count() > 0);
        sessions.insert(session.token, Arc::downgrade(&session));
        Ok(session)
    }

    fn session_info(&self, s: &Session) -> Result<Frame, WireError> {
        SessionInfo {
            token: s.token,
            pool_len: s.pool.len() as u64,
            page_size: s.pool.page_size() as u64,
            config: *self.engine.config(),
            segments: s.pool.segments(),
        }
        .to_frame()
    }

    fn serve_connection(&self, stream: &UnixStream) -> Result<(), IpcError> {
        let first = Frame::read_from(&mut &*stream, MAX_REQUEST_FRAME)?;
        let session = match first.kind {
            kind::HELLO => match self.open_session(&first) {
                Ok(s) => {
                    let reply = self.session_info(&s)?.encode()?;
                    let fd = s.pool.fd().ok_or(IpcError::NoDescriptor)?;
                    send_with_fd(stream, &reply, fd.as_fd()).map_err(WireError::from)?;
                    s
                }
                Err(reply) => return Ok(reply.write_to(&mut &*stream)?),
            },
            kind::ATTACH => {
                let token = first.reader().u64()?;
                let found = self
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&token)
                    .and_then(Weak::upgrade);
                match found {
                    Some(s) => {
                        self.session_info(&s)?.write_to(&mut &*stream)?;
                        s
                    }
                    None => {
                        return Ok(error_frame(None, "no such session").write_to(&mut &*stream)?)
                    }
                }
            }
            other => {
                return Ok(
                    error_frame(None, format!("expected HELLO or ATTACH, got {other}"))
                        .write_to(&mut &*stream)?,
                )
            }
        };
        loop {
            let mut len = [0u8; 4];
            match (&*stream).read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(WireError::from(e).into()),
            }
            let frame = Frame::read_after_length(len, &mut &*stream, MAX_REQUEST_FRAME)?;
            let reply = self.handle(&session, &frame).unwrap_or_else(|e| {
                let status = match &e {
                    IpcError::Engine(EngineError::Chain(ChainError::Request(p))) => {
                        Some(p.status())
                    }
                    IpcError::Wire(_) => Some(Status::BadRequest),
                    _ => None,
                };
                error_frame(status, e)
            });
            reply.write_to(&mut &*stream)?;
        }
    }

    fn handle(&self, session: &Session, f: &Frame) -> Result<Frame, IpcError> {
        match f.kind {
            kind::INFER => self.infer(session, f),
            kind::MODELS => {
                let list = ModelList {
                    models: self.engine.models()?,
                };
                let mut body = vec![0u8; list.encoded_len()];
                list.encode(&mut body)?;
                Ok(Frame::new(kind::MODELS_DONE).bytes(&body))
            }
            kind::TRACE => {
                let device = self.engine.device_trace()?;
                let mut body = vec![0u8; TraceCounters::LEN];
                device.encode(&mut body)?;
                let mut frame = Frame::new(kind::TRACE_DONE).bytes(&body);
                for w in self.engine.guest_trace().to_words() {
                    frame = frame.u64(w);
                }
                Ok(frame)
            }
            kind::CANCEL => {
                let mut r = f.reader();
                let client_id = r.u64()?;
                r.finish()?;
                let daemon_id = session
                    .ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&client_id)
                    .copied();
                let outcome = match daemon_id {
                    Some(id) => self.engine.cancel(id)?,
                    None => CancelOutcome::NotFound,
                };
                Ok(Frame::new(kind::CANCEL_DONE).u32(outcome.into()))
            }
            other => Err(WireError::Malformed(format!("unknown message kind {other}")).into()),
        }
    }

    fn infer(&self, session: &Session, f: &Frame) -> Result<Frame, IpcError> {
        let msg = InferMessage::from_frame(f)?;
        let req = &msg.request;
        let descs = req.inputs.iter().chain(&req.outputs);
        let mut refs = Vec::with_capacity(msg.offsets.len());
        for (index, (desc, offset)) in descs.zip(&msg.offsets).enumerate() {
            let range = usize::try_from(*offset)
                .ok()
                .zip(usize::try_from(desc.data_len).ok())
                .ok_or(IpcError::OutsideSession {
                    index,
                    offset: *offset,
                    len: desc.data_len,
                })?;
            let ranges = session.pool.device_ranges(range.0, range.1).map_err(|_| {
                IpcError::OutsideSession {
                    index,
                    offset: *offset,
                    len: desc.data_len,
                }
            })?;
            refs.push(TensorRef {
                desc: *desc,
                ranges,
            });
        }
        let outputs = refs.split_off(req.inputs.len());
        let client_id = req.header.request_id;
        let daemon_id = self.engine.reserve_request_id();
        let _in_flight = session.begin(client_id, daemon_id)?;
        let options = InferOptions {
            priority: req.header.priority,
            deadline_us: req.header.deadline_us,
            request_id: Some(daemon_id),
        };
        let result = self
            .engine
            .infer(req.header.model_id, &refs, &outputs, &options);
        let mut outcome = result?;
        outcome.request_id = client_id;
        let response = outcome.into_response();
        let mut body = vec![0u8; response.encoded_len()];
        response.encode(&mut body)?;
        Ok(Frame::new(kind::INFER_DONE).bytes(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_in_flight_once_per_session_until_its_request_ends() {
        let session = Session {
            token: 1,
            pool: DmaPool::fake(4096, &[0x1000]).unwrap(),
            ids: Mutex::new(HashMap::new()),
        };
        let first = session.begin(7, 100).unwrap();
        assert!(matches!(
            session.begin(7, 101),
            Err(IpcError::Engine(EngineError::DuplicateRequestId(7)))
        ));
        // CANCEL still finds the first request's daemon id.
        assert_eq!(session.ids.lock().unwrap().get(&7), Some(&100));
        drop(first);
        assert!(session.ids.lock().unwrap().is_empty());
        assert!(session.begin(7, 102).is_ok());
    }
}
