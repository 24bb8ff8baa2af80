#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Tenant I/O: aivmm's virtio-blk, virtio-net and vsock against QEMU's own virtio devices, side
# by side in one boot of the nested rig's L1 (docs/PERFORMANCE.md, "Tenant I/O", has results).
# Run by hand (as root); not part of the test suite: about 15 min once aivmm is built.
#
#   tests/rig/bench-io.sh [OUTDIR]            (default <repo>/target/rig-bench-io)
#
# Builds aivmm (static release, vmm/build-static.sh) and rig-io (release: a debug rig-io alone
# caps a stream at ~20 MiB/s), the disk-root tenant (guest-image/build-rootfs.sh, with the
# guest script below as /bench/io.sh), an L1 whose scenario is tests/rig/bench-io-l1.sh and
# which also carries qemu-system-x86_64, boots it under QEMU TCG (tests/rig/run-l1.sh), and
# turns the BENCH-* lines L1 prints into a table: per VMM the median and min..max over the
# interleaved rounds, and aivmm's ratio to each QEMU's median. OUTDIR gets results.md (the
# table), rounds.log (every run's BENCH-RUN line and the raw guest and L1 rig-io lines behind
# it) and l1-console.log.
#
# Environment: BENCH_RUNS (5 rounds), BENCH_TIMEOUT (300 s per VMM run inside L1),
# BENCH_IO_TIMEOUT (60 s per rig-io step), BENCH_DISK_MIB (128: the scratch disk, a file in
# L1's memory), BENCH_BLK_MIB (64: the sequential test), BENCH_RANDREADS (4000),
# BENCH_NET_BYTES and BENCH_VSOCK_BYTES (64M each way), BENCH_RTT (1000 round trips),
# BENCH_VARIANTS (default: aivmm qemu qemu-vhost aivmm-initrd; see bench-io-l1.sh),
# BENCH_PROBE (1: one uncounted warm-up boot of each), BENCH_STALL, BENCH_L1_ATTEMPTS,
# BENCH_L1_TIMEOUT (as in bench-boot.sh: a stuck L1 is replaced by a new one for the rounds
# still missing), AIVMM_BIN and RIG_IO_BIN (skip the build, use these binaries).
# Exit code: 0 when every measured run finished its checks, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
cd "$root"

out=${1:-$root/target/rig-bench-io}
runs=${BENCH_RUNS:-5}
mkdir -p "$out"
t_start=$SECONDS

"$here/deps.sh"
need_cmd qemu-system-x86_64 qemu-system-x86

if [ -n "${AIVMM_BIN:-}" ] && [ -n "${RIG_IO_BIN:-}" ]; then
    aivmm=$AIVMM_BIN
    rig_io=$RIG_IO_BIN
else
    cargo build -q --release -p rig-io --bin rig-io
    target=$(cargo_target_dir "$root")
    aivmm=${AIVMM_BIN:-$("$root/vmm/build-static.sh")/aivmm}
    rig_io=${RIG_IO_BIN:-$target/release/rig-io}
fi
qemu=$(command -v qemu-system-x86_64)

stage=$(mktemp -d "${TMPDIR:-/tmp}/aivmm-bench-io.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The guest side, in the tenant's root image and in the rig's L2 initramfs (for the boot
# reference run, which runs no check).
cat >"$stage/io.sh" <<'EOF'
#!/bin/sh
# Tenant I/O benchmark, the guest side (written by tests/rig/bench-io.sh): runs the checks that
# bench.checks= names (comma-separated, in order: blk, net, vsock; none) with the rig's check
# scripts, which read their settings from the kernel command line too. Prints
# AIVMM-BENCH-IO-STEP <check> before each (L1 starts its side then) and
# AIVMM-BENCH-IO-DONE rc=<n> at the end (0 when every check passed).
checks=none
for a in $(cat /proc/cmdline); do
    case $a in bench.checks=*) checks=${a#bench.checks=} ;; esac
done
rc=0
for c in $(echo "$checks" | tr ',' ' '); do
    [ "$c" = none ] && continue
    echo "AIVMM-BENCH-IO-STEP $c"
    case $c in
    blk) sh /scripts/blk-check.sh bench || rc=1 ;;
    net) sh /scripts/net-check.sh || rc=1 ;;
    vsock) sh /scripts/vsock-check.sh || rc=1 ;;
    *) echo "bench-io: unknown check $c"; rc=2 ;;
    esac
done
echo "AIVMM-BENCH-IO-DONE rc=$rc"
exit "$rc"
EOF
chmod 0755 "$stage/io.sh"

{
    echo "BENCH_RUNS=$runs"
    echo "BENCH_QEMU=$qemu"
    for v in BENCH_TIMEOUT BENCH_IO_TIMEOUT BENCH_DISK_MIB BENCH_BLK_MIB BENCH_RANDREADS \
        BENCH_NET_BYTES BENCH_VSOCK_BYTES BENCH_RTT BENCH_PROBE BENCH_VARIANTS; do
        if [ -n "${!v:-}" ]; then
            echo "$v='${!v}'"
        fi
    done
} >"$stage/bench.env"

