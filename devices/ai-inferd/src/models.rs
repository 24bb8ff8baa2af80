//! The models manifest (`configs/models.toml`): which models the daemon serves, on
//! which runtime, with which batching policy; and loading them into backends.
//!
//! ```toml
//! # Directory that relative model paths resolve against, relative to this file.
//! # Default: this file's directory. The AIVMM_MODELS_DIR environment variable, when
//! # set and non-empty, replaces it.
//! models_dir = "../target/models"
//!
//! [[model]]
//! name = "mlp"              # the MODELS name: 1..=64 bytes of UTF-8 without NUL, unique
//! runtime = "onnx"          # "onnx": tract, `path` is a .onnx file
//!                           # "bert": candle sentence embeddings, `path` is a model directory
//! path = "mlp.onnx"
//! max_batch = 8             # requests per backend call, 1..=1024; default 1
//! max_queue_delay_us = 500  # longest a request waits for its batch to fill;
//!                           #   default: the daemon's max_batch_delay_us
//! instances = 1             # executors running this model at once, 1..=64 (capped at
//!                           #   executor_threads); default: every executor
//! max_dynamic_dim = 64      # onnx only: upper bound of every symbolic dim; default 64
//! device = "cpu"            # bert only: "cpu" (default) or "cuda:N" (cargo feature `cuda`)
//! ```
//!
//! Models get MODELS ids 1, 2, ... in manifest order. Each model is loaded once; its
//! `instances` executors share the loaded weights (backends are `Sync`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ai_infer_protocol::{check_model_name, MAX_MODELS};
use ai_infer_scheduler::MAX_BATCH;
use serde::Deserialize;
use thiserror::Error;

use crate::backend::bert::{BertBackend, BertError, BertOptions};
use crate::backend::onnx::{OnnxBackend, OnnxError, OnnxOptions};
use crate::backend::Backend;

/// Environment variable that replaces the manifest's `models_dir`.
pub const MODELS_DIR_ENV: &str = "AIVMM_MODELS_DIR";
/// Largest `instances` accepted.
pub const MAX_INSTANCES: u32 = 64;
/// Default upper bound of symbolic ONNX dims.
pub const DEFAULT_MAX_DYNAMIC_DIM: u64 = 64;

/// Why the manifest or one of its models could not be loaded.
#[derive(Debug, Error)]
pub enum ModelsError {
    /// The manifest file could not be read.
    #[error("cannot read models manifest {path}: {source}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest is not valid TOML or has unknown or mistyped fields.
    #[error("invalid models manifest {path}: {source}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// What the parser found.
        source: Box<toml::de::Error>,
    },
    /// The manifest lists no model, or more than the protocol can list.
    #[error("models manifest {path} lists {count} models; 1 to {max} are supported")]
    ModelCount {
        /// The manifest.
        path: PathBuf,
        /// Models listed.
        count: usize,
        /// Most supported.
        max: usize,
    },
    /// A model name is empty, too long or contains NUL.
    #[error("model name {name:?} is invalid: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Two models have the same name.
    #[error("model name {0:?} appears twice in the manifest")]
    DuplicateName(String),
    /// `runtime` is not one this daemon has.
    #[error("model {model:?}: unknown runtime {runtime:?} (expected \"onnx\" or \"bert\")")]
    UnknownRuntime {
        /// The model.
        model: String,
        /// The runtime given.
        runtime: String,
    },
    /// A numeric setting is out of range.
    #[error("model {model:?}: {field} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The model.
        model: String,
        /// The setting.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A setting that the model's runtime does not use.
    #[error("model {model:?}: {field} does not apply to runtime {runtime}")]
    NotForRuntime {
        /// The model.
        model: String,
        /// The setting.
        field: &'static str,
        /// The model's runtime.
        runtime: Runtime,
    },
    /// `device` is neither `cpu` nor `cuda:N`.
    #[error("model {model:?}: device {device:?} is neither \"cpu\" nor \"cuda:N\"")]
    InvalidDevice {
        /// The model.
        model: String,
        /// The device given.
        device: String,
    },
    /// A CUDA device was asked for but the daemon was built without the `cuda` feature.
    #[error(
        "model {model:?}: device cuda:{ordinal} needs ai-inferd built with the `cuda` feature"
    )]
    CudaNotBuilt {
        /// The model.
        model: String,
        /// The device ordinal.
        ordinal: usize,
    },
    /// The model's file or directory does not exist.
    #[error("model {model:?}: {path} is not an existing {expected}")]
    MissingFile {
        /// The model.
        model: String,
        /// The resolved path.
        path: PathBuf,
        /// "file" or "directory".
        expected: &'static str,
    },
    /// The ONNX backend could not load the model.
    #[error("model {model:?}: {source}")]
    Onnx {
        /// The model.
        model: String,
        /// Why.
        source: Box<OnnxError>,
    },
    /// The bert backend could not load the model.
    #[error("model {model:?}: {source}")]
    Bert {
        /// The model.
        model: String,
        /// Why.
        source: Box<BertError>,
    },
    /// The CUDA device could not be opened.
    #[cfg(feature = "cuda")]
    #[error("model {model:?}: {source}")]
    Cuda {
        /// The model.
        model: String,
        /// Why.
        source: Box<crate::backend::cuda::CudaError>,
    },
}

