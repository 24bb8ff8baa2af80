//! Model signatures: the tensors a model takes and produces (the 168-byte
//! `virtio_ai_infer_tensor_spec`), and the names they carry.

use crate::consts::{MAX_MODEL_NAME_LEN, MAX_RANK, MAX_TENSOR_NAME_LEN, TENSOR_SPEC_LEN};
use crate::dtype::DType;
use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

/// The values one dimension of a model's tensor may take: `min..=max`, `min >= 1`.
///
/// A fixed dimension has `min == max`; a dynamic one (batch, sequence length) a
/// range whose upper bound keeps requests bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DimRange {
    /// Smallest accepted value (at least 1: empty tensors are not supported).
    pub min: u64,
    /// Largest accepted value.
    pub max: u64,
}

impl DimRange {
    /// Any non-zero size; request totals are still bounded by the device limits.
    pub const ANY: DimRange = DimRange {
        min: 1,
        max: u64::MAX,
    };

    /// The range `min..=max`.
    pub const fn new(min: u64, max: u64) -> Self {
        DimRange { min, max }
    }

    /// Exactly `n`.
    pub const fn fixed(n: u64) -> Self {
        DimRange { min: n, max: n }
    }

    /// Anything from 1 to `max`.
    pub const fn dynamic(max: u64) -> Self {
        DimRange { min: 1, max }
    }

    /// Whether `value` is accepted.
    pub const fn contains(&self, value: u64) -> bool {
        self.min <= value && value <= self.max
    }

    /// Whether this is a single value.
    pub const fn is_fixed(&self) -> bool {
        self.min == self.max
    }

    fn validate(&self, index: usize) -> Result<(), ProtocolError> {
        if self.min == 0 || self.min > self.max {
            return Err(ProtocolError::InvalidDimRange {
                index,
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }
}

/// One input or output of a model's signature.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Name in the model (e.g. `input_ids`); may be empty.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Accepted range of each dimension; the length is the rank.
    pub dims: Vec<DimRange>,
}

impl TensorSpec {
    /// Size on the wire.
    pub const LEN: usize = TENSOR_SPEC_LEN;

    /// Checks the rank, the name and every dimension range.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.dims.len() > MAX_RANK {
            return Err(ProtocolError::RankTooLarge {
                rank: self.dims.len(),
                max: MAX_RANK,
            });
        }
        check_name(&self.name, "tensor name", MAX_TENSOR_NAME_LEN, true)?;
        for (index, range) in self.dims.iter().enumerate() {
            range.validate(index)?;
        }
        Ok(())
    }

    /// Writes the 168-byte wire form; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        self.validate()?;
        let mut w = Writer::new(buf, "tensor spec", Self::LEN)?;
        w.u8(self.dtype.into())?;
        // Both fit in a byte: validate() bounded them by 8 and 32.
        w.u8(self.dims.len() as u8)?;
        w.u8(self.name.len() as u8)?;
        w.zeros(5)?;
        write_name(&mut w, &self.name, MAX_TENSOR_NAME_LEN)?;
        for i in 0..MAX_RANK {
            let range = self.dims.get(i).copied().unwrap_or(DimRange::new(0, 0));
            w.u64(range.min)?;
            w.u64(range.max)?;
        }
        Ok(w.position())
    }

    /// Reads the wire form from the first 168 bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "tensor spec", Self::LEN)?;
        let (dtype, rank) = crate::tensor::read_dtype_and_rank(&mut r)?;
        let name_len = usize::from(r.u8()?);
        r.reserved_u8("tensor_spec.reserved0")?;
        r.reserved_u32("tensor_spec.reserved1")?;
        let name = read_name(&mut r, name_len, "tensor name", MAX_TENSOR_NAME_LEN, true)?;
        let mut dims = Vec::with_capacity(rank);
        for index in 0..MAX_RANK {
            let range = DimRange::new(r.u64()?, r.u64()?);
            if index < rank {
                range.validate(index)?;
                dims.push(range);
            } else if range != DimRange::new(0, 0) {
                return Err(ProtocolError::DimBeyondRank {
                    index,
                    rank,
                    value: range.min.max(range.max),
                });
            }
        }
        Ok(TensorSpec { name, dtype, dims })
    }
}

