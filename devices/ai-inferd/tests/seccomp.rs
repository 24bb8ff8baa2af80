//! The daemon's seccomp filters, on the real binary.
//!
//! - With the filters on (the default), every thread type does its work: a second VMM is
//!   refused while one is connected, a VMM's requests run on each real model, the metrics
//!   are scraped, reloads come over SIGHUP and the metrics socket, the VMM leaves and a new
//!   one connects, and the daemon stops in order on SIGTERM. No thread strays outside its
//!   filter.
//! - A thread that does stray ends the daemon with exit code 3 and a line naming it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ai_infer_protocol::{DType, Request, Status, TensorDesc};
use ai_infer_test_frontend::{FrontendOptions, TestFrontend};
use ai_inferd::metrics::{self, MetricsEndpoint};
use ai_inferd::seccomp::{self, ThreadKind, SECCOMP_VIOLATION};

/// The real models (devices/ai-inferd/models/setup.sh), or None to skip.
fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("AIVMM_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models"));
    if dir.join("mlp.onnx").exists() && dir.join("minilm").is_dir() {
        Some(dir)
    } else {
        println!(
            "SKIP: no mlp.onnx and minilm/ in {}; run devices/ai-inferd/models/setup.sh",
            dir.display()
        );
        None
    }
}

/// A daemon config in `dir` serving the manifest `configs/models.toml` from `models` to
/// one tenant, with metrics on a unix socket and two executors.
fn write_config(dir: &Path, models: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models.toml");
    let text = std::fs::read_to_string(manifest).unwrap();
    let text = text.replace(
        "models_dir = \"../target/models\"",
        &format!("models_dir = \"{}\"", models.display()),
    );
    std::fs::write(dir.join("models.toml"), text).unwrap();
    let config = dir.join("d.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nmodels = \"models.toml\"\nmetrics_socket = \"{}\"\nexecutor_threads = 2\n\
             [[tenant]]\nname = \"t\"\nsocket = \"{}\"\nallowed_models = [\"*\"]\n",
            dir.join("metrics.sock").display(),
            dir.join("t.sock").display()
        ),
    )
    .unwrap();
    config
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Waits for `child` to exit (killing it after `limit`); its exit code and stderr.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon exited before serving"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One VMM's visit: MODELS, then INFER on each real model, TRACE; checked.
fn visit(socket: &Path) {
    let mut fe = TestFrontend::connect(socket, FrontendOptions::default()).unwrap();
    let models = fe.models().unwrap();
    let id = |name: &str| {
        models
            .models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no model {name} in {models:?}"))
            .id
    };
    let x: Vec<u8> = (0..16u8).flat_map(|v| f32::from(v).to_le_bytes()).collect();
    let mlp = Request::infer(
        1,
        id("mlp"),
        vec![TensorDesc::input(DType::F32, &[1, 16]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[1, 4], 16).unwrap()],
    )
    .unwrap();
    let done = fe.call(0, &mlp, &[&x], 0).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok, "mlp");
    let text = b"a sandboxed daemon still embeds sentences";
    let len = u64::try_from(text.len()).unwrap();
    let bert = Request::infer(
        2,
        id("all-MiniLM-L6-v2"),
        vec![TensorDesc::input(DType::U8, &[len]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[384], 384 * 4).unwrap()],
    )
    .unwrap();
    let done = fe.call(0, &bert, &[text], 0).unwrap();
    assert_eq!(done.header().unwrap().status, Status::Ok, "MiniLM");
    let embedding = &done.outputs[0];
    assert!(
        embedding.iter().any(|&b| b != 0),
        "the embedding is all zeros"
    );
    fe.trace().unwrap();
}

#[test]
fn with_filters_on_every_thread_does_its_work_and_the_daemon_stops_in_order() {
    let Some(models) = models_dir() else {
        return;
    };
    let tmp = common::test_dir();
    let dir = tmp.path();
    let config = write_config(dir, &models);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ai-inferd"))
        .args(["serve", "--log-level", "info", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = dir.join("t.sock");
    let endpoint = MetricsEndpoint::Unix(dir.join("metrics.sock"));
    wait_for(&socket, &mut child);
    wait_for(&dir.join("metrics.sock"), &mut child);

    let served = std::panic::catch_unwind(|| {
        // A second VMM while one is connected is refused: the listener accepts it, reads
        // its credentials and shuts it down, under its filter.
        let first = TestFrontend::connect(&socket, FrontendOptions::default()).unwrap();
        let second = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut &second, &mut byte);
        assert!(
            matches!(read, Ok(0)),
            "the second VMM was not refused: {read:?}"
        );
        drop(first);
        visit(&socket);
        let text = metrics::fetch(&endpoint, "", Duration::from_secs(10)).unwrap();
        assert!(text.contains("ai_inferd_"), "{text}");
        let reloaded = metrics::fetch(&endpoint, "reload", Duration::from_secs(10)).unwrap();
        assert!(reloaded.starts_with("ok"), "{reloaded}");
        signal(&child, nix::sys::signal::Signal::SIGHUP);
        // The VMM left; the listener serves the next one.
        visit(&socket);
    });
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let (code, stderr) = finish(child, Duration::from_secs(30));
    if let Err(e) = served {
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        panic!("{what}\nthe daemon's stderr:\n{stderr}");
    }
    assert!(!stderr.contains("outside its filter"), "{stderr}");
    for kind in ThreadKind::ALL {
        let line = format!("seccomp: {} filter installed", kind.filter_name());
        assert!(stderr.contains(&line), "no {line:?} in:\n{stderr}");
    }
    assert_eq!(code, Some(0), "{stderr}");
}

/// Set in the child: which thread type's filter to install before the forbidden call.
const CHILD_ENV: &str = "AI_INFERD_SECCOMP_TEST_CHILD";

/// In the child: installs the filter on a thread named after its type, then opens an
/// internet socket, which no ai-inferd thread does.
#[test]
fn child_socket_outside_the_filter() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let kind = ThreadKind::ALL
        .into_iter()
        .find(|k| k.filter_name() == name)
        .unwrap();
    seccomp::enable().unwrap();
    sandbox::seccomp_child::open_inet_socket_after(format!("{name}-under-test"), move || {
        seccomp::apply(kind);
    });
}

#[test]
fn a_syscall_outside_the_filter_ends_the_daemon_with_its_exit_code() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    for kind in ThreadKind::ALL {
        let (code, stderr) = sandbox::seccomp_child::run_test(
            "child_socket_outside_the_filter",
            (CHILD_ENV, kind.filter_name()),
        );
        assert_eq!(
            code,
            Some(i32::from(SECCOMP_VIOLATION)),
            "{kind:?}: {stderr}"
        );
        let line = format!(
            "ai-inferd: seccomp: thread {}-under-test made syscall {}, outside its filter; exiting",
            kind.filter_name(),
            libc::SYS_socket
        );
        assert!(
            stderr.contains(&line),
            "{kind:?}: no {line:?} in:\n{stderr}"
        );
    }
}
