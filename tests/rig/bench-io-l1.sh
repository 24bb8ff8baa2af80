#!/bin/sh
# shellcheck shell=dash source-path=SCRIPTDIR
# Tenant I/O benchmark, the L1 side: runs inside the nested rig's L1 as its scenario script
# (tests/rig/bench-io.sh builds the L1 with it and reads what it prints).
#
# aivmm and QEMU (q35, its own virtio-pci devices) run the same disk-root tenant, interleaved
# round by round: same bzImage, boot initramfs, ext4 root image, scratch disk, tap, 256 MiB,
# 2 vCPUs, and the same guest command line apart from `root=/dev/vda rw`, which aivmm appends
# itself for its root drive and QEMU gets written out. The guest script (/bench/io.sh, written
# by bench-io.sh into the root image) runs the rig's own checks in order:
#   blk    blk-check.sh bench on /dev/vdb: sequential O_DIRECT write and read, 4 KiB random
#          O_DIRECT reads (rig-io blk-randread), timed by the guest
#   net    net-check.sh: TCP L1 -> L2 and L2 -> L1 (rig-io both ends, timed by L1's end), then
#          64-byte round trips timed by the guest
#   vsock  vsock-check.sh: a stream each way and 64-byte round trips, timed by L1's end; aivmm's
#          host side is its hybrid unix socket (rig-io uds-connect / uds-listen), QEMU's is
#          AF_VSOCK through vhost-vsock (rig-io vsock-connect / vsock-listen)
# and prints `AIVMM-BENCH-IO-STEP <check>` before each, which is when L1 starts its side.
# Every run is timed by tests/rig/bench-run.sh (L1's clock to the guest init's marker line).
#
# The VMMs of a round (BENCH_VARIANTS, this order):
#   aivmm         aivmm, all checks
#   qemu          QEMU, virtio-net on the tap with vhost=off (QEMU's own virtio-net), all checks
#   qemu-vhost    QEMU with vhost=on (in-kernel vhost-net), the net check only
#   aivmm-initrd  aivmm booting the rig's initramfs L2 (no devices, the same command line
#                 without root=): boot time only, the reference for the disk-root boot
# One uncounted warm-up run of each first, a boot without checks (a variant failing it twice
# is dropped).
#
# Machine-readable lines (the rest of the output is context):
#   BENCH-FACT <key>=<value>
#   BENCH-RUN vmm=<name> run=<n|probe> rc=<VMM exit> script_rc=<n|na> boot_ms=<n|na>
#             exit_ms=<n> guest_uptime=<s|na> vmm_init_ms=<n|na> blk_write_mibps=..
#             blk_read_mibps=.. blk_iops=.. blk_p50_us=.. blk_p99_us=.. net_h2g_mibps=..
#             net_g2h_mibps=.. net_rtt_p50_us=.. net_rtt_p99_us=.. vsock_h2g_mibps=..
#             vsock_g2h_mibps=.. vsock_rtt_p50_us=.. vsock_rtt_p99_us=.. plus the guest-timed
#             streams net_h2g_guest_mibps= ... (na: not measured or failed; h2g = L1 to L2)
#   BENCH-RAW vmm=<name> run=<n> <a guest check line or an L1 rig-io line>
#   BENCH-CON vmm=<name> run=<n> <a line of the guest console>
#   BENCH-DONE
#
# Environment (l1-init sets the first three; /bench/bench.env, written by bench-io.sh, may
# set the rest): AIVMM, L2_KERNEL, L2_INITRD, BENCH_RUNS (5; `bench.runs=N` on L1's kernel
# command line wins), BENCH_QEMU (/usr/bin/qemu-system-x86_64), BENCH_VARIANTS,
# BENCH_TIMEOUT (300 s per run), BENCH_IO_TIMEOUT (60 s per rig-io step), BENCH_DISK_MIB
# (128: the scratch disk), BENCH_BLK_MIB (64), BENCH_RANDREADS (4000), BENCH_NET_BYTES (64M),
# BENCH_VSOCK_BYTES (64M), BENCH_RTT (1000 round trips each), BENCH_PROBE (1).
# POSIX sh for busybox ash.
set -u

