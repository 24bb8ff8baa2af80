//! `aivmm`: launches one tenant microVM from a TOML config, or from Firecracker's JSON
//! config and control API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use kvm_ioctls::Kvm;
use vmm::api::backend::{self, Ended};
use vmm::api::routes::Request;
use vmm::api::types::{ActionType, FullVmConfiguration};
use vmm::api::{convert, ApiServer, Controller};
use vmm::cli::Cli;
use vmm::config::VmConfig;
use vmm::exit_code;
use vmm::host::SysfsHost;
use vmm::vcpu::StopReason;

/// /dev/kvm could not be opened: a runtime error.
fn no_kvm(e: &kvm_ioctls::Error) -> ExitCode {
    fail(
        exit_code::RUNTIME_ERROR,
        format!("cannot open /dev/kvm: {e}"),
    )
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("aivmm: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit_code::BAD_INPUT);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    vmm::logger::init(cli.log_level);
    if cli.no_seccomp {
        log::warn!("seccomp filters are off (--no-seccomp)");
    } else if let Err(e) = vmm::seccomp::enable() {
        return fail(exit_code::RUNTIME_ERROR, e);
    }
    if cli.api_sock.is_some() || cli.config_file.is_some() {
        return run_with_api(&cli, start);
    }

    let mut config = match &cli.config {
        Some(path) => match VmConfig::load(path) {
            Ok(c) => c,
            Err(e) => return fail(exit_code::BAD_INPUT, e),
        },
        None => VmConfig::default(),
    };
    config.apply(&cli.overrides());

    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return no_kvm(&e),
    };
    let host = SysfsHost::default();
    let validated = match config.validate(&host, kvm.get_max_vcpus()) {
        Ok(v) => v,
        Err(e) => return fail(exit_code::BAD_INPUT, e),
    };
    for w in &validated.warnings {
        log::warn!("{w}");
    }
    if let Some(bytes) = validated.memlock_raise {
        if let Err(e) = vmm::passthrough::raise_memlock(bytes) {
            return fail(exit_code::BAD_INPUT, e);
        }
    }

    match vmm::vm::run(&validated, &kvm, &host, start) {
        Ok(reason) => {
            let code = reason.exit_code();
            match &reason {
                StopReason::VcpuError(msg) => return fail(code, msg),
                // Always said: an exit code of 0 alone does not tell a poweroff from a
                // triple fault, and operators (and the rig) need to know which.
                other => eprintln!("aivmm: VM stopped: {other}"),
            }
            ExitCode::from(code)
        }
        Err(e) if e.is_config_error() => fail(exit_code::BAD_INPUT, e),
        Err(e) => fail(exit_code::RUNTIME_ERROR, e),
    }
}

/// Ends with the VM's stop reason, as the TOML path does.
fn stopped(reason: StopReason) -> ExitCode {
    let code = reason.exit_code();
    match &reason {
        StopReason::VcpuError(msg) => return fail(code, msg),
        other => eprintln!("aivmm: VM stopped: {other}"),
    }
    ExitCode::from(code)
}

