# shellcheck shell=sh
# The control API scenario (sourced by tests/rig/scenarios.sh): aivmm started with only
# `--api-sock`, configured and driven with `curl --unix-socket` as Firecracker's users do,
# boots the disk-root tenant with a drive, a network interface and a vsock; then the same
# tenant boots again from the equivalent `--config-file` JSON with `--no-api`.
#
#   api_sock  the API boot. Facts: socket_ms (process start to the socket answering curl's
#             GET /, polled), socket_ready (aivmm's own wall and CPU time to the socket),
#             get_load (200 GET / while the guest runs: rig-io http-load's line),
#             start_call_ms (aivmm's start to the InstanceStart call), await_cad (0 when
#             the guest, its checks done, waited for Ctrl+Alt+Del), cad_exit_ms
#             (SendCtrlAltDel to aivmm's exit). Each call prints `API-CALL <name> status=<code> body=<hex>`; the guest runs
#             net-check.sh and vsock-check.sh (1 MiB each way), L1's side of each transfer
#             is a fact host_<step>.
#   api_json  the config-file boot: the same guest checks.
#
# Environment: L2_ROOTFS, L2_BOOT_INITRD, RIG_IO (as tenant-io.sh), API_BYTES (1M).

API_BYTES=${API_BYTES:-1M}

# api_call NAME METHOD PATH [BODY]: one request; its status and body as an API-CALL line.
api_call() {
    body=$RIG_TMP/api-call.body
    rm -f "$body"
    if [ $# -ge 4 ]; then
        code=$(curl -s --max-time 30 --unix-socket "$RIG_TMP/api.sock" -X "$2" \
            -H 'Content-Type: application/json' -d "$4" -o "$body" -w '%{http_code}' \
            "http://localhost$3")
    else
        code=$(curl -s --max-time 30 --unix-socket "$RIG_TMP/api.sock" -X "$2" \
            -o "$body" -w '%{http_code}' "http://localhost$3")
    fi
    echo "API-CALL $1 status=${code:-0} body=$(od -An -v -tx1 "$body" 2>/dev/null | tr -d ' \n')"
}

# api_cmdline [WORDS]: the guest's command line (the checks read their settings from it),
# with WORDS appended.
api_cmdline() {
    echo "console=ttyS0 reboot=k panic=-1 quiet 8250.nr_uarts=1 aivmm.script=/scripts/api-check.sh net.guest=169.254.82.2/30 net.host=169.254.82.1 net.bytes=$API_BYTES vsock.bytes=$API_BYTES rigio.timeout=$RIG_VM_TIMEOUT${1:+ $1}"
}

# api_await NAME PATTERN PID: until the guest prints PATTERN (0), aivmm ends (1) or
# RIG_VM_TIMEOUT passes (2).
api_await() {
    deadline=$(($(now_ms) + RIG_VM_TIMEOUT * 1000))
    until grep -q "$2" "$RIG_TMP/$1.out" 2>/dev/null; do
        alive "$3" || return 1
        [ "$(now_ms)" -lt "$deadline" ] || return 2
        sleep 0.2
    done
}

# api_hosts NAME: L1's side of the guest's transfers, in the background.
api_hosts() {
    API_PIDS=
    for spec in "net_send tcp-connect 169.254.82.2:5201 --send $API_BYTES" \
        "net_recv tcp-listen 5202 --bind 169.254.82.1 --recv $API_BYTES" \
        "vsock_send uds-connect $RIG_TMP/api-$1.vsock 5000 --send $API_BYTES" \
        "vsock_recv uds-listen $RIG_TMP/api-$1.vsock_6000 --recv $API_BYTES"; do
        # shellcheck disable=SC2086 # the spec is words
        set -- "$1" $spec
        step=$2
        shift 2
        "$RIG_IO" "$@" --timeout "$RIG_VM_TIMEOUT" >"$RIG_TMP/api-host-$step.out" 2>&1 &
        API_PIDS="$API_PIDS $!"
    done
}

# api_host_facts NAME: stop what still waits, record L1's lines.
api_host_facts() {
    for p in $API_PIDS; do
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    for step in net_send net_recv vsock_send vsock_recv; do
        fact "$1" "host_$step" "$(grep -m 1 '^RIG-IO' "$RIG_TMP/api-host-$step.out" ||
            tr '\n' ' ' <"$RIG_TMP/api-host-$step.out")"
    done
}

