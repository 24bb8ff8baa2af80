//! The rig's log format and its parser.
//!
//! `tests/rig/scenarios.sh` (and the L1 init around it) print these lines among the
//! console output of L1 and of the guests:
//!
//! ```text
//! RIG-L1-UP uptime=3.93 cpus=2          L1 reached its init (nested mode only)
//! RIG-FACT l1 kvm=yes                   a fact outside any run (here: about L1)
//! RIG-PLAN boot badconfig sigterm       the scenarios this boot will run, in order
//! RIG-BEGIN boot                        an aivmm run starts
//! RIG-FACT boot hp_node1_before=192     a fact about the open run (value: rest of the line)
//! AIVMM-GUEST-INIT uptime=1.2 cpus=2    anything else inside a run is its output
//! [stderr] guest reached init in 80 ms  (aivmm's stderr, marked by the scenario script)
//! RIG-END boot rc=0                     aivmm's exit code
//! RIG-RAN boot                          scenario `boot` (all its runs) is over
//! RIG-SCENARIOS-DONE                    every requested scenario ran
//! RIG-L1-DONE rc=0 uptime=95.1          L1 is about to power off (nested mode only)
//! ```
//!
//! Serial consoles add carriage returns, and firmware or kernel messages can share a line
//! with a marker, so markers are searched anywhere in a line and `\r` is dropped.

use std::collections::HashMap;

const BEGIN: &str = "RIG-BEGIN ";
const END: &str = "RIG-END ";
const FACT: &str = "RIG-FACT ";
const L1_UP: &str = "RIG-L1-UP";
const L1_DONE: &str = "RIG-L1-DONE";
const SCENARIOS_DONE: &str = "RIG-SCENARIOS-DONE";
const PLAN: &str = "RIG-PLAN ";
const RAN: &str = "RIG-RAN ";

/// One aivmm run of a scenario: the lines between `RIG-BEGIN` and `RIG-END`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScenarioRun {
    pub name: String,
    /// aivmm's exit code; `None` when the log ended (or another run began) before `RIG-END`.
    pub rc: Option<i32>,
    /// Guest console and `[stderr] ` lines, in order, without the RIG- marker lines.
    pub output: Vec<String>,
    /// `RIG-FACT <name> key=value` lines printed while the run was open.
    pub facts: HashMap<String, String>,
}

impl ScenarioRun {
    pub fn fact(&self, key: &str) -> Option<&str> {
        self.facts.get(key).map(String::as_str)
    }

    /// A fact that must be an integer (hugepage counters, sizes, durations).
    pub fn fact_i64(&self, key: &str) -> Option<i64> {
        self.fact(key)?.trim().parse().ok()
    }

    /// The first output line containing `needle`.
    pub fn line_containing(&self, needle: &str) -> Option<&str> {
        self.output
            .iter()
            .map(String::as_str)
            .find(|l| l.contains(needle))
    }

    /// aivmm's stderr lines (without the `[stderr] ` mark).
    pub fn stderr_lines(&self) -> impl Iterator<Item = &str> {
        self.output
            .iter()
            .filter_map(|l| l.strip_prefix("[stderr] "))
    }

