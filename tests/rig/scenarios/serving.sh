# shellcheck shell=sh
# The serving scenario (sourced by tests/rig/scenarios.sh): two tenants, each booted from its
# own disk image with a tap and a vsock, run `ai-agent serve` (started by the image's init
# from `aivmm.serve=` on their command line) and share one ai-inferd with weights 1 and 3.
# Everything is sent from L1, outside the VMs, to the tenants' standard endpoints:
#
#   srv_daemon   ai-inferd (its log, a `top` snapshot, exit after SIGTERM), and what L1 saw:
#                facts ready_ms_<t> (tenant t's boot to its endpoint answering) and
#                load_<a|b|bad> (the load's RIG-IO lines); `SERVE-OUT tenant=<t> via=<way>
#                check=<name> status=<code> hex=<body>` lines for the checks below, through
#                each way in (tcp: the tap; vsock: the hybrid vsock socket)
#   srv_a/srv_b  the tenants (console, aivmm's stderr, exit after SIGTERM)
#
# Checks per tenant and way: OIP v2 health, model metadata, the MLP with JSON tensors and with
# the binary tensor extension, /v1/embeddings for MiniLM (a list of two inputs over TCP, one
# string over vsock), an unknown model and a malformed body. Then both tenants get the same
# concurrent load (SRV_LOAD_SECS or `rig.serve_secs=`, default 20 s; SRV_CONCURRENCY or
# `rig.serve_clients=` clients each, default 4; MLP requests, or MiniLM embeddings with
# SRV_LOAD=embeddings or `rig.serve_load=embeddings`) while a third client sends tenant B
# malformed requests.
#
# With SRV_PUBLISH=1 (or `rig.serve_publish=1` on L1's command line: the demo) each endpoint is
# forwarded from a port of its own, SRV_PUBLISH_PORT (18001) and the next three (tenant A tcp,
# A vsock, B tcp, B vsock): in L1 on QEMU's user network address (eth0, 10.0.2.15), which the
# host's `hostfwd` reaches; on a direct-mode host on its loopback. SRV_KEEP=1
# (`rig.serve_keep=1`) then keeps the tenants serving after the checks, until L1 (or the rig)
# is stopped.
#
# Environment: L2_ROOTFS, L2_BOOT_INITRD, RIG_IO (as tenant-io.sh), SRV_LOAD_SECS,
# SRV_CONCURRENCY (4), SRV_LOAD (mlp), SRV_PUBLISH, SRV_PUBLISH_PORT, SRV_KEEP.

SRV_PORT=8000
SRV_REQ=/rig/serve

# srv_karg NAME DEFAULT: a `rig.NAME=` value from L1's command line.
srv_karg() {
    for a in $(cat /proc/cmdline); do
        case $a in "rig.$1="*) echo "${a#*=}"; return ;; esac
    done
    echo "$2"
}

# srv_config NAME NET(169.254.8x) MACBYTE: tenant NAME's aivmm config (SRV_VCPUS vCPUs, 1;
# SRV_SCRIPT: a guest script and its arguments for `aivmm.script=`, none).
srv_config() {
    cat >"$RIG_TMP/srv-$1.toml" <<CFG
[machine]
vcpus = ${SRV_VCPUS:-1}

[boot]
kernel = "$L2_KERNEL"
initrd = "$L2_BOOT_INITRD"
# hugepages=16: the guest agent's DMA pool.
cmdline = "console=ttyS0 reboot=k panic=-1 quiet 8250.nr_uarts=1 hugepages=16 aivmm.ip=$2.2/30 aivmm.serve=tcp:0.0.0.0:$SRV_PORT,vsock:$SRV_PORT${SRV_SCRIPT:+ aivmm.script=$SRV_SCRIPT}"

[[memory.zones]]
id = "mem0"
size_mib = 160
backing = "hugetlb-2m"
host_node = $NODE
prefault = true
lock = true

[[drives]]
id = "rootfs"
path = "$RIG_TMP/srv-$1.ext4"
root = true

[[net]]
id = "eth0"
tap = "srv$1"
mac = "06:00:a9:fe:$3:02"

[vsock]
guest_cid = 3
uds_path = "$RIG_TMP/srv-$1.vsock"

[ai_infer]
socket = "$RIG_TMP/srv-ai-$1.sock"
CFG
}

# srv_boot NAME NET MACBYTE: the tenant's disk, tap and VM; sets SRV_PID_<NAME>.
srv_boot() {
    gunzip -c "$L2_ROOTFS" >"$RIG_TMP/srv-$1.ext4"
    ip link del "srv$1" 2>/dev/null
    "$RIG_IO" mktap "srv$1" >/dev/null && ip addr add "$2.1/30" dev "srv$1" &&
        ip link set "srv$1" up || fact srv_daemon "tap_error_$1" "srv$1"
    srv_config "$1" "$2" "$3"
    rm -f "$RIG_TMP/srv-$1.vsock"
    vm_start "srv_$1" "$RIG_TMP/srv-$1.toml"
    eval "SRV_PID_$1=\$VM_PID SRV_T0_$1=\$VM_T0"
}

