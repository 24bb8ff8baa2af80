//! ONNX models on tract: pure Rust, CPU only (tract has no CUDA backend).
//!
//! **Signature.** Taken from the model file once at load: every input and output's
//! element type and dims. A numeric dim is fixed; a symbolic one (an ONNX `dim_param`
//! such as `N`) accepts `1..=max_dynamic_dim`; an output dim that is an expression
//! (`2*N`) accepts anything, the produced shape is checked after the run.
//!
//! **Batching.** A model is batchable when dim 0 of every input and every output is the
//! same symbol and that symbol appears in no other dim. Requests of a batch whose inputs
//! agree on every other dim are then concatenated along dim 0, run in one tract call,
//! and the outputs split back by each request's row count. Other models run one request
//! per call ([`Backend::max_batch`] is 1).
//!
//! **Copies.** tract only runs on tensors it owns, so each input is copied exactly once,
//! from guest memory straight into its slot of the (concatenated) tract tensor: a
//! request costs `sum(input data_len)` copied bytes. Outputs are written from tract's
//! result tensors straight into the guest buffers (the write the protocol needs anyway).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ai_infer_protocol::{
    DType, DimRange, ModelInfo, ProtocolError, Shape, TensorSpec, MAX_TENSOR_NAME_LEN,
};
use thiserror::Error;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoRunnable, IntoTValue, ShapeFact, Symbol, TDim,
    TValue, TVec, Tensor, TypedModel, TypedRunnableModel,
};

use super::{
    check_produced, check_signature, guard_runtime, Backend, BackendError, RequestOutcome,
    RequestTensors,
};

/// Why an ONNX model could not be loaded.
#[derive(Debug, Error)]
pub enum OnnxError {
    /// tract could not read, analyse or optimise the file.
    #[error("cannot load ONNX model {path}: {reason}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// tract's explanation.
        reason: String,
    },
    /// A tensor's element type has no ai_infer dtype.
    #[error(
        "ONNX model {path}: tensor {tensor} has element type {dtype}, which ai_infer cannot carry"
    )]
    UnsupportedDType {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// tract's name for the type.
        dtype: String,
    },
    /// An input dim is neither a positive number nor a plain symbol.
    #[error("ONNX model {path}: input {tensor} dim {index} is {dim}; inputs need a positive size or a plain symbol")]
    UnsupportedDim {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Dim index.
        index: usize,
        /// The dim as tract sees it.
        dim: String,
    },
    /// The derived signature breaks a protocol limit (rank, tensor count, name).
    #[error("ONNX model {path}: its signature does not fit the protocol: {source}")]
    Signature {
        /// The model file.
        path: PathBuf,
        /// What limit it breaks.
        source: ProtocolError,
    },
}

/// Operator settings for one ONNX model (from the models manifest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxOptions {
    /// Largest number of requests concatenated into one run (batchable models only).
    pub max_batch: u32,
    /// Upper bound of every symbolic dim in the signature.
    pub max_dynamic_dim: u64,
}

/// One result tensor of a run: its bytes and its shape.
type OutputView<'r> = (&'r [u8], &'r [usize]);

/// A loaded, optimised ONNX model.
pub struct OnnxBackend {
    info: ModelInfo,
    plan: Arc<TypedRunnableModel>,
    input_types: Vec<DatumType>,
    output_types: Vec<DatumType>,
    /// Whether requests are concatenated along dim 0.
    batchable: bool,
}

