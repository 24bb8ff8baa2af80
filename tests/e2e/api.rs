//! End-to-end: aivmm driven through its Firecracker-compatible control API, as Firecracker's
//! users drive Firecracker. In L1, aivmm is started with only `--api-sock`; `curl
//! --unix-socket` configures the boot source, machine, a root drive, a network interface on a
//! tap and a vsock, starts the VM, pauses and resumes it and flushes its metrics, and each
//! answer is checked. The L2 guest boots from the drive and moves data both ways over the
//! interface and the vsock. Then the same tenant boots from the equivalent `--config-file`
//! JSON with `--no-api`.
//!
//! The scenario is `api` in tests/rig/scenarios/api.sh (runs `api_sock` and `api_json`); the
//! guest side is tests/rig/guest/api-check.sh.

use aivmm_tests::{reference, rig, Rig, ScenarioRun};
use serde_json::Value;

/// One `API-CALL` line: status and body.
fn call(rig: &Rig, run: &ScenarioRun, name: &str) -> (u16, String) {
    let tag = format!("API-CALL {name} ");
    let line = run
        .line_containing(&tag)
        .unwrap_or_else(|| rig.fail(run, &format!("the API call `{name}` was not made")));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("")
    };
    let body = reference::from_hex(field("body"))
        .unwrap_or_else(|e| rig.fail(run, &format!("`{name}`: body is not hex: {e}")));
    (
        field("status").parse().unwrap_or(0),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[track_caller]
fn expect_status(rig: &Rig, run: &ScenarioRun, name: &str, status: u16) -> String {
    let (got, body) = call(rig, run, name);
    rig.check(
        run,
        got == status,
        &format!("`{name}` answered {got} (expected {status}): {body}"),
    );
    body
}

#[track_caller]
fn expect_state(rig: &Rig, run: &ScenarioRun, name: &str, state: &str) {
    let body = expect_status(rig, run, name, 200);
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    rig.check(
        run,
        v["state"] == state && v["app_name"] == "aivmm",
        &format!("`{name}`: expected state {state:?}: {body}"),
    );
}

#[track_caller]
fn expect_fault(rig: &Rig, run: &ScenarioRun, name: &str, mentions: &str) {
    let body = expect_status(rig, run, name, 400);
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    rig.check(
        run,
        v["fault_message"]
            .as_str()
            .is_some_and(|m| m.contains(mentions)),
        &format!("`{name}`: the fault message should mention {mentions:?}: {body}"),
    );
}

/// The guest booted from the drive and moved data both ways over the interface and vsock;
/// L1's side of each transfer agrees.
#[track_caller]
fn check_guest(rig: &Rig, run: &ScenarioRun) {
    rig.check(
        run,
        run.rc == Some(0),
        "aivmm did not exit 0 after the guest stopped",
    );
    rig.check(
        run,
        run.line_containing("AIVMM-API-GUEST root=/dev/vda")
            .is_some(),
        "the guest did not boot from the configured drive",
    );
    for step in [
        "AIVMM-NET guest-recv",
        "AIVMM-NET guest-send",
        "AIVMM-VSOCK guest-recv",
        "AIVMM-VSOCK guest-send",
    ] {
        let line = run.line_containing(step).unwrap_or("");
        rig.check(
            run,
            line.contains("ok=1"),
            &format!("{step}: the guest's side failed: `{line}`"),
        );
    }
    for step in ["net_send", "net_recv", "vsock_send", "vsock_recv"] {
        let line = run.fact(&format!("host_{step}")).unwrap_or("");
        rig.check(
            run,
            line.contains("ok=1"),
            &format!("{step}: L1's side failed: `{line}`"),
        );
    }
    rig.check(
        run,
        run.line_containing("AIVMM-API-DONE rc=0").is_some(),
        "the guest's checks did not all pass",
    );
}

#[test]
fn a_tenant_configured_over_the_api_socket_boots_and_is_controlled() {
    let rig = rig();
    let run = rig.run("api_sock");
    rig.check(run, run.fact("missing").is_none(), "L1 has no curl");
    rig.check(
        run,
        run.fact_i64("socket_ms").is_some_and(|ms| ms < 30_000),
        "the API socket never answered",
    );
    expect_state(rig, run, "info_before", "Not started");
    for name in ["boot_source", "machine", "drive", "net", "vsock", "metrics"] {
        expect_status(rig, run, name, 204);
    }
    expect_fault(rig, run, "bad_field", "warp_drive");
    let config = expect_status(rig, run, "vm_config", 200);
    let v: Value = serde_json::from_str(&config).unwrap_or(Value::Null);
    rig.check(
        run,
        v["drives"][0]["drive_id"] == "rootfs"
            && v["network-interfaces"][0]["host_dev_name"] == "api0"
            && v["machine-config"]["vcpu_count"] == 2
            && v["machine-config"]["huge_pages"] == "2M",
        &format!("GET /vm/config does not show what was configured: {config}"),
    );
    expect_status(rig, run, "start", 204);
    expect_state(rig, run, "info_running", "Running");
    let load = run.fact("get_load").unwrap_or("");
    rig.check(
        run,
        load.contains("requests=200 ok=200 errors=0"),
        &format!("GET / while the guest runs did not always answer 200: {load}"),
    );
    rig.check(
        run,
        run.fact("socket_ready")
            .is_some_and(|f| f.contains("wall_us=") && f.contains("cpu_us=")),
        "aivmm did not log when its API socket was ready",
    );
    expect_fault(rig, run, "boot_after_start", "");
    expect_status(rig, run, "patch_drive", 204);
    expect_status(rig, run, "patch_net", 204);
    expect_status(rig, run, "pause", 204);
    expect_state(rig, run, "info_paused", "Paused");
    expect_status(rig, run, "resume", 204);
    expect_state(rig, run, "info_resumed", "Running");
    expect_status(rig, run, "flush", 204);
    rig.check(
        run,
        run.fact_i64("metrics_lines").is_some_and(|n| n >= 1),
        "FlushMetrics wrote nothing to metrics_path",
    );
    let prom = expect_status(rig, run, "prometheus", 200);
    rig.check(
        run,
        prom.lines().any(|l| !l.starts_with('#') && !l.is_empty()),
        &format!("GET /metrics/prometheus has no samples: {prom}"),
    );
    check_guest(rig, run);
    // Its checks done, the guest waited for Ctrl+Alt+Del: the keys reached its keyboard
    // driver, the kernel signalled init, and init shut the tenant down in order.
    rig.check(
        run,
        run.fact("await_cad") == Some("0"),
        "the guest never waited for Ctrl+Alt+Del",
    );
    expect_status(rig, run, "cad", 204);
    rig.check(
        run,
        run.line_containing("aivmm-init: Ctrl+Alt+Del, shutting down")
            .is_some(),
        &format!(
            "SendCtrlAltDel did not reach the guest's init; its keyboard: `{}`",
            run.line_containing("AIVMM-API-KBD")
                .unwrap_or("(no AIVMM-API-KBD line)")
        ),
    );
    let stopped = run.fact("stopped").unwrap_or("");
    rig.check(
        run,
        stopped.contains("ACPI power off"),
        &format!("after Ctrl+Alt+Del the VM stopped with `{stopped}`, not its power-off"),
    );
    rig.check(
        run,
        run.fact("socket_left") == Some("0"),
        "the API socket was left behind after aivmm exited",
    );
}

#[test]
fn the_same_tenant_boots_from_the_json_config_file() {
    let rig = rig();
    check_guest(rig, rig.run("api_json"));
}
