//! `ai-inferd`: the ai_infer host daemon and its operator tools.
//!
//! - `serve --config FILE`: serve every tenant socket. Logs go to stderr. SIGHUP
//!   re-reads the config and applies what may change live (see `reload`); SIGTERM
//!   or SIGINT disconnects every VMM, lets running batches finish and exits 0. A
//!   configuration that cannot be used exits 2 with one line on stderr; any other
//!   start-up failure exits 1.
//! - `top --metrics SOCKET`: a live view of a daemon's metrics endpoint.
//! - `bench`: the scheduler's figures, the paravirtual path's overhead and isolation
//!   under attack, against an in-process daemon.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ai_inferd::config::Config;
use ai_inferd::daemon::{Daemon, DaemonError};
use ai_inferd::metrics::scrape::Scrape;
use ai_inferd::metrics::{self, MetricsEndpoint};
use ai_inferd::models::Manifest;
use ai_inferd::privilege::RunAs;
use clap::{Parser, Subcommand};
use log::{info, LevelFilter};

use bench::{BenchOptions, Phase};

mod bench;
mod top;

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
        /// Start as root, then run as this user (`UID:GID`, numeric) once the models are
        /// loaded and the tenant sockets bound, with no-new-privs. The metrics socket and
        /// sockets of tenants added by a reload are created as that user.
        #[arg(long, value_name = "UID:GID")]
        run_as: Option<RunAs>,
        /// Run without the per-thread seccomp filters (for debugging only; see
        /// docs/security.md).
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Show a daemon's tenants and models live, from its metrics endpoint.
    Top {
        /// The daemon's `metrics_socket`: a unix socket path or tcp:127.0.0.1:PORT.
        #[arg(long)]
        metrics: MetricsEndpoint,
        /// Time between frames, in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        interval_ms: u64,
        /// Print one frame (totals since the tenants connected) without ANSI codes.
        #[arg(long)]
        once: bool,
    },
    /// Measure the scheduler's figures (fairness, isolation, deadlines, batching,
    /// decision time, memory) with synthetic tenants on a synthetic model, the
    /// paravirtual path's overhead and isolation under attack.
    Bench {
        /// Length of each measured load, in seconds.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(3..=600))]
        seconds: u64,
        /// Skip the memory and seccomp figures (which start this program as daemon
        /// processes).
        #[arg(long)]
        no_memory: bool,
        /// Model weights held by the memory figure's daemon, MiB.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=4096))]
        weights_mib: u32,
        /// Run only these phases (comma-separated: fairness, isolation, deadlines,
        /// batching, decision, memory, overhead, containment, seccomp); all by default.
        #[arg(long, value_delimiter = ',', value_parser = |s: &str| s.parse::<Phase>())]
        only: Vec<Phase>,
    },
    /// The memory figure's daemon process (started by `bench`).
    #[command(hide = true)]
    BenchDaemon {
        /// Directory for the tenant sockets.
        #[arg(long)]
        dir: PathBuf,
        /// Tenants m0, m1, ….
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        tenants: u32,
        /// Model weights, MiB.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
        weights_mib: u32,
        /// The model's fixed time per batch, µs.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        work_us: u64,
        /// With the seccomp filters on.
        #[arg(long)]
        seccomp: bool,
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

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread so that only `sigwait` sees
/// them.
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    loop {
        // SAFETY: `set` is an initialised sigset_t and `signal` a valid out pointer.
        let rc = unsafe { libc::sigwait(set, &mut signal) };
        if rc == 0 {
            return signal;
        }
    }
}

fn serve(config_path: &Path, run_as: Option<RunAs>, filters: bool) -> ExitCode {
    // First: loading the models runs the backends, which may start their thread pools.
    fix_backend_threads();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(2);
        }
    };
    // Blocked before any thread starts, so every thread inherits the mask.
    let signals = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ai-inferd: cannot block SIGTERM/SIGINT/SIGHUP: {e}");
            return ExitCode::from(1);
        }
    };
    let loaded =
        Manifest::read(&config.daemon.models).and_then(|m| Ok((m.load_backends()?, m.serving())));
    let (backends, serving) = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(1);
        }
    };
    // Before the daemon starts a thread: each installs its own filter first.
    if !filters {
        log::warn!("seccomp filters are off (--no-seccomp)");
    } else if let Err(e) = ai_inferd::seccomp::enable() {
        eprintln!("ai-inferd: {e}");
        return ExitCode::from(1);
    }
    let daemon = match Daemon::start_serving_as(&config, backends, serving, run_as) {
        Ok(d) => d,
        Err(e @ (DaemonError::Registry(_) | DaemonError::Numa(_) | DaemonError::Privilege(_))) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ai-inferd: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        let signal = wait_for_signal(&signals);
        if signal == libc::SIGHUP {
            // Logs one line either way; a refused reload keeps the running config.
            let _ = daemon.reload_from_source();
            continue;
        }
        info!("signal {signal}: shutting down");
        break;
    }
    daemon.shutdown();
    ExitCode::SUCCESS
}

