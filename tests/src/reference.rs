//! What the e2e tests compare guest results with: the same models run on this host through
//! ai-inferd's own backends (`ai_inferd::backend::local`), plus the small helpers to read
//! what the guest printed.

use std::sync::Arc;

use ai_infer_protocol::{DType, TensorDesc};
use ai_inferd::backend::local::{run_local, LocalRequest};
use ai_inferd::backend::Backend;

use crate::rig::workspace_root;

fn desc(d: Result<TensorDesc, ai_infer_protocol::ProtocolError>) -> Result<TensorDesc, String> {
    d.map_err(|e| e.to_string())
}

/// The models of `configs/models.toml`, loaded from `target/models` (made by
/// devices/ai-inferd/models/setup.sh, which the rig runs first).
pub struct Models {
    backends: Vec<Arc<dyn Backend>>,
}

impl Models {
    /// Loads every model of the manifest.
    pub fn load() -> Result<Models, String> {
        let manifest = workspace_root()?.join("configs/models.toml");
        let backends = ai_inferd::models::load_models(&manifest)
            .map_err(|e| format!("cannot load {}: {e}", manifest.display()))?;
        Ok(Models { backends })
    }

    fn backend(&self, name: &str) -> Result<&dyn Backend, String> {
        self.backends
            .iter()
            .find(|b| b.info().name == name)
            .map(|b| b.as_ref())
            .ok_or_else(|| format!("the manifest has no model `{name}`"))
    }

    /// The MLP (`x` f32 [N, 16] → `y` f32 [N, 4]) on `input` (N rows of 16 f32).
    pub fn mlp(&self, input: &[u8]) -> Result<Vec<u8>, String> {
        let rows = (input.len() / 64) as u64;
        let request = LocalRequest {
            inputs: vec![(
                desc(TensorDesc::input(DType::F32, &[rows, 16]))?,
                input.to_vec(),
            )],
            outputs: vec![desc(TensorDesc::output(DType::F32, &[rows, 4], rows * 16))?],
        };
        let out = run_local(self.backend("mlp")?, request).map_err(|e| e.to_string())?;
        out.into_iter()
            .next()
            .map(|o| o.data)
            .ok_or_else(|| "the MLP produced no output".to_string())
    }

    /// The MiniLM sentence embedding (384 f32) of `text`.
    pub fn minilm(&self, text: &[u8]) -> Result<Vec<f32>, String> {
        let request = LocalRequest {
            inputs: vec![(
                desc(TensorDesc::input(DType::U8, &[text.len() as u64]))?,
                text.to_vec(),
            )],
            outputs: vec![desc(TensorDesc::output(DType::F32, &[384], 384 * 4))?],
        };
        let out =
            run_local(self.backend("all-MiniLM-L6-v2")?, request).map_err(|e| e.to_string())?;
        out.into_iter()
            .next()
            .map(|o| f32s(&o.data))
            .ok_or_else(|| "MiniLM produced no output".to_string())
    }
}

/// Bytes from a hex string (two digits per byte, no separators).
pub fn from_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", hex.len()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| format!("bad hex at {i}: {e}")))
        .collect()
}

/// Little-endian f32 values (a trailing partial value is ignored).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Cosine similarity; 0 for empty or mismatched vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_floats_round_trip() {
        assert_eq!(from_hex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        let v = f32s(&[0, 0, 128, 63, 0, 0, 0, 64, 1]);
        assert_eq!(v, vec![1.0, 2.0]);
    }

    #[test]
    fn cosine_of_parallel_orthogonal_and_bad_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
        assert_eq!(cosine(&[0.0], &[0.0]), 0.0);
    }
}
