//! The rig driver: runs `tests/rig/` once per test binary and keeps the parsed report.
//!
//! Steps (each failure becomes a message with the output that explains it):
//! 1. `tests/rig/deps.sh` installs QEMU, busybox-static, cpio and fetches the guest kernel;
//! 2. `tests/rig/host-can-boot-linux.sh` picks the mode: **direct** where this host's KVM can
//!    boot Linux, else **nested** (aivmm inside a QEMU TCG L1); `AIVMM_RIG=direct|nested`
//!    forces it;
//! 3. aivmm is built (`cargo build -p vmm --bin aivmm`) unless `AIVMM_BIN` names a binary
//!    (`make test` names the static release build, the one operators install);
//! 4. nested: `build-l1.sh` + `run-l1.sh` (one L1 boot runs every scenario; a lost L1 is
//!    booted again for the scenarios it did not finish, see [`boot_l1`]);
//!    direct: `run-direct.sh`;
//! 5. the console log is parsed into a [`RigReport`].
//!
//! Environment: `AIVMM_BIN`, `AIVMM_RIG`, `AIVMM_RIG_DIR` (work directory, default
//! `<repo>/target/rig`), `AIVMM_RIG_TIMEOUT` (seconds for each L1 boot, default 1500),
//! `AIVMM_RIG_L1_BOOTS` (L1 boots allowed when L1 is lost, default 2),
//! `AIVMM_AGENT` (a guest agent binary to put in the L2 initramfs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::report::{RigReport, ScenarioRun};

/// Lines of log shown with a failure.
pub const EXCERPT_LINES: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RigMode {
    /// aivmm runs inside a QEMU TCG L1 with nested KVM (hosts whose KVM cannot boot Linux).
    Nested,
    /// aivmm runs on this host (its KVM boots Linux).
    Direct,
}

/// A finished rig run.
#[derive(Debug)]
pub struct Rig {
    pub mode: RigMode,
    /// Why this mode (host-can-boot-linux.sh's answer).
    pub mode_reason: String,
    pub root: PathBuf,
    pub aivmm: PathBuf,
    /// The console log the report was parsed from.
    pub log_path: PathBuf,
    /// Exit code of run-l1.sh / run-direct.sh (QEMU's; 124 = timed out).
    pub exit_code: Option<i32>,
    pub elapsed: Duration,
    pub report: RigReport,
    /// One line per L1 boot that was lost and resumed (empty when the first boot ran
    /// every scenario).
    pub boots: Vec<String>,
}

static RIG: OnceLock<Result<Rig, String>> = OnceLock::new();

/// The rig run shared by every test of this test binary; started by the first caller.
/// Panics (failing the calling test) with the reason when the rig cannot run at all.
pub fn rig() -> &'static Rig {
    match RIG.get_or_init(Rig::start) {
        Ok(rig) => rig,
        Err(e) => panic!("the aivmm test rig could not run:\n{e}"),
    }
}

/// Progress for people watching a long test run. Written to fd 2 directly: the test
/// harness only captures `eprintln!`, and a silent multi-minute test looks hung.
fn progress(msg: &str) {
    let _ = writeln!(std::io::stderr(), "aivmm-tests rig: {msg}");
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The workspace root: the parent of this crate, or `AIVMM_ROOT`.
pub fn workspace_root() -> Result<PathBuf, String> {
    let root = match std::env::var_os("AIVMM_ROOT") {
        Some(r) => PathBuf::from(r),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("the tests crate has no parent directory")?
            .to_path_buf(),
    };
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))
        .map_err(|e| format!("cannot read {}/Cargo.toml: {e}", root.display()))?;
    if !manifest.contains("[workspace]") || !root.join("tests/rig").is_dir() {
        return Err(format!(
            "{} is not the aivmm workspace root",
            root.display()
        ));
    }
    Ok(root)
}

/// Run a command to completion; Err carries its output's last lines.
fn run_step(what: &str, cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let both = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    Err(format!(
        "{what} failed ({}): {cmd:?}\n--- last {EXCERPT_LINES} lines of its output ---\n{}",
        out.status,
        last_lines(&both, EXCERPT_LINES)
    ))
}

/// The binaries the rig runs, built in the test profile.
struct Binaries {
    aivmm: PathBuf,
    jailer: PathBuf,
    ai_inferd: PathBuf,
    ai_agent: PathBuf,
    rig_io: PathBuf,
}

