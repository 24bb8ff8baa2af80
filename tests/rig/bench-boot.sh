#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Boot time to the guest's init and VMM memory overhead: aivmm vs QEMU (`-M microvm`, `-M q35`),
# side by side in one boot of the nested rig's L1 (docs/PERFORMANCE.md has the results).
#
#   tests/rig/bench-boot.sh [OUTDIR]            (default <repo>/target/rig/bench-boot)
#
# Builds aivmm (the static release build, vmm/build-static.sh), an L1 whose scenario is
# tests/rig/bench-boot-l1.sh and which also carries qemu-system-x86_64 (with its shared
# libraries and the firmware it loads), boots it under QEMU TCG (tests/rig/run-l1.sh), and turns
# the BENCH-* lines L1 prints into a table: median and min..max per VMM over BENCH_RUNS
# interleaved rounds, and aivmm's ratio to each QEMU.
# The L1 console is kept in OUTDIR/l1-console.log, the table in OUTDIR/results.md.
#
# Environment: BENCH_RUNS (10), BENCH_TIMEOUT (120 s per VMM run inside L1), BENCH_DIAG (1),
# BENCH_DIAG_EXTRA (words for the diagnostic runs' guest command line, e.g. initcall_debug;
# tests/rig/initcall-compare.sh compares two of their kernel logs),
# BENCH_VARIANTS (default: aivmm aivmm-vmlinux aivmm-2m microvm-min microvm microvm-nocmos q35; also
# microvm-rtc, and aivmm-vmlinux-noseccomp for the filters' cost: see tests/rig/bench-boot-l1.sh),
# BENCH_STALL (420 s of L1 console silence before a stuck L1 is stopped), BENCH_L1_ATTEMPTS
# (3 L1 boots at most: a stuck L1 is replaced by a new one that runs the missing rounds),
# BENCH_L1_TIMEOUT (3600 s for the whole L1), AIVMM_BIN (skip the build, use this binary),
# CH_BIN / FC_BIN (Cloud Hypervisor / Firecracker binaries for the peer variants
# cloud-hypervisor, cloud-hypervisor-vmlinux, firecracker, firecracker-vmlinux: name them in
# BENCH_VARIANTS; the project does not download or build them).
# Exit code: 0 when every measured run reached the marker and exited 0, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"
cd "$root"

out=${1:-$root/target/rig/bench-boot}
runs=${BENCH_RUNS:-10}
mkdir -p "$out"

"$here/deps.sh"
need_cmd qemu-system-x86_64 qemu-system-x86

if [ -n "${AIVMM_BIN:-}" ]; then
    aivmm=$AIVMM_BIN
else
    # What operators install: the static release build (`make release`).
    aivmm=$("$root/vmm/build-static.sh")/aivmm
fi

qemu=$(command -v qemu-system-x86_64)

