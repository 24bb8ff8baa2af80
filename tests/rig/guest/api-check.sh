#!/bin/sh
# L2 guest script of the API scenario (tests/rig/scenarios/api.sh): a tenant configured over
# aivmm's control API (or its JSON config file) shows what it got: its root device, then TCP
# both ways over its interface and a stream each way over vsock (net-check.sh,
# vsock-check.sh, which read their settings from the kernel command line). Ends with
# AIVMM-API-DONE rc=<n> (0 when every check passed). With aivmm.await_cad=1 it then waits for
# the host to press Ctrl+Alt+Del, at which init (guest-image/init) shuts the guest down.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

rc=0
root=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)
echo "AIVMM-API-GUEST root=$root cpus=$(nproc) mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
sh /scripts/net-check.sh || rc=1
sh /scripts/vsock-check.sh || rc=1
echo "AIVMM-API-DONE rc=$rc"
if grep -q 'aivmm.await_cad=1' /proc/cmdline; then
    # What the kernel made of the i8042 and its keyboard, and what Ctrl+Alt+Del will do
    # (ctrl-alt-del 1: restart at once, 0: SIGINT to init).
    echo "AIVMM-API-KBD $(dmesg | grep -E 'i8042|serio|atkbd' | tr '\n' ';')"
    echo "AIVMM-API-INPUT $(grep -h '^N: ' /proc/bus/input/devices 2>/dev/null | tr '\n' ';') cad=$(cat /proc/sys/kernel/ctrl-alt-del 2>/dev/null)"
    echo "AIVMM-API-AWAIT-CAD"
    # Init ends this script at the keys; should they not come, the script ends on its own
    # and the guest powers off without init's Ctrl+Alt+Del line.
    sleep 120
fi
exit "$rc"
