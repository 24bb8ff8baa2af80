//! The client side of the agent daemon: one session of shared tensor memory, and a
//! small set of connections so several threads can have requests in flight.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ai_infer_protocol::{
    CancelOutcome, DeviceConfig, ModelInfo, ModelList, Request, Response, Status, TensorDesc,
    TraceCounters,
};

use super::fdpass::recv_with_fd;
use super::wire::{kind, Frame, InferMessage, SessionInfo, WireError, IPC_VERSION, MAX_FRAME};
use super::IpcError;
use crate::api::Trace;
use crate::chain::InferOutcome;
use crate::dma::DmaPool;
use crate::engine::InferOptions;
use crate::stats::GuestTrace;

/// A session with the agent daemon.
pub struct DaemonClient {
    socket: PathBuf,
    info: SessionInfo,
    pool: DmaPool,
    idle: Mutex<Vec<UnixStream>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClient")
            .field("socket", &self.socket)
            .field("pool_len", &self.info.pool_len)
            .finish()
    }
}

fn reply_error(f: &Frame) -> IpcError {
    let mut r = f.reader();
    let status = r.u32().unwrap_or(0);
    let message = String::from_utf8_lossy(r.rest()).into_owned();
    IpcError::Daemon {
        status: Status::try_from(status).ok(),
        message,
    }
}

fn expect(f: Frame, want: u32) -> Result<Frame, IpcError> {
    match f.kind {
        k if k == want => Ok(f),
        kind::ERROR => Err(reply_error(&f)),
        other => Err(IpcError::Unexpected(other)),
    }
}

impl DaemonClient {
    /// Opens a session with `bytes` of shared tensor memory (a multiple of 2 MiB).
    pub fn connect(socket: &Path, bytes: usize) -> Result<Self, IpcError> {
        let stream = UnixStream::connect(socket).map_err(WireError::from)?;
        Frame::new(kind::HELLO)
            .u32(IPC_VERSION)
            .u64(bytes as u64)
            .write_to(&mut &stream)?;
        // The memory descriptor arrives with the first bytes of the reply.
        let mut len = [0u8; 4];
        let (got, fd) = recv_with_fd(&stream, &mut len).map_err(WireError::from)?;
        if got == 0 {
            return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
        }
        // read_exact, not a loop adding read()'s counts: a read of 0 (the daemon closed
        // the connection) would have spun here forever.
        (&stream)
            .read_exact(&mut len[got..])
            .map_err(WireError::from)?;
        let reply = expect(
            Frame::read_after_length(len, &mut &stream, MAX_FRAME)?,
            kind::SESSION,
        )?;
        let info = SessionInfo::from_frame(&reply)?;
        let fd = fd.ok_or(IpcError::NoDescriptor)?;
        let bad_len = || {
            IpcError::BadResponse(format!(
                "session length {} / page {}",
                info.pool_len, info.page_size
            ))
        };
        let len = usize::try_from(info.pool_len).map_err(|_| bad_len())?;
        let page = usize::try_from(info.page_size).map_err(|_| bad_len())?;
        let pool = DmaPool::shared(fd, len, page, info.segments.clone())?;
        Ok(DaemonClient {
            socket: socket.to_path_buf(),
            info,
            pool,
            idle: Mutex::new(vec![stream]),
            next_id: AtomicU64::new(1),
        })
    }

    /// The device's limits.
    pub fn config(&self) -> &DeviceConfig {
        &self.info.config
    }

    /// The shared tensor memory.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    fn connection(&self) -> Result<UnixStream, IpcError> {
        if let Some(s) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(s);
        }
        let s = UnixStream::connect(&self.socket).map_err(WireError::from)?;
        Frame::new(kind::ATTACH)
            .u64(self.info.token)
            .write_to(&mut &s)?;
        expect(Frame::read_from(&mut &s, MAX_FRAME)?, kind::SESSION)?;
        Ok(s)
    }

    /// Sends `frame` on a free connection and returns the reply of kind `want`.
    fn call(&self, frame: &Frame, want: u32) -> Result<Frame, IpcError> {
        let s = self.connection()?;
        frame.write_to(&mut &s)?;
        let reply = Frame::read_from(&mut &s, MAX_FRAME)?;
        // A connection that delivered a whole reply is reusable, whatever it said.
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        expect(reply, want)
    }

    /// Runs a request on tensors at the given offsets of the shared memory.
    pub fn infer(
        &self,
        model_id: u32,
        inputs: &[(TensorDesc, usize)],
        outputs: &[(TensorDesc, usize)],
        options: &InferOptions,
    ) -> Result<InferOutcome, IpcError> {
        let id = options
            .request_id
            .unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        let request = Request::infer(
            id,
            model_id,
            inputs.iter().map(|t| t.0).collect(),
            outputs.iter().map(|t| t.0).collect(),
        )?
        .with_priority(options.priority)
        .with_deadline_us(options.deadline_us);
        let offsets = inputs.iter().chain(outputs).map(|t| t.1 as u64).collect();
        let msg = InferMessage { request, offsets };
        let reply = self.call(&msg.to_frame()?, kind::INFER_DONE)?;
        let resp = Response::decode(&reply.body)?;
        if resp.encoded_len() != reply.body.len() || resp.header.request_id != id {
            return Err(IpcError::BadResponse(format!(
                "INFER reply for request {:#x} of {} bytes",
                resp.header.request_id,
                reply.body.len()
            )));
        }
        if !resp.outputs.is_empty() && resp.outputs.len() != outputs.len() {
            return Err(IpcError::BadResponse(format!(
                "{} output shapes",
                resp.outputs.len()
            )));
        }
        Ok(InferOutcome::from_response(resp))
    }

    /// The models this tenant may use.
    pub fn models(&self) -> Result<Vec<ModelInfo>, IpcError> {
        let reply = self.call(&Frame::new(kind::MODELS), kind::MODELS_DONE)?;
        Ok(ModelList::decode(&reply.body)?.models)
    }

    /// The daemon's guest counters and the device's.
    pub fn trace(&self) -> Result<Trace, IpcError> {
        let reply = self.call(&Frame::new(kind::TRACE), kind::TRACE_DONE)?;
        let mut r = reply.reader();
        let device = TraceCounters::decode(r.bytes(TraceCounters::LEN)?)?;
        let mut words = [0u64; GuestTrace::WORDS];
        for w in words.iter_mut() {
            *w = r.u64()?;
        }
        r.finish()?;
        Ok(Trace {
            guest: GuestTrace::from_words(&words),
            device,
        })
    }

    /// Cancels a request of this session.
    pub fn cancel(&self, request_id: u64) -> Result<CancelOutcome, IpcError> {
        let reply = self.call(&Frame::new(kind::CANCEL).u64(request_id), kind::CANCEL_DONE)?;
        let mut r = reply.reader();
        let outcome = CancelOutcome::try_from(r.u32()?)?;
        r.finish()?;
        Ok(outcome)
    }
}
