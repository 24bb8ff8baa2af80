#!/bin/sh
# shellcheck shell=dash source-path=SCRIPTDIR
# Boot-time and memory-overhead benchmark, the L1 side: runs inside the nested rig's L1 as its
# scenario script (tests/rig/bench-boot.sh builds the L1 with it and reads what it prints).
#
# aivmm and QEMU boot the same L2 guest (same bzImage, same initramfs, same kernel command
# line, 256 MiB, 2 vCPUs) with KVM, interleaved round by round: aivmm (memfd), aivmm-vmlinux
# (memfd, the same kernel as an ELF vmlinux through its PVH entry: aivmm's default), aivmm-2m
# (hugetlb), QEMU `-M microvm` (and microvm with one guest command-line word more, see
# VARIANTS), QEMU `-M q35`, then again. When bench-boot.sh put them into L1 and BENCH_VARIANTS
# names them: Cloud Hypervisor and Firecracker, each with the bzImage and with the vmlinux.
# Every run is timed the same way (tests/rig/bench-run.sh): L1's clock (/proc/uptime) just
# before the VMM is started, its console (stdout) goes through a FIFO to a reader made of shell
# builtins only (no polling, no fork per check), which takes the clock again when the guest
# init's marker line `AIVMM-GUEST-INIT` arrives, and once more when the VMM has exited. The
# guest script (/bench/exit.sh) returns at once, so the guest init powers off right after the
# marker.
#
# Machine-readable lines (the rest of the output is context):
#   BENCH-FACT <key>=<value>
#   BENCH-RUN vmm=<name> run=<n|probe|diag> boot_ms=<n|na> exit_ms=<n|na> rc=<n>
#             guest_uptime=<s|na> vmm_init_ms=<n|na> halted=<0|1>
#   BENCH-MEM vmm=<name> when=<marker|later> VmRSS_kb=.. RssAnon_kb=.. RssFile_kb=..
#             RssShmem_kb=.. VmHWM_kb=.. HugetlbPages_kb=.. Threads=.. guest_rss_kb=..
#             guest_thp_kb=.. (of it, mapped in transparent hugepages)
#   BENCH-ROLLUP vmm=<name> when=<marker|later> Rss_kb=.. Pss_kb=.. Anonymous_kb=..
#             Private_Dirty_kb=..   (smaps_rollup: the page walk)
#   BENCH-VMA vmm=<name> when=.. size_kb=.. rss_kb=.. <perms> <path>   (mappings >= 64 KiB RSS)
#   BENCH-DONE
#
# Environment (l1-init sets the first three; /bench/bench.env, written by bench-boot.sh, may
# set the rest): AIVMM, L2_KERNEL, L2_INITRD, L2_VMLINUX (/l2/vmlinux), BENCH_RUNS (10; `bench.runs=N` on L1's kernel
# command line wins), BENCH_QEMU
# (/usr/bin/qemu-system-x86_64), BENCH_TIMEOUT (120 s per measured run), BENCH_DIAG (1: one
# extra run of each VMM that prints the kernel log after init, for kernel timestamps),
# BENCH_VARIANTS (the VMMs to run, default all);
# for trying it outside L1: BENCH_TMP, BENCH_L2_EXTRA, BENCH_RUN_SH, BENCH_ACCEL (kvm),
# BENCH_CPU (host).
# POSIX sh for busybox ash.
set -u

