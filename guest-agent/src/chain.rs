//! Building request chains (spec §6) and checking what the device wrote back.
//!
//! Each request gets a small *control block* from the DMA pool: its device-readable
//! part holds the encoded request header and tensor descriptors, its device-writable
//! part the output shapes and the response header. Tensors and payload areas are
//! separate descriptors, one per physically contiguous range (normally one per
//! tensor), so the device reads and writes them in place:
//!
//! `[header + descriptors] [input 0..n] [output 0..m | payload] [shapes + response]`
//!
//! Every layout and check comes from the protocol crate; this module only decides
//! where the bytes go and validates every response field against the request.

use ai_infer_protocol::{
    CancelOutcome, ModelInfo, ModelList, Opcode, ProtocolError, Request, Response, ResponseHeader,
    Status, TensorDesc, TraceCounters, DETAIL_NONE, RESPONSE_HEADER_LEN, TENSOR_DESC_LEN,
};
use thiserror::Error;

use crate::dma::{DmaBuffer, DmaError, DmaPool, DMA_ALIGN};
use crate::virtqueue::ChainBuffer;

/// Errors building a chain or accepting its response.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The request breaks the protocol or the device's limits (caught before sending).
    #[error("Invalid request: {0}")]
    Request(ProtocolError),
    /// A tensor's memory is shorter than its descriptor says.
    #[error("Tensor {index} needs {needed} bytes but its buffer has {got}")]
    BufferTooShort {
        /// Tensor index (inputs first).
        index: usize,
        /// Bytes the descriptor needs.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// More descriptors than the device or the queue allow in one chain.
    #[error("Chain needs {needed} descriptors, at most {max} allowed")]
    TooManyDescriptors {
        /// Descriptors needed.
        needed: usize,
        /// The limit.
        max: usize,
    },
    /// Control block allocation or access failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The device broke the protocol in its response.
    #[error("Device response invalid: {0}")]
    BadResponse(String),
}

fn bad<T>(msg: impl Into<String>) -> Result<T, ChainError> {
    Err(ChainError::BadResponse(msg.into()))
}

/// A tensor and the device address ranges of its bytes (inputs: exactly `data_len`
/// bytes; outputs: `data_len` bytes of capacity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// The descriptor sent to the device.
    pub desc: TensorDesc,
    /// Device ranges holding the bytes, in order; their lengths sum to `data_len`.
    pub ranges: Vec<(u64, u32)>,
}

impl TensorRef {
    fn check(&self, index: usize) -> Result<(), ChainError> {
        let total: u64 = self.ranges.iter().map(|r| u64::from(r.1)).sum();
        if total != self.desc.data_len {
            return Err(ChainError::BufferTooShort {
                index,
                needed: self.desc.data_len,
                got: total,
            });
        }
        Ok(())
    }
}

/// A request laid out in DMA memory, ready to submit.
pub struct PreparedChain {
    /// The request as sent.
    pub request: Request,
    /// The descriptors, readable ones first.
    pub buffers: Vec<ChainBuffer>,
    /// Total device-writable bytes (what `used.len` must equal).
    pub writable_len: u64,
    control: DmaBuffer,
    /// Offset of the writable tail (shapes + response) in the control block.
    tail_offset: usize,
    /// Bytes of the writable tail.
    tail_len: usize,
    payload: Option<DmaBuffer>,
}

fn align(n: usize) -> usize {
    (n + DMA_ALIGN - 1) & !(DMA_ALIGN - 1)
}

fn buffer(addr: Option<u64>, len: usize, writable: bool) -> Result<ChainBuffer, ChainError> {
    let addr = addr.ok_or(ChainError::Dma(DmaError::NoDeviceAddresses))?;
    let len = u32::try_from(len).map_err(|_| ChainError::TooManyDescriptors {
        needed: len,
        max: u32::MAX as usize,
    })?;
    Ok(ChainBuffer {
        addr,
        len,
        writable,
    })
}

