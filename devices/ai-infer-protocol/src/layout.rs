//! Where everything sits in a descriptor chain.
//!
//! The device treats the device-readable descriptors of a chain as one byte stream
//! and the device-writable ones as another (virtio framing rules: the split into
//! descriptors carries no meaning). This module computes the offsets of every part of
//! both streams from the request, so that driver and device agree on them.

use crate::consts::{REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, TENSOR_DESC_LEN};
use crate::error::{ChainPart, ProtocolError};
use crate::opcode::Opcode;
use crate::request::Request;
use crate::tensor::{Direction, TensorDesc};

/// A byte range `offset..offset + len` inside one of the two streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ByteRange {
    /// Start.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

impl ByteRange {
    /// End (exclusive). Cannot overflow for ranges built by [`ChainLayout`].
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Where the response header of a chain is: the last [`RESPONSE_HEADER_LEN`] bytes of
/// the device-writable stream. `None` when the stream is too short to hold one, in
/// which case the device completes the chain with `used.len = 0` and writes nothing.
///
/// This does not depend on parsing the request, so a device can report an error for
/// any request, however malformed, as long as the chain itself is sound.
pub fn response_range(writable_len: u64) -> Option<ByteRange> {
    let offset = writable_len.checked_sub(RESPONSE_HEADER_LEN as u64)?;
    Some(ByteRange {
        offset,
        len: RESPONSE_HEADER_LEN as u64,
    })
}

/// Offsets of every part of a chain for one request.
///
/// Readable stream: request header, input descriptors, output descriptors, then the
/// data of each input in order. Writable stream: each output buffer in order (INFER)
/// or the payload (MODELS, TRACE), then one output shape per output (INFER), then the
/// response header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLayout {
    /// Total device-readable bytes.
    pub readable_len: u64,
    /// Total device-writable bytes.
    pub writable_len: u64,
    /// Data of each input tensor, in the readable stream.
    pub inputs: Vec<ByteRange>,
    /// Buffer of each output tensor, in the writable stream.
    pub outputs: Vec<ByteRange>,
    /// MODELS / TRACE payload area in the writable stream (empty for other opcodes).
    pub payload: ByteRange,
    /// Output shape entries (one 80-byte tensor descriptor per output).
    pub shapes: ByteRange,
    /// The response header.
    pub response: ByteRange,
}

fn add(a: u64, b: u64, direction: Direction) -> Result<u64, ProtocolError> {
    a.checked_add(b).ok_or(ProtocolError::TotalBytesTooLarge {
        direction,
        total: u64::MAX,
        max: u64::MAX,
    })
}

fn ranges(
    start: u64,
    descs: &[TensorDesc],
    direction: Direction,
) -> Result<(Vec<ByteRange>, u64), ProtocolError> {
    let mut offset = start;
    let mut out = Vec::with_capacity(descs.len());
    for d in descs {
        out.push(ByteRange {
            offset,
            len: d.data_len,
        });
        offset = add(offset, d.data_len, direction)?;
    }
    Ok((out, offset))
}

impl ChainLayout {
    /// The layout a driver builds for `req`; `payload_capacity` is the size of the
    /// payload area it provides for MODELS or TRACE and must be 0 otherwise.
    pub fn new(req: &Request, payload_capacity: u64) -> Result<Self, ProtocolError> {
        let descs = (req.inputs.len() + req.outputs.len()) as u64;
        let descs_end = REQUEST_HEADER_LEN as u64 + descs * TENSOR_DESC_LEN as u64;
        let (inputs, readable_len) = ranges(descs_end, &req.inputs, Direction::Input)?;
        let (outputs, outputs_end) = ranges(0, &req.outputs, Direction::Output)?;
        let payload = ByteRange {
            offset: outputs_end,
            len: payload_capacity,
        };
        let shapes = ByteRange {
            offset: add(payload.offset, payload.len, Direction::Output)?,
            len: req.outputs.len() as u64 * TENSOR_DESC_LEN as u64,
        };
        let response = ByteRange {
            offset: add(shapes.offset, shapes.len, Direction::Output)?,
            len: RESPONSE_HEADER_LEN as u64,
        };
        let writable_len = add(response.offset, response.len, Direction::Output)?;
        Ok(ChainLayout {
            readable_len,
            writable_len,
            inputs,
            outputs,
            payload,
            shapes,
            response,
        })
    }

