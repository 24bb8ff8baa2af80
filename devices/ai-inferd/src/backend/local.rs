//! Runs a backend on host buffers instead of guest memory: the reference a test or a
//! tool compares a guest's result with, through exactly the code path the daemon uses
//! (the same signature check, the same [`Backend::run`]).

use ai_infer_protocol::{DeviceConfig, ProtocolError, Request, Shape, TensorDesc};
use thiserror::Error;
use vm_memory::VolatileSlice;

use super::{Backend, BackendError, InputTensor, OutputBuffer, RequestTensors};

/// Why a local run produced no outputs.
#[derive(Debug, Error)]
pub enum LocalRunError {
    /// The request does not match the model's signature (what the daemon would reject
    /// before scheduling it).
    #[error("request rejected: {0}")]
    Rejected(#[from] ProtocolError),
    /// An input's bytes do not match its descriptor.
    #[error("input {index} has {got} bytes, its descriptor says {expected}")]
    InputLength {
        /// Input index.
        index: usize,
        /// Bytes given.
        got: usize,
        /// Bytes the descriptor declares.
        expected: u64,
    },
    /// The backend failed this request.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
}

/// One request's tensors on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalRequest {
    /// Each input's descriptor and its bytes (`data_len` of them).
    pub inputs: Vec<(TensorDesc, Vec<u8>)>,
    /// Each output's descriptor; `data_len` is the capacity to allocate.
    pub outputs: Vec<TensorDesc>,
}

/// One output as produced: its shape and exactly the bytes written.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalOutput {
    /// The produced shape.
    pub shape: Shape,
    /// The output's bytes (the shape's byte size).
    pub data: Vec<u8>,
}

/// Runs one request alone.
pub fn run_local(
    backend: &dyn Backend,
    request: LocalRequest,
) -> Result<Vec<LocalOutput>, LocalRunError> {
    run_local_batch(backend, vec![request])
        .pop()
        .unwrap_or_else(|| Err(BackendError::Runtime("no outcome".into()).into()))
}

/// Runs `requests` in batches of at most [`Backend::max_batch`], as an executor would;
/// one result per request, in order.
pub fn run_local_batch(
    backend: &dyn Backend,
    requests: Vec<LocalRequest>,
) -> Vec<Result<Vec<LocalOutput>, LocalRunError>> {
    let mut results = Vec::with_capacity(requests.len());
    let mut pending = requests.into_iter().peekable();
    while pending.peek().is_some() {
        let chunk: Vec<LocalRequest> = pending.by_ref().take(backend.max_batch().max(1)).collect();
        results.extend(run_chunk(backend, chunk));
    }
    results
}

fn check(backend: &dyn Backend, req: &LocalRequest) -> Result<(), LocalRunError> {
    let info = backend.info();
    let parsed = Request::infer(
        1,
        info.id,
        req.inputs.iter().map(|(d, _)| *d).collect(),
        req.outputs.clone(),
    )?;
    // The daemon's checks: the default device limits, then the model's signature.
    parsed.validate(&DeviceConfig::default())?;
    info.check_request(&parsed)?;
    for (index, (desc, data)) in req.inputs.iter().enumerate() {
        if data.len() as u64 != desc.data_len {
            return Err(LocalRunError::InputLength {
                index,
                got: data.len(),
                expected: desc.data_len,
            });
        }
    }
    Ok(())
}

fn run_chunk(
    backend: &dyn Backend,
    mut chunk: Vec<LocalRequest>,
) -> Vec<Result<Vec<LocalOutput>, LocalRunError>> {
    let checks: Vec<Result<(), LocalRunError>> = chunk.iter().map(|r| check(backend, r)).collect();
    let mut out_bufs: Vec<Vec<Vec<u8>>> = chunk
        .iter()
        .zip(&checks)
        .map(|(r, ok)| match ok {
            // Capacities are within the device's output limit (checked above).
            Ok(()) => r
                .outputs
                .iter()
                .map(|d| vec![0u8; d.data_len as usize])
                .collect(),
            Err(_) => Vec::new(),
        })
        .collect();

    let mut batch: Vec<RequestTensors<'_>> = Vec::new();
    for ((req, outs), ok) in chunk.iter_mut().zip(out_bufs.iter_mut()).zip(&checks) {
        if ok.is_err() {
            continue;
        }
        batch.push(RequestTensors {
            inputs: req
                .inputs
                .iter_mut()
                .map(|(desc, data)| InputTensor {
                    desc,
                    data: VolatileSlice::from(data.as_mut_slice()),
                })
                .collect(),
            outputs: req
                .outputs
                .iter()
                .zip(outs.iter_mut())
                .map(|(desc, buf)| OutputBuffer {
                    desc,
                    buf: VolatileSlice::from(buf.as_mut_slice()),
                })
                .collect(),
        });
    }
    let mut outcomes = if batch.is_empty() {
        Vec::new()
    } else {
        backend.run(&mut batch)
    }
    .into_iter();
    drop(batch);

    let mut results = Vec::with_capacity(checks.len());
    for (i, ok) in checks.into_iter().enumerate() {
        results.push(ok.and_then(|()| {
            let shapes = outcomes.next().unwrap_or_else(|| {
                Err(BackendError::Runtime(
                    "backend returned too few outcomes".into(),
                ))
            })?;
            let desc_of = |k: usize| chunk[i].outputs[k].dtype;
            shapes
                .iter()
                .zip(std::mem::take(&mut out_bufs[i]))
                .enumerate()
                .map(|(k, (shape, mut data))| {
                    let len = shape.byte_len(desc_of(k))?;
                    data.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                    Ok(LocalOutput {
                        shape: *shape,
                        data,
                    })
                })
                .collect()
        }));
    }
    results
}
