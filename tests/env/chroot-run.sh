#!/usr/bin/env bash
# Runs a command inside the cached Debian SUITE chroot (sid: Nix 2.34, trixie: Nix 2.26; made by
# tests/env/chroot.sh SUITE) in a private mount namespace: the chroot root is bind-mounted onto
# itself (Nix's sandbox refuses a root that is not a mount point), /proc is mounted and /dev and
# /sys are bound, plus any
#   --bind HOST_DIR CHROOT_DIR   (recursive bind of a host directory onto a chroot path)
#   --tmpfs CHROOT_DIR           (a fresh tmpfs on a chroot path)
# mounts you ask for. Every step execs, so the command keeps this script's pid: start it in the
# background and reach its namespace with `nsenter -m -t $!`. Nothing leaks onto the host's mounts.
# Usage: chroot-run.sh SUITE [--bind SRC DST]... [--tmpfs DST]... [--] CMD [ARG...]
set -euo pipefail

USAGE="usage: chroot-run.sh SUITE [--bind SRC DST]... [--tmpfs DST]... [--] CMD [ARG...]"
SUITE=${1:-}
[[ $SUITE =~ ^[a-z]+$ ]] || { echo "$USAGE" >&2; exit 2; }
shift
# shellcheck source=tests/env/lib.sh
. "$(dirname "$0")/lib.sh"
ROOT=$(chroot_dir "$SUITE")
if [[ ! -f "$ROOT/.ready" ]]; then
    echo "$SUITE chroot not ready at $ROOT (run tests/env/chroot.sh $SUITE)" >&2
    exit 1
fi

mounts=()
while (($#)); do
    case $1 in
    --bind)
        (($# >= 3)) || { echo "--bind needs SRC DST" >&2; exit 2; }
        mounts+=(bind "$(realpath "$2")" "$3")
        shift 3
        ;;
    --tmpfs)
        (($# >= 2)) || { echo "--tmpfs needs DST" >&2; exit 2; }
        mounts+=(tmpfs - "$2")
        shift 2
        ;;
    --)
        shift
        break
        ;;
    *) break ;;
    esac
done
(($#)) || { echo "$USAGE" >&2; exit 2; }

# shellcheck disable=SC2016 # the inner script expands its own variables
exec unshare -m --propagation private -- /bin/bash -euc '
    root=$1 n=$2
    shift 2
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    while ((n > 0)); do
        kind=$1 src=$2 dst=$root/${3#/}
        shift 3
        n=$((n - 1))
        mkdir -p "$dst"
        if [[ $kind == bind ]]; then mount --rbind "$src" "$dst"; else mount -t tmpfs tmpfs "$dst"; fi
    done
    cd /
    exec chroot "$root" "$@"
' "$SUITE-run" "$ROOT" $((${#mounts[@]} / 3)) "${mounts[@]}" "$@"
