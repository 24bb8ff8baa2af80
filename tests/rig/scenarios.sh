#!/bin/sh
# The rig's scenarios: runs aivmm on the rig configs and prints machine-readable lines that
# the Rust e2e tests (tests/src/report.rs) parse:
#
#   RIG-BEGIN <name>                 an aivmm run starts
#   RIG-FACT <name> <key>=<value>    a fact measured around it (value = rest of the line)
#   ...                              the guest console and aivmm's stderr (prefixed "[stderr] ")
#   RIG-END <name> rc=<n>            aivmm's exit code (137 when the rig had to kill it)
#   RIG-PLAN <scenario>...           (first) the scenarios this invocation runs
#   RIG-RAN <scenario>               a scenario is over (a rig that lost L1 resumes after it)
#   RIG-SCENARIOS-DONE               every requested scenario ran
#
#   scenarios.sh [boot] [badconfig] [sigterm] [demo] [passthrough] [badpassthrough] [ptbench]
#                [ai_infer] [tenant_io] [serving] [api] [serve_bench] [jailer]
#                (default: boot badconfig sigterm jailer passthrough badpassthrough tenant_io
#                api serving ai_infer)
#
# Each scenario lives in its own file under scenarios/ next to this script (in L1:
# /rig/scenarios/), defining scenario_<name>; scenarios/lib.sh holds the helpers they share.
# All are sourced below.
#
# Runs in L1 under busybox sh (nested mode), or on the host in direct mode; POSIX sh only.
# Environment (defaults are the L1 layout made by build-l1.sh):
#   AIVMM        the aivmm binary                        (/bin/aivmm)
#   AIVMM_JAILER the aivmm-jailer binary                 (/bin/aivmm-jailer)
#   L2_KERNEL    the guest kernel, ELF with PVH entry    (/l2/vmlinux; the boot
#                scenario boots the bzImage L2_BZIMAGE)
#   L2_BZIMAGE   the same kernel as a bzImage            (/l2/vmlinuz)
#   L2_INITRD    the guest initramfs                     (/l2/initrd.gz)
#   RIG_CONFIGS  the rig configs (tests/rig/configs)     (/configs)
#   RIG_TMP      scratch directory for logs              (/tmp/rig)
#   RIG_VM_TIMEOUT  seconds an aivmm run may take before the rig kills it (300)
#   RIG_AI_TIMEOUT  seconds both ai_infer tenants together may take (600)
#   RIG_DEMO_CONFIG the config of the demo scenario      (see scenario_demo)
#   AI_INFERD    the ai-inferd binary                    (/bin/ai-inferd)
#   AI_MODELS    the models directory                    (/models)
#   AI_MANIFEST  the models manifest                     ($AI_MODELS/models.toml)
set -u

AIVMM=${AIVMM:-/bin/aivmm}
AIVMM_JAILER=${AIVMM_JAILER:-/bin/aivmm-jailer}
L2_KERNEL=${L2_KERNEL:-/l2/vmlinux}
L2_BZIMAGE=${L2_BZIMAGE:-/l2/vmlinuz}
L2_INITRD=${L2_INITRD:-/l2/initrd.gz}
RIG_CONFIGS=${RIG_CONFIGS:-/configs}
RIG_TMP=${RIG_TMP:-/tmp/rig}
RIG_VM_TIMEOUT=${RIG_VM_TIMEOUT:-300}
# The tenants' MiniLM requests run in L1 under TCG and share one executor: about 60 s each
# on a quiet host, 150 s measured while this host's steal time was high (tenant A then
# waited 81 s for B's and was killed at 300 s, in its MLP loop).
RIG_AI_TIMEOUT=${RIG_AI_TIMEOUT:-600}
AI_INFERD=${AI_INFERD:-/bin/ai-inferd}
AI_MODELS=${AI_MODELS:-/models}
AI_MANIFEST=${AI_MANIFEST:-$AI_MODELS/models.toml}
mkdir -p "$RIG_TMP"

scenario_dir=$(dirname "$0")/scenarios
# shellcheck source=scenarios/lib.sh
. "$scenario_dir/lib.sh"
for f in "$scenario_dir"/*.sh; do
    case $f in */lib.sh) continue ;; esac
    # shellcheck disable=SC1090 # each file defines one scenario_<name> function
    [ -f "$f" ] && . "$f"
done

[ $# -gt 0 ] || set -- boot badconfig sigterm jailer passthrough badpassthrough tenant_io api serving ai_infer
fact rig mode "${RIG_MODE:-unknown}"
fact rig aivmm "$AIVMM"
echo "RIG-PLAN $*"
for s in "$@"; do
    case $s in
    boot | badconfig | sigterm | jailer | demo | passthrough | badpassthrough | ptbench | ai_infer | tenant_io | serving | api | serve_bench)
        "scenario_$s"
        ;;
    *) echo "scenarios.sh: unknown scenario: $s" >&2 ;;
    esac
    echo "RIG-RAN $s"
done
echo "RIG-SCENARIOS-DONE"
