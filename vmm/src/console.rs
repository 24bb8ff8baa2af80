//! The host end of the guest's serial console: where output goes and how host stdin
//! becomes guest input.

use std::fs::OpenOptions;
use std::io::{self, Write};

use vmm_sys_util::terminal::Terminal;

use crate::config::{ConsoleConfig, ConsoleMode};

/// Writes through immediately: the guest's prompt has no newline, and a console that holds
/// it back looks hung.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub fn output(cfg: &ConsoleConfig) -> io::Result<Box<dyn Write + Send>> {
    Ok(match (cfg.mode, &cfg.path) {
        (ConsoleMode::Stdout, _) => Box::new(Unbuffered(io::stdout())),
        (ConsoleMode::File, Some(path)) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        ),
        (ConsoleMode::File, None) | (ConsoleMode::Off, _) => Box::new(io::sink()),
    })
}

/// Puts a terminal stdin into raw mode for the VM's lifetime, so keystrokes (and ^C) reach
/// the guest; restores it on drop. Does nothing when stdin is not a terminal.
pub struct RawStdin {
    active: bool,
}

impl RawStdin {
    pub fn enable(console: &ConsoleConfig) -> Self {
        // SAFETY: isatty only inspects the fd.
        let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        let active =
            console.mode == ConsoleMode::Stdout && tty && io::stdin().lock().set_raw_mode().is_ok();
        RawStdin { active }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.active {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}
