//! End-to-end: aivmm boots a stock Linux guest (the Debian cloud kernel) on hugepage-backed,
//! NUMA-bound memory, and handles bad input and SIGTERM as its contract says.
//!
//! All tests share one rig run (one L1 boot in nested mode): see `aivmm_tests::rig`.
//! The scenarios are in tests/rig/scenarios/ (boot.sh, badconfig.sh, sigterm.sh, jailer.sh), the guest
//! side in tests/rig/guest/.

use aivmm_tests::{rig, Rig, RigMode, ScenarioRun};

/// Passthrough of L1's `edu` device: checks on the same rig run.
mod passthrough;

/// The ai_infer device: two tenants, one ai-inferd, outputs checked against the host.
mod ai_infer;

/// Disk, network and vsock: a tenant booted from its own image, reached over a tap and vsock.
mod tenant_io;

/// Serving: standard inference endpoints in two tenants, reached from outside the VMs.
mod serving;

/// The Firecracker-compatible control API and JSON config file, with curl in L1.
mod api;

/// The boot, sigterm and jailer configs' zone: 256 MiB of 2 MiB pages.
const ZONE_HUGEPAGES: i64 = 256 / 2;

/// The node the scenarios bound memory to; node 1 in the nested rig (its two-node L1).
#[track_caller]
fn host_node(rig: &Rig, run: &ScenarioRun) -> i64 {
    let node = rig.fact_i64(run, "host_node");
    if rig.mode == RigMode::Nested {
        rig.check(
            run,
            node == 1,
            "the nested rig must place the zone on L1's node 1",
        );
    }
    node
}

/// Free hugepages on `node` before, during and after a run must read `before`,
/// `before - ZONE_HUGEPAGES`, `before`: the zone took its pages from that node and gave
/// every one back.
#[track_caller]
fn check_hugepages_taken_and_returned(rig: &Rig, run: &ScenarioRun, node: i64) {
    let before = rig.fact_i64(run, &format!("hp_node{node}_before"));
    let during = rig.fact_i64(run, &format!("hp_node{node}_during"));
    let after = rig.fact_i64(run, &format!("hp_node{node}_after"));
    rig.check(
        run,
        before - during == ZONE_HUGEPAGES,
        &format!(
            "node {node}: free 2 MiB hugepages went {before} -> {during} while the VM ran, \
             expected a drop of {ZONE_HUGEPAGES} (256 MiB zone)"
        ),
    );
    rig.check(
        run,
        after == before,
        &format!(
            "node {node}: {before} free hugepages before the run, {after} after: pages leaked"
        ),
    );
}

#[test]
fn l2_reaches_init_and_prints_marker() {
    let rig = rig();
    let run = rig.run("boot");
    let marker = run
        .line_containing("AIVMM-GUEST-INIT uptime=")
        .unwrap_or_else(|| {
            rig.fail(
                run,
                "the guest never printed its init marker `AIVMM-GUEST-INIT`",
            )
        });
    rig.check(
        run,
        marker.contains("cpus="),
        &format!("malformed marker line `{marker}`"),
    );
    rig.check(
        run,
        run.line_containing("AIVMM-SCRIPT-EXIT rc=0").is_some(),
        "the guest's boot-check.sh did not run to `AIVMM-SCRIPT-EXIT rc=0`",
    );
}

#[test]
fn boot_timer_logs_init_reached() {
    // The guest init writes 0x7b to port 0x440; aivmm logs when that happened.
    let rig = rig();
    let run = rig.run("boot");
    let logged = run
        .stderr_lines()
        .any(|l| l.to_ascii_lowercase().contains("reached init"));
    rig.check(
        run,
        logged,
        "aivmm logged no `guest reached init in N ms` line (boot timer, port 0x440)",
    );
}

#[test]
fn guest_sees_two_vcpus() {
    let rig = rig();
    let run = rig.run("boot");
    for line in ["GUEST-NPROC=2", "GUEST-CPUINFO-PROCESSORS=2"] {
        rig.check(
            run,
            run.output.iter().any(|l| l.trim() == line),
            &format!("the guest did not report `{line}` (2 vCPUs configured)"),
        );
    }
    rig.check(
        run,
        run.line_containing("AIVMM-GUEST-INIT")
            .is_some_and(|l| l.trim_end().ends_with("cpus=2")),
        "the init marker does not say cpus=2",
    );
}

#[test]
fn guest_runs_its_apic_timer_in_tsc_deadline_mode() {
    // KVM emulates the mode but leaves it out of its supported CPUID; without it the
    // guest calibrates the APIC timer against the PIT during boot.
    let rig = rig();
    let run = rig.run("boot");
    rig.check(
        run,
        run.output
            .iter()
            .any(|l| l.trim() == "GUEST-TSC-DEADLINE=yes"),
        "the guest's /proc/cpuinfo has no tsc_deadline_timer flag",
    );
    rig.check(
        run,
        run.output
            .iter()
            .any(|l| l.trim() == "GUEST-CLOCKEVENT=lapic-deadline"),
        "the guest's boot CPU does not use the lapic-deadline clock event",
    );
}