# srv_ready NAME TARGET PID T0: wait until the endpoint answers its readiness check.
srv_ready() {
    deadline=$(($(now_ms) + RIG_VM_TIMEOUT * 1000))
    while alive "$3" && [ "$(now_ms)" -lt "$deadline" ]; do
        if "$RIG_IO" http "$2" GET /v2/health/ready --timeout 5 >/dev/null 2>&1; then
            fact srv_daemon "ready_ms_$1" $(($(now_ms) - $4))
            return 0
        fi
        sleep 1
    done
    fact srv_daemon "ready_ms_$1" na
    return 1
}

# srv_check TENANT VIA TARGET NAME METHOD PATH [rig-io http options]: one request; its
# answer as a SERVE-OUT line (the body in hex, for the e2e test to decode).
srv_check() {
    t=$1 via=$2 target=$3 name=$4 method=$5 path=$6
    shift 6
    out=$RIG_TMP/srv-$t-$via-$name.body
    line=$("$RIG_IO" http "$target" "$method" "$path" --out "$out" --timeout 120 "$@" 2>&1 |
        grep -m 1 '^RIG-IO')
    status=$(echo "$line" | sed -n 's/.*status=\([0-9]*\).*/\1/p')
    hex=$(od -An -v -tx1 "$out" 2>/dev/null | tr -d ' \n')
    echo "SERVE-OUT tenant=$t via=$via check=$name status=${status:-0} hex=$hex"
}

# srv_checks TENANT VIA TARGET: every correctness check through one way in.
srv_checks() {
    srv_check "$1" "$2" "$3" live GET /v2/health/live
    srv_check "$1" "$2" "$3" metadata GET /v2/models/mlp
    srv_check "$1" "$2" "$3" mlp_json POST /v2/models/mlp/infer \
        --body-file "$SRV_REQ/mlp-request.json" --header "Content-Type: application/json"
    srv_check "$1" "$2" "$3" mlp_binary POST /v2/models/mlp/infer \
        --body-file "$RIG_TMP/srv-mlp-binary.req" \
        --header "Inference-Header-Content-Length: $SRV_BIN_HDR_LEN" \
        --header "Content-Type: application/octet-stream"
    # A list of two inputs over TCP, a single string over vsock (MiniLM is slow under TCG).
    if [ "$2" = tcp ]; then emb=embeddings-request.json; else emb=embeddings-single.json; fi
    srv_check "$1" "$2" "$3" embeddings POST /v1/embeddings \
        --body-file "$SRV_REQ/$emb" --header "Content-Type: application/json"
    srv_check "$1" "$2" "$3" unknown_model POST /v2/models/no-such-model/infer \
        --body-file "$SRV_REQ/mlp-request.json"
    srv_check "$1" "$2" "$3" malformed POST /v2/models/mlp/infer --body '{"inputs": [1, 2'
}

# srv_publish: each endpoint on a port of its own (in L1: on QEMU's user network, which the host
# forwards to; on a direct-mode host: on its loopback).
srv_publish() {
    addr=127.0.0.1
    if [ "${RIG_MODE:-}" = nested ]; then
        addr=0.0.0.0
        { ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up; } 2>/dev/null ||
            fact srv_daemon publish_error "no eth0 in L1"
    fi
    SRV_PROXIES=
    port=${SRV_PUBLISH_PORT:-18001}
    for target in "tcp:169.254.80.2:$SRV_PORT" "vsock:$RIG_TMP/srv-a.vsock:$SRV_PORT" \
        "tcp:169.254.81.2:$SRV_PORT" "vsock:$RIG_TMP/srv-b.vsock:$SRV_PORT"; do
        "$RIG_IO" proxy "$addr:$port" "$target" --timeout 600 >/dev/null 2>&1 &
        SRV_PROXIES="$SRV_PROXIES $!"
        fact srv_daemon "published_$port" "$target"
        port=$((port + 1))
    done
}

