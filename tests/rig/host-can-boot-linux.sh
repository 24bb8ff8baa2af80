#!/usr/bin/env bash
# Can this host's KVM boot a stock Linux guest? Exit 0 = yes (the rig runs aivmm directly),
# 1 = no (the rig runs aivmm inside a nested QEMU TCG L1), 2 = bad AIVMM_RIG value.
# Prints the reason on stdout.
#
# A /dev/kvm alone is not enough: the development machines have a PVM-style nested
# hypervisor behind /dev/kvm that runs ring-3 code but cannot boot Linux, and its CPUs
# show neither the vmx nor the svm flag. Real KVM hosts (bare metal, cloud nested virt) do.
#
# AIVMM_RIG=direct or AIVMM_RIG=nested forces the answer; AIVMM_RIG=auto (default) detects.
set -euo pipefail

case ${AIVMM_RIG:-auto} in
direct) echo "direct: forced by AIVMM_RIG=direct"; exit 0 ;;
nested) echo "nested: forced by AIVMM_RIG=nested"; exit 1 ;;
auto) ;;
*) echo "AIVMM_RIG must be auto, direct or nested, not '${AIVMM_RIG}'" >&2; exit 2 ;;
esac

if [ ! -c /dev/kvm ]; then
    echo "nested: no /dev/kvm on this host"
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "nested: /dev/kvm is not readable and writable by $(id -un)"
    exit 1
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
if ! grep -qwE 'vmx|svm' <<<"$flags"; then
    echo "nested: /dev/kvm exists but the CPU has neither vmx nor svm (a paravirtual KVM that cannot boot Linux)"
    exit 1
fi
echo "direct: /dev/kvm with hardware virtualization ($(grep -owE 'vmx|svm' <<<"$flags" | head -n 1))"
exit 0
