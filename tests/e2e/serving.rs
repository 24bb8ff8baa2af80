//! End-to-end: two tenants, each booted from its own disk image with a tap and a vsock, serve
//! the Open Inference Protocol and OpenAI's `/v1/embeddings` with `ai-agent serve`, started
//! by the image's init from the tenant's config. L1 (outside the VMs) sends every request,
//! over the network and over vsock; the answers must equal the same models run here on the
//! host (exact for the MLP, JSON and binary tensors; cosine ≥ 0.9999 for MiniLM). Under a
//! shared load both tenants' requests all succeed while a third client sends tenant B
//! malformed ones, which get 4xx answers only.
//!
//! The scenario is `serving` in tests/rig/scenarios/serving.sh (runs `srv_daemon`, `srv_a`,
//! `srv_b`); the requests are in tests/rig/guest/serve/.

use aivmm_tests::{reference, rig, Rig, ScenarioRun};
use serde_json::Value;

const TENANTS: [&str; 2] = ["a", "b"];
const WAYS: [&str; 2] = ["tcp", "vsock"];

/// One `SERVE-OUT` answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

fn answer(rig: &Rig, run: &ScenarioRun, tenant: &str, via: &str, check: &str) -> Answer {
    let tag = format!("SERVE-OUT tenant={tenant} via={via} check={check} ");
    let line = run.line_containing(&tag).unwrap_or_else(|| {
        rig.fail(
            run,
            &format!("no answer recorded for {check} on tenant {tenant} via {via}"),
        )
    });
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("")
    };
    Answer {
        status: field("status").parse().unwrap_or(0),
        body: reference::from_hex(field("hex"))
            .unwrap_or_else(|e| rig.fail(run, &format!("{check}: body is not hex: {e}"))),
    }
}

fn json(rig: &Rig, run: &ScenarioRun, what: &str, bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        rig.fail(
            run,
            &format!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(bytes)),
        )
    })
}

/// An f32 tensor's `data` as little-endian bytes (what the host's run returns).
fn f32_bytes(data: &Value) -> Option<Vec<u8>> {
    data.as_array()?
        .iter()
        .map(|v| v.as_f64().map(|f| (f as f32).to_le_bytes()))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.concat())
}

fn guest_file(name: &str) -> Vec<u8> {
    let root = aivmm_tests::rig::workspace_root().expect("workspace root");
    std::fs::read(root.join("tests/rig/guest").join(name))
        .unwrap_or_else(|e| panic!("tests/rig/guest/{name}: {e}"))
}

#[test]
fn the_request_files_carry_the_reference_inputs() {
    // The JSON request must hold exactly the floats of mlp-input.bin, the embeddings requests
    // exactly sentence.txt: the host's reference runs use those files.
    let input = guest_file("mlp-input.bin");
    let req: Value = serde_json::from_slice(&guest_file("serve/mlp-request.json")).unwrap();
    assert_eq!(f32_bytes(&req["inputs"][0]["data"]), Some(input.clone()));
    let hdr: Value = serde_json::from_slice(&guest_file("serve/mlp-binary-header.json")).unwrap();
    assert_eq!(
        hdr["inputs"][0]["parameters"]["binary_data_size"].as_u64(),
        Some(input.len() as u64)
    );
    let text = String::from_utf8(guest_file("sentence.txt")).unwrap();
    let list: Value = serde_json::from_slice(&guest_file("serve/embeddings-request.json")).unwrap();
    assert_eq!(list["input"][0].as_str(), Some(text.as_str()));
    let one: Value = serde_json::from_slice(&guest_file("serve/embeddings-single.json")).unwrap();
    assert_eq!(one["input"].as_str(), Some(text.as_str()));
}