# shellcheck disable=SC1091 # written by bench-boot.sh
[ -r /bench/bench.env ] && . /bench/bench.env
AIVMM=${AIVMM:-/bin/aivmm}
L2_KERNEL=${L2_KERNEL:-/l2/vmlinuz}
L2_VMLINUX=${L2_VMLINUX:-/l2/vmlinux}
L2_INITRD=${L2_INITRD:-/l2/initrd.gz}
QEMU=${BENCH_QEMU:-/usr/bin/qemu-system-x86_64}
# The peer VMMs, when bench-boot.sh put them into L1 (CH_BIN, FC_BIN on the host).
CH=${BENCH_CH:-/bin/cloud-hypervisor}
FC=${BENCH_FC:-/bin/firecracker}
RUNS=${BENCH_RUNS:-10}
# A later L1 boot of the same benchmark (bench-boot.sh resumes after a stuck L1) asks for the
# rounds still missing on the kernel command line: bench.runs=N.
for arg in $(cat /proc/cmdline 2>/dev/null); do
    case $arg in bench.runs=*) RUNS=${arg#bench.runs=} ;; esac
done
LIMIT=${BENCH_TIMEOUT:-120}
DIAG=${BENCH_DIAG:-1}
TMP=${BENCH_TMP:-/tmp/bench}
mkdir -p "$TMP"
# vmm_run, vmm_run_dump, ms_between.
# shellcheck source=bench-run.sh
. "${BENCH_RUN_SH:-/rig/bench-run.sh}"

fact() { echo "BENCH-FACT $1=$2"; }

# The L2 initramfs: the rig's, with a small second archive appended (the kernel unpacks
# concatenated archives in order) that adds /bench/exit.sh and /bench/sleep.sh.
INITRD=$TMP/initrd.gz
cat "$L2_INITRD" "${BENCH_L2_EXTRA:-/bench/l2-extra.cpio.gz}" >"$INITRD"

BASE_CMDLINE="console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1"
CMDLINE="$BASE_CMDLINE quiet aivmm.script=/bench/exit.sh"
MEM_CMDLINE="$BASE_CMDLINE quiet aivmm.script=/bench/sleep.sh"
# The diagnostic runs boot as quietly as the measured ones and print the kernel log (dmesg)
# after init: printing it as it is written would slow the guest down by the serial port's
# exits and distort the timestamps. BENCH_DIAG_EXTRA: words added to their command line only
# (initcall_debug to time each initcall: docs/PERFORMANCE.md).
DIAG_CMDLINE="$BASE_CMDLINE quiet aivmm.script=/bench/dmesg.sh${BENCH_DIAG_EXTRA:+ $BENCH_DIAG_EXTRA}"

QEMU_COMMON="-accel ${BENCH_ACCEL:-kvm} -cpu ${BENCH_CPU:-host} -m 256 -smp 2 -nodefaults -no-user-config -display none -no-reboot -serial stdio"

fact l1_kernel "$(uname -r)"
fact l1_cpus "$(nproc)"
fact l1_kvm "$([ -c /dev/kvm ] && echo yes || echo no)"
fact l2_kernel_bytes "$(wc -c <"$L2_KERNEL")"
fact l2_initrd_bytes "$(wc -c <"$INITRD")"
fact cmdline "$CMDLINE"
fact runs "$RUNS"
fact qemu_version "$("$QEMU" --version 2>&1 | head -n 1)"
[ -x "$CH" ] && fact ch_version "$("$CH" --version 2>&1 | head -n 1)"
[ -x "$FC" ] && fact fc_version "$("$FC" --version 2>&1 | head -n 1)"
# busybox date has no %N; /proc/uptime (10 ms) is the clock.
fact clock /proc/uptime
fact l1_thp "$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
fact l1_shmem_thp "$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null)"
fact l1_hugepages_free "$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages 2>/dev/null)"

# mem_sample NAME WHEN PID: the VMM's RSS split as L1 sees it. guest_rss_kb: the resident part
# of the mappings of 128 MiB or more, i.e. guest RAM (256 MiB, mapped once). L1's root file
# system is the initramfs (shmem), so the VMM's own binary and libraries count as RssShmem
# here, not RssFile: the overhead is VmRSS minus guest_rss_kb.
mem_sample() {
    kv=$(awk '$1 ~ /^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM|HugetlbPages):$/ { sub(":", "", $1); printf "%s_kb=%s ", $1, $2 }
              $1 == "Threads:" { printf "Threads=%s ", $2 }' "/proc/$3/status" 2>/dev/null)
    guest=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { big = 0 } $1 == "Size:" { big = ($2 >= 131072) }
                 $1 == "Rss:" && big { g += $2 }
                 $1 ~ /^(AnonHugePages|ShmemPmdMapped|FilePmdMapped):$/ && big { h += $2 }
                 END { printf "guest_rss_kb=%d guest_thp_kb=%d", g, h }' "/proc/$3/smaps" 2>/dev/null)
    echo "BENCH-MEM vmm=$1 when=$2 ${kv:-gone} ${guest:-guest_rss_kb=na guest_thp_kb=na}"
    # The page walk: smaps_rollup sums what the page tables map, whatever the counters in
    # status say (they lag, and on L1's kernel anonymous guest RAM lands in RssAnon). The VMM's
    # overhead is its Rss minus guest_rss_kb.
    roll=$(awk '$1 ~ /^(Rss|Pss|Anonymous|Private_Dirty):$/ { sub(":", "", $1); printf "%s_kb=%s ", $1, $2 }' "/proc/$3/smaps_rollup" 2>/dev/null)
    echo "BENCH-ROLLUP vmm=$1 when=$2 ${roll:-gone}"
    # Where it goes: every mapping with 64 KiB or more resident, guest RAM included.
    awk -v v="$1" -v w="$2" '/^[0-9a-f]+-[0-9a-f]+ / { hdr = $2 " " $6; size = 0 }
         $1 == "Size:" { size = $2 }
         $1 == "Rss:" && $2 >= 64 { printf "BENCH-VMA vmm=%s when=%s size_kb=%s rss_kb=%s %s\n", v, w, size, $2, hdr }' \
        "/proc/$3/smaps" 2>/dev/null
}

# one_run NAME RUN MEM CMD...: start CMD (a VMM) and time it (vmm_run, see the top).
# MEM=1 samples the VMM's memory when the marker arrives and 3 s later.
# Sets BOOT_MS (na when the marker never came) and RC; the console is in $TMP/NAME-RUN.out.
one_run() {
    name=$1
    run=$2
    if [ "$3" = 1 ]; then VMM_RUN_ON_MARKER=mem_marker; else VMM_RUN_ON_MARKER=; fi
    HALTED=0
    case $name in firecracker*) VMM_RUN_ON_LINE=fc_on_line ;; *) VMM_RUN_ON_LINE= ;; esac
    shift 3
    vmm_run "$name" "$run" "$@"
    # Firecracker stopped at the guest's halt (see fc_on_line) counts as a clean exit.
    [ "$HALTED" = 1 ] && [ "$RC" = 137 ] && RC=0
    echo "BENCH-RUN vmm=$name run=$run boot_ms=$BOOT_MS exit_ms=$EXIT_MS rc=$RC guest_uptime=$GUEST_UP vmm_init_ms=$INIT_MS halted=$HALTED"
    if [ "$BOOT_MS" = na ] || [ "$RC" != 0 ]; then
        vmm_run_dump "$name" "$run"
        [ -f "$RUN_BASE.fclog" ] && tail -n 20 "$RUN_BASE.fclog"
    fi
}

