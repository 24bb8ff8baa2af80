//! Everything that can be wrong with bytes on the wire, and which status it earns.

use thiserror::Error;

use crate::consts::DETAIL_NONE;
use crate::dtype::DType;
use crate::opcode::Opcode;
use crate::status::Status;
use crate::tensor::{Direction, Shape};

/// Which part of a descriptor chain a length refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainPart {
    /// The device-readable bytes (request, tensor descriptors, input data).
    Readable,
    /// The device-writable bytes (output data or payload, shapes, response header).
    Writable,
}

impl std::fmt::Display for ChainPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainPart::Readable => "device-readable",
            ChainPart::Writable => "device-writable",
        })
    }
}

/// A violation of the ai_infer wire format or of a model signature.
///
/// [`ProtocolError::status`] gives the status the device reports for it and
/// [`ProtocolError::detail`] the response's `detail` field.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// Decoding ran out of bytes.
    #[error("Buffer too short for {what}: {needed} bytes needed, {got} available")]
    Truncated {
        /// The structure being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// Encoding into a buffer that cannot hold the result.
    #[error("Buffer too small to encode {what}: {needed} bytes needed, {got} available")]
    BufferTooSmall {
        /// The structure being encoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The opcode is not defined.
    #[error("Unknown opcode {0}")]
    UnknownOpcode(u32),
    /// The status code is not defined.
    #[error("Unknown status code {0}")]
    UnknownStatus(u32),
    /// The dtype is not defined.
    #[error("Unknown dtype {0}")]
    UnknownDType(u8),
    /// The priority class is not defined.
    #[error("Unknown priority class {0}")]
    UnknownPriority(u8),
    /// The CANCEL outcome is not defined.
    #[error("Unknown cancel outcome {0}")]
    UnknownCancelOutcome(u32),
    /// A request flag this version does not define is set.
    #[error("Unsupported request flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// A reserved field is not zero.
    #[error("Reserved field {field} must be 0, got {value}")]
    ReservedNotZero {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// A header field that has no meaning for this opcode is not zero.
    #[error("Field {field} must be 0 for {opcode} requests, got {value}")]
    FieldNotAllowed {
        /// Name of the field.
        field: &'static str,
        /// Opcode of the request.
        opcode: Opcode,
        /// Value found.
        value: u64,
    },
    /// An INFER request names model id 0, which is never a model.
    #[error("Model id 0 is reserved and names no model")]
    ZeroModelId,
    /// The header's tensor count disagrees with the descriptors supplied.
    #[error("Header declares {header} {direction} tensors but {actual} descriptors were given")]
    HeaderCountMismatch {
        /// Inputs or outputs.
        direction: Direction,
        /// Count in the header.
        header: usize,
        /// Number of descriptors.
        actual: usize,
    },
    /// An INFER request without inputs or without outputs.
    #[error("An INFER request needs at least one {0} tensor")]
    NoTensors(Direction),
    /// More tensors than the protocol or the device allows.
    #[error("Too many {direction} tensors: {count}, the maximum is {max}")]
    TooManyTensors {
        /// Inputs or outputs.
        direction: Direction,
        /// Count found.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Rank above the protocol's or the device's maximum.
    #[error("Tensor rank {rank} exceeds the maximum of {max}")]
    RankTooLarge {
        /// Rank found.
        rank: usize,
        /// Limit.
        max: usize,
    },
    /// A dimension slot at or beyond the rank is not zero.
    #[error("Dimension {index} is beyond rank {rank} but holds {value}")]
    DimBeyondRank {
        /// Slot index.
        index: usize,
        /// Declared rank.
        rank: usize,
        /// Value found.
        value: u64,
    },
    /// A dimension of 0 where an empty tensor is not allowed.
    #[error("Dimension {index} of shape {shape} is 0; empty tensors are not allowed")]
    ZeroDim {
        /// Index of the zero dimension.
        index: usize,
        /// The shape.
        shape: Shape,
    },
    /// The byte size of a shape does not fit in 64 bits.
    #[error("Byte size of shape {shape} with {dtype} elements overflows 64 bits")]
    ShapeOverflow {
        /// The shape.
        shape: Shape,
        /// Its element type.
        dtype: DType,
    },
    /// An input's declared byte length differs from its shape's byte size.
    #[error("Declared data length {declared} differs from {expected}, the byte size of the shape")]
    ByteLenMismatch {
        /// `data_len` from the descriptor.
        declared: u64,
        /// Product of dims times element size.
        expected: u64,
    },
    /// An output buffer of 0 bytes.
    #[error("Output buffer length is 0")]
    ZeroCapacity,
    /// The sum of tensor byte lengths exceeds the device's limit.
    #[error("Total {direction} bytes {total} exceed the maximum of {max}")]
    TotalBytesTooLarge {
        /// Inputs or outputs.
        direction: Direction,
        /// Sum found (saturated at `u64::MAX`).
        total: u64,
        /// Limit.
        max: u64,
    },
    /// The chain's readable or writable length is not what the request implies.
    #[error(
        "The {part} part of the chain is {got} bytes, expected {}{expected}",
        if *.exact { "" } else { "at least " }
    )]
    ChainLenMismatch {
        /// Readable or writable.
        part: ChainPart,
        /// Length the request implies (a minimum where `exact` is false).
        expected: u64,
        /// Length found.
        got: u64,
        /// Whether `expected` is an exact length rather than a minimum.
        exact: bool,
    },
    /// A name longer than its field.
    #[error("The {what} is {len} bytes long, the maximum is {max}")]
    NameTooLong {
        /// Which name.
        what: &'static str,
        /// Length found.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A name that is not valid UTF-8 or contains NUL.
    #[error("The {what} is not valid UTF-8 without NUL bytes")]
    NameNotUtf8 {
        /// Which name.
        what: &'static str,
    },
    /// A model name of length 0.
    #[error("The {what} is empty")]
    NameEmpty {
        /// Which name.
        what: &'static str,
    },
    /// A signature dimension whose range is empty or starts at 0.
    #[error("Dimension {index} has an invalid range {min}..={max}")]
    InvalidDimRange {
        /// Index of the dimension.
        index: usize,
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// More models than a MODELS payload may hold.
    #[error("Too many models: {count}, the maximum is {max}")]
    TooManyModels {
        /// Count found.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Two entries of a MODELS payload share an id.
    #[error("Model id {0} appears more than once")]
    DuplicateModelId(u32),
    /// Tensor count differs from the model's signature.
    #[error("The model takes {expected} {direction} tensors, the request has {got}")]
    TensorCountMismatch {
        /// Inputs or outputs.
        direction: Direction,
        /// Count in the signature.
        expected: usize,
        /// Count in the request.
        got: usize,
    },
    /// Dtype differs from the model's signature.
    #[error("Dtype {got} does not match the model's {expected}")]
    DTypeMismatch {
        /// Dtype in the signature.
        expected: DType,
        /// Dtype in the request.
        got: DType,
    },
    /// Rank differs from the model's signature.
    #[error("Rank {got} does not match the model's rank {expected}")]
    RankMismatch {
        /// Rank in the signature.
        expected: usize,
        /// Rank in the request.
        got: usize,
    },
    /// A dimension outside the model's range for it.
    #[error("Dimension {index} is {value}, the model accepts {min}..={max}")]
    DimOutOfRange {
        /// Index of the dimension.
        index: usize,
        /// Value in the request.
        value: u64,
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// The backend produced a shape the driver declared it did not expect.
    #[error("Produced shape {produced} does not match the expected shape {expected}")]
    ProducedShapeMismatch {
        /// Shape the output descriptor declared (0 = any). Boxed, like `produced`,
        /// to keep every `Result` of this crate small.
        expected: Box<Shape>,
        /// Shape produced.
        produced: Box<Shape>,
    },
    /// An output buffer cannot hold the (declared or produced) output.
    #[error("Output needs {needed} bytes but its buffer holds {capacity}")]
    OutputTooLarge {
        /// Bytes needed.
        needed: u64,
        /// Buffer size.
        capacity: u64,
    },
    /// A config space field outside what this protocol version allows.
    #[error("Config field {field} is {value}, allowed {min}..={max}")]
    InvalidConfig {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// The driver accepted feature bits the device did not offer.
    #[error("Driver accepted feature bits {0:#018x} that the device does not offer")]
    UnofferedFeatures(u64),
    /// The driver did not accept a required feature bit.
    #[error("Driver did not accept required feature bits {0:#018x}")]
    MissingFeatures(u64),
    /// An error about one tensor of a request, with its index.
    #[error("Tensor {index} is invalid: {error}")]
    InTensor {
        /// Index over inputs then outputs (output `k` is `num_inputs + k`).
        index: u32,
        /// What is wrong with it.
        error: Box<ProtocolError>,
    },
}

impl ProtocolError {
    /// Wraps an error about the tensor at `index` (inputs first, then outputs).
    pub fn in_tensor(index: usize, error: ProtocolError) -> Self {
        ProtocolError::InTensor {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            error: Box::new(error),
        }
    }

    /// The status a device reports for a request that fails with this error.
    pub fn status(&self) -> Status {
        use ProtocolError::*;
        match self {
            UnknownOpcode(_) => Status::UnknownOpcode,
            UnsupportedFlags(_) | UnofferedFeatures(_) | MissingFeatures(_) => Status::Unsupported,
            TensorCountMismatch { .. }
            | DTypeMismatch { .. }
            | RankMismatch { .. }
            | DimOutOfRange { .. }
            | ProducedShapeMismatch { .. } => Status::BadTensor,
            BufferTooSmall { .. } | OutputTooLarge { .. } => Status::BufferTooSmall,
            InTensor { error, .. } => error.status(),
            Truncated { .. }
            | UnknownStatus(_)
            | UnknownDType(_)
            | UnknownPriority(_)
            | UnknownCancelOutcome(_)
            | ReservedNotZero { .. }
            | FieldNotAllowed { .. }
            | ZeroModelId
            | HeaderCountMismatch { .. }
            | NoTensors(_)
            | TooManyTensors { .. }
            | RankTooLarge { .. }
            | DimBeyondRank { .. }
            | ZeroDim { .. }
            | ShapeOverflow { .. }
            | ByteLenMismatch { .. }
            | ZeroCapacity
            | TotalBytesTooLarge { .. }
            | ChainLenMismatch { .. }
            | NameTooLong { .. }
            | NameNotUtf8 { .. }
            | NameEmpty { .. }
            | InvalidDimRange { .. }
            | TooManyModels { .. }
            | DuplicateModelId(_)
            | InvalidConfig { .. } => Status::BadRequest,
        }
    }

    /// For errors that mean "a buffer is too small", the number of bytes that would
    /// be needed; a device reports it in the response's `payload_len`.
    pub fn needed_bytes(&self) -> Option<u64> {
        match self {
            ProtocolError::OutputTooLarge { needed, .. } => Some(*needed),
            ProtocolError::BufferTooSmall { needed, .. } => u64::try_from(*needed).ok(),
            ProtocolError::InTensor { error, .. } => error.needed_bytes(),
            _ => None,
        }
    }

    /// The response `detail` for this error: the offending tensor's index, or
    /// [`DETAIL_NONE`].
    pub fn detail(&self) -> u32 {
        match self {
            ProtocolError::InTensor { index, .. } => *index,
            _ => DETAIL_NONE,
        }
    }
}

impl From<&ProtocolError> for Status {
    fn from(e: &ProtocolError) -> Status {
        e.status()
    }
}

impl From<ProtocolError> for Status {
    fn from(e: ProtocolError) -> Status {
        e.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_status() {
        assert_eq!(
            ProtocolError::UnknownOpcode(9).status(),
            Status::UnknownOpcode
        );
        assert_eq!(ProtocolError::UnknownDType(0).status(), Status::BadRequest);
        assert_eq!(
            ProtocolError::UnsupportedFlags(1).status(),
            Status::Unsupported
        );
        assert_eq!(
            ProtocolError::DTypeMismatch {
                expected: DType::F32,
                got: DType::I64
            }
            .status(),
            Status::BadTensor
        );
        assert_eq!(
            ProtocolError::OutputTooLarge {
                needed: 8,
                capacity: 4
            }
            .status(),
            Status::BufferTooSmall
        );
        assert_eq!(
            Status::from(ProtocolError::Truncated {
                what: "request header",
                needed: 40,
                got: 3
            }),
            Status::BadRequest
        );
    }

    #[test]
    fn tensor_errors_carry_their_index_and_inner_status() {
        let e = ProtocolError::in_tensor(
            3,
            ProtocolError::RankMismatch {
                expected: 2,
                got: 3,
            },
        );
        assert_eq!(e.status(), Status::BadTensor);
        assert_eq!(e.detail(), 3);
        assert_eq!(
            e.to_string(),
            "Tensor 3 is invalid: Rank 3 does not match the model's rank 2"
        );
        assert_eq!(ProtocolError::ZeroModelId.detail(), DETAIL_NONE);
        let small = ProtocolError::in_tensor(
            4,
            ProtocolError::OutputTooLarge {
                needed: 3072,
                capacity: 1536,
            },
        );
        assert_eq!(small.needed_bytes(), Some(3072));
        assert_eq!(ProtocolError::ZeroCapacity.needed_bytes(), None);
    }

    #[test]
    fn chain_length_messages_say_exact_or_minimum() {
        let e = |exact| ProtocolError::ChainLenMismatch {
            part: ChainPart::Writable,
            expected: 48,
            got: 47,
            exact,
        };
        assert_eq!(
            e(true).to_string(),
            "The device-writable part of the chain is 47 bytes, expected 48"
        );
        assert_eq!(
            e(false).to_string(),
            "The device-writable part of the chain is 47 bytes, expected at least 48"
        );
    }

    #[test]
    fn messages_name_the_offending_value() {
        assert_eq!(
            ProtocolError::UnknownOpcode(77).to_string(),
            "Unknown opcode 77"
        );
        assert_eq!(
            ProtocolError::FieldNotAllowed {
                field: "model_id",
                opcode: Opcode::Trace,
                value: 5
            }
            .to_string(),
            "Field model_id must be 0 for TRACE requests, got 5"
        );
        let shape = Shape::new(&[u64::MAX, 2]).unwrap();
        assert_eq!(
            ProtocolError::ShapeOverflow {
                shape,
                dtype: DType::F32
            }
            .to_string(),
            format!(
                "Byte size of shape [{}, 2] with f32 elements overflows 64 bits",
                u64::MAX
            )
        );
    }
}
