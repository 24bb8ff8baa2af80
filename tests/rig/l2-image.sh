# shellcheck shell=bash
# Sourced by the rig scripts: the L2 guest image both modes boot.
#
#   prepare_l2 OUTDIR   sets $kdir (the guest kernel directory, fetched if needed) and builds
#                       OUTDIR/l2-initrd.gz with tests/rig/guest/* under /scripts/
#                       (and the guest agent when AIVMM_AGENT names one).
# Needs $here (tests/rig) and $root (the repository) set by the caller.

prepare_l2() {
    local out=$1
    kdir=${AIVMM_KERNEL_DIR:-$root/target/guest-kernel}
    "$root/guest-kernel/fetch-kernel.sh" "$kdir" >/dev/null
    mkdir -p "$out"
    local l2_args=(--add "$here/guest:/scripts")
    if [ -n "${AIVMM_AGENT:-}" ]; then
        l2_args+=(--agent "$AIVMM_AGENT")
    fi
    "$root/guest-kernel/build-initramfs.sh" "$out/l2-initrd.gz" "${l2_args[@]}" >/dev/null
}
