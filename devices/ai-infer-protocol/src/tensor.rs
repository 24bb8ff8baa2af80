//! Tensor shapes and tensor descriptors (the 80-byte `virtio_ai_infer_tensor`).

use std::fmt;

use crate::consts::{MAX_RANK, TENSOR_DESC_LEN};
use crate::dtype::DType;
use crate::error::ProtocolError;
use crate::spec::TensorSpec;
use crate::wire::{Reader, Writer};

/// Whether a tensor is read by the device (input) or written by it (output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device-readable.
    Input,
    /// Device-writable.
    Output,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Input => "input",
            Direction::Output => "output",
        })
    }
}

/// A tensor shape of rank at most [`MAX_RANK`], stored inline so that decoding a
/// request allocates nothing per tensor.
///
/// Invariant: slots at or beyond the rank are zero, so equality compares shapes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shape {
    rank: u8,
    dims: [u64; MAX_RANK],
}

impl Shape {
    /// The rank-0 shape (a scalar, one element).
    pub const SCALAR: Shape = Shape {
        rank: 0,
        dims: [0; MAX_RANK],
    };

    /// Builds a shape; fails if there are more than [`MAX_RANK`] dimensions.
    pub fn new(dims: &[u64]) -> Result<Self, ProtocolError> {
        if dims.len() > MAX_RANK {
            return Err(ProtocolError::RankTooLarge {
                rank: dims.len(),
                max: MAX_RANK,
            });
        }
        let mut out = Shape::SCALAR;
        out.dims[..dims.len()].copy_from_slice(dims);
        // Fits: dims.len() <= MAX_RANK = 8.
        out.rank = dims.len() as u8;
        Ok(out)
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        usize::from(self.rank)
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.rank()]
    }

    /// Index of the first zero dimension, if any.
    pub fn first_zero_dim(&self) -> Option<usize> {
        self.dims().iter().position(|d| *d == 0)
    }

    /// Product of the dimensions, or `None` if it overflows `u64`.
    pub fn num_elements(&self) -> Option<u64> {
        self.dims()
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
    }

    /// Bytes a dense tensor of this shape and `dtype` occupies, with every
    /// multiplication checked: guest-supplied dims can be anything up to `u64::MAX`.
    pub fn byte_len(&self, dtype: DType) -> Result<u64, ProtocolError> {
        self.num_elements()
            .and_then(|n| n.checked_mul(dtype.size_bytes() as u64))
            .ok_or(ProtocolError::ShapeOverflow {
                shape: *self,
                dtype,
            })
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.dims().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tensor descriptor: element type, shape and the length of its data buffer.
///
/// In a request, an input descriptor's `data_len` must equal the shape's byte size;
/// an output descriptor's `data_len` is the capacity of the guest's buffer and its
/// dims may be 0 ("whatever the model produces"), rank 0 meaning "any shape".
/// In a response, an output shape's `data_len` is the number of bytes written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Shape,
    /// Length in bytes of the tensor's data in the chain.
    pub data_len: u64,
}

impl TensorDesc {
    /// Size on the wire.
    pub const LEN: usize = TENSOR_DESC_LEN;

    /// An input descriptor whose `data_len` is its shape's byte size.
    pub fn input(dtype: DType, dims: &[u64]) -> Result<Self, ProtocolError> {
        let shape = Shape::new(dims)?;
        let desc = TensorDesc {
            dtype,
            shape,
            data_len: shape.byte_len(dtype)?,
        };
        desc.validate_input()?;
        Ok(desc)
    }

    /// An output descriptor for a buffer of `capacity` bytes; dims of 0 are unknown.
    pub fn output(dtype: DType, dims: &[u64], capacity: u64) -> Result<Self, ProtocolError> {
        let desc = TensorDesc {
            dtype,
            shape: Shape::new(dims)?,
            data_len: capacity,
        };
        desc.validate_output()?;
        Ok(desc)
    }

    /// The response shape entry for an output the backend produced: `data_len` is the
    /// shape's byte size (what was written, or what would be needed).
    pub fn produced(dtype: DType, shape: Shape) -> Result<Self, ProtocolError> {
        Ok(TensorDesc {
            dtype,
            shape,
            data_len: shape.byte_len(dtype)?,
        })
    }

