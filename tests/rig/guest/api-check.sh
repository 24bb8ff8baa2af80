#!/bin/sh
# L2 guest script of the API scenario (tests/rig/scenarios/api.sh): a tenant configured over
# aivmm's control API (or its JSON config file) shows what it got: its root device, then TCP
# both ways over its interface and a stream each way over vsock (net-check.sh,
# vsock-check.sh, which read their settings from the kernel command line). Ends with
# AIVMM-API-DONE rc=<n> (0 when every check passed). With aivmm.await_cad=1 it then waits for
# the host to press Ctrl+Alt+Del, which makes the kernel reboot.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

rc=0
root=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)
echo "AIVMM-API-GUEST root=$root cpus=$(nproc) mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
sh /scripts/net-check.sh || rc=1
sh /scripts/vsock-check.sh || rc=1
echo "AIVMM-API-DONE rc=$rc"
if grep -q 'aivmm.await_cad=1' /proc/cmdline; then
    echo "AIVMM-API-AWAIT-CAD"
    # The kernel restarts at the keys; should they not come, the guest powers off instead,
    # which the host tells apart (aivmm's stop reason).
    sleep 120
fi
exit "$rc"
