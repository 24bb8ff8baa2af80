#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `make demo`: ai-inferd and two tenant microVMs, each booted from its own disk image with a
# tap and a vsock and serving the Open Inference Protocol and /v1/embeddings with
# `ai-agent serve`; requests come from outside the VMs. Ends with a summary per tenant.
#
# Where this host's KVM boots Linux (tests/rig/host-can-boot-linux.sh), aivmm and ai-inferd
# run here; elsewhere (the development and CI machines) inside the nested rig's L1 (whose
# forwarded ports reach them). Either way each tenant's endpoint is on this machine's loopback:
#   AIVMM_DEMO_PORT (8001)    tenant A over its tap     +1: tenant A over vsock
#                             +2: tenant B over its tap +3: tenant B over vsock
# The scenario is `serving` (tests/rig/scenarios/serving.sh); the raw rig output goes to the
# log file, the screen gets the story.
#   AIVMM_DEMO_KEEP=1     keep the tenants serving after the summary, until Ctrl-C
#   AIVMM_DEMO_SECS=N     seconds of shared load (default 30)
#   AIVMM_DEMO_LOAD=mlp|embeddings  what the shared load sends (default mlp: under the
#                         nested rig's emulation one MiniLM batch takes tens of seconds, so
#                         an embeddings load yields a handful of requests, and on a slow host
#                         they queue past the clients' 60 s timeout)
#   AIVMM_DEMO_CLIENTS=N  concurrent clients per tenant in the load (default 4)
#   AIVMM_DEMO=boot       boot configs/tenant-demo.toml alone instead (no inference)
# Exit code: 0 when every request of the well-behaved clients succeeded and the daemon and
# both VMs stopped cleanly.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
cd "$root"

say() {
    # Bold headings on a terminal, plain text in logs.
    if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

out=$root/target/rig/demo
mkdir -p "$out"
steps=$out/demo-steps.log
: >"$steps"
# quietly WHAT CMD...: runs CMD with its output in the steps log; shows it only on failure.
quietly() {
    local what=$1
    shift
    say "$what"
    if ! "$@" >>"$steps" 2>&1; then
        tail -n 30 "$steps" >&2
        echo "demo: $what failed (full output: $steps)" >&2
        exit 1
    fi
}

quietly "installing dependencies, the guest kernel and the models" \
    bash -c '"$1/deps.sh" && "$2/devices/ai-inferd/models/setup.sh"' _ "$here" "$root"
quietly "building ai-inferd, ai-agent and rig-io" \
    cargo build -p ai-inferd --bin ai-inferd -p guest-agent --bin ai-agent -p rig-io --bin rig-io
target=$(cargo_target_dir "$root")
# aivmm as operators install it: the static release build (`make release`).
if [ -n "${AIVMM_BIN:-}" ]; then
    aivmm=$AIVMM_BIN
else
    quietly "building aivmm (the static release build, vmm/build-static.sh)" \
        bash -c '"$1" >"$2"' _ "$root/vmm/build-static.sh" "$out/aivmm-dir"
    aivmm=$(cat "$out/aivmm-dir")/aivmm
fi
export AIVMM_AGENT=$target/debug/ai-agent RIG_IO_BIN=$target/debug/rig-io

if [ "${AIVMM_DEMO:-}" = boot ]; then
    exec "$here/demo-boot.sh" "$out" "$aivmm"
fi

set +e
reason=$("$here/host-can-boot-linux.sh")
direct=$?
set -e
say "$reason"
keep=${AIVMM_DEMO_KEEP:-0}
export SRV_LOAD_SECS=${AIVMM_DEMO_SECS:-30}
export SRV_LOAD=${AIVMM_DEMO_LOAD:-mlp}
export SRV_CONCURRENCY=${AIVMM_DEMO_CLIENTS:-4}
base=${AIVMM_DEMO_PORT:-8001}

# The tenants' endpoints as a person reaches them from this machine.
ports=("$base" $((base + 1)) $((base + 2)) $((base + 3)))
show_endpoints() {
    cat <<EOT
  tenant A (weight 1): http://127.0.0.1:${ports[0]} (its tap)   http://127.0.0.1:${ports[1]} (its vsock)
  tenant B (weight 3): http://127.0.0.1:${ports[2]} (its tap)   http://127.0.0.1:${ports[3]} (its vsock)
  curl http://127.0.0.1:${ports[0]}/v2/models/mlp
  curl -H 'Content-Type: application/json' -d @tests/rig/guest/serve/mlp-request.json \\
       http://127.0.0.1:${ports[0]}/v2/models/mlp/infer
  curl -H 'Content-Type: application/json' \\
       -d '{"model": "all-MiniLM-L6-v2", "input": "hello from outside the VM"}' \\
       http://127.0.0.1:${ports[2]}/v1/embeddings
EOT
}

# follow LOG PID: the story of the run, from the rig's lines, while PID runs.
follow() {
    local log=$1 pid=$2 shown=0 line
    while kill -0 "$pid" 2>/dev/null || [ "$shown" -lt "$(wc -l <"$log")" ]; do
        while IFS= read -r line; do
            shown=$((shown + 1))
            line=${line%$'\r'}
            case $line in
            "RIG-FACT srv_daemon ready_ms="*) echo "ai-inferd is up (${line##*=} ms)" ;;
            "RIG-FACT srv_daemon ready_ms_a="*) echo "tenant A serves (boot to ready: ${line##*=} ms)" ;;
            "RIG-FACT srv_daemon ready_ms_b="*)
                echo "tenant B serves (boot to ready: ${line##*=} ms); from your shell:"
                show_endpoints
                echo "checking every endpoint over both ways in, then $SRV_LOAD_SECS s of shared load..."
                ;;
            "RIG-SERVE-KEEP"*)
                say "summary (the rig's full log: $log)"
                "$here/demo-report.sh" "$log" || true
                echo
                echo "the tenants keep serving; Ctrl-C ends the demo"
                show_endpoints
                ;;
            esac
        done < <(tail -n +$((shown + 1)) "$log")
        sleep 1
    done
}

