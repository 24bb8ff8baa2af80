# shellcheck shell=sh
# Helpers of the L2 guest scripts, sourced as /scripts/lib.sh (this whole directory is
# /scripts/ in the guest's initramfs and in the tenant disk image).

# karg NAME DEFAULT: the value of NAME= on the kernel command line, else DEFAULT.
karg() {
    for a in $(cat /proc/cmdline); do
        case $a in "$1"=*) echo "${a#*=}"; return ;; esac
    done
    echo "$2"
}

# rig_step TAG NAME RIG-IO-ARGS...: runs rig-io, letting it wait $timeout seconds, and
# prints its line as `TAG NAME <line>` (`TAG NAME RIG-IO none ok=0 rc=<n>` when it printed
# nothing); a failed step sets rc=1. $timeout and rc are the calling script's.
# shellcheck disable=SC2034,SC2154
rig_step() {
    tag=$1
    name=$2
    shift 2
    line=$(rig-io "$@" --timeout "$timeout")
    src=$?
    [ -n "$line" ] || line="RIG-IO none ok=0 rc=$src"
    echo "$tag $name $line"
    [ "$src" -eq 0 ] || rc=1
}

# field LINE KEY: the value of KEY= in a `key=value ...` line (a RIG-IO line), else 0.
field() {
    for w in $1; do
        case $w in "$2"=*) echo "${w#*=}"; return ;; esac
    done
    echo 0
}
