//! `aivmm`: launches one tenant microVM from a TOML config.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kvm_ioctls::Kvm;
use vmm::cli::Cli;
use vmm::config::VmConfig;
use vmm::exit_code;
use vmm::host::SysfsHost;
use vmm::vcpu::StopReason;

/// A minimal stderr logger: `aivmm: <level>: message`.
struct StderrLogger;

/// vfio-ioctls warns "Could not get VFIO IRQ info for index N" for every optional IRQ
/// index a device lacks, on every start: harmless, so that one message is shown only at
/// info. Its other warnings (failed region reads/writes) stay warnings.
fn level_of(r: &log::Record) -> log::Level {
    let optional_irq_index = r.level() == log::Level::Warn
        && r.target().starts_with("vfio_ioctls")
        && r.args()
            .as_str()
            .map_or_else(|| r.args().to_string(), str::to_owned)
            .starts_with("Could not get VFIO IRQ info");
    if optional_irq_index {
        log::Level::Info
    } else {
        r.level()
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        let level = level_of(r);
        if level <= log::max_level() {
            eprintln!("aivmm: {}: {}", level.as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn fail(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("aivmm: error: {msg}");
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit_code::BAD_INPUT as u8);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(cli.log_level);

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
        Err(e) => {
            return fail(
                exit_code::RUNTIME_ERROR,
                format!("cannot open /dev/kvm: {e}"),
            )
        }
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
            ExitCode::from(code as u8)
        }
        Err(e) if e.is_config_error() => fail(exit_code::BAD_INPUT, e),
        Err(e) => fail(exit_code::RUNTIME_ERROR, e),
    }
}
