//! Shared pieces of the daemon integration tests: small test-only backends and a
//! harness that starts a real daemon (in-process threads) on temporary sockets.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use ai_infer_protocol::{DType, DimRange, ModelInfo, Request, Shape, TensorDesc, TensorSpec};
use ai_infer_test_frontend::{FrontendOptions, TestFrontend};
use ai_inferd::backend::{Backend, BackendError, RequestOutcome, RequestTensors};
use ai_inferd::config::Config;
use ai_inferd::daemon::Daemon;
use vm_memory::Bytes;

pub const ADD_ONE: u32 = 7;
pub const GATED: u32 = 8;
pub const SECRET: u32 = 9;

/// Holds gated runs until opened; counts the requests that reached it.
#[derive(Default)]
pub struct Gate {
    state: Mutex<(bool, usize)>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) {
        self.lock().0 = true;
        self.cv.notify_all();
    }

    pub fn close(&self) {
        self.lock().0 = false;
    }

    /// Waits until `n` requests in total have reached the gate (batched or not).
    pub fn wait_entered(&self, n: usize) {
        let guard = self.lock();
        let (guard, timeout) = self
            .cv
            .wait_timeout_while(guard, Duration::from_secs(10), |s| s.1 < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} runs entered the gate",
            guard.1
        );
    }

    fn pass(&self, requests: usize) {
        let mut s = self.lock();
        s.1 += requests;
        self.cv.notify_all();
        let _s = self.cv.wait_while(s, |s| !s.0).unwrap();
    }
}

fn f32_spec(name: &str) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype: DType::F32,
        dims: vec![DimRange::new(1, 8), DimRange::new(1, 1024)],
    }
}

/// y = x + 1 on F32 tensors of shape [1..8, 1..1024]; optionally waits on a gate,
/// and optionally logs the first input value of every request it runs, in order.
pub struct AddOne {
    info: ModelInfo,
    gate: Option<Arc<Gate>>,
    log: Option<Arc<Mutex<Vec<f32>>>>,
}

impl AddOne {
    pub fn new(id: u32, name: &str, gate: Option<Arc<Gate>>) -> Self {
        AddOne {
            info: ModelInfo {
                id,
                name: name.into(),
                max_batch: 4,
                inputs: vec![f32_spec("x")],
                outputs: vec![f32_spec("y")],
            },
            gate,
            log: None,
        }
    }

    /// Logs the first input value of each request it runs into `log`.
    pub fn logging(mut self, log: Arc<Mutex<Vec<f32>>>) -> Self {
        self.log = Some(log);
        self
    }

    fn run_one(req: &mut RequestTensors<'_>) -> RequestOutcome {
        let input = &req.inputs[0];
        let shape: Shape = input.desc.shape;
        let mut bytes = vec![0u8; input.data.len()];
        input.data.read_slice(&mut bytes, 0).unwrap();
        let out: Vec<u8> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 1.0)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let buf = &req.outputs[0].buf;
        if out.len() > buf.len() {
            return Err(BackendError::OutputTooSmall {
                index: 0,
                needed: out.len() as u64,
                shapes: vec![shape],
            });
        }
        buf.write_slice(&out, 0).unwrap();
        Ok(vec![shape])
    }
}

impl Backend for AddOne {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        4
    }

    fn run(&self, batch: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome> {
        if let Some(gate) = &self.gate {
            gate.pass(batch.len());
        }
        if let Some(log) = &self.log {
            let mut log = log.lock().unwrap();
            for req in batch.iter() {
                let mut first = [0u8; 4];
                req.inputs[0].data.read_slice(&mut first, 0).unwrap();
                log.push(f32::from_le_bytes(first));
            }
        }
        batch.iter_mut().map(Self::run_one).collect()
    }
}

/// One tenant of a test daemon.
pub struct TenantOpts {
    pub name: &'static str,
    pub allowed: &'static str,
    pub max_in_flight: u32,
    pub queues: u16,
}

impl TenantOpts {
    pub fn new(name: &'static str, allowed: &'static str) -> Self {
        TenantOpts {
            name,
            allowed,
            max_in_flight: 64,
            queues: 1,
        }
    }
}

/// A running daemon with add-one (7), gated add-one (8) and secret add-one (9), or
/// with the models and tenants a test gives ([`Harness::custom`]).
pub struct Harness {
    pub daemon: Option<Daemon>,
    pub gate: Arc<Gate>,
    /// The config text the daemon was started with (`{dir}` replaced).
    pub text: String,
    /// The daemon's directory, removed once the daemon is shut down (fields drop after
    /// `Drop::drop`).
    tmp: TempDir,
}

/// A fresh temporary directory for one daemon, removed when dropped.
pub fn test_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ai-inferd-it-")
        .tempdir()
        .unwrap();
    // The daemon refuses a socket directory others may write (whatever the umask).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    dir
}

impl Harness {
    /// A daemon from `text` (a whole config; `{dir}` stands for the test's
    /// directory, where sockets go) serving `backends`.
    pub fn custom(text: &str, backends: Vec<Arc<dyn Backend>>) -> Harness {
        let tmp = test_dir();
        let text = text.replace("{dir}", &tmp.path().display().to_string());
        let config = Config::parse(&text).unwrap();
        let daemon = Daemon::start(&config, backends).unwrap();
        Harness {
            daemon: Some(daemon),
            gate: Arc::new(Gate::default()),
            text,
            tmp,
        }
    }

    /// The directory the daemon's sockets are in.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The running daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    pub fn start(executors: u32, tenants: &[TenantOpts]) -> Harness {
        let tmp = test_dir();
        let dir = tmp.path();
        let mut text =
            format!("[daemon]\nmodels = \"unused.toml\"\nexecutor_threads = {executors}\n");
        for t in tenants {
            text += &format!(
                "[[tenant]]\nname = \"{}\"\nsocket = \"{}\"\nallowed_models = {}\nmax_in_flight = {}\nnum_request_queues = {}\npriority_ceiling = \"interactive\"\n",
                t.name,
                dir.join(format!("{}.sock", t.name)).display(),
                t.allowed,
                t.max_in_flight,
                t.queues,
            );
        }
        let config = Config::parse(&text).unwrap();
        let gate = Arc::new(Gate::default());
        let backends: Vec<Arc<dyn Backend>> = vec![
            Arc::new(AddOne::new(ADD_ONE, "add-one", None)),
            Arc::new(AddOne::new(GATED, "gated", Some(gate.clone()))),
            Arc::new(AddOne::new(SECRET, "secret", None)),
        ];
        let daemon = Daemon::start(&config, backends).unwrap();
        Harness {
            daemon: Some(daemon),
            gate,
            text,
            tmp,
        }
    }

    pub fn socket(&self, tenant: &str) -> PathBuf {
        self.dir().join(format!("{tenant}.sock"))
    }

    pub fn connect(&self, tenant: &str) -> TestFrontend {
        self.connect_with(tenant, FrontendOptions::default())
    }

    pub fn connect_with(&self, tenant: &str, options: FrontendOptions) -> TestFrontend {
        TestFrontend::connect(&self.socket(tenant), options).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Never leave a test blocked on the gate.
        self.gate.open();
        if let Some(d) = self.daemon.take() {
            d.shutdown();
        }
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// An add-one style request: input [1, n], output [1, n] with exact capacity.
pub fn add_one_request(id: u64, model: u32, n: u64) -> Request {
    Request::infer(
        id,
        model,
        vec![TensorDesc::input(DType::F32, &[1, n]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[1, n], 4 * n).unwrap()],
    )
    .unwrap()
}
