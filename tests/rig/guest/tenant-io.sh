#!/bin/sh
# L2 guest script of the tenant I/O scenario's second boot (tests/rig/scenarios/tenant-io.sh):
# the disk written by the first boot is read back, a read-only drive refuses writes, then
# TCP over the tap, TCP over the rate-limited tap, and vsock, each both ways where the host
# side expects it. Each step prints its own lines (see the scripts it calls); this script
# ends with AIVMM-TIO-DONE rc=<n> (0 when every step passed).
#
# Kernel command line: what blk-check.sh, net-check.sh and vsock-check.sh read, plus
#   tio.rate_guest=IP/PREFIX tio.rate_host=IP tio.rate_bytes=N   the rate-limited interface
#     (eth1): the guest sends N bytes to the host's port 5204, then again to 5205.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

rc=0
step() {
    "$@" || rc=1
}

step sh /scripts/blk-check.sh read
step sh /scripts/blk-check.sh ro /dev/vdb
step sh /scripts/net-check.sh

rate_guest=$(karg tio.rate_guest "")
rate_host=$(karg tio.rate_host "")
rate_bytes=$(karg tio.rate_bytes 4M)
timeout=$(karg rigio.timeout 120)
if [ -n "$rate_guest" ]; then
    ip addr add "$rate_guest" dev eth1 && ip link set eth1 up
    rig_step AIVMM-NET-RATE guest-send tcp-connect "$rate_host:5204" --send "$rate_bytes"
    # Once more when the bucket (half a second at the rate) has refilled: a stall of the
    # nested rig only ever slows a transfer down, so the check has two to judge by.
    sleep 1
    rig_step AIVMM-NET-RATE2 guest-send tcp-connect "$rate_host:5205" --send "$rate_bytes"
fi

step sh /scripts/vsock-check.sh
echo "AIVMM-TIO-DONE rc=$rc"
exit "$rc"