    /// The run as a failure message shows it: rc, sorted facts, the last `n` output lines.
    pub fn excerpt(&self, n: usize) -> String {
        let mut facts: Vec<_> = self.facts.iter().collect();
        facts.sort();
        let mut s = format!(
            "--- scenario `{}`: rc={} ---\n",
            self.name,
            self.rc
                .map_or_else(|| "none (did not finish)".to_string(), |rc| rc.to_string())
        );
        for (k, v) in facts {
            s.push_str(&format!("fact {k}={v}\n"));
        }
        let skip = self.output.len().saturating_sub(n);
        if skip > 0 {
            s.push_str(&format!("... ({skip} earlier lines)\n"));
        }
        for l in &self.output[skip..] {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// Everything one rig run printed, parsed.
#[derive(Debug, Clone, Default)]
pub struct RigReport {
    /// Runs by scenario name, in log order (`badconfig` has one run per bad config).
    pub scenarios: HashMap<String, Vec<ScenarioRun>>,
    /// Facts printed outside any run, by name (`l1`, `rig`).
    pub facts: HashMap<String, HashMap<String, String>>,
    pub l1_up: bool,
    pub l1_done: bool,
    pub scenarios_done: bool,
    /// The scenarios the script set out to run (`RIG-PLAN`), and those that are over
    /// (`RIG-RAN`), in order. A scenario names a step of scenarios.sh; its runs can have
    /// other names (`ai_infer` prints `ai_daemon`, `ai_a`, `ai_b`).
    pub plan: Vec<String>,
    pub ran: Vec<String>,
    /// L1 boots this report covers (1, more after [`RigReport::resumed_by`]).
    pub boots: usize,
    /// Lines the parser could not make sense of (an END without its BEGIN, a bad rc, ...).
    pub problems: Vec<String>,
    /// The whole log, cleaned, for excerpts.
    pub lines: Vec<String>,
}

impl RigReport {
    pub fn parse(log: &str) -> RigReport {
        let mut report = RigReport {
            boots: 1,
            ..RigReport::default()
        };
        let mut open: Option<ScenarioRun> = None;

        for raw in log.lines() {
            let line: String = raw.chars().filter(|&c| c != '\r').collect();
            report.lines.push(line.clone());

            if let Some(rest) = after(&line, BEGIN) {
                let name = rest.trim().to_string();
                if let Some(prev) = open.take() {
                    report
                        .problems
                        .push(format!("`{}` began before `{}` ended", name, prev.name));
                    report.push(prev);
                }
                open = Some(ScenarioRun {
                    name,
                    ..ScenarioRun::default()
                });
            } else if let Some(rest) = after(&line, END) {
                let mut words = rest.split_whitespace();
                let name = words.next().unwrap_or_default();
                let rc = words
                    .next()
                    .and_then(|w| w.strip_prefix("rc="))
                    .and_then(|v| v.parse::<i32>().ok());
                match open.take() {
                    Some(mut run) if run.name == name => {
                        if rc.is_none() {
                            report.problems.push(format!("no valid rc in `{line}`"));
                        }
                        run.rc = rc;
                        report.push(run);
                    }
                    other => {
                        report
                            .problems
                            .push(format!("`{line}` without a matching RIG-BEGIN"));
                        open = other;
                    }
                }
            } else if let Some(rest) = after(&line, FACT) {
                let Some((name, kv)) = rest.split_once(' ') else {
                    report.problems.push(format!("malformed fact `{line}`"));
                    continue;
                };
                let Some((key, value)) = kv.split_once('=') else {
                    report.problems.push(format!("malformed fact `{line}`"));
                    continue;
                };
                let (key, value) = (key.to_string(), value.to_string());
                match open.as_mut() {
                    Some(run) if run.name == name => {
                        run.facts.insert(key, value);
                    }
                    _ => {
                        report
                            .facts
                            .entry(name.to_string())
                            .or_default()
                            .insert(key, value);
                    }
                }
            } else if let Some(rest) = after(&line, PLAN) {
                report.plan = rest.split_whitespace().map(str::to_string).collect();
            } else if let Some(rest) = after(&line, RAN) {
                report.ran.push(rest.trim().to_string());
            } else if line.contains(SCENARIOS_DONE) {
                report.scenarios_done = true;
            } else if line.contains(L1_DONE) {
                report.l1_done = true;
            } else if line.contains(L1_UP) {
                report.l1_up = true;
            } else if let Some(run) = open.as_mut() {
                run.output.push(line);
            }
        }
        if let Some(run) = open.take() {
            report
                .problems
                .push(format!("the log ended inside scenario `{}`", run.name));
            report.push(run);
        }
        report
    }

    fn push(&mut self, run: ScenarioRun) {
        self.scenarios
            .entry(run.name.clone())
            .or_default()
            .push(run);
    }

    /// The runs of a scenario (empty when it never began).
    pub fn runs(&self, name: &str) -> &[ScenarioRun] {
        self.scenarios.get(name).map_or(&[], Vec::as_slice)
    }

    /// A fact printed outside any run, e.g. `fact("l1", "kvm")`.
    pub fn fact(&self, name: &str, key: &str) -> Option<&str> {
        self.facts.get(name)?.get(key).map(String::as_str)
    }

    /// Names of the runs that never ended (no `RIG-END`, or one without a valid rc).
    pub fn runs_left_open(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .scenarios
            .values()
            .flatten()
            .filter(|r| r.rc.is_none())
            .map(|r| r.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Planned scenarios that are not over, in plan order; `None` when no plan was
    /// printed (the scenario script never started).
    pub fn unfinished(&self) -> Option<Vec<String>> {
        if self.plan.is_empty() {
            return None;
        }
        Some(
            self.plan
                .iter()
                .filter(|s| !self.ran.contains(s))
                .cloned()
                .collect(),
        )
    }

    /// This report with `later` folded in: the report of another L1 boot that ran this
    /// one's unfinished scenarios. A run name that `later` has replaces all of this
    /// report's runs of it (the cut-short one among them); facts, flags and log lines
    /// come from both, later winning. Once boots are merged, each problem names its boot.
    pub fn resumed_by(mut self, later: RigReport) -> RigReport {
        let tag = |boot: usize, problems: Vec<String>| {
            problems
                .into_iter()
                .map(move |p| format!("L1 boot {boot}: {p}"))
        };
        if self.boots == 1 {
            self.problems = tag(1, self.problems).collect();
        }
        let boot = self.boots + 1;
        self.problems.extend(tag(boot, later.problems));
        for (name, runs) in later.scenarios {
            self.scenarios.insert(name, runs);
        }
        for (name, facts) in later.facts {
            self.facts.entry(name).or_default().extend(facts);
        }
        self.ran.extend(later.ran);
        self.boots = boot;
        self.l1_up = later.l1_up;
        self.l1_done = later.l1_done;
        self.scenarios_done = later.scenarios_done;
        self.lines.push(format!("=== L1 boot {boot} (resumed) ==="));
        self.lines.extend(later.lines);
        self
    }

    /// The last `n` lines of the whole log.
    pub fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        let mut s = String::new();
        if skip > 0 {
            s.push_str(&format!("... ({skip} earlier lines)\n"));
        }
        for l in &self.lines[skip..] {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// The text after `marker` when the line contains it (anywhere: firmware output or an
/// interleaved kernel message may precede it).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    // A trimmed real L1 console (SeaBIOS noise, \r\n line ends, a marker sharing a line
    // with escape codes, a kernel message inside a run, two runs of one scenario, and a
    // run cut short).
    const LOG: &str = "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n\
Booting from ROM..c\x1b[?7l\x1b[2J\x1b[0m.RIG-L1-UP uptime=3.93 cpus=2\r\n\
RIG-FACT l1 kvm=yes\r\n\
RIG-FACT l1 node1_cpus=1\r\n\
RIG-FACT rig mode=nested\r\n\
RIG-BEGIN boot\r\n\
RIG-FACT boot hp_node1_before=192\r\n\
RIG-FACT boot numa_maps=7f00 bind:1 file=/memfd:mem0\\040(deleted) huge dirty=128 N1=128 kernelpagesize_kB=2048;\r\n\
RIG-FACT boot hp_node1_during=64\r\n\
AIVMM-GUEST-INIT uptime=1.20 cpus=2\r\r\n\
GUEST-NPROC=2\r\r\n\
[   42.000001] kvm: some L1 kernel message\r\n\
[stderr] guest reached init in 812 ms\r\n\
RIG-END boot rc=0\r\n\
RIG-BEGIN badconfig\r\n\
RIG-FACT badconfig case=zero-memory\r\n\
[stderr] aivmm: error: memory zone mem0 has size 0\r\n\
RIG-END badconfig rc=2\r\n\
RIG-BEGIN badconfig\r\n\
RIG-FACT badconfig case=unknown-field\r\n\
RIG-END badconfig rc=2\r\n\
RIG-BEGIN sigterm\r\n\
GUEST-SLEEPING\r\n";

    #[test]
    fn parses_runs_facts_and_output() {
        let r = RigReport::parse(LOG);
        assert!(r.l1_up);
        assert!(!r.l1_done);
        assert!(!r.scenarios_done);
        assert_eq!(r.fact("l1", "kvm"), Some("yes"));
        assert_eq!(r.fact("l1", "node1_cpus"), Some("1"));
        assert_eq!(r.fact("rig", "mode"), Some("nested"));

        let boot = r.runs("boot");
        assert_eq!(boot.len(), 1);
        let boot = &boot[0];
        assert_eq!(boot.name, "boot");
        assert_eq!(boot.rc, Some(0));
        assert_eq!(boot.fact_i64("hp_node1_before"), Some(192));
        assert_eq!(boot.fact_i64("hp_node1_during"), Some(64));
        // The value is the rest of the line, spaces included.
        assert_eq!(
            boot.fact("numa_maps"),
            Some("7f00 bind:1 file=/memfd:mem0\\040(deleted) huge dirty=128 N1=128 kernelpagesize_kB=2048;")
        );
        assert_eq!(
            boot.output,
            vec![
                "AIVMM-GUEST-INIT uptime=1.20 cpus=2",
                "GUEST-NPROC=2",
                "[   42.000001] kvm: some L1 kernel message",
                "[stderr] guest reached init in 812 ms",
            ]
        );
        assert_eq!(
            boot.stderr_lines().collect::<Vec<_>>(),
            vec!["guest reached init in 812 ms"]
        );
        assert_eq!(boot.line_containing("NPROC"), Some("GUEST-NPROC=2"));
    }

    #[test]
    fn keeps_every_run_of_a_scenario_in_order() {
        let r = RigReport::parse(LOG);
        let bad = r.runs("badconfig");
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].fact("case"), Some("zero-memory"));
        assert_eq!(bad[0].rc, Some(2));
        assert_eq!(
            bad[0].stderr_lines().collect::<Vec<_>>(),
            vec!["aivmm: error: memory zone mem0 has size 0"]
        );
        assert_eq!(bad[1].fact("case"), Some("unknown-field"));
        assert!(bad[1].output.is_empty());
    }

    #[test]
    fn an_unfinished_run_has_no_rc_and_is_reported() {
        let r = RigReport::parse(LOG);
        let sig = r.runs("sigterm");
        assert_eq!(sig.len(), 1);
        assert_eq!(sig[0].rc, None);
        assert_eq!(sig[0].output, vec!["GUEST-SLEEPING"]);
        assert_eq!(r.problems, vec!["the log ended inside scenario `sigterm`"]);
        assert!(r.runs("demo").is_empty());
    }

    #[test]
    fn rejects_mismatched_and_malformed_markers() {
        let r = RigReport::parse(
            "RIG-END boot rc=0\nRIG-BEGIN a\nRIG-FACT a novalue\nRIG-END a rc=x\n\
             RIG-BEGIN b\nRIG-BEGIN c\nRIG-END c rc=-1\nRIG-SCENARIOS-DONE\nRIG-L1-DONE rc=0\n",
        );
        assert!(r.scenarios_done);
        assert!(r.l1_done);
        assert!(r.runs("boot").is_empty());
        assert_eq!(r.runs("a")[0].rc, None);
        assert!(r.runs("a")[0].facts.is_empty());
        assert_eq!(r.runs("b")[0].rc, None);
        assert_eq!(r.runs("c")[0].rc, Some(-1));
        assert_eq!(r.problems.len(), 4, "{:?}", r.problems);
    }

    #[test]
    fn a_resumed_boot_replaces_the_cut_short_runs_and_keeps_the_finished_ones() {
        let first = RigReport::parse(
            "RIG-PLAN boot sigterm ai_infer\nRIG-FACT l1 kvm_hold=no\n\
             RIG-BEGIN boot\nRIG-END boot rc=0\nRIG-RAN boot\n\
             RIG-BEGIN sigterm\nwedged here\n",
        );
        assert_eq!(
            first.unfinished(),
            Some(vec!["sigterm".to_string(), "ai_infer".to_string()])
        );
        assert_eq!(first.runs_left_open(), vec!["sigterm"]);
        assert!(RigReport::parse("RIG-L1-UP\n").unfinished().is_none());

        let second = RigReport::parse(
            "RIG-L1-UP\nRIG-PLAN sigterm ai_infer\nRIG-FACT l1 kvm_hold=yes\n\
             RIG-BEGIN sigterm\nRIG-END sigterm rc=0\nRIG-RAN sigterm\n\
             RIG-BEGIN ai_daemon\nRIG-END ai_daemon rc=0\nRIG-RAN ai_infer\n\
             RIG-SCENARIOS-DONE\nRIG-L1-DONE rc=0\n",
        );
        let r = first.resumed_by(second);
        assert_eq!(r.unfinished(), Some(vec![]));
        assert_eq!(r.runs("boot")[0].rc, Some(0));
        let sig = r.runs("sigterm");
        assert_eq!(sig.len(), 1, "the cut-short run is replaced");
        assert_eq!(sig[0].rc, Some(0));
        assert_eq!(r.runs("ai_daemon")[0].rc, Some(0));
        assert_eq!(r.fact("l1", "kvm_hold"), Some("yes"));
        assert!(r.scenarios_done && r.l1_done);
        assert_eq!(
            r.problems,
            vec!["L1 boot 1: the log ended inside scenario `sigterm`"]
        );
        assert!(r
            .tail(100)
            .contains("wedged here\n=== L1 boot 2 (resumed) ===\nRIG-L1-UP\n"));
    }

    #[test]
    fn excerpts_keep_the_last_lines() {
        let mut log = String::from("RIG-BEGIN boot\n");
        for i in 0..100 {
            log.push_str(&format!("line {i}\n"));
        }
        log.push_str("RIG-END boot rc=1\n");
        let r = RigReport::parse(&log);
        let ex = r.runs("boot")[0].excerpt(60);
        assert!(ex.starts_with("--- scenario `boot`: rc=1 ---\n... (40 earlier lines)\nline 40\n"));
        assert!(ex.ends_with("line 99\n"));
        assert!(!ex.contains("line 39\n"));
        let tail = r.tail(2);
        assert_eq!(
            tail,
            "... (100 earlier lines)\nline 99\nRIG-END boot rc=1\n"
        );
    }
}
