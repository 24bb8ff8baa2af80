//! The C structures of `include/ai_agent.h`, laid out with `#[repr(C)]`.
//!
//! Tensor descriptors mirror the 80-byte wire descriptor, so C programs see the same
//! fields as the spec. Strings are NUL-terminated fixed arrays; nothing in a structure
//! points at memory the library owns.

use std::os::raw::c_char;

use ai_infer_protocol::{
    DType, ModelInfo, ProtocolError, Shape, TensorDesc, TensorSpec, TraceCounters, DETAIL_NONE,
    LATENCY_BUCKETS, MAX_MODEL_NAME_LEN, MAX_RANK, MAX_TENSORS, MAX_TENSOR_NAME_LEN, STATUS_SLOTS,
};

use crate::stats::GuestTrace;

/// Opaque: a tensor buffer (`ai_buffer`).
pub struct AiBuffer {
    pub(crate) buffer: crate::api::Buffer,
}

/// `ai_tensor_desc`: dtype, rank, dims and byte length, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AiTensorDesc {
    /// `AI_DTYPE_*`.
    pub dtype: u8,
    /// Number of dims used.
    pub rank: u8,
    /// Zero.
    pub reserved: [u8; 6],
    /// `dims[0..rank]`, outermost first; the rest 0.
    pub dims: [u64; MAX_RANK],
    /// Inputs: bytes of data; outputs: buffer capacity (results: bytes written).
    pub data_len: u64,
}

impl AiTensorDesc {
    pub(crate) fn to_desc(self) -> Result<TensorDesc, ProtocolError> {
        let dtype = DType::try_from(self.dtype)?;
        let rank = usize::from(self.rank);
        let dims = self.dims.get(..rank).ok_or(ProtocolError::RankTooLarge {
            rank,
            max: MAX_RANK,
        })?;
        Ok(TensorDesc {
            dtype,
            shape: Shape::new(dims)?,
            data_len: self.data_len,
        })
    }

    pub(crate) fn from_desc(d: &TensorDesc) -> Self {
        let mut dims = [0u64; MAX_RANK];
        dims[..d.shape.rank()].copy_from_slice(d.shape.dims());
        AiTensorDesc {
            dtype: d.dtype.into(),
            // At most MAX_RANK = 8.
            rank: d.shape.rank() as u8,
            reserved: [0; 6],
            dims,
            data_len: d.data_len,
        }
    }
}

/// `ai_input`: an input tensor and the buffer holding its bytes (from offset 0).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiInput {
    /// The tensor.
    pub desc: AiTensorDesc,
    /// Its bytes.
    pub buffer: *const AiBuffer,
}

/// `ai_output`: an output tensor and the buffer the device writes it to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiOutput {
    /// The expected shape (0 dims: unknown) and the capacity in `data_len`.
    pub desc: AiTensorDesc,
    /// Where the result goes.
    pub buffer: *mut AiBuffer,
}

/// `ai_infer_options`. All zero = normal priority, no deadline, automatic id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AiInferOptions {
    /// `AI_PRIORITY_*`.
    pub priority: u8,
    /// Zero.
    pub reserved: [u8; 7],
    /// Relative deadline in µs; 0 = none.
    pub deadline_us: u64,
    /// Request id to use (to cancel from another thread); 0 = automatic.
    pub request_id: u64,
}

/// `ai_infer_result`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiInferResult {
    /// The device's `AI_STATUS_*`.
    pub status: u32,
    /// Offending tensor for tensor errors, else `0xffffffff`.
    pub detail: u32,
    /// The request id used.
    pub request_id: u64,
    /// Nanoseconds queued in the device.
    pub queue_ns: u64,
    /// Nanoseconds of compute.
    pub compute_ns: u64,
    /// OK: bytes written; BUFFER_TOO_SMALL: bytes needed.
    pub payload_len: u64,
    /// Requests in the backend call.
    pub batch_size: u32,
    /// Valid entries of `outputs`.
    pub num_outputs: u32,
    /// Output shapes produced (or needed).
    pub outputs: [AiTensorDesc; MAX_TENSORS],
}

impl Default for AiInferResult {
    fn default() -> Self {
        AiInferResult {
            status: 0,
            detail: DETAIL_NONE,
            request_id: 0,
            queue_ns: 0,
            compute_ns: 0,
            payload_len: 0,
            batch_size: 0,
            num_outputs: 0,
            outputs: [AiTensorDesc::default(); MAX_TENSORS],
        }
    }
}

/// `ai_tensor_spec`: one tensor of a model signature.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiTensorSpec {
    /// `AI_DTYPE_*`.
    pub dtype: u8,
    /// Number of dims.
    pub rank: u8,
    /// Zero.
    pub reserved: [u8; 2],
    /// Name, NUL-terminated (may be empty).
    pub name: [c_char; MAX_TENSOR_NAME_LEN + 1],
    /// Smallest value of each dim.
    pub dims_min: [u64; MAX_RANK],
    /// Largest value of each dim.
    pub dims_max: [u64; MAX_RANK],
}

fn c_name<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (o, b) in out.iter_mut().zip(s.bytes().take(N - 1)) {
        *o = b as c_char;
    }
    out
}

impl AiTensorSpec {
    fn from_spec(s: &TensorSpec) -> Self {
        let mut dims_min = [0u64; MAX_RANK];
        let mut dims_max = [0u64; MAX_RANK];
        for (i, d) in s.dims.iter().enumerate().take(MAX_RANK) {
            dims_min[i] = d.min;
            dims_max[i] = d.max;
        }
        AiTensorSpec {
            dtype: s.dtype.into(),
            rank: s.dims.len().min(MAX_RANK) as u8,
            reserved: [0; 2],
            name: c_name(&s.name),
            dims_min,
            dims_max,
        }
    }
}

