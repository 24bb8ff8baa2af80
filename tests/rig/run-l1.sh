#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Boot the nested rig's L1 under QEMU TCG (the machine the project's e2e tests run in).
#
#   tests/rig/run-l1.sh OUTDIR [TIMEOUT_S]          (OUTDIR as made by build-l1.sh; 1500 s)
#
# The L1 console goes to stdout and to OUTDIR/l1-console.log; the exit code is QEMU's
# (124 when the timeout stopped it). Environment:
#   RIG_SCENARIOS   comma-separated scenarios for L1 to run (default: the script's default)
#   RIG_QEMU_EXTRA  extra QEMU arguments (word-split)
#   RIG_L1_MEM_MB   L1's memory, split evenly between its two NUMA nodes (default 4096; opt
#                   in to more for big guests, e.g. 10240 for ptbench's 4 GiB guests)
#   RIG_HP_NODE0, RIG_HP_NODE1   2 MiB hugepages L1 reserves per node (default 64 / 192)
#   RIG_PTBENCH_SIZES  comma-separated guest sizes in MiB for the ptbench scenario
#
# The machine: q35 with a split irqchip (needed for intel-iommu interrupt remapping), TCG
# with `-cpu max` (emulates AMD-V, so L1 gets a working /dev/kvm), 2 vCPUs and 4 GiB in two
# NUMA nodes (CPU n on node n), an IOMMU, and QEMU's `edu` PCI device behind a PCIe expander
# bridge on node 1: L1 sees it at 0000:81:00.0 with numa_node 1, a stand-in for a GPU there.
# QEMU allocates L1's memory as L1 touches it: a bigger RIG_L1_MEM_MB costs host memory
# only as far as the scenarios use it.
#
# A wedged L1 (both vCPUs spinning in its kernel, nothing printed) is caught early: L1's init
# writes a heartbeat to its second serial port (OUTDIR/l1-heartbeat.log) every 30 s; when it
# stops for RIG_L1_STALL_S (240) seconds, this script samples L1's vCPU registers three times
# through QEMU's monitor (OUTDIR/qemu-monitor.sock; L1 boots with nokaslr, so RIP values match
# the kernel's System.map), appends them to the log as RIG-L1-STALL lines, stops QEMU and
# exits 125.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../guest-kernel/pkg.sh
. "$root/guest-kernel/pkg.sh"

out=${1:?usage: run-l1.sh OUTDIR [TIMEOUT_S]}
limit=${2:-1500}
for f in l1-vmlinuz l1-initrd.cpio; do
    [ -f "$out/$f" ] || { echo "$0: no $out/$f (run build-l1.sh first)" >&2; exit 1; }
done
need_cmd qemu-system-x86_64 qemu-system-x86

mem_mb=${RIG_L1_MEM_MB:-4096}
if ! [ "$mem_mb" -ge 2048 ] 2>/dev/null || [ $((mem_mb % 4)) -ne 0 ]; then
    echo "$0: RIG_L1_MEM_MB=$mem_mb: give a multiple of 4 MiB, at least 2048" >&2
    exit 2
fi
node_mb=$((mem_mb / 2))

# no_timer_check: under TCG on a loaded host L1's kernel once panicked in its boot-time check
# that the timer interrupt arrives through the interrupt-remapped IO-APIC ("timer doesn't work
# through Interrupt-remapped IO-APIC"): the emulated timer was just late, not broken.
append="console=ttyS0 panic=-1 quiet intel_iommu=on nokaslr no_timer_check"
if [ -n "${RIG_SCENARIOS:-}" ]; then
    append+=" rig.scenarios=$RIG_SCENARIOS"
fi
[ -z "${RIG_HP_NODE0:-}" ] || append+=" rig.hp_node0=$RIG_HP_NODE0"
[ -z "${RIG_HP_NODE1:-}" ] || append+=" rig.hp_node1=$RIG_HP_NODE1"
[ -z "${RIG_PTBENCH_SIZES:-}" ] || append+=" rig.ptbench_sizes=$RIG_PTBENCH_SIZES"
[ -z "${RIG_L1_APPEND:-}" ] || append+=" $RIG_L1_APPEND"
# shellcheck disable=SC2206 # word splitting is the point of RIG_QEMU_EXTRA
extra=(${RIG_QEMU_EXTRA:-})

log=$out/l1-console.log
beat=$out/l1-heartbeat.log
stall=$out/l1-stall.log
monitor=$out/qemu-monitor.sock
: >"$log"
: >"$beat"
rm -f "$stall" "$monitor" "$out/qemu.pid"

# monitor_cmd CMD: one HMP command through the monitor socket; prints the answer.
monitor_cmd() {
    command -v python3 >/dev/null || { echo "(no python3 to talk to the QEMU monitor)"; return 1; }
    python3 - "$monitor" "$1" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
def drain():
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except OSError:
        pass
    return out
time.sleep(0.5)
drain()
s.sendall(sys.argv[2].encode() + b"\n")
s.settimeout(2)
sys.stdout.write(drain().decode(errors="replace"))
PY
}

# Watches the heartbeat; see the header.
watch_heartbeat() {
    local limit=${RIG_L1_STALL_S:-240} last=0 quiet=0 size i
    while sleep 15; do
        size=$(stat -c %s "$beat" 2>/dev/null || echo 0)
        if [ "$size" != "$last" ]; then
            last=$size
            quiet=0
            continue
        fi
        quiet=$((quiet + 15))
        # No beat yet: L1 is still booting, the overall timeout covers that.
        if [ "$size" -gt 0 ] && [ "$quiet" -ge "$limit" ]; then
            {
                echo "run-l1.sh: L1's heartbeat stopped ${quiet}s ago (wedged); its vCPUs:"
                for i in 1 2 3; do
                    monitor_cmd "info registers -a" | tr -d '\r' |
                        grep -E '^(CPU#|RIP=|RAX=|RSP=|CR0=|EFL=)' | sed "s/^/RIG-L1-STALL $i /"
                    sleep 2
                done
            } >"$stall" 2>&1
            monitor_cmd quit >/dev/null 2>&1 || kill "$(cat "$out/qemu.pid")"
            return
        fi
    done
}
watch_heartbeat &
watcher=$!
set +e
# --foreground: Ctrl-C at a terminal still reaches QEMU. stdin is /dev/null so QEMU never
# puts the caller's terminal into raw mode.
timeout --foreground -k 10 "$limit" qemu-system-x86_64 \
    -machine q35,kernel-irqchip=split -accel tcg -cpu max -smp 2 -m "$mem_mb" \
    -object memory-backend-ram,id=m0,size="${node_mb}M" \
    -object memory-backend-ram,id=m1,size="${node_mb}M" \
    -numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,cpus=1,memdev=m1 \
    -device intel-iommu,intremap=on \
    -device pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0 \
    -device pcie-root-port,id=rp1,bus=pxb1,chassis=1 \
    -device edu,bus=rp1 \
    -nographic -no-reboot -serial mon:stdio -serial "file:$beat" \
    -monitor "unix:$monitor,server=on,wait=off" -pidfile "$out/qemu.pid" \
    -kernel "$out/l1-vmlinuz" -initrd "$out/l1-initrd.cpio" -append "$append" \
    "${extra[@]}" </dev/null 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
kill "$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
set -e
if [ -s "$stall" ]; then
    tee -a "$log" <"$stall"
    exit 125
fi
if [ "$rc" -eq 124 ]; then
    echo "run-l1.sh: L1 did not finish within ${limit}s, QEMU stopped" | tee -a "$log"
fi
exit "$rc"
