#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Serving benchmark in the nested rig (docs/PERFORMANCE.md, "Serving inside a tenant"): one
# tenant of the serving scenario runs the same MLP request through its guest agent
# (`ai-agent bench`) and through `ai-agent serve` over HTTP on its own loopback, at 1, 4 and
# 16 concurrent clients, alternating; then L1 runs `ai-inferd bench --only overhead` (the
# model called directly in L1, and through the vhost-user path) for the reference.
# Run by hand (as root); not part of the test suite: about 15 min once everything is built.
#
#   tests/rig/bench-serve.sh [OUTDIR]        (default <repo>/target/rig-bench-serve)
#
# Environment: SB_N (300 requests per measurement), SB_ROUNDS (3).
# Prints a table (also OUTDIR/results.md); the raw lines are in OUTDIR/l1-console.log.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
cd "$root"
out=${1:-$root/target/rig-bench-serve}
mkdir -p "$out"

"$here/deps.sh"
"$root/devices/ai-inferd/models/setup.sh" >/dev/null
cargo build -q -p vmm --bin aivmm -p ai-inferd --bin ai-inferd -p guest-agent --bin ai-agent \
    -p rig-io --bin rig-io
target=$(cargo_target_dir "$root")
AIVMM_AGENT=$target/debug/ai-agent RIG_IO_BIN=$target/debug/rig-io \
    AI_INFERD_BIN=$target/debug/ai-inferd AI_MODELS_DIR=$root/target/models \
    "$here/build-l1.sh" "$out" "$target/debug/aivmm" "$here/scenarios.sh" >/dev/null
echo "bench-serve: booting L1 (QEMU TCG)"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
RIG_SCENARIOS=serve_bench "$here/run-l1.sh" "$out" "${BENCH_L1_TIMEOUT:-2400}" >/dev/null 2>&1 || true
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

tr -d '\r' <"$out/l1-console.log" | awk -v load="before $load_before, after $load_after" '
function kv(line, key,    m) {
    if (match(line, "(^| )" key "=[^ ]*")) {
        m = substr(line, RSTART, RLENGTH); sub(/^ /, "", m); sub(/^[^=]*=/, "", m); return m
    }
    return ""
}
function sort(a, n,    i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
}
function med(key,    i, a, n) {
    n = cnt[key]; if (n == 0) return ""
    for (i = 1; i <= n; i++) a[i] = val[key, i]
    sort(a, n); LO = a[1]; HI = a[n]
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
/^SB-RUN / {
    w = kv($0, "way"); c = kv($0, "concurrency")
    if (kv($0, "failed") != "0") bad++
    for (k in f) delete f[k]
    split("rps p50_us p99_us", ks, " ")
    for (i = 1; i <= 3; i++) { key = w SUBSEP c SUBSEP ks[i]; val[key, ++cnt[key]] = kv($0, ks[i]) + 0 }
}
/^SB-DONE/ { done = $0 }
/Paravirtual overhead on the host \(p50\)/ {
    if (match($0, /\(([0-9.]+) µs vs ([0-9.]+) µs\)/)) { s = substr($0, RSTART + 1, RLENGTH - 2); split(s, p, " "); path50 = p[1]; direct50 = p[4] }
}
END {
    printf "| way | clients | req/s, median (min..max) | p50 µs | p99 µs |\n|---|---:|---|---:|---:|\n"
    split("agent http", ws, " "); split("1 4 16", cs, " ")
    for (i = 1; i <= 2; i++) for (j = 1; j <= 3; j++) {
        w = ws[i]; c = cs[j]
        r = med(w SUBSEP c SUBSEP "rps"); rl = LO; rh = HI
        if (r == "") continue
        p5 = med(w SUBSEP c SUBSEP "p50_us"); p9 = med(w SUBSEP c SUBSEP "p99_us")
        printf "| %s | %s | %.1f (%.1f..%.1f) | %.0f | %.0f |\n", (w == "agent" ? "ai-agent bench" : "ai-agent serve, HTTP"), c, r, rl, rh, p5, p9
        R[w, c] = r; P[w, c] = p5
    }
    printf "\n"
    if (P["agent", 1] > 0) printf "HTTP / agent, p50 at 1 client: %.2f\n", P["http", 1] / P["agent", 1]
    for (i = 1; i <= 2; i++) if (R[ws[i], 1] > 0) printf "%s: req/s at 4 clients %.2fx, at 16 clients %.2fx of 1 client\n", ws[i], R[ws[i], 4] / R[ws[i], 1], R[ws[i], 16] / R[ws[i], 1]
    if (direct50 != "") printf "ai-inferd in L1, the same model: called directly p50 %s µs, through the vhost-user path %s µs; guest agent p50 at 1 client / direct = %.1f\n", direct50, path50, P["agent", 1] / direct50
    printf "guest: %s; measurements with failures: %d; host load %s\n", done, bad + 0, load
}' | tee "$out/results.md"