fn to_dtype(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F16 => DType::F16,
        DatumType::F64 => DType::F64,
        DatumType::I8 => DType::I8,
        DatumType::U8 => DType::U8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::U32 => DType::U32,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

/// A tensor name cut to the protocol's limit on a character boundary (names are
/// informational).
fn spec_name(name: &str) -> String {
    let mut end = name.len().min(MAX_TENSOR_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].replace('\0', "")
}

/// The symbol that is dim 0 of every tensor and appears in no other dim, if any.
fn batch_symbol(shapes: &[&ShapeFact]) -> Option<Symbol> {
    let sym = match shapes.first()?.dims().first()? {
        TDim::Sym(s) => s.clone(),
        _ => return None,
    };
    shapes
        .iter()
        .all(|shape| match shape.dims().split_first() {
            Some((TDim::Sym(first), rest)) => {
                *first == sym && rest.iter().all(|d| !d.symbols().contains(&sym))
            }
            _ => false,
        })
        .then_some(sym)
}

fn shape_from(dims: &[usize]) -> Result<Shape, String> {
    let dims: Vec<u64> = dims.iter().map(|d| *d as u64).collect();
    Shape::new(&dims).map_err(|e| e.to_string())
}

impl OnnxBackend {
    /// Loads and optimises `path`, giving it MODELS id `id` and name `name`.
    pub fn load(path: &Path, id: u32, name: &str, opts: &OnnxOptions) -> Result<Self, OnnxError> {
        let load_err = |e: &dyn std::fmt::Display| OnnxError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let typed: TypedModel = tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|m| m.into_typed())
            .map_err(|e| load_err(&format!("{e:#}")))?;

        let mut inputs = Vec::new();
        let mut input_types = Vec::new();
        for (i, outlet) in typed
            .input_outlets()
            .map_err(|e| load_err(&e))?
            .iter()
            .enumerate()
        {
            let fact = typed.input_fact(i).map_err(|e| load_err(&e))?;
            let tensor = typed.node(outlet.node).name.clone();
            let dtype = Self::dtype(path, &tensor, fact.datum_type)?;
            let dims = fact
                .shape
                .dims()
                .iter()
                .enumerate()
                .map(|(index, d)| match d {
                    TDim::Val(v) if *v >= 1 => Ok(DimRange::fixed(*v as u64)),
                    TDim::Sym(_) => Ok(DimRange::dynamic(opts.max_dynamic_dim)),
                    other => Err(OnnxError::UnsupportedDim {
                        path: path.to_owned(),
                        tensor: tensor.clone(),
                        index,
                        dim: other.to_string(),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            inputs.push(TensorSpec {
                name: spec_name(&tensor),
                dtype,
                dims,
            });
            input_types.push(fact.datum_type);
        }

        let mut outputs = Vec::new();
        let mut output_types = Vec::new();
        for (k, outlet) in typed
            .output_outlets()
            .map_err(|e| load_err(&e))?
            .iter()
            .enumerate()
        {
            let fact = typed.output_fact(k).map_err(|e| load_err(&e))?;
            let tensor = typed
                .outlet_label(*outlet)
                .unwrap_or(&typed.node(outlet.node).name)
                .to_owned();
            let dtype = Self::dtype(path, &tensor, fact.datum_type)?;
            let dims = fact
                .shape
                .dims()
                .iter()
                .map(|d| match d {
                    TDim::Val(v) if *v >= 1 => DimRange::fixed(*v as u64),
                    TDim::Sym(_) => DimRange::dynamic(opts.max_dynamic_dim),
                    _ => DimRange::ANY,
                })
                .collect();
            outputs.push(TensorSpec {
                name: spec_name(&tensor),
                dtype,
                dims,
            });
            output_types.push(fact.datum_type);
        }

        let batchable = {
            let shapes = (0..inputs.len())
                .map(|i| typed.input_fact(i))
                .chain((0..outputs.len()).map(|k| typed.output_fact(k)))
                .map(|f| f.map(|f| &f.shape))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| load_err(&e))?;
            batch_symbol(&shapes).is_some()
        };

        let info = ModelInfo {
            id,
            name: name.to_owned(),
            max_batch: if batchable { opts.max_batch.max(1) } else { 1 },
            inputs,
            outputs,
        };
        info.validate().map_err(|source| OnnxError::Signature {
            path: path.to_owned(),
            source,
        })?;

        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| load_err(&format!("{e:#}")))?;
        Ok(OnnxBackend {
            info,
            plan,
            input_types,
            output_types,
            batchable,
        })
    }

    fn dtype(path: &Path, tensor: &str, dt: DatumType) -> Result<DType, OnnxError> {
        to_dtype(dt).ok_or_else(|| OnnxError::UnsupportedDType {
            path: path.to_owned(),
            tensor: tensor.to_owned(),
            dtype: format!("{dt:?}"),
        })
    }

    /// Whether requests are concatenated along dim 0 (see the module docs).
    pub fn is_batchable(&self) -> bool {
        self.batchable
    }

    /// Re-checks a request against the signature (the daemon already did; this keeps
    /// the backend safe on its own) and, for batchable models, that every input has
    /// the same dim 0.
    fn check_request(&self, req: &RequestTensors<'_>) -> Result<(), BackendError> {
        check_signature(&self.info, req)?;
        if self.batchable {
            let rows = Self::rows(req);
            if let Some(index) = req
                .inputs
                .iter()
                .position(|t| t.desc.shape.dims().first() != Some(&rows))
            {
                return Err(BackendError::BadInput {
                    index,
                    reason: format!("dim 0 differs from input 0's {rows} (the batch dim)"),
                });
            }
        }
        Ok(())
    }

    /// A request's row count: dim 0 of its first input (1 for a scalar).
    fn rows(req: &RequestTensors<'_>) -> u64 {
        req.inputs
            .first()
            .and_then(|t| t.desc.shape.dims().first().copied())
            .unwrap_or(1)
    }

    /// Builds tract's inputs for `members`: one tensor per model input, every member's
    /// bytes copied once from guest memory into its rows.
    fn gather(
        &self,
        batch: &[RequestTensors<'_>],
        members: &[usize],
    ) -> Result<TVec<TValue>, String> {
        let first = members
            .first()
            .and_then(|m| batch.get(*m))
            .ok_or("empty group")?;
        let mut values = TVec::new();
        for (j, dt) in self.input_types.iter().enumerate() {
            let proto = first.inputs.get(j).ok_or("missing input")?;
            let mut dims = proto
                .desc
                .shape
                .dims()
                .iter()
                .map(|d| usize::try_from(*d).map_err(|_| format!("dim {d} does not fit in memory")))
                .collect::<Result<Vec<usize>, String>>()?;
            if self.batchable {
                let total = members.iter().try_fold(0usize, |acc, m| {
                    let rows = usize::try_from(Self::rows(&batch[*m])).ok()?;
                    acc.checked_add(rows)
                });
                match (dims.first_mut(), total) {
                    (Some(d0), Some(total)) => *d0 = total,
                    _ => return Err("batch row count overflows".into()),
                }
            }
            let mut tensor = Tensor::zero_dt(*dt, &dims).map_err(|e| format!("{e:#}"))?;
            {
                let mut view = tensor
                    .try_as_plain_ram_mut()
                    .map_err(|e| format!("{e:#}"))?;
                let bytes = view.as_bytes_mut();
                let mut off = 0usize;
                for m in members {
                    let data = &batch[*m].inputs.get(j).ok_or("missing input")?.data;
                    let end = off.checked_add(data.len()).ok_or("input size overflows")?;
                    let dst = bytes
                        .get_mut(off..end)
                        .ok_or_else(|| format!("input {j} holds more bytes than its shape"))?;
                    // The one copy tract forces: guest memory -> tract tensor.
                    data.copy_to(dst);
                    off = end;
                }
                if off != bytes.len() {
                    return Err(format!(
                        "input {j}: {off} bytes for a {}-byte tensor",
                        bytes.len()
                    ));
                }
                if *dt == DatumType::Bool {
                    // The guest may send any byte; only 0 and 1 are valid Rust bools.
                    bytes.iter_mut().for_each(|b| *b = u8::from(*b != 0));
                }
            }
            values.push(tensor.into_tvalue());
        }
        Ok(values)
    }

    /// Runs `members` in one tract call and writes each member's outputs.
    fn run_group(&self, batch: &[RequestTensors<'_>], members: &[usize]) -> Vec<RequestOutcome> {
        let fail = |msg: String| {
            members
                .iter()
                .map(|_| Err(BackendError::Runtime(msg.clone())))
                .collect()
        };
        let results = match self.gather(batch, members).and_then(|inputs| {
            guard_runtime("tract", || {
                self.plan.run(inputs).map_err(|e| format!("{e:#}"))
            })
        }) {
            Ok(r) => r,
            Err(msg) => return fail(msg),
        };
        let outputs = match self.output_views(&results, members, batch) {
            Ok(o) => o,
            Err(msg) => return fail(msg),
        };

        let mut row = 0usize;
        members
            .iter()
            .map(|m| {
                let req = &batch[*m];
                let rows = usize::try_from(Self::rows(req)).unwrap_or(usize::MAX);
                let outcome = self.split_one(req, &outputs, row, rows);
                row = row.saturating_add(rows);
                outcome
            })
            .collect()
    }

    /// The bytes and shape of each result, after checking dtype, size and (batched)
    /// row count.
    fn output_views<'r>(
        &self,
        results: &'r TVec<TValue>,
        members: &[usize],
        batch: &[RequestTensors<'_>],
    ) -> Result<Vec<OutputView<'r>>, String> {
        if results.len() != self.output_types.len() {
            return Err(format!(
                "tract produced {} outputs, the model has {}",
                results.len(),
                self.output_types.len()
            ));
        }
        let total_rows = members
            .iter()
            .fold(0u64, |acc, m| acc.saturating_add(Self::rows(&batch[*m])));
        results
            .iter()
            .zip(&self.output_types)
            .enumerate()
            .map(|(k, (t, dt))| {
                if t.datum_type() != *dt {
                    return Err(format!(
                        "output {k} is {:?}, the signature says {dt:?}",
                        t.datum_type()
                    ));
                }
                let bytes = t
                    .try_as_plain_ram()
                    .map_err(|e| format!("{e:#}"))?
                    .as_bytes();
                let expected = t.len().checked_mul(dt.size_of());
                if expected != Some(bytes.len()) {
                    return Err(format!(
                        "output {k}: {} bytes for {} elements",
                        bytes.len(),
                        t.len()
                    ));
                }
                if self.batchable && t.shape().first().map(|d| *d as u64) != Some(total_rows) {
                    return Err(format!(
                        "output {k} has shape {:?} for {total_rows} input rows",
                        t.shape()
                    ));
                }
                Ok((bytes, t.shape()))
            })
            .collect()
    }

    /// Checks and writes one request's part (`rows` rows from `row` when batched, the
    /// whole result otherwise) of every output.
    fn split_one(
        &self,
        req: &RequestTensors<'_>,
        outputs: &[OutputView<'_>],
        row: usize,
        rows: usize,
    ) -> RequestOutcome {
        let mut shapes = Vec::with_capacity(outputs.len());
        let mut parts = Vec::with_capacity(outputs.len());
        for (bytes, dims) in outputs {
            let (shape, part) = if self.batchable {
                let total = dims.first().copied().unwrap_or(0);
                let row_bytes = bytes.len().checked_div(total).unwrap_or(0);
                let start = row.checked_mul(row_bytes);
                let end = row.checked_add(rows).and_then(|e| e.checked_mul(row_bytes));
                let part = start
                    .zip(end)
                    .and_then(|(s, e)| bytes.get(s..e))
                    .ok_or_else(|| BackendError::Runtime("output rows out of range".into()))?;
                let mut own = dims.to_vec();
                if let Some(d0) = own.first_mut() {
                    *d0 = rows;
                }
                (shape_from(&own), part)
            } else {
                (shape_from(dims), *bytes)
            };
            shapes.push(shape.map_err(BackendError::Runtime)?);
            parts.push(part);
        }
        check_produced(&req.outputs, &shapes)?;
        for (out, part) in req.outputs.iter().zip(parts) {
            out.buf
                .subslice(0, part.len())
                .map_err(|e| BackendError::Runtime(format!("output buffer: {e}")))?
                .copy_from(part);
        }
        Ok(shapes)
    }
}

impl Backend for OnnxBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        self.info.max_batch as usize
    }

    fn run(&self, batch: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome> {
        let mut outcomes: Vec<Option<RequestOutcome>> = batch.iter().map(|_| None).collect();
        // Requests that can share a run: same dims after dim 0 on every input.
        let mut groups: Vec<(Vec<Vec<u64>>, Vec<usize>)> = Vec::new();
        for (i, req) in batch.iter().enumerate() {
            if let Err(e) = self.check_request(req) {
                outcomes[i] = Some(Err(e));
                continue;
            }
            if !self.batchable {
                groups.push((Vec::new(), vec![i]));
                continue;
            }
            let key: Vec<Vec<u64>> = req
                .inputs
                .iter()
                .map(|t| t.desc.shape.dims().get(1..).unwrap_or_default().to_vec())
                .collect();
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (_, members) in &groups {
            for (m, outcome) in members.iter().zip(self.run_group(batch, members)) {
                outcomes[*m] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(BackendError::Runtime("request was not run".into()))))
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

    /// mlp_ref.json from make_onnx.py.
    #[derive(Deserialize)]
    struct MlpRef {
        w1: Vec<Vec<f64>>,
        b1: Vec<f64>,
        w2: Vec<Vec<f64>>,
        b2: Vec<f64>,
        input: Vec<Vec<f64>>,
        output: Vec<Vec<f64>>,
    }

    impl MlpRef {
        /// The MLP computed here in f64 (exact for the inputs the tests use).
        fn forward(&self, x: &[f32]) -> Vec<f32> {
            x.chunks(16)
                .flat_map(|row| {
                    let h: Vec<f64> = (0..self.b1.len())
                        .map(|j| {
                            let s = (0..16)
                                .map(|i| f64::from(row[i]) * self.w1[i][j])
                                .sum::<f64>();
                            (s + self.b1[j]).max(0.0)
                        })
                        .collect();
                    (0..self.b2.len())
                        .map(|k| {
                            let s = h
                                .iter()
                                .enumerate()
                                .map(|(j, v)| v * self.w2[j][k])
                                .sum::<f64>();
                            (s + self.b2[k]) as f32
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    }

    fn opts(max_batch: u32) -> OnnxOptions {
        OnnxOptions {
            max_batch,
            max_dynamic_dim: 64,
        }
    }

    fn mlp(max_batch: u32) -> Option<(OnnxBackend, MlpRef)> {
        let path = require("mlp.onnx")?;
        let reference = require("mlp_ref.json")?;
        let reference: MlpRef = serde_json::from_slice(&std::fs::read(reference).unwrap()).unwrap();
        Some((
            OnnxBackend::load(&path, 3, "mlp", &opts(max_batch)).unwrap(),
            reference,
        ))
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// `rows` rows of multiples of 1/16 in [-8, 8] from a fixed-seed generator.
    fn dyadic_rows(rows: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..rows * 16)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = ((state >> 33) % 257) as i32 - 128;
                k as f32 / 16.0
            })
            .collect()
    }

    fn request(x: &[f32], out: TensorDesc) -> LocalRequest {
        let rows = (x.len() / 16) as u64;
        LocalRequest {
            inputs: vec![(
                TensorDesc::input(DType::F32, &[rows, 16]).unwrap(),
                bytes(x),
            )],
            outputs: vec![out],
        }
    }

    fn any_output(rows: u64) -> TensorDesc {
        TensorDesc::output(DType::F32, &[0, 4], rows * 16).unwrap()
    }

    #[test]
    fn signature_comes_from_the_file() {
        let Some((mlp, _)) = mlp(8) else { return };
        let info = mlp.info();
        assert_eq!((info.id, info.name.as_str(), info.max_batch), (3, "mlp", 8));
        assert_eq!(info.inputs.len(), 1);
        assert_eq!(info.inputs[0].name, "x");
        assert_eq!(info.inputs[0].dtype, DType::F32);
        assert_eq!(
            info.inputs[0].dims,
            vec![DimRange::dynamic(64), DimRange::fixed(16)]
        );
        assert_eq!(info.outputs[0].name, "y");
        assert_eq!(
            info.outputs[0].dims,
            vec![DimRange::dynamic(64), DimRange::fixed(4)]
        );
        assert!(mlp.is_batchable());
        assert_eq!(mlp.max_batch(), 8);
    }

    #[test]
    fn matches_the_reference_output_exactly() {
        let Some((mlp, reference)) = mlp(8) else {
            return;
        };
        let x: Vec<f32> = reference
            .input
            .iter()
            .flatten()
            .map(|v| *v as f32)
            .collect();
        let want: Vec<f32> = reference
            .output
            .iter()
            .flatten()
            .map(|v| *v as f32)
            .collect();
        let rows = reference.input.len() as u64;
        let out = run_local(&mlp, request(&x, any_output(rows))).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].shape, Shape::new(&[rows, 4]).unwrap());
        assert_eq!(out[0].data, bytes(&want));
        // The independent f64 computation agrees with numpy's.
        assert_eq!(reference.forward(&x), want);
    }

    #[test]
    fn matches_an_independent_computation_bit_for_bit() {
        let Some((mlp, reference)) = mlp(8) else {
            return;
        };
        for (rows, seed) in [(1, 1), (7, 2), (64, 3)] {
            let x = dyadic_rows(rows, seed);
            let out = run_local(&mlp, request(&x, any_output(rows as u64))).unwrap();
            assert_eq!(out[0].data, bytes(&reference.forward(&x)), "{rows} rows");
        }
    }

    #[test]
    fn a_batch_gives_the_same_bytes_as_single_runs() {
        let Some((mlp, reference)) = mlp(8) else {
            return;
        };
        let rows = [1usize, 3, 2, 5, 1, 4, 64, 2];
        let requests: Vec<LocalRequest> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| request(&dyadic_rows(*r, 100 + i as u64), any_output(*r as u64)))
            .collect();
        let batched = run_local_batch(&mlp, requests.clone());
        assert_eq!(batched.len(), rows.len());
        for ((req, got), r) in requests.into_iter().zip(batched).zip(rows) {
            let got = got.unwrap();
            let x: Vec<f32> = req.inputs[0]
                .1
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(got[0].shape, Shape::new(&[r as u64, 4]).unwrap());
            assert_eq!(got[0].data, bytes(&reference.forward(&x)));
            assert_eq!(run_local(&mlp, req).unwrap(), got);
        }
    }

    #[test]
    fn outputs_that_do_not_fit_or_contradict_the_request_are_reported() {
        let Some((mlp, _)) = mlp(8) else { return };
        let x = dyadic_rows(3, 7);
        // Any shape, 8-byte buffer: the produced [3, 4] needs 48 bytes.
        let small = TensorDesc::output(DType::F32, &[], 8).unwrap();
        match run_local(&mlp, request(&x, small)) {
            Err(LocalRunError::Backend(BackendError::OutputTooSmall {
                index,
                needed,
                shapes,
            })) => {
                assert_eq!((index, needed), (0, 48));
                assert_eq!(shapes, vec![Shape::new(&[3, 4]).unwrap()]);
            }
            other => panic!("{other:?}"),
        }
        // The driver expected 2 rows, the model produced 3.
        let wrong = TensorDesc::output(DType::F32, &[2, 4], 64).unwrap();
        match run_local(&mlp, request(&x, wrong)) {
            Err(LocalRunError::Backend(BackendError::ShapeMismatch {
                index, produced, ..
            })) => {
                assert_eq!(index, 0);
                assert_eq!(produced, Shape::new(&[3, 4]).unwrap());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_bad_request_does_not_fail_its_batch() {
        let Some((mlp, reference)) = mlp(8) else {
            return;
        };
        let (a, b) = (dyadic_rows(2, 11), dyadic_rows(5, 12));
        let small = TensorDesc::output(DType::F32, &[], 4).unwrap();
        let results = run_local_batch(
            &mlp,
            vec![
                request(&a, any_output(2)),
                request(&a, small),
                request(&b, any_output(5)),
            ],
        );
        assert_eq!(
            results[0].as_ref().unwrap()[0].data,
            bytes(&reference.forward(&a))
        );
        assert!(matches!(
            results[1],
            Err(LocalRunError::Backend(BackendError::OutputTooSmall {
                needed: 32,
                ..
            }))
        ));
        assert_eq!(
            results[2].as_ref().unwrap()[0].data,
            bytes(&reference.forward(&b))
        );
    }

    /// Calls `run` directly with descriptors the daemon would never pass, to check the
    /// backend's own defences.
    #[test]
    fn the_backend_rechecks_what_it_is_given() {
        let Some((mlp, reference)) = mlp(8) else {
            return;
        };
        let good_x = dyadic_rows(2, 21);
        let mut good_data = bytes(&good_x);
        let good_desc = TensorDesc::input(DType::F32, &[2, 16]).unwrap();
        let wide_desc = TensorDesc::input(DType::F32, &[1, 17]).unwrap();
        let mut wide_data = vec![0u8; 68];
        let mut short_data = vec![0u8; 100]; // descriptor says 128
        let out_desc = any_output(2);
        let mut outs = [vec![0u8; 32], vec![0u8; 32], vec![0u8; 32]];
        let [o0, o1, o2] = &mut outs;
        let mut batch = vec![
            RequestTensors {
                inputs: vec![InputTensor {
                    desc: &wide_desc,
                    data: VolatileSlice::from(wide_data.as_mut_slice()),
                }],
                outputs: vec![OutputBuffer {
                    desc: &out_desc,
                    buf: VolatileSlice::from(o0.as_mut_slice()),
                }],
            },
            RequestTensors {
                inputs: vec![InputTensor {
                    desc: &good_desc,
                    data: VolatileSlice::from(short_data.as_mut_slice()),
                }],
                outputs: vec![OutputBuffer {
                    desc: &out_desc,
                    buf: VolatileSlice::from(o1.as_mut_slice()),
                }],
            },
            RequestTensors {
                inputs: vec![InputTensor {
                    desc: &good_desc,
                    data: VolatileSlice::from(good_data.as_mut_slice()),
                }],
                outputs: vec![OutputBuffer {
                    desc: &out_desc,
                    buf: VolatileSlice::from(o2.as_mut_slice()),
                }],
            },
        ];
        let outcomes = mlp.run(&mut batch);
        drop(batch);
        assert!(
            matches!(outcomes[0], Err(BackendError::BadInput { index: 0, .. })),
            "{:?}",
            outcomes[0]
        );
        assert!(
            matches!(outcomes[1], Err(BackendError::BadInput { index: 0, .. })),
            "{:?}",
            outcomes[1]
        );
        assert_eq!(
            outcomes[2].as_ref().unwrap(),
            &vec![Shape::new(&[2, 4]).unwrap()]
        );
        assert_eq!(outs[2], bytes(&reference.forward(&good_x)));
        assert!(
            outs[0].iter().chain(&outs[1]).all(|b| *b == 0),
            "nothing written for failed requests"
        );
    }

    #[test]
    fn a_model_without_a_batch_dim_runs_one_request_per_call() {
        let Some(path) = require("fixed.onnx") else {
            return;
        };
        let fixed = OnnxBackend::load(&path, 1, "fixed", &opts(8)).unwrap();
        assert!(!fixed.is_batchable());
        assert_eq!(fixed.max_batch(), 1);
        assert_eq!(
            fixed.info().inputs[0].dims,
            vec![DimRange::fixed(2), DimRange::fixed(3)]
        );
        let requests: Vec<LocalRequest> = (0..3)
            .map(|i| {
                let x: Vec<f32> = (0..6).map(|j| (i * 6 + j) as f32 - 4.5).collect();
                LocalRequest {
                    inputs: vec![(TensorDesc::input(DType::F32, &[2, 3]).unwrap(), bytes(&x))],
                    outputs: vec![TensorDesc::output(DType::F32, &[2, 3], 24).unwrap()],
                }
            })
            .collect();
        for (i, result) in run_local_batch(&fixed, requests).into_iter().enumerate() {
            let want: Vec<f32> = (0..6).map(|j| 2.0 * ((i * 6 + j) as f32 - 4.5)).collect();
            assert_eq!(result.unwrap()[0].data, bytes(&want));
        }
    }

    #[test]
    fn a_request_outside_the_signature_is_rejected_before_running() {
        let Some((mlp, _)) = mlp(8) else { return };
        let too_many_rows = request(&dyadic_rows(65, 1), any_output(65));
        assert!(matches!(
            run_local(&mlp, too_many_rows),
            Err(LocalRunError::Rejected(ProtocolError::InTensor { .. }))
        ));
    }

    #[test]
    fn loading_a_file_that_is_not_onnx_fails_cleanly() {
        let path = tempfile::Builder::new()
            .suffix(".onnx")
            .tempfile()
            .unwrap()
            .into_temp_path();
        std::fs::write(&path, b"this is not a protobuf").unwrap();
        let result = OnnxBackend::load(&path, 1, "bad", &opts(1));
        assert!(
            matches!(result, Err(OnnxError::Load { .. })),
            "{:?}",
            result.err()
        );
    }
}
