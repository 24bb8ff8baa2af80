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
#   /l2/vmlinuz         the L2 kernel (same kernel)
#   /l2/initrd.gz       the L2 initramfs (guest-kernel/build-initramfs.sh, with
#                       tests/rig/guest/* under /scripts/; AIVMM_AGENT adds the guest agent)
#   /mods/              KVM and VFIO modules, /mods/load-order
#   /configs/           tests/rig/configs/*.toml
#   /rig/scenario.sh    SCENARIO_SCRIPT
#   /bin/ai-inferd      AI_INFERD_BIN, when set (the ai_infer scenario's daemon)
#   /models/            AI_MODELS_DIR's mlp.onnx and minilm/ with configs/models.toml, when set
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

"$root/guest-kernel/build-initramfs.sh" "$out/l1-initrd.cpio" \
    --init "$here/l1-init" \
    --bin "$aivmm:/bin/aivmm" \
    --bin "$target/debug/rig-kvm-hold:/bin/rig-kvm-hold" \
    --add "$kdir/vmlinuz:/l2/vmlinuz" \
    --add "$out/l2-initrd.gz:/l2/initrd.gz" \
    --add "$kdir/modules:/mods" \
    --add "$here/configs:/configs" \
    --add "$scenario:/rig/scenario.sh" \
    "${ai_args[@]}" "$@" >/dev/null
cp "$kdir/vmlinuz" "$out/l1-vmlinuz"
echo "L1: $out/l1-vmlinuz $out/l1-initrd.cpio ($(($(stat -c %s "$out/l1-initrd.cpio") / 1024)) KiB)"