scenario_serving() {
    echo "RIG-BEGIN srv_daemon"
    if [ ! -x "$AI_INFERD" ] || [ ! -f "$L2_ROOTFS" ] || [ ! -x "$RIG_IO" ]; then
        fact srv_daemon missing "$AI_INFERD, $L2_ROOTFS or $RIG_IO"
        echo "RIG-END srv_daemon rc=127"
        return
    fi
    sed -e "s|@RIG_TMP@|$RIG_TMP|g" -e "s|@MANIFEST@|$AI_MANIFEST|g" \
        "$RIG_CONFIGS/serving-inferd.toml" >"$RIG_TMP/srv-inferd.toml"
    rm -f "$RIG_TMP"/srv-ai-*.sock
    t0=$(now_ms)
    AIVMM_MODELS_DIR=$AI_MODELS "$AI_INFERD" serve --config "$RIG_TMP/srv-inferd.toml" \
        >"$RIG_TMP/srv_daemon.log" 2>&1 &
    dpid=$!
    deadline=$((t0 + RIG_VM_TIMEOUT * 1000))
    while alive "$dpid" && [ "$(now_ms)" -lt "$deadline" ] &&
        ! { [ -S "$RIG_TMP/srv-ai-a.sock" ] && [ -S "$RIG_TMP/srv-ai-b.sock" ]; }; do
        sleep 0.2
    done
    fact srv_daemon ready_ms $(($(now_ms) - t0))

    # The binary-extension request: the JSON header, then the raw input tensor.
    cp "$SRV_REQ/mlp-binary-header.json" "$RIG_TMP/srv-mlp-binary.req"
    SRV_BIN_HDR_LEN=$(wc -c <"$RIG_TMP/srv-mlp-binary.req")
    cat "$SRV_REQ/mlp-input.bin" >>"$RIG_TMP/srv-mlp-binary.req"

    srv_boot a 169.254.80 50
    srv_boot b 169.254.81 51
    [ "${SRV_PUBLISH:-$(srv_karg serve_publish 0)}" = 1 ] && srv_publish

    for t in a b; do
        eval "pid=\$SRV_PID_$t t0=\$SRV_T0_$t"
        if [ "$t" = a ]; then net=169.254.80.2; else net=169.254.81.2; fi
        if srv_ready "$t" "tcp:$net:$SRV_PORT" "$pid" "$t0"; then
            srv_checks "$t" tcp "tcp:$net:$SRV_PORT"
            srv_checks "$t" vsock "vsock:$RIG_TMP/srv-$t.vsock:$SRV_PORT"
        fi
    done

    # The load: the same request on both tenants at once, with a malformed neighbour. The
    # MLP (default) measures the serving path; MiniLM embeddings keep the accelerator busy,
    # so that the shares of its time follow the tenants' weights.
    secs=${SRV_LOAD_SECS:-$(srv_karg serve_secs 20)}
    clients=${SRV_CONCURRENCY:-$(srv_karg serve_clients 4)}
    if [ "${SRV_LOAD:-$(srv_karg serve_load mlp)}" = embeddings ]; then
        load_path=/v1/embeddings load_body=$SRV_REQ/embeddings-single.json
    else
        load_path=/v2/models/mlp/infer load_body=$SRV_REQ/mlp-request.json
    fi
    fact srv_daemon load_path "$load_path"
    for t in a b; do
        if [ "$t" = a ]; then net=169.254.80.2; else net=169.254.81.2; fi
        "$RIG_IO" http-load "tcp:$net:$SRV_PORT" POST "$load_path" \
            --body-file "$load_body" --concurrency "$clients" \
            --secs "$secs" --timeout 60 >"$RIG_TMP/srv-load-$t.out" 2>&1 &
        eval "load_$t=\$!"
    done
    "$RIG_IO" http-load "tcp:169.254.81.2:$SRV_PORT" POST /v2/models/mlp/infer \
        --body '{"inputs":[{"name":"x","shape":[2,16],"datatype":"FP32","data":[1,2,3]}]}' \
        --concurrency 2 --secs "$secs" --timeout 60 >"$RIG_TMP/srv-load-bad.out" 2>&1 &
    load_bad=$!
    # shellcheck disable=SC2154 # set by eval above
    wait "$load_a" "$load_b" "$load_bad"
    "$AI_INFERD" top --once --metrics "$RIG_TMP/srv-metrics.sock" >"$RIG_TMP/srv-top.txt" 2>&1
    for t in a b bad; do
        fact srv_daemon "load_$t" "$(grep -m 1 '^RIG-IO' "$RIG_TMP/srv-load-$t.out" ||
            tr '\n' ' ' <"$RIG_TMP/srv-load-$t.out")"
    done
    sed 's/^/ai-inferd top: /' "$RIG_TMP/srv-top.txt"
    for t in a b; do
        if [ "$t" = a ]; then net=169.254.80.2; else net=169.254.81.2; fi
        srv_check "$t" tcp "tcp:$net:$SRV_PORT" metrics GET /metrics
    done

    if [ "${SRV_KEEP:-$(srv_karg serve_keep 0)}" = 1 ]; then
        echo "RIG-SERVE-KEEP the tenants keep serving until L1 is stopped"
        while alive "$SRV_PID_a" || alive "$SRV_PID_b"; do sleep 5; done
    fi

    # shellcheck disable=SC2086 # pids
    [ -z "${SRV_PROXIES:-}" ] || kill $SRV_PROXIES 2>/dev/null
    for t in a b; do
        eval "pid=\$SRV_PID_$t"
        kill -TERM "$pid" 2>/dev/null
        vm_wait "srv_$t" "$pid" 30
        eval "SRV_RC_$t=\$VM_RC"
    done
    if alive "$dpid"; then
        kill -TERM "$dpid"
        vm_wait srv_daemon "$dpid" 30
    else
        wait "$dpid"
        VM_RC=$?
        fact srv_daemon died_early 1
    fi
    cat "$RIG_TMP/srv_daemon.log"
    echo "RIG-END srv_daemon rc=$VM_RC"
    for t in a b; do
        echo "RIG-BEGIN srv_$t"
        stderr_facts "srv_$t" "srv_$t"
        vm_output "srv_$t"
        eval "echo \"RIG-END srv_$t rc=\$SRV_RC_$t\""
        ip link del "srv$t" 2>/dev/null
    done
}
