#!/usr/bin/env bash
# Smoke run of the fuzz targets: builds every target in fuzz/fuzz_targets/ with
# cargo-fuzz on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it pass its -Z sanitizer
# flags), then runs each one for FUZZ_SECONDS against a scratch copy of its seed corpus
# in fuzz/corpus/<target>/ (the kept seeds are never modified). Prints libFuzzer's
# closing figures per target and exits non-zero if any target crashed, hung or ran out
# of memory; the crashing input is kept in the artifacts directory.
#
# Knobs (environment):
#   FUZZ_SECONDS    seconds per target (default 10)
#   FUZZ_TARGETS    space-separated targets to run (default: all, from `cargo fuzz list`)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer: address (default) or none
#   FUZZ_ARTIFACTS  where crashing inputs go (default: fuzz/artifacts)
#   CARGO_TARGET_DIR  honoured as by cargo (default: fuzz/target)
#
# Installs cargo-fuzz with `cargo install cargo-fuzz --locked` if it is missing.
# Run it from anywhere: `fuzz/smoke.sh`, or `nice -n 19 fuzz/smoke.sh` on a shared box.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-10}"
sanitizer="${FUZZ_SANITIZER:-address}"
artifacts="${FUZZ_ARTIFACTS:-$here/artifacts}"
target_dir="${CARGO_TARGET_DIR:-$here/target}"
triple="x86_64-unknown-linux-gnu"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: cargo-fuzz is missing; installing it"
    cargo install cargo-fuzz --locked
fi

echo "smoke: building the fuzz targets (sanitizer: $sanitizer)"
start=$(date +%s)
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer"
echo "smoke: built in $(($(date +%s) - start)) s"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

failed=()
summary=()
for t in "${targets[@]}"; do
    bin="$target_dir/$triple/release/$t"
    if [[ ! -x "$bin" ]]; then
        echo "smoke: $t: no binary at $bin" >&2
        failed+=("$t")
        summary+=("$(printf '%-22s MISSING (no binary)' "$t")")
        continue
    fi
    corpus="$scratch/corpus/$t"
    mkdir -p "$corpus" "$artifacts/$t"
    if [[ -d "corpus/$t" ]]; then
        cp -r "corpus/$t/." "$corpus/"
    fi
    log="$scratch/$t.log"
    echo "smoke: $t: fuzzing for ${seconds} s"
    status=0
    "$bin" "$corpus" \
        -max_total_time="$seconds" \
        -rss_limit_mb=1024 \
        -timeout=30 \
        -artifact_prefix="$artifacts/$t/" \
        >"$log" 2>&1 || status=$?
    last="$(grep -E '^#[0-9]+' "$log" | grep 'cov:' | tail -n 1 || true)"
    if [[ $status -ne 0 ]]; then
        echo "smoke: $t: FAILED (exit $status); end of its log:" >&2
        tail -n 40 "$log" >&2
        failed+=("$t")
        summary+=("$(printf '%-22s FAILED  %s' "$t" "$last")")
    else
        summary+=("$(printf '%-22s ok      %s' "$t" "$last")")
    fi
done

echo
echo "smoke: libFuzzer's last status line per target"
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "smoke: failed: ${failed[*]} (inputs in $artifacts)" >&2
    exit 1
fi
echo "smoke: all ${#targets[@]} targets ran ${seconds} s without a crash"