#[test]
fn the_daemon_and_both_endpoints_come_up() {
    let rig = rig();
    let run = rig.run("srv_daemon");
    rig.check(
        run,
        run.fact("missing").is_none(),
        "the rig has no ai-inferd, tenant image or rig-io",
    );
    for t in TENANTS {
        let vm = rig.run(&format!("srv_{t}"));
        rig.check(
            run,
            run.fact(&format!("ready_ms_{t}"))
                .is_some_and(|v| v != "na"),
            &format!("tenant {t}'s endpoint never answered /v2/health/ready"),
        );
        rig.check(
            vm,
            vm.line_containing("AIVMM-SERVE pid=").is_some(),
            &format!("tenant {t}'s init did not start ai-agent serve"),
        );
        for via in WAYS {
            let live = answer(rig, run, t, via, "live");
            rig.check(
                run,
                live.status == 200,
                &format!(
                    "tenant {t} via {via}: /v2/health/live answered {}",
                    live.status
                ),
            );
            let meta = answer(rig, run, t, via, "metadata");
            let m = json(rig, run, "model metadata", &meta.body);
            rig.check(
                run,
                meta.status == 200
                    && m["name"] == "mlp"
                    && m["inputs"][0]["datatype"] == "FP32"
                    && m["outputs"][0]["datatype"] == "FP32",
                &format!("tenant {t} via {via}: bad metadata ({}): {m}", meta.status),
            );
        }
    }
    rig.check(
        run,
        run.rc == Some(0),
        "ai-inferd did not exit 0 on SIGTERM",
    );
}

#[test]
fn mlp_answers_equal_the_host_run_with_json_and_binary_tensors() {
    let rig = rig();
    let run = rig.run("srv_daemon");
    let models = reference::Models::load().unwrap_or_else(|e| panic!("host models: {e}"));
    let host = models
        .mlp(&guest_file("mlp-input.bin"))
        .unwrap_or_else(|e| panic!("host MLP run: {e}"));
    for t in TENANTS {
        for via in WAYS {
            let a = answer(rig, run, t, via, "mlp_json");
            let v = json(rig, run, "MLP JSON answer", &a.body);
            let out = &v["outputs"][0];
            rig.check(
                run,
                a.status == 200
                    && out["datatype"] == "FP32"
                    && out["shape"] == serde_json::json!([2, 4])
                    && f32_bytes(&out["data"]).as_deref() == Some(host.as_slice()),
                &format!(
                    "tenant {t} via {via}: JSON MLP answer ({}) differs from the host run: {v}",
                    a.status
                ),
            );

            // The binary extension: a JSON header, then the raw output bytes.
            let b = answer(rig, run, t, via, "mlp_binary");
            let mut header = serde_json::Deserializer::from_slice(&b.body).into_iter::<Value>();
            let h = match header.next() {
                Some(Ok(h)) => h,
                other => rig.fail(
                    run,
                    &format!("binary MLP answer has no JSON header: {other:?}"),
                ),
            };
            let raw = &b.body[header.byte_offset()..];
            rig.check(
                run,
                b.status == 200
                    && h["outputs"][0]["parameters"]["binary_data_size"].as_u64()
                        == Some(host.len() as u64)
                    && raw == host.as_slice(),
                &format!(
                    "tenant {t} via {via}: binary MLP answer ({}) differs: header {h}, {} raw bytes",
                    b.status,
                    raw.len()
                ),
            );
        }
    }
}