/// Lays out `request` with a control block from `pool`: `inputs` and `outputs` for
/// INFER, or a payload area of `payload_len` bytes for MODELS and TRACE.
fn prepare(
    pool: &DmaPool,
    request: Request,
    inputs: &[TensorRef],
    outputs: &[TensorRef],
    payload_len: usize,
    max_descriptors: usize,
) -> Result<PreparedChain, ChainError> {
    let head_len = request.encoded_len();
    let tail_len = outputs.len() * TENSOR_DESC_LEN + RESPONSE_HEADER_LEN;
    let tail_offset = align(head_len);
    let mut control = pool.alloc(tail_offset + tail_len)?;
    control.as_mut_slice().fill(0);
    request
        .encode(&mut control.as_mut_slice()[..head_len])
        .map_err(ChainError::Request)?;
    let base = control.device_addr();
    let mut buffers = vec![buffer(base, head_len, false)?];
    for t in inputs {
        buffers.extend(t.ranges.iter().map(|r| ChainBuffer {
            addr: r.0,
            len: r.1,
            writable: false,
        }));
    }
    for t in outputs {
        buffers.extend(t.ranges.iter().map(|r| ChainBuffer {
            addr: r.0,
            len: r.1,
            writable: true,
        }));
    }
    let payload = if payload_len > 0 {
        let mut p = pool.alloc(payload_len)?;
        p.as_mut_slice().fill(0);
        buffers.push(buffer(p.device_addr(), payload_len, true)?);
        Some(p)
    } else {
        None
    };
    buffers.push(buffer(
        base.map(|b| b + tail_offset as u64),
        tail_len,
        true,
    )?);
    if buffers.len() > max_descriptors {
        return Err(ChainError::TooManyDescriptors {
            needed: buffers.len(),
            max: max_descriptors,
        });
    }
    let writable_len = buffers
        .iter()
        .filter(|b| b.writable)
        .map(|b| u64::from(b.len))
        .sum();
    Ok(PreparedChain {
        request,
        buffers,
        writable_len,
        control,
        tail_offset,
        tail_len,
        payload,
    })
}

/// An INFER chain. `request` must already hold the descriptors of `inputs` and
/// `outputs`, and have passed `Request::validate` against the device's limits.
pub fn prepare_infer(
    pool: &DmaPool,
    request: Request,
    inputs: &[TensorRef],
    outputs: &[TensorRef],
    max_descriptors: usize,
) -> Result<PreparedChain, ChainError> {
    for (i, t) in inputs.iter().chain(outputs).enumerate() {
        t.check(i)?;
    }
    prepare(pool, request, inputs, outputs, 0, max_descriptors)
}

/// A MODELS, TRACE or CANCEL chain with `payload_len` bytes of payload area (0 for
/// CANCEL).
pub fn prepare_control(
    pool: &DmaPool,
    request: Request,
    payload_len: usize,
    max_descriptors: usize,
) -> Result<PreparedChain, ChainError> {
    prepare(pool, request, &[], &[], payload_len, max_descriptors)
}

/// What an INFER came back with (the API's `InferResult`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferOutcome {
    /// The request's id (checked against the one sent; cancel uses it).
    pub request_id: u64,
    /// The device's status (BAD_REQUEST when the chain was rejected unreportably).
    pub status: Status,
    /// Offending tensor (inputs first), for tensor errors.
    pub detail: Option<u32>,
    /// Output shapes as produced (OK), or as needed (BUFFER_TOO_SMALL, BAD_TENSOR
    /// after compute); empty otherwise.
    pub outputs: Vec<TensorDesc>,
    /// Nanoseconds queued in the device.
    pub queue_ns: u64,
    /// Nanoseconds of compute (the whole batch's call).
    pub compute_ns: u64,
    /// Requests in the backend call (0 = did not run).
    pub batch_size: u32,
    /// OK: output bytes written; BUFFER_TOO_SMALL: bytes needed.
    pub payload_len: u64,
}

