//! Turning files and command-line words into tensor descriptors, and sizing output
//! buffers from a model's signature (used by the CLI; plain functions, so tested here).

use ai_infer_protocol::{DType, ModelInfo, ProtocolError, TensorDesc, TensorSpec};
use thiserror::Error;

/// Errors of tensor arguments.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TensorArgError {
    /// A dtype name that is not one of the protocol's.
    #[error("Unknown dtype {0:?} (f32, f16, bf16, f64, i8, u8, i16, i32, i64, u32, bool)")]
    DType(String),
    /// A shape that is not comma-separated positive integers.
    #[error("Invalid shape {0:?} (expected e.g. 1,4)")]
    Shape(String),
    /// The input file's size does not match the shape.
    #[error("Input has {got} bytes, shape {shape} of {dtype} needs {needed}")]
    SizeMismatch {
        /// File size.
        got: u64,
        /// Bytes the shape needs.
        needed: u64,
        /// The shape as given.
        shape: String,
        /// The dtype.
        dtype: DType,
    },
    /// The model needs something the CLI cannot express.
    #[error("Model {model} {reason}")]
    Unsupported {
        /// Model name.
        model: String,
        /// What is missing.
        reason: String,
    },
    /// A descriptor the protocol rejects.
    #[error("Invalid tensor: {0}")]
    Protocol(ProtocolError),
}

/// Parses a dtype name (`f32`, `i64`, ...).
pub fn parse_dtype(s: &str) -> Result<DType, TensorArgError> {
    DType::ALL
        .iter()
        .copied()
        .find(|d| d.name() == s.to_ascii_lowercase())
        .ok_or_else(|| TensorArgError::DType(s.to_string()))
}

/// Parses `1,4` or `1x4` into dims (each at least 1).
pub fn parse_shape(s: &str) -> Result<Vec<u64>, TensorArgError> {
    let err = || TensorArgError::Shape(s.to_string());
    if s.trim().is_empty() {
        return Ok(Vec::new()); // a scalar
    }
    s.split([',', 'x'])
        .map(|d| {
            d.trim()
                .parse::<u64>()
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(err)
        })
        .collect()
}

/// The input descriptor for `len` bytes of file data.
///
/// With a shape, the bytes are a dense little-endian tensor of `dtype` (default: the
/// signature's) and must match it exactly. Without one, the model must take one rank-1
/// U8 input (text models such as the MiniLM embedder): the bytes are UTF-8 text sent
/// as a U8 tensor `[len]`.
pub fn input_desc(
    model: &ModelInfo,
    dtype: Option<DType>,
    shape: Option<&[u64]>,
    len: u64,
) -> Result<TensorDesc, TensorArgError> {
    let unsupported = |reason: &str| TensorArgError::Unsupported {
        model: model.name.clone(),
        reason: reason.to_string(),
    };
    let [spec] = model.inputs.as_slice() else {
        return Err(unsupported(&format!(
            "takes {} inputs; the CLI sends one (use the API for more)",
            model.inputs.len()
        )));
    };
    match shape {
        Some(dims) => {
            let dtype = dtype.unwrap_or(spec.dtype);
            let desc = TensorDesc::input(dtype, dims).map_err(TensorArgError::Protocol)?;
            if desc.data_len != len {
                return Err(TensorArgError::SizeMismatch {
                    got: len,
                    needed: desc.data_len,
                    shape: format!("{dims:?}"),
                    dtype,
                });
            }
            Ok(desc)
        }
        None if spec.dtype == DType::U8
            && spec.dims.len() == 1
            && dtype.map_or(true, |d| d == DType::U8) =>
        {
            if len == 0 {
                return Err(unsupported("cannot take empty text"));
            }
            TensorDesc::input(DType::U8, &[len]).map_err(TensorArgError::Protocol)
        }
        None => Err(unsupported(&format!(
            "takes {} {:?}: give --shape (and --dtype)",
            spec.dtype, spec.dims
        ))),
    }
}

