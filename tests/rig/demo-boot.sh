#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `AIVMM_DEMO=boot make demo`: boots configs/tenant-demo.toml alone (no inference), on this
# host where its KVM boots Linux, else inside the nested rig's L1 (tests/rig/demo.sh).
#
#   tests/rig/demo-boot.sh OUTDIR AIVMM_BIN
#
# Exit code: aivmm's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: demo-boot.sh OUTDIR AIVMM_BIN}
aivmm=${2:?usage: demo-boot.sh OUTDIR AIVMM_BIN}
tenant=$root/configs/tenant-demo.toml

set +e
"$here/host-can-boot-linux.sh"
direct=$?
set -e
if [ "$direct" -eq 0 ]; then
    [ -f "$tenant" ] && export RIG_DEMO_CONFIG=$tenant
    "$here/run-direct.sh" "$out" "$aivmm" demo
    log=$out/direct-console.log
else
    extra=()
    [ -f "$tenant" ] && extra=(--add "$tenant:/configs/tenant-demo.toml")
    "$here/build-l1.sh" "$out" "$aivmm" "$here/scenarios.sh" "${extra[@]}"
    log=$out/l1-console.log
    RIG_SCENARIOS=demo "$here/run-l1.sh" "$out" "${AIVMM_DEMO_TIMEOUT:-1200}" || true
fi
rc=$(tr -d '\r' <"$log" | sed -n 's/.*RIG-END demo rc=\([0-9-]*\).*/\1/p' | tail -n 1)
[ -n "$rc" ] || { echo "demo: the microVM run did not finish (log: $log)" >&2; exit 1; }
echo "aivmm exited with code $rc (log: $log)"
exit "$rc"