/// Builds aivmm, aivmm-jailer, ai-inferd, ai-agent and rig-io in one cargo call and returns their paths, as
/// cargo reports them (so `--target-dir` and `CARGO_TARGET_DIR` are honoured).
fn build_binaries(root: &Path) -> Result<Binaries, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let stdout = run_step(
        "building aivmm, aivmm-jailer, ai-inferd, ai-agent and rig-io",
        Command::new(cargo).current_dir(root).args([
            "build",
            "-p",
            "vmm",
            "--bin",
            "aivmm",
            "-p",
            "aivmm-jailer",
            "--bin",
            "aivmm-jailer",
            "-p",
            "ai-inferd",
            "--bin",
            "ai-inferd",
            "-p",
            "guest-agent",
            "--bin",
            "ai-agent",
            "-p",
            "rig-io",
            "--bin",
            "rig-io",
            "--message-format=json-render-diagnostics",
        ]),
    )?;
    // Each artifact is a JSON line; a binary's has `"executable":"<path>"`. A full JSON
    // parser would be a dependency for one field; paths here have no quotes or escapes.
    let executables: Vec<PathBuf> = stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let len = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + len]))
        })
        .collect();
    let find = |name: &str| {
        executables
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == name))
            .cloned()
            .ok_or_else(|| format!("cargo reported no `{name}` executable"))
    };
    Ok(Binaries {
        aivmm: find("aivmm")?,
        jailer: find("aivmm-jailer")?,
        ai_inferd: find("ai-inferd")?,
        ai_agent: find("ai-agent")?,
        rig_io: find("rig-io")?,
    })
}

/// The outcome of the nested rig's L1 boot(s), or of the direct run.
struct L1Boots {
    /// The log of the last boot.
    log_path: PathBuf,
    /// run-l1.sh's (run-direct.sh's) exit status, of the last boot.
    status: std::process::ExitStatus,
    /// Every boot's report, merged ([`RigReport::resumed_by`]).
    report: RigReport,
    /// What happened to each boot that was lost.
    notes: Vec<String>,
}

/// run-l1.sh's exit code when it stopped a wedged L1.
const L1_WEDGED: i32 = 125;
/// run-l1.sh's (timeout's) exit code when L1 ran out of time.
const L1_TIMED_OUT: i32 = 124;

/// A command that runs the bash script at `path`. Read by bash rather than exec'd: the
/// project's scripts need no exec bit, and a script a test has just written cannot fail
/// with ETXTBSY (another thread's fork may still hold it open for writing until exec).
fn script(path: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(path);
    cmd
}

fn read_report(log: &Path) -> Result<RigReport, String> {
    let text =
        std::fs::read(log).map_err(|e| format!("the rig left no log at {}: {e}", log.display()))?;
    Ok(RigReport::parse(&String::from_utf8_lossy(&text)))
}

