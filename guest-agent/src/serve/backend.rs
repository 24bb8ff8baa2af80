//! What the server needs from the device: its models, and running one request on
//! tensors held in ordinary memory. [`Agent`] provides it in direct and daemon mode
//! alike; tests may substitute their own.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use ai_infer_protocol::{DeviceConfig, ModelInfo, Status, TensorDesc};

use super::error::ServeError;
use crate::api::{Agent, Buffer};
use crate::engine::InferOptions;
use crate::tensor_io::output_desc;

/// One output as the device produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputTensor {
    /// dtype and produced shape.
    pub desc: TensorDesc,
    /// Its little-endian bytes.
    pub data: Vec<u8>,
}

/// Runs requests for the server. Implementations must allow concurrent calls: the
/// device batches requests that are in flight together.
pub trait InferBackend: Send + Sync {
    /// The models this tenant may use.
    fn models(&self) -> Result<Vec<ModelInfo>, ServeError>;
    /// Runs `model` on `inputs` (descriptors with their bytes), returning every output
    /// of the signature; a non-OK device status is an error.
    fn infer(
        &self,
        model: &ModelInfo,
        inputs: &[(TensorDesc, &[u8])],
        options: &InferOptions,
    ) -> Result<Vec<OutputTensor>, ServeError>;
}

/// Largest buffer for one output when its signature is unbounded.
const MAX_OUTPUT_BUFFER: u64 = 64 << 20;

fn run(
    agent: &Agent,
    model: &ModelInfo,
    inputs: &[(TensorDesc, Buffer)],
    outputs: &mut [(TensorDesc, Buffer)],
    options: &InferOptions,
) -> Result<crate::api::InferResult, ServeError> {
    let ins: Vec<(TensorDesc, &Buffer)> = inputs.iter().map(|(d, b)| (*d, b)).collect();
    let mut outs: Vec<(TensorDesc, &mut Buffer)> =
        outputs.iter_mut().map(|(d, b)| (*d, b)).collect();
    Ok(agent.ai_infer(model.id, &ins, &mut outs, options)?)
}

fn check_limits(config: &DeviceConfig, inputs: &[(TensorDesc, &[u8])]) -> Result<(), ServeError> {
    let total: u64 = inputs.iter().map(|(d, _)| d.data_len).sum();
    if total > config.max_input_bytes {
        return Err(ServeError::TooLarge(format!(
            "inputs of {total} bytes exceed the device limit of {} bytes",
            config.max_input_bytes
        )));
    }
    Ok(())
}

impl InferBackend for Agent {
    fn models(&self) -> Result<Vec<ModelInfo>, ServeError> {
        Ok(self.ai_models()?)
    }

    fn infer(
        &self,
        model: &ModelInfo,
        inputs: &[(TensorDesc, &[u8])],
        options: &InferOptions,
    ) -> Result<Vec<OutputTensor>, ServeError> {
        let config = self.config();
        check_limits(&config, inputs)?;
        let mut ins = Vec::with_capacity(inputs.len());
        for (desc, bytes) in inputs {
            let mut buf = self.ai_alloc(bytes.len().max(1), 0)?;
            buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
            ins.push((*desc, buf));
        }
        let per_output =
            (config.max_output_bytes / model.outputs.len().max(1) as u64).min(MAX_OUTPUT_BUFFER);
        let mut outs = Vec::with_capacity(model.outputs.len());
        for spec in &model.outputs {
            let desc = output_desc(spec, per_output)
                .map_err(|e| ServeError::Internal(format!("model {:?}: {e}", model.name)))?;
            let buf = self.ai_alloc(desc.data_len as usize, 0)?;
            outs.push((desc, buf));
        }
        let mut result = run(self, model, &ins, &mut outs, options)?;
        // Outputs larger than the signature's bound: resize to what the device asks
        // (within the limit) and try once more.
        if result.status == Status::BufferTooSmall && result.outputs.len() == outs.len() {
            for ((desc, buf), needed) in outs.iter_mut().zip(&result.outputs) {
                if needed.data_len > desc.data_len && needed.data_len <= per_output {
                    desc.data_len = needed.data_len;
                    *buf = self.ai_alloc(needed.data_len as usize, 0)?;
                }
            }
            result = run(self, model, &ins, &mut outs, options)?;
        }
        if result.status != Status::Ok {
            return Err(ServeError::from_device(
                result.status,
                result.detail,
                &model.name,
            ));
        }
        if result.outputs.len() != outs.len() {
            return Err(ServeError::Internal(format!(
                "model {:?}: the device reported {} outputs, the signature has {}",
                model.name,
                result.outputs.len(),
                outs.len()
            )));
        }
        Ok(result
            .outputs
            .iter()
            .zip(&outs)
            .map(|(produced, (_, buf))| {
                let n = (produced.data_len as usize).min(buf.len());
                OutputTensor {
                    desc: *produced,
                    data: buf.as_slice()[..n].to_vec(),
                }
            })
            .collect())
    }
}

