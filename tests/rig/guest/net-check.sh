#!/bin/sh
# L2 guest script of the virtio-net check: moves a known byte stream both ways between the
# guest and the host over the tenant's network (aivmm's virtio-net on a tap), with rig-io
# (/bin/rig-io in the guest image) on both ends. The modules are loaded by the init.
#
#   net-check.sh [GUEST_IP/PREFIX HOST_IP [BYTES]]
#
# Without arguments: net.guest=, net.host= and net.bytes= from the kernel command line
# (BYTES: default 16M; K/M/G suffixes). Also net.dev= (default eth0, else the first
# interface that is not lo), net.rtt=COUNT (default 0: no round trips) and rigio.timeout=
# (seconds each rig-io step may wait, default 120).
#
# Protocol, in this order (the host starts its side of steps 1 to 3 together: every rig-io
# connect retries until its peer listens, within the timeout):
#   1. guest: rig-io tcp-listen 5201 --recv BYTES
#      host:  rig-io tcp-connect GUEST_IP:5201 --send BYTES
#   2. guest: rig-io tcp-connect HOST_IP:5202 --send BYTES
#      host:  rig-io tcp-listen 5202 --recv BYTES
#   3. only with net.rtt=COUNT > 0:
#      guest: rig-io tcp-connect HOST_IP:5203 --rtt COUNT
#      host:  rig-io tcp-listen 5203 --echo
# Output lines:
#   AIVMM-NET-UP dev=<if> mac=<mac> addr=<GUEST_IP/PREFIX> host=<HOST_IP>
#   AIVMM-NET-PING ok=<0|1>                    (one ping of HOST_IP: informative)
#   AIVMM-NET guest-recv RIG-IO tcp-listen bytes=... ok=<0|1> role=recv
#   AIVMM-NET guest-send RIG-IO tcp-connect bytes=... ok=<0|1> role=send
#   AIVMM-NET guest-rtt RIG-IO rtt count=... ok=<0|1> via=tcp-connect   (with net.rtt)
#   AIVMM-NET-DONE rc=<n>                      (0 when every step has ok=1)
# A step whose rig-io printed nothing shows as `AIVMM-NET <step> RIG-IO none ok=0 rc=<n>`.

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

guest=${1:-$(karg net.guest "")}
host=${2:-$(karg net.host "")}
bytes=${3:-$(karg net.bytes 16M)}
rtt=$(karg net.rtt 0)
timeout=$(karg rigio.timeout 120)
rc=0

if [ -z "$guest" ] || [ -z "$host" ]; then
    echo "aivmm-net-check: need GUEST_IP/PREFIX and HOST_IP (arguments, or net.guest= net.host=)"
    echo "AIVMM-NET-DONE rc=2"
    exit 2
fi

dev=$(karg net.dev "")
if [ -z "$dev" ]; then
    if [ -e /sys/class/net/eth0 ]; then
        dev=eth0
    else
        for d in /sys/class/net/*; do
            [ "${d##*/}" = lo ] && continue
            dev=${d##*/}
            break
        done
    fi
fi
if [ -z "$dev" ] || [ ! -e "/sys/class/net/$dev" ]; then
    echo "aivmm-net-check: no network interface (is virtio_net loaded? $(ls /sys/class/net))"
    echo "AIVMM-NET-DONE rc=1"
    exit 1
fi

ip addr add "$guest" dev "$dev" || rc=1
ip link set "$dev" up || rc=1
echo "AIVMM-NET-UP dev=$dev mac=$(cat "/sys/class/net/$dev/address") addr=$guest host=$host"
if ping -c 1 -W 5 "$host" >/dev/null 2>&1; then
    echo "AIVMM-NET-PING ok=1"
else
    echo "AIVMM-NET-PING ok=0"
fi

rig_step AIVMM-NET guest-recv tcp-listen 5201 --recv "$bytes"
rig_step AIVMM-NET guest-send tcp-connect "$host:5202" --send "$bytes"
if [ "$rtt" -gt 0 ] 2>/dev/null; then
    rig_step AIVMM-NET guest-rtt tcp-connect "$host:5203" --rtt "$rtt"
fi

echo "AIVMM-NET-DONE rc=$rc"
exit "$rc"
