# shellcheck shell=sh
# The badpassthrough scenario (sourced by tests/rig/scenarios.sh).

# Passthrough configs aivmm must refuse at start (exit 2, one error line): an address with
# no device, a device not bound to vfio-pci (the edu's root port, on pcieport), and the
# edu while another process holds its VFIO group.
scenario_badpassthrough() {
    dev=$(edu_device) || dev=
    for case_name in bdf driver busy; do
        echo "RIG-BEGIN badpassthrough"
        fact badpassthrough case "$case_name"
        holder=
        if [ "$case_name" = busy ]; then
            if [ -n "$dev" ] && bind_vfio "$dev" && group=$(iommu_group "$dev"); then
                # Like another VMM owning the group: the file stays open while aivmm starts.
                sh -c "exec 3<>/dev/vfio/$group && exec sleep 120" &
                holder=$!
                sleep 1
                fact badpassthrough holder "pid $holder holds /dev/vfio/$group"
            else
                fact badpassthrough holder "none: no edu bound to vfio-pci"
            fi
        fi
        hp_facts badpassthrough before
        # shellcheck disable=SC2046
        vm_start badpassthrough "$RIG_CONFIGS/bad-pt-$case_name.toml" $(guest_args)
        vm_wait badpassthrough "$VM_PID" 60
        if [ -n "$holder" ]; then
            kill "$holder" 2>/dev/null
            wait "$holder" 2>/dev/null
        fi
        hp_facts badpassthrough after
        stderr_facts badpassthrough badpassthrough
        vm_output badpassthrough
        echo "RIG-END badpassthrough rc=$VM_RC"
    done
}
