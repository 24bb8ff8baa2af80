//! Sentence embeddings with a BERT encoder on candle, for sentence-transformers models
//! such as all-MiniLM-L6-v2 (a directory with `config.json`, `tokenizer.json`,
//! `model.safetensors` and optionally `sentence_bert_config.json`).
//!
//! **Signature.** Input `text`: u8 `[1..=16384]`, UTF-8 text (invalid UTF-8 is
//! [`BackendError::BadInput`]). Output `embedding`: f32 `[hidden_size]` (384 for MiniLM).
//!
//! **Pipeline**, as the sentence-transformers modules of these models do: tokenize with
//! the model's tokenizer (truncated to `max_seq_length`, 256 by default), run the
//! encoder, mean-pool the token vectors over the attention mask, L2-normalise.
//!
//! **Batching.** All valid requests of a batch go through one forward pass, padded to
//! the longest sequence *of that batch*. The package's tokenizer.json pads everything to
//! 128 tokens; that padding is switched off (it made a 17-token sentence 3× slower).
//!
//! **Copies.** Each text is copied once out of guest memory (the tokenizer needs a
//! `&str`); each embedding is written straight into the guest's buffer.

use std::path::{Path, PathBuf};

use ai_infer_protocol::{DType, DimRange, ModelInfo, ProtocolError, Shape, TensorSpec};
use candle_core::{DType as CandleDType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use serde::Deserialize;
use thiserror::Error;
use tokenizers::{Tokenizer, TruncationParams};

use super::{
    check_produced, check_signature, guard_runtime, Backend, BackendError, RequestOutcome,
    RequestTensors,
};

/// Longest text accepted, in bytes.
pub const MAX_TEXT_BYTES: u64 = 16384;

/// `max_seq_length` when the model directory has no sentence_bert_config.json (the
/// sentence-transformers default for MiniLM models).
pub const DEFAULT_MAX_SEQ_LEN: usize = 256;

/// Why a BERT model directory could not be loaded.
#[derive(Debug, Error)]
pub enum BertError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// config.json or sentence_bert_config.json is not what a BERT model has.
    #[error("invalid model config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// tokenizer.json could not be loaded or configured.
    #[error("invalid tokenizer {path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights do not load into a BERT of that config.
    #[error("cannot load weights {path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// candle's explanation.
        reason: String,
    },
    /// The derived signature breaks a protocol limit.
    #[error("model signature does not fit the protocol: {0}")]
    Signature(ProtocolError),
}

/// Operator settings for one BERT model (from the models manifest).
#[derive(Clone, Debug)]
pub struct BertOptions {
    /// Largest number of requests in one forward pass.
    pub max_batch: u32,
    /// Where the model runs (CPU, or a CUDA device with the `cuda` feature).
    pub device: Device,
}

/// sentence_bert_config.json: only the field that matters here.
#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// A loaded BERT sentence-embedding model.
pub struct BertBackend {
    info: ModelInfo,
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    hidden: usize,
    max_seq_len: usize,
    pad_id: u32,
}

fn read(path: &Path) -> Result<Vec<u8>, BertError> {
    std::fs::read(path).map_err(|source| BertError::Read {
        path: path.to_owned(),
        source,
    })
}

