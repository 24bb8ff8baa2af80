//! Runs the Python module's tests (`python/test_ai_agent.py`) against an agent daemon
//! over the fake device, through the built `libguest_agent.so`.
//!
//! The interpreter is `$AI_AGENT_PYTHON`, else the models' virtualenv that
//! `devices/ai-inferd/models/setup.sh` creates (it has numpy), else `python3`. Without
//! python3, or without numpy, the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("AI_AGENT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/models/.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

#[test]
fn python_module_against_the_fake_device() {
    let exe = std::env::current_exe().unwrap();
    // As in c_abi.rs: the fresh cdylib is next to the test binary.
    let lib = exe.parent().unwrap().join("libguest_agent.so");
    assert!(lib.exists(), "{} not built", lib.display());
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("python-{}", std::process::id()));
    let (_fake, socket) = guest_agent::testing::fake_daemon(&dir, 4 << 20);
    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let interpreter = python();
    let run = match Command::new(&interpreter)
        .arg(python_dir.join("test_ai_agent.py"))
        .env("AI_AGENT_LIBRARY", &lib)
        .env("AI_AGENT_SOCKET", &socket)
        .env("PYTHONPATH", &python_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipped: cannot run {} ({e})", interpreter.display());
            return;
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if stdout.starts_with("SKIP:") {
        eprintln!("skipped: {}", stdout.trim());
        return;
    }
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let passed: u32 = stdout
        .lines()
        .find_map(|l| l.strip_suffix(" passed, 0 failed"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line\n{stdout}\n{stderr}"));
    assert!(passed > 0, "{stdout}\n{stderr}");
}
