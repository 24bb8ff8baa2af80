#!/bin/sh
# The rig's scenarios: runs aivmm on the rig configs and prints machine-readable lines that
# the Rust e2e tests (tests/src/report.rs) parse:
#
#   RIG-BEGIN <name>                 an aivmm run starts
#   RIG-FACT <name> <key>=<value>    a fact measured around it (value = rest of the line)
#   ...                              the guest console and aivmm's stderr (prefixed "[stderr] ")
#   RIG-END <name> rc=<n>            aivmm's exit code (137 when the rig had to kill it)
#   RIG-PLAN <scenario>...           (first) the scenarios this invocation runs
#   RIG-RAN <scenario>               a scenario is over (a rig that lost L1 resumes after it)
#   RIG-SCENARIOS-DONE               every requested scenario ran
#
#   scenarios.sh [boot] [badconfig] [sigterm] [demo] [passthrough] [badpassthrough] [ptbench]
#                [ai_infer]
#                (default: boot badconfig sigterm passthrough badpassthrough ai_infer)
#
# Runs in L1 under busybox sh (nested mode), or on the host in direct mode; POSIX sh only.
# Environment (defaults are the L1 layout made by build-l1.sh):
#   AIVMM        the aivmm binary                        (/bin/aivmm)
#   L2_KERNEL    the guest kernel                        (/l2/vmlinuz)
#   L2_INITRD    the guest initramfs                     (/l2/initrd.gz)
#   RIG_CONFIGS  the rig configs (tests/rig/configs)     (/configs)
#   RIG_TMP      scratch directory for logs              (/tmp/rig)
#   RIG_VM_TIMEOUT  seconds an aivmm run may take before the rig kills it (300)
#   RIG_AI_TIMEOUT  seconds both ai_infer tenants together may take (600)
#   RIG_DEMO_CONFIG the config of the demo scenario      (see scenario_demo)
#   AI_INFERD    the ai-inferd binary                    (/bin/ai-inferd)
#   AI_MODELS    the models directory                    (/models)
#   AI_MANIFEST  the models manifest                     ($AI_MODELS/models.toml)
set -u

AIVMM=${AIVMM:-/bin/aivmm}
L2_KERNEL=${L2_KERNEL:-/l2/vmlinuz}
L2_INITRD=${L2_INITRD:-/l2/initrd.gz}
RIG_CONFIGS=${RIG_CONFIGS:-/configs}
RIG_TMP=${RIG_TMP:-/tmp/rig}
RIG_VM_TIMEOUT=${RIG_VM_TIMEOUT:-300}
# The tenants' MiniLM requests run in L1 under TCG and share one executor: about 60 s each
# on a quiet host, 150 s measured while this host's steal time was high (tenant A then
# waited 81 s for B's and was killed at 300 s, in its MLP loop).
RIG_AI_TIMEOUT=${RIG_AI_TIMEOUT:-600}
AI_INFERD=${AI_INFERD:-/bin/ai-inferd}
AI_MODELS=${AI_MODELS:-/models}
AI_MANIFEST=${AI_MANIFEST:-$AI_MODELS/models.toml}
mkdir -p "$RIG_TMP"

fact() { echo "RIG-FACT $1 $2=$3"; }

# Milliseconds since boot (good enough for durations; /proc/uptime has 10 ms resolution).
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# The NUMA node the VM memory goes to: node 1 (the node of the rig's edu device), or node 0
# on a single-node host in direct mode.
if [ -d /sys/devices/system/node/node1 ]; then NODE=1; else NODE=0; fi

# Free 2 MiB hugepages on a node ("na" when the node does not exist).
hp_free() {
    f=/sys/devices/system/node/node$1/hugepages/hugepages-2048kB/free_hugepages
    if [ -r "$f" ]; then cat "$f"; else echo na; fi
}

# hp_facts NAME WHEN: free hugepages on every node, e.g. `hp_node1_before=192`.
hp_facts() {
    for n in 0 1; do
        [ -d "/sys/devices/system/node/node$n" ] && fact "$1" "hp_node${n}_$2" "$(hp_free "$n")"
    done
}

# A rig config as this host needs it: on a single-node host the node-1 binding becomes node 0.
config() {
    src=$RIG_CONFIGS/$1
    if [ "$NODE" = 1 ]; then
        echo "$src"
    else
        sed "s/^host_node = 1\$/host_node = $NODE/" "$src" >"$RIG_TMP/$1"
        echo "$RIG_TMP/$1"
    fi
}

# True while PID runs (a zombie that the shell has not reaped yet counts as gone).
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}

