//! The C ABI (`include/ai_agent.h`, library `libguest_agent.so`).
//!
//! Every function returns an `AI_E_*` code (0 = the call completed; for `ai_infer`
//! the device's own status is in the result) and never unwinds into C: each body runs
//! under `catch_unwind`. Handles are checked against the library's registry of live
//! handles, so NULL, freed or foreign agent and buffer pointers give `AI_E_INVALID`
//! instead of undefined behaviour. A thread's last error message is kept for
//! `ai_last_error`.

mod header;
mod types;

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ai_infer_protocol::{PriorityClass, Status, DETAIL_NONE, MAX_TENSORS};

pub use header::c_header;
pub use types::*;

use crate::api::{Agent, AgentOptions, ApiError, Buffer, Mode};
use crate::engine::{EngineError, InferOptions};

/// The call completed.
pub const AI_OK: i32 = 0;
/// A NULL, unknown or freed handle, or an invalid argument.
pub const AI_E_INVALID: i32 = -1;
/// No memory left in the DMA pool / session.
pub const AI_E_NO_MEMORY: i32 = -2;
/// The device or its driver failed.
pub const AI_E_DEVICE: i32 = -3;
/// The agent daemon failed or refused.
pub const AI_E_DAEMON: i32 = -4;
/// An output array is too small (`ai_models`: see `*count`).
pub const AI_E_TOO_SMALL: i32 = -5;
/// A bug in the library (a caught panic).
pub const AI_E_INTERNAL: i32 = -6;
/// The device answered with a non-OK status (MODELS, TRACE, CANCEL).
pub const AI_E_STATUS: i32 = -7;

/// Every error code with its name, for the header and `ai_error_name`.
pub const ERROR_CODES: [(i32, &str); 8] = [
    (AI_OK, "AI_OK"),
    (AI_E_INVALID, "AI_E_INVALID"),
    (AI_E_NO_MEMORY, "AI_E_NO_MEMORY"),
    (AI_E_DEVICE, "AI_E_DEVICE"),
    (AI_E_DAEMON, "AI_E_DAEMON"),
    (AI_E_TOO_SMALL, "AI_E_TOO_SMALL"),
    (AI_E_INTERNAL, "AI_E_INTERNAL"),
    (AI_E_STATUS, "AI_E_STATUS"),
];

/// `ai_open_options.mode` values with their names, for the header and `ai_open`.
pub const MODES: [(u32, &str, Mode); 3] = [
    (0, "AI_MODE_AUTO", Mode::Auto),
    (1, "AI_MODE_DIRECT", Mode::Direct),
    (2, "AI_MODE_DAEMON", Mode::Daemon),
];

/// Opaque: the agent handle (`ai_agent`).
pub struct AiAgent {
    agent: Agent,
    /// Live buffers of this agent (addresses of their boxes).
    buffers: Mutex<HashSet<usize>>,
}

/// Live agent handles (addresses of their boxes).
static AGENTS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

struct CError(i32, String);

impl From<ApiError> for CError {
    fn from(e: ApiError) -> Self {
        use crate::dma::DmaError;
        let code = match &e {
            ApiError::Engine(EngineError::Dma(DmaError::Alloc(_))) => AI_E_NO_MEMORY,
            ApiError::Engine(EngineError::Status { .. }) => AI_E_STATUS,
            ApiError::Engine(EngineError::Chain(crate::chain::ChainError::Request(_))) => {
                AI_E_INVALID
            }
            ApiError::Engine(EngineError::DuplicateRequestId(_)) => AI_E_INVALID,
            ApiError::Engine(_) => AI_E_DEVICE,
            ApiError::Ipc(_) => AI_E_DAEMON,
            _ => AI_E_INVALID,
        };
        CError(code, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> CError {
    CError(AI_E_INVALID, msg.into())
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning errors and panics into codes and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), CError>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => AI_OK,
        Ok(Err(CError(code, msg))) => {
            set_last_error(&msg);
            code
        }
        Err(_) => {
            set_last_error("internal error (panic) in the agent library");
            AI_E_INTERNAL
        }
    }
}

fn registry() -> std::sync::MutexGuard<'static, Option<HashSet<usize>>> {
    AGENTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent behind `ptr`, if it is a live handle.
///
/// # Safety
/// The returned reference is valid while the handle is not closed; callers must not
/// close a handle while using it (documented in the header).
unsafe fn agent_ref<'a>(ptr: *const AiAgent) -> Result<&'a AiAgent, CError> {
    let live = registry()
        .as_ref()
        .is_some_and(|s| s.contains(&(ptr as usize)));
    if ptr.is_null() || !live {
        return Err(invalid("not a live ai_agent handle"));
    }
    // SAFETY: ptr is in the registry, so it came from Box::into_raw in ai_open and has
    // not been closed.
    Ok(unsafe { &*ptr })
}

fn check_buffer(agent: &AiAgent, ptr: *const AiBuffer, what: &str) -> Result<(), CError> {
    let live = agent
        .buffers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&(ptr as usize));
    if ptr.is_null() || !live {
        return Err(invalid(format!(
            "{what} is not a live buffer of this agent"
        )));
    }
    Ok(())
}

