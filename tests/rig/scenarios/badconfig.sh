# shellcheck shell=sh
# The badconfig scenario (sourced by tests/rig/scenarios.sh).

# Configs aivmm must refuse with exit code 2 and one `aivmm: error:` line, leaving nothing
# behind (the hugepage counters are compared before and after).
scenario_badconfig() {
    for case_cfg in zero-memory:bad-zero-memory.toml unknown-field:bad-unknown-field.toml \
        numa-node-7:bad-numa-node.toml missing-kernel:bad-missing-kernel.toml; do
        case_name=${case_cfg%%:*}
        cfg=$RIG_CONFIGS/${case_cfg#*:}
        echo "RIG-BEGIN badconfig"
        fact badconfig case "$case_name"
        fact badconfig config "$cfg"
        hp_facts badconfig before
        if [ "$case_name" = missing-kernel ]; then
            # The point is the config's own (missing) kernel path: no override.
            vm_start badconfig "$cfg" --initrd "$L2_INITRD"
        else
            # shellcheck disable=SC2046
            vm_start badconfig "$cfg" $(guest_args)
        fi
        # A refused config ends at once; a booting one would be a failure, cut it short.
        vm_wait badconfig "$VM_PID" 60
        hp_facts badconfig after
        stderr_facts badconfig badconfig
        vm_output badconfig
        echo "RIG-END badconfig rc=$VM_RC"
    done
}