impl InferOutcome {
    /// The outcome a response reports (its shapes are moved in unchecked: callers
    /// check them against the request first).
    pub fn from_response(resp: Response) -> Self {
        let h = resp.header;
        InferOutcome {
            request_id: h.request_id,
            status: h.status,
            detail: (h.detail != DETAIL_NONE).then_some(h.detail),
            outputs: resp.outputs,
            queue_ns: h.queue_ns,
            compute_ns: h.compute_ns,
            batch_size: h.batch_size,
            payload_len: h.payload_len,
        }
    }

    /// The response that reports this outcome (the agent daemon's answer to a client).
    pub fn into_response(self) -> Response {
        Response {
            header: ResponseHeader {
                status: self.status,
                detail: self.detail.unwrap_or(DETAIL_NONE),
                request_id: self.request_id,
                queue_ns: self.queue_ns,
                compute_ns: self.compute_ns,
                payload_len: self.payload_len,
                batch_size: self.batch_size,
                num_outputs: self.outputs.len() as u32,
            },
            outputs: self.outputs,
        }
    }
}

/// The response header and shapes from the control block, after checking `used_len`
/// and the echoed request id. `None` when the device could not report (used.len <
/// 48), which the driver treats as BAD_REQUEST.
fn read_response(chain: &PreparedChain, used_len: u32) -> Result<Option<Response>, ChainError> {
    if (used_len as usize) < RESPONSE_HEADER_LEN {
        return Ok(None);
    }
    if u64::from(used_len) != chain.writable_len {
        return bad(format!(
            "used.len {used_len} is neither < 48 nor the chain's writable length {}",
            chain.writable_len
        ));
    }
    let mut tail = vec![0u8; chain.tail_len];
    chain.control.read_at(chain.tail_offset, &mut tail)?;
    let response = Response::decode(&tail).map_err(|e| ChainError::BadResponse(e.to_string()))?;
    if response.header.request_id != chain.request.header.request_id {
        return bad(format!(
            "response echoes request id {:#x}, sent {:#x}",
            response.header.request_id, chain.request.header.request_id
        ));
    }
    Ok(Some(response))
}

fn check_detail(h: &ResponseHeader, tensors: usize) -> Result<(), ChainError> {
    if h.detail == DETAIL_NONE {
        return Ok(());
    }
    let tensor_status = matches!(
        h.status,
        Status::BadRequest | Status::BadTensor | Status::BufferTooSmall
    );
    if !tensor_status || h.detail as usize >= tensors {
        return bad(format!(
            "detail {} for status {} with {tensors} tensors",
            h.detail, h.status
        ));
    }
    Ok(())
}

/// Checks an INFER response against the request, field by field.
pub fn finish_infer(chain: &PreparedChain, used_len: u32) -> Result<InferOutcome, ChainError> {
    let req = &chain.request;
    let Some(resp) = read_response(chain, used_len)? else {
        return Ok(InferOutcome::from_response(Response {
            header: ResponseHeader::new(Status::BadRequest, req.header.request_id),
            outputs: Vec::new(),
        }));
    };
    let h = resp.header;
    let m = req.outputs.len();
    check_detail(&h, req.inputs.len() + m)?;
    let shapes = resp.outputs;
    match h.status {
        Status::Ok => {
            if shapes.len() != m {
                return bad(format!("OK with {} shapes for {m} outputs", shapes.len()));
            }
            let mut total = 0u64;
            for (k, (got, sent)) in shapes.iter().zip(&req.outputs).enumerate() {
                let expected = sent
                    .check_produced(&got.shape)
                    .map_err(|e| ChainError::BadResponse(format!("output {k}: {e}")))?;
                if got.dtype != sent.dtype || got.data_len != expected.data_len {
                    return bad(format!(
                        "output {k}: shape entry {got:?} does not match {sent:?} (expected {} bytes)",
                        expected.data_len
                    ));
                }
                total += got.data_len;
            }
            if h.payload_len != total {
                return bad(format!(
                    "payload_len {} but outputs hold {total} bytes",
                    h.payload_len
                ));
            }
            if h.batch_size == 0 {
                return bad("OK with batch_size 0");
            }
        }
        Status::BufferTooSmall | Status::BadTensor if !shapes.is_empty() => {
            if shapes.len() != m {
                return bad(format!(
                    "{} with {} shapes for {m} outputs",
                    h.status,
                    shapes.len()
                ));
            }
            for (k, (got, sent)) in shapes.iter().zip(&req.outputs).enumerate() {
                let needed = got
                    .byte_len()
                    .map_err(|e| ChainError::BadResponse(e.to_string()))?;
                if got.dtype != sent.dtype || got.data_len != needed {
                    return bad(format!(
                        "output {k}: needed-shape entry {got:?} is inconsistent"
                    ));
                }
            }
        }
        _ => {
            if !shapes.is_empty() {
                return bad(format!("{} with {} output shapes", h.status, shapes.len()));
            }
        }
    }
    Ok(InferOutcome::from_response(Response {
        header: h,
        outputs: shapes,
    }))
}