/// Boots L1 and runs the scenarios; when L1 itself is lost (wedged: run-l1.sh exit 125;
/// or gone without `RIG-L1-DONE`, e.g. a kernel panic) before every scenario is over,
/// boots it again for the scenarios that are not, up to `AIVMM_RIG_L1_BOOTS` boots
/// (default 2). A scenario that fails is not re-run: only the loss of L1 is, and each loss
/// is reported with the tests' failure messages and on stderr. A timeout (124) is not
/// resumed either: it already took the whole budget.
fn boot_l1(rig_dir: &Path, out_dir: &Path, timeout: &str) -> Result<L1Boots, String> {
    let max_boots: usize = std::env::var("AIVMM_RIG_L1_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(2);
    boot_l1_up_to(max_boots, rig_dir, out_dir, timeout, progress)
}

/// [`boot_l1`] with its limit and where its progress lines go given.
fn boot_l1_up_to(
    max_boots: usize,
    rig_dir: &Path,
    out_dir: &Path,
    timeout: &str,
    progress: fn(&str),
) -> Result<L1Boots, String> {
    let log_path = out_dir.join("l1-console.log");
    let mut scenarios: Option<Vec<String>> = None;
    let mut earlier: Option<RigReport> = None;
    let mut notes = Vec::new();
    let mut boot = 0;
    loop {
        boot += 1;
        progress(&format!(
            "booting L1 under QEMU TCG (boot {boot}, timeout {timeout} s; console: {})",
            log_path.display()
        ));
        let mut cmd = script(&rig_dir.join("run-l1.sh"));
        if let Some(list) = &scenarios {
            cmd.env("RIG_SCENARIOS", list.join(","));
        }
        let status = cmd
            .arg(out_dir)
            .arg(timeout)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run run-l1.sh: {e}"))?;
        // Each boot's console is kept: run-l1.sh starts the next one afresh.
        let kept = out_dir.join(format!("l1-console.boot{boot}.log"));
        std::fs::copy(&log_path, &kept)
            .map_err(|e| format!("cannot keep {}: {e}", log_path.display()))?;
        let this_boot = read_report(&log_path)?;
        // A wedged L1 never prints RIG-L1-DONE either.
        let lost = status.code() != Some(L1_TIMED_OUT) && !this_boot.l1_done;
        let cut_short = this_boot.runs_left_open().join("`, `");
        let report = match earlier.take() {
            Some(e) => e.resumed_by(this_boot),
            None => this_boot,
        };
        let left = report.unfinished();
        let all_over = left.as_ref().is_some_and(Vec::is_empty);
        if !lost || all_over || boot >= max_boots {
            return Ok(L1Boots {
                log_path,
                status,
                report,
                notes,
            });
        }
        let how = if status.code() == Some(L1_WEDGED) {
            "wedged (its heartbeat stopped; RIG-L1-STALL lines in its log)".to_string()
        } else {
            format!("ended without RIG-L1-DONE ({status})")
        };
        let inside = if cut_short.is_empty() {
            String::new()
        } else {
            format!(" inside `{cut_short}`")
        };
        let again = left
            .as_ref()
            .map_or("every scenario".to_string(), |l| l.join(" "));
        let note = format!(
            "L1 boot {boot} was lost{inside}: {how}; log {}; boot {} runs: {again}",
            kept.display(),
            boot + 1
        );
        progress(&note);
        notes.push(note);
        earlier = Some(report);
        scenarios = left;
    }
}

impl Rig {
    fn start() -> Result<Rig, String> {
        let started = Instant::now();
        let root = workspace_root()?;
        let rig_dir = root.join("tests/rig");

        progress("installing dependencies (tests/rig/deps.sh)");
        run_step("tests/rig/deps.sh", &mut script(&rig_dir.join("deps.sh")))?;

        let probe = script(&rig_dir.join("host-can-boot-linux.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run host-can-boot-linux.sh: {e}"))?;
        let mode_reason = String::from_utf8_lossy(&probe.stdout).trim().to_string();
        let mode = match probe.status.code() {
            Some(0) => RigMode::Direct,
            Some(1) => RigMode::Nested,
            _ => {
                return Err(format!(
                    "host-can-boot-linux.sh failed ({}): {}",
                    probe.status,
                    String::from_utf8_lossy(&probe.stderr).trim()
                ))
            }
        };
        progress(&format!("mode: {mode_reason}"));

        progress("building aivmm, aivmm-jailer, ai-inferd, ai-agent and rig-io");
        let mut bins = build_binaries(&root)?;
        if let Some(p) = std::env::var_os("AIVMM_BIN") {
            bins.aivmm = PathBuf::from(p);
        }
        let aivmm = bins.aivmm.clone();
        progress("models (devices/ai-inferd/models/setup.sh)");
        // Where setup.sh puts the models (it honours AIVMM_MODELS_DIR too).
        let models_dir = std::env::var_os("AIVMM_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/models"));
        run_step(
            "devices/ai-inferd/models/setup.sh",
            &mut script(&root.join("devices/ai-inferd/models/setup.sh")),
        )?;
        if !aivmm.is_file() {
            return Err(format!("no aivmm binary at {}", aivmm.display()));
        }

        let out_dir = std::env::var_os("AIVMM_RIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/rig"));
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;

        let boots = match mode {
            RigMode::Nested => {
                progress("building L1 (tests/rig/build-l1.sh)");
                run_step(
                    "tests/rig/build-l1.sh",
                    script(&rig_dir.join("build-l1.sh"))
                        .env("AIVMM_AGENT", &bins.ai_agent)
                        .env("RIG_IO_BIN", &bins.rig_io)
                        .env("JAILER_BIN", &bins.jailer)
                        .env("AI_INFERD_BIN", &bins.ai_inferd)
                        .env("AI_MODELS_DIR", &models_dir)
                        .arg(&out_dir)
                        .arg(&aivmm)
                        .arg(rig_dir.join("scenarios.sh")),
                )?;
                let timeout = std::env::var("AIVMM_RIG_TIMEOUT").unwrap_or_else(|_| "1500".into());
                boot_l1(&rig_dir, &out_dir, &timeout)?
            }
            RigMode::Direct => {
                let log = out_dir.join("direct-console.log");
                progress(&format!(
                    "running the scenarios on this host (log: {})",
                    log.display()
                ));
                let status = script(&rig_dir.join("run-direct.sh"))
                    .env("AIVMM_AGENT", &bins.ai_agent)
                    .env("RIG_IO_BIN", &bins.rig_io)
                    .env("AIVMM_JAILER", &bins.jailer)
                    .env("AI_INFERD", &bins.ai_inferd)
                    .env("AI_MODELS", &models_dir)
                    .env("AI_MANIFEST", root.join("configs/models.toml"))
                    .arg(&out_dir)
                    .arg(&aivmm)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .map_err(|e| format!("cannot run run-direct.sh: {e}"))?;
                let report = read_report(&log)?;
                L1Boots {
                    log_path: log,
                    status,
                    report,
                    notes: Vec::new(),
                }
            }
        };
        let L1Boots {
            log_path,
            status,
            report,
            notes: boots,
        } = boots;
        let elapsed = started.elapsed();
        progress(&format!(
            "done in {:.0} s ({}, {} scenario runs)",
            elapsed.as_secs_f64(),
            status,
            report.scenarios.values().map(Vec::len).sum::<usize>()
        ));
        Ok(Rig {
            mode,
            mode_reason,
            root,
            aivmm,
            log_path,
            exit_code: status.code(),
            elapsed,
            report,
            boots,
        })
    }

    /// How the rig ran, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "rig: {}; aivmm {}; log {}; exit code {}; {:.0} s",
            self.mode_reason,
            self.aivmm.display(),
            self.log_path.display(),
            self.exit_code
                .map_or_else(|| "none (killed by a signal)".into(), |c| c.to_string()),
            self.elapsed.as_secs_f64()
        );
        if self.exit_code == Some(L1_TIMED_OUT) {
            s.push_str(" -- the rig timed out (AIVMM_RIG_TIMEOUT)");
        }
        for note in &self.boots {
            s.push_str(&format!("\n{note}"));
        }
        let r = &self.report;
        if self.mode == RigMode::Nested {
            s.push_str(&format!(
                "\nL1 reached init: {}; scenarios finished: {}; L1 finished: {}",
                r.l1_up, r.scenarios_done, r.l1_done
            ));
            if let Some(l1) = r.facts.get("l1") {
                let mut facts: Vec<_> = l1.iter().map(|(k, v)| format!("{k}={v}")).collect();
                facts.sort();
                s.push_str(&format!("\nL1 facts: {}", facts.join(" ")));
            }
        }
        if !r.problems.is_empty() {
            s.push_str(&format!("\nlog problems: {}", r.problems.join("; ")));
        }
        s
    }

    /// Every run of scenario `name`; fails the test, with the end of the log, when the
    /// scenario never ran.
    #[track_caller]
    pub fn runs(&self, name: &str) -> &[ScenarioRun] {
        let runs = self.report.runs(name);
        if runs.is_empty() {
            panic!(
                "scenario `{name}` did not run\n{}\n--- last {EXCERPT_LINES} lines of the log ---\n{}",
                self.describe(),
                self.report.tail(EXCERPT_LINES)
            );
        }
        runs
    }

    /// The (single) run of scenario `name`, which must have finished (have an rc).
    #[track_caller]
    pub fn run(&self, name: &str) -> &ScenarioRun {
        let run = &self.runs(name)[0];
        if run.rc.is_none() {
            self.fail(
                run,
                "the run did not finish (no RIG-END: aivmm or the rig hung or died)",
            );
        }
        run
    }

    /// Fail the test with `what`, the rig's state and the run's log excerpt.
    #[track_caller]
    pub fn fail(&self, run: &ScenarioRun, what: &str) -> ! {
        panic!(
            "{what}\n{}\n{}",
            self.describe(),
            run.excerpt(EXCERPT_LINES)
        )
    }

    /// `fail` unless `ok`.
    #[track_caller]
    pub fn check(&self, run: &ScenarioRun, ok: bool, what: &str) {
        if !ok {
            self.fail(run, what);
        }
    }

    /// The run of scenario `scenario` whose `case` fact is `case`, which aivmm must have
    /// refused: exit code 2, one `aivmm: error:` line mentioning every fragment of
    /// `expect` (case-insensitively), and the free hugepages of every node unchanged.
    #[track_caller]
    pub fn check_refused(&self, scenario: &str, case: &str, expect: &[&str]) {
        let runs = self.runs(scenario);
        let Some(run) = runs.iter().find(|r| r.fact("case") == Some(case)) else {
            panic!(
                "no {scenario} run for case `{case}`\n{}\n{}",
                self.describe(),
                runs.iter().map(|r| r.excerpt(20)).collect::<String>()
            );
        };
        let what = format!("{scenario} `{case}`");
        self.check(
            run,
            run.rc == Some(2),
            &format!("{what}: exit code should be 2"),
        );
        let errors: Vec<&str> = run
            .stderr_lines()
            .filter(|l| l.starts_with("aivmm: error:"))
            .collect();
        self.check(
            run,
            errors.len() == 1,
            &format!("{what}: expected one `aivmm: error:` line, got {errors:?}"),
        );
        let line = errors[0].to_ascii_lowercase();
        for fragment in expect {
            self.check(
                run,
                line.contains(&fragment.to_ascii_lowercase()),
                &format!("{what}: the error line does not mention `{fragment}`"),
            );
        }
        for node in [0, 1] {
            if let (Some(b), Some(a)) = (
                run.fact_i64(&format!("hp_node{node}_before")),
                run.fact_i64(&format!("hp_node{node}_after")),
            ) {
                self.check(
                    run,
                    a == b,
                    &format!("{what}: free hugepages on node {node} went {b} -> {a}"),
                );
            }
        }
    }

    /// An integer fact the scenario must have recorded.
    #[track_caller]
    pub fn fact_i64(&self, run: &ScenarioRun, key: &str) -> i64 {
        run.fact_i64(key)
            .unwrap_or_else(|| self.fail(run, &format!("the rig recorded no integer fact `{key}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in run-l1.sh: boot 1 wedges inside `sigterm`, boot 2 records which
    /// scenarios it was asked for and finishes them.
    const FAKE_RUN_L1: &str = r#"#!/usr/bin/env bash
out=$1
n=$(cat "$out/boots" 2>/dev/null || echo 0); n=$((n + 1)); echo $n >"$out/boots"
echo "${RIG_SCENARIOS:-default}" >"$out/asked$n"
if [ $n = 1 ]; then
    printf 'RIG-L1-UP\nRIG-PLAN boot sigterm ai_infer\nRIG-BEGIN boot\nRIG-END boot rc=0\nRIG-RAN boot\nRIG-BEGIN sigterm\nRIG-L1-STALL 1 RIP=x\n' >"$out/l1-console.log"
    exit 125
fi
printf 'RIG-L1-UP\nRIG-PLAN sigterm ai_infer\nRIG-BEGIN sigterm\nRIG-END sigterm rc=0\nRIG-RAN sigterm\nRIG-BEGIN ai_daemon\nRIG-END ai_daemon rc=0\nRIG-RAN ai_infer\nRIG-SCENARIOS-DONE\nRIG-L1-DONE rc=0\n' >"$out/l1-console.log"
"#;

    /// A new temporary directory, removed when it drops, holding the stand-in run-l1.sh.
    fn fake_rig(name: &str) -> tempfile::TempDir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("aivmm-rig-{name}-"))
            .tempdir()
            .unwrap();
        std::fs::write(tmp.path().join("run-l1.sh"), FAKE_RUN_L1).unwrap();
        tmp
    }

    #[test]
    fn a_wedged_l1_is_booted_again_for_the_scenarios_not_over() {
        let tmp = fake_rig("resume");
        let dir = tmp.path();
        let boots = boot_l1_up_to(2, dir, dir, "60", |_| {}).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("asked1").trim(), "default");
        assert_eq!(read("asked2").trim(), "sigterm,ai_infer");
        assert_eq!(boots.status.code(), Some(0));
        assert_eq!(boots.report.unfinished(), Some(vec![]));
        assert_eq!(boots.report.runs("sigterm").len(), 1);
        assert_eq!(boots.report.runs("sigterm")[0].rc, Some(0));
        assert_eq!(boots.report.runs("boot")[0].rc, Some(0));
        assert_eq!(boots.notes.len(), 1);
        assert!(
            boots.notes[0].starts_with("L1 boot 1 was lost inside `sigterm`: wedged"),
            "{}",
            boots.notes[0]
        );
        assert!(read("l1-console.boot1.log").contains("RIG-L1-STALL"));
    }

    #[test]
    fn with_one_boot_allowed_a_wedge_is_the_result() {
        let tmp = fake_rig("once");
        let dir = tmp.path();
        let boots = boot_l1_up_to(1, dir, dir, "60", |_| {}).unwrap();
        assert_eq!(boots.status.code(), Some(L1_WEDGED));
        assert!(!dir.join("asked2").exists());
        assert_eq!(boots.report.runs("sigterm")[0].rc, None);
        assert!(boots.notes.is_empty());
    }
}
