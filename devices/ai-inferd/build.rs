//! Compiles the reviewed seccomp filters (`seccomp/x86_64.json`) into static BPF tables,
//! `$OUT_DIR/seccomp_filters.rs`: the daemon starts without parsing JSON or running the
//! filter compiler (`src/seccomp.rs`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    sandbox::codegen::write_for_build("seccomp/x86_64.json");
}