/// candle asks for its thread count on every matrix product and, unless
/// `RAYON_NUM_THREADS` gives it, works it out from /proc/cpuinfo and /sys each time. It
/// is worked out here once, while the process has one thread, so that executors do not
/// read those files for every batch (rayon's pool takes the same count).
fn fix_backend_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

fn top(endpoint: &MetricsEndpoint, interval: Duration, once: bool) -> ExitCode {
    let source = endpoint.to_string();
    let wait = Duration::from_secs(5);
    let scrape = || -> Result<Scrape, String> {
        let text = metrics::fetch(endpoint, "", wait).map_err(|e| e.to_string())?;
        Scrape::parse(&text).map_err(|e| e.to_string())
    };
    if once {
        return match scrape() {
            Ok(now) => {
                print!(
                    "{}",
                    top::render(&top::frame(&now, None, None), &source, false)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ai-inferd top: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut previous: Option<(Scrape, Instant)> = None;
    loop {
        let taken = Instant::now();
        let text = match scrape() {
            Ok(now) => {
                let window = previous.as_ref().map(|(_, at)| taken.duration_since(*at));
                let before = previous.as_ref().map(|(s, _)| s);
                let text = top::render(&top::frame(&now, before, window), &source, true);
                previous = Some((now, taken));
                text
            }
            Err(e) => {
                previous = None;
                format!("\x1b[H\x1b[2Jai-inferd top  {source}\n\n{e}; retrying\n")
            }
        };
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        drop(out);
        std::thread::sleep(interval.saturating_sub(taken.elapsed()));
    }
}

fn run_bench(seconds: u64, no_memory: bool, weights_mib: u32, only: Vec<Phase>) -> ExitCode {
    if no_memory && (only.contains(&Phase::Memory) || only.contains(&Phase::Seccomp)) {
        eprintln!(
            "ai-inferd bench: --only memory or seccomp and --no-memory contradict each other"
        );
        return ExitCode::from(2);
    }
    let daemon_exe = if no_memory {
        None
    } else {
        match std::env::current_exe() {
            Ok(exe) => Some(exe),
            Err(e) => {
                eprintln!(
                    "ai-inferd bench: cannot find this program for its daemon processes: {e}"
                );
                return ExitCode::from(1);
            }
        }
    };
    let options = BenchOptions {
        phase: Duration::from_secs(seconds),
        warmup: Duration::from_secs(1),
        daemon_exe,
        weights_mib,
        only,
        ..BenchOptions::default()
    };
    match bench::run(&options) {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ai-inferd bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            log_level,
            run_as,
            no_seccomp,
        } => {
            let _ = log::set_logger(&LOGGER);
            log::set_max_level(log_level);
            serve(&config, run_as, !no_seccomp)
        }
        Command::Top {
            metrics,
            interval_ms,
            once,
        } => top(&metrics, Duration::from_millis(interval_ms), once),
        Command::Bench {
            seconds,
            no_memory,
            weights_mib,
            only,
        } => {
            // VMMs (the load generator's frontends) come and go between phases.
            let _ = log::set_logger(&LOGGER);
            log::set_max_level(LevelFilter::Error);
            run_bench(seconds, no_memory, weights_mib, only)
        }
        Command::BenchDaemon {
            dir,
            tenants,
            weights_mib,
            work_us,
            seccomp,
        } => {
            let _ = log::set_logger(&LOGGER);
            log::set_max_level(LevelFilter::Error);
            let spec = bench::memory::ChildSpec {
                tenants,
                weights_mib,
                work_us,
                seccomp,
            };
            match bench::memory::serve_child(&dir, spec) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ai-inferd bench-daemon: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
