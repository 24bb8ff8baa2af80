# shellcheck shell=sh
# The rig's shared helpers (sourced by tests/rig/scenarios.sh before every scenario): the
# RIG-FACT line, clocks, hugepage and memory facts, starting and waiting for aivmm runs,
# the passthrough target's sysfs helpers and L1's KVM trace.

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

# kvm_facts NAME PID: KVM's counters for the VM of process PID, from debugfs (na where it is
# not mounted): how often its vCPUs halted, and how often KVM polled after a halt.
kvm_facts() {
    for key in halt_exits halt_attempted_poll; do
        v=$(cat /sys/kernel/debug/kvm/"$2"-*/"$key" 2>/dev/null | awk '{ s += $1 } END { if (NR) print s }')
        fact "$1" "kvm_$key" "${v:-na}"
    done
}

# guest_args [KERNEL]: aivmm overrides so the same configs work in L1 and on a host (direct
# mode); KERNEL replaces L2_KERNEL.
guest_args() { echo "--kernel ${1:-$L2_KERNEL} --initrd $L2_INITRD"; }

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