/// Removes the API socket when aivmm ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// CPU time (user + system) this process has used, in microseconds.
fn cpu_time_us() -> u64 {
    // SAFETY: getrusage fills the zero-initialised struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to that struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// Reads `--config-file`: the VM's config, its passthrough ids, and the logger and
/// metrics sections.
fn load_json(path: &Path) -> Result<(VmConfig, Vec<String>, FullVmConfiguration), String> {
    let full = convert::load_config_file(&path.to_path_buf())?;
    let (cfg, ids) = convert::vm_config(&full)
        .map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    Ok((cfg, ids, full))
}

/// The API path: `--api-sock` and/or `--config-file`. The controller owns the config; the
/// main thread owns the VM once a start request (from the socket, or from the config
/// file) has been validated.
fn run_with_api(cli: &Cli, start: Instant) -> ExitCode {
    let (mut config, passthrough_ids, full) = match (&cli.config_file, &cli.config) {
        (Some(path), _) => match load_json(path) {
            Ok(v) => v,
            Err(e) => return fail(exit_code::BAD_INPUT, e),
        },
        (None, Some(path)) => match VmConfig::load(path) {
            Ok(c) => (c, Vec::new(), FullVmConfiguration::default()),
            Err(e) => return fail(exit_code::BAD_INPUT, e),
        },
        (None, None) => (
            convert::default_config(),
            Vec::new(),
            FullVmConfiguration::default(),
        ),
    };
    config.apply(&cli.overrides());

    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return no_kvm(&e),
    };
    let (link, owner) = match backend::link() {
        Ok(l) => l,
        Err(e) => {
            return fail(
                exit_code::RUNTIME_ERROR,
                format!("cannot set up the API: {e}"),
            )
        }
    };
    let mut controller = Controller::new(
        cli.id.clone(),
        config,
        SysfsHost::default(),
        kvm.get_max_vcpus(),
        Box::new(link),
    );
    controller.set_passthrough_ids(passthrough_ids);
    // The config file's logger and metrics go through the same requests as the API's.
    let mut setup = Vec::new();
    if let Some(l) = full.logger.clone() {
        setup.push(Request::PutLogger(l));
    }
    if let Some(m) = full.metrics.clone() {
        setup.push(Request::PutMetrics(m));
    }
    for req in setup {
        let r = controller.handle(req);
        if r.status >= 400 {
            return fail(
                exit_code::BAD_INPUT,
                format!("config file: {}", r.body.unwrap_or_default()),
            );
        }
    }
    let controller = Arc::new(Mutex::new(controller));

    let mut _socket = None;
    let mut _server = None;
    if let Some(path) = &cli.api_sock {
        let listener = match vmm::api::bind(path) {
            Ok(l) => l,
            Err(e) => return fail(exit_code::BAD_INPUT, e),
        };
        _socket = Some(SocketFile(path.clone()));
        match ApiServer::spawn(listener, controller.clone()) {
            Ok(s) => _server = Some(s),
            Err(e) => {
                return fail(
                    exit_code::RUNTIME_ERROR,
                    format!("cannot serve the API: {e}"),
                )
            }
        }
        let wall_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let cpu_us = cpu_time_us();
        {
            let mut c = controller.lock().unwrap_or_else(|e| e.into_inner());
            c.set_gauge("api_server.process_startup_time_us", wall_us);
            c.set_gauge("api_server.process_startup_time_cpu_us", cpu_us);
        }
        log::info!(
            "API socket {} ready {} us after start ({} us of CPU)",
            path.display(),
            wall_us,
            cpu_us
        );
    }

    // With a config file the VM starts at once; a failure ends aivmm (exit 2). The owner
    // waits on this thread's start request, so the exit happens here, and the socket file,
    // which the main thread's guard would remove, goes first.
    if cli.config_file.is_some() {
        let ctl = controller.clone();
        let socket_path = cli.api_sock.clone();
        let starter = devices::thread::named("config-start").spawn(move || {
            if let Err(e) = vmm::seccomp::apply(vmm::seccomp::ThreadKind::ConfigStart) {
                eprintln!("aivmm: error: {e}");
                std::process::exit(i32::from(exit_code::RUNTIME_ERROR));
            }
            let r = ctl
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handle(Request::PutAction(ActionType::InstanceStart));
            if r.status >= 400 {
                let msg =
                    serde_json::from_str::<serde_json::Value>(r.body.as_deref().unwrap_or("{}"))
                        .ok()
                        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                eprintln!("aivmm: error: {msg}");
                if let Some(p) = socket_path {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(i32::from(exit_code::BAD_INPUT));
            }
        });
        if let Err(e) = starter {
            return fail(
                exit_code::RUNTIME_ERROR,
                format!("cannot start the VM: {e}"),
            );
        }
    }

    let host = SysfsHost::default();
    match owner.run(&kvm, &host, start) {
        Ok(Ended::Stopped(reason)) => stopped(reason),
        Ok(Ended::SignalBeforeStart(sig)) => {
            eprintln!("aivmm: stopped before the VM started: signal {sig}");
            ExitCode::SUCCESS
        }
        Err(e) if e.is_config_error() => fail(exit_code::BAD_INPUT, e),
        Err(e) => fail(exit_code::RUNTIME_ERROR, e),
    }
}