    /// The layout of a chain the device received, checking its lengths: exact for
    /// INFER and CANCEL; for MODELS and TRACE the readable part is exact and
    /// whatever the writable part holds beyond the response header is payload area.
    pub fn from_chain(
        req: &Request,
        readable_len: u64,
        writable_len: u64,
    ) -> Result<Self, ProtocolError> {
        let min = ChainLayout::new(req, 0)?;
        if readable_len != min.readable_len {
            return Err(ProtocolError::ChainLenMismatch {
                part: ChainPart::Readable,
                expected: min.readable_len,
                got: readable_len,
                exact: true,
            });
        }
        match req.header.opcode {
            Opcode::Models | Opcode::Trace => {
                if writable_len < min.writable_len {
                    return Err(ProtocolError::ChainLenMismatch {
                        part: ChainPart::Writable,
                        expected: min.writable_len,
                        got: writable_len,
                        exact: false,
                    });
                }
                ChainLayout::new(req, writable_len - min.writable_len)
            }
            Opcode::Infer | Opcode::Cancel => {
                if writable_len != min.writable_len {
                    return Err(ProtocolError::ChainLenMismatch {
                        part: ChainPart::Writable,
                        expected: min.writable_len,
                        got: writable_len,
                        exact: true,
                    });
                }
                Ok(min)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn infer() -> Request {
        Request::infer(
            1,
            7,
            vec![
                TensorDesc::input(DType::F32, &[1, 4]).unwrap(),
                TensorDesc::input(DType::U8, &[3]).unwrap(),
            ],
            vec![
                TensorDesc::output(DType::F32, &[1, 2], 8).unwrap(),
                TensorDesc::output(DType::I64, &[0], 64).unwrap(),
            ],
        )
        .unwrap()
    }

    #[test]
    fn response_is_always_the_last_48_bytes() {
        assert_eq!(response_range(47), None);
        assert_eq!(response_range(48), Some(ByteRange { offset: 0, len: 48 }));
        assert_eq!(
            response_range(1000),
            Some(ByteRange {
                offset: 952,
                len: 48
            })
        );
    }

    #[test]
    fn infer_layout_offsets() {
        let l = ChainLayout::new(&infer(), 0).unwrap();
        // 40 + 4 * 80 = 360 bytes of request, then 16 + 3 bytes of inputs.
        assert_eq!(
            l.inputs,
            vec![
                ByteRange {
                    offset: 360,
                    len: 16
                },
                ByteRange {
                    offset: 376,
                    len: 3
                }
            ]
        );
        assert_eq!(l.readable_len, 379);
        assert_eq!(
            l.outputs,
            vec![
                ByteRange { offset: 0, len: 8 },
                ByteRange { offset: 8, len: 64 }
            ]
        );
        assert_eq!(l.payload, ByteRange { offset: 72, len: 0 });
        assert_eq!(
            l.shapes,
            ByteRange {
                offset: 72,
                len: 160
            }
        );
        assert_eq!(
            l.response,
            ByteRange {
                offset: 232,
                len: 48
            }
        );
        assert_eq!(l.writable_len, 280);
        assert_eq!(response_range(l.writable_len), Some(l.response));
        assert_eq!(ChainLayout::from_chain(&infer(), 379, 280), Ok(l));
    }

    #[test]
    fn infer_lengths_must_be_exact() {
        for (r, w, part, expected, got) in [
            (378, 280, ChainPart::Readable, 379, 378),
            (380, 280, ChainPart::Readable, 379, 380),
            (379, 279, ChainPart::Writable, 280, 279),
            (379, 281, ChainPart::Writable, 280, 281),
        ] {
            assert_eq!(
                ChainLayout::from_chain(&infer(), r, w),
                Err(ProtocolError::ChainLenMismatch {
                    part,
                    expected,
                    got,
                    exact: true
                })
            );
        }
    }

    #[test]
    fn models_and_trace_payload_is_whatever_precedes_the_response() {
        let l = ChainLayout::from_chain(&Request::trace(1), 40, 48 + 4096).unwrap();
        assert_eq!(
            l.payload,
            ByteRange {
                offset: 0,
                len: 4096
            }
        );
        assert_eq!(
            l.response,
            ByteRange {
                offset: 4096,
                len: 48
            }
        );
        let l = ChainLayout::from_chain(&Request::models(1), 40, 48).unwrap();
        assert_eq!(l.payload.len, 0);
        assert_eq!(
            ChainLayout::from_chain(&Request::models(1), 40, 47),
            Err(ProtocolError::ChainLenMismatch {
                part: ChainPart::Writable,
                expected: 48,
                got: 47,
                exact: false
            })
        );
        assert_eq!(
            ChainLayout::from_chain(&Request::models(1), 41, 100),
            Err(ProtocolError::ChainLenMismatch {
                part: ChainPart::Readable,
                expected: 40,
                got: 41,
                exact: true
            })
        );
    }

    #[test]
    fn cancel_chain_is_exactly_header_and_response() {
        let req = Request::cancel(2, 1);
        let l = ChainLayout::from_chain(&req, 40, 48).unwrap();
        assert_eq!(l.readable_len, 40);
        assert_eq!(l.writable_len, 48);
        assert!(matches!(
            ChainLayout::from_chain(&req, 40, 96),
            Err(ProtocolError::ChainLenMismatch { exact: true, .. })
        ));
    }

    #[test]
    fn overflowing_lengths_are_errors() {
        let mut req = infer();
        req.outputs[0].data_len = u64::MAX;
        assert!(matches!(
            ChainLayout::new(&req, 0),
            Err(ProtocolError::TotalBytesTooLarge {
                direction: Direction::Output,
                ..
            })
        ));
        let mut req = infer();
        req.inputs[1].data_len = u64::MAX - 370;
        assert!(matches!(
            ChainLayout::new(&req, 0),
            Err(ProtocolError::TotalBytesTooLarge {
                direction: Direction::Input,
                ..
            })
        ));
        assert!(ChainLayout::new(&Request::trace(1), u64::MAX - 48).is_ok());
        assert!(ChainLayout::new(&Request::trace(1), u64::MAX - 47).is_err());
    }
}