/// The inference runtime a model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// tract, an ONNX file.
    Onnx,
    /// candle, a BERT sentence-embedding model directory.
    Bert,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runtime::Onnx => "onnx",
            Runtime::Bert => "bert",
        })
    }
}

/// Where a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDevice {
    /// The host CPU.
    Cpu,
    /// CUDA device N (bert only, `cuda` feature).
    Cuda(usize),
}

/// The manifest as written (before validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    models_dir: Option<PathBuf>,
    #[serde(default)]
    model: Vec<ModelFileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFileEntry {
    name: String,
    runtime: String,
    path: PathBuf,
    max_batch: Option<u32>,
    max_queue_delay_us: Option<u64>,
    instances: Option<u32>,
    max_dynamic_dim: Option<u64>,
    device: Option<String>,
}

/// How the daemon serves one model (the scheduler's policy besides `max_batch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelServing {
    /// Longest a request waits for its batch to fill; `None`: the daemon's
    /// `max_batch_delay_us`.
    pub max_queue_delay_ns: Option<u64>,
    /// Executors that may run the model at once (each a concurrent instance sharing the
    /// one loaded backend); `None`: every executor.
    pub instances: Option<u32>,
}

/// One validated model entry; the scheduler's `ModelPolicy` comes from `max_batch`
/// and [`ModelEntry::serving`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    /// MODELS id: position in the manifest, from 1.
    pub id: u32,
    /// MODELS name.
    pub name: String,
    /// Runtime.
    pub runtime: Runtime,
    /// Model file (onnx) or directory (bert), resolved.
    pub path: PathBuf,
    /// Largest batch of requests per backend call (default 1). A backend may run
    /// fewer ([`Backend::max_batch`]: 1 for an ONNX model without a batch dim); the
    /// scheduler's policy should take the smaller of the two.
    pub max_batch: u32,
    /// Longest a request waits for its batch to fill, in µs (default: the daemon's
    /// `max_batch_delay_us`).
    pub max_queue_delay_us: Option<u64>,
    /// Executors running this model concurrently (default: every executor); they share
    /// the one loaded backend.
    pub instances: Option<u32>,
    /// Upper bound of symbolic ONNX dims (default 64; onnx only).
    pub max_dynamic_dim: u64,
    /// Where it computes (default CPU).
    pub device: ComputeDevice,
}

impl ModelEntry {
    /// How the daemon serves this model.
    pub fn serving(&self) -> ModelServing {
        ModelServing {
            max_queue_delay_ns: self.max_queue_delay_us.map(|us| us.saturating_mul(1000)),
            instances: self.instances,
        }
    }
}

/// A validated manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The models, in manifest (= id) order.
    pub models: Vec<ModelEntry>,
}

