#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Direct mode of the rig: on a host whose KVM boots Linux (see host-can-boot-linux.sh), run
# the same scenarios with aivmm on the host itself instead of inside a nested L1.
#
#   tests/rig/run-direct.sh OUTDIR AIVMM_BIN [SCENARIO...]
#
# Builds OUTDIR/l2-initrd.gz, makes sure enough 2 MiB hugepages are free on the node the
# scenarios use (node 1 when the host has one, else node 0) and gives back what it added,
# then runs scenarios.sh; its output goes to stdout and OUTDIR/direct-console.log.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

out=${1:?usage: run-direct.sh OUTDIR AIVMM_BIN [SCENARIO...]}
aivmm=${2:?usage: run-direct.sh OUTDIR AIVMM_BIN [SCENARIO...]}
shift 2
# shellcheck source=l2-image.sh
. "$here/l2-image.sh"
prepare_l2 "$out"

# The scenarios need 128 free pages (256 MiB) at a time; keep a margin like L1 has.
want=${RIG_DIRECT_HUGEPAGES:-192}
node=0
[ -d /sys/devices/system/node/node1 ] && node=1
hp=/sys/devices/system/node/node$node/hugepages/hugepages-2048kB
orig=$(cat "$hp/nr_hugepages")
free=$(cat "$hp/free_hugepages")
if [ "$free" -lt "$want" ]; then
    echo $((orig + want - free)) >"$hp/nr_hugepages"
    trap 'echo "$orig" >"$hp/nr_hugepages"' EXIT
fi

log=$out/direct-console.log
RIG_MODE=direct AIVMM=$aivmm L2_KERNEL=$kdir/vmlinux L2_BZIMAGE=$kdir/vmlinuz L2_INITRD=$out/l2-initrd.gz \
    L2_ROOTFS=$out/l2-rootfs.ext4.gz L2_BOOT_INITRD=$out/l2-boot-initrd.gz \
    RIG_IO=${RIG_IO_BIN:-/bin/rig-io} RIG_CONFIGS=$here/configs RIG_TMP=$out/tmp \
    sh "$here/scenarios.sh" "$@" 2>&1 | tee "$log"
