//! Tensor data between the wire forms of the inference protocols and the device's
//! little-endian bytes: the Open Inference Protocol's datatypes and their ai_infer
//! dtypes, JSON element lists (flat or nested), and BYTES elements.

use ai_infer_protocol::DType;
use half::{bf16, f16};
use serde_json::Value;

use super::error::ServeError;

/// An Open Inference Protocol tensor datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datatype {
    /// `BOOL`: one byte, 0 or 1.
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16` (no ai_infer dtype).
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64` (no ai_infer dtype).
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP16`.
    Fp16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BF16`.
    Bf16,
    /// `BYTES`: each element a byte string (binary form: a little-endian u32 length,
    /// then the bytes).
    Bytes,
}

impl Datatype {
    /// Every datatype.
    pub const ALL: [Datatype; 14] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bf16,
        Datatype::Bytes,
    ];

    /// The protocol's name (`FP32`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bf16 => "BF16",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name.
    pub fn parse(name: &str) -> Result<Self, ServeError> {
        Datatype::ALL
            .iter()
            .copied()
            .find(|d| d.name() == name)
            .ok_or_else(|| ServeError::BadRequest(format!("unknown datatype {name:?}")))
    }

    /// The ai_infer dtype with the same element encoding, if the device has one.
    pub const fn dtype(self) -> Option<DType> {
        match self {
            Datatype::Bool => Some(DType::Bool),
            Datatype::Uint8 => Some(DType::U8),
            Datatype::Uint32 => Some(DType::U32),
            Datatype::Int8 => Some(DType::I8),
            Datatype::Int16 => Some(DType::I16),
            Datatype::Int32 => Some(DType::I32),
            Datatype::Int64 => Some(DType::I64),
            Datatype::Fp16 => Some(DType::F16),
            Datatype::Fp32 => Some(DType::F32),
            Datatype::Fp64 => Some(DType::F64),
            Datatype::Bf16 => Some(DType::BF16),
            Datatype::Uint16 | Datatype::Uint64 | Datatype::Bytes => None,
        }
    }

    /// The datatype of an ai_infer dtype.
    pub const fn from_dtype(dtype: DType) -> Self {
        match dtype {
            DType::Bool => Datatype::Bool,
            DType::U8 => Datatype::Uint8,
            DType::U32 => Datatype::Uint32,
            DType::I8 => Datatype::Int8,
            DType::I16 => Datatype::Int16,
            DType::I32 => Datatype::Int32,
            DType::I64 => Datatype::Int64,
            DType::F16 => Datatype::Fp16,
            DType::F32 => Datatype::Fp32,
            DType::F64 => Datatype::Fp64,
            DType::BF16 => Datatype::Bf16,
        }
    }

    /// Bytes per element (`None` for BYTES, whose elements vary).
    pub const fn size(self) -> Option<usize> {
        match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => Some(1),
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 | Datatype::Bf16 => Some(2),
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => Some(4),
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => Some(8),
            Datatype::Bytes => None,
        }
    }
}

fn bad(msg: String) -> ServeError {
    ServeError::BadRequest(msg)
}

/// The elements of `data` in row-major order: a flat list, or nested lists (any
/// depth serde_json accepted) flattened.
pub fn flatten(data: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack = vec![data];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            other => out.push(other),
        }
    }
    out
}

fn int_in(v: &Value, min: i128, max: i128, what: &str) -> Result<i128, ServeError> {
    let n = v
        .as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
        .ok_or_else(|| bad(format!("{what}: {v} is not an integer")))?;
    if n < min || n > max {
        return Err(bad(format!("{what}: {n} is out of range {min}..={max}")));
    }
    Ok(n)
}

fn float(v: &Value, what: &str) -> Result<f64, ServeError> {
    v.as_f64()
        .ok_or_else(|| bad(format!("{what}: {v} is not a number")))
}

