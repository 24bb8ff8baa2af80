//! End-to-end: VFIO passthrough of L1's `edu` device (behind the node-1 PCIe expander, in
//! its own IOMMU group under intel-iommu) to the L2 guest, whose `edu-test` checks the BAR,
//! DMA through the IOMMU, MSI delivery and INTx routing (the DSDT's `_PRT`); the tenant's
//! memory and vCPUs must follow the device to its NUMA node; bad passthrough configs exit 2
//! with their own error.
//!
//! The scenarios are `passthrough` (with its `passthrough_trapped` run) and
//! `badpassthrough` in tests/rig/scenarios/. A host without an edu device (direct mode on
//! real hardware) skips them, and these tests accept that there only.

use aivmm_tests::{rig, Rig, RigMode, ScenarioRun};

/// The passthrough config's zone: 256 MiB of 2 MiB pages.
const ZONE_HUGEPAGES: i64 = 256 / 2;

/// The run `name`, or `None` when the host has no edu (only acceptable in direct mode).
fn passthrough_run(rig: &'static Rig, name: &str) -> Option<&'static ScenarioRun> {
    let first = rig.run("passthrough");
    if let Some(why) = first.fact("skipped") {
        rig.check(
            first,
            rig.mode == RigMode::Direct,
            &format!("the nested rig has an edu device, yet passthrough was skipped: {why}"),
        );
        eprintln!("SKIP: passthrough scenario skipped on this host: {why}");
        return None;
    }
    Some(rig.run(name))
}

#[test]
fn passed_through_edu_works_in_the_guest() {
    let rig = rig();
    let Some(run) = passthrough_run(rig, "passthrough") else {
        return;
    };
    rig.check(
        run,
        run.fact("driver") == Some("vfio-pci"),
        "L1 did not bind the edu to vfio-pci",
    );
    for (line, what) in [
        (
            "EDU-TEST id=0x010000ed",
            "identification register read through BAR0",
        ),
        (
            "EDU-TEST liveness=ok",
            "liveness (invert) check through BAR0",
        ),
        (
            "EDU-TEST dma=ok",
            "DMA guest RAM -> device -> other guest RAM",
        ),
        (
            "EDU-TEST msi=ok",
            "MSI raised by the device arriving in the guest",
        ),
        ("EDU-TEST PASS", "edu-test passing as a whole"),
    ] {
        rig.check(
            run,
            run.line_containing(line).is_some(),
            &format!("no `{line}` in the guest output: {what} failed"),
        );
    }
    rig.check(run, run.rc == Some(0), "aivmm did not exit 0");
    rig.check(
        run,
        rig.fact_i64(run, "error_lines") == 0,
        "aivmm printed an error line",
    );
    rig.check(
        run,
        run.stderr_lines().any(|l| l.contains("reset")),
        "aivmm did not reset the device when the VM stopped",
    );
    rig.check(
        run,
        run.fact("driver_after") == Some("vfio-pci"),
        "the edu is no longer on vfio-pci after the run",
    );
}

#[test]
fn passed_through_edu_intx_is_routed_by_the_prt() {
    // edu-test --intx: the guest binds the edu to uio_pci_generic, which requests the IRQ
    // the DSDT's _PRT gives the device's slot and pin. (Delivery is not checked here: the
    // rig's edu sits behind QEMU's pxb-pcie, whose INTx never reaches L1; see
    // docs/passthrough.md.)
    let rig = rig();
    let Some(run) = passthrough_run(rig, "passthrough") else {
        return;
    };
    // aivmm: "passthrough device ... at PCI 00:01.0, INTx on GSI 17 (host NUMA node 1)".
    let gsi: u32 = run
        .stderr_lines()
        .find_map(|l| l.split("INTx on GSI ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| rig.fail(run, "aivmm did not log the device's INTx GSI"));
    rig.check(
        run,
        (16..24).contains(&gsi),
        &format!("INTx GSI {gsi} is not one of the PCI pins 16-23 of the _PRT"),
    );
    rig.check(
        run,
        run.line_containing("EDU-TEST INTX PASS").is_some(),
        "no `EDU-TEST INTX PASS` in the guest output: edu-test --intx failed",
    );
    // The guest's IRQ sits on the IOAPIC pin aivmm wired, level-triggered (fasteoi).
    let irq_line = run
        .line_containing("EDU-TEST intx_line=")
        .unwrap_or_default();
    rig.check(
        run,
        irq_line.contains(&format!("IO-APIC {gsi}-fasteoi")),
        &format!("the guest's INTx is not IOAPIC pin {gsi}, level-triggered: `{irq_line}`"),
    );
    // aivmm had INTx enabled through VFIO while the guest ran: L1's vfio-pci held the
    // device's IRQ.
    if rig.mode == RigMode::Nested {
        let device = run.fact("device").unwrap_or_default();
        let l1 = run.fact("l1_vfio_intx").unwrap_or_default();
        rig.check(
            run,
            l1.contains(&format!("vfio-intx({device})")),
            &format!("L1 shows no vfio-intx IRQ for {device} while the VM ran: `{l1}`"),
        );
    }
}

#[test]
fn passthrough_tenant_is_placed_on_the_device_node() {
    // passthrough.toml names no host_node: the zone and the vCPUs follow the device.
    let rig = rig();
    let Some(run) = passthrough_run(rig, "passthrough") else {
        return;
    };
    let node = rig.fact_i64(run, "device_numa_node");
    if rig.mode == RigMode::Nested {
        rig.check(run, node == 1, "the rig's edu must sit on L1's node 1");
    }
    let maps = run.fact("numa_maps").unwrap_or_default();
    rig.check(
        run,
        maps.contains(&format!("bind:{node} "))
            && maps.contains(&format!("N{node}={ZONE_HUGEPAGES} ")),
        &format!(
            "guest RAM is not bound to node {node} with all {ZONE_HUGEPAGES} pages there: `{maps}`"
        ),
    );
    let before = rig.fact_i64(run, &format!("hp_node{node}_before"));
    let during = rig.fact_i64(run, &format!("hp_node{node}_during"));
    let after = rig.fact_i64(run, &format!("hp_node{node}_after"));
    rig.check(
        run,
        before - during == ZONE_HUGEPAGES && after == before,
        &format!("node {node} free hugepages went {before} -> {during} -> {after}"),
    );
    if rig.mode == RigMode::Nested {
        let cpus = rig
            .report
            .fact("l1", &format!("node{node}_cpus"))
            .unwrap_or_else(|| rig.fail(run, "L1 did not report its node CPUs"));
        let threads = run.fact("thread_cpus").unwrap_or_default();
        for vcpu in ["vcpu0", "vcpu1"] {
            rig.check(
                run,
                threads.contains(&format!("{vcpu}:{cpus};")),
                &format!("{vcpu} is not pinned to node {node}'s CPUs {cpus}: `{threads}`"),
            );
        }
    }
}

#[test]
fn mapped_bar_access_is_faster_than_trapped() {
    let rig = rig();
    let (Some(mapped), Some(trapped)) = (
        passthrough_run(rig, "passthrough"),
        passthrough_run(rig, "passthrough_trapped"),
    ) else {
        return;
    };
    let ns = |run: &ScenarioRun| -> f64 {
        run.line_containing("EDU-TEST bar_reads=")
            .and_then(|l| l.split("bar_read_ns=").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| rig.fail(run, "edu-test printed no bar_read_ns"))
    };
    let (fast, slow) = (ns(mapped), ns(trapped));
    rig.check(
        trapped,
        trapped.line_containing("EDU-TEST PASS").is_some(),
        "edu-test did not pass with every BAR access trapped",
    );
    rig.check(
        mapped,
        slow > 10.0 * fast,
        &format!("BAR read: {fast} ns mapped vs {slow} ns trapped; the mapped path is not taken"),
    );
}

/// The `badpassthrough` run of `case`: refused (exit 2, one error line containing
/// `expect`), no hugepages taken.
#[track_caller]
fn check_bad_passthrough(case: &str, expect: &str) {
    let rig = rig();
    if passthrough_run(rig, "passthrough").is_none() {
        return;
    }
    rig.check_refused("badpassthrough", case, &[expect]);
}

#[test]
fn bad_passthrough_address_exits_2() {
    check_bad_passthrough("bdf", "does not exist on this host");
}

#[test]
fn passthrough_device_not_on_vfio_pci_exits_2() {
    check_bad_passthrough(
        "driver",
        "is bound to pcieport but must be bound to vfio-pci",
    );
}

#[test]
fn passthrough_group_in_use_exits_2() {
    check_bad_passthrough("busy", "is in use by another process");
}