# fc_on_line NAME PID LINE (vmm_run's hook): Firecracker presents no ACPI power-off (its
# FADT has no sleep registers), so the guest's `poweroff -f` ends in "reboot: System halted"
# and Firecracker keeps running; it is stopped at that line instead of 30 s later.
fc_on_line() {
    case $3 in
    *"reboot: System halted"*)
        HALTED=1
        kill -KILL "$2"
        ;;
    esac
}

# mem_marker NAME PID (vmm_run's hook): the memory samples of a MEM=1 run.
mem_marker() {
    mem_sample "$1" marker "$2"
    (sleep 3 && mem_sample "$1" later "$2") &
    VMM_RUN_WAIT="${VMM_RUN_WAIT:-} $!"
}

# The VMMs, in the order of each round. aivmm-2m: aivmm on 2 MiB hugepages (its production
# setting; hugetlb zones are always prefaulted). QEMU microvm option sets:
#   microvm-min     the set QEMU's docs/system/i386/microvm.rst recommend (pit, pic, rtc off),
#                   with the ISA serial port on as the console.
#   microvm         x-option-roms=off,isa-serial=on: PIT, PIC and RTC left on.
#   microvm-rtc     microvm-min with the RTC on (optional; measured once, as slow as microvm-min).
#   microvm-nocmos  microvm plus one guest command-line word, initcall_blacklist=cmos_init: under
#                   every microvm set this kernel spends seconds probing a CMOS RTC that does
#                   not answer; this shows microvm without that probe. The only variant whose
#                   command line differs; it is not the headline figure.
# L1 (TCG emulating AMD-V, with kvm-amd) is not flawless: in 4 of 7 benchmark runs (2026-11-21/22) it got stuck for
# good as a QEMU microvm or q35 run started (console silent, both L1 vCPUs busy; once a QEMU
# thread blocked in D state), and once an aivmm vCPU thread tripped L1's soft-lockup detector for 74 s (that run was
# killed, L1 carried on). bench-boot.sh stops a stuck L1 and reports the rounds done.
VARIANTS=${BENCH_VARIANTS:-aivmm aivmm-vmlinux aivmm-2m microvm-min microvm microvm-nocmos q35}
# The peers (cloud-hypervisor, cloud-hypervisor-vmlinux, firecracker, firecracker-vmlinux)
# run only when asked for by name, and only when their binary is in L1.
ok=
for v in $VARIANTS; do
    case $v in
    cloud-hypervisor*) [ -x "$CH" ] || { fact "dropped_$v" "no $CH in L1 (CH_BIN)"; continue; } ;;
    firecracker*) [ -x "$FC" ] || { fact "dropped_$v" "no $FC in L1 (FC_BIN)"; continue; } ;;
    esac
    ok="$ok $v"