fn c_str(p: *const c_char) -> Result<Option<String>, CError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string (header contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid("string argument is not UTF-8"))
}

fn register(agent: Agent) -> *mut AiAgent {
    let ptr = Box::into_raw(Box::new(AiAgent {
        agent,
        buffers: Mutex::new(HashSet::new()),
    }));
    registry()
        .get_or_insert_with(HashSet::new)
        .insert(ptr as usize);
    ptr
}

/// Opens the agent. `options` may be NULL (defaults). On success `*out` is the handle.
///
/// # Safety
/// `out` must be NULL or point to writable storage for a pointer; `options` must be
/// NULL or point to a valid `ai_open_options` whose strings are NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ai_open(options: *const AiOpenOptions, out: *mut *mut AiAgent) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let mut o = AgentOptions::default();
        if !options.is_null() {
            // SAFETY: non-NULL, valid per the contract.
            let c = unsafe { *options };
            o.mode = MODES
                .iter()
                .find(|m| m.0 == c.mode)
                .map(|m| m.2)
                .ok_or_else(|| invalid(format!("unknown mode {}", c.mode)))?;
            if c.session_mb != 0 {
                o.session_bytes = (c.session_mb as usize) << 20;
            }
            if c.pool_mb != 0 {
                o.engine.pool_bytes = (c.pool_mb as usize) << 20;
            }
            if c.connect_timeout_s != 0 {
                o.engine.device.connect_timeout = Duration::from_secs(c.connect_timeout_s.into());
            }
            if let Some(s) = c_str(c.socket)? {
                o.socket = PathBuf::from(s);
            }
            o.engine.bdf = c_str(c.bdf)?;
        }
        let agent = Agent::open(&o)?;
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = register(agent) };
        Ok(())
    })
}

/// Closes the agent and frees its buffers. NULL or unknown handles are ignored.
///
/// # Safety
/// No other thread may be using the handle.
#[no_mangle]
pub unsafe extern "C" fn ai_close(agent: *mut AiAgent) {
    let _ = guard(|| {
        let removed = registry()
            .as_mut()
            .is_some_and(|s| s.remove(&(agent as usize)));
        if removed {
            // SAFETY: it was live (from Box::into_raw) and is now unregistered, so this
            // is the only release.
            let a = unsafe { Box::from_raw(agent) };
            for b in a.buffers.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                // SAFETY: registered buffers are boxes from ai_alloc not yet freed.
                drop(unsafe { Box::from_raw(b as *mut AiBuffer) });
            }
        }
        Ok(())
    });
}

/// Allocates `size` bytes of tensor memory; `flags` is 0 or `AI_ALLOC_ZERO`.
///
/// # Safety
/// `out` must be NULL or writable; `agent` any value (checked).
#[no_mangle]
pub unsafe extern "C" fn ai_alloc(
    agent: *mut AiAgent,
    size: usize,
    flags: u32,
    out: *mut *mut AiBuffer,
) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let buffer = a.agent.ai_alloc(size, flags)?;
        let ptr = Box::into_raw(Box::new(AiBuffer { buffer }));
        a.buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ptr as usize);
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = ptr };
        Ok(())
    })
}

