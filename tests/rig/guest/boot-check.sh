#!/bin/sh
# L2 guest script of the `boot` scenario (run by the guest init via aivmm.script=).
# Reports what the guest sees, then stays alive long enough for L1 to sample the VMM's
# memory (numa_maps, hugepage counters, RSS) while the VM runs.
echo "GUEST-NPROC=$(nproc)"
echo "GUEST-CPUINFO-PROCESSORS=$(grep -c '^processor' /proc/cpuinfo)"
echo "GUEST-MEMTOTAL=$(awk '/^MemTotal:/ { print $2 " " $3 }' /proc/meminfo)"
echo "GUEST-KERNEL=$(uname -r)"
sleep "${BOOT_CHECK_SLEEP:-5}"
exit 0
