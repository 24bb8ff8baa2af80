//! Inference backends: what executors call to run one batch of one model.
//!
//! A backend owns one loaded model instance. Inputs are borrowed straight from guest
//! memory and outputs are written straight into guest buffers ([`VolatileSlice`]s,
//! because the guest can change that memory at any time); the only copies are the
//! ones a runtime's API forces, which each backend documents.
//!
//! Backends: [`onnx`] (tract, any ONNX model), [`bert`] (candle, sentence embeddings),
//! [`cuda`] (device selection for candle, behind the `cuda` feature); [`local`] runs a
//! backend on host buffers as the reference for tests and tools.

pub mod bert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod local;
pub mod onnx;
pub mod synthetic;

use std::panic::{catch_unwind, AssertUnwindSafe};

use ai_infer_protocol::{ModelInfo, ProtocolError, Shape, TensorDesc};
use thiserror::Error;
use vm_memory::VolatileSlice;

/// One input tensor of one request: its validated descriptor and its bytes.
pub struct InputTensor<'a> {
    /// dtype and shape, already checked against the model's signature.
    pub desc: &'a TensorDesc,
    /// Exactly `desc.data_len` bytes, in guest memory.
    pub data: VolatileSlice<'a>,
}

/// One output buffer of one request: the driver's expectation and its capacity.
pub struct OutputBuffer<'a> {
    /// What the driver expects (dims of 0 = unknown); `data_len` is the capacity.
    pub desc: &'a TensorDesc,
    /// The buffer in guest memory (`desc.data_len` bytes).
    pub buf: VolatileSlice<'a>,
}

/// The tensors of one request inside a batch.
pub struct RequestTensors<'a> {
    /// Inputs in signature order.
    pub inputs: Vec<InputTensor<'a>>,
    /// Outputs in signature order.
    pub outputs: Vec<OutputBuffer<'a>>,
}

/// Why a backend could not produce one request's outputs.
#[derive(Debug, Error)]
pub enum BackendError {
    /// An input value is outside the model's domain (e.g. a token id ≥ vocabulary).
    #[error("input tensor {index}: {reason}")]
    BadInput {
        /// Tensor index (inputs first).
        index: usize,
        /// What was wrong.
        reason: String,
    },
    /// Output `index` needs `needed` bytes but its buffer holds fewer. `shapes` are the
    /// produced shapes of every output, reported to the driver so it can resize.
    #[error("output {index} needs {needed} bytes")]
    OutputTooSmall {
        /// Output index (0-based among outputs).
        index: usize,
        /// Bytes it needs.
        needed: u64,
        /// Produced shape of every output.
        shapes: Vec<Shape>,
    },
    /// The produced shape contradicts the output descriptor.
    #[error("output {index} has shape {produced:?}, which contradicts the request")]
    ShapeMismatch {
        /// Output index (0-based among outputs).
        index: usize,
        /// The produced shape.
        produced: Shape,
        /// Produced shape of every output.
        shapes: Vec<Shape>,
    },
    /// The runtime failed.
    #[error("runtime failed: {0}")]
    Runtime(String),
}

/// What one request got from a batch: the produced shape of each output (its bytes are
/// already written at the start of the output's buffer), or the reason it failed.
pub type RequestOutcome = Result<Vec<Shape>, BackendError>;

/// A loaded model instance.
pub trait Backend: Send + Sync {
    /// The model's name, id and signature (what MODELS reports).
    fn info(&self) -> &ModelInfo;

    /// Largest batch this instance runs in one call (1 = no batching).
    fn max_batch(&self) -> usize;

    /// Runs `batch` (1 ..= `max_batch` requests, each already validated against
    /// [`Backend::info`]) in as few runtime calls as possible and writes each request's
    /// outputs into its buffers. Returns one outcome per request, in order; a failure
    /// of one request must not fail the others. A backend that runs the batch in one
    /// runtime call may fail every request with [`BackendError::Runtime`] when that
    /// call fails: the executor then runs each such request again alone, so only the
    /// bad one fails. It does the same after a panic, so `run` may be called again
    /// after it panicked and must stay usable (no state left half-updated).
    fn run(&self, batch: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome>;
}

/// Checks the produced shape of every output against its descriptor and its buffer, in
/// output order. The first problem fails the request, carrying every produced shape so
/// the driver can resize and resubmit.
pub fn check_produced(
    outputs: &[OutputBuffer<'_>],
    produced: &[Shape],
) -> Result<(), BackendError> {
    if outputs.len() != produced.len() {
        return Err(BackendError::Runtime(format!(
            "the model produced {} outputs for {} output buffers",
            produced.len(),
            outputs.len()
        )));
    }
    for (index, (out, shape)) in outputs.iter().zip(produced).enumerate() {
        let shapes = || produced.to_vec();
        match out.desc.check_produced(shape) {
            Ok(entry) => {
                // The buffer is never shorter than its descriptor says, but do not rely on it.
                if entry.data_len > out.buf.len() as u64 {
                    return Err(BackendError::OutputTooSmall {
                        index,
                        needed: entry.data_len,
                        shapes: shapes(),
                    });
                }
            }
            Err(ProtocolError::ProducedShapeMismatch { .. }) => {
                return Err(BackendError::ShapeMismatch {
                    index,
                    produced: *shape,
                    shapes: shapes(),
                })
            }
            Err(ProtocolError::OutputTooLarge { needed, .. }) => {
                return Err(BackendError::OutputTooSmall {
                    index,
                    needed,
                    shapes: shapes(),
                })
            }
            Err(e) => {
                return Err(BackendError::Runtime(format!(
                    "output {index} has an unrepresentable shape {shape}: {e}"
                )))
            }
        }
    }
    Ok(())
}

/// Checks a request's tensors against `info`'s signature (the daemon's intake already
/// did; this keeps a backend safe on its own) and each input's bytes against its
/// descriptor.
pub fn check_signature(info: &ModelInfo, req: &RequestTensors<'_>) -> Result<(), BackendError> {
    info.check_tensors(
        req.inputs.iter().map(|t| t.desc),
        req.outputs.iter().map(|t| t.desc),
    )
    .map_err(|e| BackendError::BadInput {
        index: match e {
            ProtocolError::InTensor { index, .. } => index as usize,
            _ => 0,
        },
        reason: e.to_string(),
    })?;
    for (index, input) in req.inputs.iter().enumerate() {
        check_input_len(index, input)?;
    }
    Ok(())
}

/// Checks that an input's bytes in guest memory are exactly as long as its descriptor
/// says (the daemon guarantees it; a backend does not read past either).
pub fn check_input_len(index: usize, input: &InputTensor<'_>) -> Result<(), BackendError> {
    if input.data.len() as u64 != input.desc.data_len {
        return Err(BackendError::BadInput {
            index,
            reason: format!(
                "{} bytes of data for a descriptor of {} bytes",
                input.data.len(),
                input.desc.data_len
            ),
        });
    }
    Ok(())
}

/// Runs a runtime call, turning a panic inside the runtime (a bug there, possibly
/// triggered by guest data) into an error for this batch instead of taking the daemon
/// and every tenant down with it. Errors come back as `"{what}: {reason}"`.
pub fn guard_runtime<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: the runtime panicked")),
    }
}