/// What a MODELS or TRACE came back with.
pub enum PayloadOutcome<T> {
    /// The decoded payload.
    Done(T),
    /// The payload area was too small; this many bytes are needed.
    NeedBytes(u64),
    /// Another status (e.g. THROTTLED).
    Failed(Status),
}

fn finish_payload<T>(
    chain: &PreparedChain,
    used_len: u32,
    decode: impl FnOnce(&[u8]) -> Result<T, ProtocolError>,
) -> Result<PayloadOutcome<T>, ChainError> {
    let Some(resp) = read_response(chain, used_len)? else {
        return Ok(PayloadOutcome::Failed(Status::BadRequest));
    };
    let h = resp.header;
    if !resp.outputs.is_empty() {
        return bad(format!(
            "{} response with output shapes",
            chain.request.header.opcode
        ));
    }
    let capacity = chain.payload.as_ref().map_or(0, DmaBuffer::len) as u64;
    match h.status {
        Status::Ok => {
            if h.payload_len > capacity {
                return bad(format!(
                    "payload_len {} exceeds the area of {capacity}",
                    h.payload_len
                ));
            }
            let mut bytes = vec![0u8; h.payload_len as usize];
            if let Some(p) = &chain.payload {
                p.read_at(0, &mut bytes)?;
            }
            decode(&bytes)
                .map(PayloadOutcome::Done)
                .map_err(|e| ChainError::BadResponse(e.to_string()))
        }
        Status::BufferTooSmall => {
            if h.payload_len <= capacity {
                return bad(format!(
                    "BUFFER_TOO_SMALL asks for {} with {capacity} given",
                    h.payload_len
                ));
            }
            Ok(PayloadOutcome::NeedBytes(h.payload_len))
        }
        other => Ok(PayloadOutcome::Failed(other)),
    }
}

/// Checks a MODELS response: the list decodes, every entry is valid and ids unique.
pub fn finish_models(
    chain: &PreparedChain,
    used_len: u32,
) -> Result<PayloadOutcome<Vec<ModelInfo>>, ChainError> {
    finish_payload(chain, used_len, |bytes| {
        let list = ModelList::decode(bytes)?;
        for m in &list.models {
            m.validate()?;
        }
        Ok(list.models)
    })
}

/// Checks a TRACE response.
pub fn finish_trace(
    chain: &PreparedChain,
    used_len: u32,
) -> Result<PayloadOutcome<TraceCounters>, ChainError> {
    finish_payload(chain, used_len, |bytes| {
        if bytes.len() != TraceCounters::LEN {
            return Err(ProtocolError::Truncated {
                what: "trace counters",
                needed: TraceCounters::LEN,
                got: bytes.len(),
            });
        }
        TraceCounters::decode(bytes)
    })
}

