//! End-to-end: two tenant VMs share one ai-inferd through their ai_infer devices. Each
//! guest's agent runs the MLP (ONNX, tract) and MiniLM (safetensors, candle) models; the
//! outputs must match the same models run here on the host (exact for the MLP, cosine
//! ≥ 0.9999 for the MiniLM embedding). Tenant B then plays a hostile driver: every
//! malformed chain gets its error while tenant A's stream of requests keeps succeeding.
//!
//! The scenario is `ai_infer` in tests/rig/scenarios/ai-infer.sh (runs `ai_daemon`, `ai_a`, `ai_b`);
//! the guest side is tests/rig/guest/ai-infer.sh.

use std::path::PathBuf;

use aivmm_tests::{reference, rig, Rig, ScenarioRun};

/// The output the guest printed for `model` (`GUEST-AI-OUT model=M hex=...`), as bytes.
fn guest_output(rig: &Rig, run: &ScenarioRun, model: &str) -> Vec<u8> {
    let prefix = format!("GUEST-AI-OUT model={model} hex=");
    let line = run
        .line_containing(&prefix)
        .unwrap_or_else(|| rig.fail(run, &format!("the guest printed no {model} output")));
    let hex = line[line.find(&prefix).unwrap_or(0) + prefix.len()..].trim();
    reference::from_hex(hex)
        .unwrap_or_else(|e| rig.fail(run, &format!("{model} output is not hex: {e}")))
}

fn guest_inputs() -> (Vec<u8>, Vec<u8>) {
    let dir = aivmm_tests::rig::workspace_root()
        .map(|r| r.join("tests/rig/guest"))
        .unwrap_or_else(|_| PathBuf::from("tests/rig/guest"));
    let mlp = std::fs::read(dir.join("mlp-input.bin")).expect("tests/rig/guest/mlp-input.bin");
    let text = std::fs::read(dir.join("sentence.txt")).expect("tests/rig/guest/sentence.txt");
    (mlp, text)
}

#[track_caller]
fn check_status_line(rig: &Rig, run: &ScenarioRun, line: &str, what: &str) {
    rig.check(run, run.line_containing(line).is_some(), what);
}

#[test]
fn daemon_serves_and_stops_cleanly() {
    let rig = rig();
    let run = rig.run("ai_daemon");
    rig.check(
        run,
        run.fact("missing").is_none(),
        "the rig has no ai-inferd or no models",
    );
    rig.check(
        run,
        run.fact("died_early").is_none(),
        "ai-inferd exited before the tenants were done",
    );
    rig.check(
        run,
        run.rc == Some(0),
        "ai-inferd did not exit 0 on SIGTERM",
    );
}

#[test]
fn both_tenants_get_outputs_identical_to_the_host_run() {
    let rig = rig();
    let (mlp_input, text) = guest_inputs();
    let models = reference::Models::load().unwrap_or_else(|e| panic!("host models: {e}"));
    let mlp_host = models
        .mlp(&mlp_input)
        .unwrap_or_else(|e| panic!("host MLP run: {e}"));
    let emb_host = models
        .minilm(&text)
        .unwrap_or_else(|e| panic!("host MiniLM run: {e}"));
    for name in ["ai_a", "ai_b"] {
        let run = rig.run(name);
        rig.check(run, run.rc == Some(0), "aivmm did not exit 0");
        // Exit code 0 also covers a guest that died in a triple fault.
        let stopped = run.fact("stopped").unwrap_or("(not said)");
        rig.check(
            run,
            stopped.contains("ACPI power off"),
            &format!("the guest did not power itself off: aivmm says it stopped because {stopped}"),
        );
        check_status_line(rig, run, "GUEST-AI models_rc=0", "ai-agent models failed");
        check_status_line(
            rig,
            run,
            "GUEST-AI infer_mlp_rc=0",
            "the MLP inference failed",
        );
        check_status_line(
            rig,
            run,
            "GUEST-AI infer_minilm_rc=0",
            "the MiniLM inference failed",
        );
        let mlp = guest_output(rig, run, "mlp");
        rig.check(
            run,
            mlp == mlp_host,
            &format!(
                "MLP output differs from the host's: guest {} bytes {:02x?}, host {} bytes {:02x?}",
                mlp.len(),
                &mlp[..mlp.len().min(32)],
                mlp_host.len(),
                &mlp_host[..mlp_host.len().min(32)]
            ),
        );
        let emb = reference::f32s(&guest_output(rig, run, "minilm"));
        let cos = reference::cosine(&emb, &emb_host);
        rig.check(
            run,
            emb.len() == emb_host.len() && cos >= 0.9999,
            &format!(
                "MiniLM embedding: {} values, cosine {cos} to the host's {} values (need ≥ 0.9999)",
                emb.len(),
                emb_host.len()
            ),
        );
    }
}

#[test]
fn garbage_gets_errors_while_the_other_tenant_keeps_working() {
    let rig = rig();
    let b = rig.run("ai_b");
    let cases: Vec<&String> = b
        .output
        .iter()
        .filter(|l| l.contains("GARBAGE case="))
        .collect();
    for line in &cases {
        rig.check(
            b,
            line.trim_end().ends_with("ok=yes"),
            &format!("unexpected answer: {line}"),
        );
    }
    let done = b
        .line_containing("GARBAGE-DONE")
        .unwrap_or_else(|| rig.fail(b, "the hostile-driver probe did not finish"));
    rig.check(
        b,
        done.contains("passed=8 of=8") && !done.contains("models_after=0"),
        &format!("hostile-driver probe: {done}"),
    );
    let a = rig.run("ai_a");
    let loop_line = a
        .line_containing("GUEST-AI loop_ok=")
        .unwrap_or_else(|| rig.fail(a, "tenant A's request stream did not finish"));
    let field = |k: &str| -> i64 {
        loop_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    let (ok, n) = (field("loop_ok="), field("loop_n="));
    rig.check(
        a,
        n > 0 && ok == n,
        &format!("tenant A: {ok} of {n} requests succeeded with the right output"),
    );
}
