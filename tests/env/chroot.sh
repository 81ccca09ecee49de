#!/usr/bin/env bash
# Builds (once) and caches a Debian chroot of suite SUITE with that suite's Nix (nix-bin), openssh
# and busybox-static, for the tests' newer Nix versions: `sid` gives Nix 2.34, `trixie` Nix 2.26.
# The chroot lives at $NLB_<SUITE>_CHROOT (e.g. NLB_SID_CHROOT; default
# /var/cache/nix-lazy-builder/chroot-<suite>) and is only usable once its `.ready` marker exists (it
# holds the `nix-store --version` line); if the marker is there, this script does nothing. The
# chroot's build users (groups `nixbld` and `nixrbld`, 8 users each) get uids and gids that collide
# with nothing on the host nor in the other cached chroots, so daemons of different versions can
# build at the same time. Run as root. Run things inside it with tests/env/chroot-run.sh SUITE.
# Usage: chroot.sh SUITE
set -euo pipefail

SUITE=${1:-}
if [[ ! $SUITE =~ ^[a-z]+$ ]]; then
    echo "usage: chroot.sh SUITE   (a Debian suite name: sid, trixie)" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/lib.sh
. "$HERE/lib.sh"
DEST=$(chroot_dir "$SUITE")
PARTIAL="$DEST.partial"
CACHE=$(dirname "$DEST")

if [[ -f "$DEST/.ready" ]]; then
    echo "$SUITE chroot ready at $DEST: $(cat "$DEST/.ready")"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "chroot.sh must run as root" >&2
    exit 1
fi
MIRROR=$(debian_mirror)

# Refuse to delete anything that still has something mounted below it.
no_mounts_below() {
    local dir
    dir=$(realpath -m "$1")
    if awk '{print $5}' /proc/self/mountinfo | grep -q "^$dir\(/\|$\)"; then
        echo "refusing to remove $dir: something is mounted below it" >&2
        exit 1
    fi
}
for stale in "$PARTIAL" "$DEST"; do
    if [[ -e "$stale" ]]; then
        no_mounts_below "$stale"
        rm -rf --one-file-system "$stale"
    fi
done
mkdir -p "$CACHE"

t0=$(date +%s.%N)
debootstrap --variant=minbase "$SUITE" "$PARTIAL" "$MIRROR" >"$CACHE/debootstrap-$SUITE.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap-$SUITE.log" >&2; exit 1; }
t1=$(date +%s.%N)
echo "debootstrap $SUITE: $(elapsed "$t0" "$t1") s"

# The mirror may be a frozen snapshot whose Release files have expired.
echo 'Acquire::Check-Valid-Until "false";' >"$PARTIAL/etc/apt/apt.conf.d/99no-check-valid-until"
# Keep services from starting inside the chroot while packages install.
printf '#!/bin/sh\nexit 101\n' >"$PARTIAL/usr/sbin/policy-rc.d"
chmod 755 "$PARTIAL/usr/sbin/policy-rc.d"

# apt runs in a private mount namespace so /proc and /dev never leak onto the host. openssh-client
# is named: sid's openssh-server no longer pulls it in, and Nix's own hook needs `ssh`.
# shellcheck disable=SC2016 # the inner script expands its own variables
unshare -m --propagation private -- /bin/sh -euc '
    root=$1
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        /bin/sh -euc "apt-get update -q && apt-get install -y -q --no-install-recommends nix-bin openssh-server openssh-client busybox-static && apt-get clean"
' sh "$PARTIAL" >"$CACHE/apt-$SUITE.log" 2>&1 \
    || { tail -n 30 "$CACHE/apt-$SUITE.log" >&2; exit 1; }
rm -f "$PARTIAL/usr/sbin/policy-rc.d"
rm -rf "$PARTIAL/var/lib/apt/lists/"*
t2=$(date +%s.%N)
echo "apt-get install in $SUITE chroot: $(elapsed "$t1" "$t2") s"

# Build users: the chroot's own /etc/passwd and /etc/group. Give `nixbld` (the packaged group) and a
# second group `nixrbld` (for a second store of this version at the same time) ids that are free
# on the host, in this chroot and in every other cached chroot beside it (a sid and a trixie
# daemon sharing a build uid would kill each other's builds).
free_id() { # free_id KIND START: first id >= START unused on host and in the chroots (KIND passwd|group)
    local kind=$1 id=$2
    while getent "$kind" "$id" >/dev/null \
        || cut -d: -f3 "$PARTIAL/etc/$kind" "$CACHE"/chroot-*/etc/"$kind" 2>/dev/null | grep -qx "$id"; do
        id=$((id + 1))
    done
    echo "$id"
}
remake_group() { # remake_group NAME GID_START UID_START COUNT
    local name=$1 gid uid i user old_gid
    old_gid=$(awk -F: -v g="$name" '$1==g {print $3}' "$PARTIAL/etc/group")
    # Drop the packaged users and group of this name, then recreate them.
    for user in $(awk -F: -v g="$name" '$1==g {print $4}' "$PARTIAL/etc/group" | tr ',' ' '); do
        chroot "$PARTIAL" userdel "$user"
    done
    if grep -q "^$name:" "$PARTIAL/etc/group"; then
        chroot "$PARTIAL" groupdel "$name"
    fi
    gid=$(free_id group "$2")
    chroot "$PARTIAL" groupadd -g "$gid" "$name"
    uid=$3
    for i in $(seq 1 "$4"); do
        uid=$(free_id passwd "$uid")
        chroot "$PARTIAL" useradd -u "$uid" -g "$name" -G "$name" -M -N -d /var/empty \
            -s /usr/sbin/nologin -c "Nix build user $i" "$name$i"
        uid=$((uid + 1))
    done
    if [[ -n "$old_gid" && -d "$PARTIAL/nix" ]]; then
        find "$PARTIAL/nix" -xdev -gid "$old_gid" -exec chgrp -h "$gid" {} +
    fi
}
remake_group nixbld 30000 30001 8
remake_group nixrbld 30100 30101 8

# nix-store needs /proc (it reads /proc/self/exe).
# shellcheck disable=SC2016 # the inner script expands its own variables
version=$(unshare -m --propagation private -- /bin/sh -euc '
    mount -t proc proc "$1/proc"
    chroot "$1" /usr/bin/nix-store --version
' sh "$PARTIAL")
echo "$version" >"$PARTIAL/.ready"
mv "$PARTIAL" "$DEST"
t3=$(date +%s.%N)
echo "$SUITE chroot ready at $DEST: $version (total $(elapsed "$t0" "$t3") s, $(du -sm "$DEST" | cut -f1) MB)"
