# shellcheck shell=sh
# The tenant I/O scenario (sourced by tests/rig/scenarios.sh): a tenant booted from an ext4
# root on virtio-blk, reached over two taps (one rate-limited) and a hybrid vsock.
#
#   tio_blk_write  boot 1: root rw; the guest writes a marker file and powers off
#   tio_run        boot 2: the same image; the guest reads the marker back, a read-only
#                  second drive refuses a write, TCP both ways over tap tio0, TCP through
#                  the rate-limited tap tio1, vsock both ways (CONNECT through uds_path and
#                  the guest's connection to uds_path_6000); L1's side of each transfer is
#                  recorded as a fact (host_<step>=<its RIG-IO line>)
#
# Addresses are link-local (169.254.77.0/30 and 169.254.78.0/30): the traffic stays between
# L1 and its guest. Needs rig-io in L1 ($RIG_IO), the rootfs and boot initrd (build-l1.sh).
# Environment:
#   L2_ROOTFS       the gzipped tenant root filesystem image  (/l2/rootfs.ext4.gz)
#   L2_BOOT_INITRD  the disk-root boot initramfs               (/l2/boot-initrd.gz)
#   RIG_IO          the rig-io binary                          (/bin/rig-io)
#   TIO_BYTES       bytes each transfer moves                  (16M)
#   TIO_RATE_MIBPS  the rate-limited interface's rate in MiB/s (1)

L2_ROOTFS=${L2_ROOTFS:-/l2/rootfs.ext4.gz}
L2_BOOT_INITRD=${L2_BOOT_INITRD:-/l2/boot-initrd.gz}
RIG_IO=${RIG_IO:-/bin/rig-io}
TIO_BYTES=${TIO_BYTES:-16M}
TIO_RATE_MIBPS=${TIO_RATE_MIBPS:-1}
TIO_RATE_BYTES=4M

# tio_rate_bucket: the rate-limited interface's bucket in bytes (half a second at its rate).
tio_rate_bucket() {
    echo $((TIO_RATE_MIBPS * 524288))
}

# tio_config FILE WITH_IO: the tenant's config; WITH_IO=1 adds the read-only drive, the two
# interfaces and vsock.
tio_config() {
    cat >"$1" <<CFG
[machine]
vcpus = 2

# Bound to a node: L1's automatic NUMA balancing migrates unbound guest pages under the
# running L2, which this rig's emulated nested paging does not survive (docs/PERFORMANCE.md,
# "Nested rig reliability").
[[memory.zones]]
id = "mem0"
size_mib = 256
backing = "memfd"
host_node = $NODE

[[drives]]
id = "rootfs"
path = "$RIG_TMP/tio-rootfs.ext4"
root = true
CFG
    [ "$2" = 1 ] || return 0
    # Half-second buckets: a sender that stalls for less than that (a nested guest under a
    # busy host does) loses no tokens. The full bucket a transfer starts with is its burst;
    # the check measures the rate over the bytes beyond it.
    size=$(tio_rate_bucket)
    cat >>"$1" <<CFG

[[drives]]
id = "data"
path = "$RIG_TMP/tio-data.img"
read_only = true

[[net]]
id = "eth0"
tap = "tio0"
mac = "06:00:a9:fe:4d:02"

[[net]]
id = "eth1"
tap = "tio1"
mac = "06:00:a9:fe:4e:02"
tx_rate_limiter = { bandwidth = { size = $size, refill_time = 500 } }

[vsock]
guest_cid = 3
uds_path = "$RIG_TMP/tio.vsock"
CFG
}

# tio_tap NAME ADDR/PREFIX: a tap for the guest, with L1's address on it.
tio_tap() {
    ip link del "$1" 2>/dev/null
    "$RIG_IO" mktap "$1" >/dev/null && ip addr add "$2" dev "$1" && ip link set "$1" up
}

# tio_host NAME RIG-IO-ARGS...: L1's side of one transfer, in the background; its line is
# collected by tio_host_facts.
tio_host() {
    name=$1
    shift
    "$RIG_IO" "$@" --timeout "$RIG_VM_TIMEOUT" >"$RIG_TMP/tio-host-$name.out" 2>&1 &
    TIO_PIDS="$TIO_PIDS $!"
}

