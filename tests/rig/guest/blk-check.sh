#!/bin/sh
# L2 guest script of the virtio-blk checks, for a guest booted from a disk image
# (guest-image/build-rootfs.sh with this directory under /scripts/; run by its init via
# aivmm.script=/scripts/blk-check.sh, or by hand).
#
#   blk-check.sh [MODE [ARG...]]      MODE also from blk.mode= on the kernel command line
#
#   write [TOKEN]   the root (/dev/vda) is mounted rw: writes "aivmm-blk:TOKEN" (TOKEN, else
#                   blk.token=, else "marker-1") to /data/marker, syncs, and prints
#                   AIVMM-BLK-WROTE sha=<sha256 of the file> content=<the line>
#   read            (a later boot) prints AIVMM-BLK-READ sha=<sha256> content=<the line>
#   ro [DEV]        DEV (default blk.dev=, else /dev/vdb) is attached read-only: a direct
#                   4 KiB write must fail, and reading must work:
#                   AIVMM-BLK-RO-REFUSED rc=<dd's exit code> sysfs_ro=<0|1> err=<dd's message>
#                   AIVMM-BLK-RO-READ ok=<0|1> bytes=65536 sha=<sha256 of its first 64 KiB>
#   bench [DEV [MIB]]  sequential O_DIRECT write and read of MIB MiB (default blk.mib=, else
#                   64) on DEV (default blk.dev=, else /dev/vdb; its contents are destroyed;
#                   a read-only DEV gets the read test only; no such device: a file in /data),
#                   then 4 KiB random reads with rig-io when it is installed:
#                   AIVMM-BLK-BENCH target=<dev> mib=<n> write_mibps=<f|na> read_mibps=<f>
#                     randread_iops=<f|na> randread_p50_us=<n|na> randread_p99_us=<n|na>
#                   AIVMM-BLK-BENCH-RAW <rig-io's RIG-IO line>
# Every mode ends with AIVMM-BLK-DONE mode=<mode> rc=<n> and exits with rc (0 = passed).
# Timings come from /proc/uptime (10 ms resolution): use enough MiB for seconds of I/O.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

# Centiseconds since boot.
now_cs() { awk '{ printf "%d\n", $1 * 100 }' /proc/uptime; }

# mibps BYTES CENTISECONDS
mibps() {
    awk -v b="$1" -v cs="$2" 'BEGIN { if (cs > 0) printf "%.1f\n", b / 1048576 / (cs / 100); else print "na" }'
}

# A message on one line (it is the last field of its line).
oneline() { tr '\n' ' ' | sed 's/ *$//'; }

mode=${1:-$(karg blk.mode write)}
[ $# -gt 0 ] && shift
rc=0

case $mode in
write)
    token=${1:-$(karg blk.token marker-1)}
    content="aivmm-blk:$token"
    if ! mkdir -p /data || ! printf '%s\n' "$content" >/data/marker; then
        echo "AIVMM-BLK-WROTE sha=none content= error=cannot write /data/marker ($(grep ' / ' /proc/mounts))"
        rc=1
    else
        sync
        sha=$(sha256sum /data/marker | cut -d' ' -f1)
        echo "AIVMM-BLK-WROTE sha=$sha content=$content"
    fi
    ;;
read)
    if [ -f /data/marker ]; then
        sha=$(sha256sum /data/marker | cut -d' ' -f1)
        echo "AIVMM-BLK-READ sha=$sha content=$(head -n 1 /data/marker)"
    else
        echo "AIVMM-BLK-READ sha=none content= error=no /data/marker"
        rc=1
    fi
    ;;
ro)
    dev=${1:-$(karg blk.dev /dev/vdb)}
    if [ ! -b "$dev" ]; then
        echo "AIVMM-BLK-RO-REFUSED rc=none sysfs_ro=none err=no block device $dev"
        echo "AIVMM-BLK-RO-READ ok=0 bytes=0 sha=none"
        rc=1
    else
        sysfs_ro=$(cat "/sys/block/${dev#/dev/}/ro" 2>/dev/null || echo none)
        err=$(dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct 2>&1 >/dev/null)
        wrc=$?
        # dd's own message, without its record counts.
        msg=$(echo "$err" | grep '^dd:' | head -n 1)
        echo "AIVMM-BLK-RO-REFUSED rc=$wrc sysfs_ro=$sysfs_ro err=${msg:-$(echo "$err" | oneline)}"
        # The write must have failed.
        [ "$wrc" -ne 0 ] || rc=1
        if dd if="$dev" of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null; then
            sha=$(dd if="$dev" bs=4096 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
            echo "AIVMM-BLK-RO-READ ok=1 bytes=65536 sha=$sha"
        else
            echo "AIVMM-BLK-RO-READ ok=0 bytes=0 sha=none"
            rc=1
        fi
    fi
    ;;
bench)
    dev=${1:-$(karg blk.dev /dev/vdb)}
    mib=${2:-$(karg blk.mib 64)}
    case $mib in
    '' | *[!0-9]*)
        echo "aivmm-blk-check: bad size '$mib' (MiB)"
        echo "AIVMM-BLK-DONE mode=$mode rc=2"
        exit 2
        ;;
    esac
    bytes=$((mib * 1048576))
    write_mibps=na
    read_mibps=na
    if [ -b "$dev" ]; then
        target=$dev
        if [ "$(cat "/sys/block/${dev#/dev/}/ro" 2>/dev/null)" = 0 ]; then
            writable=yes
        else
            writable=no
        fi
    else
        target=/data/bench.img
        writable=yes
        mkdir -p /data
    fi
    if [ "$writable" = yes ]; then
        t0=$(now_cs)
        if dd if=/dev/zero of="$target" bs=1M count="$mib" oflag=direct conv=fsync 2>/dev/null; then
            write_mibps=$(mibps "$bytes" $(($(now_cs) - t0)))
        else
            echo "aivmm-blk-check: sequential write to $target failed"
            rc=1
        fi
    fi
    t0=$(now_cs)
    if dd if="$target" of=/dev/null bs=1M count="$mib" iflag=direct 2>/dev/null; then
        read_mibps=$(mibps "$bytes" $(($(now_cs) - t0)))
    else
        echo "aivmm-blk-check: sequential read of $target failed"
        rc=1
    fi
    iops=na
    p50=na
    p99=na
    if command -v rig-io >/dev/null 2>&1; then
        raw=$(rig-io blk-randread "$target" --count "$(karg blk.randreads 2000)" --bs 4096) || rc=1
        echo "AIVMM-BLK-BENCH-RAW $raw"
        for f in $raw; do
            case $f in
            iops=*) iops=${f#iops=} ;;
            p50_us=*) p50=${f#p50_us=} ;;
            p99_us=*) p99=${f#p99_us=} ;;
            esac
        done
    fi
    [ "$target" = /data/bench.img ] && rm -f /data/bench.img
    echo "AIVMM-BLK-BENCH target=$target mib=$mib write_mibps=$write_mibps read_mibps=$read_mibps randread_iops=$iops randread_p50_us=$p50 randread_p99_us=$p99"
    ;;
*)
    echo "aivmm-blk-check: unknown mode '$mode' (write, read, ro, bench)"
    rc=2
    ;;
esac

echo "AIVMM-BLK-DONE mode=$mode rc=$rc"
exit "$rc"
