# shellcheck shell=bash
# Helpers that fill the staging directory of a guest image (sourced, not executed). Shared by
# build-initramfs.sh, build-boot-initrd.sh and guest-image/build-rootfs.sh, so that an
# initramfs and a disk image get their programs, libraries and modules the same way.
# Errors go to stderr and end the calling script (they all run with `set -e`).

# stage_boot_timer FILE: the boot-timer helper, a 170-byte static x86-64 program that writes
# 0x7b to I/O port 0x440 (Debian's kernel has no /dev/port to do it from sh). Assembled by
# hand (one PT_LOAD at 0x400000, entry at file offset 0x78):
#   mov eax,173; mov edi,0x440; mov esi,1; mov edx,1; syscall   ; ioperm(0x440, 1, 1)
#   test rax,rax; js fail
#   mov dx,0x440; mov al,0x7b; out dx,al; xor edi,edi; jmp exit
#   fail: mov edi,1
#   exit: mov eax,60; syscall                                     ; exit(edi)
stage_boot_timer() {
    local hex=
    # ELF header: magic, 64-bit, little-endian, version 1; ET_EXEC, x86-64, entry, phoff=64.
    hex+='7f454c46020101000000000000000000'
    hex+='02003e000100000078004000000000004000000000000000'
    # shoff=0, flags=0, ehsize=64, phentsize=56, phnum=1, no section headers.
    hex+='000000000000000000000000400038000100000000000000'
    # Program header: PT_LOAD, R+X, offset 0, vaddr=paddr=0x400000, filesz=memsz=170, align 4K.
    hex+='010000000500000000000000000000000000400000000000'
    hex+='0000400000000000aa00000000000000aa000000000000000010000000000000'
    # Code (50 bytes).
    hex+='b8ad000000bf40040000be01000000ba010000000f054885c0780b'
    hex+='66ba4004b07bee31ffeb05bf01000000b83c0000000f05'
    local bytes=
    local i
    for ((i = 0; i < ${#hex}; i += 2)); do
        bytes+="\\x${hex:i:2}"
    done
    printf '%b' "$bytes" >"$1"
    chmod 0755 "$1"
    local size
    size=$(stat -c %s "$1")
    [ "$size" -eq 170 ] || { echo "$0: boot-timer helper is $size bytes, not 170" >&2; exit 1; }
}

# stage_bin STAGE SRC DEST: an executable with its shared libraries at the same absolute
# paths (so the loader's default search finds them without an ld.so.cache), the dynamic
# loader included; debug info is stripped.
stage_bin() {
    local stage=$1 src=$2 dest=$3 lib
    [ -f "$src" ] || { echo "$0: no such file: $src" >&2; exit 1; }
    mkdir -p "$stage$(dirname "$dest")"
    if command -v strip >/dev/null 2>&1 && strip --strip-debug -o "$stage$dest" "$src" 2>/dev/null; then
        :
    else
        # Not an ELF (a script stand-in) or no binutils: copy as is.
        cp "$src" "$stage$dest"
    fi
    chmod 0755 "$stage$dest"
    # ldd fails for static binaries and scripts: nothing to add then.
    local libs
    libs=$(ldd "$src" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }') || true
    for lib in $libs; do
        [ -e "$stage$lib" ] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

# stage_path STAGE SRC DEST: a file or directory copied as is (a directory's contents land in
# DEST; a DEST ending in / receives a file under its own name).
stage_path() {
    local stage=$1 src=$2 dest=$3
    [ -e "$src" ] || { echo "$0: no such file or directory: $src" >&2; exit 1; }
    if [ -d "$src" ]; then
        mkdir -p "$stage$dest"
        cp -RL "$src/." "$stage$dest/"
    else
        case $dest in
        */) dest=$dest$(basename "$src") ;;
        esac
        mkdir -p "$stage$(dirname "$dest")"
        cp -L "$src" "$stage$dest"
    fi
}

# stage_each FUNCTION STAGE SRC:DEST...: FUNCTION STAGE SRC DEST (stage_bin or stage_path)
# for each SRC:DEST, as the builders' --bin, --agent and --add options give them.
stage_each() {
    local fn=$1 stage=$2 spec
    shift 2
    for spec in "$@"; do
        "$fn" "$stage" "${spec%%:*}" "${spec#*:}"
    done
}

# stage_busybox_links STAGE: a symlink to /bin/busybox for every applet, at the paths
# `busybox --list-full` names (existing files win). For images whose root may be mounted
# read-only at boot, where `busybox --install` could not create them.
stage_busybox_links() {
    local stage=$1 applet
    while IFS= read -r applet; do
        [ -n "$applet" ] || continue
        if [ -e "$stage/$applet" ] || [ -L "$stage/$applet" ]; then
            continue
        fi
        mkdir -p "$stage/$(dirname "$applet")"
        ln -s /bin/busybox "$stage/$applet"
    done < <("$stage/bin/busybox" --list-full)
}

# stage_modules STAGE MODDIR DEST ROOT...: the modules ROOT... and everything they depend on,
# copied from MODDIR (fetch-kernel.sh's modules/, whose load-order lists dependencies first)
# to STAGE/DEST, with DEST/load-order in MODDIR's order. Module names treat '-' and '_' alike.
stage_modules() {
    local stage=$1 moddir=$2 dest=$3
    shift 3
    [ -f "$moddir/load-order" ] ||
        { echo "$0: no $moddir/load-order (run guest-kernel/fetch-kernel.sh)" >&2; exit 1; }
    local -A file_of=() wanted=()
    local f name deps dep m
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        name=${f%.ko}
        file_of[${name//-/_}]=$f
    done <"$moddir/load-order"
    # Iterative closure over the `depends=` field of each module's .modinfo section.
    local todo=("$@")
    while [ ${#todo[@]} -gt 0 ]; do
        m=${todo[0]//-/_}
        todo=("${todo[@]:1}")
        [ -n "${wanted[$m]:-}" ] && continue
        f=${file_of[$m]:-}
        if [ -z "$f" ] || [ ! -f "$moddir/$f" ]; then
            echo "$0: module $m is not in $moddir (add it to fetch-kernel.sh's roots)" >&2
            exit 1
        fi
        wanted[$m]=1
        deps=$(tr '\0' '\n' <"$moddir/$f" | sed -n 's/^depends=//p' | head -n 1)
        for dep in ${deps//,/ }; do
            todo+=("$dep")
        done
    done
    mkdir -p "$stage$dest"
    : >"$stage$dest/load-order"
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        name=${f%.ko}
        [ -n "${wanted[${name//-/_}]:-}" ] || continue
        cp "$moddir/$f" "$stage$dest/$f"
        echo "$f" >>"$stage$dest/load-order"
    done <"$moddir/load-order"
}
