//! The Open Inference Protocol (KServe v2 REST) on the device's models: model
//! metadata from the MODELS list, inference requests in JSON or with the binary
//! tensor data extension (as Triton implements it), and responses in either form.
//!
//! Binary extension: a body whose JSON part is followed by raw tensor data has the
//! header `Inference-Header-Content-Length` (the JSON's length); inputs with
//! `"parameters": {"binary_data_size": N}` take the next N bytes, in input order.
//! Outputs asked for with `"binary_data": true` (or all of them with the request
//! parameter `binary_data_output`) come back the same way.

use ai_infer_protocol::{DType, ModelInfo, TensorDesc, TensorSpec};
use serde_json::{json, Map, Value};

use super::backend::OutputTensor;
use super::error::ServeError;
use super::http::Response;
use super::tensor::{
    bytes_elements_json, decode_json, encode_json, flatten, split_bytes_elements, Datatype,
};

/// The request header giving the JSON part's length in a binary request or response.
pub const HEADER_LENGTH: &str = "Inference-Header-Content-Length";
/// The only model version: the device has one version of each model.
pub const MODEL_VERSION: &str = "1";
/// The `platform` reported in model metadata.
pub const PLATFORM: &str = "ai_infer";

fn bad(msg: impl Into<String>) -> ServeError {
    ServeError::BadRequest(msg.into())
}

/// A tensor's elements: little-endian bytes, or the byte strings of BYTES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorData {
    /// Fixed-size elements, little-endian, row-major.
    Fixed(Vec<u8>),
    /// BYTES elements.
    Bytes(Vec<Vec<u8>>),
}

/// One input of an inference request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputTensor {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its elements (count checked against the shape).
    pub data: TensorData,
}

/// An output the client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestedOutput {
    /// Its name.
    pub name: String,
    /// `binary_data`, if given.
    pub binary: Option<bool>,
}

/// A parsed inference request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferRequest {
    /// The client's id, echoed in the response.
    pub id: Option<String>,
    /// The inputs.
    pub inputs: Vec<InputTensor>,
    /// The outputs asked for (`None`: all).
    pub outputs: Option<Vec<RequestedOutput>>,
    /// Request parameter `binary_data_output`.
    pub binary_data_output: bool,
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ServeError> {
    v.as_object()
        .ok_or_else(|| bad(format!("{what} must be a JSON object")))
}

fn parameters<'a>(
    o: &'a Map<String, Value>,
    what: &str,
) -> Result<Option<&'a Map<String, Value>>, ServeError> {
    o.get("parameters")
        .map(|p| object(p, &format!("{what} parameters")))
        .transpose()
}

fn bool_param(
    p: Option<&Map<String, Value>>,
    key: &str,
    what: &str,
) -> Result<Option<bool>, ServeError> {
    match p.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(format!(
            "{what}: parameter {key} must be a boolean, not {v}"
        ))),
    }
}

/// The number of elements of `shape` (checked).
fn elements(shape: &[u64], what: &str) -> Result<u64, ServeError> {
    shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| bad(format!("{what}: shape {shape:?} overflows")))
}

