#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build the nested rig's L1: its kernel (the Debian cloud kernel) and initramfs.
#
#   tests/rig/build-l1.sh OUTDIR AIVMM_BIN SCENARIO_SCRIPT [--add SRC:DEST]... [--bin SRC:DEST]...
#
# OUTDIR receives l1-vmlinuz, l1-initrd.cpio (uncompressed: L1 runs under TCG, where the
# kernel would spend seconds inflating it) and l2-initrd.gz. The L1 initramfs holds:
#   /init               tests/rig/l1-init (modules, hugepages, runs the scenario script)
#   /bin/aivmm          AIVMM_BIN with its shared libraries and dynamic loader
#   /bin/rig-kvm-hold   tests/rig/kvm-hold (built here): keeps one KVM VM open in L1
#   /l2/vmlinux         the L2 kernel (same kernel), ELF with its PVH entry: the default
#   /l2/vmlinuz         the same as a bzImage (the boot scenario and the benchmarks)
#   /l2/initrd.gz       the L2 initramfs (guest-kernel/build-initramfs.sh, with
#                       tests/rig/guest/* under /scripts/; AIVMM_AGENT adds the guest agent)
#   /mods/              KVM and VFIO modules, /mods/load-order
#   /configs/           tests/rig/configs/*.toml
#   /rig/scenario.sh    SCENARIO_SCRIPT (and the scenarios/ directory next to it)
#   /bin/rig-io, /l2/rootfs.ext4.gz, /l2/boot-initrd.gz, /rig/serve/
#                       RIG_IO_BIN, when set, and the disk-root guest of the tenant_io and
#                       serving scenarios (with the serving scenario's requests)
#   /bin/ai-inferd      AI_INFERD_BIN, when set (the ai_infer scenario's daemon)
#   /bin/aivmm-jailer   JAILER_BIN, when set (the jailer scenario)
#   /bin/curl           this host's curl (the API scenario's client)
#   /models/            AI_MODELS_DIR's mlp.onnx and minilm/ with configs/models.toml, when set
#   $RIG_L1_QEMU, /usr/share/{qemu,seabios}/
#                       RIG_L1_QEMU (a qemu-system-x86_64), when set: that QEMU at the same
#                       path with its libraries and the firmware it loads (the benchmarks run
#                       QEMU next to aivmm in L1)
# Extra --add / --bin arguments go to the L1 initramfs as they are.
# AIVMM_KERNEL_DIR: where fetch-kernel.sh keeps the kernel (default <repo>/target/guest-kernel).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

if [ $# -lt 3 ]; then
    sed -n '4,5s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi
out=$1
aivmm=$2
scenario=$3
shift 3
[ -f "$aivmm" ] || { echo "$0: no aivmm binary at $aivmm" >&2; exit 1; }
[ -f "$scenario" ] || { echo "$0: no scenario script at $scenario" >&2; exit 1; }

# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
# shellcheck source=l2-image.sh
. "$here/l2-image.sh"
prepare_l2 "$out"

# Built here rather than by each caller: it is tiny, and every L1 needs it (see its source).
(cd "$root" && cargo build -q -p rig-kvm-hold)
target=$(cargo_target_dir "$root")
[ -x "$target/debug/rig-kvm-hold" ] || { echo "$0: no rig-kvm-hold in $target/debug" >&2; exit 1; }

ai_args=()
if [ -d "$(dirname "$scenario")/scenarios" ]; then
    ai_args+=(--add "$(dirname "$scenario")/scenarios:/rig/scenarios")
fi
if [ -n "${JAILER_BIN:-}" ]; then
    ai_args+=(--bin "$JAILER_BIN:/bin/aivmm-jailer")
fi
if [ -n "${RIG_IO_BIN:-}" ]; then
    ai_args+=(--bin "$RIG_IO_BIN:/bin/rig-io"
        --add "$out/l2-rootfs.ext4.gz:/l2/rootfs.ext4.gz"
        --add "$out/l2-boot-initrd.gz:/l2/boot-initrd.gz"
        --add "$here/guest/serve:/rig/serve"
        --add "$here/guest/mlp-input.bin:/rig/serve/mlp-input.bin")
fi
# curl, for the API scenario (deps.sh installs it).
if command -v curl >/dev/null; then
    ai_args+=(--bin "$(command -v curl):/bin/curl")
fi
if [ -n "${AI_INFERD_BIN:-}" ]; then
    ai_args+=(--bin "$AI_INFERD_BIN:/bin/ai-inferd")
fi
if [ -n "${AI_MODELS_DIR:-}" ]; then
    for m in mlp.onnx minilm; do
        [ -e "$AI_MODELS_DIR/$m" ] || { echo "$0: no $AI_MODELS_DIR/$m (run devices/ai-inferd/models/setup.sh)" >&2; exit 1; }
        ai_args+=(--add "$AI_MODELS_DIR/$m:/models/$m")
    done
    ai_args+=(--add "$root/configs/models.toml:/models/models.toml")
fi
if [ -n "${RIG_L1_QEMU:-}" ]; then
    # What QEMU loads for q35 and microvm (found with strace): SeaBIOS and the linuxboot option
    # ROM for q35 (kvmvapic.bin too), qboot for microvm. QEMU looks for them next to its binary
    # (<bindir>/../share/qemu, .../share/seabios), so the binary keeps its path in L1. Option
    # ROMs of NICs are not carried: give their devices `romfile=`.
    for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/bios-microvm.bin \
        /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/linuxboot.bin \
        /usr/share/qemu/kvmvapic.bin; do
        [ -e "$f" ] || { echo "$0: $f is missing (packages seabios, qemu-system-data)" >&2; exit 1; }
        ai_args+=(--add "$f:$f")
    done
    ai_args+=(--bin "$RIG_L1_QEMU:$RIG_L1_QEMU")
    # QEMU 7.2 keeps TCG in a module; with -accel kvm it should not need it, but it is 22 KiB.
    tcg=/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so
    if [ -f "$tcg" ]; then
        ai_args+=(--add "$tcg:$tcg")
    fi
fi

"$root/guest-kernel/build-initramfs.sh" "$out/l1-initrd.cpio" \
    --init "$here/l1-init" \
    --bin "$aivmm:/bin/aivmm" \
    --bin "$target/debug/rig-kvm-hold:/bin/rig-kvm-hold" \
    --add "$kdir/vmlinux:/l2/vmlinux" \
    --add "$kdir/vmlinuz:/l2/vmlinuz" \
    --add "$out/l2-initrd.gz:/l2/initrd.gz" \
    --add "$kdir/modules:/mods" \
    --add "$here/configs:/configs" \
    --add "$scenario:/rig/scenario.sh" \
    "${ai_args[@]}" "$@" >/dev/null
cp "$kdir/vmlinuz" "$out/l1-vmlinuz"
echo "L1: $out/l1-vmlinuz $out/l1-initrd.cpio ($(($(stat -c %s "$out/l1-initrd.cpio") / 1024)) KiB)"
