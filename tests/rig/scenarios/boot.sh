# shellcheck shell=sh
# The boot scenario (sourced by tests/rig/scenarios.sh).

scenario_boot() {
    echo "RIG-BEGIN boot"
    fact boot host_node "$NODE"
    hp_facts boot before
    # shellcheck disable=SC2046 # guest_args is a list of words without spaces
    # The bzImage: the other scenarios boot the ELF vmlinux through its PVH entry.
    fact boot kernel "$L2_BZIMAGE"
    vm_start boot "$(config boot.toml)" $(guest_args "$L2_BZIMAGE")
    pid=$VM_PID
    wait_guest boot AIVMM-GUEST-INIT "$pid" "$RIG_VM_TIMEOUT"
    case $? in
    0)
        fact boot up_ms $(($(now_ms) - VM_T0))
        fact boot up_by "$UP_BY"
        # Sampled while the guest's boot-check.sh sleeps: the VM is alive and fully mapped.
        memory_facts boot "$pid"
        kvm_facts boot "$pid"
        hp_facts boot during
        ;;
    1) fact boot up_by "none: aivmm exited before the guest reached init" ;;
    2) fact boot up_by "none: the guest did not reach init within ${RIG_VM_TIMEOUT}s" ;;
    esac
    vm_wait boot "$pid" "$RIG_VM_TIMEOUT"
    fact boot total_ms $(($(now_ms) - VM_T0))
    hp_facts boot after
    stderr_facts boot boot
    vm_output boot
    echo "RIG-END boot rc=$VM_RC"
}