#[test]
fn embeddings_match_the_host_run() {
    let rig = rig();
    let run = rig.run("srv_daemon");
    let models = reference::Models::load().unwrap_or_else(|e| panic!("host models: {e}"));
    let list: Value = serde_json::from_slice(&guest_file("serve/embeddings-request.json")).unwrap();
    let texts: Vec<&str> = list["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for t in TENANTS {
        for via in WAYS {
            let a = answer(rig, run, t, via, "embeddings");
            let v = json(rig, run, "embeddings answer", &a.body);
            let asked = if via == "tcp" {
                &texts[..]
            } else {
                &texts[..1]
            };
            let data = v["data"].as_array().cloned().unwrap_or_default();
            rig.check(
                run,
                a.status == 200 && data.len() == asked.len() && v["usage"].is_object(),
                &format!(
                    "tenant {t} via {via}: embeddings answer ({}): {v}",
                    a.status
                ),
            );
            for (i, text) in asked.iter().enumerate() {
                let host = models
                    .minilm(text.as_bytes())
                    .unwrap_or_else(|e| panic!("host MiniLM run: {e}"));
                let got: Vec<f32> = data
                    .iter()
                    .find(|d| d["index"].as_u64() == Some(i as u64))
                    .and_then(|d| d["embedding"].as_array())
                    .map(|e| {
                        e.iter()
                            .filter_map(Value::as_f64)
                            .map(|f| f as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                let cos = reference::cosine(&got, &host);
                rig.check(
                    run,
                    got.len() == host.len() && cos >= 0.9999,
                    &format!(
                        "tenant {t} via {via}: embedding {i}: {} values, cosine {cos} (need ≥ 0.9999)",
                        got.len()
                    ),
                );
            }
        }
    }
}

#[test]
fn bad_requests_get_protocol_errors() {
    let rig = rig();
    let run = rig.run("srv_daemon");
    for t in TENANTS {
        for via in WAYS {
            for (check, statuses) in [("unknown_model", &[400, 404][..]), ("malformed", &[400])] {
                let a = answer(rig, run, t, via, check);
                let v: Option<Value> = serde_json::from_slice(&a.body).ok();
                rig.check(
                    run,
                    statuses.contains(&a.status)
                        && v.as_ref().is_some_and(|v| v["error"].is_string()),
                    &format!(
                        "tenant {t} via {via}: {check} answered {} with {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    ),
                );
            }
        }
    }
}

/// `key=value` of a RIG-IO line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn under_load_with_a_malformed_neighbour_every_good_request_succeeds() {
    let rig = rig();
    let run = rig.run("srv_daemon");
    for t in TENANTS {
        let line = run
            .fact(&format!("load_{t}"))
            .unwrap_or_else(|| rig.fail(run, &format!("no load result for tenant {t}")));
        let ok: u64 = field(line, "ok").and_then(|v| v.parse().ok()).unwrap_or(0);
        rig.check(
            run,
            ok > 0
                && field(line, "errors") == Some("0")
                && Some(ok.to_string().as_str()) == field(line, "requests"),
            &format!("tenant {t}'s load had failures: {line}"),
        );
    }
    let bad = run
        .fact("load_bad")
        .unwrap_or_else(|| rig.fail(run, "no result for the malformed client"));
    let statuses = field(bad, "statuses").unwrap_or("none");
    rig.check(
        run,
        statuses != "none" && statuses.split(',').all(|s| s.starts_with('4')),
        &format!("the malformed client got answers other than 4xx: {bad}"),
    );
    // Each tenant's own /metrics counts at least the answers its clients counted.
    let answered = |line: &str, code: &str| -> u64 {
        field(line, "statuses")
            .unwrap_or("")
            .split(',')
            .find_map(|s| s.strip_prefix(code)?.strip_prefix(':')?.parse().ok())
            .unwrap_or(0)
    };
    for (t, code, seen) in [
        (
            "a",
            "200",
            answered(run.fact("load_a").unwrap_or(""), "200"),
        ),
        (
            "b",
            "200",
            answered(run.fact("load_b").unwrap_or(""), "200"),
        ),
        ("b", "400", answered(bad, "400")),
    ] {
        let m = answer(rig, run, t, "tcp", "metrics");
        let text = String::from_utf8_lossy(&m.body);
        let series = format!("ai_agent_http_requests_total{{endpoint=\"infer\",code=\"{code}\"}} ");
        let counted: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or(0);
        rig.check(
            run,
            m.status == 200 && counted >= seen,
            &format!(
                "tenant {t}'s /metrics counts {counted} infer answers with {code}, its clients saw {seen}"
            ),
        );
    }
}
