# shellcheck shell=sh
# The ai_infer scenario (sourced by tests/rig/scenarios.sh).

# migration_facts NAME WHEN: L1's page migration counters (NUMA balancing moves pages of a
# tenant's memory that no policy binds), e.g. `numa_pages_migrated_after=0`.
migration_facts() {
    for k in numa_hint_faults numa_pages_migrated pgmigrate_success; do
        fact "$1" "${k}_$2" "$(awk -v k="$k" '$1 == k { print $2 }' /proc/vmstat)"
    done
}

# A tenant config for the ai_infer scenario with its socket in this run's scratch directory.
ai_config() {
    sed "s|\"/tmp/rig/|\"$RIG_TMP/|" "$(config "$1")" >"$RIG_TMP/run-$1"
    echo "$RIG_TMP/run-$1"
}

# Two tenant VMs share one ai-inferd: each runs the models through its guest agent (outputs
# printed for the host to check), tenant A keeps inferring while tenant B sends garbage.
# Runs: ai_daemon (the daemon: readiness, RSS, its log, exit code after SIGTERM), ai_a, ai_b.
scenario_ai_infer() {
    echo "RIG-BEGIN ai_daemon"
    if [ ! -x "$AI_INFERD" ] || [ ! -f "$AI_MANIFEST" ]; then
        fact ai_daemon missing "$AI_INFERD or $AI_MANIFEST"
        echo "RIG-END ai_daemon rc=127"
        return
    fi
    sed -e "s|@RIG_TMP@|$RIG_TMP|g" -e "s|@MANIFEST@|$AI_MANIFEST|g" \
        "$RIG_CONFIGS/ai-inferd.toml" >"$RIG_TMP/ai-inferd.toml"
    rm -f "$RIG_TMP/ai-a.sock" "$RIG_TMP/ai-b.sock"
    t0=$(now_ms)
    AIVMM_MODELS_DIR=$AI_MODELS "$AI_INFERD" serve --config "$RIG_TMP/ai-inferd.toml" \
        >"$RIG_TMP/ai_daemon.log" 2>&1 &
    dpid=$!
    deadline=$((t0 + RIG_VM_TIMEOUT * 1000))
    while alive "$dpid" && [ "$(now_ms)" -lt "$deadline" ] &&
        ! { [ -S "$RIG_TMP/ai-a.sock" ] && [ -S "$RIG_TMP/ai-b.sock" ]; }; do
        sleep 0.2
    done
    fact ai_daemon ready_ms $(($(now_ms) - t0))
    memory_facts ai_daemon_idle "$dpid"
    ktrace_start ai_daemon
    migration_facts ai_daemon before
    # shellcheck disable=SC2046
    vm_start ai_a "$(ai_config ai-tenant-a.toml)" $(guest_args)
    apid=$VM_PID
    # shellcheck disable=SC2046
    vm_start ai_b "$(ai_config ai-tenant-b.toml)" $(guest_args)
    bpid=$VM_PID
    # The daemon's view every 30 s while the tenants run (the last frame is printed with
    # its log: per-tenant requests, rejections, in flight, latencies).
    (while alive "$apid" || alive "$bpid"; do
        "$AI_INFERD" top --once --metrics "$RIG_TMP/metrics.sock" >"$RIG_TMP/ai_top.new" 2>&1 &&
            mv "$RIG_TMP/ai_top.new" "$RIG_TMP/ai_top.txt"
        sleep 30
    done) &
    top_sampler=$!
    # One deadline for both tenants, which run side by side.
    ai_t0=$(now_ms)
    vm_wait ai_a "$apid" "$RIG_AI_TIMEOUT"
    arc=$VM_RC
    left=$((RIG_AI_TIMEOUT - ($(now_ms) - ai_t0) / 1000))
    vm_wait ai_b "$bpid" "$((left > 1 ? left : 1))"
    brc=$VM_RC
    wait "$top_sampler"
    memory_facts ai_daemon "$dpid"
    if alive "$dpid"; then
        kill -TERM "$dpid"
        vm_wait ai_daemon "$dpid" 30
    else
        wait "$dpid"
        VM_RC=$?
        fact ai_daemon died_early 1
    fi
    cat "$RIG_TMP/ai_daemon.log"
    sed 's/^/ai-inferd top: /' "$RIG_TMP/ai_top.txt" 2>/dev/null
    migration_facts ai_daemon after
    ktrace_dump ai_daemon
    echo "RIG-END ai_daemon rc=$VM_RC"
    for run in ai_a:$arc ai_b:$brc; do
        name=${run%%:*}
        echo "RIG-BEGIN $name"
        stderr_facts "$name" "$name"
        vm_output "$name"
        echo "RIG-END $name rc=${run#*:}"
    done
}
