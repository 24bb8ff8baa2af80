//! OpenAI's `POST /v1/embeddings` on a text model of the device: one rank-1 UINT8
//! input taking UTF-8 text (the device tokenizes it, as for all-MiniLM-L6-v2) and an
//! FP32 output, flattened into the embedding.
//!
//! Each input string is its own device request, all in flight together, so the device
//! can batch them. The device reports no token counts: `usage` holds an estimate (a
//! lower bound) from BERT's pre-tokenization: words and punctuation marks, plus the
//! two special tokens each sequence gets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ai_infer_protocol::{DType, ModelInfo, TensorDesc};
use serde_json::{json, Value};

use super::backend::InferBackend;
use super::error::ServeError;
use super::oip::is_text_input;
use crate::engine::InferOptions;

/// Most strings in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Most device requests one embeddings request has in flight at once.
const MAX_PARALLEL: usize = 16;

fn bad(msg: impl Into<String>) -> ServeError {
    ServeError::BadRequest(msg.into())
}

/// A parsed embeddings request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    /// The texts, in order.
    pub inputs: Vec<String>,
    /// The model's name.
    pub model: String,
    /// `encoding_format: "base64"` (little-endian f32 bytes, base64).
    pub base64: bool,
}

/// Parses the request body.
pub fn parse_request(body: &[u8]) -> Result<EmbeddingsRequest, ServeError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("request is not valid JSON: {e}")))?;
    let o = v
        .as_object()
        .ok_or_else(|| bad("request must be a JSON object"))?;
    let model = o
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model must be a string"))?
        .to_string();
    let inputs = match o.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    bad("input must be a string or a list of strings (token arrays are not supported)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("input must be a string or a non-empty list of strings")),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(bad(format!(
            "{} inputs; at most {MAX_INPUTS} per request",
            inputs.len()
        )));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(bad(format!("input {i} is empty")));
    }
    let base64 = match o.get("encoding_format") {
        None => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return Err(bad(format!(
                "encoding_format {other} is not supported (float or base64)"
            )))
        }
    };
    if o.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(bad(
            "dimensions is not supported: the model's size is fixed",
        ));
    }
    Ok(EmbeddingsRequest {
        inputs,
        model,
        base64,
    })
}

/// Checks that `model` takes text and produces FP32.
pub fn check_model(model: &ModelInfo) -> Result<(), ServeError> {
    let text_in = matches!(model.inputs.as_slice(), [spec] if is_text_input(spec));
    let f32_out = model.outputs.first().is_some_and(|o| o.dtype == DType::F32);
    if !text_in || !f32_out {
        return Err(bad(format!(
            "model {:?} is not a text embedding model (one UINT8 text input, FP32 output)",
            model.name
        )));
    }
    Ok(())
}

/// One input's embedding, or why it has none.
type Embedding = Result<Vec<f32>, ServeError>;

/// Embeds every input on the device, several in flight at once; the first failure
/// (in input order) fails the request.
pub fn embed(
    backend: &dyn InferBackend,
    model: &ModelInfo,
    inputs: &[String],
    options: &InferOptions,
) -> Result<Vec<Vec<f32>>, ServeError> {
    let range = model.inputs[0].dims[0];
    let mut descs = Vec::with_capacity(inputs.len());
    for (i, text) in inputs.iter().enumerate() {
        let len = text.len() as u64;
        if !range.contains(len) {
            return Err(bad(format!(
                "input {i} has {len} bytes of UTF-8, model {:?} takes {}..={}",
                model.name, range.min, range.max
            )));
        }
        descs.push(TensorDesc::input(DType::U8, &[len]).map_err(|e| bad(e.to_string()))?);
    }
    let results: Vec<Mutex<Option<Embedding>>> = inputs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(text) = inputs.get(i) else { return };
        let r = backend
            .infer(model, &[(descs[i], text.as_bytes())], options)
            .and_then(|outs| {
                let out = outs
                    .into_iter()
                    .next()
                    .ok_or_else(|| ServeError::Internal("the model produced no output".into()))?;
                Ok(out
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            });
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    };
    let threads = inputs.len().min(MAX_PARALLEL);
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(ServeError::Internal("an input was not run".into())))
        })
        .collect()
}

/// Estimated tokens of `text`: words and punctuation marks, plus [CLS] and [SEP].
pub fn estimate_tokens(text: &str) -> u64 {
    let mut n = 2;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_whitespace() {
            in_word = false;
        } else if c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace()) {
            n += 1;
            in_word = false;
        } else if !in_word {
            n += 1;
            in_word = true;
        }
    }
    n
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The response body.
pub fn response(request: &EmbeddingsRequest, embeddings: &[Vec<f32>]) -> Value {
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if request.base64 {
                let bytes: Vec<u8> = e.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = request.inputs.iter().map(|t| estimate_tokens(t)).sum();
    json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// OpenAI's error body.
pub fn error_body(e: &ServeError) -> Value {
    let kind = match e.http_status() {
        400 | 404 | 405 | 413 => "invalid_request_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": null}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake_models;

    #[test]
    fn requests_parse() {
        let r = parse_request(br#"{"input": "hi there", "model": "m"}"#).unwrap();
        assert_eq!(
            (r.inputs.clone(), r.model.as_str(), r.base64),
            (vec!["hi there".to_string()], "m", false)
        );
        let r =
            parse_request(br#"{"input": ["a", "b"], "model": "m", "encoding_format": "base64"}"#)
                .unwrap();
        assert_eq!((r.inputs.len(), r.base64), (2, true));
        for bad in [
            &br#"{"input": "a"}"#[..],
            br#"{"input": [], "model": "m"}"#,
            br#"{"input": [1, 2], "model": "m"}"#,
            br#"{"input": [[1, 2]], "model": "m"}"#,
            br#"{"input": "", "model": "m"}"#,
            br#"{"input": "a", "model": "m", "encoding_format": "int8"}"#,
            br#"{"input": "a", "model": "m", "dimensions": 8}"#,
            b"[1]",
            b"{",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.http_status(), 400, "{}", String::from_utf8_lossy(bad));
        }
        let many = json!({"input": vec!["x"; MAX_INPUTS + 1], "model": "m"});
        assert!(parse_request(many.to_string().as_bytes()).is_err());
    }

    #[test]
    fn only_text_models_embed() {
        let models = fake_models();
        assert!(check_model(&models[1]).is_ok());
        assert_eq!(check_model(&models[0]).unwrap_err().http_status(), 400);
    }

    #[test]
    fn token_estimate_counts_words_and_punctuation() {
        assert_eq!(estimate_tokens("hello"), 3);
        assert_eq!(estimate_tokens("Hello, world!"), 6);
        assert_eq!(estimate_tokens("  two   words "), 4);
        assert_eq!(estimate_tokens("naïve café"), 4);
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
    }

    #[test]
    fn response_shape() {
        let req = EmbeddingsRequest {
            inputs: vec!["a b".into(), "c".into()],
            model: "m".into(),
            base64: false,
        };
        let v = response(&req, &[vec![1.0, 2.0], vec![0.5]]);
        assert_eq!(v["object"], "list");
        assert_eq!(
            v["data"][1],
            json!({"object": "embedding", "index": 1, "embedding": [0.5]})
        );
        assert_eq!(v["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
        let e = error_body(&ServeError::NotFound("no".into()));
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["message"], "no");
    }
}