/// Frees a buffer of `agent`. Returns `AI_E_INVALID` for NULL, foreign or already
/// freed buffers.
///
/// # Safety
/// The buffer must not be in use by a concurrent `ai_infer`.
#[no_mangle]
pub unsafe extern "C" fn ai_free(agent: *mut AiAgent, buffer: *mut AiBuffer) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        let removed = a
            .buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(buffer as usize));
        if !removed {
            return Err(invalid("not a live buffer of this agent"));
        }
        // SAFETY: it was live (a box from ai_alloc) and is now unregistered.
        drop(unsafe { Box::from_raw(buffer) });
        Ok(())
    })
}

/// The bytes of a buffer (NULL if `buffer` is not a live buffer of `agent`).
///
/// # Safety
/// The pointer is valid until the buffer is freed.
#[no_mangle]
pub unsafe extern "C" fn ai_buffer_data(agent: *mut AiAgent, buffer: *mut AiBuffer) -> *mut u8 {
    let mut out = std::ptr::null_mut();
    let _ = guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        check_buffer(a, buffer, "buffer")?;
        // SAFETY: live buffer of this agent (checked).
        out = unsafe { (*buffer).buffer.as_mut_slice().as_mut_ptr() };
        Ok(())
    });
    out
}

/// Size of a buffer in bytes (0 if it is not a live buffer of `agent`).
///
/// # Safety
/// As `ai_buffer_data`.
#[no_mangle]
pub unsafe extern "C" fn ai_buffer_len(agent: *mut AiAgent, buffer: *const AiBuffer) -> usize {
    let mut len = 0;
    let _ = guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        check_buffer(a, buffer, "buffer")?;
        // SAFETY: live buffer of this agent (checked).
        len = unsafe { (*buffer).buffer.len() };
        Ok(())
    });
    len
}

fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], CError> {
    if n > MAX_TENSORS {
        return Err(invalid(format!("{n} {what}, at most {MAX_TENSORS}")));
    }
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller passes `n` valid elements (header contract), n <= 16.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Runs model `model_id`. 0 means the request completed: its status (which may be an
/// error of the request, such as `AI_STATUS_BAD_TENSOR`) is in `result->status`.
///
/// # Safety
/// `inputs`/`outputs` point to `num_inputs`/`num_outputs` elements; `options` is NULL
/// or valid; `result` is writable. The same output buffer must not be used by two
/// concurrent calls.
#[no_mangle]
pub unsafe extern "C" fn ai_infer(
    agent: *mut AiAgent,
    model_id: u32,
    inputs: *const AiInput,
    num_inputs: usize,
    outputs: *const AiOutput,
    num_outputs: usize,
    options: *const AiInferOptions,
    result: *mut AiInferResult,
) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        if result.is_null() {
            return Err(invalid("result is NULL"));
        }
        let ins = slice(inputs, num_inputs, "inputs")?;
        let outs = slice(outputs, num_outputs, "outputs")?;
        let mut input_list: Vec<(ai_infer_protocol::TensorDesc, &Buffer)> = Vec::new();
        let mut seen = HashSet::new();
        for (i, t) in ins.iter().enumerate() {
            check_buffer(a, t.buffer, &format!("input {i}"))?;
            let desc = t
                .desc
                .to_desc()
                .map_err(|e| invalid(format!("input {i}: {e}")))?;
            // SAFETY: live buffer (checked); inputs are only read.
            input_list.push((desc, unsafe { &(*t.buffer).buffer }));
        }
        let mut output_list: Vec<(ai_infer_protocol::TensorDesc, &mut Buffer)> = Vec::new();
        for (k, t) in outs.iter().enumerate() {
            check_buffer(a, t.buffer, &format!("output {k}"))?;
            if !seen.insert(t.buffer as usize)
                || ins.iter().any(|i| i.buffer == t.buffer.cast_const())
            {
                return Err(invalid(format!(
                    "output {k} shares its buffer with another tensor"
                )));
            }
            let desc = t
                .desc
                .to_desc()
                .map_err(|e| invalid(format!("output {k}: {e}")))?;
            // SAFETY: live buffer (checked), used by no other tensor of this call
            // (checked), so this is the only reference for the call.
            output_list.push((desc, unsafe { &mut (*t.buffer).buffer }));
        }
        let opts = if options.is_null() {
            AiInferOptions::default()
        } else {
            // SAFETY: non-NULL, valid per the contract.
            unsafe { *options }
        };
        let priority =
            PriorityClass::try_from(opts.priority).map_err(|e| invalid(e.to_string()))?;
        let options = InferOptions {
            priority,
            deadline_us: opts.deadline_us,
            request_id: (opts.request_id != 0).then_some(opts.request_id),
        };
        let r = a
            .agent
            .ai_infer(model_id, &input_list, &mut output_list, &options)?;
        let mut c = AiInferResult {
            status: r.status.into(),
            detail: r.detail.unwrap_or(DETAIL_NONE),
            request_id: r.request_id,
            queue_ns: r.queue_ns,
            compute_ns: r.compute_ns,
            payload_len: r.payload_len,
            batch_size: r.batch_size,
            num_outputs: r.outputs.len().min(MAX_TENSORS) as u32,
            ..AiInferResult::default()
        };
        for (o, d) in c.outputs.iter_mut().zip(&r.outputs) {
            *o = AiTensorDesc::from_desc(d);
        }
        // SAFETY: result is non-NULL and writable per the contract.
        unsafe { *result = c };
        Ok(())
    })
}