/// The MODELS list, asked again when older than `max_age` or when a name is missing
/// (at most once per `min_refresh`).
pub struct ModelCatalog {
    max_age: Duration,
    min_refresh: Duration,
    cached: RwLock<Option<(Instant, Vec<ModelInfo>)>>,
}

impl ModelCatalog {
    /// An empty catalog.
    pub fn new(max_age: Duration, min_refresh: Duration) -> Self {
        ModelCatalog {
            max_age,
            min_refresh,
            cached: RwLock::new(None),
        }
    }

    fn refresh(&self, backend: &dyn InferBackend) -> Result<Vec<ModelInfo>, ServeError> {
        let models = backend.models()?;
        *self.cached.write().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), models.clone()));
        Ok(models)
    }

    /// The current list (asking the device if the cached one is too old).
    pub fn list(&self, backend: &dyn InferBackend) -> Result<Vec<ModelInfo>, ServeError> {
        if let Some((at, models)) = &*self.cached.read().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < self.max_age {
                return Ok(models.clone());
            }
        }
        self.refresh(backend)
    }

    /// The model called `name` (404 if the device has none).
    pub fn find(&self, backend: &dyn InferBackend, name: &str) -> Result<ModelInfo, ServeError> {
        let lookup = |models: &[ModelInfo]| models.iter().find(|m| m.name == name).cloned();
        let (found, fresh) = {
            let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some((at, models)) if at.elapsed() < self.max_age => {
                    (lookup(models), at.elapsed() < self.min_refresh)
                }
                _ => (None, false),
            }
        };
        if let Some(m) = found {
            return Ok(m);
        }
        let models = if fresh {
            self.list(backend)?
        } else {
            self.refresh(backend)?
        };
        lookup(&models).ok_or_else(|| ServeError::NotFound(format!("unknown model {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::fake_engine;
    use crate::testing::{fake_models, FakeDeviceBehaviour};
    use ai_infer_protocol::DType;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn agent_runs_requests_from_ordinary_memory() {
        let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let agent = Agent::from_engine(engine);
        let model = agent.find_model("double").unwrap();
        let data: Vec<u8> = [1.0f32, -2.0, 3.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let desc = TensorDesc::input(DType::F32, &[1, 3]).unwrap();
        let out = InferBackend::infer(&agent, &model, &[(desc, &data)], &InferOptions::default())
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].desc.shape.dims(), &[1, 3]);
        let want: Vec<u8> = [2.0f32, -4.0, 7.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(out[0].data, want);
        // A device status other than OK is an error with its HTTP status.
        let wrong = TensorDesc::input(DType::U8, &[4]).unwrap();
        let err = InferBackend::infer(
            &agent,
            &model,
            &[(wrong, b"abcd")],
            &InferOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.http_status(), 400, "{err}");
    }

    struct Counting(AtomicUsize);

    impl InferBackend for Counting {
        fn models(&self) -> Result<Vec<ModelInfo>, ServeError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(fake_models())
        }
        fn infer(
            &self,
            _: &ModelInfo,
            _: &[(TensorDesc, &[u8])],
            _: &InferOptions,
        ) -> Result<Vec<OutputTensor>, ServeError> {
            Err(ServeError::Internal("unused".into()))
        }
    }

    #[test]
    fn catalog_caches_and_refreshes_for_unknown_names() {
        let backend = Counting(AtomicUsize::new(0));
        let catalog = ModelCatalog::new(Duration::from_secs(60), Duration::ZERO);
        assert_eq!(catalog.find(&backend, "double").unwrap().id, 1);
        assert_eq!(catalog.find(&backend, "text-stats").unwrap().id, 2);
        assert_eq!(backend.0.load(Ordering::SeqCst), 1);
        let e = catalog.find(&backend, "nope").unwrap_err();
        assert_eq!(e.http_status(), 404);
        assert_eq!(backend.0.load(Ordering::SeqCst), 2);
        // Within min_refresh a missing name does not ask the device again.
        let catalog = ModelCatalog::new(Duration::from_secs(60), Duration::from_secs(60));
        catalog.list(&backend).unwrap();
        let before = backend.0.load(Ordering::SeqCst);
        assert!(catalog.find(&backend, "nope").is_err());
        assert_eq!(backend.0.load(Ordering::SeqCst), before);
    }
}
