#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build a tenant's root filesystem: an ext4 image for aivmm's root virtio-blk drive.
#
#   guest-image/build-rootfs.sh OUT [--size-mib N] [--agent PATH] [--bin SRC:DEST]...
#                               [--add SRC:DEST]... [--tenant DIR] [--hostname NAME]
#                               [--kernel-dir DIR | --no-modules]
#
#   OUT              the image file (replaced when it exists)
#   --size-mib N     its size (default: what the files take, rounded up to MiB, + 64 MiB)
#   --agent PATH     the guest agent, as /bin/ai-agent (init starts `ai-agent daemon`)
#   --bin SRC:DEST   an executable, with its shared libraries and the dynamic loader
#   --add SRC:DEST   a file or directory copied as is (a DEST ending in / keeps the name)
#   --tenant DIR     the tenant's files, copied to /tenant/ (/tenant/start is its entry point)
#   --hostname NAME  /etc/hostname (default aivmm-guest)
#   --kernel-dir DIR fetch-kernel.sh's output, whose virtio_net/vsock/virtio_blk modules go to
#                    /lib/modules/aivmm/ (default $AIVMM_KERNEL_DIR, else
#                    <repo>/target/guest-kernel; fetched when the modules are missing)
#   --no-modules     no modules (a guest kernel with the virtio drivers built in)
#
# The image holds busybox (static, with a link for every applet), /sbin/init =
# guest-image/init, /bin/aivmm-boot-timer, the modules with their load-order, and what the
# options add. It is made without root and without a loop mount: the files are staged in a
# directory and `mke2fs -d` writes them into the image; every file is owned by root in it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
# shellcheck source=../guest-kernel/stage.sh
. "$root/guest-kernel/stage.sh"
# mke2fs and debugfs live in /usr/sbin, which an unprivileged PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

usage() {
    sed -n '5,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case $1 in -*) usage ;; esac
out=$1
shift
size_mib=
tenant=
hostname=aivmm-guest
kdir=${AIVMM_KERNEL_DIR:-$root/target/guest-kernel}
modules=yes
bins=()
adds=()
while [ $# -gt 0 ]; do
    case $1 in
    --size-mib) size_mib=${2:?--size-mib needs a number}; shift 2 ;;
    --agent) bins+=("${2:?--agent needs a path}:/bin/ai-agent"); shift 2 ;;
    --bin) bins+=("${2:?--bin needs SRC:DEST}"); shift 2 ;;
    --add) adds+=("${2:?--add needs SRC:DEST}"); shift 2 ;;
    --tenant) tenant=${2:?--tenant needs a directory}; shift 2 ;;
    --hostname) hostname=${2:?--hostname needs a name}; shift 2 ;;
    --kernel-dir) kdir=${2:?--kernel-dir needs a directory}; shift 2 ;;
    --no-modules) modules=no; shift ;;
    -h | --help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
done
if [ -n "$size_mib" ] && ! [[ $size_mib =~ ^[1-9][0-9]{0,5}$ ]]; then
    echo "$0: --size-mib must be a whole number of MiB from 1 to 999999, not '$size_mib'" >&2
    exit 2
fi
if [ -n "$tenant" ]; then
    [ -d "$tenant" ] || { echo "$0: --tenant $tenant is not a directory" >&2; exit 1; }
    [ -x "$tenant/start" ] ||
        echo "$0: warning: $tenant/start is missing or not executable: the guest will run a shell" >&2
fi
# The tenant's own I/O drivers; their dependencies (virtio, virtio_ring, failover,
# net_failover, vsock, ...) come along.
guest_modules=(virtio_pci virtio_blk virtio_net vmw_vsock_virtio_transport)

busybox=$(static_busybox)
need_cmd mke2fs e2fsprogs

stage=$(mktemp -d "${TMPDIR:-/tmp}/aivmm-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# mktemp made it 0700: the image's / must be 0755.
chmod 0755 "$stage"

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,data,mnt,var/tmp}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 0700 "$stage/root"
cp "$busybox" "$stage/bin/busybox"
chmod 0755 "$stage/bin/busybox"
install -m 0755 "$here/init" "$stage/sbin/init"
stage_busybox_links "$stage"
stage_boot_timer "$stage/bin/aivmm-boot-timer"
# Without an initramfs the kernel opens /dev/console on the root before init runs; creating
# the nodes needs root (the boot initramfs moves a devtmpfs here anyway).
mknod -m 0600 "$stage/dev/console" c 5 1 2>/dev/null || true
mknod -m 0666 "$stage/dev/null" c 1 3 2>/dev/null || true
echo "$hostname" >"$stage/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n' "$hostname" >"$stage/etc/hosts"

if [ "$modules" = yes ]; then
    need=no
    for m in "${guest_modules[@]}"; do
        [ -f "$kdir/modules/$m.ko" ] || need=yes
    done
    if [ "$need" = yes ]; then
        "$root/guest-kernel/fetch-kernel.sh" "$kdir" >&2
    fi
    stage_modules "$stage" "$kdir/modules" /lib/modules/aivmm "${guest_modules[@]}"
fi
stage_each stage_bin "$stage" ${bins[@]+"${bins[@]}"}
stage_each stage_path "$stage" ${adds[@]+"${adds[@]}"}
if [ -n "$tenant" ]; then
    stage_path "$stage" "$tenant" /tenant
fi

used_mib=$(du -sm "$stage" | cut -f1)
if [ -z "$size_mib" ]; then
    size_mib=$((used_mib + 64))
elif [ "$size_mib" -lt $((used_mib + 8)) ]; then
    echo "$0: --size-mib $size_mib is too small for $used_mib MiB of files (need $((used_mib + 8)) at least)" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
tmp=$out.tmp.$$
rm -f "$tmp"
trap 'rm -rf "$stage" "$tmp" "$stage.debugfs"' EXIT
# 4 KiB blocks whatever the size (mke2fs would pick 1 KiB for a small file system).
truncate -s "${size_mib}M" "$tmp"
mke2fs -q -t ext4 -b 4096 -L aivmm-root -d "$stage" "$tmp"
if [ "$(id -u)" -ne 0 ]; then
    # mke2fs -d keeps the builder's uid/gid: make root the owner of every file, in the image.
    (cd "$stage" && find . -print) | sed 's|^\.||; s|^$|/|' |
        awk '{ printf "sif \"%s\" uid 0\nsif \"%s\" gid 0\n", $0, $0 }' >"$stage.debugfs"
    debugfs -w -f "$stage.debugfs" "$tmp" >/dev/null 2>&1 ||
        { echo "$0: debugfs could not set the owners in $tmp" >&2; exit 1; }
fi
mv "$tmp" "$out"
echo "$out ($size_mib MiB, $used_mib MiB of files)"
