# shellcheck shell=sh
# The serving benchmark (sourced by tests/rig/scenarios.sh; not in the default list; run by
# tests/rig/bench-serve.sh): one tenant of the serving scenario (tests/rig/scenarios/
# serving.sh: its disk image, tap, vsock and ai-inferd config) with 2 vCPUs runs
# tests/rig/guest/serve-bench.sh, which measures the same MLP request through the guest
# agent and through `ai-agent serve` over HTTP; then, with the tenant gone, L1 runs
# `ai-inferd bench --only overhead` (the same model through the vhost-user path and called
# directly, in L1) for the reference.
#
#   sb_tenant   the tenant: its SB-RUN lines
#   sb_direct   ai-inferd's overhead phase in L1: its report
#
# Environment: SB_N (300 requests per measurement), SB_ROUNDS (3).

scenario_serve_bench() {
    echo "RIG-BEGIN sb_tenant"
    sed -e "s|@RIG_TMP@|$RIG_TMP|g" -e "s|@MANIFEST@|$AI_MANIFEST|g" \
        "$RIG_CONFIGS/serving-inferd.toml" >"$RIG_TMP/srv-inferd.toml"
    rm -f "$RIG_TMP"/srv-ai-*.sock
    AIVMM_MODELS_DIR=$AI_MODELS "$AI_INFERD" serve --config "$RIG_TMP/srv-inferd.toml" \
        >"$RIG_TMP/sb_daemon.log" 2>&1 &
    dpid=$!
    i=0
    while [ ! -S "$RIG_TMP/srv-ai-a.sock" ] && alive "$dpid" && [ "$i" -lt 600 ]; do
        sleep 0.2
        i=$((i + 1))
    done
    SRV_VCPUS=2 SRV_SCRIPT="/scripts/serve-bench.sh sb.n=${SB_N:-300} sb.rounds=${SB_ROUNDS:-3}" \
        srv_boot a 169.254.80 50
    vm_wait sb_tenant "$SRV_PID_a" "${RIG_AI_TIMEOUT:-600}"
    rc=$VM_RC
    kill -TERM "$dpid" 2>/dev/null
    wait "$dpid"
    ip link del srva 2>/dev/null
    # vm_start wrote the tenant's console to srv_a.out.
    cat "$RIG_TMP/srv_a.out"
    sed 's/^/[stderr] /' "$RIG_TMP/srv_a.err"
    echo "RIG-END sb_tenant rc=$rc"

    echo "RIG-BEGIN sb_direct"
    AIVMM_MODELS_DIR=$AI_MODELS "$AI_INFERD" bench --only overhead 2>&1
    echo "RIG-END sb_direct rc=$?"
}
