#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build the boot initramfs of a guest whose root is a virtio-blk disk, for kernels that have
# virtio_blk as a module (Debian's cloud kernel). Kernels with virtio, virtio_pci and
# virtio_blk built in (guest-kernel/microvm.config) boot from the disk without it.
#
#   guest-kernel/build-boot-initrd.sh OUT [--kernel-dir DIR]
#
#   OUT              the archive (gzip-compressed when it ends in .gz)
#   --kernel-dir DIR fetch-kernel.sh's output directory (default: $AIVMM_KERNEL_DIR, else
#                    <repo>/target/guest-kernel; fetched when its modules are missing)
#
# The image is busybox, /init = guest-kernel/init-root, and virtio_pci + virtio_blk with their
# dependencies under /lib/modules/aivmm/ (with load-order). init-root loads them, mounts
# root= (ext4, ro unless rw is on the command line) and switches to it (init=, default
# /sbin/init). Prints the archive's path and size.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=stage.sh
. "$here/stage.sh"

usage() {
    sed -n '7,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case $1 in -h | --help | -*) usage ;; esac
out=$1
shift
kdir=${AIVMM_KERNEL_DIR:-$root/target/guest-kernel}
while [ $# -gt 0 ]; do
    case $1 in
    --kernel-dir) kdir=${2:?--kernel-dir needs a directory}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
done

# The modules the root disk needs; their dependencies come along (stage_modules).
boot_modules=(virtio_pci virtio_blk)

if [ ! -f "$kdir/modules/virtio_blk.ko" ] || [ ! -f "$kdir/modules/virtio_pci.ko" ]; then
    "$here/fetch-kernel.sh" "$kdir" >&2
fi

mods=$(mktemp -d "${TMPDIR:-/tmp}/aivmm-boot-initrd.XXXXXX")
trap 'rm -rf "$mods"' EXIT
stage_modules "$mods" "$kdir/modules" /aivmm "${boot_modules[@]}"

"$here/build-initramfs.sh" "$out" --init "$here/init-root" --add "$mods/aivmm:/lib/modules/aivmm"
