#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build a busybox-static initramfs for aivmm guests.
#
#   guest-kernel/build-initramfs.sh OUT [--agent PATH] [--bin SRC:DEST]... [--add SRC:DEST]...
#                                       [--init PATH]
#
#   OUT            the archive: gzip-compressed when it ends in .gz, a plain newc cpio otherwise
#   --agent PATH   the guest agent, installed as /bin/ai-agent (init starts `ai-agent daemon`)
#   --bin SRC:DEST an executable, with every shared library it needs (found with ldd) copied
#                  to the same paths, the dynamic loader included; debug info is stripped
#   --add SRC:DEST a file or directory copied as is (a directory's contents land in DEST;
#                  a DEST ending in / receives the file under its own name)
#   --init PATH    the init to install as /init (default: guest-kernel/init)
#
# Every image also gets /bin/aivmm-boot-timer, a 170-byte static program that writes the
# boot-timer byte (0x7b to port 0x440): Debian's kernel has no /dev/port to do it from sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pkg.sh
. "$here/pkg.sh"

usage() {
    sed -n '4,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

[ $# -ge 1 ] || usage
out=$1
shift
init=$here/init
bins=()
adds=()
while [ $# -gt 0 ]; do
    case $1 in
    --agent) bins+=("${2:?--agent needs a path}:/bin/ai-agent"); shift 2 ;;
    --bin) bins+=("${2:?--bin needs SRC:DEST}"); shift 2 ;;
    --add) adds+=("${2:?--add needs SRC:DEST}"); shift 2 ;;
    --init) init=${2:?--init needs a path}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
done

busybox=$(static_busybox)
need_cmd cpio cpio

stage=$(mktemp -d "${TMPDIR:-/tmp}/aivmm-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc}
chmod 1777 "$stage/tmp"
cp "$busybox" "$stage/bin/busybox"
install -m 0755 "$init" "$stage/init"
# The kernel opens /dev/console for init's stdio before init can mount devtmpfs. Creating
# the node needs root; without it the init reopens the console itself.
mknod -m 0600 "$stage/dev/console" c 5 1 2>/dev/null || true
mknod -m 0666 "$stage/dev/null" c 1 3 2>/dev/null || true

# The boot-timer helper, assembled by hand (x86-64 ELF, one PT_LOAD at 0x400000, entry at
# file offset 0x78):
#   mov eax,173; mov edi,0x440; mov esi,1; mov edx,1; syscall   ; ioperm(0x440, 1, 1)
#   test rax,rax; js fail
#   mov dx,0x440; mov al,0x7b; out dx,al; xor edi,edi; jmp exit
#   fail: mov edi,1
#   exit: mov eax,60; syscall                                     ; exit(edi)
write_boot_timer() {
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
write_boot_timer "$stage/bin/aivmm-boot-timer"

# Copy an executable and its shared libraries (same absolute paths, so the loader's
# default search finds them without an ld.so.cache).
add_bin() {
    local src=$1 dest=$2 lib
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

add_path() {
    local src=$1 dest=$2
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

for spec in ${bins[@]+"${bins[@]}"}; do
    add_bin "${spec%%:*}" "${spec#*:}"
done
for spec in ${adds[@]+"${adds[@]}"}; do
    add_path "${spec%%:*}" "${spec#*:}"
done

mkdir -p "$(dirname "$out")"
tmp=$out.tmp.$$
# Sorted names and root ownership: the same inputs give the same archive.
(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$tmp.cpio"
case $out in
*.gz) gzip -6 -n <"$tmp.cpio" >"$tmp" && rm -f "$tmp.cpio" ;;
*) mv "$tmp.cpio" "$tmp" ;;
esac
mv "$tmp" "$out"
echo "$out ($(stat -c %s "$out") bytes)"