# vm_start NAME CONFIG [aivmm args...]: aivmm in the background, console to $RIG_TMP/NAME.out,
# stderr to $RIG_TMP/NAME.err; sets VM_PID and VM_T0 (ms).
vm_start() {
    out=$RIG_TMP/$1.out
    cfg=$2
    shift 2
    : >"$out"
    : >"${out%.out}.err"
    VM_T0=$(now_ms)
    "$AIVMM" --config "$cfg" "$@" <"/dev/null" >"$out" 2>"${out%.out}.err" &
    VM_PID=$!
}

# wait_guest NAME PATTERN PID SECONDS: wait until the guest is up: PATTERN on its console, or
# aivmm's boot timer logging "reached init" (so that a console problem does not hide what
# the memory checks can still see). 0 = up (sets UP_BY), 1 = aivmm ended first, 2 = timeout.
wait_guest() {
    deadline=$(($(now_ms) + $4 * 1000))
    while :; do
        if grep -q "$2" "$RIG_TMP/$1.out" 2>/dev/null; then
            UP_BY=console
            return 0
        fi
        if grep -q "reached init" "$RIG_TMP/$1.err" 2>/dev/null; then
            UP_BY=boot-timer
            return 0
        fi
        alive "$3" || return 1
        [ "$(now_ms)" -lt "$deadline" ] || return 2
        sleep 0.2
    done
}

# vm_wait NAME PID SECONDS: wait for aivmm to exit and set VM_RC; past the deadline the rig
# kills it (SIGKILL, so the exit code cannot look like a clean exit) and says so.
vm_wait() {
    deadline=$(($(now_ms) + $3 * 1000))
    while alive "$2"; do
        if [ "$(now_ms)" -ge "$deadline" ]; then
            fact "$1" timed_out "after ${3}s, killed"
            kill -KILL "$2" 2>/dev/null
            break
        fi
        sleep 0.2
    done
    wait "$2"
    VM_RC=$?
}

# Print what the run produced: the guest console, then aivmm's stderr, marked as such.
vm_output() {
    cat "$RIG_TMP/$1.out"
    sed 's/^/[stderr] /' "$RIG_TMP/$1.err"
}

# Facts from aivmm's stderr: its boot timer ("guest reached init in N ms") and error line.
stderr_facts() {
    init_ms=$(sed -n 's/.*guest reached init in \([0-9.]*\) *ms.*/\1/p' "$RIG_TMP/$2.err" | head -n 1)
    [ -n "$init_ms" ] && fact "$1" init_ms "$init_ms"
    err=$(grep -m 1 '^aivmm: error:' "$RIG_TMP/$2.err")
    [ -n "$err" ] && fact "$1" error "$err"
    fact "$1" error_lines "$(grep -c '^aivmm: error:' "$RIG_TMP/$2.err")"
    stop=$(sed -n 's/^aivmm: VM stopped: //p' "$RIG_TMP/$2.err" | head -n 1)
    [ -n "$stop" ] && fact "$1" stopped "$stop"
}

# Memory of a running aivmm as L1 sees it: the hugetlb mappings with their NUMA placement,
# the RSS split, and the CPUs each thread may run on.
memory_facts() {
    name=$1
    pid=$2
    huge=$(grep huge "/proc/$pid/numa_maps" 2>/dev/null | tr '\n' ';')
    fact "$name" numa_maps "$huge"
    for key in VmRSS RssAnon RssFile RssShmem VmLck VmHWM; do
        v=$(awk -v k="$key:" '$1 == k { print $2 }' "/proc/$pid/status" 2>/dev/null)
        fact "$name" "${key}_kb" "${v:-na}"
    done
    cpus=
    for t in /proc/"$pid"/task/*; do
        [ -r "$t/status" ] || continue
        c=$(awk '$1 == "Cpus_allowed_list:" { print $2 }' "$t/status")
        cpus="$cpus$(cat "$t/comm" 2>/dev/null):$c;"
    done
    fact "$name" thread_cpus "$cpus"
}

# aivmm overrides so the same configs work in L1 and on a host (direct mode).
guest_args() { echo "--kernel $L2_KERNEL --initrd $L2_INITRD"; }

scenario_boot() {
    echo "RIG-BEGIN boot"
    fact boot host_node "$NODE"
    hp_facts boot before
    # shellcheck disable=SC2046 # guest_args is a list of words without spaces
    vm_start boot "$(config boot.toml)" $(guest_args)
    pid=$VM_PID
    wait_guest boot AIVMM-GUEST-INIT "$pid" "$RIG_VM_TIMEOUT"
    case $? in
    0)
        fact boot up_ms $(($(now_ms) - VM_T0))
        fact boot up_by "$UP_BY"
        # Sampled while the guest's boot-check.sh sleeps: the VM is alive and fully mapped.
        memory_facts boot "$pid"
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

# The rig's passthrough target, QEMU's `edu` (1234:11e8): prints its PCI address, fails when
# the host has none.
edu_device() {
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" = "0x1234:0x11e8" ]; then
            echo "${d##*/}"
            return 0
        fi
    done
    return 1
}