/// Checks a CANCEL response and returns its outcome.
pub fn finish_cancel(
    chain: &PreparedChain,
    used_len: u32,
) -> Result<Result<CancelOutcome, Status>, ChainError> {
    debug_assert_eq!(chain.request.header.opcode, Opcode::Cancel);
    let Some(resp) = read_response(chain, used_len)? else {
        return Ok(Err(Status::BadRequest));
    };
    if !resp.outputs.is_empty() {
        return bad("CANCEL response with output shapes");
    }
    match resp.header.status {
        Status::Ok => resp
            .header
            .cancel_outcome()
            .map(Ok)
            .map_err(|e| ChainError::BadResponse(e.to_string())),
        other => Ok(Err(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_infer_protocol::{ChainLayout, DType, DeviceConfig, Shape};

    fn pool() -> DmaPool {
        DmaPool::fake(
            4096,
            &(0..16).map(|i| 0x100_0000 + i * 4096).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn infer_chain(pool: &DmaPool) -> (PreparedChain, DmaBuffer, DmaBuffer) {
        let input = pool.alloc(16).unwrap();
        let output = pool.alloc(8).unwrap();
        let req = Request::infer(
            0x0102_0304_0506_0708,
            7,
            vec![TensorDesc::input(DType::F32, &[1, 4]).unwrap()],
            vec![TensorDesc::output(DType::F32, &[1, 2], 8).unwrap()],
        )
        .unwrap();
        let i = TensorRef {
            desc: req.inputs[0],
            ranges: pool.device_ranges(input.offset(), 16).unwrap(),
        };
        let o = TensorRef {
            desc: req.outputs[0],
            ranges: pool.device_ranges(output.offset(), 8).unwrap(),
        };
        (
            prepare_infer(pool, req, &[i], &[o], 256).unwrap(),
            input,
            output,
        )
    }

    /// Writes `resp` at the end of the chain's writable stream, as a device does.
    fn respond(chain: &PreparedChain, resp: &Response) {
        let mut tail = vec![0u8; chain.tail_len];
        let n = resp.encoded_len();
        resp.encode(&mut tail[chain.tail_len - n..]).unwrap();
        chain.control.write_at(chain.tail_offset, &tail).unwrap();
    }

    fn ok_response(chain: &PreparedChain) -> Response {
        let shape = TensorDesc::produced(DType::F32, Shape::new(&[1, 2]).unwrap()).unwrap();
        Response {
            header: ResponseHeader {
                payload_len: 8,
                batch_size: 1,
                num_outputs: 1,
                queue_ns: 12_000,
                compute_ns: 85_000,
                ..ResponseHeader::new(Status::Ok, chain.request.header.request_id)
            },
            outputs: vec![shape],
        }
    }

    #[test]
    fn infer_chain_is_laid_out_per_spec() {
        let pool = pool();
        let (chain, input, output) = infer_chain(&pool);
        // [header+descs] [input] [output] [shapes+response]
        assert_eq!(chain.buffers.len(), 4);
        let b = &chain.buffers;
        assert_eq!((b[0].len, b[0].writable), (200, false));
        assert_eq!(
            (b[1].addr, b[1].len, b[1].writable),
            (input.device_addr().unwrap(), 16, false)
        );
        assert_eq!(
            (b[2].addr, b[2].len, b[2].writable),
            (output.device_addr().unwrap(), 8, true)
        );
        assert_eq!((b[3].len, b[3].writable), (128, true));
        assert_eq!(b[3].addr % 64, 0);
        assert_eq!(chain.writable_len, 136);
        // The device's own check of the lengths accepts it.
        let mut header = vec![0u8; 200];
        chain.control.read_at(0, &mut header).unwrap();
        let parsed = Request::parse(&header, &DeviceConfig::default()).unwrap();
        assert_eq!(parsed, chain.request);
        ChainLayout::from_chain(&parsed, 216, 136).unwrap();
    }

    #[test]
    fn accepts_a_correct_ok_response() {
        let pool = pool();
        let (chain, _i, _o) = infer_chain(&pool);
        respond(&chain, &ok_response(&chain));
        let out = finish_infer(&chain, 136).unwrap();
        assert_eq!(out.status, Status::Ok);
        assert_eq!(out.outputs[0].shape.dims(), &[1, 2]);
        assert_eq!(
            (out.queue_ns, out.compute_ns, out.batch_size),
            (12_000, 85_000, 1)
        );
    }

    #[test]
    fn unreportable_chain_is_bad_request() {
        let pool = pool();
        let (chain, _i, _o) = infer_chain(&pool);
        let out = finish_infer(&chain, 0).unwrap();
        assert_eq!(out.status, Status::BadRequest);
        assert_eq!(finish_infer(&chain, 47).unwrap().status, Status::BadRequest);
    }

    #[test]
    fn rejects_every_inconsistent_response_field() {
        let pool = pool();
        let (chain, _i, _o) = infer_chain(&pool);
        let good = ok_response(&chain);
        type Mutation = Box<dyn Fn(&mut Response)>;
        let cases: Vec<(&str, Mutation, u32)> = vec![
            ("used len", Box::new(|_| {}), 135),
            ("request id", Box::new(|r| r.header.request_id += 1), 136),
            (
                "no shapes",
                Box::new(|r| {
                    r.outputs.clear();
                    r.header.num_outputs = 0
                }),
                136,
            ),
            ("payload len", Box::new(|r| r.header.payload_len = 9), 136),
            ("batch 0", Box::new(|r| r.header.batch_size = 0), 136),
            ("dtype", Box::new(|r| r.outputs[0].dtype = DType::I32), 136),
            (
                "shape",
                Box::new(|r| {
                    r.outputs[0] =
                        TensorDesc::produced(DType::F32, Shape::new(&[1, 1]).unwrap()).unwrap();
                    r.header.payload_len = 4;
                }),
                136,
            ),
            (
                "too big",
                Box::new(|r| {
                    r.outputs[0] =
                        TensorDesc::produced(DType::F32, Shape::new(&[1, 2, 2]).unwrap()).unwrap();
                    r.header.payload_len = 16;
                }),
                136,
            ),
            (
                "data_len",
                Box::new(|r| {
                    r.outputs[0].data_len = 4;
                    r.header.payload_len = 4
                }),
                136,
            ),
            ("detail on OK", Box::new(|r| r.header.detail = 0), 136),
            (
                "shapes on error",
                Box::new(|r| r.header.status = Status::Throttled),
                136,
            ),
            (
                "detail range",
                Box::new(|r| {
                    r.header = ResponseHeader {
                        detail: 2,
                        ..ResponseHeader::new(Status::BadTensor, r.header.request_id)
                    };
                    r.outputs.clear();
                }),
                136,
            ),
        ];
        for (name, mutate, used) in cases {
            let mut r = good.clone();
            mutate(&mut r);
            respond(&chain, &r);
            assert!(
                matches!(finish_infer(&chain, used), Err(ChainError::BadResponse(_))),
                "{name} accepted"
            );
        }
        // More shapes than outputs: decode reads past the tail it owns.
        let mut tail = vec![0u8; 128];
        let mut h = good.header;
        h.num_outputs = 2;
        h.encode(&mut tail[80..]).unwrap();
        chain.control.write_at(chain.tail_offset, &tail).unwrap();
        assert!(matches!(
            finish_infer(&chain, 136),
            Err(ChainError::BadResponse(_))
        ));
        // Status 13 is not a status.
        respond(&chain, &good);
        let mut st = [0u8; 4];
        st.copy_from_slice(&13u32.to_le_bytes());
        chain.control.write_at(chain.tail_offset + 80, &st).unwrap();
        assert!(matches!(
            finish_infer(&chain, 136),
            Err(ChainError::BadResponse(_))
        ));
    }

    #[test]
    fn buffer_too_small_reports_needed_shapes() {
        let pool = pool();
        let (chain, _i, _o) = infer_chain(&pool);
        let needed = TensorDesc::produced(DType::F32, Shape::new(&[1, 4]).unwrap()).unwrap();
        let r = Response {
            header: ResponseHeader {
                detail: 1,
                payload_len: 16,
                num_outputs: 1,
                ..ResponseHeader::new(Status::BufferTooSmall, chain.request.header.request_id)
            },
            outputs: vec![needed],
        };
        respond(&chain, &r);
        let out = finish_infer(&chain, 136).unwrap();
        assert_eq!(
            (out.status, out.detail, out.payload_len),
            (Status::BufferTooSmall, Some(1), 16)
        );
        assert_eq!(out.outputs, vec![needed]);
    }

    #[test]
    fn descriptor_limits_and_short_buffers() {
        let pool = pool();
        let req = Request::infer(
            1,
            7,
            vec![TensorDesc::input(DType::F32, &[1, 4]).unwrap()],
            vec![TensorDesc::output(DType::F32, &[1, 2], 8).unwrap()],
        )
        .unwrap();
        let short = TensorRef {
            desc: req.inputs[0],
            ranges: vec![(0x100_0000, 12)],
        };
        let out = TensorRef {
            desc: req.outputs[0],
            ranges: vec![(0x100_1000, 8)],
        };
        assert!(matches!(
            prepare_infer(
                &pool,
                req.clone(),
                &[short],
                std::slice::from_ref(&out),
                256
            ),
            Err(ChainError::BufferTooShort {
                index: 0,
                needed: 16,
                got: 12
            })
        ));
        let split = TensorRef {
            desc: req.inputs[0],
            ranges: vec![(0x100_0000, 8), (0x100_2000, 8)],
        };
        assert!(matches!(
            prepare_infer(
                &pool,
                req.clone(),
                std::slice::from_ref(&split),
                std::slice::from_ref(&out),
                4
            ),
            Err(ChainError::TooManyDescriptors { needed: 5, max: 4 })
        ));
        assert_eq!(
            prepare_infer(&pool, req, &[split], &[out], 5)
                .unwrap()
                .buffers
                .len(),
            5
        );
    }

    #[test]
    fn models_and_trace_payloads() {
        let pool = pool();
        let chain = prepare_control(&pool, Request::models(5), 64, 8).unwrap();
        assert_eq!(chain.buffers.len(), 3);
        assert_eq!(chain.writable_len, 64 + 48);
        let mut h = ResponseHeader::new(Status::BufferTooSmall, 5);
        h.payload_len = 1000;
        respond(
            &chain,
            &Response {
                header: h,
                outputs: vec![],
            },
        );
        assert!(matches!(
            finish_models(&chain, 112).unwrap(),
            PayloadOutcome::NeedBytes(1000)
        ));
        h.payload_len = 64;
        respond(
            &chain,
            &Response {
                header: h,
                outputs: vec![],
            },
        );
        assert!(finish_models(&chain, 112).is_err(), "too small yet fits");

        let chain = prepare_control(&pool, Request::trace(6), TraceCounters::LEN, 8).unwrap();
        let t = TraceCounters {
            completed: 3,
            ..Default::default()
        };
        let mut payload = vec![0u8; TraceCounters::LEN];
        t.encode(&mut payload).unwrap();
        chain
            .payload
            .as_ref()
            .unwrap()
            .write_at(0, &payload)
            .unwrap();
        let mut h = ResponseHeader::new(Status::Ok, 6);
        h.payload_len = TraceCounters::LEN as u64;
        respond(
            &chain,
            &Response {
                header: h,
                outputs: vec![],
            },
        );
        match finish_trace(&chain, (TraceCounters::LEN + 48) as u32).unwrap() {
            PayloadOutcome::Done(got) => assert_eq!(got, t),
            _ => panic!("trace not decoded"),
        }
        h.payload_len = 100;
        respond(
            &chain,
            &Response {
                header: h,
                outputs: vec![],
            },
        );
        assert!(finish_trace(&chain, (TraceCounters::LEN + 48) as u32).is_err());
    }

    #[test]
    fn cancel_outcomes() {
        let pool = pool();
        let chain = prepare_control(&pool, Request::cancel(9, 4), 0, 8).unwrap();
        assert_eq!(chain.writable_len, 48);
        respond(
            &chain,
            &Response {
                header: ResponseHeader::cancel(9, CancelOutcome::Cancelled),
                outputs: vec![],
            },
        );
        assert_eq!(
            finish_cancel(&chain, 48).unwrap(),
            Ok(CancelOutcome::Cancelled)
        );
        respond(
            &chain,
            &Response {
                header: ResponseHeader::new(Status::Ok, 9),
                outputs: vec![],
            },
        );
        assert!(finish_cancel(&chain, 48).is_err(), "OK without an outcome");
    }
}