/// Checks a name: at most `max` bytes of UTF-8 (guaranteed by `&str`) without NUL,
/// and non-empty unless `allow_empty`.
pub(crate) fn check_name(
    name: &str,
    what: &'static str,
    max: usize,
    allow_empty: bool,
) -> Result<(), ProtocolError> {
    if name.len() > max {
        return Err(ProtocolError::NameTooLong {
            what,
            len: name.len(),
            max,
        });
    }
    if name.is_empty() && !allow_empty {
        return Err(ProtocolError::NameEmpty { what });
    }
    if name.contains('\0') {
        return Err(ProtocolError::NameNotUtf8 { what });
    }
    Ok(())
}

/// Checks a MODELS name: 1..=[`MAX_MODEL_NAME_LEN`] bytes without NUL (what every model
/// entry must satisfy; a manifest loader checks it before loading anything).
pub fn check_model_name(name: &str) -> Result<(), ProtocolError> {
    check_name(name, "model name", MAX_MODEL_NAME_LEN, false)
}

/// Writes a name into a fixed field of `field_len` bytes, zero padded.
pub(crate) fn write_name(
    w: &mut Writer<'_>,
    name: &str,
    field_len: usize,
) -> Result<(), ProtocolError> {
    w.bytes(name.as_bytes())?;
    w.zeros(field_len.saturating_sub(name.len()))
}