/// `ai_model_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiModelInfo {
    /// Id for `ai_infer`.
    pub id: u32,
    /// Largest batch the device forms.
    pub max_batch: u32,
    /// Valid entries of `inputs`.
    pub num_inputs: u32,
    /// Valid entries of `outputs`.
    pub num_outputs: u32,
    /// Name, NUL-terminated.
    pub name: [c_char; MAX_MODEL_NAME_LEN + 1],
    /// Input signature.
    pub inputs: [AiTensorSpec; MAX_TENSORS],
    /// Output signature.
    pub outputs: [AiTensorSpec; MAX_TENSORS],
}

impl AiModelInfo {
    pub(crate) fn from_model(m: &ModelInfo) -> Self {
        let empty = AiTensorSpec::from_spec(&TensorSpec {
            name: String::new(),
            dtype: DType::U8,
            dims: vec![],
        });
        let mut inputs = [AiTensorSpec { dtype: 0, ..empty }; MAX_TENSORS];
        let mut outputs = inputs;
        for (o, s) in inputs.iter_mut().zip(&m.inputs) {
            *o = AiTensorSpec::from_spec(s);
        }
        for (o, s) in outputs.iter_mut().zip(&m.outputs) {
            *o = AiTensorSpec::from_spec(s);
        }
        AiModelInfo {
            id: m.id,
            max_batch: m.max_batch,
            num_inputs: m.inputs.len().min(MAX_TENSORS) as u32,
            num_outputs: m.outputs.len().min(MAX_TENSORS) as u32,
            name: c_name(&m.name),
            inputs,
            outputs,
        }
    }
}

/// `ai_guest_trace`: counters of the process driving the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AiGuestTrace {
    /// INFER requests submitted.
    pub submitted: u64,
    /// INFER completions seen.
    pub completed: u64,
    /// Requests failed in the driver.
    pub driver_errors: u64,
    /// Device resets.
    pub device_resets: u64,
    /// Input bytes of OK requests.
    pub bytes_in: u64,
    /// Output bytes of OK requests.
    pub bytes_out: u64,
    /// Polling spins.
    pub spins: u64,
    /// Polling yields.
    pub yields: u64,
    /// Polling sleeps.
    pub sleeps: u64,
    /// Zero.
    pub reserved: u64,
    /// Completions by status.
    pub by_status: [u64; STATUS_SLOTS],
    /// OK completions by submit-to-seen latency (log2 µs buckets).
    pub latency_hist: [u64; LATENCY_BUCKETS],
}

impl AiGuestTrace {
    pub(crate) fn from_trace(g: &GuestTrace) -> Self {
        AiGuestTrace {
            submitted: g.submitted,
            completed: g.completed,
            driver_errors: g.driver_errors,
            device_resets: g.device_resets,
            bytes_in: g.bytes_in,
            bytes_out: g.bytes_out,
            spins: g.spins,
            yields: g.yields,
            sleeps: g.sleeps,
            reserved: 0,
            by_status: g.by_status,
            latency_hist: g.latency_hist,
        }
    }
}

/// `ai_device_trace`: the TRACE payload of spec §10.3.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AiDeviceTrace {
    /// Nanoseconds since the counters started.
    pub uptime_ns: u64,
    /// Chains completed.
    pub completed: u64,
    /// INFER requests in flight.
    pub in_flight: u64,
    /// Highest `in_flight`.
    pub in_flight_max: u64,
    /// Input bytes of OK INFERs.
    pub bytes_in: u64,
    /// Output bytes of OK INFERs.
    pub bytes_out: u64,
    /// Sum of `queue_ns`.
    pub queue_ns_total: u64,
    /// Sum of `compute_ns`.
    pub compute_ns_total: u64,
    /// Requests whose priority was lowered.
    pub priority_clamped: u64,
    /// OK requests computed in a batch.
    pub batched: u64,
    /// INFER completions by status.
    pub infer_status: [u64; STATUS_SLOTS],
    /// OK INFERs by queue + compute time (log2 µs buckets).
    pub latency_hist: [u64; LATENCY_BUCKETS],
}

impl AiDeviceTrace {
    pub(crate) fn from_trace(t: &TraceCounters) -> Self {
        AiDeviceTrace {
            uptime_ns: t.uptime_ns,
            completed: t.completed,
            in_flight: t.in_flight,
            in_flight_max: t.in_flight_max,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            queue_ns_total: t.queue_ns_total,
            compute_ns_total: t.compute_ns_total,
            priority_clamped: t.priority_clamped,
            batched: t.batched,
            infer_status: t.infer_status,
            latency_hist: t.latency_hist,
        }
    }
}

/// `ai_trace_counters`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AiTrace {
    /// Guest-side counters.
    pub guest: AiGuestTrace,
    /// Device-side counters.
    pub device: AiDeviceTrace,
}

/// `ai_open_options`. All zero/NULL = defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AiOpenOptions {
    /// `AI_MODE_AUTO`, `AI_MODE_DIRECT` or `AI_MODE_DAEMON`.
    pub mode: u32,
    /// MiB of shared memory from the daemon (0 = 2).
    pub session_mb: u32,
    /// MiB of huge pages in direct mode (0 = 16).
    pub pool_mb: u32,
    /// Seconds to wait for the device backend (0 = 60).
    pub connect_timeout_s: u32,
    /// Daemon socket (NULL = `/run/ai-agent.sock`).
    pub socket: *const c_char,
    /// PCI address (NULL = first ai_infer function).
    pub bdf: *const c_char,
}
