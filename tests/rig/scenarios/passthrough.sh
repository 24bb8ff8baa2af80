# shellcheck shell=sh
# The passthrough scenario (sourced by tests/rig/scenarios.sh).

# A device passed to L2: the edu bound to vfio-pci in L1, the guest's edu-test drives it
# (BAR, DMA, MSI) and the VMM's memory must sit on the device's node. Then the same with
# `mmap = false` (scenario name passthrough_trapped): every BAR access traps into aivmm, for
# the mapped-vs-trapped BAR access figure.
scenario_passthrough() {
    if ! dev=$(edu_device); then
        echo "RIG-BEGIN passthrough"
        fact passthrough skipped "no edu device on this host"
        echo "RIG-END passthrough rc=0"
        return
    fi
    passthrough_run passthrough "$dev" ""
    passthrough_run passthrough_trapped "$dev" "mmap = false"
}

# passthrough_run NAME DEV EXTRA: one VM with DEV passed through; EXTRA is a line added to
# the [[passthrough]] entry.
passthrough_run() {
    name=$1
    dev=$2
    echo "RIG-BEGIN $name"
    fact "$name" device "$dev"
    fact "$name" device_numa_node "$(cat "/sys/bus/pci/devices/$dev/numa_node")"
    fact "$name" driver_before "$(driver_of "$dev")"
    bind_vfio "$dev"
    fact "$name" driver "$(driver_of "$dev")"
    group=$(iommu_group "$dev")
    fact "$name" iommu_group "${group:-none}"
    members=
    for m in "/sys/kernel/iommu_groups/$group/devices"/*; do
        [ -e "$m" ] && members="$members${members:+ }${m##*/}"
    done
    fact "$name" group_devices "$members"
    sed "s/^device = .*/device = \"$dev\"/" "$RIG_CONFIGS/passthrough.toml" >"$RIG_TMP/$name.toml"
    [ -n "$3" ] && echo "$3" >>"$RIG_TMP/$name.toml"
    hp_facts "$name" before
    # shellcheck disable=SC2046
    vm_start "$name" "$RIG_TMP/$name.toml" $(guest_args) --log-level info
    pid=$VM_PID
    wait_guest "$name" AIVMM-GUEST-INIT "$pid" "$RIG_VM_TIMEOUT"
    case $? in
    0)
        fact "$name" up_by "$UP_BY"
        memory_facts "$name" "$pid"
        hp_facts "$name" during
        ;;
    1) fact "$name" up_by "none: aivmm exited before the guest reached init" ;;
    2) fact "$name" up_by "none: the guest did not reach init within ${RIG_VM_TIMEOUT}s" ;;
    esac
    # L1's view of the device's INTx while the guest runs (vfio-pci's IRQ exists only while
    # aivmm has INTx on): the last sample before the VM stops.
    intx_log=$RIG_TMP/$name.l1-intx
    : >"$intx_log"
    (while alive "$pid"; do
        grep vfio-intx /proc/interrupts >"$intx_log.new" && mv "$intx_log.new" "$intx_log"
        sleep 1
    done) &
    sampler=$!
    vm_wait "$name" "$pid" "$RIG_VM_TIMEOUT"
    wait "$sampler"
    fact "$name" l1_vfio_intx "$(tr -s ' ' <"$intx_log")"
    hp_facts "$name" after
    fact "$name" driver_after "$(driver_of "$dev")"
    stderr_facts "$name" "$name"
    vm_output "$name"
    echo "RIG-END $name rc=$VM_RC"
}