done
VARIANTS=$ok
machine_of() {
    case $1 in
    microvm | microvm-nocmos) echo microvm,x-option-roms=off,isa-serial=on ;;
    microvm-min) echo microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off ;;
    microvm-rtc) echo microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on ;;
    q35) echo q35 ;;
    esac
}
extra_cmdline_of() {
    case $1 in
    microvm-nocmos) echo initcall_blacklist=cmos_init ;;
    esac
}
cat >"$TMP/aivmm-2m.toml" <<'EOF2'
[machine]
vcpus = 2

[[memory.zones]]
id = "mem0"
size_mib = 256
backing = "hugetlb-2m"
EOF2

# aivmm's log level: warn, except in the diagnostic runs, whose info lines time its setup.
AIVMM_LOG=warn

# launch VARIANT RUN MEM CMDLINE
# QEMU's guest RAM is anonymous by default (THP-eligible, see the l1_thp fact); for the memory
# runs it is a memfd, as aivmm's, so that RssShmem is the guest on both and RssAnon + RssFile
# the VMM.
launch() {
    v=$1
    case $v in
    aivmm)
        one_run "$v" "$2" "$3" "$AIVMM" --kernel "$L2_KERNEL" --initrd "$INITRD" \
            --cmdline "$4" --memory 256 --vcpus 2 --log-level "$AIVMM_LOG"
        ;;
    aivmm-vmlinux)
        one_run "$v" "$2" "$3" "$AIVMM" --kernel "$L2_VMLINUX" --initrd "$INITRD" \
            --cmdline "$4" --memory 256 --vcpus 2 --log-level "$AIVMM_LOG"
        ;;
    aivmm-vmlinux-noseccomp)
        # The cost of the seccomp filters: aivmm-vmlinux without them (on request only).
        one_run "$v" "$2" "$3" "$AIVMM" --kernel "$L2_VMLINUX" --initrd "$INITRD" \
            --cmdline "$4" --memory 256 --vcpus 2 --no-seccomp --log-level "$AIVMM_LOG"
        ;;
    aivmm-2m)
        one_run "$v" "$2" "$3" "$AIVMM" --config "$TMP/aivmm-2m.toml" --kernel "$L2_KERNEL" \
            --initrd "$INITRD" --cmdline "$4" --memory 256 --vcpus 2 --log-level "$AIVMM_LOG"
        ;;
    cloud-hypervisor | cloud-hypervisor-vmlinux)
        # Its defaults otherwise: anonymous guest RAM, a virtio-rng PCI device (unseen with
        # pci=off), its seccomp filters on. -vmlinux: the ELF through its PVH entry.
        k=$L2_KERNEL
        [ "$v" = cloud-hypervisor-vmlinux ] && k=$L2_VMLINUX
        one_run "$v" "$2" "$3" "$CH" --kernel "$k" --initramfs "$INITRD" \
            --cmdline "$4" --cpus boot=2 --memory size=256M --serial tty --console off
        ;;
    firecracker | firecracker-vmlinux)
        # Anonymous guest RAM (no huge pages); Firecracker appends " pci=off" to boot_args
        # (already there). Its log goes to a file: stdout is the guest's console.
        k=$L2_KERNEL
        [ "$v" = firecracker-vmlinux ] && k=$L2_VMLINUX
        cfg=$TMP/$v-$2.json
        cat >"$cfg" <<EOF3
{
  "boot-source": { "kernel_image_path": "$k", "initrd_path": "$INITRD", "boot_args": "$4" },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256 },
  "drives": []
}
EOF3
        : >"$TMP/$v-$2.fclog"
        one_run "$v" "$2" "$3" "$FC" --no-api --config-file "$cfg" \
            --log-path "$TMP/$v-$2.fclog" --level Info
        ;;
    *)
        machine=$(machine_of "$v")
        append=$4
        x=$(extra_cmdline_of "$v")
        [ -n "$x" ] && append="$append $x"
        memopts=
        if [ "$3" = 1 ]; then
            memopts="-object memory-backend-memfd,id=ram0,size=256M"
            machine="$machine,memory-backend=ram0"
        fi
        # shellcheck disable=SC2086 # QEMU_COMMON and memopts are lists of words
        one_run "$v" "$2" "$3" "$QEMU" -M "$machine" $QEMU_COMMON $memopts \
            -kernel "$L2_KERNEL" -initrd "$INITRD" -append "$append"
        ;;
    esac
}