tio_host_facts() {
    for f in "$RIG_TMP"/tio-host-*.out; do
        [ -f "$f" ] || continue
        name=${f##*/tio-host-}
        fact tio_run "host_${name%.out}" "$(grep -m 1 '^RIG-IO' "$f" || tr '\n' ' ' <"$f")"
    done
}

# tio_boot NAME CONFIG CMDLINE-EXTRA: one boot from the disk, to its end.
tio_boot() {
    vm_start "$1" "$2" --kernel "$L2_KERNEL" --initrd "$L2_BOOT_INITRD" \
        --cmdline "console=ttyS0 reboot=k panic=-1 quiet $3"
    pid=$VM_PID
    vm_wait "$1" "$pid" "$RIG_VM_TIMEOUT"
    fact "$1" total_ms $(($(now_ms) - VM_T0))
}

scenario_tenant_io() {
    rm -f "$RIG_TMP"/tio-* "$RIG_TMP"/tio.vsock*
    TIO_PIDS=
    gunzip -c "$L2_ROOTFS" >"$RIG_TMP/tio-rootfs.ext4"
    dd if=/dev/urandom of="$RIG_TMP/tio-data.img" bs=1024 count=1024 2>/dev/null
    chmod 0444 "$RIG_TMP/tio-data.img"
    token=tio-$(now_ms)

    echo "RIG-BEGIN tio_blk_write"
    fact tio_blk_write token "$token"
    tio_config "$RIG_TMP/tio-write.toml" 0
    tio_boot tio_blk_write "$RIG_TMP/tio-write.toml" \
        "aivmm.script=/scripts/blk-check.sh blk.mode=write blk.token=$token"
    stderr_facts tio_blk_write tio_blk_write
    vm_output tio_blk_write
    echo "RIG-END tio_blk_write rc=$VM_RC"

    echo "RIG-BEGIN tio_run"
    fact tio_run token "$token"
    fact tio_run rate_mibps "$TIO_RATE_MIBPS"
    fact tio_run rate_bucket_bytes "$(tio_rate_bucket)"
    fact tio_run data_sha "$(head -c 65536 "$RIG_TMP/tio-data.img" | sha256sum | cut -d' ' -f1)"
    tio_tap tio0 169.254.77.1/30 || fact tio_run tap_error tio0
    tio_tap tio1 169.254.78.1/30 || fact tio_run tap_error tio1
    tio_config "$RIG_TMP/tio-run.toml" 1
    tio_host net_send tcp-connect 169.254.77.2:5201 --send "$TIO_BYTES"
    tio_host net_recv tcp-listen 5202 --bind 169.254.77.1 --recv "$TIO_BYTES"
    tio_host rate_recv tcp-listen 5204 --bind 169.254.78.1 --recv "$TIO_RATE_BYTES"
    tio_host rate_recv2 tcp-listen 5205 --bind 169.254.78.1 --recv "$TIO_RATE_BYTES"
    tio_host vsock_send uds-connect "$RIG_TMP/tio.vsock" 5000 --send "$TIO_BYTES"
    tio_host vsock_recv uds-listen "$RIG_TMP/tio.vsock_6000" --recv "$TIO_BYTES"
    tio_boot tio_run "$RIG_TMP/tio-run.toml" \
        "aivmm.script=/scripts/tenant-io.sh net.guest=169.254.77.2/30 net.host=169.254.77.1 net.bytes=$TIO_BYTES vsock.bytes=$TIO_BYTES tio.rate_guest=169.254.78.2/30 tio.rate_host=169.254.78.1 tio.rate_bytes=$TIO_RATE_BYTES rigio.timeout=$RIG_VM_TIMEOUT"
    # Host sides still waiting (a guest that never connected) end with the VM.
    for p in $TIO_PIDS; do
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    tio_host_facts
    ip link del tio0 2>/dev/null
    ip link del tio1 2>/dev/null
    stderr_facts tio_run tio_run
    vm_output tio_run
    echo "RIG-END tio_run rc=$VM_RC"
}