/// Little-endian bytes of the JSON elements `items` as `datatype` (not BYTES).
pub fn encode_json(
    datatype: Datatype,
    items: &[&Value],
    what: &str,
) -> Result<Vec<u8>, ServeError> {
    let size = datatype
        .size()
        .ok_or_else(|| bad(format!("{what}: BYTES elements are strings")))?;
    let mut out = Vec::with_capacity(items.len().saturating_mul(size));
    for v in items {
        match datatype {
            Datatype::Bool => {
                let b = match v {
                    Value::Bool(b) => *b,
                    // Accepted for clients that send 0/1.
                    _ => int_in(v, 0, 1, what)? == 1,
                };
                out.push(u8::from(b));
            }
            Datatype::Uint8 => out.push(int_in(v, 0, u8::MAX.into(), what)? as u8),
            Datatype::Int8 => {
                out.extend((int_in(v, i8::MIN.into(), i8::MAX.into(), what)? as i8).to_le_bytes())
            }
            Datatype::Uint16 => {
                out.extend((int_in(v, 0, u16::MAX.into(), what)? as u16).to_le_bytes())
            }
            Datatype::Int16 => out
                .extend((int_in(v, i16::MIN.into(), i16::MAX.into(), what)? as i16).to_le_bytes()),
            Datatype::Uint32 => {
                out.extend((int_in(v, 0, u32::MAX.into(), what)? as u32).to_le_bytes())
            }
            Datatype::Int32 => out
                .extend((int_in(v, i32::MIN.into(), i32::MAX.into(), what)? as i32).to_le_bytes()),
            Datatype::Uint64 => {
                out.extend((int_in(v, 0, u64::MAX.into(), what)? as u64).to_le_bytes())
            }
            Datatype::Int64 => out
                .extend((int_in(v, i64::MIN.into(), i64::MAX.into(), what)? as i64).to_le_bytes()),
            Datatype::Fp16 => out.extend(f16::from_f64(float(v, what)?).to_le_bytes()),
            Datatype::Bf16 => out.extend(bf16::from_f64(float(v, what)?).to_le_bytes()),
            Datatype::Fp32 => out.extend((float(v, what)? as f32).to_le_bytes()),
            Datatype::Fp64 => out.extend(float(v, what)?.to_le_bytes()),
            Datatype::Bytes => unreachable!("sized above"),
        }
    }
    Ok(out)
}

/// The JSON elements of `bytes` holding little-endian `dtype` values. Floats that
/// JSON cannot express (NaN, infinities) become `null`.
pub fn decode_json(dtype: DType, bytes: &[u8]) -> Vec<Value> {
    let n = dtype.size_bytes();
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    bytes
        .chunks_exact(n)
        .map(|c| match dtype {
            DType::Bool => Value::Bool(c[0] != 0),
            DType::U8 => Value::from(c[0]),
            DType::I8 => Value::from(c[0] as i8),
            DType::I16 => Value::from(i16::from_le_bytes([c[0], c[1]])),
            DType::I32 => Value::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::U32 => Value::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::I64 => Value::from(i64::from_le_bytes(c.try_into().unwrap_or_default())),
            DType::F16 => float(f16::from_le_bytes([c[0], c[1]]).to_f64()),
            DType::BF16 => float(bf16::from_le_bytes([c[0], c[1]]).to_f64()),
            DType::F32 => float(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            DType::F64 => float(f64::from_le_bytes(c.try_into().unwrap_or_default())),
        })
        .collect()
}

/// The elements of a BYTES tensor in binary form: each a little-endian u32 length and
/// that many bytes, filling `data` exactly.
pub fn split_bytes_elements(data: &[u8], what: &str) -> Result<Vec<Vec<u8>>, ServeError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(format!("{what}: BYTES element length cut short")));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(bad(format!(
                "{what}: BYTES element of {len} bytes, {} left",
                tail.len()
            )));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

