//! A synthetic model for benchmarks and tests — not an inference backend.
//!
//! A batch of `n` requests takes `fixed + per_request × n` of wall time, spent
//! sleeping: a cost model with a fixed part that batching amortises, like an
//! accelerator's kernel launches and weight reads, that uses no CPU, so several
//! executors on a small machine do not slow each other down and the scheduler's
//! decisions are what is measured. Each request's output is its input (`y = x`,
//! F32 `[1, 1..=1024]`), so results can be checked per request.
//!
//! [`SyntheticModel::with_weights`] makes it hold that many bytes of written
//! memory, standing in for a model's weights when a benchmark measures how much
//! host memory one shared instance needs.
//!
//! [`SyntheticModel::with_faults`] (tests only: no manifest or config can set it)
//! makes a request whose first input value is [`PANIC_INPUT`] panic the backend
//! call, and one whose first value is [`FAIL_INPUT`] fail its whole batch with a
//! runtime error, as a runtime that runs a batch in one call does.

use std::time::{Duration, Instant};

use ai_infer_protocol::{DType, DimRange, ModelInfo, TensorSpec};
use vm_memory::Bytes;

use super::{Backend, BackendError, RequestOutcome, RequestTensors};

/// Largest element count per request.
pub const MAX_ELEMENTS: u64 = 1024;

/// First input value that makes a model [`SyntheticModel::with_faults`] panic.
pub const PANIC_INPUT: f32 = -7777.0;

/// First input value that makes a model [`SyntheticModel::with_faults`] fail the
/// request's whole batch.
pub const FAIL_INPUT: f32 = -8888.0;

/// A model of cost `fixed + per_request × n` per batch of `n`.
pub struct SyntheticModel {
    info: ModelInfo,
    max_batch: usize,
    fixed: Duration,
    per_request: Duration,
    weights: Vec<u8>,
    faults: bool,
}

impl SyntheticModel {
    /// Model `id` called `name`, running batches of up to `max_batch` (≥ 1).
    pub fn new(
        id: u32,
        name: &str,
        max_batch: usize,
        fixed: Duration,
        per_request: Duration,
    ) -> Self {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![DimRange::new(1, 1), DimRange::new(1, MAX_ELEMENTS)],
        };
        let max_batch = max_batch.max(1);
        SyntheticModel {
            info: ModelInfo {
                id,
                name: name.into(),
                max_batch: u32::try_from(max_batch).unwrap_or(u32::MAX),
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            max_batch,
            fixed,
            per_request,
            weights: Vec::new(),
            faults: false,
        }
    }

    /// Holds `bytes` of memory, every page written once (resident, not shared).
    pub fn with_weights(mut self, bytes: usize) -> Self {
        let mut weights = vec![0u8; bytes];
        for (i, page) in weights.chunks_mut(4096).enumerate() {
            page[0] = i as u8 | 1;
        }
        self.weights = weights;
        self
    }

    /// Reacts to [`PANIC_INPUT`] and [`FAIL_INPUT`]: for tests of the daemon's fault
    /// containment only.
    pub fn with_faults(mut self) -> Self {
        self.faults = true;
        self
    }

    /// The first input value of `req`, if it has one.
    fn first_value(req: &RequestTensors<'_>) -> Option<f32> {
        let mut bytes = [0u8; 4];
        let input = req.inputs.first()?;
        input.data.read_slice(&mut bytes, 0).ok()?;
        Some(f32::from_le_bytes(bytes))
    }

    /// The time a batch of `n` takes.
    pub fn cost(&self, n: usize) -> Duration {
        self.fixed + self.per_request * u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn copy_one(req: &mut RequestTensors<'_>) -> RequestOutcome {
        let (Some(input), Some(output)) = (req.inputs.first(), req.outputs.first()) else {
            return Err(BackendError::Runtime("request without tensors".into()));
        };
        let shape = input.desc.shape;
        let len = input.data.len();
        if output.buf.len() < len {
            return Err(BackendError::OutputTooSmall {
                index: 0,
                needed: len as u64,
                shapes: vec![shape],
            });
        }
        // Guest memory to guest memory directly: no host buffer per request.
        let dst = output
            .buf
            .subslice(0, len)
            .map_err(|e| BackendError::Runtime(format!("output buffer: {e}")))?;
        input.data.copy_to_volatile_slice(dst);
        Ok(vec![shape])
    }
}

impl Backend for SyntheticModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn run(&self, batch: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome> {
        let until = Instant::now() + self.cost(batch.len());
        if self.faults {
            let firsts: Vec<_> = batch.iter().map(Self::first_value).collect();
            if firsts.contains(&Some(PANIC_INPUT)) {
                panic!("synthetic fault: a request asked for a panic");
            }
            if firsts.contains(&Some(FAIL_INPUT)) {
                let fail = || Err(BackendError::Runtime("synthetic fault in the batch".into()));
                return batch.iter().map(|_| fail()).collect();
            }
        }
        let outcomes = batch.iter_mut().map(Self::copy_one).collect();
        // Keeps the weights alive and resident (the optimiser cannot drop them).
        std::hint::black_box(self.weights.first());
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left);
        }
        outcomes
    }
}