fn parse_input(v: &Value, index: usize, binary: &mut &[u8]) -> Result<InputTensor, ServeError> {
    let o = object(v, &format!("input {index}"))?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("input {index} has no name")))?
        .to_string();
    let what = format!("input {name:?}");
    let datatype = Datatype::parse(
        o.get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("{what} has no datatype")))?,
    )
    .map_err(|e| bad(format!("{what}: {e}")))?;
    let shape = o
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{what} has no shape")))?
        .iter()
        .map(|d| {
            d.as_u64().ok_or_else(|| {
                bad(format!(
                    "{what}: shape dimension {d} is not a non-negative integer"
                ))
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    let count = elements(&shape, &what)?;
    let params = parameters(o, &what)?;
    let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
        None => None,
        Some(n) => Some(n.as_u64().ok_or_else(|| {
            bad(format!(
                "{what}: binary_data_size {n} is not a non-negative integer"
            ))
        })?),
    };
    let data = match (binary_size, o.get("data")) {
        (Some(_), Some(_)) => {
            return Err(bad(format!("{what} has both data and binary_data_size")))
        }
        (None, None) => return Err(bad(format!("{what} has no data"))),
        (Some(size), None) => {
            let size = usize::try_from(size)
                .ok()
                .filter(|s| *s <= binary.len())
                .ok_or_else(|| {
                    bad(format!(
                        "{what}: binary_data_size {size} is more than the {} binary bytes left",
                        binary.len()
                    ))
                })?;
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            match datatype.size() {
                Some(n) => {
                    let want = count.checked_mul(n as u64);
                    if want != Some(size as u64) {
                        return Err(bad(format!(
                            "{what}: shape {shape:?} of {} needs {} bytes, binary_data_size is {size}",
                            datatype.name(),
                            want.map_or("too many".into(), |w| w.to_string())
                        )));
                    }
                    TensorData::Fixed(mine.to_vec())
                }
                None => TensorData::Bytes(split_bytes_elements(mine, &what)?),
            }
        }
        (None, Some(data)) => {
            let items = flatten(data);
            if items.len() as u64 != count {
                return Err(bad(format!(
                    "{what}: shape {shape:?} has {count} elements, data has {}",
                    items.len()
                )));
            }
            match datatype {
                Datatype::Bytes => TensorData::Bytes(bytes_elements_json(&items, &what)?),
                d => TensorData::Fixed(encode_json(d, &items, &what)?),
            }
        }
    };
    if let TensorData::Bytes(e) = &data {
        if e.len() as u64 != count {
            return Err(bad(format!(
                "{what}: shape {shape:?} has {count} elements, data has {}",
                e.len()
            )));
        }
    }
    Ok(InputTensor {
        name,
        datatype,
        shape,
        data,
    })
}

/// Parses an inference request body; `header_length` is the value of
/// `Inference-Header-Content-Length`, if the client sent it.
pub fn parse_infer_request(
    body: &[u8],
    header_length: Option<&str>,
) -> Result<InferRequest, ServeError> {
    let (json_part, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(v) => {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| bad(format!("{HEADER_LENGTH} {v:?} is not a length")))?;
            if n > body.len() {
                return Err(bad(format!(
                    "{HEADER_LENGTH} {n} is more than the body's {} bytes",
                    body.len()
                )));
            }
            body.split_at(n)
        }
    };
    let v: Value = serde_json::from_slice(json_part)
        .map_err(|e| bad(format!("request is not valid JSON: {e}")))?;
    let o = object(&v, "the request")?;
    let id = match o.get("id") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(bad(format!("id must be a string, not {other}"))),
    };
    let params = parameters(o, "request")?;
    let binary_data_output = bool_param(params, "binary_data_output", "request")?.unwrap_or(false);
    let inputs = o
        .get("inputs")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("request has no inputs"))?
        .iter()
        .enumerate()
        .map(|(i, v)| parse_input(v, i, &mut binary))
        .collect::<Result<Vec<_>, _>>()?;
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data that no input claims",
            binary.len()
        )));
    }
    let outputs = match o.get("outputs") {
        None => None,
        Some(list) => Some(
            list.as_array()
                .ok_or_else(|| bad("outputs must be a list"))?
                .iter()
                .enumerate()
                .map(|(k, v)| {
                    let o = object(v, &format!("output {k}"))?;
                    let name = o
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("output {k} has no name")))?
                        .to_string();
                    let what = format!("output {name:?}");
                    let p = parameters(o, &what)?;
                    if p.is_some_and(|p| p.contains_key("classification")) {
                        return Err(bad(format!("{what}: classification is not supported")));
                    }
                    Ok(RequestedOutput {
                        binary: bool_param(p, "binary_data", &what)?,
                        name,
                    })
                })
                .collect::<Result<Vec<_>, ServeError>>()?,
        ),
    };
    Ok(InferRequest {
        id,
        inputs,
        outputs,
        binary_data_output,
    })
}

