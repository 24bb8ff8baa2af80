//! The `ai-inferd` binary's start-up contract: one line and exit 2 on a bad config.

use std::process::Command;

fn run(config_text: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    if let Some(text) = config_text {
        std::fs::write(&path, text).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ai-inferd"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_2_with_one_line() {
    let cases = [
        (None, "missing", "cannot read config file"),
        (Some("[daemon]\nmodels = \"m\"\n"), "no-tenant", "no [[tenant]]"),
        (
            Some("[daemon]\nmodels = \"m\"\n[[tenant]]\nname = \"a\"\nsocket = \"/tmp/x\"\nweight = 0\n"),
            "weight",
            "weight = 0",
        ),
        (
            Some("[daemon]\nmodels = \"m\"\nturbo = true\n"),
            "unknown",
            "turbo",
        ),
    ];
    for (text, name, needle) in cases {
        let (code, stderr) = run(text);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
    }
}

/// The `Uid:`, `Gid:`, `Groups:` and `NoNewPrivs:` lines of a process's status.
fn credentials(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "NoNewPrivs:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn serve_run_as_drops_to_the_user_before_serving() {
    let models = std::env::var_os("AIVMM_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models")
        });
    if !models.join("mlp.onnx").exists() {
        println!(
            "SKIP: no mlp.onnx in {}; run devices/ai-inferd/models/setup.sh",
            models.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "models_dir = \"{}\"\n[[model]]\nname = \"mlp\"\nruntime = \"onnx\"\npath = \"mlp.onnx\"\n",
            models.display()
        ),
    )
    .unwrap();
    let socket = dir.join("t.sock");
    std::fs::write(
        dir.join("d.toml"),
        format!(
            "[daemon]\nmodels = \"models.toml\"\n[[tenant]]\nname = \"t\"\nsocket = \"{}\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ai-inferd"))
        .args(["serve", "--run-as", "65534:65534", "--config"])
        .arg(dir.join("d.toml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let is_root = nix::unistd::geteuid().is_root();
    if !is_root {
        // Without root the switch fails before anything is served: exit 2, one line.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("cannot switch to 65534:65534"), "{stderr}");
        assert!(
            !socket.exists(),
            "the socket of a daemon that did not start is removed"
        );
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pid = child.id();
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        seen = credentials(pid);
        if socket.exists() && seen.iter().any(|l| l == "Uid: 65534 65534 65534 65534") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The daemon shuts down in order on SIGTERM and exits 0.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    // Bounded: a daemon that cannot wake its own listener (it runs as a user its socket
    // shuts out) would hang here.
    let stop_deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut exited = false;
    while std::time::Instant::now() < stop_deadline {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited,
        "the daemon did not stop within 30 s of SIGTERM; {stderr}"
    );
    for want in [
        "Uid: 65534 65534 65534 65534",
        "Gid: 65534 65534 65534 65534",
        "Groups: 65534",
        "NoNewPrivs: 1",
    ] {
        assert!(
            seen.iter().any(|l| l == want),
            "{want} not in {seen:?}; {stderr}"
        );
    }
    assert!(
        stderr.contains("running as uid:gid 65534:65534"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
