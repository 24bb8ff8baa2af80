//! The response: output shapes (INFER) followed by the 48-byte response header, at
//! the very end of the device-writable stream.

use crate::consts::{DETAIL_NONE, MAX_TENSORS, RESPONSE_HEADER_LEN, TENSOR_DESC_LEN};
use crate::error::ProtocolError;
use crate::status::{CancelOutcome, Status};
use crate::tensor::{Direction, TensorDesc};
use crate::wire::{Reader, Writer};

/// The response header (`virtio_ai_infer_resp`), the last 48 bytes of every chain's
/// device-writable part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResponseHeader {
    /// Outcome.
    pub status: Status,
    /// Status-specific detail: index of the offending tensor for tensor errors, the
    /// [`CancelOutcome`] for an OK CANCEL, otherwise [`DETAIL_NONE`].
    pub detail: u32,
    /// The request's `request_id`, echoed (0 if the header was too short to hold one).
    pub request_id: u64,
    /// Nanoseconds from the device taking the chain to the start of compute (or to
    /// rejection, for a request that never ran).
    pub queue_ns: u64,
    /// Nanoseconds the backend call that computed this request took (the whole batch
    /// when batched); 0 if it never ran.
    pub compute_ns: u64,
    /// Bytes of payload written (MODELS, TRACE), or total output bytes written
    /// (INFER); for BUFFER_TOO_SMALL the number of bytes that would be needed.
    pub payload_len: u64,
    /// Number of requests in the backend call that computed this one (1 = alone,
    /// 0 = never ran).
    pub batch_size: u32,
    /// Number of valid output shape entries in front of this header: the request's
    /// `num_outputs` when shapes are reported, else 0.
    pub num_outputs: u32,
}

impl ResponseHeader {
    /// Size on the wire.
    pub const LEN: usize = RESPONSE_HEADER_LEN;

    /// A response with `status` for `request_id`, all other fields zero / none.
    pub fn new(status: Status, request_id: u64) -> Self {
        ResponseHeader {
            status,
            detail: DETAIL_NONE,
            request_id,
            queue_ns: 0,
            compute_ns: 0,
            payload_len: 0,
            batch_size: 0,
            num_outputs: 0,
        }
    }

    /// The response for a request rejected with `error`: its status, its detail, and
    /// for BUFFER_TOO_SMALL the bytes needed in `payload_len`.
    pub fn from_error(request_id: u64, error: &ProtocolError) -> Self {
        ResponseHeader {
            detail: error.detail(),
            payload_len: error.needed_bytes().unwrap_or(0),
            ..ResponseHeader::new(error.status(), request_id)
        }
    }

    /// The response to an OK CANCEL with its outcome.
    pub fn cancel(request_id: u64, outcome: CancelOutcome) -> Self {
        ResponseHeader {
            detail: outcome.into(),
            ..ResponseHeader::new(Status::Ok, request_id)
        }
    }

    /// The outcome of a CANCEL, read from `detail`.
    pub fn cancel_outcome(&self) -> Result<CancelOutcome, ProtocolError> {
        CancelOutcome::try_from(self.detail)
    }

    /// Writes the 48-byte wire form; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer::new(buf, "response header", Self::LEN)?;
        w.u32(self.status.into())?;
        w.u32(self.detail)?;
        w.u64(self.request_id)?;
        w.u64(self.queue_ns)?;
        w.u64(self.compute_ns)?;
        w.u64(self.payload_len)?;
        w.u32(self.batch_size)?;
        w.u32(self.num_outputs)?;
        Ok(w.position())
    }

    /// Reads the first 48 bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "response header", Self::LEN)?;
        let status = Status::try_from(r.u32()?)?;
        let detail = r.u32()?;
        let request_id = r.u64()?;
        let queue_ns = r.u64()?;
        let compute_ns = r.u64()?;
        let payload_len = r.u64()?;
        let batch_size = r.u32()?;
        let num_outputs = r.u32()?;
        let count = usize::try_from(num_outputs).unwrap_or(usize::MAX);
        if count > MAX_TENSORS {
            return Err(ProtocolError::TooManyTensors {
                direction: Direction::Output,
                count,
                max: MAX_TENSORS,
            });
        }
        Ok(ResponseHeader {
            status,
            detail,
            request_id,
            queue_ns,
            compute_ns,
            payload_len,
            batch_size,
            num_outputs,
        })
    }
}

