#!/usr/bin/env bash
# Provisions a fresh Debian 12 machine (as root) with everything the tests need, idempotently:
# Debian packages (Nix 2.8, OpenSSH, busybox, dropbear, QEMU, tmux, ...), build users for the tests'
# "remote" stores, and the cached Debian chroots with newer Nix (tests/env/chroot.sh): sid with Nix
# 2.34 and trixie with Nix 2.26. Prints how long each part took. Safe to run again: parts that are
# already done are skipped.
#
# Build users created here (no login, no home, system uids):
#   group nixrbld   users nixrbld1..nixrbld8     the usual remote store
#   group nixrblda  users nixrblda1..nixrblda4   extra remote stores that run at the same time:
#   group nixrbldb  users nixrbldb1..nixrbldb4   give each store its own group (Nix kills every
#   group nixrbldc  users nixrbldc1..nixrbldc4   process of a build uid before it uses it, so two
#   group nixrbldd  users nixrbldd1..nixrbldd4   stores sharing users kill each other's builds)
# The local daemon keeps Debian's own nixbld group (nixbld1..10).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/lib.sh
. "$HERE/lib.sh"

if [[ $(id -u) != 0 ]]; then
    echo "provision.sh must run as root" >&2
    exit 1
fi

# --packages-only: just the Debian packages (what examples/quickstart.sh needs), no test build
# users and no chroots.
PACKAGES_ONLY=false
[[ ${1:-} == --packages-only ]] && PACKAGES_ONLY=true

export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(nix-bin openssh-server openssh-client busybox-static debootstrap dropbear-bin cpio
    iproute2 hyperfine python3 tmux)
QEMU_PACKAGES=(qemu-system-x86 qemu-system-arm)
# C compilers for both guest architectures: examples/vm/make-image compiles the guest agent.
case $(dpkg --print-architecture) in
amd64) APT_PACKAGES+=(gcc libc6-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
arm64) APT_PACKAGES+=(gcc libc6-dev gcc-x86-64-linux-gnu libc6-dev-amd64-cross) ;;
esac
BACKPORTS_SOURCE=/etc/apt/sources.list.d/nix-lazy-builder-backports.sources

T_ALL=$(date +%s.%N)
part_start() { T_PART=$(date +%s.%N); echo "== $1"; }
part_end() { echo "== $1: $(elapsed "$T_PART" "$(date +%s.%N)") s"; }

# Packages from the list that are not installed yet.
missing() {
    local p
    for p in "$@"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
            echo "$p"
        fi
    done
}

# Does any apt source already offer <codename>-backports?
have_backports_source() {
    grep -rqsE "^[^#]*(Suites:.*[[:space:]]|deb .*[[:space:]])bookworm-backports([[:space:]]|$)" \
        /etc/apt/sources.list /etc/apt/sources.list.d/
}

# --- packages -------------------------------------------------------------------------------------
part_start "apt packages"
mapfile -t todo < <(missing "${APT_PACKAGES[@]}")
mapfile -t todo_qemu < <(missing "${QEMU_PACKAGES[@]}")

# bookworm's qemu-system 7.2 conflicts with a qemu-utils from bookworm-backports (this image ships
# qemu-utils 10.0); then qemu-system must come from backports too.
qemu_from_backports=false
if [[ $(dpkg-query -W -f='${Status} ${Version}' qemu-utils 2>/dev/null) == "install ok installed "*"~bpo"* ]]; then
    qemu_from_backports=true
fi

if ((${#todo[@]} + ${#todo_qemu[@]})); then
    created_policy=false
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Keep openssh-server's postinst from starting a system sshd on 0.0.0.0:22.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=true
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if ((${#todo_qemu[@]})) && $qemu_from_backports && ! have_backports_source; then
        mirror=$(debian_mirror)
        cat >"$BACKPORTS_SOURCE" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        echo "added $BACKPORTS_SOURCE ($mirror)"
    fi
    apt-get update -q
    if ((${#todo[@]})); then
        echo "installing: ${todo[*]}"
        apt-get install -y -q "${todo[@]}"
    fi
    if ((${#todo_qemu[@]})); then
        echo "installing: ${todo_qemu[*]} (backports: $qemu_from_backports)"
        if $qemu_from_backports; then
            apt-get install -y -q -t bookworm-backports "${todo_qemu[@]}"
        else
            apt-get install -y -q "${todo_qemu[@]}"
        fi
    fi
    if $created_policy; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
else
    echo "all packages already installed"
fi
part_end "apt packages"

if $PACKAGES_ONLY; then
    echo "provision total: $(elapsed "$T_ALL" "$(date +%s.%N)") s"
    exit 0
fi

# --- build users for remote stores -----------------------------------------------------------------
part_start "build users"
ensure_group() { # ensure_group GROUP COUNT: GROUP with users GROUP1..GROUP<COUNT>
    local group=$1 count=$2 i user
    getent group "$group" >/dev/null || groupadd --system "$group"
    for i in $(seq 1 "$count"); do
        user=$group$i
        if ! getent passwd "$user" >/dev/null; then
            useradd --system -g "$group" -M -N -d /var/empty -s /usr/sbin/nologin \
                -c "nix-lazy-builder test build user" "$user"
        fi
        # Nix finds build users through the group's member list, not the primary gid.
        if ! getent group "$group" | cut -d: -f4 | tr ',' '\n' | grep -qx "$user"; then
            gpasswd -a "$user" "$group" >/dev/null
        fi
    done
}
ensure_group nixrbld 8
for g in a b c d; do
    ensure_group "nixrbld$g" 4
done
part_end "build users"

# --- chroots with newer Nix (cached; built only when missing) ----------------------------------------
for suite in sid:2.34 trixie:2.26; do
    part_start "${suite%%:*} chroot (Nix ${suite#*:})"
    "$HERE/chroot.sh" "${suite%%:*}"
    part_end "${suite%%:*} chroot (Nix ${suite#*:})"
done

echo "provision total: $(elapsed "$T_ALL" "$(date +%s.%N)") s"
