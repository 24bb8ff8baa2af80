//! `ai-inferd serve --config FILE`: the ai_infer host daemon.
//!
//! Logs go to stderr. SIGTERM or SIGINT disconnects every VMM, lets running batches
//! finish and exits 0. A configuration that cannot be used exits 2 with one line on
//! stderr; any other start-up failure exits 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use ai_inferd::backend::Backend;
use ai_inferd::config::Config;
use ai_inferd::daemon::{Daemon, DaemonError};
use clap::{Parser, Subcommand};
use log::{info, LevelFilter};

#[derive(Parser)]
#[command(
    name = "ai-inferd",
    about = "Host daemon of the ai_infer virtio device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every tenant socket of the config until SIGTERM/SIGINT.
    Serve {
        /// The daemon config (TOML; see configs/ai-inferd.toml).
        #[arg(long)]
        config: PathBuf,
        /// Most verbose log level written to stderr.
        #[arg(long, default_value = "info", value_parser = parse_level)]
        log_level: LevelFilter,
    },
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?} (off, error, warn, info, debug, trace)"))
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "ai-inferd {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Loads the models manifest with the manifest loader (`models::load_models`).
#[cfg(has_model_loader)]
fn load_models(manifest: &Path) -> Result<Vec<Arc<dyn Backend>>, String> {
    ai_inferd::models::load_models(manifest).map_err(|e| e.to_string())
}

/// This build has no manifest loader (`src/models.rs`), so no model can be served.
#[cfg(not(has_model_loader))]
fn load_models(manifest: &Path) -> Result<Vec<Arc<dyn Backend>>, String> {
    Err(format!(
        "cannot load {}: this build has no model manifest loader (src/models.rs)",
        manifest.display()
    ))
}

/// SIGTERM and SIGINT, blocked in every thread so that only `sigwait` sees them.
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn wait_for_stop_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    loop {
        // SAFETY: `set` is an initialised sigset_t and `signal` a valid out pointer.
        let rc = unsafe { libc::sigwait(set, &mut signal) };
        if rc == 0 {
            return signal;
        }
    }
}

fn serve(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(2);
        }
    };
    // Blocked before any thread starts, so every thread inherits the mask.
    let signals = match block_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ai-inferd: cannot block SIGTERM/SIGINT: {e}");
            return ExitCode::from(1);
        }
    };
    let backends = match load_models(&config.daemon.models) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(1);
        }
    };
    let daemon = match Daemon::start(&config, backends) {
        Ok(d) => d,
        Err(e @ DaemonError::Registry(_)) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(1);
        }
    };
    let signal = wait_for_stop_signal(&signals);
    info!("signal {signal}: shutting down");
    daemon.shutdown();
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, log_level } => {
            let _ = log::set_logger(&LOGGER);
            log::set_max_level(log_level);
            serve(&config)
        }
    }
}
