#!/usr/bin/env bash
# `make demo`: build everything and boot one tenant microVM, showing its console.
#
# The microVM is configs/tenant-demo.toml (tests/rig/configs/demo.toml when that is missing).
# Where this host's KVM boots Linux (tests/rig/host-can-boot-linux.sh), aivmm runs here;
# elsewhere (the development and CI machines) inside the nested rig's L1, whose console is
# shown around it.
# Either way the guest runs tests/rig/guest/demo.sh (uname, vCPUs, memory) and powers off.
# Exit code: aivmm's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

say() {
    # Bold headings on a terminal, plain text in logs.
    if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

say "installing dependencies and the guest kernel"
"$here/deps.sh"

if [ -n "${AIVMM_BIN:-}" ]; then
    aivmm=$AIVMM_BIN
else
    say "building aivmm"
    cargo build -p vmm --bin aivmm
    target=${CARGO_TARGET_DIR:-$root/target}
    case $target in /*) ;; *) target=$root/$target ;; esac
    aivmm=$target/debug/aivmm
fi

out=$root/target/rig/demo
mkdir -p "$out"
set +e
reason=$("$here/host-can-boot-linux.sh")
direct=$?
set -e
say "$reason"
# The tenant config of the README; both modes override its kernel, initrd and (to run the
# demo script) command line with the rig's.
tenant=$root/configs/tenant-demo.toml

set +e
if [ "$direct" -eq 0 ]; then
    say "aivmm on this host (guest console below)"
    [ -f "$tenant" ] && export RIG_DEMO_CONFIG=$tenant
    "$here/run-direct.sh" "$out" "$aivmm" demo
    log=$out/direct-console.log
else
    say "building the nested rig's L1 (aivmm, the guest kernel and initramfs inside)"
    extra=()
    [ -f "$tenant" ] && extra=(--add "$tenant:/configs/tenant-demo.toml")
    "$here/build-l1.sh" "$out" "$aivmm" "$here/scenarios.sh" "${extra[@]}" || exit 1
    say "booting L1 under QEMU TCG; it runs aivmm, whose guest console follows"
    RIG_SCENARIOS=demo "$here/run-l1.sh" "$out" "${AIVMM_DEMO_TIMEOUT:-900}"
    log=$out/l1-console.log
fi
set -e
rc=$(tr -d '\r' <"$log" | sed -n 's/.*RIG-END demo rc=\([0-9-]*\).*/\1/p' | tail -n 1)
if [ -z "$rc" ]; then
    echo "demo: the microVM run did not finish (log: $log)" >&2
    exit 1
fi
say "aivmm exited with code $rc (log: $log)"
exit "$rc"
