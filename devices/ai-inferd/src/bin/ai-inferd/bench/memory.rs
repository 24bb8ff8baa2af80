//! The memory figure: a daemon process serving N tenants from one model instance,
//! measured from `/proc/<pid>/status` while every tenant's VMM (a test frontend in
//! the benchmark process) is connected and has been served.
//!
//! The daemon runs as a child process (`ai-inferd bench-daemon`) so that its
//! resident memory is not mixed with the frontends' "guest memory". It reports
//! `VmRSS` and its parts; the daemon's own memory is `RssAnon + RssFile` — guest
//! pages it touched while reading inputs and writing outputs are `RssShmem`, the
//! VMs' memory mapped a second time, not memory the daemon adds.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ai_infer_protocol::PriorityClass;
use ai_infer_test_frontend::load::{self, Load, Pattern};
use ai_inferd::backend::synthetic::SyntheticModel;
use ai_inferd::backend::Backend;

use super::{BenchDaemon, BenchError, TenantDef};

/// The model id the memory daemon serves.
pub const MODEL: u32 = 60;

/// Resident memory of a process, KiB, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`.
    pub total_kib: u64,
    /// `RssAnon`.
    pub anon_kib: u64,
    /// `RssFile`.
    pub file_kib: u64,
    /// `RssShmem`.
    pub shmem_kib: u64,
}

impl Rss {
    /// Parses the fields of a `/proc/<pid>/status` text; `None` if one is missing.
    pub fn parse(status: &str) -> Option<Rss> {
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Rss {
            total_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:")?,
            file_kib: field("RssFile:")?,
            shmem_kib: field("RssShmem:")?,
        })
    }

    /// Memory the process itself adds: anonymous and file-backed pages.
    pub fn own_kib(&self) -> u64 {
        self.anon_kib + self.file_kib
    }
}

/// What a child daemon (`ai-inferd bench-daemon`) serves.
#[derive(Clone, Copy, Debug)]
pub struct ChildSpec {
    /// Tenants `m0`, `m1`, ….
    pub tenants: u32,
    /// Weights its one synthetic model holds, MiB.
    pub weights_mib: u32,
    /// The model's fixed time per batch, µs (a tenth of it more per request).
    pub work_us: u64,
    /// Its seccomp filters on, as `serve` runs.
    pub seccomp: bool,
}

/// The child side (`ai-inferd bench-daemon`): serves `spec` in `dir`, prints `ready` and
/// runs until its stdin closes.
pub fn serve_child(dir: &Path, spec: ChildSpec) -> Result<(), BenchError> {
    let defs: Vec<TenantDef> = (0..spec.tenants)
        .map(|i| TenantDef::new(&format!("m{i}"), 1, "normal"))
        .collect();
    let model: Arc<dyn Backend> = Arc::new(
        SyntheticModel::new(
            MODEL,
            "weights",
            8,
            Duration::from_micros(spec.work_us),
            Duration::from_micros(spec.work_us / 10),
        )
        .with_weights(spec.weights_mib as usize * (1 << 20)),
    );
    if spec.seccomp {
        ai_inferd::seccomp::enable()
            .map_err(|e| BenchError::Check(format!("seccomp filters: {e}")))?;
    }
    let daemon = BenchDaemon::start_in(dir.to_owned(), 1, 0, &defs, vec![model])?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").map_err(BenchError::Io)?;
    out.flush().map_err(BenchError::Io)?;
    drop(out);
    // Until the parent closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
    drop(daemon);
    Ok(())
}

/// A child daemon; killed if dropped before [`ChildDaemon::finish`].
pub struct ChildDaemon {
    child: Child,
}

impl ChildDaemon {
    /// Starts `exe bench-daemon` serving `spec` in `dir` and waits until it is ready.
    pub fn start(exe: &Path, dir: &Path, spec: ChildSpec) -> Result<Self, BenchError> {
        let mut cmd = Command::new(exe);
        cmd.arg("bench-daemon")
            .arg("--dir")
            .arg(dir)
            .arg("--tenants")
            .arg(spec.tenants.to_string())
            .arg("--weights-mib")
            .arg(spec.weights_mib.to_string())
            .arg("--work-us")
            .arg(spec.work_us.to_string());
        if spec.seccomp {
            cmd.arg("--seccomp");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(BenchError::Io)?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(BenchError::Io)?;
        }
        let daemon = ChildDaemon { child };
        if line.trim() != "ready" {
            return Err(BenchError::Check(format!(
                "the benchmark daemon did not start (said {:?})",
                line.trim()
            )));
        }
        Ok(daemon)
    }

    fn rss(&self) -> Result<Rss, BenchError> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = std::fs::read_to_string(&path).map_err(BenchError::Io)?;
        Rss::parse(&text).ok_or_else(|| BenchError::Check(format!("no RSS fields in {path}")))
    }

    /// Closes its stdin and waits: it must exit 0.
    pub fn finish(mut self) -> Result<(), BenchError> {
        drop(self.child.stdin.take());
        let status = self.child.wait().map_err(BenchError::Io)?;
        if !status.success() {
            return Err(BenchError::Check(format!(
                "the benchmark daemon exited with {status}"
            )));
        }
        Ok(())
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `exe bench-daemon` with `tenants` tenants, drives every tenant for
/// `duration` and returns the daemon's resident memory with all of them connected.
pub fn measure(
    exe: &Path,
    dir: PathBuf,
    tenants: u32,
    weights_mib: u32,
    duration: Duration,
) -> Result<Rss, BenchError> {
    std::fs::create_dir_all(&dir).map_err(BenchError::Io)?;
    let spec = ChildSpec {
        tenants,
        weights_mib,
        work_us: 1_000,
        seccomp: false,
    };
    let child = ChildDaemon::start(exe, &dir, spec)?;
    let loads: Vec<Load> = (0..tenants)
        .map(|i| Load {
            socket: dir.join(format!("m{i}.sock")),
            model: MODEL,
            class: PriorityClass::Normal,
            pattern: Pattern::Closed { depth: 4 },
            deadline_us: 0,
        })
        .collect();
    let running = load::spawn(&loads, duration)?;
    running.sleep_until(duration);
    // Every tenant is connected and has been served: measure before they leave.
    let rss = child.rss();
    let runs = running.join()?;
    child.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    for (i, run) in runs.iter().enumerate() {
        if run.ok_after(Duration::ZERO).next().is_none() {
            return Err(BenchError::Check(format!(
                "memory tenant m{i} was never served"
            )));
        }
    }
    rss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let text = "Name:\tx\nVmRSS:\t  1000 kB\nRssAnon:\t 600 kB\nRssFile:\t 300 kB\nRssShmem:\t 100 kB\n";
        let rss = Rss::parse(text).unwrap();
        assert_eq!(
            (rss.total_kib, rss.own_kib(), rss.shmem_kib),
            (1000, 900, 100)
        );
        assert_eq!(Rss::parse("VmRSS: 1 kB\n"), None);
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(Rss::parse(&me).unwrap().total_kib > 0);
    }
}