stage=$(mktemp -d "${TMPDIR:-/tmp}/aivmm-bench.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The guest scripts, appended to the rig's L2 initramfs inside L1 (a second cpio archive).
mkdir -p "$stage/l2/bench"
printf '#!/bin/sh\n# Boot-time runs: nothing to do, the init powers off.\nexit 0\n' \
    >"$stage/l2/bench/exit.sh"
printf '#!/bin/sh\n# Memory runs: stay up while L1 samples the VMM.\necho BENCH-GUEST-SLEEPING\nsleep 5\nexit 0\n' \
    >"$stage/l2/bench/sleep.sh"
printf '#!/bin/sh\n# Diagnostic runs: the kernel log, whose timestamps the console did not slow down.\necho BENCH-DMESG-BEGIN\ndmesg\necho BENCH-DMESG-END\nexit 0\n' \
    >"$stage/l2/bench/dmesg.sh"
chmod 0755 "$stage/l2/bench/"*.sh
(cd "$stage/l2" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$stage/l2-extra.cpio.gz"

cat >"$stage/bench.env" <<EOF
BENCH_RUNS=$runs
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
BENCH_DIAG=${BENCH_DIAG:-1}
BENCH_QEMU=$qemu
EOF
if [ -n "${BENCH_VARIANTS:-}" ]; then
    echo "BENCH_VARIANTS='$BENCH_VARIANTS'" >>"$stage/bench.env"
fi
if [ -n "${BENCH_DIAG_EXTRA:-}" ]; then
    echo "BENCH_DIAG_EXTRA='$BENCH_DIAG_EXTRA'" >>"$stage/bench.env"
fi

add=(
    --add "$here/bench-run.sh:/rig/bench-run.sh"
    --add "$stage/l2-extra.cpio.gz:/bench/l2-extra.cpio.gz"
    --add "$stage/bench.env:/bench/bench.env"
)

# The peer VMMs, when given: release builds of Cloud Hypervisor (CH_BIN) and Firecracker
# (FC_BIN), built from their source as docs/PERFORMANCE.md describes; they go into L1 with
# their shared libraries and run as the variants cloud-hypervisor[-vmlinux] and
# firecracker[-vmlinux].
if [ -n "${CH_BIN:-}" ]; then
    add+=(--bin "$CH_BIN:/bin/cloud-hypervisor")
    echo "BENCH_CH=/bin/cloud-hypervisor" >>"$stage/bench.env"
fi
if [ -n "${FC_BIN:-}" ]; then
    add+=(--bin "$FC_BIN:/bin/firecracker")
    echo "BENCH_FC=/bin/firecracker" >>"$stage/bench.env"
fi

# QEMU, its libraries and firmware go into L1 at their paths (build-l1.sh).
RIG_L1_QEMU=$qemu "$here/build-l1.sh" "$out" "$aivmm" "$here/bench-boot-l1.sh" "${add[@]}"

echo "bench-boot: booting L1 (QEMU TCG); $runs runs of each VMM take a while (about 25 min)"
# A stuck L1 is stopped and a new one runs the rounds still missing (bench-l1.sh).
# shellcheck source=bench-l1.sh
. "$here/bench-l1.sh"
bench_l1_rounds bench-boot "$out" "$runs"
if [ "$BENCH_COMPLETE" = 0 ]; then
    grep -q '^BENCH-RUN .* run=[0-9]' "$out/bench-lines.txt" || exit 1
    echo "bench-boot: INCOMPLETE: the table below has only the runs L1 finished" >&2
fi
echo "bench-boot: $BENCH_ROUNDS complete rounds from $BENCH_BOOTS L1 boot(s)"

# The table. Medians of an even count are the mean of the two middle values. "Fastest microvm"
# is the microvm option set with the lowest median: the ratio the boot-time target refers to.
awk -v runs="$runs" "$AWK_KV$AWK_STATS"'
/^BENCH-FACT / { sub(/^BENCH-FACT /, ""); k = $0; sub(/=.*/, "", k); v = $0; sub(/^[^=]*=/, "", v); fact[k] = v; next }
/^BENCH-RUN / {
    vmm = kv($0, "vmm"); run = kv($0, "run")
    if (run !~ /^[0-9]+$/) next
    b = kv($0, "boot_ms"); rc = kv($0, "rc"); g = kv($0, "guest_uptime"); e = kv($0, "exit_ms")
    if (!(vmm in seen)) { seen[vmm] = 1; order[++nv] = vmm }
    total[vmm]++
    if (rc != 0) bad[vmm]++
    if (b == "na") { missed[vmm]++; next }
    n[vmm]++; boot[vmm, n[vmm]] = b + 0; ex[vmm, n[vmm]] = e + 0
    if (g != "na") { ng[vmm]++; gu[vmm, ng[vmm]] = g * 1000; pre[vmm, ng[vmm]] = b - g * 1000 }
    i = kv($0, "vmm_init_ms"); if (i != "na" && i != "") { ni[vmm]++; vi[vmm, ni[vmm]] = i + 0 }
}
/^BENCH-ROLLUP / {
    vmm = kv($0, "vmm"); w = kv($0, "when")
    roll[vmm, w] = kv($0, "Rss_kb")
    next
}
/^BENCH-MEM / {
    vmm = kv($0, "vmm"); w = kv($0, "when")
    if (!(vmm in mseen)) { mseen[vmm] = 1; morder[++nm] = vmm }
    h = kv($0, "HugetlbPages_kb"); if (h == "") h = "n/a"
    mem[vmm, w] = sprintf("%s,%s,%s,%s,%s,%s,%s,%s", kv($0, "VmRSS_kb"), kv($0, "RssAnon_kb"), kv($0, "RssFile_kb"), kv($0, "RssShmem_kb"), h, kv($0, "VmHWM_kb"), kv($0, "guest_rss_kb"), kv($0, "guest_thp_kb"))
}
END {
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (n[v] > 0) { stats(boot, v, n[v]); med[v] = MED; lo[v] = LO; hi[v] = HI }
        # Only variants with the common guest command line compete for the headline.
        if (v ~ /^microvm/ && !(("cmdline_extra_" v) in fact) && (v in med) && (best == "" || med[v] < med[best])) best = v
    }
    printf "Boot time to the guest init marker: L1 wall clock (ms) from starting the VMM to the marker line on its console; %d interleaved rounds\n\n", runs
    printf "| VMM | median | min..max | guest /proc/uptime at the marker, median | before the guest clock starts, median | aivmm / this | aivmm-2m / this |\n"
    printf "|-----|-------:|----------|------:|------:|------:|------:|\n"
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (!(v in med)) { printf "| %s | no run reached the marker | | | | | |\n", v; continue }
        gm = "n/a"; pm = "n/a"
        if (ng[v] > 0) { stats(gu, v, ng[v]); gm = sprintf("%.0f", MED); stats(pre, v, ng[v]); pm = sprintf("%.0f", MED) }
        r1 = (v != "aivmm" && ("aivmm" in med)) ? sprintf("%.2f", med["aivmm"] / med[v]) : ""
        r2 = (v != "aivmm-2m" && ("aivmm-2m" in med)) ? sprintf("%.2f", med["aivmm-2m"] / med[v]) : ""
        printf "| %s | %.0f | %d..%d | %s | %s | %s | %s |\n", v, med[v], lo[v], hi[v], gm, pm, r1, r2
        if (missed[v] + 0 > 0 || bad[v] + 0 > 0) notes = notes sprintf("%s: %d of %d runs without the marker, %d with a non-zero exit\n", v, missed[v] + 0, total[v], bad[v] + 0)
    }
    # aivmm (its default PVH vmlinux) against the faster peer, each peer in its fastest form.
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (v ~ /^(cloud-hypervisor|firecracker)/ && (v in med) && (peer == "" || med[v] < med[peer])) peer = v
    }
    if (peer != "" && ("aivmm-vmlinux" in med)) {
        printf "\nFastest peer: %s, median %.0f ms. aivmm-vmlinux / %s = %.2f (target: <= 0.8)\n", peer, med[peer], peer, med["aivmm-vmlinux"] / med[peer]
        for (k = 1; k <= nv; k++) {
            v = order[k]
            if (v ~ /^(cloud-hypervisor|firecracker)/ && (v in med)) printf "aivmm-vmlinux / %s = %.2f (medians %.0f / %.0f ms)\n", v, med["aivmm-vmlinux"] / med[v], med["aivmm-vmlinux"], med[v]
        }
    }
    if (("aivmm-vmlinux" in med) && ("aivmm-vmlinux-noseccomp" in med)) {
        printf "\nCost of the seccomp filters on boot: aivmm-vmlinux / aivmm-vmlinux-noseccomp = %.2f (medians %.0f / %.0f ms)\n", med["aivmm-vmlinux"] / med["aivmm-vmlinux-noseccomp"], med["aivmm-vmlinux"], med["aivmm-vmlinux-noseccomp"]
    }
    if (best != "") {
        printf "\nFastest microvm option set: %s (%s), median %.0f ms.", best, fact["machine_" best], med[best]
        if ("aivmm" in med) printf " aivmm / microvm = %.2f", med["aivmm"] / med[best]
        if ("aivmm-2m" in med) printf ", aivmm-2m / microvm = %.2f", med["aivmm-2m"] / med[best]
        if (("q35" in med) && ("aivmm" in med)) printf "; aivmm / q35 = %.2f", med["aivmm"] / med["q35"]
        printf " (target: aivmm <= 0.5 x microvm)\n"
    }
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (ni[v] > 0) { stats(vi, v, ni[v]); printf "%s boot timer (its process start to the guest init'"'"'s port 0x440 write): median %.0f ms, %d..%d\n", v, MED, LO, HI }
    }
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (n[v] > 0) { stats(ex, v, n[v]); exitline = exitline sprintf("%s %.0f ms; ", v, MED) }
    }
    if (exitline != "") printf "Start to VMM exit (guest powered off), median: %s\n", exitline
    if (notes != "") printf "\n%s", notes
    printf "\nVMM memory after boot (KiB, /proc/<pid>/status and smaps). Guest RAM is 256 MiB: a memfd (resident part in RssShmem and in the guest-RAM column) or hugetlb (HugetlbPages, outside VmRSS). L1'"'"'s root file system is the initramfs, so binaries and libraries count as RssShmem there, not RssFile: the VMM overhead is VmRSS minus the guest RAM'"'"'s resident part\n\n"
    printf "| VMM | sampled | VmRSS | guest RAM resident | of it in THP | VMM overhead = VmRSS - guest RAM | by page walk = smaps_rollup Rss - guest RAM | RssAnon | RssFile | RssShmem | HugetlbPages | VmHWM |\n"
    printf "|-----|---------|------:|------:|------:|------:|------:|------:|------:|------:|------:|------:|\n"
    for (k = 1; k <= nm; k++) {
        v = morder[k]
        split("marker later", ws, " ")
        for (j = 1; j <= 2; j++) {
            if (!((v, ws[j]) in mem)) continue
            split(mem[v, ws[j]], f, ",")
            pw = ((v, ws[j]) in roll && roll[v, ws[j]] != "") ? sprintf("%d KiB (%.2f MiB)", roll[v, ws[j]] - f[7], (roll[v, ws[j]] - f[7]) / 1024) : "n/a"
            printf "| %s | %s | %s | %s | %s | %d KiB (%.2f MiB) | %s | %s | %s | %s | %s | %s |\n", v, (ws[j] == "marker" ? "at the marker" : "3 s later"), f[1], f[7], (f[8] == "" ? "n/a" : f[8]), f[1] - f[7], (f[1] - f[7]) / 1024, pw, f[2], f[3], f[4], f[5], f[6]
        }
    }
    printf "\n"
    for (k = 1; k <= nv; k++) {
        v = order[k]
        if (("machine_" v) in fact) printf "%s: -M %s\n", v, fact["machine_" v]
        if (("cmdline_extra_" v) in fact) printf "%s: guest command line plus: %s (not the common command line)\n", v, fact["cmdline_extra_" v]
    }
    if ("ch_version" in fact) printf "cloud-hypervisor: %s\n", fact["ch_version"]
    if ("fc_version" in fact) printf "firecracker: %s\n", fact["fc_version"]
    if ("aivmm_2m_config" in fact) printf "aivmm-2m: --config with %s\n", fact["aivmm_2m_config"]
    printf "L1: kernel %s, THP %s, shmem THP %s; %s\nguest cmdline: %s\n", fact["l1_kernel"], fact["l1_thp"], fact["l1_shmem_thp"], fact["qemu_version"], fact["cmdline"]
}' "$out/bench-lines.txt" | tee "$out/results.md"

# Success means a complete benchmark in which every measured run booted and exited cleanly.
[ "$BENCH_COMPLETE" = 1 ] || exit 1
if awk '/^BENCH-RUN / && / run=[0-9]+ / && (/boot_ms=na/ || !/ rc=0 /) { bad = 1 } END { exit bad }' "$out/bench-lines.txt"; then
    exit 0
fi
exit 1
