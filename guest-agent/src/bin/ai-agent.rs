//! `ai-agent`: the guest's command line for the ai_infer device.
//!
//! `models`, `infer`, `trace` and `bench` go through the agent daemon when its socket
//! exists, else drive the device directly (exclusively). `daemon` owns the device and
//! serves the other guest processes (started by the guest's init). `serve` is an
//! inference HTTP endpoint (Open Inference Protocol, OpenAI embeddings) over TCP and
//! vsock, reaching the device the same way.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{latency_bucket_bounds_ns, ModelInfo, PriorityClass, Status, TensorDesc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use guest_agent::api::{Agent, AgentOptions, Buffer, InferResult, Mode};
use guest_agent::dma::{DmaPool, HUGE_PAGE_SIZE};
use guest_agent::engine::{Engine, EngineOptions, InferOptions};
use guest_agent::ipc::{Daemon, DaemonOptions, SessionMemory, DEFAULT_SOCKET};
use guest_agent::serve::{self, Limits, ListenAddr, ServeOptions};
use guest_agent::tensor_io::{f32_values, input_desc, output_desc, parse_dtype, parse_shape};

#[path = "ai-agent/garbage.rs"]
mod garbage;

#[derive(Parser, Debug)]
#[command(
    name = "ai-agent",
    version,
    about = "Guest agent for the aivmm ai_infer device"
)]
struct Cli {
    /// The agent daemon's socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Drive the device from this process even if the daemon's socket exists.
    #[arg(long, global = true, conflicts_with = "via_daemon")]
    direct: bool,
    /// Require the daemon.
    #[arg(long = "via-daemon", global = true)]
    via_daemon: bool,
    /// PCI address of the device (default: the first 1af4:107c function).
    #[arg(long, global = true)]
    bdf: Option<String>,
    /// MiB of huge pages for the device owner's DMA pool (default 16 direct, 4 daemon).
    #[arg(long, global = true)]
    pool_mb: Option<usize>,
    /// MiB of shared tensor memory to ask the daemon for (default 2, serve 8).
    #[arg(long, global = true)]
    session_mb: Option<usize>,
    /// Seconds to wait for the device's host backend to connect.
    #[arg(long, global = true, default_value_t = 60)]
    connect_timeout: u64,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the models this tenant may use.
    Models,
    /// Run one inference and print a summary.
    Infer(InferArgs),
    /// Print guest-side and device-side counters.
    Trace,
    /// Run the same inference N times and print latency and throughput.
    Bench {
        #[command(flatten)]
        infer: InferArgs,
        /// Requests to run.
        #[arg(short = 'n', long, default_value_t = 100)]
        count: u64,
        /// Threads submitting at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Hostile-driver probe: submit malformed chains directly (needs the device, so
    /// not while the agent daemon owns it), report each answer, then check the device
    /// still serves this tenant. For tests of the device's validation.
    Garbage,
    /// Serve inference over HTTP (Open Inference Protocol, OpenAI embeddings).
    Serve(ServeArgs),
    /// Own the device and serve other guest processes on the socket.
    Daemon {
        /// Largest session a client may ask for, in MiB.
        #[arg(long, default_value_t = 64)]
        max_session_mb: usize,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Priority {
    Batch,
    Normal,
    Interactive,
    Realtime,
}

impl From<Priority> for PriorityClass {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Batch => PriorityClass::Batch,
            Priority::Normal => PriorityClass::Normal,
            Priority::Interactive => PriorityClass::Interactive,
            Priority::Realtime => PriorityClass::Realtime,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct InferArgs {
    /// Model name or id.
    #[arg(long)]
    model: String,
    /// Input file: UTF-8 text for text models, raw little-endian tensor bytes otherwise.
    #[arg(long)]
    input: PathBuf,
    /// Element type of the input (default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Input shape, e.g. 1,4 (required for non-text models).
    #[arg(long)]
    shape: Option<String>,
    /// Where to write output 0's raw bytes (output k > 0 goes to FILE.k).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Scheduling class.
    #[arg(long, value_enum, default_value = "normal")]
    priority: Priority,
    /// Deadline in µs (0 = none).
    #[arg(long, default_value_t = 0)]
    deadline_us: u64,
    /// Largest output buffer in bytes (default: the device limit split over outputs,
    /// at most 64 MiB each).
    #[arg(long)]
    output_bytes: Option<u64>,
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Where to listen: tcp:HOST:PORT or vsock:PORT (repeatable).
    #[arg(long = "listen", required = true)]
    listen: Vec<ListenAddr>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: u64,
    /// Largest request head (request line and headers) in bytes.
    #[arg(long, default_value_t = 16 << 10)]
    max_header_bytes: usize,
    /// Most header fields in a request.
    #[arg(long, default_value_t = 64)]
    max_headers: usize,
    /// Most connections served at once; more get 503.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Seconds a client has to send a whole request once it started.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Seconds an open connection may wait between requests.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
}

/// Errors are printed once, by main.
type CliResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Log lines to stderr, filtered by `log::max_level` (set from -v).
struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("ai-agent: {}: {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn engine_options(cli: &Cli, default_pool_mb: usize) -> EngineOptions {
    let mut o = EngineOptions {
        bdf: cli.bdf.clone(),
        pool_bytes: cli.pool_mb.unwrap_or(default_pool_mb) << 20,
        ..EngineOptions::default()
    };
    o.device.connect_timeout = Duration::from_secs(cli.connect_timeout);
    o
}

fn open_agent(cli: &Cli) -> CliResult<Agent> {
    let mode = if cli.direct {
        Mode::Direct
    } else if cli.via_daemon {
        Mode::Daemon
    } else {
        Mode::Auto
    };
    let options = AgentOptions {
        mode,
        socket: cli.socket.clone(),
        session_bytes: cli.session_mb.unwrap_or(match cli.command {
            Command::Serve(_) => 8,
            _ => 2,
        }) << 20,
        engine: engine_options(cli, 16),
    };
    Agent::open(&options).map_err(err)
}

fn print_models(agent: &Agent) -> CliResult<()> {
    for m in agent.ai_models().map_err(err)? {
        println!("{:>5}  {}  (max batch {})", m.id, m.name, m.max_batch);
        for (dir, specs) in [("in ", &m.inputs), ("out", &m.outputs)] {
            for s in specs {
                let dims: Vec<String> = s
                    .dims
                    .iter()
                    .map(|d| {
                        if d.is_fixed() {
                            d.min.to_string()
                        } else {
                            format!("{}..{}", d.min, d.max)
                        }
                    })
                    .collect();
                println!(
                    "       {dir} {:<16} {} [{}]",
                    s.name,
                    s.dtype,
                    dims.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// A prepared request: its buffers stay allocated for reuse (bench).
struct Prepared {
    model: ModelInfo,
    input_desc: TensorDesc,
    input: Buffer,
    outputs: Vec<(TensorDesc, Buffer)>,
    options: InferOptions,
}

fn prepare(agent: &Agent, a: &InferArgs) -> CliResult<Prepared> {
    let model = agent.find_model(&a.model).map_err(err)?;
    let data =
        std::fs::read(&a.input).map_err(|e| format!("Cannot read {}: {e}", a.input.display()))?;
    let dtype = a
        .dtype
        .as_deref()
        .map(parse_dtype)
        .transpose()
        .map_err(err)?;
    let shape = a
        .shape
        .as_deref()
        .map(parse_shape)
        .transpose()
        .map_err(err)?;
    let input_desc = input_desc(&model, dtype, shape.as_deref(), data.len() as u64).map_err(err)?;
    let mut input = agent.ai_alloc(data.len(), 0).map_err(err)?;
    input.as_mut_slice().copy_from_slice(&data);
    let config = agent.config();
    let per_output = (config.max_output_bytes / model.outputs.len().max(1) as u64).min(64 << 20);
    let cap = a.output_bytes.unwrap_or(per_output);
    let mut outputs = Vec::new();
    for spec in &model.outputs {
        let desc = output_desc(spec, cap).map_err(err)?;
        let buf = agent.ai_alloc(desc.data_len as usize, 0).map_err(err)?;
        outputs.push((desc, buf));
    }
    Ok(Prepared {
        model,
        input_desc,
        input,
        outputs,
        options: InferOptions {
            priority: a.priority.into(),
            deadline_us: a.deadline_us,
            request_id: None,
        },
    })
}

fn run(agent: &Agent, p: &mut Prepared) -> CliResult<InferResult> {
    let mut outs: Vec<(TensorDesc, &mut Buffer)> =
        p.outputs.iter_mut().map(|(d, b)| (*d, b)).collect();
    agent
        .ai_infer(
            p.model.id,
            &[(p.input_desc, &p.input)],
            &mut outs,
            &p.options,
        )
        .map_err(err)
}

fn infer_once(agent: &Agent, a: &InferArgs) -> CliResult<InferResult> {
    let mut p = prepare(agent, a)?;
    let mut res = run(agent, &mut p)?;
    // Outputs larger than the signature promised: resize to what the device asks.
    if res.status == Status::BufferTooSmall && res.outputs.len() == p.outputs.len() {
        for ((desc, buf), needed) in p.outputs.iter_mut().zip(&res.outputs) {
            if needed.data_len > desc.data_len {
                desc.data_len = needed.data_len;
                *buf = agent.ai_alloc(needed.data_len as usize, 0).map_err(err)?;
            }
        }
        res = run(agent, &mut p)?;
    }
    println!(
        "status {}{}  queue {:.1} µs  compute {:.1} µs  batch {}  request {}",
        res.status,
        res.detail
            .map_or(String::new(), |d| format!(" (tensor {d})")),
        res.queue_ns as f64 / 1e3,
        res.compute_ns as f64 / 1e3,
        res.batch_size,
        res.request_id
    );
    for (k, shape) in res.outputs.iter().enumerate() {
        let bytes =
            &p.outputs[k].1.as_slice()[..(shape.data_len as usize).min(p.outputs[k].1.len())];
        print!(
            "output {k}: {} {} ({} bytes)",
            shape.dtype, shape.shape, shape.data_len
        );
        if res.status == Status::Ok && shape.dtype == ai_infer_protocol::DType::F32 {
            let v = f32_values(bytes, 8);
            let more = if shape.data_len > 32 { ", ..." } else { "" };
            print!(
                "  [{}{more}]",
                v.iter()
                    .map(|x| format!("{x:.6}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!();
        if let (Some(path), Status::Ok) = (&a.output, res.status) {
            let path = if k == 0 {
                path.clone()
            } else {
                PathBuf::from(format!("{}.{k}", path.display()))
            };
            std::fs::write(&path, bytes)
                .map_err(|e| format!("Cannot write {}: {e}", path.display()))?;
        }
    }
    Ok(res)
}

fn print_trace(agent: &Agent) -> CliResult<()> {
    let t = agent.ai_trace().map_err(err)?;
    let g = t.guest;
    println!(
        "guest:  submitted {}  completed {}  driver errors {}  device resets {}  in {} B  out {} B",
        g.submitted, g.completed, g.driver_errors, g.device_resets, g.bytes_in, g.bytes_out
    );
    println!(
        "        polling: {} spins, {} yields, {} sleeps",
        g.spins, g.yields, g.sleeps
    );
    let d = t.device;
    println!(
        "device: uptime {:.3} s  completed {}  in flight {} (max {})  in {} B  out {} B  batched {}  clamped {}",
        d.uptime_ns as f64 / 1e9,
        d.completed,
        d.in_flight,
        d.in_flight_max,
        d.bytes_in,
        d.bytes_out,
        d.batched,
        d.priority_clamped
    );
    if d.infer_status[0] > 0 {
        println!(
            "        mean queue {:.1} µs  mean compute {:.1} µs",
            d.queue_ns_total as f64 / d.infer_status[0] as f64 / 1e3,
            d.compute_ns_total as f64 / d.infer_status[0] as f64 / 1e3
        );
    }
    for (i, n) in d.infer_status.iter().enumerate().filter(|(_, n)| **n > 0) {
        let name = u32::try_from(i)
            .ok()
            .and_then(|s| Status::try_from(s).ok())
            .map_or("?", Status::name);
        println!("        status {name}: {n}");
    }
    println!("latency histogram (guest: submit to seen | device: queue + compute):");
    for b in 0..g.latency_hist.len() {
        let (gn, dn) = (g.latency_hist[b], d.latency_hist[b]);
        if gn + dn > 0 {
            let (lo, hi) = latency_bucket_bounds_ns(b);
            let hi = hi.map_or("inf".to_string(), |h| format!("{} µs", h / 1000));
            println!("  [{} µs, {hi}): guest {gn}  device {dn}", lo / 1000);
        }
    }
    Ok(())
}

fn bench(agent: Arc<Agent>, a: &InferArgs, count: u64, concurrency: usize) -> CliResult<()> {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let per_thread = count.div_ceil(concurrency as u64);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let agent = agent.clone();
            let a = a.clone();
            std::thread::spawn(move || -> CliResult<(Vec<u64>, u64)> {
                let mut p = prepare(&agent, &a)?;
                let mut lat = Vec::with_capacity(per_thread as usize);
                let mut failed = 0;
                for _ in 0..per_thread {
                    let t = Instant::now();
                    let r = run(&agent, &mut p)?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    if r.status != Status::Ok {
                        failed += 1;
                    }
                }
                Ok((lat, failed))
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut failed = 0;
    for w in workers {
        let (l, f) = w
            .join()
            .map_err(|_| "bench thread panicked".to_string())??;
        lat.extend(l);
        failed += f;
    }
    let wall = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    println!(
        "{} requests ({failed} not OK) in {:.3} s with {concurrency} thread(s): {:.1} req/s",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "latency µs: min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        pct(0.0),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

fn daemon(cli: &Cli, max_session_mb: usize) -> CliResult<()> {
    let options = engine_options(cli, 4);
    let engine = Engine::open(&options).map_err(err)?;
    let dir = options.hugetlbfs_dir.clone();
    let memory: Box<SessionMemory> = Box::new(move |bytes| DmaPool::hugetlb(bytes, &dir));
    let daemon = Daemon::new(
        Arc::new(engine),
        DaemonOptions {
            socket: cli.socket.clone(),
            max_session_bytes: (max_session_mb << 20).max(HUGE_PAGE_SIZE),
        },
        memory,
    );
    Arc::new(daemon).run().map_err(err)
}

fn serve(agent: Agent, a: &ServeArgs) -> CliResult<()> {
    let options = ServeOptions {
        limits: Limits {
            max_head_bytes: a.max_header_bytes.max(256),
            max_headers: a.max_headers.max(1),
            max_body_bytes: a.max_body_bytes,
            request_timeout: Duration::from_secs(a.request_timeout.max(1)),
            idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
            write_timeout: Duration::from_secs(a.request_timeout.max(1)),
        },
        max_connections: a.max_connections.max(1),
        ..ServeOptions::default()
    };
    serve::run(Arc::new(agent), &a.listen, options).map_err(err)
}

fn run_garbage(cli: &Cli) -> CliResult<ExitCode> {
    let engine = Engine::open(&engine_options(cli, 16)).map_err(|e| e.to_string())?;
    let (passed, total) = garbage::run(&engine)?;
    // After all that, the device must still answer a well-formed request.
    let models = engine.models().map_err(|e| e.to_string())?;
    println!(
        "GARBAGE-DONE passed={passed} of={total} models_after={}",
        models.len()
    );
    Ok(if passed == total && !models.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    let result = match &cli.command {
        Command::Daemon { max_session_mb } => {
            daemon(&cli, *max_session_mb).map(|_| ExitCode::SUCCESS)
        }
        Command::Garbage => run_garbage(&cli),
        command => open_agent(&cli).and_then(|agent| match command {
            Command::Models => print_models(&agent).map(|_| ExitCode::SUCCESS),
            Command::Trace => print_trace(&agent).map(|_| ExitCode::SUCCESS),
            Command::Infer(a) => infer_once(&agent, a).map(|r| {
                if r.status == Status::Ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                }
            }),
            Command::Bench {
                infer,
                count,
                concurrency,
            } => bench(Arc::new(agent), infer, *count, *concurrency).map(|_| ExitCode::SUCCESS),
            Command::Serve(a) => serve(agent, a).map(|_| ExitCode::SUCCESS),
            Command::Daemon { .. } | Command::Garbage => Ok(ExitCode::SUCCESS),
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ai-agent: {e}");
        ExitCode::FAILURE
    })
}
