# shellcheck shell=bash source-path=SCRIPTDIR
# Sourced by the rig scripts: the L2 guest image both modes boot.
#
#   prepare_l2 OUTDIR   sets $kdir (the guest kernel directory, fetched if needed) and builds
#                       OUTDIR/l2-initrd.gz with tests/rig/guest/* under /scripts/,
#                       /bin/edu-test (tests/rig/guest/edu-test.c, built static), the uio
#                       modules under /mods/ (the passthrough INTx check) and the guest
#                       agent when AIVMM_AGENT names one. With RIG_IO_BIN (the rig-io tool)
#                       it also builds the disk-root tenant of the tenant_io scenario:
#                       OUTDIR/l2-rootfs.ext4.gz (guest-image/build-rootfs.sh: rig-io, the
#                       agent, tests/rig/guest/* under /scripts/) and OUTDIR/l2-boot-initrd.gz
#                       (guest-kernel/build-boot-initrd.sh).
#                       RIG_L2_ADD: more files for both images, as `SRC:DEST` words (the
#                       benchmarks' guest scripts).
# Needs $here (tests/rig) and $root (the repository) set by the caller.

prepare_l2() {
    local out=$1
    kdir=${AIVMM_KERNEL_DIR:-$root/target/guest-kernel}
    "$root/guest-kernel/fetch-kernel.sh" "$kdir" >/dev/null
    mkdir -p "$out"
    build_edu_test "$out/edu-test"
    local l2_args=(--add "$here/guest:/scripts" --bin "$out/edu-test:/bin/edu-test") m
    for m in uio uio_pci_generic; do
        if [ -f "$kdir/modules/$m.ko" ]; then
            l2_args+=(--add "$kdir/modules/$m.ko:/mods/")
        fi
    done
    if [ -n "${AIVMM_AGENT:-}" ]; then
        l2_args+=(--agent "$AIVMM_AGENT")
    fi
    for m in ${RIG_L2_ADD:-}; do
        l2_args+=(--add "$m")
    done
    "$root/guest-kernel/build-initramfs.sh" "$out/l2-initrd.gz" "${l2_args[@]}" >/dev/null
    if [ -n "${RIG_IO_BIN:-}" ]; then
        prepare_l2_disk "$out"
    fi
}

# prepare_l2_disk OUTDIR: the tenant_io scenario's root filesystem and boot initramfs.
prepare_l2_disk() {
    local out=$1 args=(--bin "$RIG_IO_BIN:/bin/rig-io" --add "$here/guest:/scripts") m
    if [ -n "${AIVMM_AGENT:-}" ]; then
        args+=(--agent "$AIVMM_AGENT")
    fi
    for m in ${RIG_L2_ADD:-}; do
        args+=(--add "$m")
    done
    AIVMM_KERNEL_DIR=$kdir "$root/guest-image/build-rootfs.sh" "$out/l2-rootfs.ext4" \
        "${args[@]}" >/dev/null
    gzip -1 -f "$out/l2-rootfs.ext4"
    AIVMM_KERNEL_DIR=$kdir "$root/guest-kernel/build-boot-initrd.sh" "$out/l2-boot-initrd.gz" \
        >/dev/null
}

# build_edu_test OUT: the passthrough test program, static (the guest image has no libc).
build_edu_test() {
    local out=$1 src=$here/guest/edu-test.c
    # shellcheck source=../../guest-kernel/pkg.sh
    . "$root/guest-kernel/pkg.sh"
    need_cmd gcc gcc
    if [ ! -f /usr/lib/x86_64-linux-gnu/libc.a ]; then
        apt_lists_know libc6-dev
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends libc6-dev >&2
    fi
    if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
        gcc -static -O2 -Wall -Wextra -Werror -o "$out.tmp" "$src"
        mv "$out.tmp" "$out"
    fi
}