impl BertBackend {
    /// Loads the model in `dir`, giving it MODELS id `id` and name `name`.
    pub fn load(dir: &Path, id: u32, name: &str, opts: &BertOptions) -> Result<Self, BertError> {
        let config_path = dir.join("config.json");
        let config: Config =
            serde_json::from_slice(&read(&config_path)?).map_err(|e| BertError::Config {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;

        let st_path = dir.join("sentence_bert_config.json");
        let max_seq_len = if st_path.exists() {
            let st: SentenceBertConfig =
                serde_json::from_slice(&read(&st_path)?).map_err(|e| BertError::Config {
                    path: st_path.clone(),
                    reason: e.to_string(),
                })?;
            st.max_seq_length
        } else {
            DEFAULT_MAX_SEQ_LEN
        };
        if max_seq_len < 2 || max_seq_len > config.max_position_embeddings {
            return Err(BertError::Config {
                path: st_path,
                reason: format!(
                    "max_seq_length {max_seq_len} is outside 2..={} (the position embeddings)",
                    config.max_position_embeddings
                ),
            });
        }

        let tok_path = dir.join("tokenizer.json");
        let tok_err = |reason: String| BertError::Tokenizer {
            path: tok_path.clone(),
            reason,
        };
        let mut tokenizer =
            Tokenizer::from_bytes(read(&tok_path)?).map_err(|e| tok_err(e.to_string()))?;
        let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
        // Token ids index the embedding table: every id the tokenizer can produce must fit.
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size || pad_id as usize >= config.vocab_size {
            return Err(tok_err(format!(
                "vocabulary of {vocab} tokens (pad id {pad_id}) for a model of {}",
                config.vocab_size
            )));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_len,
                ..Default::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;

        let weights_path = dir.join("model.safetensors");
        let model =
            VarBuilder::from_buffered_safetensors(read(&weights_path)?, DTYPE, &opts.device)
                .and_then(|vb| BertModel::load(vb, &config))
                .map_err(|e| BertError::Weights {
                    path: weights_path,
                    reason: e.to_string(),
                })?;

        let hidden = config.hidden_size;
        let info = ModelInfo {
            id,
            name: name.to_owned(),
            max_batch: opts.max_batch.max(1),
            inputs: vec![TensorSpec {
                name: "text".into(),
                dtype: DType::U8,
                dims: vec![DimRange::dynamic(MAX_TEXT_BYTES)],
            }],
            outputs: vec![TensorSpec {
                name: "embedding".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(hidden as u64)],
            }],
        };
        info.validate().map_err(BertError::Signature)?;
        Ok(BertBackend {
            info,
            model,
            tokenizer,
            device: opts.device.clone(),
            hidden,
            max_seq_len,
            pad_id,
        })
    }

    /// The longest token sequence a text is cut to.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Checks one request and copies its text out of guest memory.
    fn read_text(&self, req: &RequestTensors<'_>) -> Result<String, BackendError> {
        check_signature(&self.info, req)?;
        let input = &req.inputs[0];
        let mut bytes = vec![0u8; input.data.len()];
        // The one input copy: the tokenizer needs the text in host memory.
        input.data.copy_to(&mut bytes);
        String::from_utf8(bytes).map_err(|e| BackendError::BadInput {
            index: 0,
            reason: format!(
                "text is not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        })
    }

    /// Embeds `texts` in one forward pass: one L2-normalised vector per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode_fast(*t, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tokenizer: {e}"))?;
        // Pad to the longest sequence of this batch only.
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        if len > self.max_seq_len {
            return Err(format!(
                "tokenizer produced {len} tokens, above {}",
                self.max_seq_len
            ));
        }
        let batch = encodings.len();
        let mut ids = vec![self.pad_id; batch * len];
        let mut types = vec![0u32; batch * len];
        let mut mask = vec![0u32; batch * len];
        for (row, enc) in encodings.iter().enumerate() {
            let base = row * len;
            for (t, ((id, ty), m)) in enc
                .get_ids()
                .iter()
                .zip(enc.get_type_ids())
                .zip(enc.get_attention_mask())
                .enumerate()
            {
                ids[base + t] = *id;
                types[base + t] = *ty;
                mask[base + t] = *m;
            }
        }
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(ids, (batch, len), &self.device)?;
            let types = Tensor::from_vec(types, (batch, len), &self.device)?;
            let mask = Tensor::from_vec(mask, (batch, len), &self.device)?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (batch, len, hidden)
            let maskf = mask.to_dtype(CandleDType::F32)?.unsqueeze(2)?; // (batch, len, 1)
            let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (batch, hidden)
                                                                // As sentence-transformers: token counts clamped at 1e-9, norms at 1e-12.
            let counts = maskf.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (batch, 1)
            let mean = summed.broadcast_div(&counts)?;
            let norms = mean
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            mean.broadcast_div(&norms)?.to_vec2::<f32>()
        };
        let vectors = forward().map_err(|e| format!("candle: {e}"))?;
        if vectors.len() != batch || vectors.iter().any(|v| v.len() != self.hidden) {
            return Err(format!(
                "candle produced {} vectors for {batch} texts",
                vectors.len()
            ));
        }
        Ok(vectors)
    }

    /// Writes one embedding into the request's output buffer.
    fn write(&self, req: &RequestTensors<'_>, vector: &[f32]) -> RequestOutcome {
        let shape =
            Shape::new(&[vector.len() as u64]).map_err(|e| BackendError::Runtime(e.to_string()))?;
        check_produced(&req.outputs, &[shape])?;
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        let out = req
            .outputs
            .first()
            .ok_or_else(|| BackendError::Runtime("no output buffer".into()))?;
        out.buf
            .subslice(0, bytes.len())
            .map_err(|e| BackendError::Runtime(format!("output buffer: {e}")))?
            .copy_from(&bytes);
        Ok(vec![shape])
    }
}

impl Backend for BertBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        self.info.max_batch as usize
    }

    fn run(&self, batch: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome> {
        let texts: Vec<Result<String, BackendError>> =
            batch.iter().map(|r| self.read_text(r)).collect();
        let valid: Vec<&str> = texts.iter().filter_map(|t| t.as_deref().ok()).collect();
        let vectors = if valid.is_empty() {
            Ok(Vec::new())
        } else {
            guard_runtime("bert", || self.embed(&valid))
        };
        let mut next = 0usize;
        batch
            .iter()
            .zip(texts)
            .map(|(req, text)| {
                text?;
                let vectors = vectors
                    .as_ref()
                    .map_err(|msg| BackendError::Runtime(msg.clone()))?;
                let vector = vectors
                    .get(next)
                    .ok_or_else(|| BackendError::Runtime("missing embedding".into()))?;
                next += 1;
                self.write(req, vector)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use ai_infer_protocol::TensorDesc;
    use serde::Deserialize;
    use vm_memory::VolatileSlice;

    use super::*;
    use crate::backend::local::{run_local, run_local_batch, LocalRequest, LocalRunError};
    use crate::backend::{InputTensor, OutputBuffer};
    use crate::test_models::require;

    #[derive(Deserialize)]
    struct Reference {
        sentences: Vec<RefSentence>,
    }

    #[derive(Deserialize)]
    struct RefSentence {
        text: String,
        embedding: Vec<f64>,
    }

    fn minilm(max_batch: u32) -> Option<BertBackend> {
        let dir = require("minilm")?;
        let opts = BertOptions {
            max_batch,
            device: Device::Cpu,
        };
        Some(BertBackend::load(&dir, 2, "all-MiniLM-L6-v2", &opts).unwrap())
    }

    fn reference() -> Option<Reference> {
        let path = require("minilm_ref.json")?;
        Some(serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
    }

    fn text_request(text: &[u8]) -> LocalRequest {
        LocalRequest {
            inputs: vec![(
                TensorDesc::input(DType::U8, &[text.len() as u64]).unwrap(),
                text.to_vec(),
            )],
            outputs: vec![TensorDesc::output(DType::F32, &[384], 384 * 4).unwrap()],
        }
    }

    fn floats(data: &[u8]) -> Vec<f32> {
        data.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn embed_one(model: &BertBackend, text: &str) -> Vec<f32> {
        let out = run_local(model, text_request(text.as_bytes())).unwrap();
        assert_eq!(out[0].shape, Shape::new(&[384]).unwrap());
        floats(&out[0].data)
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn signature() {
        let Some(model) = minilm(8) else { return };
        let info = model.info();
        assert_eq!(
            (info.id, info.name.as_str(), info.max_batch),
            (2, "all-MiniLM-L6-v2", 8)
        );
        assert_eq!(info.inputs[0].name, "text");
        assert_eq!(info.inputs[0].dtype, DType::U8);
        assert_eq!(info.inputs[0].dims, vec![DimRange::new(1, 16384)]);
        assert_eq!(info.outputs[0].name, "embedding");
        assert_eq!(info.outputs[0].dtype, DType::F32);
        assert_eq!(info.outputs[0].dims, vec![DimRange::fixed(384)]);
        assert_eq!(model.max_seq_len(), 256, "from sentence_bert_config.json");
    }

    #[test]
    fn embeddings_match_the_independent_reference() {
        let (Some(model), Some(reference)) = (minilm(8), reference()) else {
            return;
        };
        for s in &reference.sentences {
            let got = embed_one(&model, &s.text);
            let want: Vec<f32> = s.embedding.iter().map(|v| *v as f32).collect();
            let cos = cosine(&got, &want);
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(cos >= 0.99999, "{:?}: cosine {cos}", s.text);
            assert!(max_diff <= 1e-4, "{:?}: max diff {max_diff}", s.text);
        }
    }

    #[test]
    fn embeddings_are_unit_vectors_and_similar_texts_are_closer() {
        let Some(model) = minilm(8) else { return };
        let cat = embed_one(&model, "The cat sits on the mat.");
        let kitten = embed_one(&model, "A kitten is resting on a rug.");
        let money = embed_one(
            &model,
            "Quarterly revenue rose by four percent compared to last year.",
        );
        for v in [&cat, &kitten, &money] {
            let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        let close = cosine(&cat, &kitten);
        let far = cosine(&cat, &money);
        assert!(close > far + 0.3, "cat/kitten {close}, cat/revenue {far}");
    }

    #[test]
    fn a_batch_matches_single_runs() {
        let (Some(model), Some(reference)) = (minilm(8), reference()) else {
            return;
        };
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let batched = run_local_batch(
            &model,
            texts.iter().map(|t| text_request(t.as_bytes())).collect(),
        );
        assert_eq!(batched.len(), texts.len());
        for (text, got) in texts.iter().zip(batched) {
            let got = floats(&got.unwrap()[0].data);
            let single = embed_one(&model, text);
            assert!(cosine(&got, &single) >= 0.9999, "{text:?}");
        }
    }

    #[test]
    fn invalid_utf8_fails_only_its_own_request() {
        let Some(model) = minilm(8) else { return };
        let results = run_local_batch(
            &model,
            vec![
                text_request(b"fine"),
                text_request(b"bad \xff\xfe"),
                text_request(b"also fine"),
            ],
        );
        let fine = floats(&results[0].as_ref().unwrap()[0].data);
        assert!(cosine(&fine, &embed_one(&model, "fine")) >= 0.9999);
        match &results[1] {
            Err(LocalRunError::Backend(BackendError::BadInput { index: 0, reason })) => {
                assert!(reason.contains("offset 4"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(results[2].is_ok());
    }

    #[test]
    fn a_small_output_buffer_is_reported_with_the_shape() {
        let Some(model) = minilm(1) else { return };
        let mut req = text_request(b"hello");
        req.outputs = vec![TensorDesc::output(DType::F32, &[], 100).unwrap()];
        match run_local(&model, req) {
            Err(LocalRunError::Backend(BackendError::OutputTooSmall {
                index: 0,
                needed,
                shapes,
            })) => {
                assert_eq!(needed, 1536);
                assert_eq!(shapes, vec![Shape::new(&[384]).unwrap()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_longest_text_is_truncated_not_rejected() {
        let Some(model) = minilm(1) else { return };
        let long = "word ".repeat(16384 / 5);
        let v = embed_one(&model, &long);
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_backend_rechecks_what_it_is_given() {
        let Some(model) = minilm(2) else { return };
        // A u8 text of 5 bytes whose guest buffer holds 3: refused, nothing read past it.
        let desc = TensorDesc::input(DType::U8, &[5]).unwrap();
        let out_desc = TensorDesc::output(DType::F32, &[384], 1536).unwrap();
        let mut text = b"hel".to_vec();
        let mut out = vec![0u8; 1536];
        let mut batch = vec![RequestTensors {
            inputs: vec![InputTensor {
                desc: &desc,
                data: VolatileSlice::from(text.as_mut_slice()),
            }],
            outputs: vec![OutputBuffer {
                desc: &out_desc,
                buf: VolatileSlice::from(out.as_mut_slice()),
            }],
        }];
        let outcomes = model.run(&mut batch);
        assert!(
            matches!(outcomes[0], Err(BackendError::BadInput { index: 0, .. })),
            "{:?}",
            outcomes[0]
        );
    }
}
