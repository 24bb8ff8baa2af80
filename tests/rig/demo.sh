#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `make demo`: build everything, start ai-inferd and two tenant microVMs that run inference
# through their ai_infer devices, and show what the guests got.
#
# Where this host's KVM boots Linux (tests/rig/host-can-boot-linux.sh), aivmm and ai-inferd
# run here; elsewhere (the development and CI machines) inside the nested rig's L1.
# The daemon is tests/rig/configs/ai-inferd.toml, the tenants tests/rig/configs/ai-tenant-{a,b}
# .toml (each guest runs tests/rig/guest/ai-infer.sh: models, an MLP and a MiniLM inference,
# then tenant A streams requests while tenant B tries malformed ones).
# AIVMM_DEMO=boot boots configs/tenant-demo.toml alone instead (no inference).
# Exit code: 0 when the daemon and both VMs exited 0.
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

say "installing dependencies, the guest kernel and the models"
"$here/deps.sh"
"$root/devices/ai-inferd/models/setup.sh"

say "building aivmm, ai-inferd and ai-agent"
cargo build -p vmm --bin aivmm -p ai-inferd --bin ai-inferd -p guest-agent --bin ai-agent
target=$(cargo_target_dir "$root")
aivmm=${AIVMM_BIN:-$target/debug/aivmm}
export AIVMM_AGENT=$target/debug/ai-agent

scenario=ai_infer
[ "${AIVMM_DEMO:-}" = boot ] && scenario=demo

out=$root/target/rig/demo
mkdir -p "$out"
set +e
reason=$("$here/host-can-boot-linux.sh")
direct=$?
set -e
say "$reason"
tenant=$root/configs/tenant-demo.toml

set +e
if [ "$direct" -eq 0 ]; then
    say "aivmm and ai-inferd on this host"
    [ -f "$tenant" ] && export RIG_DEMO_CONFIG=$tenant
    AI_INFERD=$target/debug/ai-inferd AI_MODELS=$root/target/models \
        AI_MANIFEST=$root/configs/models.toml \
        "$here/run-direct.sh" "$out" "$aivmm" "$scenario"
    log=$out/direct-console.log
else
    say "building the nested rig's L1 (aivmm, ai-inferd, the models, the guest image)"
    extra=()
    [ -f "$tenant" ] && extra=(--add "$tenant:/configs/tenant-demo.toml")
    AI_INFERD_BIN=$target/debug/ai-inferd AI_MODELS_DIR=$root/target/models \
        "$here/build-l1.sh" "$out" "$aivmm" "$here/scenarios.sh" "${extra[@]}" || exit 1
    log=$out/l1-console.log
    # A lost L1 (run-l1.sh stopped it wedged: 125; or it died without RIG-L1-DONE) is booted
    # once more, as the e2e rig does (tests/README.md); a demo that ran and failed is not.
    for boot in 1 2; do
        say "booting L1 under QEMU TCG (boot $boot); it starts ai-inferd and the tenant VMs"
        RIG_SCENARIOS=$scenario "$here/run-l1.sh" "$out" "${AIVMM_DEMO_TIMEOUT:-1200}"
        l1_rc=$?
        tr -d '\r' <"$log" | grep -q "RIG-RAN $scenario" && break
        case $l1_rc in
        124) break ;; # out of time: another boot would not have more
        125) ;;       # wedged
        *) tr -d '\r' <"$log" | grep -q RIG-L1-DONE && break ;;
        esac
        cp "$log" "$out/l1-console.boot$boot.log"
        say "L1 boot $boot was lost before the demo finished (run-l1.sh exit $l1_rc; its log: $out/l1-console.boot$boot.log)"
    done
fi
set -e

rc_of() { tr -d '\r' <"$log" | sed -n "s/.*RIG-END $1 rc=\([0-9-]*\).*/\1/p" | tail -n 1; }
if [ "$scenario" = demo ]; then
    rc=$(rc_of demo)
    [ -n "$rc" ] || { echo "demo: the microVM run did not finish (log: $log)" >&2; exit 1; }
    say "aivmm exited with code $rc (log: $log)"
    exit "$rc"
fi

say "what the tenants got (full log: $log)"
tr -d '\r' <"$log" | grep -E 'RIG-BEGIN ai_|GUEST-AI |GARBAGE|^ *[0-9]+ +[^ ]+ +(onnx|bert)|status|RIG-FACT ai_daemon (ready_ms|VmRSS)' |
    sed -E 's/(hex=.{48}).*/\1.../' || true
fact_of() { tr -d '\r' <"$log" | sed -n "s/^RIG-FACT $1 $2=//p" | tail -n 1; }
status=0
for run in ai_daemon ai_a ai_b; do
    rc=$(rc_of "$run")
    case $run in
    ai_daemon) how= ;;
    # A tenant finished only if its guest powered itself off after its script; exit code
    # 0 alone also covers a guest that crashed into a triple fault.
    *) how=$(fact_of "$run" stopped) ;;
    esac
    echo "$run: exit code ${rc:-none (did not finish)}${how:+, $how}"
    [ "${rc:-1}" = 0 ] || status=1
    case $run:$how in ai_daemon:* | *:*"ACPI power off"*) ;; *) status=1 ;; esac
done
exit "$status"
