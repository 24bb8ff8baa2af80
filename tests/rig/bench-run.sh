# shellcheck shell=dash disable=SC2034 # BOOT_MS, RC, ... are for the caller
# Sourced by the benchmarks' L1 sides (bench-boot-l1.sh, bench-io-l1.sh; their host sides put it
# in L1 as /rig/bench-run.sh): starts one VMM and times it, the same way for aivmm and QEMU.
#
#   vmm_run NAME RUN CMD...
#
# L1's clock (/proc/uptime, 10 ms; busybox date has no %N) is read just before CMD starts. Its
# stdout (the guest's serial console) goes through a FIFO to a reader made of shell builtins
# only (no polling, no fork per check), which reads the clock again when the guest init's
# marker line `AIVMM-GUEST-INIT` arrives, and once more when the VMM has exited. After the
# guest script's `AIVMM-SCRIPT-EXIT` line the guest powers off: a VMM still running 30 s later
# gets SIGTERM, then SIGKILL 5 s on (RC 124); one running longer than RUN_LIMIT (else LIMIT)
# seconds in all is killed.
# Sets BOOT_MS (start to marker; na without a marker), EXIT_MS (start to exit), RC (the VMM's
# exit status, 124 when cut short after the script), GUEST_UP (the guest's uptime in the
# marker line, na), INIT_MS (aivmm's own "guest reached init in N ms", na) and RUN_BASE
# ($TMP/NAME-RUN: .out is the console, .err the VMM's stderr).
# Hooks (shell functions, so that no line costs a fork): when VMM_RUN_ON_MARKER is set,
# `$VMM_RUN_ON_MARKER NAME PID` runs as the marker arrives (PID: the VMM's); when
# VMM_RUN_ON_LINE is set, `$VMM_RUN_ON_LINE NAME PID LINE` runs for every console line.
# Processes a hook starts in the background must not read stdin (it is the FIFO); those it
# wants waited for go into VMM_RUN_WAIT (pids), which vmm_run waits for after the VMM's exit
# and then empties.
# Needs TMP and LIMIT. POSIX sh for busybox ash.

# Milliseconds from two /proc/uptime readings (10 ms resolution; L1 is up for more than 1 s,
# so the integer part never starts with 0).
ms_between() {
    echo $(((${2%.*}${2#*.} - ${1%.*}${1#*.}) * 10))
}

vmm_run() {
    _name=$1
    _run=$2
    shift 2
    RUN_BASE=$TMP/$_name-$_run
    _fifo=$RUN_BASE.fifo
    rm -f "$_fifo"
    mkfifo "$_fifo"
    : >"$RUN_BASE.out"
    rm -f "$RUN_BASE.cut"
    _t_mark=
    GUEST_UP=na
    _killer=
    read -r _t0 _ </proc/uptime
    "$@" </dev/null >"$_fifo" 2>"$RUN_BASE.err" &
    _pid=$!
    # The watchdog must not hold the FIFO open (the reader's EOF is the VMM's exit).
    (sleep "${RUN_LIMIT:-$LIMIT}" && kill -KILL "$_pid") </dev/null >/dev/null 2>&1 &
    _watchdog=$!
    while IFS= read -r _line || [ -n "$_line" ]; do
        case $_line in
        *AIVMM-GUEST-INIT*)
            if [ -z "$_t_mark" ]; then
                read -r _t_mark _ </proc/uptime
                GUEST_UP=${_line#*uptime=}
                GUEST_UP=${GUEST_UP%% *}
                [ -z "${VMM_RUN_ON_MARKER:-}" ] || "$VMM_RUN_ON_MARKER" "$_name" "$_pid"
            fi
            ;;
        *AIVMM-SCRIPT-EXIT*)
            # The guest powers off now; a VMM that does not exit on it is cut short: SIGTERM
            # first, so that its log tells a VMM that still runs its control loop from one
            # that is stuck, then SIGKILL. The run counts as failed (RC 124) either way.
            (sleep 30 && : >"$RUN_BASE.cut" && kill -TERM "$_pid" && sleep 5 &&
                kill -KILL "$_pid") </dev/null >/dev/null 2>&1 &
            _killer=$!
            ;;
        esac
        [ -z "${VMM_RUN_ON_LINE:-}" ] || "$VMM_RUN_ON_LINE" "$_name" "$_pid" "$_line"
        printf '%s\n' "$_line" >>"$RUN_BASE.out"
    done <"$_fifo"
    wait "$_pid"
    RC=$?
    [ -f "$RUN_BASE.cut" ] && RC=124
    read -r _t_end _ </proc/uptime
    kill "$_watchdog" 2>/dev/null
    [ -n "$_killer" ] && kill "$_killer" 2>/dev/null
    for _p in ${VMM_RUN_WAIT:-}; do
        wait "$_p"
    done
    VMM_RUN_WAIT=
    rm -f "$_fifo"
    if [ -n "$_t_mark" ]; then BOOT_MS=$(ms_between "$_t0" "$_t_mark"); else BOOT_MS=na; fi
    EXIT_MS=$(ms_between "$_t0" "$_t_end")
    INIT_MS=$(sed -n 's/.*guest reached init in \([0-9]*\) ms.*/\1/p' "$RUN_BASE.err" | head -n 1)
    INIT_MS=${INIT_MS:-na}
}

# vmm_run_dump NAME RUN: the end of a run's console and stderr, for a run that went wrong.
vmm_run_dump() {
    echo "--- $1 run $2: console (last 40 lines) ---"
    tail -n 40 "$TMP/$1-$2.out"
    echo "--- $1 run $2: stderr (last 20 lines) ---"
    tail -n 20 "$TMP/$1-$2.err"
    echo "---"
}