/// The tail of a chain's writable stream: output shapes, then the response header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Response {
    /// The header; `num_outputs` equals `outputs.len()`.
    pub header: ResponseHeader,
    /// Output shapes as produced (`data_len` = bytes written to each output buffer).
    pub outputs: Vec<TensorDesc>,
}

impl Response {
    /// Bytes of shapes plus header.
    pub fn encoded_len(&self) -> usize {
        self.outputs.len() * TENSOR_DESC_LEN + RESPONSE_HEADER_LEN
    }

    /// Writes shapes then header at the start of `buf` (the device writes this at
    /// `writable_len - encoded_len()`); returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let actual = self.outputs.len();
        if usize::try_from(self.header.num_outputs).ok() != Some(actual) {
            return Err(ProtocolError::HeaderCountMismatch {
                direction: Direction::Output,
                header: usize::try_from(self.header.num_outputs).unwrap_or(usize::MAX),
                actual,
            });
        }
        if actual > MAX_TENSORS {
            return Err(ProtocolError::TooManyTensors {
                direction: Direction::Output,
                count: actual,
                max: MAX_TENSORS,
            });
        }
        let needed = self.encoded_len();
        if buf.len() < needed {
            return Err(ProtocolError::BufferTooSmall {
                what: "response",
                needed,
                got: buf.len(),
            });
        }
        let mut off = 0;
        for shape in &self.outputs {
            off += shape.encode(&mut buf[off..])?;
        }
        off += self.header.encode(&mut buf[off..])?;
        Ok(off)
    }

    /// Reads a response from the END of `buf`, which must end where the chain's
    /// writable stream ends: the header is the last 48 bytes and its `num_outputs`
    /// shapes are immediately before it.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let header_at =
            buf.len()
                .checked_sub(RESPONSE_HEADER_LEN)
                .ok_or(ProtocolError::Truncated {
                    what: "response header",
                    needed: RESPONSE_HEADER_LEN,
                    got: buf.len(),
                })?;
        let header = ResponseHeader::decode(&buf[header_at..])?;
        // decode() bounded num_outputs by MAX_TENSORS.
        let count = header.num_outputs as usize;
        let shapes_len = count * TENSOR_DESC_LEN;
        let shapes_at = header_at
            .checked_sub(shapes_len)
            .ok_or(ProtocolError::Truncated {
                what: "response",
                needed: shapes_len + RESPONSE_HEADER_LEN,
                got: buf.len(),
            })?;
        let outputs = buf[shapes_at..header_at]
            .chunks_exact(TENSOR_DESC_LEN)
            .map(TensorDesc::decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response { header, outputs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::tensor::Shape;

    fn sample() -> Response {
        let out = TensorDesc::output(DType::F32, &[0, 2], 64)
            .unwrap()
            .check_produced(&Shape::new(&[1, 2]).unwrap())
            .unwrap();
        Response {
            header: ResponseHeader {
                status: Status::Ok,
                detail: DETAIL_NONE,
                request_id: 0x1122_3344_5566_7788,
                queue_ns: 12_000,
                compute_ns: 85_000,
                payload_len: 8,
                batch_size: 1,
                num_outputs: 1,
            },
            outputs: vec![out],
        }
    }

    fn encoded(resp: &Response) -> Vec<u8> {
        let mut buf = vec![0u8; resp.encoded_len()];
        assert_eq!(resp.encode(&mut buf), Ok(resp.encoded_len()));
        buf
    }

    #[test]
    fn header_wire_layout_is_exact() {
        let mut b = [0u8; 48];
        sample().header.encode(&mut b).unwrap();
        assert_eq!(&b[0..4], &[0; 4], "status OK");
        assert_eq!(&b[4..8], &[0xff; 4], "detail none");
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..24], &12_000u64.to_le_bytes());
        assert_eq!(&b[24..32], &85_000u64.to_le_bytes());
        assert_eq!(&b[32..40], &8u64.to_le_bytes());
        assert_eq!(&b[40..44], &1u32.to_le_bytes());
        assert_eq!(&b[44..48], &1u32.to_le_bytes());
    }

    #[test]
    fn round_trip_every_status() {
        for status in Status::ALL {
            let h = ResponseHeader {
                queue_ns: 1,
                compute_ns: 2,
                payload_len: 3,
                batch_size: 4,
                ..ResponseHeader::new(status, 99)
            };
            let mut b = [0u8; 48];
            assert_eq!(h.encode(&mut b), Ok(48));
            assert_eq!(ResponseHeader::decode(&b), Ok(h));
        }
        let resp = sample();
        assert_eq!(Response::decode(&encoded(&resp)), Ok(resp));
    }

    #[test]
    fn decode_reads_from_the_end_of_the_writable_stream() {
        let resp = sample();
        let mut stream = vec![0xeeu8; 8]; // the output buffer in front
        stream.extend(encoded(&resp));
        assert_eq!(Response::decode(&stream), Ok(resp));
    }

    #[test]
    fn decode_rejects_truncation_and_bad_values() {
        let bytes = encoded(&sample());
        for len in 0..RESPONSE_HEADER_LEN {
            assert_eq!(
                ResponseHeader::decode(&bytes[80..80 + len]),
                Err(ProtocolError::Truncated {
                    what: "response header",
                    needed: 48,
                    got: len
                })
            );
        }
        // Header present but the shape in front of it cut off.
        for cut in 1..=TENSOR_DESC_LEN {
            assert_eq!(
                Response::decode(&bytes[cut..]),
                Err(ProtocolError::Truncated {
                    what: "response",
                    needed: 128,
                    got: 128 - cut
                })
            );
        }
        let mut b = bytes.clone();
        b[80..84].copy_from_slice(&13u32.to_le_bytes());
        assert_eq!(Response::decode(&b), Err(ProtocolError::UnknownStatus(13)));
        let mut b = bytes;
        b[124..128].copy_from_slice(&17u32.to_le_bytes());
        assert_eq!(
            Response::decode(&b),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Output,
                count: 17,
                max: 16
            })
        );
    }

    #[test]
    fn error_and_cancel_responses() {
        let err = ProtocolError::in_tensor(
            1,
            ProtocolError::DTypeMismatch {
                expected: DType::F32,
                got: DType::F16,
            },
        );
        let h = ResponseHeader::from_error(5, &err);
        assert_eq!(h.status, Status::BadTensor);
        assert_eq!(h.detail, 1);
        assert_eq!(h.request_id, 5);
        let h = ResponseHeader::from_error(5, &ProtocolError::UnknownOpcode(8));
        assert_eq!((h.status, h.detail), (Status::UnknownOpcode, DETAIL_NONE));
        let small = ProtocolError::in_tensor(
            2,
            ProtocolError::OutputTooLarge {
                needed: 4608,
                capacity: 3072,
            },
        );
        let h = ResponseHeader::from_error(5, &small);
        assert_eq!(
            (h.status, h.detail, h.payload_len),
            (Status::BufferTooSmall, 2, 4608)
        );

        let h = ResponseHeader::cancel(6, CancelOutcome::AlreadyRunning);
        assert_eq!(h.detail, 3);
        assert_eq!(h.cancel_outcome(), Ok(CancelOutcome::AlreadyRunning));
        assert_eq!(
            ResponseHeader::new(Status::Ok, 1).cancel_outcome(),
            Err(ProtocolError::UnknownCancelOutcome(DETAIL_NONE))
        );
    }

    #[test]
    fn encode_rejects_inconsistent_counts() {
        let mut resp = sample();
        resp.header.num_outputs = 2;
        let mut buf = vec![0u8; 512];
        assert_eq!(
            resp.encode(&mut buf),
            Err(ProtocolError::HeaderCountMismatch {
                direction: Direction::Output,
                header: 2,
                actual: 1
            })
        );
        assert_eq!(
            sample().encode(&mut buf[..127]),
            Err(ProtocolError::BufferTooSmall {
                what: "response",
                needed: 128,
                got: 127
            })
        );
    }
}