# QEMU with its libraries and firmware, rig-io, the tenant image and boot initramfs
# (build-l1.sh, l2-image.sh).
RIG_L1_QEMU=$qemu RIG_IO_BIN=$rig_io RIG_L2_ADD="$stage/io.sh:/bench/io.sh" \
    "$here/build-l1.sh" "$out" "$aivmm" "$here/bench-io-l1.sh" \
    --add "$here/bench-run.sh:/rig/bench-run.sh" \
    --add "$stage/bench.env:/bench/bench.env"

echo "bench-io: booting L1 (QEMU TCG); $runs rounds take a while (2-4 min each)"
# This host's load is part of the result: the figures are only as quiet as it was.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# shellcheck source=bench-l1.sh
. "$here/bench-l1.sh"
bench_l1_rounds bench-io "$out" "$runs"
if [ "$BENCH_COMPLETE" = 0 ]; then
    grep -q '^BENCH-RUN .* run=[0-9]' "$out/bench-lines.txt" || exit 1
    echo "bench-io: INCOMPLETE: the table below has only the runs L1 finished" >&2
fi
grep -E '^BENCH-(RUN|RAW|FACT)' "$out/bench-lines.txt" >"$out/rounds.log" || true
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-io: $BENCH_ROUNDS complete rounds from $BENCH_BOOTS L1 boot(s) in $((SECONDS - t_start)) s; raw lines in $out/rounds.log"