#[test]
fn halt_polling_set_to_zero_keeps_an_idle_vcpu_from_polling() {
    // boot.toml sets machine.halt_poll_ns = 0: KVM must not spin a halted vCPU's thread.
    let rig = rig();
    let run = rig.run("boot");
    if run.fact("kvm_halt_exits") == Some("na") && rig.mode == RigMode::Direct {
        eprintln!("SKIP: this host's debugfs shows no KVM counters");
        return;
    }
    let halts = rig.fact_i64(run, "kvm_halt_exits");
    let polls = rig.fact_i64(run, "kvm_halt_attempted_poll");
    rig.check(
        run,
        halts > 0,
        "the guest's vCPUs never halted, so halt polling was not exercised",
    );
    rig.check(
        run,
        polls == 0,
        &format!("KVM polled {polls} times after {halts} halts: halt_poll_ns = 0 was ignored"),
    );
}

#[test]
fn hugepage_zone_is_bound_to_its_numa_node() {
    let rig = rig();
    let run = rig.run("boot");
    let node = host_node(rig, run);
    let maps = run.fact("numa_maps").unwrap_or_default();
    let huge: Vec<&str> = maps
        .split(';')
        .map(str::trim)
        .filter(|l| l.split_whitespace().any(|w| w == "huge"))
        .collect();
    rig.check(
        run,
        !huge.is_empty(),
        "aivmm's /proc/<pid>/numa_maps has no `huge` mapping while the VM runs",
    );
    let on_node = format!("N{node}=");
    rig.check(
        run,
        huge.iter().any(|l| l.contains(&on_node)),
        &format!("no hugepage mapping has pages on node {node} (`{on_node}`)"),
    );
    let stray = huge.iter().find(|l| {
        l.split_whitespace()
            .any(|w| w.starts_with('N') && w.contains('=') && !w.starts_with(&on_node))
    });
    if let Some(l) = stray {
        rig.fail(
            run,
            &format!("a hugepage mapping has pages off node {node}: `{l}`"),
        );
    }
    check_hugepages_taken_and_returned(rig, run, node);
}

#[test]
fn guest_poweroff_exits_zero() {
    let rig = rig();
    let run = rig.run("boot");
    rig.check(
        run,
        run.line_containing("AIVMM-SCRIPT-EXIT").is_some(),
        "the guest script never finished, so the exit was not the guest's poweroff",
    );
    rig.check(
        run,
        run.rc == Some(0),
        "aivmm did not exit 0 after the guest's `poweroff -f`",
    );
}

/// The `badconfig` run of one case: refused (exit 2, one error line mentioning every
/// word of `expect`), hugepages left alone.
#[track_caller]
fn check_bad_config(case: &str, expect: &[&str]) {
    rig().check_refused("badconfig", case, expect);
}

#[test]
fn bad_config_zero_memory_exits_2() {
    check_bad_config("zero-memory", &["memory"]);
}

#[test]
fn bad_config_unknown_field_exits_2() {
    check_bad_config("unknown-field", &["unknown field", "vcpu_count"]);
}

#[test]
fn bad_config_missing_numa_node_exits_2() {
    check_bad_config("numa-node-7", &["node", "7"]);
}

#[test]
fn bad_config_missing_kernel_exits_2() {
    check_bad_config("missing-kernel", &["/nonexistent/aivmm-rig/vmlinuz"]);
}

#[test]
fn sigterm_exits_zero_and_frees_hugepages() {
    let rig = rig();
    let run = rig.run("sigterm");
    rig.check(
        run,
        run.fact("signalled") == Some("1"),
        "the guest never reached init, so SIGTERM was not sent",
    );
    rig.check(run, run.rc == Some(0), "aivmm did not exit 0 on SIGTERM");
    rig.check(
        run,
        run.line_containing("GUEST-WOKE-UP").is_none(),
        "the guest finished its 60 s sleep: aivmm ignored SIGTERM",
    );
    let node = host_node(rig, run);
    check_hugepages_taken_and_returned(rig, run, node);
}

