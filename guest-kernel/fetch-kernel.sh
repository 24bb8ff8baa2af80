#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Provide the default guest kernel: Debian's linux-image-cloud-amd64 (the versioned package
# it depends on), fetched with `apt-get download` and unpacked with `dpkg-deb -x`. No kernel
# build is needed. The same kernel serves as the L1 kernel of the nested test rig, so the
# modules the rig needs (KVM on AMD-V and VFIO in L1, uio_pci_generic for the L2 guest's
# INTx check, the virtio drivers of a guest booted from a disk, tun and vhost for L1) are
# taken from the same package.
#
#   guest-kernel/fetch-kernel.sh [OUTDIR]        (default: <repo>/target/guest-kernel)
#
# Produces OUTDIR/vmlinuz (the bzImage), OUTDIR/vmlinux (the ELF kernel inside it,
# decompressed, with its PVH entry note: what aivmm boots by default, skipping the guest's
# own decompression), OUTDIR/config, OUTDIR/modules/*.ko (uncompressed, because busybox
# insmod may not decompress) and OUTDIR/modules/load-order (file names, dependencies first),
# then prints the paths. Idempotent: a second run with the same package does nothing.
# Environment: AIVMM_KERNEL_PKG overrides the package name (e.g. linux-image-6.1.0-56-cloud-amd64);
# AIVMM_KERNEL_MODULES overrides the modules to include (their dependencies are added).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=pkg.sh
. "$here/pkg.sh"

out=${1:-$root/target/guest-kernel}
mkdir -p "$out"
out=$(cd "$out" && pwd)
meta_pkg=linux-image-cloud-amd64
# The modules the rig loads explicitly; kvm, irqbypass, vfio, vfio_virqfd, vfio-pci-core and
# uio come in as their dependencies (read from each module's .modinfo, see below).
# The virtio ones are the tenant I/O devices of a guest booted from a disk
# (build-boot-initrd.sh loads virtio_pci and virtio_blk, guest-image/build-rootfs.sh the
# rest); virtio, virtio_ring, virtio_pci_*_dev, failover, net_failover, vsock,
# vmw_vsock_virtio_transport_common and vhost come in as dependencies. tun (aivmm's taps),
# vhost_net and vhost_vsock are for L1 as a host.
roots=${AIVMM_KERNEL_MODULES:-kvm-amd vfio_iommu_type1 vfio-pci uio_pci_generic virtio_pci virtio_blk virtio_net vmw_vsock_virtio_transport tun vhost_net vhost_vsock}

# Concurrent callers (parallel test binaries, make -j) must not unpack over each other.
exec 9>"$out/.lock"
flock 9

print_paths() {
    echo "kernel:  $out/vmlinux (ELF, PVH), $out/vmlinuz (bzImage) ($(cat "$out/package"))"
    echo "config:  $out/config"
    echo "modules: $out/modules ($(tr '\n' ' ' <"$out/modules/load-order"))"
}