/// The protocol name of a model tensor: its name, or `input_i` / `output_k`.
pub fn tensor_name(spec: &TensorSpec, index: usize, kind: &str) -> String {
    if spec.name.is_empty() {
        format!("{kind}_{index}")
    } else {
        spec.name.clone()
    }
}

/// Whether `spec` takes text: one rank-1 U8 tensor (the MiniLM embedder's form).
pub fn is_text_input(spec: &TensorSpec) -> bool {
    spec.dtype == DType::U8 && spec.dims.len() == 1
}

/// The device tensors for `request` on `model`: each model input found by name, its
/// datatype and shape checked against the signature. A BYTES input with one element
/// feeds a text input (rank-1 UINT8) with the element's bytes.
pub fn device_inputs(
    model: &ModelInfo,
    request: &InferRequest,
) -> Result<Vec<(TensorDesc, Vec<u8>)>, ServeError> {
    if request.inputs.len() != model.inputs.len() {
        return Err(bad(format!(
            "model {:?} takes {} inputs, the request has {}",
            model.name,
            model.inputs.len(),
            request.inputs.len()
        )));
    }
    let mut out = Vec::with_capacity(model.inputs.len());
    for (i, spec) in model.inputs.iter().enumerate() {
        let name = tensor_name(spec, i, "input");
        let t = request
            .inputs
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad(format!("model {:?} needs input {name:?}", model.name)))?;
        let what = format!("input {name:?}");
        let (dims, bytes) = match (&t.data, t.datatype.dtype()) {
            (TensorData::Bytes(elements), _) if is_text_input(spec) => {
                let [text] = elements.as_slice() else {
                    return Err(bad(format!(
                        "{what}: a BYTES input of this model holds one element, not {}",
                        elements.len()
                    )));
                };
                (vec![text.len() as u64], text.clone())
            }
            (TensorData::Fixed(bytes), Some(dtype)) if dtype == spec.dtype => {
                (t.shape.clone(), bytes.clone())
            }
            _ => {
                return Err(bad(format!(
                    "{what}: datatype {} does not match the model's {}",
                    t.datatype.name(),
                    Datatype::from_dtype(spec.dtype).name()
                )))
            }
        };
        if dims.len() != spec.dims.len() {
            return Err(bad(format!(
                "{what}: shape {dims:?} has rank {}, the model's has rank {}",
                dims.len(),
                spec.dims.len()
            )));
        }
        for (k, (d, range)) in dims.iter().zip(&spec.dims).enumerate() {
            if !range.contains(*d) {
                return Err(bad(format!(
                    "{what}: dimension {k} is {d}, the model takes {}..={}",
                    range.min, range.max
                )));
            }
        }
        let desc = TensorDesc::input(spec.dtype, &dims).map_err(|e| bad(format!("{what}: {e}")))?;
        out.push((desc, bytes));
    }
    Ok(out)
}

/// Which outputs to return, each as (index in the signature, in binary form).
pub fn selected_outputs(
    model: &ModelInfo,
    request: &InferRequest,
) -> Result<Vec<(usize, bool)>, ServeError> {
    let names: Vec<String> = model
        .outputs
        .iter()
        .enumerate()
        .map(|(k, s)| tensor_name(s, k, "output"))
        .collect();
    match &request.outputs {
        None => Ok((0..names.len())
            .map(|k| (k, request.binary_data_output))
            .collect()),
        Some(list) => list
            .iter()
            .map(|r| {
                let k = names.iter().position(|n| *n == r.name).ok_or_else(|| {
                    bad(format!("model {:?} has no output {:?}", model.name, r.name))
                })?;
                Ok((k, r.binary.unwrap_or(request.binary_data_output)))
            })
            .collect(),
    }
}