for v in $VARIANTS; do
    m=$(machine_of "$v")
    [ -n "$m" ] && fact "machine_$v" "$m"
    x=$(extra_cmdline_of "$v")
    [ -n "$x" ] && fact "cmdline_extra_$v" "$x"
done
fact aivmm_2m_config "$(tr '\n' ' ' <"$TMP/aivmm-2m.toml")"

# Probe (and warm-up, not counted): one run of each; a variant that does not reach the marker
# is left out. A probe that hangs is cut short sooner than a measured run.
RUN_LIMIT=$((LIMIT < 180 ? LIMIT : 180))
# One failed probe is not enough to drop a variant (L1 itself has hiccups, see VARIANTS).
ok=
for v in $VARIANTS; do
    launch "$v" probe 0 "$CMDLINE"
    [ "$BOOT_MS" != na ] || launch "$v" probe 0 "$CMDLINE"
    if [ "$BOOT_MS" != na ]; then ok="$ok $v"; else fact "dropped_$v" "no marker in two probe runs"; fi
done
VARIANTS=$ok
fact variants "$VARIANTS"
RUN_LIMIT=$LIMIT

i=1
while [ "$i" -le "$RUNS" ]; do
    for v in $VARIANTS; do
        launch "$v" "$i" 0 "$CMDLINE"
    done
    i=$((i + 1))
done

# Memory after boot: the guest sleeps 5 s past the marker. The microvm option sets do not
# change QEMU's memory, so one of them is enough.
mem_done=
for v in $VARIANTS; do
    case $v in microvm*) [ -n "$mem_done" ] && continue; mem_done=1 ;; esac
    launch "$v" mem 1 "$MEM_CMDLINE"
done

# Where the time goes: the kernel's own timestamps (its log, printed after init).
if [ "$DIAG" = 1 ]; then
    for v in $VARIANTS; do
        AIVMM_LOG=info
        launch "$v" diag 0 "$DIAG_CMDLINE"
        AIVMM_LOG=warn
        echo "--- $v diag: console ---"
        cat "$TMP/$v-diag.out"
        echo "--- $v diag: stderr ---"
        cat "$TMP/$v-diag.err"
        echo "---"
    done
fi
echo "BENCH-DONE"