    /// Byte size of the shape (dims product times dtype size), checked for overflow.
    pub fn byte_len(&self) -> Result<u64, ProtocolError> {
        self.shape.byte_len(self.dtype)
    }

    /// Stateless checks of an input descriptor: no empty dimension, no overflow, and
    /// `data_len` equal to the shape's byte size.
    pub fn validate_input(&self) -> Result<(), ProtocolError> {
        if let Some(index) = self.shape.first_zero_dim() {
            return Err(ProtocolError::ZeroDim {
                index,
                shape: self.shape,
            });
        }
        let expected = self.byte_len()?;
        if self.data_len != expected {
            return Err(ProtocolError::ByteLenMismatch {
                declared: self.data_len,
                expected,
            });
        }
        Ok(())
    }

    /// Stateless checks of an output descriptor: a non-empty buffer, and if the shape
    /// is fully known, a buffer large enough for it (rejected before any compute).
    pub fn validate_output(&self) -> Result<(), ProtocolError> {
        if self.data_len == 0 {
            return Err(ProtocolError::ZeroCapacity);
        }
        if self.shape.rank() > 0 && self.shape.first_zero_dim().is_none() {
            let needed = self.byte_len()?;
            if needed > self.data_len {
                return Err(ProtocolError::OutputTooLarge {
                    needed,
                    capacity: self.data_len,
                });
            }
        }
        Ok(())
    }

    /// Checks an input descriptor against the model's signature: same dtype, same
    /// rank, every dim within the signature's range for it.
    pub fn validate_against(&self, expected: &TensorSpec) -> Result<(), ProtocolError> {
        self.check_dtype_and_rank(expected)?;
        self.check_dims(expected, false)
    }

    /// Every dim within the signature's range for it; with `zero_is_unknown`, a 0 dim
    /// (an output whose size the guest leaves to the model) is accepted.
    fn check_dims(
        &self,
        expected: &TensorSpec,
        zero_is_unknown: bool,
    ) -> Result<(), ProtocolError> {
        for (index, (value, range)) in self.shape.dims().iter().zip(&expected.dims).enumerate() {
            if (!zero_is_unknown || *value != 0) && !range.contains(*value) {
                return Err(ProtocolError::DimOutOfRange {
                    index,
                    value: *value,
                    min: range.min,
                    max: range.max,
                });
            }
        }
        Ok(())
    }

    /// Checks an output descriptor against the model's signature: same dtype; unless
    /// the rank is 0 ("any shape"), same rank and every non-zero dim within range.
    pub fn validate_output_against(&self, expected: &TensorSpec) -> Result<(), ProtocolError> {
        if self.shape.rank() == 0 {
            return self.check_dtype(expected);
        }
        self.check_dtype_and_rank(expected)?;
        self.check_dims(expected, true)
    }

    /// Checks what the backend produced for this output descriptor and returns the
    /// shape entry for the response (`data_len` = bytes written).
    pub fn check_produced(&self, produced: &Shape) -> Result<TensorDesc, ProtocolError> {
        if self.shape.rank() > 0 {
            let matches = self.shape.rank() == produced.rank()
                && self
                    .shape
                    .dims()
                    .iter()
                    .zip(produced.dims())
                    .all(|(want, got)| *want == 0 || want == got);
            if !matches {
                return Err(ProtocolError::ProducedShapeMismatch {
                    expected: Box::new(self.shape),
                    produced: Box::new(*produced),
                });
            }
        }
        let entry = TensorDesc::produced(self.dtype, *produced)?;
        if entry.data_len > self.data_len {
            return Err(ProtocolError::OutputTooLarge {
                needed: entry.data_len,
                capacity: self.data_len,
            });
        }
        Ok(entry)
    }

    fn check_dtype(&self, expected: &TensorSpec) -> Result<(), ProtocolError> {
        if self.dtype != expected.dtype {
            return Err(ProtocolError::DTypeMismatch {
                expected: expected.dtype,
                got: self.dtype,
            });
        }
        Ok(())
    }

    fn check_dtype_and_rank(&self, expected: &TensorSpec) -> Result<(), ProtocolError> {
        self.check_dtype(expected)?;
        if self.shape.rank() != expected.dims.len() {
            return Err(ProtocolError::RankMismatch {
                expected: expected.dims.len(),
                got: self.shape.rank(),
            });
        }
        Ok(())
    }