# shellcheck disable=SC1091 # written by bench-io.sh
[ -r /bench/bench.env ] && . /bench/bench.env
AIVMM=${AIVMM:-/bin/aivmm}
L2_KERNEL=${L2_KERNEL:-/l2/vmlinuz}
L2_INITRD=${L2_INITRD:-/l2/initrd.gz}
L2_ROOTFS=${L2_ROOTFS:-/l2/rootfs.ext4.gz}
L2_BOOT_INITRD=${L2_BOOT_INITRD:-/l2/boot-initrd.gz}
RIG_IO=${RIG_IO:-/bin/rig-io}
QEMU=${BENCH_QEMU:-/usr/bin/qemu-system-x86_64}
RUNS=${BENCH_RUNS:-5}
read -r l1_cmdline </proc/cmdline
for arg in $l1_cmdline; do
    case $arg in bench.runs=*) RUNS=${arg#bench.runs=} ;; esac
done
LIMIT=${BENCH_TIMEOUT:-300}
IO_TIMEOUT=${BENCH_IO_TIMEOUT:-60}
DISK_MIB=${BENCH_DISK_MIB:-128}
BLK_MIB=${BENCH_BLK_MIB:-64}
RANDREADS=${BENCH_RANDREADS:-4000}
NET_BYTES=${BENCH_NET_BYTES:-64M}
VSOCK_BYTES=${BENCH_VSOCK_BYTES:-64M}
RTT=${BENCH_RTT:-1000}
TMP=${BENCH_TMP:-/tmp/bench-io}
mkdir -p "$TMP"
# vmm_run, vmm_run_dump.
# shellcheck source=bench-run.sh
. "${BENCH_RUN_SH:-/rig/bench-run.sh}"

TAP=bio0
HOST_IP=169.254.77.1
GUEST_IP=169.254.77.2
MAC=06:00:a9:fe:4d:02
CID=3
UDS=$TMP/bio.vsock
ROOTFS=$TMP/rootfs.ext4
DATA=$TMP/data.img

fact() { echo "BENCH-FACT $1=$2"; }

# The tenant's command line. aivmm appends `root=/dev/vda rw` for its root drive.
CMDLINE="console=ttyS0 reboot=k panic=-1 quiet aivmm.script=/bench/io.sh blk.dev=/dev/vdb blk.mib=$BLK_MIB blk.randreads=$RANDREADS net.guest=$GUEST_IP/30 net.host=$HOST_IP net.bytes=$NET_BYTES net.rtt=$RTT vsock.bytes=$VSOCK_BYTES vsock.rtt=$RTT rigio.timeout=$IO_TIMEOUT"
INITRD_CMDLINE="console=ttyS0 reboot=k panic=-1 quiet aivmm.script=/bench/io.sh bench.checks=none"
ALL_CHECKS=blk,net,vsock

gunzip -c "$L2_ROOTFS" >"$ROOTFS"
# Written once, so that every run reads and writes allocated pages of L1's memory.
dd if=/dev/zero of="$DATA" bs=1M count="$DISK_MIB" 2>/dev/null
ip link del "$TAP" 2>/dev/null
if ! "$RIG_IO" mktap "$TAP" >/dev/null || ! ip addr add "$HOST_IP/30" dev "$TAP" ||
    ! ip link set "$TAP" up; then
    fact tap_error "cannot set up $TAP"
fi

fact l1_kernel "$(uname -r)"
fact l1_cpus "$(nproc)"
fact l1_kvm "$([ -c /dev/kvm ] && echo yes || echo no)"
fact l1_vhost_net "$([ -c /dev/vhost-net ] && echo yes || echo no)"
fact l1_vhost_vsock "$([ -c /dev/vhost-vsock ] && echo yes || echo no)"
fact l1_tmp_fs "$(awk -v d="$TMP" '$2 == "/" || $2 == d { f = $3 } END { print f }' /proc/mounts)"
fact l1_thp "$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
fact l1_shmem_thp "$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null)"
fact qemu_version "$("$QEMU" --version 2>&1 | head -n 1)"
fact runs "$RUNS"
fact cmdline "$CMDLINE"
fact initrd_cmdline "$INITRD_CMDLINE"
fact disk_mib "$DISK_MIB"
fact blk_mib "$BLK_MIB"
fact randreads "$RANDREADS"
fact net_bytes "$NET_BYTES"
fact vsock_bytes "$VSOCK_BYTES"
fact rtt_count "$RTT"
fact rootfs_bytes "$(wc -c <"$ROOTFS")"

QEMU_COMMON="-M q35 -accel kvm -cpu host -m 256 -smp 2 -nodefaults -no-user-config -display none -no-reboot -serial stdio"
# Buffered I/O on both sides: L1's root is a tmpfs-like file system without O_DIRECT (so no
# cache=none), and aivmm uses the page cache too (preadv/pwritev on a file opened without
# O_DIRECT). QEMU's aio=threads is its default for this cache mode.
QEMU_DRIVE_OPTS="format=raw,cache=writeback,aio=threads"
# qemu_devices VHOST: the devices, at fixed slots so that the root disk is /dev/vda.
qemu_devices() {
    echo "-drive file=$ROOTFS,if=none,id=rootfs,$QEMU_DRIVE_OPTS -device virtio-blk-pci,drive=rootfs,addr=0x4"
    echo "-drive file=$DATA,if=none,id=data,$QEMU_DRIVE_OPTS -device virtio-blk-pci,drive=data,addr=0x5"
    echo "-netdev tap,id=net0,ifname=$TAP,script=no,downscript=no,vhost=$1"
    echo "-device virtio-net-pci,netdev=net0,mac=$MAC,romfile=,addr=0x6"
    echo "-device vhost-vsock-pci,guest-cid=$CID,addr=0x7"
}
fact qemu_command "$QEMU $QEMU_COMMON -kernel $L2_KERNEL -initrd $L2_BOOT_INITRD -append '<cmdline> root=/dev/vda rw' $(qemu_devices off | tr '\n' ' ')"
AIVMM_DEVICES="--drive $ROOTFS,root,id=rootfs --drive $DATA,id=data --net $TAP,mac=$MAC,id=eth0 --vsock $CID:$UDS"
fact aivmm_command "$AIVMM --kernel $L2_KERNEL --initrd $L2_BOOT_INITRD --cmdline '<cmdline>' --memory 256 --vcpus 2 $AIVMM_DEVICES"

# host_start NAME RIG-IO-ARGS...: L1's side of one transfer, in the background.
host_start() {
    _h=$1
    shift
    "$RIG_IO" "$@" --timeout "$IO_TIMEOUT" </dev/null >"$RUN_BASE.host-$_h" 2>&1 &
    HOST_PIDS="$HOST_PIDS $!"
}

# on_line NAME PID LINE (vmm_run's hook): starts L1's side of the check the guest begins.
# Net: the listeners when the step starts, the sender once the guest has its address (a
# connection to an address nobody answers ARP for fails instead of being retried).
on_line() {
    case $3 in
    *AIVMM-BENCH-IO-STEP\ net*)
        host_start net_g2h tcp-listen 5202 --bind "$HOST_IP" --recv "$NET_BYTES"
        [ "$RTT" -gt 0 ] && host_start net_echo tcp-listen 5203 --bind "$HOST_IP" --echo
        ;;
    *AIVMM-NET-UP*)
        host_start net_h2g tcp-connect "$GUEST_IP:5201" --send "$NET_BYTES"
        ;;
    *AIVMM-BENCH-IO-STEP\ vsock*)
        case $1 in
        aivmm*)
            rm -f "${UDS}_6000"
            host_start vsock_h2g uds-connect "$UDS" 5000 --send "$VSOCK_BYTES"
            host_start vsock_g2h uds-listen "${UDS}_6000" --recv "$VSOCK_BYTES"
            [ "$RTT" -gt 0 ] && host_start vsock_rtt uds-connect "$UDS" 5001 --rtt "$RTT"
            ;;
        *)
            host_start vsock_h2g vsock-connect "$CID" 5000 --send "$VSOCK_BYTES"
            host_start vsock_g2h vsock-listen 6000 --recv "$VSOCK_BYTES"
            [ "$RTT" -gt 0 ] && host_start vsock_rtt vsock-connect "$CID" 5001 --rtt "$RTT"
            ;;
        esac
        ;;
    esac
    return 0
}
VMM_RUN_ON_LINE=on_line