# Resolve the versioned package behind the meta-package, like `apt-get install` would.
pkg=${AIVMM_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
    apt_lists_know "$meta_pkg"
    pkg=$(apt-cache depends "$meta_pkg" 2>/dev/null |
        awk '/Depends: linux-image-/ { print $2; exit }') || true
fi
if [ -z "$pkg" ]; then
    # Offline, with a kernel already fetched: keep using it rather than fail.
    if [ -f "$out/package" ]; then
        pkg=$(cat "$out/package")
        echo "$0: cannot resolve $meta_pkg, using the cached $pkg" >&2
    else
        echo "$0: cannot resolve the package behind $meta_pkg (apt-cache depends)" >&2
        exit 1
    fi
fi

if [ "$(cat "$out/package" 2>/dev/null)" = "$pkg" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/vmlinux" ] &&
    [ -f "$out/config" ] && [ -f "$out/modules/load-order" ] &&
    [ "$(cat "$out/modules/roots" 2>/dev/null)" = "$roots" ]; then
    print_paths
    exit 0
fi

mkdir -p "$out/debs"
first() { [ -e "$1" ] && echo "$1"; }
deb=$(first "$out/debs/${pkg}"_*.deb || true)
if [ -z "$deb" ]; then
    echo "$0: downloading $pkg" >&2
    # apt-get download as root warns about an unsandboxed download; it is our own dir.
    (cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
    deb=$(first "$out/debs/${pkg}"_*.deb)
fi

tree=$out/.unpack
rm -rf "$tree"
dpkg-deb -x "$deb" "$tree"

# Debian 12 ships /boot and /lib/modules; later releases (merged /usr) use /usr/lib/modules.
vmlinuz=$(first "$tree"/boot/vmlinuz-*) || { echo "$0: no boot/vmlinuz-* in $deb" >&2; exit 1; }
kconfig=$(first "$tree"/boot/config-*) || { echo "$0: no boot/config-* in $deb" >&2; exit 1; }
moddir=$(first "$tree"/lib/modules/*/kernel || first "$tree"/usr/lib/modules/*/kernel) ||
    { echo "$0: no lib/modules/*/kernel in $deb" >&2; exit 1; }

# extract_vmlinux BZIMAGE OUT: the ELF kernel a bzImage carries, decompressed. The payload
# starts at the first magic of the compressor the kernel was built with (Debian's is LZ4);
# the decompressor stops at its end and complains about the bzImage's trailer, so success
# is judged by the result: an ELF whose notes hold the PVH entry (Xen note type 18).
extract_vmlinux() {
    local img=$1 dst=$2 tmp=$2.tmp off name pkgname magic f
    local -a formats=(
        'lz4 lz4 \x02\x21\x4c\x18'
        'zstd zstd \x28\xb5\x2f\xfd'
        'xz xz-utils \xfd\x37\x7a\x58\x5a\x00'
        'gzip gzip \x1f\x8b\x08'
    )
    for f in "${formats[@]}"; do
        read -r name pkgname magic <<<"$f"
        # The byte offset of the first occurrence of the magic.
        off=$(LC_ALL=C grep -obUaP "$magic" "$img" | head -n 1 | cut -d: -f1) || true
        [ -n "$off" ] || continue
        need_cmd "$name" "$pkgname"
        tail -c +$((off + 1)) "$img" | "$name" -dc >"$tmp" 2>/dev/null || true
        if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
            if command -v readelf >/dev/null 2>&1 && ! readelf -n "$tmp" | grep -q 'Xen.*0x00000012'; then
                echo "$0: warning: $dst has no PVH entry note; aivmm boots it through its 64-bit entry" >&2
            fi
            mv "$tmp" "$dst"
            return 0
        fi
    done
    rm -f "$tmp"
    echo "$0: cannot find the ELF kernel inside $img" >&2
    exit 1
}

# Module names treat '-' and '_' alike (kvm-amd.ko is the module kvm_amd).
norm() { echo "$1" | tr '-' '_'; }

declare -A path_of=()
while IFS= read -r f; do
    b=${f##*/}
    b=${b%%.ko*}
    path_of[$(norm "$b")]=$f
done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

rm -rf "$out/modules.new"
mkdir -p "$out/modules.new"
declare -A placed=()
order=()

# Copy one module, uncompressed: busybox insmod hands the file to init_module as is.
place() {
    local src=$1 dst=$2
    case $src in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) need_cmd xz xz-utils && xz -dc "$src" >"$dst" ;;
    *.ko.zst) need_cmd zstd zstd && zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    esac
}

# Depth-first: a module's dependencies (the `depends=` field of its .modinfo section,
# which needs no depmod and no kmod tools) are placed before the module itself.
add_module() {
    local name src file deps dep
    name=$(norm "$1")
    [ -n "${placed[$name]:-}" ] && return 0
    src=${path_of[$name]:-}
    [ -n "$src" ] || { echo "$0: module $1 is not in $pkg" >&2; exit 1; }
    file=${src##*/}
    file=${file%%.ko*}.ko
    placed[$name]=$file
    place "$src" "$out/modules.new/$file"
    deps=$(tr '\0' '\n' <"$out/modules.new/$file" | sed -n 's/^depends=//p' | head -n 1)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    order+=("$file")
}

for m in $roots; do
    add_module "$m"
done
printf '%s\n' "${order[@]}" >"$out/modules.new/load-order"
# What the modules were chosen for: another root list re-extracts them from the cached .deb.
echo "$roots" >"$out/modules.new/roots"

cp "$vmlinuz" "$out/vmlinuz"
extract_vmlinux "$out/vmlinuz" "$out/vmlinux"
cp "$kconfig" "$out/config"
rm -rf "$out/modules"
mv "$out/modules.new" "$out/modules"
rm -rf "$tree"
echo "$pkg" >"$out/package"
print_paths
