#!/usr/bin/env bash
# The binaries an operator installs: aivmm and aivmm-jailer, release-optimised and statically
# linked against glibc (`make release`).
#
#   vmm/build-static.sh        prints the directory that holds them
#
# Static, because a process that maps no shared libraries starts sooner (no dynamic loader, no
# relocations against libc) and keeps fewer pages resident: the libc code a VMM touches is a
# fraction of libc.so, and a jail needs no copy of the loader or libc (docs/jailer.md).
# docs/PERFORMANCE.md measures both.
#
# crt-static goes to the target only: with an explicit --target, cargo leaves it off build
# scripts and proc-macros, which run in the compiler and cannot be static. That is also why
# these builds live in their own directory (target/<host triple>/release), apart from
# `cargo build --release`.
#
# Exit code: 0 when both binaries were built and neither asks for a dynamic loader.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
cd "$root"

triple=$(rustc -vV | sed -n 's/^host: //p')
case $triple in
*-linux-gnu) ;;
*)
    echo "$0: host $triple: static builds are set up for linux-gnu hosts only" >&2
    exit 1
    ;;
esac

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build -q --release --target "$triple" \
    -p vmm --bin aivmm -p aivmm-jailer --bin aivmm-jailer >&2

dir=$(cargo_target_dir "$root")/$triple/release
for bin in aivmm aivmm-jailer; do
    # A static program has no PT_INTERP: nothing to load before main.
    if LC_ALL=C readelf -lW "$dir/$bin" | grep -q 'Requesting program interpreter'; then
        echo "$0: $dir/$bin is dynamically linked" >&2
        exit 1
    fi
done
echo "$dir"