    /// Writes the 80-byte wire form; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer::new(buf, "tensor descriptor", Self::LEN)?;
        w.u8(self.dtype.into())?;
        w.u8(self.shape.rank)?;
        w.zeros(6)?;
        for d in self.shape.dims {
            w.u64(d)?;
        }
        w.u64(self.data_len)?;
        Ok(w.position())
    }

    /// Reads the wire form from the first 80 bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "tensor descriptor", Self::LEN)?;
        let (dtype, rank) = read_dtype_and_rank(&mut r)?;
        r.reserved_u16("tensor.reserved0")?;
        r.reserved_u32("tensor.reserved1")?;
        let mut dims = [0u64; MAX_RANK];
        for (index, slot) in dims.iter_mut().enumerate() {
            *slot = r.u64()?;
            if index >= rank && *slot != 0 {
                return Err(ProtocolError::DimBeyondRank {
                    index,
                    rank,
                    value: *slot,
                });
            }
        }
        let data_len = r.u64()?;
        Ok(TensorDesc {
            dtype,
            shape: Shape::new(&dims[..rank])?,
            data_len,
        })
    }
}

/// Reads the dtype and rank bytes that open both a tensor descriptor and a tensor spec,
/// rejecting an unknown dtype and a rank above [`MAX_RANK`].
pub(crate) fn read_dtype_and_rank(r: &mut Reader) -> Result<(DType, usize), ProtocolError> {
    let dtype = DType::try_from(r.u8()?)?;
    let rank = usize::from(r.u8()?);
    if rank > MAX_RANK {
        return Err(ProtocolError::RankTooLarge {
            rank,
            max: MAX_RANK,
        });
    }
    Ok((dtype, rank))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::DimRange;

    fn encoded(desc: &TensorDesc) -> [u8; TENSOR_DESC_LEN] {
        let mut buf = [0u8; TENSOR_DESC_LEN];
        assert_eq!(desc.encode(&mut buf), Ok(TENSOR_DESC_LEN));
        buf
    }

    #[test]
    fn shape_basics() {
        let s = Shape::new(&[2, 3, 4]).unwrap();
        assert_eq!(s.rank(), 3);
        assert_eq!(s.dims(), &[2, 3, 4]);
        assert_eq!(s.num_elements(), Some(24));
        assert_eq!(s.byte_len(DType::F64), Ok(192));
        assert_eq!(s.to_string(), "[2, 3, 4]");
        assert_eq!(Shape::SCALAR.num_elements(), Some(1));
        assert_eq!(Shape::SCALAR.to_string(), "[]");
        assert_eq!(
            Shape::new(&[1; 9]),
            Err(ProtocolError::RankTooLarge { rank: 9, max: 8 })
        );
    }

    #[test]
    fn byte_len_overflow_is_an_error() {
        // Element count fits, byte count does not.
        let s = Shape::new(&[1 << 62]).unwrap();
        assert_eq!(s.num_elements(), Some(1 << 62));
        assert_eq!(
            s.byte_len(DType::F32),
            Err(ProtocolError::ShapeOverflow {
                shape: s,
                dtype: DType::F32
            })
        );
        assert_eq!(s.byte_len(DType::U8), Ok(1 << 62));
        // Element count itself overflows.
        let s = Shape::new(&[1 << 32, 1 << 32]).unwrap();
        assert_eq!(s.num_elements(), None);
        assert!(matches!(
            s.byte_len(DType::U8),
            Err(ProtocolError::ShapeOverflow { .. })
        ));
        assert!(matches!(
            TensorDesc::input(DType::I64, &[u64::MAX, 2]),
            Err(ProtocolError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn round_trip_every_dtype_and_rank() {
        for dtype in DType::ALL {
            for rank in 0..=MAX_RANK {
                let dims: Vec<u64> = (0..rank as u64).map(|i| i + 1).collect();
                let desc = TensorDesc::input(dtype, &dims).unwrap();
                let bytes = encoded(&desc);
                assert_eq!(TensorDesc::decode(&bytes), Ok(desc));
            }
        }
    }

    #[test]
    fn wire_layout_is_exact() {
        let desc = TensorDesc::input(DType::F32, &[1, 4]).unwrap();
        let b = encoded(&desc);
        assert_eq!(b[0], 1, "dtype f32");
        assert_eq!(b[1], 2, "rank");
        assert_eq!(&b[2..8], &[0; 6]);
        assert_eq!(&b[8..16], &1u64.to_le_bytes());
        assert_eq!(&b[16..24], &4u64.to_le_bytes());
        assert_eq!(&b[24..72], &[0; 48]);
        assert_eq!(&b[72..80], &16u64.to_le_bytes());
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let bytes = encoded(&TensorDesc::input(DType::U8, &[3]).unwrap());
        for len in 0..TENSOR_DESC_LEN {
            assert_eq!(
                TensorDesc::decode(&bytes[..len]),
                Err(ProtocolError::Truncated {
                    what: "tensor descriptor",
                    needed: TENSOR_DESC_LEN,
                    got: len
                }),
                "len {len}"
            );
        }
    }

    #[test]
    fn decode_rejects_bad_fields() {
        let good = encoded(&TensorDesc::input(DType::F32, &[2, 2]).unwrap());

        let mut b = good;
        b[0] = 0;
        assert_eq!(TensorDesc::decode(&b), Err(ProtocolError::UnknownDType(0)));
        b[0] = 200;
        assert_eq!(
            TensorDesc::decode(&b),
            Err(ProtocolError::UnknownDType(200))
        );

        let mut b = good;
        b[1] = 9;
        assert_eq!(
            TensorDesc::decode(&b),
            Err(ProtocolError::RankTooLarge { rank: 9, max: 8 })
        );

        let mut b = good;
        b[3] = 1;
        assert_eq!(
            TensorDesc::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "tensor.reserved0",
                value: 256
            })
        );
        let mut b = good;
        b[7] = 1;
        assert_eq!(
            TensorDesc::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "tensor.reserved1",
                value: 1 << 24
            })
        );

        // Slot 2 is beyond rank 2.
        let mut b = good;
        b[24] = 7;
        assert_eq!(
            TensorDesc::decode(&b),
            Err(ProtocolError::DimBeyondRank {
                index: 2,
                rank: 2,
                value: 7
            })
        );
    }

    #[test]
    fn input_validation() {
        let ok = TensorDesc::input(DType::I64, &[2, 8]).unwrap();
        assert_eq!(ok.data_len, 128);
        assert_eq!(ok.validate_input(), Ok(()));

        let mut wrong_len = ok;
        wrong_len.data_len = 127;
        assert_eq!(
            wrong_len.validate_input(),
            Err(ProtocolError::ByteLenMismatch {
                declared: 127,
                expected: 128
            })
        );

        let zero = TensorDesc {
            dtype: DType::F32,
            shape: Shape::new(&[4, 0]).unwrap(),
            data_len: 0,
        };
        assert_eq!(
            zero.validate_input(),
            Err(ProtocolError::ZeroDim {
                index: 1,
                shape: zero.shape
            })
        );
        assert!(matches!(
            TensorDesc::input(DType::F32, &[0]),
            Err(ProtocolError::ZeroDim { index: 0, .. })
        ));
    }

    #[test]
    fn output_validation() {
        assert_eq!(
            TensorDesc::output(DType::F32, &[0, 384], 0),
            Err(ProtocolError::ZeroCapacity)
        );
        // Unknown dims: any capacity > 0 is acceptable up front.
        assert!(TensorDesc::output(DType::F32, &[0, 384], 4).is_ok());
        assert!(TensorDesc::output(DType::F32, &[], 4).is_ok());
        // Fully known shape needs room for itself.
        assert_eq!(
            TensorDesc::output(DType::F32, &[2, 384], 3071),
            Err(ProtocolError::OutputTooLarge {
                needed: 3072,
                capacity: 3071
            })
        );
        assert!(TensorDesc::output(DType::F32, &[2, 384], 4096).is_ok());
    }

    fn spec(dtype: DType, dims: Vec<DimRange>) -> TensorSpec {
        TensorSpec {
            name: "t".into(),
            dtype,
            dims,
        }
    }

    #[test]
    fn validate_against_signature() {
        let sig = spec(
            DType::I64,
            vec![DimRange::dynamic(32), DimRange::new(1, 512)],
        );
        let ok = TensorDesc::input(DType::I64, &[4, 17]).unwrap();
        assert_eq!(ok.validate_against(&sig), Ok(()));

        let wrong_dtype = TensorDesc::input(DType::I32, &[4, 17]).unwrap();
        assert_eq!(
            wrong_dtype.validate_against(&sig),
            Err(ProtocolError::DTypeMismatch {
                expected: DType::I64,
                got: DType::I32
            })
        );
        let wrong_rank = TensorDesc::input(DType::I64, &[4, 17, 1]).unwrap();
        assert_eq!(
            wrong_rank.validate_against(&sig),
            Err(ProtocolError::RankMismatch {
                expected: 2,
                got: 3
            })
        );
        let too_big = TensorDesc::input(DType::I64, &[33, 17]).unwrap();
        assert_eq!(
            too_big.validate_against(&sig),
            Err(ProtocolError::DimOutOfRange {
                index: 0,
                value: 33,
                min: 1,
                max: 32
            })
        );
        let fixed = spec(DType::F32, vec![DimRange::fixed(3)]);
        assert_eq!(
            TensorDesc::input(DType::F32, &[2])
                .unwrap()
                .validate_against(&fixed),
            Err(ProtocolError::DimOutOfRange {
                index: 0,
                value: 2,
                min: 3,
                max: 3
            })
        );
        let any = spec(DType::U8, vec![DimRange::ANY]);
        assert_eq!(
            TensorDesc::input(DType::U8, &[1 << 40])
                .unwrap()
                .validate_against(&any),
            Ok(())
        );
    }

    #[test]
    fn validate_output_against_signature() {
        let sig = spec(
            DType::F32,
            vec![DimRange::dynamic(32), DimRange::fixed(384)],
        );
        let unknown_batch = TensorDesc::output(DType::F32, &[0, 384], 1536).unwrap();
        assert_eq!(unknown_batch.validate_output_against(&sig), Ok(()));
        let any_shape = TensorDesc::output(DType::F32, &[], 1536).unwrap();
        assert_eq!(any_shape.validate_output_against(&sig), Ok(()));
        let wrong = TensorDesc::output(DType::F32, &[0, 383], 1536).unwrap();
        assert_eq!(
            wrong.validate_output_against(&sig),
            Err(ProtocolError::DimOutOfRange {
                index: 1,
                value: 383,
                min: 384,
                max: 384
            })
        );
        let wrong_dtype = TensorDesc::output(DType::F16, &[], 1536).unwrap();
        assert_eq!(
            wrong_dtype.validate_output_against(&sig),
            Err(ProtocolError::DTypeMismatch {
                expected: DType::F32,
                got: DType::F16
            })
        );
    }

    #[test]
    fn check_produced_output() {
        let out = TensorDesc::output(DType::F32, &[0, 384], 2 * 384 * 4).unwrap();
        let produced = Shape::new(&[2, 384]).unwrap();
        assert_eq!(
            out.check_produced(&produced),
            Ok(TensorDesc {
                dtype: DType::F32,
                shape: produced,
                data_len: 3072
            })
        );
        let bigger = Shape::new(&[3, 384]).unwrap();
        assert_eq!(
            out.check_produced(&bigger),
            Err(ProtocolError::OutputTooLarge {
                needed: 4608,
                capacity: 3072
            })
        );
        let other = Shape::new(&[2, 385]).unwrap();
        assert_eq!(
            out.check_produced(&other),
            Err(ProtocolError::ProducedShapeMismatch {
                expected: Box::new(out.shape),
                produced: Box::new(other)
            })
        );
        assert_eq!(
            TensorDesc::produced(DType::F32, bigger),
            Ok(TensorDesc {
                dtype: DType::F32,
                shape: bigger,
                data_len: 4608
            })
        );
        let any = TensorDesc::output(DType::U8, &[], 16).unwrap();
        let scalar_ok = any.check_produced(&Shape::new(&[4, 4]).unwrap()).unwrap();
        assert_eq!(scalar_ok.data_len, 16);
    }
}