/// Fills `*out` with guest-side and device-side counters.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ai_trace(agent: *mut AiAgent, out: *mut AiTrace) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let t = a.agent.ai_trace()?;
        let c = AiTrace {
            guest: AiGuestTrace::from_trace(&t.guest),
            device: AiDeviceTrace::from_trace(&t.device),
        };
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = c };
        Ok(())
    })
}

/// Writes up to `capacity` models to `out` and their total number to `*count`;
/// `AI_E_TOO_SMALL` if `capacity` was too small (call again with `*count`).
///
/// # Safety
/// `out` points to `capacity` writable elements (may be NULL if 0); `count` writable.
#[no_mangle]
pub unsafe extern "C" fn ai_models(
    agent: *mut AiAgent,
    out: *mut AiModelInfo,
    capacity: usize,
    count: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        if count.is_null() || (out.is_null() && capacity > 0) {
            return Err(invalid("out or count is NULL"));
        }
        let models = a.agent.ai_models()?;
        // SAFETY: count is non-NULL and writable per the contract.
        unsafe { *count = models.len() };
        for (i, m) in models.iter().take(capacity).enumerate() {
            // SAFETY: i < capacity elements of out, writable per the contract.
            unsafe { out.add(i).write(AiModelInfo::from_model(m)) };
        }
        if models.len() > capacity {
            return Err(CError(
                AI_E_TOO_SMALL,
                format!("{} models, room for {capacity}", models.len()),
            ));
        }
        Ok(())
    })
}

/// Cancels request `request_id`; `*outcome` is `AI_CANCEL_*`.
///
/// # Safety
/// `outcome` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ai_cancel(agent: *mut AiAgent, request_id: u64, outcome: *mut u32) -> i32 {
    guard(|| {
        // SAFETY: checked against the registry.
        let a = unsafe { agent_ref(agent) }?;
        if outcome.is_null() {
            return Err(invalid("outcome is NULL"));
        }
        let o = a.agent.ai_cancel(request_id)?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { *outcome = o.into() };
        Ok(())
    })
}

/// The calling thread's last error message ("" if none); valid until its next call.
#[no_mangle]
pub extern "C" fn ai_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Name of a device status (`"BAD_TENSOR"`), or `"UNKNOWN"`. Static storage.
#[no_mangle]
pub extern "C" fn ai_status_name(status: u32) -> *const c_char {
    match Status::try_from(status) {
        Ok(s) => STATUS_NAMES[s as usize].as_ptr(),
        Err(_) => c"UNKNOWN".as_ptr(),
    }
}

/// NUL-terminated status names, indexed by status value.
static STATUS_NAMES: [&CStr; 13] = [
    c"OK",
    c"BAD_REQUEST",
    c"UNKNOWN_OPCODE",
    c"UNKNOWN_MODEL",
    c"MODEL_NOT_ALLOWED",
    c"BAD_TENSOR",
    c"BUFFER_TOO_SMALL",
    c"THROTTLED",
    c"QUEUE_FULL",
    c"DEADLINE",
    c"CANCELLED",
    c"BACKEND_ERROR",
    c"UNSUPPORTED",
];

/// Wraps an agent this process made (tests, embedding Rust programs) as a C handle.
pub fn into_handle(agent: Agent) -> *mut AiAgent {
    register(agent)
}

#[cfg(test)]
mod tests;
