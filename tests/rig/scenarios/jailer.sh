# shellcheck shell=sh
# The jailer scenario (sourced by tests/rig/scenarios.sh).

# Copies program $1 and the libraries its loader resolves into the tree $2, at the same
# paths (the jailer copies them from there into the jail). x86_64's loader.
copy_with_libs() {
    interp=/lib64/ld-linux-x86-64.so.2
    for f in "$1" "$interp" $("$interp" --list "$1" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p'); do
        mkdir -p "$2$(dirname "$f")"
        cp "$f" "$2$f"
    done
}

# aivmm started through aivmm-jailer, as Firecracker is through its jailer: the guest boots
# from a jail holding only its kernel, initrd and config, on locked hugepages of node 1, in a
# cgroup v2 of its own, as an unprivileged uid with no-new-privs and its seccomp filters;
# SIGTERM then stops it (exit 0) and every hugepage comes back.
# pivot_root cannot leave an initramfs root (L1's), so the jailer runs chrooted into a tmpfs
# holding what it needs: itself, aivmm (each with its libraries), /proc, /sys (the topology
# it binds into the jail), /dev/null and the cgroup2 tree.
scenario_jailer() {
    echo "RIG-BEGIN jailer"
    host=$RIG_TMP/jailhost
    id=rig-jail
    name=$(basename "$AIVMM")
    jail=$host/srv/jailer/$name/$id/root
    mkdir -p "$host"
    mount -t tmpfs -o size=512m,mode=0755 tmpfs "$host"
    copy_with_libs "$AIVMM_JAILER" "$host"
    copy_with_libs "$AIVMM" "$host"
    mkdir -p "$host/proc" "$host/sys" "$host/dev" "$jail"
    # The jailer runs the ELF loader to list aivmm's libraries, with stdin on /dev/null.
    mknod -m 666 "$host/dev/null" c 1 3
    mount -t proc proc "$host/proc"
    # sysfs for the topology the jailer binds into the jail, cgroup2 for the limits.
    mount -t sysfs sysfs "$host/sys"
    mount -t cgroup2 cgroup2 "$host/sys/fs/cgroup" 2>/dev/null
    controllers=$(cat "$host/sys/fs/cgroup/cgroup.controllers" 2>/dev/null)
    fact jailer cgroup_controllers "$controllers"
    # The limits the hierarchy can hold (a hybrid host's may offer none of them).
    limits=
    case " $controllers " in *" pids "*) limits="$limits --cgroup pids.max=128" ;; esac
    case " $controllers " in *" memory "*) limits="$limits --cgroup memory.max=1073741824" ;; esac
    fact jailer limits "$limits"
    # What the VM needs, put in the jail before the jailer runs (docs/jailer.md).
    cp "$L2_KERNEL" "$jail/vmlinux"
    cp "$L2_INITRD" "$jail/initrd.gz"
    cp "$(config jailer.toml)" "$jail/vm.toml"
    out=$RIG_TMP/jailer.out
    : >"$out"
    : >"$RIG_TMP/jailer.err"
    # shellcheck disable=SC2086 # limits is a list of flags
    fact jailer host_node "$NODE"
    hp_facts jailer before
    chroot "$host" "$AIVMM_JAILER" --id "$id" --exec-file "$AIVMM" \
        --uid 1000 --gid 1000 --cgroup-version 2 $limits --resource-limit no-file=1024 \
        --resource-limit memlock=536870912 \
        -- --config /vm.toml </dev/null >"$out" 2>"$RIG_TMP/jailer.err" &
    pid=$!
    if wait_guest jailer GUEST-SLEEPING "$pid" "$RIG_VM_TIMEOUT"; then
        fact jailer up_by "$UP_BY"
        st=/proc/$pid/status
        fact jailer comm "$(cat "/proc/$pid/comm" 2>/dev/null)"
        fact jailer uid "$(awk '$1 == "Uid:" { print $2, $3, $4, $5 }' "$st")"
        fact jailer gid "$(awk '$1 == "Gid:" { print $2, $3, $4, $5 }' "$st")"
        fact jailer groups "$(awk '$1 == "Groups:" { $1 = ""; print }' "$st" | tr -s ' ')"
        fact jailer no_new_privs "$(awk '$1 == "NoNewPrivs:" { print $2 }' "$st")"
        fact jailer seccomp "$(awk '$1 == "Seccomp:" { print $2 }' "$st")"
        fact jailer cgroup "$(cat "/proc/$pid/cgroup" 2>/dev/null | tr '\n' ' ')"
        cg=$host/sys/fs/cgroup/aivmm/$id
        for f in pids.max memory.max; do
            [ -r "$cg/$f" ] && fact jailer "cg_$f" "$(cat "$cg/$f")"
        done
        fact jailer pid_file "$(cat "$jail/$name.pid" 2>/dev/null) (pid $pid)"
        fact jailer jail_files "$(cd "$jail" && ls | tr '\n' ' ')"
        fact jailer nofile "$(awk '$1 == "Max" && $2 == "open" { print $4 }' "/proc/$pid/limits")"
        # lock = true: mlock of the zone needs the RLIMIT_MEMLOCK the jailer raised (the
        # kernel does not count hugetlb pages in VmLck, so the limit is what shows).
        fact jailer memlock "$(awk '$1 == "Max" && $2 == "locked" { print $4 }' "/proc/$pid/limits")"
        hp_facts jailer during
        kill -TERM "$pid"
        fact jailer signalled 1
        vm_wait jailer "$pid" 60
    else
        fact jailer signalled "0 (the guest never reached init)"
        vm_wait jailer "$pid" "$RIG_VM_TIMEOUT"
    fi
    hp_facts jailer after
    # The microVM's cgroup goes with it; the jail is removed with the tmpfs.
    rmdir "$host/sys/fs/cgroup/aivmm/$id" "$host/sys/fs/cgroup/aivmm" 2>/dev/null
    umount "$host/sys/fs/cgroup" 2>/dev/null
    umount "$host/sys"
    umount "$host/proc"
    umount "$host"
    stderr_facts jailer jailer
    vm_output jailer
    echo "RIG-END jailer rc=$VM_RC"
}
