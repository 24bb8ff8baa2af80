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
# The staging helpers are in stage.sh (shared with the disk image builders).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pkg.sh
. "$here/pkg.sh"
# shellcheck source=stage.sh
. "$here/stage.sh"

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

stage_boot_timer "$stage/bin/aivmm-boot-timer"

stage_each stage_bin "$stage" ${bins[@]+"${bins[@]}"}
stage_each stage_path "$stage" ${adds[@]+"${adds[@]}"}

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