/// The elements of a BYTES tensor in JSON: strings (their UTF-8 bytes).
pub fn bytes_elements_json(items: &[&Value], what: &str) -> Result<Vec<Vec<u8>>, ServeError> {
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(|s| s.as_bytes().to_vec())
                .ok_or_else(|| bad(format!("{what}: BYTES element {v} is not a string")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn datatypes_map_onto_device_dtypes() {
        for d in Datatype::ALL {
            assert_eq!(Datatype::parse(d.name()), Ok(d));
            if let Some(dt) = d.dtype() {
                assert_eq!(Datatype::from_dtype(dt), d);
                assert_eq!(d.size(), Some(dt.size_bytes()));
            }
        }
        for dt in DType::ALL {
            assert_eq!(Datatype::from_dtype(dt).dtype(), Some(dt));
        }
        assert_eq!(Datatype::Uint16.dtype(), None);
        assert_eq!(Datatype::Uint64.dtype(), None);
        assert_eq!(Datatype::Bytes.dtype(), None);
        assert!(Datatype::parse("fp32").is_err());
        assert!(Datatype::parse("FLOAT").is_err());
    }

    #[test]
    fn nested_lists_flatten_in_row_major_order() {
        let v = json!([[1, 2, 3], [4, [5, 6]]]);
        let flat: Vec<i64> = flatten(&v).iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(flat, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(flatten(&json!(7)).len(), 1);
        assert!(flatten(&json!([])).is_empty());
    }

    /// Every datatype with a device dtype: JSON in, bytes, JSON out.
    #[test]
    fn every_datatype_round_trips_through_device_bytes() {
        let cases: Vec<(Datatype, Value, Vec<u8>)> = vec![
            (Datatype::Bool, json!([true, false, 1]), vec![1, 0, 1]),
            (Datatype::Uint8, json!([0, 255]), vec![0, 255]),
            (Datatype::Int8, json!([-128, 127]), vec![0x80, 0x7f]),
            (Datatype::Int16, json!([-2]), (-2i16).to_le_bytes().to_vec()),
            (
                Datatype::Int32,
                json!([-70000]),
                (-70000i32).to_le_bytes().to_vec(),
            ),
            (
                Datatype::Uint32,
                json!([4000000000u32]),
                4000000000u32.to_le_bytes().to_vec(),
            ),
            (
                Datatype::Int64,
                json!([i64::MIN]),
                i64::MIN.to_le_bytes().to_vec(),
            ),
            (
                Datatype::Fp16,
                json!([1.5]),
                f16::from_f32(1.5).to_le_bytes().to_vec(),
            ),
            (
                Datatype::Bf16,
                json!([-2.0]),
                bf16::from_f32(-2.0).to_le_bytes().to_vec(),
            ),
            (
                Datatype::Fp32,
                json!([0.25, 3]),
                [0.25f32.to_le_bytes(), 3f32.to_le_bytes()].concat(),
            ),
            (
                Datatype::Fp64,
                json!([1e300]),
                1e300f64.to_le_bytes().to_vec(),
            ),
        ];
        for (d, data, bytes) in cases {
            let items = flatten(&data);
            let got = encode_json(d, &items, "t").unwrap();
            assert_eq!(got, bytes, "{d:?}");
            let back = decode_json(d.dtype().unwrap(), &got);
            let again = encode_json(d, &back.iter().collect::<Vec<_>>(), "t").unwrap();
            assert_eq!(again, bytes, "{d:?} round trip");
        }
        assert_eq!(
            encode_json(Datatype::Uint16, &[&json!(513)], "t").unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            encode_json(Datatype::Uint64, &[&json!(u64::MAX)], "t").unwrap(),
            u64::MAX.to_le_bytes().to_vec()
        );
    }

    #[test]
    fn out_of_range_and_wrong_kinds_are_bad_requests() {
        for (d, v) in [
            (Datatype::Uint8, json!(256)),
            (Datatype::Uint8, json!(-1)),
            (Datatype::Int8, json!(128)),
            (Datatype::Int32, json!(1.5)),
            (Datatype::Uint32, json!("7")),
            (Datatype::Bool, json!(2)),
            (Datatype::Fp32, json!("x")),
            (Datatype::Fp32, json!(null)),
            (Datatype::Bytes, json!("s")),
        ] {
            let e = encode_json(d, &[&v], "input x").unwrap_err();
            assert_eq!(e.http_status(), 400, "{d:?} {v}");
            assert!(e.to_string().starts_with("input x"), "{e}");
        }
    }

    #[test]
    fn nan_outputs_become_null() {
        let b = f32::NAN.to_le_bytes();
        assert_eq!(decode_json(DType::F32, &b), vec![Value::Null]);
    }

    #[test]
    fn bytes_elements_binary_and_json() {
        let mut data = Vec::new();
        for s in [&b"hello"[..], b"", b"xy"] {
            data.extend((s.len() as u32).to_le_bytes());
            data.extend(s);
        }
        assert_eq!(
            split_bytes_elements(&data, "t").unwrap(),
            vec![b"hello".to_vec(), vec![], b"xy".to_vec()]
        );
        assert!(split_bytes_elements(&data[..data.len() - 1], "t").is_err());
        assert!(split_bytes_elements(&[1, 0], "t").is_err());
        assert!(split_bytes_elements(&[], "t").unwrap().is_empty());
        let v = json!(["a", "bc"]);
        assert_eq!(
            bytes_elements_json(&flatten(&v), "t").unwrap(),
            vec![b"a".to_vec(), b"bc".to_vec()]
        );
        assert!(bytes_elements_json(&[&json!(1)], "t").is_err());
    }
}
