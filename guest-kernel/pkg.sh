# shellcheck shell=bash
# Helpers shared by the guest-kernel and rig scripts (sourced, not executed).
# They install Debian packages on demand so that the scripts work on a fresh machine,
# and stay silent when everything is already there.

# Run as root, or through sudo when the caller is not root (operators' workstations).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "$0: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# apt-get update only when the package lists do not know PACKAGE (a fresh machine or
# container has empty lists); an update on every run would cost time and network.
apt_lists_know() {
    local pkg=$1 policy
    # Capture first: `grep -q` closing the pipe early would fail the pipeline (pipefail).
    policy=$(apt-cache policy "$pkg" 2>/dev/null || true)
    if ! grep -q 'Candidate: [^(]' <<<"$policy"; then
        echo "$0: apt lists do not know $pkg, running apt-get update" >&2
        as_root apt-get update -q >&2
    fi
}

# need_cmd COMMAND PACKAGE: install PACKAGE when COMMAND is not on PATH.
need_cmd() {
    local cmd=$1 pkg=$2
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    apt_lists_know "$pkg"
    echo "$0: installing $pkg (for $cmd)" >&2
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$pkg" >&2
    command -v "$cmd" >/dev/null 2>&1 || {
        echo "$0: $pkg is installed but $cmd is still missing" >&2
        return 1
    }
}

# A statically linked busybox: the initramfs has no libc. Debian's busybox-static puts it
# in /bin/busybox; the dynamic `busybox` package would not work inside an initramfs.
# Prints the path. BUSYBOX in the environment overrides the choice.
static_busybox() {
    local bb=${BUSYBOX:-/bin/busybox}
    if [ -z "${BUSYBOX:-}" ] && ! is_static "$bb"; then
        apt_lists_know busybox-static
        echo "$0: installing busybox-static" >&2
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends busybox-static >&2
    fi
    if ! is_static "$bb"; then
        echo "$0: $bb is not a statically linked busybox" >&2
        return 1
    fi
    echo "$bb"
}

# True when FILE exists and is an ELF executable without a program interpreter.
is_static() {
    [ -x "$1" ] || return 1
    # ldd exits non-zero and says "not a dynamic executable" for static binaries.
    ! ldd "$1" >/dev/null 2>&1
}

# cargo_target_dir ROOT: cargo's target directory for the workspace at ROOT (CARGO_TARGET_DIR,
# relative to ROOT when relative; else ROOT/target), where the rig scripts find what cargo built.
cargo_target_dir() {
    local t=${CARGO_TARGET_DIR:-$1/target}
    case $t in /*) ;; *) t=$1/$t ;; esac
    echo "$t"
}
