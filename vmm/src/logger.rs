//! aivmm's own log: `aivmm: <level>: message` on stderr, or, once the control API's
//! `PUT /logger` asks for it, lines in a file (or named pipe) with the level and the
//! origin shown as asked.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

/// Where log lines go and how they look.
struct Output {
    /// `None`: stderr, in the classic `aivmm: level: message` form.
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
}

static OUTPUT: Mutex<Output> = Mutex::new(Output {
    file: None,
    show_level: true,
    show_origin: false,
});

struct VmmLogger;

static LOGGER: VmmLogger = VmmLogger;

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

impl log::Log for VmmLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        let level = level_of(r);
        if level > log::max_level() {
            return;
        }
        let mut out = OUTPUT.lock().unwrap_or_else(|e| e.into_inner());
        let (show_level, show_origin) = (out.show_level, out.show_origin);
        match &mut out.file {
            None => eprintln!("aivmm: {}: {}", level.as_str().to_lowercase(), r.args()),
            Some(f) => {
                let mut line = String::from("[aivmm");
                if let Some(name) = std::thread::current().name() {
                    line.push(':');
                    line.push_str(name);
                }
                line.push_str("] ");
                if show_level {
                    line.push_str(&format!("[{level}] "));
                }
                if show_origin {
                    line.push_str(&format!(
                        "[{}:{}] ",
                        r.file().unwrap_or("?"),
                        r.line().unwrap_or(0)
                    ));
                }
                // A full pipe or disk must not stop the VMM: the line is lost.
                let _ = writeln!(f, "{line}{}", r.args());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (stderr) at `level`; later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Sends the log to `file` from now on, at `level`.
pub fn redirect(file: File, level: log::LevelFilter, show_level: bool, show_origin: bool) {
    let mut out = OUTPUT.lock().unwrap_or_else(|e| e.into_inner());
    *out = Output {
        file: Some(file),
        show_level,
        show_origin,
    };
    init(level);
}