# driver_of DEV: the driver DEV is bound to, or "none".
driver_of() {
    l=$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null) && basename "$l" || echo none
}

# bind_vfio DEV: hands DEV to vfio-pci (driver_override keeps other drivers off it).
bind_vfio() {
    d=/sys/bus/pci/devices/$1
    [ "$(driver_of "$1")" = vfio-pci ] && return 0
    echo vfio-pci >"$d/driver_override" || return 1
    [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(driver_of "$1")" = vfio-pci ]
}

# iommu_group DEV: the IOMMU group number of DEV.
iommu_group() {
    l=$(readlink "/sys/bus/pci/devices/$1/iommu_group") && basename "$l"
}

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

# `make demo`: one tenant microVM, its console straight to ours, live. The config is
# RIG_DEMO_CONFIG, else the tenant demo config when the rig carries it (configs/tenant-demo.toml,
# added by demo.sh), else the rig's demo.toml; the guest runs /scripts/demo.sh.
scenario_demo() {
    cfg=${RIG_DEMO_CONFIG:-}
    if [ -z "$cfg" ]; then
        if [ -f "$RIG_CONFIGS/tenant-demo.toml" ]; then
            cfg=$RIG_CONFIGS/tenant-demo.toml
        else
            cfg=$(config demo.toml)
        fi
    fi
    # The tenant's own kernel command line, plus the script for the guest init to run.
    cmdline=$(sed -n 's/^cmdline *= *"\(.*\)"$/\1/p' "$cfg" | sed 's/ *aivmm\.script=[^ ]*//g')
    cmdline="$cmdline aivmm.script=/scripts/demo.sh"
    echo "RIG-BEGIN demo"
    fact demo config "$cfg"
    echo "+ aivmm --config $cfg $(guest_args) --cmdline '$cmdline'"
    t0=$(now_ms)
    # shellcheck disable=SC2046
    "$AIVMM" --config "$cfg" $(guest_args) --cmdline "$cmdline" </dev/null &
    vm_wait demo $! "$RIG_VM_TIMEOUT"
    fact demo total_ms $(($(now_ms) - t0))
    echo "RIG-END demo rc=$VM_RC"
}

# L1's KVM trace around a guest's death. ktrace_start enables every `kvm` trace event into
# the ring buffer and stops tracing at the first KVM_EXIT_SHUTDOWN (a guest triple fault), so
# the buffer ends where the guest died: the exits, guest RIPs and injected events before it.
# ktrace_dump prints the buffer's tail (as KTRACE lines) only when that happened.
# Nested mode only: in direct mode the "L1" is the user's own host, whose tracing is not ours.
KTRACE=/sys/kernel/tracing
KTRACE_ON=
ktrace_start() {
    [ "${RIG_MODE:-}" = nested ] || return 0
    [ -d "$KTRACE/events" ] || mount -t tracefs tracefs "$KTRACE" 2>/dev/null || return 0
    [ -d "$KTRACE/events/kvm" ] || return 0
    echo 0 >"$KTRACE/tracing_on"
    echo >"$KTRACE/trace"
    echo 8192 >"$KTRACE/buffer_size_kb"
    echo 1 >"$KTRACE/events/kvm/enable"
    echo 'traceoff if reason == 8' >"$KTRACE/events/kvm/kvm_userspace_exit/trigger"
    echo 1 >"$KTRACE/tracing_on"
    KTRACE_ON=1
    fact "$1" ktrace on
}
ktrace_dump() {
    [ -n "$KTRACE_ON" ] || return 0
    KTRACE_ON=
    if [ "$(cat "$KTRACE/tracing_on")" = 0 ]; then
        fact "$1" ktrace "stopped at a KVM_EXIT_SHUTDOWN"
        tail -n "${RIG_KTRACE_LINES:-600}" "$KTRACE/trace" | sed 's/^/KTRACE /'
    fi
    echo 0 >"$KTRACE/events/kvm/enable"
    echo '!traceoff' >"$KTRACE/events/kvm/kvm_userspace_exit/trigger"
    echo 1 >"$KTRACE/tracing_on"
}

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

[ $# -gt 0 ] || set -- boot badconfig sigterm passthrough badpassthrough ai_infer
fact rig mode "${RIG_MODE:-unknown}"
fact rig aivmm "$AIVMM"
echo "RIG-PLAN $*"
for s in "$@"; do
    case $s in
    boot | badconfig | sigterm | demo | passthrough | badpassthrough | ptbench | ai_infer) "scenario_$s" ;;
    *) echo "scenarios.sh: unknown scenario: $s" >&2 ;;
    esac
    echo "RIG-RAN $s"
done
echo "RIG-SCENARIOS-DONE"
