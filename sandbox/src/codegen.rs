//! Compiling a program's filters when the program is built, for its build script.
//!
//! Parsing the JSON and running the filter compiler at start would put serde_json,
//! seccompiler and their heap in every process. The build script turns the reviewed JSON
//! into static BPF tables instead, and the program hands them to
//! [`crate::seccomp::enable`], which copies them as they are.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::{env, fs};

use seccompiler::{BpfProgram, TargetArch};

/// Rust source defining `COMPILED_FILTERS`, every filter of `json` compiled for
/// `target_arch` (as Cargo's `CARGO_CFG_TARGET_ARCH` names it), by name:
///
/// ```text
/// pub static COMPILED_FILTERS: &::sandbox::seccomp::CompiledFilters<'static> =
///     &[("name", &[(code, jt, jf, k), ...]), ...];
/// ```
///
/// Each tuple holds the fields of one `sock_filter`, in order. The filters are sorted by
/// name, so the same JSON always gives the same source.
pub fn filters_source(json: &str, target_arch: &str) -> Result<String, String> {
    let arch = TargetArch::try_from(target_arch).map_err(|e| e.to_string())?;
    let filters =
        seccompiler::compile_from_json(json.as_bytes(), arch).map_err(|e| e.to_string())?;
    Ok(render(&filters.into_iter().collect()))
}

/// The whole of a program's build script: compiles `json_path` (relative to the crate)
/// into `$OUT_DIR/seccomp_filters.rs` for Cargo's target architecture, and has Cargo run
/// it again when the JSON changes. The filters name x86_64 syscalls: for another target
/// the table is empty, and the program then refuses to start with its filters on.
/// Panics, failing the build, on a JSON the filter compiler refuses.
pub fn write_for_build(json_path: &str) {
    println!("cargo:rerun-if-changed={json_path}");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("Cargo sets CARGO_CFG_TARGET_ARCH");
    let json = if arch == "x86_64" {
        fs::read_to_string(json_path).unwrap_or_else(|e| panic!("cannot read {json_path}: {e}"))
    } else {
        String::from("{}")
    };
    let source = filters_source(&json, &arch)
        .unwrap_or_else(|e| panic!("cannot compile {json_path} for {arch}: {e}"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("Cargo sets OUT_DIR"))
        .join("seccomp_filters.rs");
    fs::write(&out, source).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn render(filters: &BTreeMap<String, BpfProgram>) -> String {
    let mut source = String::from(
        "/// The seccomp filters, compiled from the reviewed JSON when the program was built:\n\
         /// by name, each a BPF program as `sock_filter` fields (code, jt, jf, k).\n\
         pub static COMPILED_FILTERS: &::sandbox::seccomp::CompiledFilters<'static> = &[\n",
    );
    for (name, program) in filters {
        // Writing to a String cannot fail.
        let _ = writeln!(source, "    ({name:?}, &[");
        for i in program {
            let _ = writeln!(
                source,
                "        ({:#06x}, {}, {}, {:#x}),",
                i.code, i.jt, i.jf, i.k
            );
        }
        source.push_str("    ]),\n");
    }
    source.push_str("];\n");
    source
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
        "b": {"default_action": "trap", "filter_action": "allow", "filter": [
            {"syscall": "write"}
        ]},
        "a": {"default_action": "trap", "filter_action": "allow", "filter": [
            {"syscall": "read"}
        ]}
    }"#;

    #[test]
    fn the_source_lists_every_filter_by_name_with_its_instructions() {
        let source = filters_source(JSON, "x86_64").unwrap();
        assert!(source.contains("pub static COMPILED_FILTERS"), "{source}");
        let a = source.find("(\"a\", &[").unwrap();
        let b = source.find("(\"b\", &[").unwrap();
        assert!(a < b, "{source}");
        let compiled = seccompiler::compile_from_json(JSON.as_bytes(), TargetArch::x86_64);
        let instructions: usize = compiled.unwrap().values().map(Vec::len).sum();
        let tuples = source.lines().filter(|l| l.trim_start().starts_with("(0x"));
        assert_eq!(tuples.count(), instructions, "{source}");
        assert_eq!(source, filters_source(JSON, "x86_64").unwrap());
    }

    #[test]
    fn bad_json_or_an_unknown_architecture_is_refused() {
        assert!(filters_source("{", "x86_64").is_err());
        assert!(filters_source(JSON, "mips").is_err());
        assert!(filters_source("{}", "x86_64")
            .unwrap()
            .ends_with("= &[\n];\n"));
    }
}
