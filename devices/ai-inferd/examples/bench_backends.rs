//! Measures the backends on this host: MiniLM latency per sequence at batch 1 and 8,
//! and the test MLP at batch 1 and 8, with the bytes each request copies.
//!
//! `devices/ai-inferd/models/setup.sh` first, then
//! `cargo run -p ai-inferd --example bench_backends [--release]`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ai_infer_protocol::{DType, TensorDesc};
use ai_inferd::backend::bert::{BertBackend, BertOptions};
use ai_inferd::backend::local::{run_local_batch, LocalRequest};
use ai_inferd::backend::onnx::{OnnxBackend, OnnxOptions};
use ai_inferd::backend::Backend;
use vm_memory::VolatileSlice;

/// 17 tokens with [CLS] and [SEP].
const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the quiet river bank.";

fn models_dir() -> PathBuf {
    std::env::var_os("AIVMM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models"))
}

/// Median wall time in ms of `iters` runs of `batch` copies of `req`.
fn time_batch(backend: &dyn Backend, req: &LocalRequest, batch: usize, iters: usize) -> f64 {
    let mut times: Vec<f64> = (0..iters + 2)
        .map(|_| {
            let reqs = vec![req.clone(); batch];
            let start = Instant::now();
            let results = run_local_batch(backend, reqs);
            let ms = start.elapsed().as_secs_f64() * 1e3;
            assert!(results.iter().all(Result::is_ok), "a run failed");
            ms
        })
        .skip(2) // warm-up
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let dir = models_dir();
    let bert = BertBackend::load(
        &dir.join("minilm"),
        1,
        "minilm",
        &BertOptions {
            max_batch: 8,
            device: candle_core::Device::Cpu,
        },
    )
    .expect("MiniLM (run models/setup.sh)");
    let text = LocalRequest {
        inputs: vec![(
            TensorDesc::input(DType::U8, &[SENTENCE.len() as u64]).unwrap(),
            SENTENCE.as_bytes().to_vec(),
        )],
        outputs: vec![TensorDesc::output(DType::F32, &[384], 1536).unwrap()],
    };
    let one = time_batch(&bert, &text, 1, 20);
    let eight = time_batch(&bert, &text, 8, 10);
    println!("MiniLM, {} bytes of text:", SENTENCE.len());
    println!(
        "  batch 1: {one:.2} ms per sequence ({:.1} seq/s)",
        1e3 / one
    );
    println!(
        "  batch 8: {:.2} ms per sequence ({:.1} seq/s, {:.2} ms per batch)",
        eight / 8.0,
        8e3 / eight,
        eight
    );
    println!(
        "  copied per request: {} bytes in (text -> tokenizer), 1536 bytes written out",
        SENTENCE.len()
    );

    let mlp = OnnxBackend::load(
        &dir.join("mlp.onnx"),
        2,
        "mlp",
        &OnnxOptions {
            max_batch: 8,
            max_dynamic_dim: 64,
        },
    )
    .expect("mlp.onnx (run models/setup.sh)");
    for rows in [1u64, 64] {
        let x = LocalRequest {
            inputs: vec![(
                TensorDesc::input(DType::F32, &[rows, 16]).unwrap(),
                vec![0u8; (rows * 64) as usize],
            )],
            outputs: vec![TensorDesc::output(DType::F32, &[rows, 4], rows * 16).unwrap()],
        };
        let one = time_batch(&mlp, &x, 1, 200);
        let eight = time_batch(&mlp, &x, 8, 200);
        println!(
            "MLP, {rows} rows: batch 1 {:.1} µs per request, batch 8 {:.1} µs per request; \
             copied per request: {} bytes in (guest -> tract tensor), {} bytes written out",
            one * 1e3,
            eight * 1e3 / 8.0,
            rows * 64,
            rows * 16
        );
    }

    // The forced copy itself: guest memory (a VolatileSlice) into a runtime buffer.
    for len in [4096usize, 1 << 20] {
        let mut guest = vec![1u8; len];
        let mut host = vec![0u8; len];
        let slice = VolatileSlice::from(guest.as_mut_slice());
        let iters = (64 << 20) / len;
        let start = Instant::now();
        for _ in 0..iters {
            slice.copy_to(host.as_mut_slice());
        }
        let ns = start.elapsed().as_nanos() as f64 / iters as f64;
        println!(
            "copy {len} bytes guest -> runtime buffer: {ns:.0} ns ({:.1} GB/s)",
            len as f64 / ns
        );
    }
}
