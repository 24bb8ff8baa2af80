#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install what the nested test rig needs on the host, and fetch the guest kernel.
# Idempotent and quiet when everything is present, so every test run can call it.
#
#   tests/rig/deps.sh            packages + kernel into <repo>/target/guest-kernel
#
# Packages: qemu-system-x86 (runs L1 under TCG), busybox-static (the initramfs userland),
# cpio (packs initramfs images), curl (the API scenario's client in L1). The kernel is Debian's linux-image-cloud-amd64 (L1 and L2).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"

need_cmd qemu-system-x86_64 qemu-system-x86
need_cmd cpio cpio
# curl goes into L1: the API scenario drives aivmm with `curl --unix-socket`, as users do.
need_cmd curl curl
static_busybox >/dev/null
# The kernel script prints its paths; a caller that wants them runs it directly.
"$root/guest-kernel/fetch-kernel.sh" "${AIVMM_KERNEL_DIR:-$root/target/guest-kernel}" >/dev/null
