#!/bin/sh
# L2 guest script of the API scenario (tests/rig/scenarios/api.sh): a tenant configured over
# aivmm's control API (or its JSON config file) shows what it got: its root device, then TCP
# both ways over its interface and a stream each way over vsock (net-check.sh,
# vsock-check.sh, which read their settings from the kernel command line). Ends with
# AIVMM-API-DONE rc=<n> (0 when every check passed).

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

rc=0
root=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)
echo "AIVMM-API-GUEST root=$root cpus=$(nproc) mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
sh /scripts/net-check.sh || rc=1
sh /scripts/vsock-check.sh || rc=1
echo "AIVMM-API-DONE rc=$rc"
exit "$rc"
