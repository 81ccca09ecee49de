#!/usr/bin/env bash
# Captures what a real nix-daemon gives its build hook, as golden data for hook-protocol's tests:
# for Nix 2.8 (the host's nix-bin) and Nix 2.34 (the sid chroot from tests/env/sid-chroot.sh), a
# private daemon (own mount namespace, a scratch dir bind-mounted over /nix) runs the throw-away
# capture hook (argv0.c + hook.sh) as `build-hook`, and nix-build sessions make it decline or accept.
# Writes <DEST>/nix-<version>/<session>.stdin (the exact bytes on the hook's stdin) and
# <session>.facts (argv, fds, env, ids, namespaces, the hook's replies, the client's output).
# Usage (root): capture.sh [DEST] [VERSION...]   (DEST default hook-protocol/tests/data/hook,
# VERSION: 2.8 and/or 2.34, default both). Re-running replaces the captures. Not part of the product.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
DEST=$(realpath -m "${1:-$REPO/hook-protocol/tests/data/hook}")
shift || true
VERSIONS=("$@")
((${#VERSIONS[@]})) || VERSIONS=(2.8 2.34)

# A fixed scratch path: the same expressions then give the same store paths in every run, and the
# same path is bound into the chroot so both versions see identical settings paths.
W=/tmp/nlb-hook-capture
CLEAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Start the daemon as a service manager would: default SIGINT/SIGQUIT (a `&` job of a script gets
# them ignored) and no fds but 0-2 (the caller's leaked fds would show up in the hook).
CLEAN_START=(perl -MPOSIX -e '$SIG{INT} = $SIG{QUIT} = "DEFAULT"; POSIX::close($_) for 3 .. 1023;
    exec { $ARGV[0] } @ARGV or die "exec $ARGV[0]: $!\n"' --)
DAEMON_PID=

cleanup() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

setup_work() { # setup_work VERSION
    local version=$1
    if awk '{print $5}' /proc/self/mountinfo | grep -q "^$W\(/\|$\)"; then
        echo "something is mounted below $W; refusing to reuse it" >&2
        exit 1
    fi
    rm -rf --one-file-system "$W"
    mkdir -p "$W"/{nix,conf,cap,hook,expr,home,log}
    gcc -static -O2 -Wall -o "$W/hook/capture-hook" "$HERE/argv0.c"
    cp "$HERE/hook.sh" "$W/hook/hook.sh"
    echo "ssh://capture x86_64-linux - 1 1 - - -" >"$W/conf/machines"
    # Build users of their own (tests/env/provision.sh / sid-chroot.sh), so local builds here never
    # share uids with a daemon another test runs at the same time.
    local users=nixrbldd
    [[ $version == 2.8 ]] || users=nixrbld
    cat >"$W/conf/nix.conf" <<CONF
build-users-group = $users
substituters =
trusted-public-keys =
sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=/bin/busybox
max-jobs = 0
builders = @$W/conf/machines
build-hook = $W/hook/capture-hook
CONF
    cat >"$W/expr/simple.nix" <<'NIX'
derivation {
  name = "capture-simple";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo simple > $out" ];
}
NIX
    cat >"$W/expr/two-outputs.nix" <<'NIX'
derivation {
  name = "capture-two-outputs";
  system = "x86_64-linux";
  builder = "/bin/sh";
  outputs = [ "out" "dev" ];
  input = builtins.toFile "capture-input.txt" "input for the capture\n";
  args = [ "-c" "cat $input > $out; echo dev > $dev" ];
}
NIX
    cat >"$W/expr/dep.nix" <<'NIX'
derivation {
  name = "capture-dep";
  system = "x86_64-linux";
  builder = "/bin/sh";
  src = builtins.toFile "capture-dep-src.txt" "dep source\n";
  args = [ "-c" "echo $src > $out" ];
}
NIX
    cat >"$W/expr/fod.nix" <<'NIX'
derivation {
  name = "capture-fod";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo fixed > $out" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "0c3071418e6356e614898c84ed064ca95e88551bc0811b534bdf1952ecdae534";
}
NIX
    cat >"$W/expr/with-deps.nix" <<'NIX'
derivation {
  name = "capture-with-deps";
  system = "x86_64-linux";
  builder = "/bin/sh";
  outputs = [ "out" "lib" ];
  dep = import ./dep.nix;
  fod = import ./fod.nix;
  extra = builtins.toFile "capture-extra.txt" "extra\n";
  requiredSystemFeatures = [ "capture-feature" "big-parallel" ];
  args = [ "-c" "cat $dep $fod $extra > $out; echo lib > $lib" ];
}
NIX
}

start_daemon() { # start_daemon VERSION
    local version=$1 sock=$W/nix/var/nix/daemon-socket/socket i
    local env=(env -i "PATH=$CLEAN_PATH" "HOME=$W/home" "NIX_CONF_DIR=$W/conf" "CAPTURE_DIR=$W/cap")
    if [[ $version == 2.8 ]]; then
        # shellcheck disable=SC2016
        setsid "${CLEAN_START[@]}" unshare -m --propagation private -- /bin/sh -ec \
            'mount --bind "$1" /nix; shift; exec "$@"' sh "$W/nix" "${env[@]}" nix-daemon \
            </dev/null >"$W/log/daemon.log" 2>&1 &
    else
        setsid "${CLEAN_START[@]}" "$REPO/tests/env/sid-run.sh" --tmpfs /tmp --bind "$W" "$W" --bind "$W/nix" /nix -- \
            "${env[@]}" nix-daemon </dev/null >"$W/log/daemon.log" 2>&1 &
    fi
    DAEMON_PID=$!
    for i in $(seq 100); do
        [[ -S $sock ]] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$W/log/daemon.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -S $sock ]] || { echo "nix-daemon $version did not create its socket" >&2; exit 1; }
    echo "nix-daemon $version: pid $DAEMON_PID, $(client "$version" nix-store --version)"
}

stop_daemon() {
    kill "$DAEMON_PID"
    wait "$DAEMON_PID" || true
    DAEMON_PID=
}

client() { # client VERSION CMD...: run CMD as a daemon client in the daemon's mount namespace
    local version=$1 root=()
    shift
    [[ $version == 2.8 ]] || root=(-r -w)
    nsenter -m "${root[@]}" -t "$DAEMON_PID" env -i "PATH=$CLEAN_PATH" "HOME=$W/home" \
        NIX_REMOTE=daemon "NIX_CONF_DIR=$W/conf" timeout 120 "$@"
}

# session VERSION NAME MODE [KEEP] -- NIX-BUILD-ARGS...: run one nix-build with the hook answering
# MODE (words for successive tries); with KEEP=keep, store the capture as NAME.{stdin,facts}.
session() {
    local version=$1 name=$2 mode=$3 keep=$4 rc=0 hooks h i out
    shift 5
    echo "$mode" >"$W/cap/mode"
    rm -rf "$W/cap"/hook.*
    client "$version" nix-build --no-out-link "$@" >"$W/log/$name.client" 2>&1 || rc=$?
    mapfile -t hooks < <(find "$W/cap" -maxdepth 1 -name 'hook.*' | sort)
    for h in "${hooks[@]}"; do
        for i in $(seq 100); do [[ -e $h/stdin.eof ]] && break; sleep 0.1; done
        [[ -e $h/stdin.eof ]] || { echo "$name: hook $h: stdin never closed" >&2; exit 1; }
    done
    echo "  $name: nix-build exit $rc, ${#hooks[@]} hook process(es), $(wc -c <"${hooks[0]}/stdin") bytes on stdin"
    [[ $keep == keep ]] || return 0
    if ((${#hooks[@]} != 1)); then
        echo "$name: expected exactly one hook process, got ${#hooks[@]}" >&2
        exit 1
    fi
    h=${hooks[0]}
    out=$DEST/nix-$version
    mkdir -p "$out"
    cp "$h/stdin" "$out/$name.stdin"
    {
        echo "# Capture '$name' from nix-daemon $version; made by tests/env/capture-hook/capture.sh"
        echo "## nix-build arguments"; printf '%s\n' "$*"
        echo "## hook replies (mode: $mode)"; sed 's/^[0-9.]* //' "$h/replies"
        echo "## nix-build exit code: $rc, output:"; sed "s/\x1b\[[0-9;]*m//g" "$W/log/$name.client"
        echo "## argv (one per line)"; cat "$h/argv"
        echo "## cwd"; cat "$h/cwd"
        echo "## id / umask"; cat "$h/id" "$h/umask"
        echo "## pid ppid pgrp session (from /proc/pid/stat)"; awk '{print $1, $4, $5, $6}' "$h/stat"
        echo "## status (at exec)"; grep -E '^(Umask|Uid|Gid|Groups|NoNewPrivs|SigBlk|SigIgn|SigCgt|CapEff|CapBnd|Seccomp):' "$h/status"
        echo "## namespaces (self vs the daemon worker that started the hook)"; cat "$h/ns"
        echo "## fds at exec: fd, FD_CLOEXEC, F_GETFL flags (octal: 01 write, 02 rdwr, 04000 nonblock, 0100000 largefile), target"
        cat "$h/fds"
        echo "## environment"; sort "$h/env"
    } >"$out/$name.facts"
}

for version in "${VERSIONS[@]}"; do
    echo "== Nix $version"
    setup_work "$version"
    start_daemon "$version"
    e=$W/expr
    # (a) decline: preamble + one try, then the build cannot start anywhere (max-jobs 0).
    session "$version" decline decline keep -- "$e/simple.nix"
    # (b) accept: a two-output derivation whose only input is a source path.
    session "$version" accept accept keep -- "$e/two-outputs.nix"
    # (c) decline, then built locally; trusted client options change the preamble and the try.
    session "$version" decline-j1 decline keep -- "$e/dep.nix" --max-jobs 1 -v \
        --option system-features "kvm capture-feature"
    # Build the fixed-output input locally too (not kept), then (d) accept with real inputs.
    session "$version" prebuild-fod decline no -- "$e/fod.nix" --max-jobs 1
    session "$version" accept-deps accept keep -- "$e/with-deps.nix"
    if [[ $version != 2.8 ]]; then
        # (e) build-hook with an extra argument (2.8 takes the setting as one path, so 2.34 only).
        session "$version" decline-hook-arg decline keep -- "$e/simple.nix" \
            --option build-hook "$W/hook/capture-hook capture-arg"
    fi
    cp "$W/log/daemon.log" "$W/log/daemon-$version.log"
    stop_daemon
done
echo "captures in $DEST"