/// Output descriptor for `spec` with a buffer of at most `cap` bytes: fixed dims as
/// the signature says, dynamic ones left 0 for the model to choose; capacity for the
/// signature's largest shape, or `cap` if that is larger or unbounded.
pub fn output_desc(spec: &TensorSpec, cap: u64) -> Result<TensorDesc, TensorArgError> {
    let dims: Vec<u64> = spec
        .dims
        .iter()
        .map(|r| if r.is_fixed() { r.min } else { 0 })
        .collect();
    let largest = spec
        .dims
        .iter()
        .try_fold(spec.dtype.size_bytes() as u64, |acc, r| {
            acc.checked_mul(r.max)
        });
    let capacity = largest.map_or(cap, |n| n.min(cap)).max(1);
    TensorDesc::output(spec.dtype, &dims, capacity).map_err(TensorArgError::Protocol)
}

/// Little-endian f32 values from the start of `bytes` (at most `n`).
pub fn f32_values(bytes: &[u8], n: usize) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .take(n)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_infer_protocol::DimRange;

    fn model(inputs: Vec<TensorSpec>) -> ModelInfo {
        ModelInfo {
            id: 3,
            name: "m".into(),
            max_batch: 1,
            inputs,
            outputs: vec![],
        }
    }

    fn spec(dtype: DType, dims: Vec<DimRange>) -> TensorSpec {
        TensorSpec {
            name: String::new(),
            dtype,
            dims,
        }
    }

    #[test]
    fn dtypes_and_shapes() {
        assert_eq!(parse_dtype("F32"), Ok(DType::F32));
        assert_eq!(parse_dtype("bool"), Ok(DType::Bool));
        assert!(parse_dtype("f8").is_err());
        assert_eq!(parse_shape("1,4"), Ok(vec![1, 4]));
        assert_eq!(parse_shape("2x3x4"), Ok(vec![2, 3, 4]));
        assert_eq!(parse_shape(""), Ok(vec![]));
        assert!(parse_shape("1,0").is_err());
        assert!(parse_shape("1,,2").is_err());
        assert!(parse_shape("-1").is_err());
    }

    #[test]
    fn text_models_take_utf8_as_u8() {
        let m = model(vec![spec(DType::U8, vec![DimRange::dynamic(512)])]);
        let d = input_desc(&m, None, None, 17).unwrap();
        assert_eq!(
            (d.dtype, d.shape.dims(), d.data_len),
            (DType::U8, &[17u64][..], 17)
        );
        assert!(input_desc(&m, None, None, 0).is_err());
        assert!(input_desc(&m, Some(DType::F32), None, 16).is_err());
    }

    #[test]
    fn tensor_models_need_a_matching_shape() {
        let m = model(vec![spec(
            DType::F32,
            vec![DimRange::fixed(1), DimRange::dynamic(8)],
        )]);
        assert!(matches!(
            input_desc(&m, None, None, 16),
            Err(TensorArgError::Unsupported { .. })
        ));
        let d = input_desc(&m, None, Some(&[1, 4]), 16).unwrap();
        assert_eq!((d.dtype, d.data_len), (DType::F32, 16));
        assert!(matches!(
            input_desc(&m, None, Some(&[1, 4]), 15),
            Err(TensorArgError::SizeMismatch {
                needed: 16,
                got: 15,
                ..
            })
        ));
        let d = input_desc(&m, Some(DType::I64), Some(&[1, 2]), 16).unwrap();
        assert_eq!(d.dtype, DType::I64);
        let two = model(vec![spec(DType::U8, vec![]), spec(DType::U8, vec![])]);
        assert!(matches!(
            input_desc(&two, None, None, 1),
            Err(TensorArgError::Unsupported { .. })
        ));
    }

    #[test]
    fn outputs_are_sized_from_the_signature_within_the_cap() {
        let s = spec(
            DType::F32,
            vec![DimRange::dynamic(32), DimRange::fixed(384)],
        );
        let d = output_desc(&s, 1 << 20).unwrap();
        assert_eq!(d.shape.dims(), &[0, 384]);
        assert_eq!(d.data_len, 32 * 384 * 4);
        assert_eq!(output_desc(&s, 1000).unwrap().data_len, 1000);
        let any = spec(DType::U8, vec![DimRange::ANY]);
        assert_eq!(output_desc(&any, 4096).unwrap().data_len, 4096);
    }

    #[test]
    fn f32_preview() {
        let b: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(f32_values(&b, 2), vec![1.5, -2.0]);
        assert_eq!(f32_values(&b[..7], 8), vec![1.5]);
    }
}
