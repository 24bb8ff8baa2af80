# shellcheck shell=sh
# The ptbench scenario (sourced by tests/rig/scenarios.sh).

# Time to DMA-map (pin and enter in the IOMMU) all guest RAM for passthrough, by size and
# backing: aivmm logs "passthrough: N MiB of guest RAM DMA-mapped in T ms" before the guest
# runs, so each VM is stopped (SIGTERM) right after. Zones are prefaulted either way, so the
# time is pinning and IOMMU mapping only. Sizes: RIG_PTBENCH_SIZES (MiB, default 256 512 1024;
# in L1 the rig.ptbench_sizes knob of run-l1.sh's RIG_PTBENCH_SIZES, and 2-4 GiB guests need
# a bigger L1, RIG_L1_MEM_MB).
scenario_ptbench() {
    if ! dev=$(edu_device) || ! bind_vfio "$dev"; then
        echo "RIG-BEGIN ptbench"
        fact ptbench skipped "no edu device bound to vfio-pci"
        echo "RIG-END ptbench rc=0"
        return
    fi
    node=$(cat "/sys/bus/pci/devices/$dev/numa_node")
    [ "$node" -ge 0 ] 2>/dev/null || node=0
    hp=/sys/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages
    orig=$(cat "$hp")
    for mib in ${RIG_PTBENCH_SIZES:-256 512 1024}; do
        for backing in memfd hugetlb-2m; do
            echo "RIG-BEGIN ptbench"
            fact ptbench size_mib "$mib"
            fact ptbench backing "$backing"
            if [ "$backing" = hugetlb-2m ]; then
                echo $((orig + mib / 2)) >"$hp"
                fact ptbench hugepages_reserved "$(($(cat "$hp") - orig)) of $((mib / 2))"
            fi
            {
                echo '[boot]'
                echo "kernel = \"$L2_KERNEL\""
                echo 'cmdline = "console=ttyS0"'
                echo '[[memory.zones]]'
                echo 'id = "mem0"'
                echo "size_mib = $mib"
                echo "backing = \"$backing\""
                echo 'prefault = true'
                echo '[[passthrough]]'
                echo "device = \"$dev\""
            } >"$RIG_TMP/ptbench.toml"
            vm_start ptbench "$RIG_TMP/ptbench.toml" --log-level info
            pid=$VM_PID
            deadline=$(($(now_ms) + 300000))
            while alive "$pid" && ! grep -q "DMA-mapped in" "$RIG_TMP/ptbench.err" &&
                [ "$(now_ms)" -lt "$deadline" ]; do
                sleep 0.2
            done
            kill -TERM "$pid" 2>/dev/null
            vm_wait ptbench "$pid" 60
            echo "$orig" >"$hp"
            fact ptbench dma_map_ms "$(sed -n 's/.*DMA-mapped in \([0-9]*\) ms.*/\1/p' "$RIG_TMP/ptbench.err")"
            stderr_facts ptbench ptbench
            echo "RIG-END ptbench rc=$VM_RC"
        done
    done
}