fn check_range(
    model: &str,
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ModelsError> {
    if value < min || value > max {
        return Err(ModelsError::OutOfRange {
            model: model.to_owned(),
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ModelsError> {
    check_model_name(name).map_err(|e| ModelsError::InvalidName {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_device(model: &str, device: &str) -> Result<ComputeDevice, ModelsError> {
    if device == "cpu" {
        return Ok(ComputeDevice::Cpu);
    }
    device
        .strip_prefix("cuda:")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .map(ComputeDevice::Cuda)
        .ok_or_else(|| ModelsError::InvalidDevice {
            model: model.to_owned(),
            device: device.to_owned(),
        })
}

impl ModelFileEntry {
    fn validate(self, id: u32, base: &Path) -> Result<ModelEntry, ModelsError> {
        let name = self.name;
        check_name(&name)?;
        let runtime = match self.runtime.as_str() {
            "onnx" => Runtime::Onnx,
            "bert" => Runtime::Bert,
            _ => {
                return Err(ModelsError::UnknownRuntime {
                    model: name,
                    runtime: self.runtime,
                })
            }
        };
        let not_for = |field| ModelsError::NotForRuntime {
            model: name.clone(),
            field,
            runtime,
        };
        let max_batch = self.max_batch.unwrap_or(1);
        check_range(&name, "max_batch", max_batch.into(), 1, MAX_BATCH.into())?;
        if let Some(instances) = self.instances {
            check_range(
                &name,
                "instances",
                instances.into(),
                1,
                MAX_INSTANCES.into(),
            )?;
        }
        if runtime != Runtime::Onnx && self.max_dynamic_dim.is_some() {
            return Err(not_for("max_dynamic_dim"));
        }
        let max_dynamic_dim = self.max_dynamic_dim.unwrap_or(DEFAULT_MAX_DYNAMIC_DIM);
        check_range(&name, "max_dynamic_dim", max_dynamic_dim, 1, u64::MAX)?;
        let device = match &self.device {
            None => ComputeDevice::Cpu,
            Some(d) => parse_device(&name, d)?,
        };
        #[cfg(not(feature = "cuda"))]
        if let ComputeDevice::Cuda(ordinal) = device {
            return Err(ModelsError::CudaNotBuilt {
                model: name,
                ordinal,
            });
        }
        if runtime == Runtime::Onnx && device != ComputeDevice::Cpu {
            // tract has no GPU backend.
            return Err(not_for("device (ONNX models run on the CPU)"));
        }

        let path = base.join(&self.path);
        let (exists, expected) = match runtime {
            Runtime::Onnx => (path.is_file(), "file"),
            Runtime::Bert => (path.is_dir(), "directory"),
        };
        if !exists {
            return Err(ModelsError::MissingFile {
                model: name,
                path,
                expected,
            });
        }
        Ok(ModelEntry {
            id,
            name,
            runtime,
            path,
            max_batch,
            max_queue_delay_us: self.max_queue_delay_us,
            instances: self.instances,
            max_dynamic_dim,
            device,
        })
    }
}

impl Manifest {
    /// Reads and validates the manifest at `path`; [`MODELS_DIR_ENV`] replaces its
    /// `models_dir` when set.
    pub fn read(path: &Path) -> Result<Self, ModelsError> {
        let env = std::env::var_os(MODELS_DIR_ENV).filter(|v| !v.is_empty());
        Self::read_with_models_dir(path, env.as_deref().map(Path::new))
    }

    /// [`Manifest::read`] with an explicit `models_dir` override instead of the
    /// environment.
    pub fn read_with_models_dir(
        path: &Path,
        models_dir: Option<&Path>,
    ) -> Result<Self, ModelsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let manifest_dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, manifest_dir, models_dir)
    }

    /// Validates manifest `text` (`path` is for messages); relative paths resolve
    /// against `models_dir` if given, else the manifest's `models_dir` taken relative to
    /// `manifest_dir`.
    pub fn parse(
        text: &str,
        path: &Path,
        manifest_dir: &Path,
        models_dir: Option<&Path>,
    ) -> Result<Self, ModelsError> {
        let file: ManifestFile = toml::from_str(text).map_err(|source| ModelsError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let count = file.model.len();
        if count == 0 || count > MAX_MODELS {
            return Err(ModelsError::ModelCount {
                path: path.to_owned(),
                count,
                max: MAX_MODELS,
            });
        }
        let base = match models_dir {
            Some(dir) => dir.to_owned(),
            None => manifest_dir.join(file.models_dir.unwrap_or_default()),
        };
        let mut models: Vec<ModelEntry> = Vec::with_capacity(count);
        for (i, entry) in file.model.into_iter().enumerate() {
            if models.iter().any(|m| m.name == entry.name) {
                return Err(ModelsError::DuplicateName(entry.name));
            }
            // Fits: count <= MAX_MODELS.
            models.push(entry.validate(i as u32 + 1, &base)?);
        }
        Ok(Manifest { models })
    }

    /// How each model is served, by MODELS id.
    pub fn serving(&self) -> BTreeMap<u32, ModelServing> {
        self.models.iter().map(|m| (m.id, m.serving())).collect()
    }

    /// Loads every model, in order.
    pub fn load_backends(&self) -> Result<Vec<Arc<dyn Backend>>, ModelsError> {
        self.models.iter().map(load_backend).collect()
    }
}

/// Loads one model into its backend.
pub fn load_backend(entry: &ModelEntry) -> Result<Arc<dyn Backend>, ModelsError> {
    let model = || entry.name.clone();
    Ok(match entry.runtime {
        Runtime::Onnx => {
            let opts = OnnxOptions {
                max_batch: entry.max_batch,
                max_dynamic_dim: entry.max_dynamic_dim,
            };
            Arc::new(
                OnnxBackend::load(&entry.path, entry.id, &entry.name, &opts).map_err(|source| {
                    ModelsError::Onnx {
                        model: model(),
                        source: Box::new(source),
                    }
                })?,
            )
        }
        Runtime::Bert => {
            let opts = BertOptions {
                max_batch: entry.max_batch,
                device: candle_device(entry)?,
            };
            Arc::new(
                BertBackend::load(&entry.path, entry.id, &entry.name, &opts).map_err(|source| {
                    ModelsError::Bert {
                        model: model(),
                        source: Box::new(source),
                    }
                })?,
            )
        }
    })
}

fn candle_device(entry: &ModelEntry) -> Result<candle_core::Device, ModelsError> {
    match entry.device {
        ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(ordinal) => {
            crate::backend::cuda::cuda_device(ordinal).map_err(|source| ModelsError::Cuda {
                model: entry.name.clone(),
                source: Box::new(source),
            })
        }
        #[cfg(not(feature = "cuda"))]
        ComputeDevice::Cuda(ordinal) => Err(ModelsError::CudaNotBuilt {
            model: entry.name.clone(),
            ordinal,
        }),
    }
}

/// Reads the manifest at `manifest` and loads every model (ids 1.. in manifest order).
/// The entries (for the scheduler's policies) come from [`Manifest::read`].
pub fn load_models(manifest: &Path) -> Result<Vec<Arc<dyn Backend>>, ModelsError> {
    Manifest::read(manifest)?.load_backends()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_models::{models_dir, require};

    /// A scratch directory with `a.onnx` and `bert/`, removed on drop.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            std::fs::create_dir_all(dir.join("m/bert")).unwrap();
            std::fs::write(dir.join("m/a.onnx"), b"").unwrap();
            Scratch(tmp)
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn parse(&self, text: &str) -> Result<Manifest, ModelsError> {
            Manifest::parse(text, &self.path().join("models.toml"), self.path(), None)
        }
    }

    const TWO: &str = r#"
        models_dir = "m"
        [[model]]
        name = "mlp"
        runtime = "onnx"
        path = "a.onnx"
        max_batch = 8
        max_queue_delay_us = 250
        [[model]]
        name = "minilm"
        runtime = "bert"
        path = "bert"
        instances = 2
    "#;

    #[test]
    fn entries_get_ids_in_order_defaults_and_resolved_paths() {
        let s = Scratch::new();
        let m = s.parse(TWO).unwrap();
        assert_eq!(
            m.models,
            vec![
                ModelEntry {
                    id: 1,
                    name: "mlp".into(),
                    runtime: Runtime::Onnx,
                    path: s.path().join("m/a.onnx"),
                    max_batch: 8,
                    max_queue_delay_us: Some(250),
                    instances: None,
                    max_dynamic_dim: DEFAULT_MAX_DYNAMIC_DIM,
                    device: ComputeDevice::Cpu,
                },
                ModelEntry {
                    id: 2,
                    name: "minilm".into(),
                    runtime: Runtime::Bert,
                    path: s.path().join("m/bert"),
                    max_batch: 1,
                    max_queue_delay_us: None,
                    instances: Some(2),
                    max_dynamic_dim: DEFAULT_MAX_DYNAMIC_DIM,
                    device: ComputeDevice::Cpu,
                },
            ]
        );
        assert_eq!(
            m.serving().get(&1),
            Some(&ModelServing {
                max_queue_delay_ns: Some(250_000),
                instances: None
            })
        );
    }

    #[test]
    fn a_models_dir_override_replaces_the_manifest_one() {
        let s = Scratch::new();
        let text = TWO.replace("models_dir = \"m\"", "models_dir = \"nowhere\"");
        let m = Manifest::parse(
            &text,
            &s.path().join("x.toml"),
            s.path(),
            Some(&s.path().join("m")),
        )
        .unwrap();
        assert_eq!(m.models[1].path, s.path().join("m/bert"));
        assert!(matches!(
            s.parse(&text),
            Err(ModelsError::MissingFile { .. })
        ));
    }

    #[test]
    fn bad_manifests_get_the_right_error() {
        let s = Scratch::new();
        let entry = |extra: &str| {
            format!("models_dir = \"m\"\n[[model]]\nname = \"x\"\nruntime = \"onnx\"\npath = \"a.onnx\"\n{extra}\n")
        };
        let bert = |extra: &str| {
            format!("models_dir = \"m\"\n[[model]]\nname = \"b\"\nruntime = \"bert\"\npath = \"bert\"\n{extra}\n")
        };

        let e = s
            .parse(&entry("").replace("\"onnx\"", "\"tensorflow\""))
            .unwrap_err();
        assert!(
            matches!(&e, ModelsError::UnknownRuntime { runtime, .. } if runtime == "tensorflow"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "model \"x\": unknown runtime \"tensorflow\" (expected \"onnx\" or \"bert\")"
        );

        let dup = format!(
            "{}{}",
            entry(""),
            entry("").replace("models_dir = \"m\"\n", "")
        );
        assert!(matches!(s.parse(&dup), Err(ModelsError::DuplicateName(n)) if n == "x"));

        let e = s
            .parse(&entry("").replace("a.onnx", "missing.onnx"))
            .unwrap_err();
        assert!(
            matches!(&e, ModelsError::MissingFile { path, expected: "file", .. } if path.ends_with("m/missing.onnx")),
            "{e}"
        );
        // A directory is not an ONNX file, a file is not a bert model directory.
        assert!(matches!(
            s.parse(&entry("").replace("a.onnx", "bert")),
            Err(ModelsError::MissingFile { .. })
        ));
        assert!(matches!(
            s.parse(&bert("").replace("path = \"bert\"", "path = \"a.onnx\"")),
            Err(ModelsError::MissingFile {
                expected: "directory",
                ..
            })
        ));

        assert!(matches!(
            s.parse(&entry("colour = \"blue\"")),
            Err(ModelsError::Parse { .. })
        ));
        assert!(matches!(
            s.parse(&entry("max_batch = -1")),
            Err(ModelsError::Parse { .. })
        ));
        assert!(matches!(
            s.parse("models_dir = \"m\"\n"),
            Err(ModelsError::ModelCount { count: 0, .. })
        ));

        for (extra, field) in [
            ("max_batch = 0", "max_batch"),
            ("max_batch = 1025", "max_batch"),
            ("instances = 0", "instances"),
            ("instances = 65", "instances"),
            ("max_dynamic_dim = 0", "max_dynamic_dim"),
        ] {
            assert!(
                matches!(s.parse(&entry(extra)), Err(ModelsError::OutOfRange { field: f, .. }) if f == field),
                "{extra}"
            );
        }

        assert!(matches!(
            s.parse(&bert("max_dynamic_dim = 8")),
            Err(ModelsError::NotForRuntime {
                field: "max_dynamic_dim",
                runtime: Runtime::Bert,
                ..
            })
        ));
        assert!(matches!(
            s.parse(&bert("device = \"gpu\"")),
            Err(ModelsError::InvalidDevice { .. })
        ));
        assert!(matches!(
            s.parse(&bert("device = \"cuda:\"")),
            Err(ModelsError::InvalidDevice { .. })
        ));
        assert!(matches!(
            s.parse(&bert("device = \"cuda:+1\"")),
            Err(ModelsError::InvalidDevice { .. })
        ));
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            s.parse(&bert("device = \"cuda:1\"")),
            Err(ModelsError::CudaNotBuilt { ordinal: 1, .. })
        ));
        #[cfg(feature = "cuda")]
        assert!(matches!(
            s.parse(&entry("device = \"cuda:0\"")),
            Err(ModelsError::NotForRuntime {
                runtime: Runtime::Onnx,
                ..
            })
        ));

        let long = "n".repeat(ai_infer_protocol::MAX_MODEL_NAME_LEN + 1);
        assert!(matches!(
            s.parse(&entry("").replace("\"x\"", &format!("\"{long}\""))),
            Err(ModelsError::InvalidName { .. })
        ));
        assert!(matches!(
            s.parse(&entry("").replace("\"x\"", "\"\"")),
            Err(ModelsError::InvalidName { .. })
        ));
    }

    #[test]
    fn reading_a_missing_manifest_says_which() {
        let e = Manifest::read_with_models_dir(Path::new("/nonexistent/models.toml"), None)
            .unwrap_err();
        assert!(matches!(e, ModelsError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/models.toml"), "{e}");
    }

    #[test]
    fn the_project_manifest_loads_every_model() {
        if require("mlp.onnx").is_none() || require("minilm").is_none() {
            return;
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models.toml");
        let manifest = Manifest::read_with_models_dir(&path, Some(&models_dir())).unwrap();
        let backends = manifest.load_backends().unwrap();
        let names: Vec<(u32, &str)> = backends
            .iter()
            .map(|b| (b.info().id, b.info().name.as_str()))
            .collect();
        assert_eq!(names, vec![(1, "mlp"), (2, "all-MiniLM-L6-v2")]);
        for (backend, entry) in backends.iter().zip(&manifest.models) {
            assert_eq!(backend.max_batch(), entry.max_batch as usize);
        }
    }
}
