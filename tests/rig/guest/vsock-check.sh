#!/bin/sh
# L2 guest script of the vsock check: moves a known byte stream both ways between the guest
# and a host process through aivmm's vsock device (Firecracker's hybrid model: the host end
# is the VMM's unix socket UDS), with rig-io (/bin/rig-io in the guest image) on both ends.
# The vsock transport module is loaded by the init.
#
#   vsock-check.sh [BYTES]
#
# BYTES: default vsock.bytes= from the kernel command line, else 16M (K/M/G suffixes).
# Also vsock.rtt=COUNT (default 0: no round trips) and rigio.timeout= (seconds each rig-io
# step may wait, default 120).
#
# Protocol, in this order (the host starts its side of steps 1 to 3 together: every rig-io
# connect retries until its peer listens, within the timeout):
#   1. guest: rig-io vsock-listen 5000 --recv BYTES
#      host:  rig-io uds-connect UDS 5000 --send BYTES        (CONNECT 5000 through UDS)
#   2. guest: rig-io vsock-connect 2 6000 --send BYTES          (CID 2 = the host)
#      host:  rig-io uds-listen UDS_6000 --recv BYTES         (the VMM connects to <UDS>_6000)
#   3. only with vsock.rtt=COUNT > 0 (the host measures the round trips):
#      guest: rig-io vsock-listen 5001 --echo
#      host:  rig-io uds-connect UDS 5001 --rtt COUNT
# Output lines:
#   AIVMM-VSOCK guest-recv RIG-IO vsock-listen bytes=... ok=<0|1> role=recv
#   AIVMM-VSOCK guest-send RIG-IO vsock-connect bytes=... ok=<0|1> role=send
#   AIVMM-VSOCK guest-echo RIG-IO vsock-listen bytes=... ok=<0|1> role=echo   (with vsock.rtt)
#   AIVMM-VSOCK-DONE rc=<n>                    (0 when every step has ok=1)
# A step whose rig-io printed nothing shows as `AIVMM-VSOCK <step> RIG-IO none ok=0 rc=<n>`.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

bytes=${1:-$(karg vsock.bytes 16M)}
rtt=$(karg vsock.rtt 0)
timeout=$(karg rigio.timeout 120)
rc=0

if [ ! -c /dev/vsock ]; then
    echo "aivmm-vsock-check: no /dev/vsock (is vmw_vsock_virtio_transport loaded, is there a vsock device?)"
fi

rig_step AIVMM-VSOCK guest-recv vsock-listen 5000 --recv "$bytes"
rig_step AIVMM-VSOCK guest-send vsock-connect 2 6000 --send "$bytes"
if [ "$rtt" -gt 0 ] 2>/dev/null; then
    rig_step AIVMM-VSOCK guest-echo vsock-listen 5001 --echo
fi

echo "AIVMM-VSOCK-DONE rc=$rc"
exit "$rc"