#[test]
fn vcpu_threads_run_on_the_zone_node_cpus() {
    // No `cpus` in boot.toml: aivmm pins the vCPU threads to the CPUs of the memory's node.
    let rig = rig();
    let run = rig.run("boot");
    let node = host_node(rig, run);
    let node_cpus = match rig.mode {
        RigMode::Nested => rig
            .report
            .fact("l1", &format!("node{node}_cpus"))
            .map(str::to_string),
        RigMode::Direct => {
            std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist"))
                .ok()
                .map(|s| s.trim().to_string())
        }
    }
    .unwrap_or_else(|| rig.fail(run, &format!("unknown CPU list of node {node}")));
    // `thread_cpus` is "comm:cpulist;" per thread; aivmm names its vCPU threads vcpu<N>.
    let threads = run.fact("thread_cpus").unwrap_or_default();
    let vcpus: Vec<(&str, &str)> = threads
        .split(';')
        .filter_map(|t| t.split_once(':'))
        .filter(|(comm, _)| comm.starts_with("vcpu"))
        .collect();
    rig.check(
        run,
        vcpus.len() == 2,
        &format!("expected 2 vCPU threads (named vcpu<N>) in `{threads}`"),
    );
    for (comm, cpus) in vcpus {
        rig.check(
            run,
            cpus == node_cpus,
            &format!(
                "thread {comm} may run on CPUs {cpus}, expected node {node}'s CPUs {node_cpus}"
            ),
        );
    }
}

#[test]
fn the_jailer_boots_a_guest_confined_and_sigterm_stops_it() {
    // tests/rig/scenarios/jailer.sh: aivmm-jailer --uid 1000 --gid 1000 --cgroup-version 2
    // [--cgroup pids.max=128 --cgroup memory.max=1 GiB] --resource-limit no-file=1024
    // --resource-limit memlock=512 MiB, booting tests/rig/configs/jailer.toml.
    let rig = rig();
    let run = rig.run("jailer");
    rig.check(
        run,
        run.fact("signalled") == Some("1"),
        "the jailed guest never reached init",
    );
    rig.check(
        run,
        run.line_containing("AIVMM-GUEST-INIT").is_some(),
        "the jailed guest's init line is not on its console",
    );
    rig.check(
        run,
        run.rc == Some(0),
        "the jailed aivmm did not exit 0 on SIGTERM",
    );
    let expect = |key: &str, want: &str| {
        let got = run.fact(key).unwrap_or("(none)").trim();
        rig.check(
            run,
            got == want,
            &format!("jailed aivmm: {key} is `{got}`, expected `{want}`"),
        );
    };
    // The jailer became aivmm (same pid, its pid file says so), as uid:gid 1000:1000
    // with no supplementary group, no-new-privs, and aivmm's own seccomp filters on.
    expect("comm", "aivmm");
    expect("uid", "1000 1000 1000 1000");
    expect("gid", "1000 1000 1000 1000");
    expect("groups", "");
    expect("no_new_privs", "1");
    expect("seccomp", "2");
    expect("nofile", "1024");
    // The zone: 256 MiB of 2 MiB hugepages from the zone's node, every page given back,
    // and locked: aivmm exits at start when mlock fails, which it would under the
    // default 8 MiB RLIMIT_MEMLOCK (hugetlb pages do not show in VmLck).
    expect("memlock", "536870912");
    let node = host_node(rig, run);
    check_hugepages_taken_and_returned(rig, run, node);
    let pid_file = run.fact("pid_file").unwrap_or_default();
    let (written, seen) = pid_file.split_once(" (pid ").unwrap_or(("", ""));
    rig.check(
        run,
        !written.is_empty() && seen.trim_end_matches(')') == written,
        &format!("the jail's pid file does not name aivmm: `{pid_file}`"),
    );
    let cgroup = run.fact("cgroup").unwrap_or_default();
    rig.check(
        run,
        cgroup.split(' ').any(|l| l == "0::/aivmm/rig-jail"),
        &format!("aivmm is not in the cgroup v2 aivmm/rig-jail: `{cgroup}`"),
    );
    // Each limit the hierarchy could hold was written.
    let limits = run.fact("limits").unwrap_or_default();
    if limits.contains("pids.max") {
        expect("cg_pids.max", "128");
    }
    if limits.contains("memory.max") {
        expect("cg_memory.max", "1073741824");
    }
    if rig.mode == RigMode::Nested {
        // L1 mounts no cgroup hierarchy of its own: the jailer's has every controller.
        rig.check(
            run,
            limits.contains("pids.max") && limits.contains("memory.max"),
            &format!("L1's cgroup2 should offer pids and memory; limits were `{limits}`"),
        );
    }
    // The jail holds what the VM needs and nothing of the host.
    let files: Vec<&str> = run
        .fact("jail_files")
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // `sys`: only the host's CPU and NUMA topology, read-only (the zone's host_node).
    for want in [
        "aivmm",
        "aivmm.pid",
        "dev",
        "run",
        "sys",
        "vmlinux",
        "initrd.gz",
        "vm.toml",
    ] {
        rig.check(
            run,
            files.contains(&want),
            &format!("no {want} in the jail: {files:?}"),
        );
    }
    for never in ["proc", "etc", "tmp", "home", "root", "usr"] {
        rig.check(
            run,
            !files.contains(&never),
            &format!("the jail holds the host's {never}: {files:?}"),
        );
    }
}