scenario_api() {
    rm -f "$RIG_TMP"/api*
    gunzip -c "$L2_ROOTFS" >"$RIG_TMP/api-rootfs.ext4"
    ip link del api0 2>/dev/null
    "$RIG_IO" mktap api0 >/dev/null && ip addr add 169.254.82.1/30 dev api0 && ip link set api0 up

    echo "RIG-BEGIN api_sock"
    if ! command -v curl >/dev/null; then
        fact api_sock missing curl
        echo "RIG-END api_sock rc=127"
        return
    fi
    : >"$RIG_TMP/api_sock.out"
    t0=$(now_ms)
    "$AIVMM" --api-sock "$RIG_TMP/api.sock" --id rig-api --log-level info </dev/null \
        >"$RIG_TMP/api_sock.out" 2>"$RIG_TMP/api_sock.err" &
    pid=$!
    while alive "$pid" && ! curl -s --max-time 2 --unix-socket "$RIG_TMP/api.sock" \
        -o /dev/null http://localhost/ 2>/dev/null && [ $(($(now_ms) - t0)) -lt 30000 ]; do
        sleep 0.05
    done
    fact api_sock socket_ms $(($(now_ms) - t0))
    api_call info_before GET /
    api_call boot_source PUT /boot-source "{\"kernel_image_path\": \"$L2_KERNEL\", \"initrd_path\": \"$L2_BOOT_INITRD\", \"boot_args\": \"$(api_cmdline aivmm.await_cad=1)\"}"
    # 2 MiB hugepages: never migrated by L1's NUMA balancing, which this rig's emulated
    # nested paging does not survive (docs/PERFORMANCE.md, "Nested rig reliability").
    api_call machine PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}'
    api_call drive PUT /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$RIG_TMP/api-rootfs.ext4\", \"is_root_device\": true, \"is_read_only\": false}"
    api_call net PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "api0", "guest_mac": "06:00:a9:fe:52:02"}'
    api_call vsock PUT /vsock "{\"guest_cid\": 3, \"uds_path\": \"$RIG_TMP/api-sock.vsock\"}"
    api_call metrics PUT /metrics "{\"metrics_path\": \"$RIG_TMP/api.metrics\"}"
    api_call bad_field PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256, "warp_drive": true}'
    api_call vm_config GET /vm/config
    api_hosts sock
    # When InstanceStart was sent, from aivmm's start (ms; aivmm's boot timer counts from its
    # start too, so init_ms minus this is InstanceStart to the guest's init).
    fact api_sock start_call_ms $(($(now_ms) - t0))
    api_call start PUT /actions '{"action_type": "InstanceStart"}'
    api_call info_running GET /
    # GET / while the guest runs: the API's own latency (docs/PERFORMANCE.md).
    fact api_sock get_load "$("$RIG_IO" http-load "unix:$RIG_TMP/api.sock" GET / --count 200 \
        --timeout 30 2>/dev/null)"
    api_call boot_after_start PUT /boot-source "{\"kernel_image_path\": \"$L2_KERNEL\"}"
    # Firecracker's runtime PATCHes: new limits for the running drive and interface.
    api_call patch_drive PATCH /drives/rootfs '{"drive_id": "rootfs", "rate_limiter": {"bandwidth": {"size": 104857600, "refill_time": 1000}}}'
    api_call patch_net PATCH /network-interfaces/eth0 '{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 104857600, "refill_time": 1000}}}'
    api_call pause PATCH /vm '{"state": "Paused"}'
    api_call info_paused GET /
    api_call resume PATCH /vm '{"state": "Resumed"}'
    api_call info_resumed GET /
    api_call flush PUT /actions '{"action_type": "FlushMetrics"}'
    fact api_sock metrics_lines "$(wc -l <"$RIG_TMP/api.metrics" 2>/dev/null || echo 0)"
    api_call prometheus GET /metrics/prometheus
    # After its checks the guest waits for Ctrl+Alt+Del; its init then shuts it down.
    api_await api_sock AIVMM-API-AWAIT-CAD "$pid"
    fact api_sock await_cad "$?"
    t_cad=$(now_ms)
    api_call cad PUT /actions '{"action_type": "SendCtrlAltDel"}'
    vm_wait api_sock "$pid" "$RIG_VM_TIMEOUT"
    fact api_sock cad_exit_ms $(($(now_ms) - t_cad))
    api_host_facts api_sock
    stderr_facts api_sock api_sock
    # aivmm's own figure: "API socket ... ready N us after start (M us of CPU)".
    fact api_sock socket_ready "$(sed -n 's/.*API socket .* ready \([0-9]*\) us after start (\([0-9]*\) us of CPU).*/wall_us=\1 cpu_us=\2/p' "$RIG_TMP/api_sock.err")"
    fact api_sock socket_left "$([ -e "$RIG_TMP/api.sock" ] && echo 1 || echo 0)"
    vm_output api_sock
    echo "RIG-END api_sock rc=$VM_RC"

    echo "RIG-BEGIN api_json"
    cat >"$RIG_TMP/api.json" <<JSON
{
  "boot-source": { "kernel_image_path": "$L2_KERNEL", "initrd_path": "$L2_BOOT_INITRD",
                   "boot_args": "$(api_cmdline)" },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M" },
  "drives": [ { "drive_id": "rootfs", "path_on_host": "$RIG_TMP/api-rootfs.ext4",
                "is_root_device": true, "is_read_only": false } ],
  "network-interfaces": [ { "iface_id": "eth0", "host_dev_name": "api0",
                            "guest_mac": "06:00:a9:fe:52:02" } ],
  "vsock": { "guest_cid": 3, "uds_path": "$RIG_TMP/api-json.vsock" }
}
JSON
    api_hosts json
    : >"$RIG_TMP/api_json.out"
    "$AIVMM" --config-file "$RIG_TMP/api.json" --no-api </dev/null \
        >"$RIG_TMP/api_json.out" 2>"$RIG_TMP/api_json.err" &
    vm_wait api_json $! "$RIG_VM_TIMEOUT"
    api_host_facts api_json
    stderr_facts api_json api_json
    vm_output api_json
    echo "RIG-END api_json rc=$VM_RC"
    ip link del api0 2>/dev/null
}