# host_finish: L1's sides that are still running when the VMM is gone get 5 s, then are
# stopped (a guest that never connected).
host_finish() {
    _i=0
    while [ "$_i" -lt 25 ]; do
        _alive=
        for _p in $HOST_PIDS; do
            kill -0 "$_p" 2>/dev/null && _alive=1
        done
        [ -z "$_alive" ] && break
        sleep 0.2
        _i=$((_i + 1))
    done
    for _p in $HOST_PIDS; do
        kill "$_p" 2>/dev/null
        wait "$_p" 2>/dev/null
    done
    HOST_PIDS=
}

# report NAME RUN: the BENCH-RUN line of a finished run, from its console and L1's rig-io lines.
report() {
    for _f in "$RUN_BASE".host-*; do
        [ -f "$_f" ] || continue
        echo "HOSTLINE ${_f##*.host-} $(grep -m 1 '^RIG-IO' "$_f" || tr '\n' ' ' <"$_f")"
    done >"$RUN_BASE.host"
    # kv(line, key) as in bench-l1.sh; ok(line): the line says ok=1.
    _kv=$(awk '
    function kv(line, key,    m) {
        if (match(line, "(^| )" key "=[^ ]*")) {
            m = substr(line, RSTART, RLENGTH); sub(/^ /, "", m); sub(/^[^=]*=/, "", m); return m
        }
        return "na"
    }
    function ok(line) { return kv(line, "ok") == "1" }
    BEGIN {
        split("script_rc blk_write_mibps blk_read_mibps blk_iops blk_p50_us blk_p99_us net_h2g_mibps net_g2h_mibps net_rtt_p50_us net_rtt_p99_us vsock_h2g_mibps vsock_g2h_mibps vsock_rtt_p50_us vsock_rtt_p99_us net_h2g_guest_mibps net_g2h_guest_mibps vsock_h2g_guest_mibps vsock_g2h_guest_mibps", keys, " ")
        for (i in keys) v[keys[i]] = "na"
    }
    { sub(/\r$/, "") }
    /AIVMM-SCRIPT-EXIT/ { v["script_rc"] = kv($0, "rc") }
    /AIVMM-BLK-BENCH / {
        v["blk_write_mibps"] = kv($0, "write_mibps"); v["blk_read_mibps"] = kv($0, "read_mibps")
        v["blk_iops"] = kv($0, "randread_iops"); v["blk_p50_us"] = kv($0, "randread_p50_us")
        v["blk_p99_us"] = kv($0, "randread_p99_us")
    }
    /AIVMM-NET guest-recv / && ok($0) { v["net_h2g_guest_mibps"] = kv($0, "mibps") }
    /AIVMM-NET guest-send / && ok($0) { v["net_g2h_guest_mibps"] = kv($0, "mibps") }
    /AIVMM-NET guest-rtt / && ok($0) { v["net_rtt_p50_us"] = kv($0, "p50_us"); v["net_rtt_p99_us"] = kv($0, "p99_us") }
    /AIVMM-VSOCK guest-recv / && ok($0) { v["vsock_h2g_guest_mibps"] = kv($0, "mibps") }
    /AIVMM-VSOCK guest-send / && ok($0) { v["vsock_g2h_guest_mibps"] = kv($0, "mibps") }
    /^HOSTLINE net_h2g / && ok($0) { v["net_h2g_mibps"] = kv($0, "mibps") }
    /^HOSTLINE net_g2h / && ok($0) { v["net_g2h_mibps"] = kv($0, "mibps") }
    /^HOSTLINE vsock_h2g / && ok($0) { v["vsock_h2g_mibps"] = kv($0, "mibps") }
    /^HOSTLINE vsock_g2h / && ok($0) { v["vsock_g2h_mibps"] = kv($0, "mibps") }
    /^HOSTLINE vsock_rtt / && ok($0) { v["vsock_rtt_p50_us"] = kv($0, "p50_us"); v["vsock_rtt_p99_us"] = kv($0, "p99_us") }
    END { for (i = 1; i in keys; i++) printf "%s=%s ", keys[i], v[keys[i]] }
    ' "$RUN_BASE.out" "$RUN_BASE.host")
    echo "BENCH-RUN vmm=$1 run=$2 rc=$RC boot_ms=$BOOT_MS exit_ms=$EXIT_MS guest_uptime=$GUEST_UP vmm_init_ms=$INIT_MS $_kv"
    # The raw lines: every check's own output and L1's side of each transfer.
    grep -E 'AIVMM-(BLK|NET|VSOCK|BENCH-IO|SCRIPT-EXIT)' "$RUN_BASE.out" | tr -d '\r' |
        sed "s/^/BENCH-RAW vmm=$1 run=$2 /"
    sed "s/^HOSTLINE /BENCH-RAW vmm=$1 run=$2 host-/" "$RUN_BASE.host"
    # The whole console (short: the guest kernel is quiet), for a line that went missing.
    tr -d '\r' <"$RUN_BASE.out" | sed "s/^/BENCH-CON vmm=$1 run=$2 /"
}

# launch VARIANT RUN: one run of a variant, reported. CHECKS (when set) replaces the
# variant's checks.
launch() {
    v=$1
    HOST_PIDS=
    rm -f "$UDS" "${UDS}_6000"
    case $v in
    aivmm)
        # shellcheck disable=SC2086 # AIVMM_DEVICES is a list of words
        vmm_run "$v" "$2" "$AIVMM" --kernel "$L2_KERNEL" --initrd "$L2_BOOT_INITRD" \
            --cmdline "$CMDLINE bench.checks=${CHECKS:-$ALL_CHECKS}" --memory 256 --vcpus 2 \
            $AIVMM_DEVICES
        ;;
    aivmm-initrd)
        vmm_run "$v" "$2" "$AIVMM" --kernel "$L2_KERNEL" --initrd "$L2_INITRD" \
            --cmdline "$INITRD_CMDLINE" --memory 256 --vcpus 2
        ;;
    qemu | qemu-vhost)
        if [ "$v" = qemu ]; then vhost=off checks=$ALL_CHECKS; else vhost=on checks=net; fi
        # shellcheck disable=SC2046,SC2086 # lists of words
        vmm_run "$v" "$2" "$QEMU" $QEMU_COMMON -kernel "$L2_KERNEL" -initrd "$L2_BOOT_INITRD" \
            -append "$CMDLINE bench.checks=${CHECKS:-$checks} root=/dev/vda rw" \
            $(qemu_devices "$vhost")
        ;;
    esac
    host_finish
    report "$v" "$2"
    if [ "$BOOT_MS" = na ] || [ "$RC" != 0 ] || ! grep -q 'AIVMM-SCRIPT-EXIT rc=0' "$RUN_BASE.out"; then
        vmm_run_dump "$v" "$2"
        RUN_OK=0
    else
        RUN_OK=1
    fi
}

VARIANTS=${BENCH_VARIANTS:-aivmm qemu qemu-vhost aivmm-initrd}
CHECKS=
if [ ! -c /dev/vhost-net ]; then
    VARIANTS=$(echo "$VARIANTS" | sed 's/qemu-vhost//')
    fact dropped_qemu-vhost "no /dev/vhost-net in L1"
fi

if [ "${BENCH_PROBE:-1}" = 1 ]; then
    # Warm-up, not counted: a boot without checks; one failure is not enough to drop a
    # variant (L1 has hiccups).
    ok=
    CHECKS=none
    for v in $VARIANTS; do
        launch "$v" probe
        [ "$RUN_OK" = 1 ] || launch "$v" probe
        if [ "$RUN_OK" = 1 ]; then ok="$ok $v"; else fact "dropped_$v" "two failed warm-up runs"; fi
    done
    CHECKS=
    VARIANTS=$ok
fi
# shellcheck disable=SC2086 # split into words: one space between the names
set -- $VARIANTS
fact variants "$*"

i=1
while [ "$i" -le "$RUNS" ]; do
    for v in $VARIANTS; do
        launch "$v" "$i"
    done
    i=$((i + 1))
done
ip link del "$TAP" 2>/dev/null
echo "BENCH-DONE"
