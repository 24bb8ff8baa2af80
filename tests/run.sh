#!/usr/bin/env bash
# `make test`: the whole test suite, as CI runs it.
#   1. host dependencies, the guest kernel and the models (tests/rig/deps.sh,
#      devices/ai-inferd/models/setup.sh)
#   2. cargo build --workspace --all-targets, and the statically linked release aivmm that
#      operators install (vmm/build-static.sh, `make release`)
#   3. cargo test --workspace (unit tests, real-/dev/kvm tests, and the e2e tests: one rig
#      run, nested under QEMU TCG on hosts whose KVM cannot boot Linux, of that static aivmm
#      unless AIVMM_BIN names another)
#   4. a smoke run of every fuzz target (fuzz/smoke.sh: FUZZ_SECONDS, 15 s each; cargo-fuzz is
#      installed on first use; AIVMM_TEST_FUZZ=0 skips it)
# Ends with a summary: per test binary results, failed tests, where the rig's log is.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mkdir -p target
log=target/test-output.log
t0=$SECONDS

step() {
    # Bold headings on a terminal, plain text in logs.
    if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

# A test run builds from scratch on CI: incremental state would only cost disk there.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

# A clean run needs about need_gb GiB free (3.2 GB measured: build, rig images, models,
# fuzz);
# say so up front rather than fail half-way with ENOSPC.
need_gb=${AIVMM_TEST_NEED_GB:-4}
free_gb=$(df -Pk target | awk 'NR == 2 { print int($4 / 1048576) }')
echo "disk: ${free_gb} GiB free under target/ (a clean run needs about ${need_gb})"
if [ "${free_gb:-0}" -lt "$need_gb" ]; then
    echo "warning: less than ${need_gb} GiB free; the build may fail with 'No space left on device'" >&2
fi

step "dependencies (tests/rig/deps.sh, devices/ai-inferd/models/setup.sh)"
tests/rig/deps.sh
devices/ai-inferd/models/setup.sh

step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

# The e2e rig boots its guests with the binary that ships: release-optimised and static.
step "static release build (vmm/build-static.sh)"
static_dir=$(vmm/build-static.sh)
export AIVMM_BIN=${AIVMM_BIN:-$static_dir/aivmm}
echo "e2e rig: $AIVMM_BIN"

step "cargo test --workspace"
set +e
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

fuzz_rc=0
if [ "${AIVMM_TEST_FUZZ:-1}" != 0 ]; then
    step "fuzz smoke (fuzz/smoke.sh)"
    set +e
    FUZZ_SECONDS=${FUZZ_SECONDS:-15} fuzz/smoke.sh 2>&1 | tee target/fuzz-smoke.log
    fuzz_rc=${PIPESTATUS[0]}
    set -e
fi

step "summary"
awk '
    /^     Running / {
        # "Running unittests src/lib.rs (target/debug/deps/vmm-0123abcd)" -> "vmm src/lib.rs"
        src = $0; sub(/^ +Running (unittests )?/, "", src); sub(/ \(.*$/, "", src)
        exe = $NF; sub(/^.*\//, "", exe); sub(/-[0-9a-f]+\)$/, "", exe)
        bin = exe " " src
    }
    /^   Doc-tests / { bin = "doc-tests " $2 }
    /^test result:/ {
        printf "%-45s %s\n", bin, $0
        passed += $4; failed += $6; ignored += $8
    }
    / \.\.\. FAILED$/ { fails[++n] = bin ": " $2 }
    END {
        printf "\ntotal: %d passed, %d failed, %d skipped\n", passed, failed, ignored
        for (i = 1; i <= n; i++) print "FAILED " fails[i]
    }' "$log"
for l in target/rig/l1-console.log target/rig/direct-console.log; do
    [ -f "$l" ] && echo "rig log: $l"
done
if [ "${AIVMM_TEST_FUZZ:-1}" != 0 ]; then
    grep -E '^smoke: (all|failed)' target/fuzz-smoke.log || echo "fuzz smoke: no result line (target/fuzz-smoke.log)"
fi
echo "full output: $log; $((SECONDS - t0)) s"
if [ "$rc" -ne 0 ]; then
    echo "RESULT: FAIL (cargo test exit code $rc)"
    exit "$rc"
fi
if [ "$fuzz_rc" -ne 0 ]; then
    echo "RESULT: FAIL (fuzz smoke exit code $fuzz_rc)"
    exit "$fuzz_rc"
fi
echo "RESULT: PASS"