set +e
if [ "$direct" -eq 0 ]; then
    say "aivmm and ai-inferd on this host"
    log=$out/direct-console.log
    : >"$log"
    SRV_PUBLISH=1 SRV_PUBLISH_PORT=$base SRV_KEEP=$keep AI_INFERD=$target/debug/ai-inferd AI_MODELS=$root/target/models \
        AI_MANIFEST=$root/configs/models.toml \
        setsid "$here/run-direct.sh" "$out" "$aivmm" serving >/dev/null 2>&1 &
    rig=$!
    trap 'kill -TERM -- "-$rig" 2>/dev/null; interrupted=1' INT TERM
    follow "$log" "$rig"
    wait "$rig"
else
    quietly "building the nested rig's L1 (aivmm, ai-inferd, the models, two tenant disk images)" \
        env AI_INFERD_BIN="$target/debug/ai-inferd" AI_MODELS_DIR="$root/target/models" \
        "$here/build-l1.sh" "$out" "$aivmm" "$here/scenarios.sh"
    log=$out/l1-console.log
    fwd=
    for i in 1 2 3 4; do
        fwd+=",hostfwd=tcp:127.0.0.1:${ports[$((i - 1))]}-:1800$i"
    done
    append="rig.serve_publish=1 rig.serve_load=$SRV_LOAD rig.serve_secs=$SRV_LOAD_SECS"
    append+=" rig.serve_clients=$SRV_CONCURRENCY"
    [ "$keep" = 1 ] && append+=" rig.serve_keep=1"
    # A lost L1 (run-l1.sh found it wedged: exit 125) is booted once more, as the e2e rig does
    # (tests/README.md); a demo that ran and failed is not.
    for boot in 1 2; do
        say "booting L1 under QEMU TCG; it starts ai-inferd and the two tenants (a few minutes)"
        : >"$log"
        RIG_SCENARIOS=serving RIG_L1_APPEND="$append" \
            RIG_QEMU_EXTRA="-nic user,model=virtio-net-pci$fwd" \
            setsid "$here/run-l1.sh" "$out" "${AIVMM_DEMO_TIMEOUT:-1800}" >/dev/null 2>&1 &
        l1=$!
        # L1 runs in a session of its own: a Ctrl-C here stops that whole session (QEMU
        # included), then the summary is printed.
        trap 'kill -TERM -- "-$l1" 2>/dev/null; interrupted=1' INT TERM
        follow "$log" "$l1"
        wait "$l1"
        l1_rc=$?
        [ "$l1_rc" = 125 ] && [ -z "${interrupted:-}" ] || break
        cp "$log" "$out/l1-console.boot$boot.log"
        say "L1 was lost before the demo finished (its log: $out/l1-console.boot$boot.log)"
    done
fi
set -e

[ "$keep" = 1 ] && exit 0
say "summary (the rig's full log: $log)"
"$here/demo-report.sh" "$log"