# The table: per figure and VMM the median (min..max) over the rounds, and aivmm's median
# over each QEMU's. Runs whose VMM or guest checks failed still count for the figures they
# measured (a failed step reports na, which is left out); they are listed under the table.
awk -v runs="$runs" -v load="before $load_before, after $load_after" "$AWK_KV$AWK_STATS"'
/^BENCH-FACT / { sub(/^BENCH-FACT /, ""); k = $0; sub(/=.*/, "", k); v = $0; sub(/^[^=]*=/, "", v); fact[k] = v; next }
/^BENCH-RUN / {
    vmm = kv($0, "vmm"); run = kv($0, "run")
    if (run !~ /^[0-9]+$/) next
    total[vmm]++
    if (kv($0, "rc") != "0" || kv($0, "script_rc") != "0")
        notes = notes sprintf("%s run %s: VMM exit %s, guest script exit %s\n", vmm, run, kv($0, "rc"), kv($0, "script_rc"))
    for (i = 1; i <= NF; i++) {
        if ($i !~ /=/) continue
        k = $i; sub(/=.*/, "", k); x = $i; sub(/^[^=]*=/, "", x)
        if (k == "vmm" || k == "run" || x == "na" || x !~ /^[0-9.]+$/) continue
        key = vmm SUBSEP k
        val[key, ++cnt[key]] = x + 0
    }
}
# cell(vmm, k, fmt): "median (min..max)" or "-"; sets the global M to the median ("" when none).
function cell(vmm, k, fmt,    key) {
    key = vmm SUBSEP k; M = ""
    if (!(key in cnt)) return "-"
    stats(val, key, cnt[key]); M = MED
    return sprintf(fmt " (" fmt "-" fmt ")", MED, LO, HI)
}
function ratio(a, b) { return (a != "" && b != "" && b > 0) ? sprintf("%.2f", a / b) : "-" }
function row(k, label, fmt, better,    c1, c2, c3, m1, m2, m3) {
    c1 = cell("aivmm", k, fmt); m1 = M
    c2 = cell("qemu", k, fmt); m2 = M
    c3 = cell("qemu-vhost", k, fmt); m3 = M
    if (c1 == "-" && c2 == "-" && c3 == "-") return
    printf "| %s | %s | %s | %s | %s | %s | %s |\n", label, c1, c2, c3, ratio(m1, m2), ratio(m1, m3), better
}
END {
    printf "Tenant I/O in the nested rig'"'"'s L1, %d interleaved rounds: median (min-max) per VMM; aivmm / QEMU is the ratio of the medians\n\n", runs
    printf "| figure | aivmm | QEMU (vhost=off) | QEMU vhost=on | aivmm / QEMU | aivmm / QEMU vhost=on | better |\n"
    printf "|---|---:|---:|---:|---:|---:|---|\n"
    row("blk_write_mibps", "virtio-blk sequential write, 1 MiB O_DIRECT (MiB/s)", "%.1f", "higher")
    row("blk_read_mibps", "virtio-blk sequential read, 1 MiB O_DIRECT (MiB/s)", "%.1f", "higher")
    row("blk_iops", "virtio-blk 4 KiB random read, O_DIRECT, QD1 (IOPS)", "%.0f", "higher")
    row("blk_p50_us", "virtio-blk 4 KiB random read p50 (us)", "%.0f", "lower")
    row("blk_p99_us", "virtio-blk 4 KiB random read p99 (us)", "%.0f", "lower")
    row("net_h2g_mibps", "virtio-net TCP L1 -> L2 (MiB/s, L1-timed)", "%.1f", "higher")
    row("net_g2h_mibps", "virtio-net TCP L2 -> L1 (MiB/s, L1-timed)", "%.1f", "higher")
    row("net_rtt_p50_us", "virtio-net TCP round trip, 64 B, p50 (us)", "%.0f", "lower")
    row("net_rtt_p99_us", "virtio-net TCP round trip, 64 B, p99 (us)", "%.0f", "lower")
    row("vsock_h2g_mibps", "vsock stream L1 -> L2 (MiB/s, L1-timed)*", "%.1f", "higher")
    row("vsock_g2h_mibps", "vsock stream L2 -> L1 (MiB/s, L1-timed)*", "%.1f", "higher")
    row("vsock_rtt_p50_us", "vsock round trip, 64 B, p50 (us)*", "%.0f", "lower")
    row("vsock_rtt_p99_us", "vsock round trip, 64 B, p99 (us)*", "%.0f", "lower")
    row("net_h2g_guest_mibps", "virtio-net TCP L1 -> L2 (MiB/s, guest-timed)", "%.1f", "higher")
    row("net_g2h_guest_mibps", "virtio-net TCP L2 -> L1 (MiB/s, guest-timed)", "%.1f", "higher")
    row("vsock_h2g_guest_mibps", "vsock stream L1 -> L2 (MiB/s, guest-timed)*", "%.1f", "higher")
    row("vsock_g2h_guest_mibps", "vsock stream L2 -> L1 (MiB/s, guest-timed)*", "%.1f", "higher")
    printf "\n* The host sides differ: aivmm'"'"'s vsock is hybrid (L1 talks to a unix socket of aivmm, which relays to the guest), QEMU'"'"'s is vhost-vsock (L1 uses AF_VSOCK, the L1 kernel moves the data).\n"
    printf "\nBoot to init (aivmm'"'"'s own boot timer, its start to the guest init'"'"'s port 0x440 write; L1 clock to the marker line):\n\n"
    printf "| run | boot timer (ms) | to the marker, L1 clock (ms) |\n|---|---:|---:|\n"
    printf "| aivmm, disk root (boot initramfs, virtio-blk root, 4 devices) | %s | %s |\n", cell("aivmm", "vmm_init_ms", "%.0f"), cell("aivmm", "boot_ms", "%.0f")
    printf "| aivmm, the rig'"'"'s initramfs L2 (no devices) | %s | %s |\n", cell("aivmm-initrd", "vmm_init_ms", "%.0f"), cell("aivmm-initrd", "boot_ms", "%.0f")
    printf "| QEMU q35, disk root (SeaBIOS) | - | %s |\n", cell("qemu", "boot_ms", "%.0f")
    if ("qemu-vhost" in total) printf "| QEMU q35 vhost=on, disk root | - | %s |\n", cell("qemu-vhost", "boot_ms", "%.0f")
    printf "\nMeasured runs:"
    split("aivmm qemu qemu-vhost aivmm-initrd", names, " ")
    for (i = 1; i in names; i++) if (names[i] in total) printf " %s %d;", names[i], total[names[i]]
    printf "\n"
    if (notes != "") printf "\nRuns with a failure (their failed steps are na, left out):\n%s", notes
    printf "\nThis host'"'"'s load average (1, 5, 15 min): %s\n", load
    printf "L1: kernel %s, THP %s, shmem THP %s, / on %s, vhost-net %s, vhost-vsock %s; %s\n", fact["l1_kernel"], fact["l1_thp"], fact["l1_shmem_thp"], fact["l1_tmp_fs"], fact["l1_vhost_net"], fact["l1_vhost_vsock"], fact["qemu_version"]
    printf "sizes: scratch disk %s MiB, sequential %s MiB, %s random reads, net %s and vsock %s each way, %s round trips\n", fact["disk_mib"], fact["blk_mib"], fact["randreads"], fact["net_bytes"], fact["vsock_bytes"], fact["rtt_count"]
    printf "guest cmdline: %s bench.checks=...\naivmm: %s\nQEMU: %s\n", fact["cmdline"], fact["aivmm_command"], fact["qemu_command"]
    for (k in fact) if (k ~ /^dropped_/) printf "%s: %s\n", k, fact[k]
}' "$out/bench-lines.txt" | tee "$out/results.md"

# Success means a complete benchmark in which every measured run passed its checks.
[ "$BENCH_COMPLETE" = 1 ] || exit 1
if awk '/^BENCH-RUN / && / run=[0-9]+ / && (!/ rc=0 / || !/ script_rc=0 /) { bad = 1 } END { exit bad }' \
    "$out/bench-lines.txt"; then
    exit 0
fi
exit 1