/// Reads a fixed name field of `field_len` bytes holding `len` bytes of name and
/// zero padding. Padding must be zero so that two encodings of a name are identical.
pub(crate) fn read_name(
    r: &mut Reader<'_>,
    len: usize,
    what: &'static str,
    field_len: usize,
    allow_empty: bool,
) -> Result<String, ProtocolError> {
    let field = r.bytes(field_len)?;
    if len > field_len {
        return Err(ProtocolError::NameTooLong {
            what,
            len,
            max: field_len,
        });
    }
    let (name, padding) = field.split_at(len);
    if let Some(value) = padding.iter().find(|b| **b != 0) {
        return Err(ProtocolError::ReservedNotZero {
            field: "name padding",
            value: u64::from(*value),
        });
    }
    let name = std::str::from_utf8(name).map_err(|_| ProtocolError::NameNotUtf8 { what })?;
    check_name(name, what, field_len, allow_empty)?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm_ids() -> TensorSpec {
        TensorSpec {
            name: "input_ids".into(),
            dtype: DType::I64,
            dims: vec![DimRange::dynamic(32), DimRange::dynamic(512)],
        }
    }

    fn encoded(spec: &TensorSpec) -> Vec<u8> {
        let mut buf = vec![0u8; TensorSpec::LEN];
        assert_eq!(spec.encode(&mut buf), Ok(TensorSpec::LEN));
        buf
    }

    #[test]
    fn dim_range_helpers() {
        assert!(DimRange::fixed(384).contains(384));
        assert!(!DimRange::fixed(384).contains(383));
        assert!(DimRange::fixed(384).is_fixed());
        assert!(!DimRange::dynamic(8).contains(0));
        assert!(DimRange::dynamic(8).contains(8));
        assert!(!DimRange::dynamic(8).contains(9));
        assert!(DimRange::ANY.contains(u64::MAX));
    }

    #[test]
    fn round_trip() {
        let spec = minilm_ids();
        assert_eq!(TensorSpec::decode(&encoded(&spec)), Ok(spec));
        let scalar = TensorSpec {
            name: String::new(),
            dtype: DType::Bool,
            dims: vec![],
        };
        assert_eq!(TensorSpec::decode(&encoded(&scalar)), Ok(scalar));
        let full = TensorSpec {
            name: "x".repeat(MAX_TENSOR_NAME_LEN),
            dtype: DType::BF16,
            dims: vec![DimRange::ANY; MAX_RANK],
        };
        assert_eq!(TensorSpec::decode(&encoded(&full)), Ok(full));
    }

    #[test]
    fn wire_layout_is_exact() {
        let b = encoded(&minilm_ids());
        assert_eq!(&b[0..8], &[9, 2, 9, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..17], b"input_ids");
        assert!(b[17..40].iter().all(|x| *x == 0));
        assert_eq!(&b[40..48], &1u64.to_le_bytes());
        assert_eq!(&b[48..56], &32u64.to_le_bytes());
        assert_eq!(&b[56..64], &1u64.to_le_bytes());
        assert_eq!(&b[64..72], &512u64.to_le_bytes());
        assert!(b[72..].iter().all(|x| *x == 0));
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let b = encoded(&minilm_ids());
        for len in 0..TensorSpec::LEN {
            assert_eq!(
                TensorSpec::decode(&b[..len]),
                Err(ProtocolError::Truncated {
                    what: "tensor spec",
                    needed: TensorSpec::LEN,
                    got: len
                })
            );
        }
    }

    #[test]
    fn decode_rejects_bad_fields() {
        let good = encoded(&minilm_ids());
        let mut b = good.clone();
        b[0] = 99;
        assert_eq!(TensorSpec::decode(&b), Err(ProtocolError::UnknownDType(99)));

        let mut b = good.clone();
        b[1] = 10;
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::RankTooLarge { rank: 10, max: 8 })
        );

        let mut b = good.clone();
        b[2] = 33;
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::NameTooLong {
                what: "tensor name",
                len: 33,
                max: 32
            })
        );

        let mut b = good.clone();
        b[8] = 0xff; // invalid UTF-8 inside the name
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::NameNotUtf8 {
                what: "tensor name"
            })
        );

        let mut b = good.clone();
        b[20] = b'x'; // beyond name_len
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "name padding",
                value: u64::from(b'x')
            })
        );

        let mut b = good.clone();
        b[40..48].copy_from_slice(&0u64.to_le_bytes()); // min 0
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::InvalidDimRange {
                index: 0,
                min: 0,
                max: 32
            })
        );

        let mut b = good.clone();
        b[56..64].copy_from_slice(&600u64.to_le_bytes()); // min > max
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::InvalidDimRange {
                index: 1,
                min: 600,
                max: 512
            })
        );

        let mut b = good;
        b[80] = 1; // dim slot 2 beyond rank 2
        assert_eq!(
            TensorSpec::decode(&b),
            Err(ProtocolError::DimBeyondRank {
                index: 2,
                rank: 2,
                value: 1
            })
        );
    }

    #[test]
    fn encode_rejects_invalid_specs() {
        let mut buf = vec![0u8; TensorSpec::LEN];
        let mut s = minilm_ids();
        s.name = "n".repeat(33);
        assert_eq!(
            s.encode(&mut buf),
            Err(ProtocolError::NameTooLong {
                what: "tensor name",
                len: 33,
                max: 32
            })
        );
        let mut s = minilm_ids();
        s.name = "a\0b".into();
        assert_eq!(
            s.encode(&mut buf),
            Err(ProtocolError::NameNotUtf8 {
                what: "tensor name"
            })
        );
        let mut s = minilm_ids();
        s.dims = vec![DimRange::fixed(1); 9];
        assert_eq!(
            s.encode(&mut buf),
            Err(ProtocolError::RankTooLarge { rank: 9, max: 8 })
        );
        let mut s = minilm_ids();
        s.dims[1] = DimRange::new(5, 4);
        assert_eq!(
            s.encode(&mut buf),
            Err(ProtocolError::InvalidDimRange {
                index: 1,
                min: 5,
                max: 4
            })
        );
        assert!(matches!(
            minilm_ids().encode(&mut buf[..100]),
            Err(ProtocolError::BufferTooSmall {
                needed: 168,
                got: 100,
                ..
            })
        ));
    }
}