/// The response to an inference request: outputs in JSON, or the JSON part followed
/// by the binary ones.
pub fn infer_response(
    model: &ModelInfo,
    id: Option<&str>,
    selected: &[(usize, bool)],
    outputs: &[OutputTensor],
) -> Result<Response, ServeError> {
    let mut binary = Vec::new();
    let mut list = Vec::with_capacity(selected.len());
    for &(k, as_binary) in selected {
        let (spec, out) = model
            .outputs
            .get(k)
            .zip(outputs.get(k))
            .ok_or_else(|| ServeError::Internal(format!("output {k} missing")))?;
        let mut o = json!({
            "name": tensor_name(spec, k, "output"),
            "datatype": Datatype::from_dtype(out.desc.dtype).name(),
            "shape": out.desc.shape.dims(),
        });
        if as_binary {
            o["parameters"] = json!({ "binary_data_size": out.data.len() });
            binary.extend_from_slice(&out.data);
        } else {
            o["data"] = Value::Array(decode_json(out.desc.dtype, &out.data));
        }
        list.push(o);
    }
    let mut body = json!({
        "model_name": model.name,
        "model_version": MODEL_VERSION,
        "outputs": list,
    });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    if selected.iter().any(|s| s.1) {
        let mut bytes = body.to_string().into_bytes();
        let json_len = bytes.len();
        bytes.extend_from_slice(&binary);
        Ok(Response::new(200, "application/octet-stream", bytes)
            .with_header(HEADER_LENGTH, json_len.to_string()))
    } else {
        Ok(Response::json(200, &body))
    }
}

fn tensor_metadata(spec: &TensorSpec, index: usize, kind: &str) -> Value {
    let shape: Vec<i64> = spec
        .dims
        .iter()
        .map(|r| {
            if r.is_fixed() {
                i64::try_from(r.min).unwrap_or(-1)
            } else {
                -1
            }
        })
        .collect();
    json!({
        "name": tensor_name(spec, index, kind),
        "datatype": Datatype::from_dtype(spec.dtype).name(),
        "shape": shape,
    })
}

/// Model metadata: name, versions, platform, and the signature (-1 for a dimension
/// that may vary).
pub fn model_metadata(model: &ModelInfo) -> Value {
    json!({
        "name": model.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": model.inputs.iter().enumerate().map(|(i, s)| tensor_metadata(s, i, "input")).collect::<Vec<_>>(),
        "outputs": model.outputs.iter().enumerate().map(|(k, s)| tensor_metadata(s, k, "output")).collect::<Vec<_>>(),
    })
}

