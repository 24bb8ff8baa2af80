# shellcheck shell=bash disable=SC2034,SC2154 # it sets variables for its caller, which sets $here
# Sourced by the benchmarks that run VMMs inside the nested rig's L1 (bench-boot.sh,
# bench-io.sh): boots the L1 that build-l1.sh made, watches it, keeps the rounds it completed
# and boots a new L1 for the rounds still missing.
#
#   bench_l1_rounds NAME OUTDIR RUNS
#
# The L1 side (the scenario script) prints, on L1's console:
#   BENCH-FACT <key>=<value>          facts; `BENCH-FACT variants=<names>` once, before round 1
#   BENCH-RUN vmm=<name> run=<n> ...  one line per measured VMM run (run= may also be a word,
#                                     e.g. probe: such lines are kept as they are)
#   BENCH-DONE                        the end
# and runs as many rounds as `bench.runs=N` on L1's kernel command line asks for.
# Needs $here (tests/rig). Leaves OUTDIR/bench-lines.txt (the BENCH- lines of every L1 boot,
# runs renumbered in order, facts from the first boot only), OUTDIR/l1-console.<boot>.log, and
# sets BENCH_COMPLETE (1 when BENCH-DONE came), BENCH_ROUNDS (complete rounds) and
# BENCH_BOOTS (L1 boots used). Environment: BENCH_STALL (420 s of L1 console silence before a
# stuck L1 is stopped), BENCH_L1_ATTEMPTS (3 L1 boots at most), BENCH_L1_TIMEOUT (3600 s for
# each L1 boot).

# kv(line, key): the value of `key=value` in a BENCH- line ("" when absent); for the callers'
# awk programs too.
AWK_KV='
function kv(line, key,    m) {
    if (match(line, "(^| )" key "=[^ ]*")) {
        m = substr(line, RSTART, RLENGTH); sub(/^ /, "", m); sub(/^[^=]*=/, "", m); return m
    }
    return ""
}'

# sort(a, n), median(a, n), stats(arr, v, cnt): median, min and max of arr[v, 1..cnt] into the
# globals MED, LO, HI. Medians of an even count are the mean of the two middle values.
AWK_STATS='
function sort(a, n,    i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
}
function median(a, n) { return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
function stats(arr, v, cnt,    i, a) {
    for (i = 1; i <= cnt; i++) a[i] = arr[v, i] + 0
    sort(a, cnt); MED = median(a, cnt); LO = a[1]; HI = a[cnt]
}'

# run-l1.sh in a session of its own, so that a stuck L1 can be stopped with its QEMU (L1 now
# and then gets stuck for good when QEMU runs inside it, see docs/PERFORMANCE.md). Every VMM
# run ends with a BENCH-RUN line within the L1 side's own time limit, so no new BENCH- line for
# BENCH_STALL seconds of wall time means L1 is stuck (its kernel may still print hung-task
# reports); run-l1.sh's own heartbeat watchdog usually notices first (exit 125).
# _bench_l1_boot NAME OUTDIR ROUNDS: one L1 boot asking for ROUNDS rounds; sets RC and STALLED.
_bench_l1_boot() {
    local name=$1 out=$2 log=$2/l1-console.log
    RIG_L1_APPEND="bench.runs=$3" setsid "$here/run-l1.sh" "$out" "${BENCH_L1_TIMEOUT:-3600}" \
        >/dev/null 2>&1 &
    local l1=$! last_count=-1 last_change=$SECONDS count stall=${BENCH_STALL:-420}
    STALLED=0
    while kill -0 "$l1" 2>/dev/null; do
        sleep 10
        count=$(grep -c 'BENCH-' "$log" 2>/dev/null || true)
        if [ "${count:-0}" != "$last_count" ]; then
            last_count=${count:-0}
            last_change=$SECONDS
        elif [ $((SECONDS - last_change)) -ge "$stall" ]; then
            echo "$name: no progress from L1 for ${stall}s; stopping L1" | tee -a "$log" >&2
            STALLED=1
            kill -TERM -- "-$l1" 2>/dev/null || true
            break
        fi
    done
    set +e
    wait "$l1"
    RC=$?
    set -e
}

# _bench_keep_rounds OUTDIR OFFSET FIRST < lines: the BENCH- lines of one L1 boot with its
# measured runs limited to its complete rounds (every variant it kept ran) and renumbered after
# OFFSET earlier rounds; facts only when FIRST is 1. The number of complete rounds goes to
# OUTDIR/rounds.
_bench_keep_rounds() {
    awk -v offset="$2" -v first="$3" -v rounds_file="$1/rounds" "$AWK_KV"'
    { lines[++n] = $0 }
    /^BENCH-FACT variants=/ { nv = split(substr($0, length("BENCH-FACT variants=") + 1), vs, " ") }
    /^BENCH-RUN / { r = kv($0, "run"); if (r ~ /^[0-9]+$/) got[r]++ }
    END {
        k = 0
        while (nv > 0 && got[k + 1] == nv) k++
        for (i = 1; i <= n; i++) {
            l = lines[i]
            if (l ~ /^BENCH-FACT / && !first) continue
            if (l ~ /^BENCH-RUN /) {
                r = kv(l, "run")
                if (r ~ /^[0-9]+$/) {
                    if (r + 0 > k) continue
                    sub(" run=" r " ", " run=" (r + offset) " ", l)
                }
            }
            print l
        }
        print k > rounds_file
    }'
}

bench_l1_rounds() {
    local name=$1 out=$2 runs=$3 attempt got first
    local log=$out/l1-console.log attempts=${BENCH_L1_ATTEMPTS:-3}
    BENCH_ROUNDS=0
    BENCH_COMPLETE=0
    BENCH_BOOTS=0
    : >"$out/bench-lines.txt"
    for attempt in $(seq 1 "$attempts"); do
        BENCH_BOOTS=$attempt
        rm -f "$log"
        _bench_l1_boot "$name" "$out" $((runs - BENCH_ROUNDS))
        cp "$log" "$out/l1-console.$attempt.log" 2>/dev/null || true
        first=0
        [ -s "$out/bench-lines.txt" ] || first=1
        tr -d '\r' <"$log" | grep -E '^BENCH-' | _bench_keep_rounds "$out" "$BENCH_ROUNDS" "$first" \
            >>"$out/bench-lines.txt" || true
        got=$(cat "$out/rounds" 2>/dev/null || echo 0)
        BENCH_ROUNDS=$((BENCH_ROUNDS + got))
        if grep -q '^BENCH-DONE' "$out/bench-lines.txt"; then
            BENCH_COMPLETE=1
            break
        fi
        echo "$name: L1 boot $attempt of $attempts did not finish (run-l1.sh exit $RC, stalled=$STALLED; $got complete rounds, $BENCH_ROUNDS of $runs in all); last lines of its console ($out/l1-console.$attempt.log):" >&2
        tail -n 20 "$log" >&2
    done
}
