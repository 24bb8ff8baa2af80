# shellcheck shell=sh
# The sigterm scenario (sourced by tests/rig/scenarios.sh).

# SIGTERM while the guest runs: aivmm exits 0 at once and gives every hugepage back.
scenario_sigterm() {
    echo "RIG-BEGIN sigterm"
    fact sigterm host_node "$NODE"
    hp_facts sigterm before
    # shellcheck disable=SC2046
    vm_start sigterm "$(config sigterm.toml)" $(guest_args)
    pid=$VM_PID
    if wait_guest sigterm GUEST-SLEEPING "$pid" "$RIG_VM_TIMEOUT"; then
        fact sigterm up_by "$UP_BY"
        # Past init the guest sleeps 60 s; a moment more makes sure its script runs.
        [ "$UP_BY" = console ] || sleep 2
        hp_facts sigterm during
        t=$(now_ms)
        kill -TERM "$pid"
        fact sigterm signalled 1
        vm_wait sigterm "$pid" 60
        fact sigterm exit_after_signal_ms $(($(now_ms) - t))
    else
        fact sigterm signalled "0 (the guest never reached init)"
        vm_wait sigterm "$pid" "$RIG_VM_TIMEOUT"
    fi
    hp_facts sigterm after
    stderr_facts sigterm sigterm
    vm_output sigterm
    echo "RIG-END sigterm rc=$VM_RC"
}
