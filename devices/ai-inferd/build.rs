//! Enables the manifest-based model loading in `main.rs` when `src/models.rs` (the
//! model manifest loader, developed on its own branch) is part of the crate.
//! Once both branches are merged this script and the `has_model_loader` cfg can go.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_model_loader)");
    println!("cargo::rerun-if-changed=src/models.rs");
    if Path::new("src/models.rs").exists() {
        println!("cargo::rustc-cfg=has_model_loader");
    }
}
