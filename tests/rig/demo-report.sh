#!/usr/bin/env bash
# The demo's summary, from the `serving` scenario's lines in a rig log (tests/rig/demo.sh):
# per tenant the requests of the shared load, their latency, the share of the accelerator's
# time against the tenant's weight, what the malformed client got, and ai-inferd's `top`.
#
#   tests/rig/demo-report.sh LOG
#
# Exit code: 0 when both tenants' load got only successes and every endpoint check answered
# as expected, 1 otherwise.
set -euo pipefail
log=${1:?usage: demo-report.sh LOG}

tr -d '\r' <"$log" | awk '
function kv(line, key,    m) {
    if (match(line, "(^| )" key "=[^ ]*")) {
        m = substr(line, RSTART, RLENGTH); sub(/^ /, "", m); sub(/^[^=]*=/, "", m); return m
    }
    return ""
}
/^RIG-FACT srv_daemon load_/ { t = $3; sub(/=.*/, "", t); sub(/^load_/, "", t); load[t] = $0 }
/^ai-inferd top: tenant-/ { n = split($0, f, " +"); share[f[3]] = f[6]; fair[f[3]] = f[7]; weight[f[3]] = f[5] }
/^ai-inferd top: / { top[++ntop] = substr($0, 16) }
/^SERVE-OUT / {
    c = kv($0, "check"); s = kv($0, "status")
    want = (c == "unknown_model") ? "^40[04]$" : (c == "malformed") ? "^400$" : "^200$"
    checks++; if (s ~ want) good++; else bad_checks = bad_checks sprintf("  %s %s %s answered %s\n", kv($0, "tenant"), kv($0, "via"), c, s)
}
END {
    ok = 1
    printf "%-9s %6s %9s %9s %8s %9s %9s %14s\n", "tenant", "weight", "requests", "failed", "req/s", "p50", "p99", "accel. share"
    for (i = 1; i <= 2; i++) {
        t = (i == 1) ? "a" : "b"; name = "tenant-" t; l = load[t]
        if (l == "") { printf "%-9s no load result\n", name; ok = 0; continue }
        failed = kv(l, "requests") - kv(l, "ok") + kv(l, "errors")
        if (failed != 0 || kv(l, "ok") == 0) ok = 0
        printf "%-9s %6s %9s %9d %8s %7.1fms %7.1fms %14s\n", name, weight[name], kv(l, "requests"), failed, kv(l, "rps"), kv(l, "p50_us") / 1000, kv(l, "p99_us") / 1000, share[name] " (fair " fair[name] ")"
    }
    for (t in share) { d = share[t] - fair[t]; if (d > 10 || d < -10) apart = 1 }
    c = kv(load["a"], "concurrency") + 0
    if (apart && c > 0 && 2 * c <= 8) printf "(Weights decide only when the tenants queue more work than one batch takes. This load keeps %s requests per tenant in flight, together no more than one batch of the model (8), so nothing waits for the other tenant and the shares follow demand. With many more clients, requests under the nested rig'"'"'s emulation queue past the clients'"'"' timeout. Shares under saturation: docs/PERFORMANCE.md, \"Scheduler\".)\n", c
    b = load["bad"]
    if (b != "") printf "\na malformed client sent tenant B %s requests meanwhile: answers %s (tenant A and B'"'"'s own clients above are unaffected)\n", kv(b, "requests"), kv(b, "statuses")
    printf "endpoint checks (OIP health, metadata, MLP JSON and binary tensors, embeddings, errors; tap and vsock): %d of %d as expected\n", good, checks
    if (good != checks || checks == 0) { ok = 0; printf "%s", bad_checks }
    if (ntop > 0) { printf "\n"; for (i = 1; i <= ntop; i++) print top[i] }
    exit !ok
}'
