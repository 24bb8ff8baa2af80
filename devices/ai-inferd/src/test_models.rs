//! Test support: where `models/setup.sh` installed the models. Tests that need a model
//! which is absent print a SKIP line and return.

use std::path::{Path, PathBuf};

use crate::models::MODELS_DIR_ENV;

/// `$AIVMM_MODELS_DIR`, else `<workspace>/target/models` (setup.sh's default).
pub fn models_dir() -> PathBuf {
    match std::env::var_os(MODELS_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    }
}

/// The installed model file or directory `name`, or `None` after printing why the
/// calling test is skipped.
pub fn require(name: &str) -> Option<PathBuf> {
    let path = models_dir().join(name);
    if path.exists() {
        Some(path)
    } else {
        println!(
            "SKIP: {} is missing; run devices/ai-inferd/models/setup.sh",
            path.display()
        );
        None
    }
}
