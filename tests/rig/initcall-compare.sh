#!/usr/bin/env bash
# Where a guest kernel's boot time goes under two VMMs: compares the `initcall_debug` lines of
# two guest kernel logs (bench-boot.sh with BENCH_DIAG_EXTRA=initcall_debug prints each VMM's
# after its diagnostic run, in OUT/l1-console.log under "--- <vmm> diag: console ---").
#
#   tests/rig/initcall-compare.sh A.console B.console [N]
#
# Prints the N (20) initcalls with the largest difference in time (A minus B), each with both
# durations, then the sum of all initcalls and the kernel timestamp at which each console
# reached `Run /init` / `Freeing unused kernel image`.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 A.console B.console [N]" >&2; exit 2; }
a=$1
b=$2
n=${3:-20}
awk -v n="$n" -v an="$(basename "$a")" -v bn="$(basename "$b")" '
FNR == 1 { f++ }
# "initcall foo+0x0/0x90 returned 0 after 123 usecs"
/initcall .* returned .* after [0-9]+ usecs/ {
    name = $0; sub(/.*initcall /, "", name); sub(/\+.*/, "", name); sub(/ .*/, "", name)
    us = $0; sub(/.* after /, "", us); sub(/ usecs.*/, "", us)
    t[f, name] += us; total[f] += us; seen[name] = 1
}
/Run \/init|Freeing unused kernel image/ && !((f, "init") in mark) {
    ts = $0; sub(/^[^[]*\[ */, "", ts); sub(/\].*/, "", ts); mark[f, "init"] = ts
}
END {
    for (k in seen) { d[k] = t[1, k] - t[2, k] }
    m = 0
    for (k in seen) keys[++m] = k
    # Selection sort by |difference|, largest first (few hundred entries).
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) {
        x = d[keys[i]]; y = d[keys[j]]
        if ((y < 0 ? -y : y) > (x < 0 ? -x : x)) { s = keys[i]; keys[i] = keys[j]; keys[j] = s }
    }
    printf "| initcall | %s (ms) | %s (ms) | difference (ms) |\n|---|---:|---:|---:|\n", an, bn
    for (i = 1; i <= m && i <= n; i++) {
        k = keys[i]
        printf "| %s | %.1f | %.1f | %+.1f |\n", k, t[1, k] / 1000, t[2, k] / 1000, d[k] / 1000
    }
    printf "\nAll initcalls: %.0f ms under %s, %.0f ms under %s\n", total[1] / 1000, an, total[2] / 1000, bn
    printf "Kernel timestamp at init: %s s under %s, %s s under %s\n", mark[1, "init"], an, mark[2, "init"], bn
}' "$a" "$b"
