#!/bin/sh
# L2 guest script of the `boot` scenario (run by the guest init via aivmm.script=).
# Reports what the guest sees, then stays alive long enough for L1 to sample the VMM's
# memory (numa_maps, hugepage counters, RSS) while the VM runs.
echo "GUEST-NPROC=$(nproc)"
echo "GUEST-CPUINFO-PROCESSORS=$(grep -c '^processor' /proc/cpuinfo)"
# The local APIC timer mode the VMM offers (CPUID) and the clock event the kernel chose.
grep -qw tsc_deadline_timer /proc/cpuinfo && echo "GUEST-TSC-DEADLINE=yes" || echo "GUEST-TSC-DEADLINE=no"
echo "GUEST-CLOCKEVENT=$(awk '/^Per CPU device: 0/ { cpu0 = 1 } cpu0 && /^Clock Event Device:/ { print $4; exit }' /proc/timer_list 2>/dev/null)"
echo "GUEST-MEMTOTAL=$(awk '/^MemTotal:/ { print $2 " " $3 }' /proc/meminfo)"
echo "GUEST-KERNEL=$(uname -r)"
# PCI functions as vendor:device@slot (the host bridge and, in this scenario, the ai_infer
# device whose daemon is not running: it must be visible anyway).
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    echo "GUEST-PCI=$(cat "$d/vendor"):$(cat "$d/device")@${d##*/} driver=$(basename "$(readlink "$d/driver" 2>/dev/null || echo none)")"
done
sleep "${BOOT_CHECK_SLEEP:-5}"
exit 0