/// Server metadata (`GET /v2`).
pub fn server_metadata() -> Value {
    json!({
        "name": "ai-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake_models;
    use ai_infer_protocol::DimRange;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn double() -> ModelInfo {
        fake_models()[0].clone()
    }

    fn text() -> ModelInfo {
        fake_models()[1].clone()
    }

    #[test]
    fn json_request_with_flat_or_nested_data() {
        for data in [json!([1.0, 2.0, 3.0]), json!([[1.0, 2.0, 3.0]])] {
            let body = json!({"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data}]});
            let r = parse_infer_request(body.to_string().as_bytes(), None).unwrap();
            assert_eq!(r.id.as_deref(), Some("r1"));
            assert_eq!(r.inputs[0].data, TensorData::Fixed(f32s(&[1.0, 2.0, 3.0])));
            let ins = device_inputs(&double(), &r).unwrap();
            assert_eq!(ins[0].0, TensorDesc::input(DType::F32, &[1, 3]).unwrap());
            assert_eq!(ins[0].1, f32s(&[1.0, 2.0, 3.0]));
            assert_eq!(selected_outputs(&double(), &r).unwrap(), vec![(0, false)]);
        }
    }

    #[test]
    fn binary_request_splits_the_body_after_the_json() {
        let header = json!({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend(f32s(&[0.5, -1.0]));
        let len = header.len().to_string();
        let r = parse_infer_request(&body, Some(&len)).unwrap();
        assert_eq!(r.inputs[0].data, TensorData::Fixed(f32s(&[0.5, -1.0])));
        assert_eq!(selected_outputs(&double(), &r).unwrap(), vec![(0, true)]);
        // Binary data the inputs do not claim, or fewer bytes than claimed, are errors.
        let mut extra = body.clone();
        extra.push(0);
        assert!(parse_infer_request(&extra, Some(&len)).is_err());
        let e = parse_infer_request(&body[..body.len() - 1], Some(&len)).unwrap_err();
        assert!(e.to_string().contains("binary_data_size 8"), "{e}");
        // A header length past the body, or not a number.
        assert!(parse_infer_request(&body, Some("100000")).is_err());
        assert!(parse_infer_request(&body, Some("x")).is_err());
        // binary_data_size must match the shape.
        let wrong = header.replace("\"binary_data_size\":8", "\"binary_data_size\":4");
        let mut b = wrong.clone().into_bytes();
        b.extend(f32s(&[0.5]));
        let e = parse_infer_request(&b, Some(&wrong.len().to_string())).unwrap_err();
        assert!(e.to_string().contains("needs 8 bytes"), "{e}");
    }

    #[test]
    fn binary_data_output_applies_unless_an_output_overrides_it() {
        let base = json!({"parameters": {"binary_data_output": true},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]});
        let r = parse_infer_request(base.to_string().as_bytes(), None).unwrap();
        assert_eq!(selected_outputs(&double(), &r).unwrap(), vec![(0, true)]);
        let mut over = base.clone();
        over["outputs"] = json!([{"name": "y", "parameters": {"binary_data": false}}]);
        let r = parse_infer_request(over.to_string().as_bytes(), None).unwrap();
        assert_eq!(selected_outputs(&double(), &r).unwrap(), vec![(0, false)]);
        over["outputs"] = json!([{"name": "nope"}]);
        let r = parse_infer_request(over.to_string().as_bytes(), None).unwrap();
        assert_eq!(
            selected_outputs(&double(), &r).unwrap_err().http_status(),
            400
        );
    }

    #[test]
    fn bytes_inputs_feed_text_models() {
        let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]});
        let r = parse_infer_request(body.to_string().as_bytes(), None).unwrap();
        let ins = device_inputs(&text(), &r).unwrap();
        assert_eq!(ins[0].0, TensorDesc::input(DType::U8, &[5]).unwrap());
        assert_eq!(ins[0].1, b"hello");
        // Binary BYTES: a u32 length and the bytes.
        let header = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]}).to_string();
        let mut b = header.clone().into_bytes();
        b.extend(3u32.to_le_bytes());
        b.extend(b"abc");
        let r = parse_infer_request(&b, Some(&header.len().to_string())).unwrap();
        assert_eq!(device_inputs(&text(), &r).unwrap()[0].1, b"abc");
        // Two texts in one request, or BYTES for a numeric model, are refused.
        let two = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]});
        let r = parse_infer_request(two.to_string().as_bytes(), None).unwrap();
        assert!(device_inputs(&text(), &r).is_err());
        let r = parse_infer_request(
            json!({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]})
                .to_string()
                .as_bytes(),
            None,
        )
        .unwrap();
        assert!(device_inputs(&double(), &r).is_err());
        // UINT8 works too.
        let u8s = json!({"inputs": [{"name": "text", "datatype": "UINT8", "shape": [2], "data": [104, 105]}]});
        let r = parse_infer_request(u8s.to_string().as_bytes(), None).unwrap();
        assert_eq!(device_inputs(&text(), &r).unwrap()[0].1, b"hi");
    }

    #[test]
    fn mismatches_are_bad_requests_with_a_reason() {
        let cases = [
            (
                json!({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 1], "data": [1]}]}),
                "does not match",
            ),
            (
                json!({"inputs": [{"name": "x", "datatype": "UINT16", "shape": [1, 1], "data": [1]}]}),
                "does not match",
            ),
            (
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}),
                "rank",
            ),
            (
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}]}),
                "dimension 0",
            ),
            (
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 0], "data": []}]}),
                "dimension 1",
            ),
            (
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2000], "data": vec![0; 2000]}]}),
                "dimension 1",
            ),
            (
                json!({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}),
                "needs input",
            ),
            (
                json!({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]},
                {"name": "w", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}),
                "takes 1 inputs",
            ),
        ];
        for (body, why) in cases {
            let r = parse_infer_request(body.to_string().as_bytes(), None).unwrap();
            let e = device_inputs(&double(), &r).unwrap_err();
            assert_eq!(e.http_status(), 400);
            assert!(e.to_string().contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        for body in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"inputs": []}"#,
            r#"{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "shape": [1], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [4294967296, 4294967296, 4294967296], "data": [1]}]}"#,
            r#"{"id": 5, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}"#,
            r#"{"parameters": {"binary_data_output": 1}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {}}"#,
            r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"name": "y", "parameters": {"classification": 2}}]}"#,
        ] {
            let e = parse_infer_request(body.as_bytes(), None).unwrap_err();
            assert_eq!(e.http_status(), 400, "{body}");
        }
    }

    #[test]
    fn responses_in_json_and_binary() {
        let model = double();
        let out = OutputTensor {
            desc: TensorDesc::produced(DType::F32, ai_infer_protocol::Shape::new(&[1, 2]).unwrap())
                .unwrap(),
            data: f32s(&[2.0, -4.5]),
        };
        let r =
            infer_response(&model, Some("a"), &[(0, false)], std::slice::from_ref(&out)).unwrap();
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["id"], "a");
        assert_eq!(v["model_name"], "double");
        assert_eq!(
            v["outputs"][0],
            json!({"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [2.0, -4.5]})
        );
        let r = infer_response(&model, None, &[(0, true)], std::slice::from_ref(&out)).unwrap();
        let n: usize = r
            .headers
            .iter()
            .find(|(k, _)| k == HEADER_LENGTH)
            .unwrap()
            .1
            .parse()
            .unwrap();
        let v: Value = serde_json::from_slice(&r.body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(v["outputs"][0].get("data").is_none());
        assert_eq!(&r.body[n..], &f32s(&[2.0, -4.5])[..]);
    }

    #[test]
    fn metadata_marks_dynamic_dims() {
        let mut m = double();
        m.inputs[0].dims = vec![DimRange::fixed(1), DimRange::dynamic(1024)];
        m.outputs[0].name = String::new();
        let v = model_metadata(&m);
        assert_eq!(v["name"], "double");
        assert_eq!(v["platform"], PLATFORM);
        assert_eq!(v["versions"], json!(["1"]));
        assert_eq!(
            v["inputs"][0],
            json!({"name": "x", "datatype": "FP32", "shape": [1, -1]})
        );
        assert_eq!(v["outputs"][0]["name"], "output_0");
        let t = model_metadata(&text());
        assert_eq!(t["inputs"][0]["datatype"], "UINT8");
        assert_eq!(t["outputs"][0]["shape"], json!([1, 4]));
    }

    /// Seeded random damage to a valid binary request: parsing and mapping return a
    /// result or a 400, never panic.
    #[test]
    fn random_damage_is_an_error_not_a_panic() {
        let header = json!({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
        })
        .to_string();
        let mut valid = header.clone().into_bytes();
        valid.extend(f32s(&[1.0, 2.0]));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut body = valid.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % body.len();
                body[at] = b"0123456789-[]{}\",:.eE \x00\xff"[(next() % 22) as usize];
            }
            let len = if next() % 4 == 0 {
                (next() % 200).to_string()
            } else {
                header.len().to_string()
            };
            match parse_infer_request(&body, Some(&len)) {
                Ok(r) => {
                    let _ = device_inputs(&double(), &r);
                    let _ = selected_outputs(&double(), &r);
                }
                Err(e) => assert_eq!(e.http_status(), 400),
            }
        }
    }
}
