//! Tensor element types.

use std::fmt;

use crate::error::ProtocolError;

/// Element type of a tensor (`u8 dtype` in tensor descriptors and specs).
///
/// Zero is not a dtype, so a zero-filled descriptor is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
    /// bfloat16.
    BF16 = 3,
    /// IEEE 754 binary64.
    F64 = 4,
    /// Signed 8-bit integer.
    I8 = 5,
    /// Unsigned 8-bit integer.
    U8 = 6,
    /// Signed 16-bit integer.
    I16 = 7,
    /// Signed 32-bit integer.
    I32 = 8,
    /// Signed 64-bit integer (token ids, attention masks).
    I64 = 9,
    /// Unsigned 32-bit integer.
    U32 = 10,
    /// Boolean, one byte per element (0 = false, anything else = true).
    Bool = 11,
}

impl DType {
    /// Every dtype, in wire order.
    pub const ALL: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I8,
        DType::U8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U32,
        DType::Bool,
    ];

    /// Size of one element in bytes; tensors are dense, so a tensor's byte length is
    /// this times its element count.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Lower-case name as used in model manifests and messages (`f32`, `i64`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::Bool => "bool",
        }
    }
}

impl TryFrom<u8> for DType {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        DType::ALL
            .iter()
            .copied()
            .find(|d| *d as u8 == value)
            .ok_or(ProtocolError::UnknownDType(value))
    }
}

impl From<DType> for u8 {
    fn from(d: DType) -> u8 {
        d as u8
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_round_trips_and_rejects_unknown_values() {
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(u8::from(*d), i as u8 + 1);
            assert_eq!(DType::try_from(u8::from(*d)), Ok(*d));
        }
        for bad in [0u8, 12, 0x7f, u8::MAX] {
            assert_eq!(DType::try_from(bad), Err(ProtocolError::UnknownDType(bad)));
        }
    }

    #[test]
    fn dtype_sizes() {
        assert_eq!(DType::F32.size_bytes(), 4);
        assert_eq!(DType::F16.size_bytes(), 2);
        assert_eq!(DType::BF16.size_bytes(), 2);
        assert_eq!(DType::F64.size_bytes(), 8);
        assert_eq!(DType::I8.size_bytes(), 1);
        assert_eq!(DType::U8.size_bytes(), 1);
        assert_eq!(DType::I16.size_bytes(), 2);
        assert_eq!(DType::I32.size_bytes(), 4);
        assert_eq!(DType::I64.size_bytes(), 8);
        assert_eq!(DType::U32.size_bytes(), 4);
        assert_eq!(DType::Bool.size_bytes(), 1);
        assert_eq!(DType::BF16.to_string(), "bf16");
    }
}
