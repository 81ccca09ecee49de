#!/usr/bin/env bash
# The quickstart (README.md's first command), as root on a fresh Debian 12 x86_64 machine:
# builds nix-lazy-builder and a tiny aarch64 NixOS-less builder VM from Debian packages, starts a
# private nix-daemon in its own mount namespace (your /nix is left alone) with nix-lazy-builder
# as its build hook and a lazy `qemu` builder for aarch64-linux, builds a derivation whose
# builder proves it ran on aarch64, shows the boot progress and `nix-lazy-builder status`, then
# waits until the idle VM is powered off. Everything it starts is stopped by pid at the end.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/.." && pwd)
IDLE_TIMEOUT=${IDLE_TIMEOUT:-15s}
IMAGE_DIR=${IMAGE_DIR:-/var/cache/nix-lazy-builder/quickstart/aarch64}

if [[ $(id -u) != 0 ]]; then
    echo "quickstart.sh must run as root (it starts a private nix-daemon in a mount namespace)" >&2
    exit 1
fi

T0=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n\033[1m==> %s\033[0m (at %s s)\n' "$1" "$(since "$T0")"; }

step "installing what this needs (Nix 2.8, QEMU, busybox; skipped when present)"
"$TOP/tests/env/provision.sh" --packages-only | grep -E '^(==|installing|all packages)' || true

step "building nix-lazy-builder (release)"
(cd "$TOP" && cargo build --release --locked --quiet)
BIN=$TOP/target/release/nix-lazy-builder

step "building the aarch64 builder VM from Debian packages (cached after the first run)"
"$TOP/examples/vm/make-image" --name aarch64 aarch64 "$IMAGE_DIR" | tail -n 3

WORK=$(mktemp -d /tmp/nlb-quickstart.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/nix" "$WORK/etc-nix" "$WORK/state"
NS=""
DAEMON=""

# Stops every process in the private namespace (the daemon, the supervisor, QEMU) by pid.
cleanup() {
    set +e
    if [[ -n $NS ]]; then
        for sig in TERM KILL; do
            for p in /proc/[0-9]*; do
                [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$NS" ]] && kill -s "$sig" "${p#/proc/}" 2>/dev/null
            done
            sleep 1
        done
    fi
    [[ -n $DAEMON ]] && wait "$DAEMON" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/etc-nix/nix.conf" <<EOF
build-users-group = nixbld
substituters =
sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=/bin/busybox
max-jobs = 1
builders =
build-hook = $BIN
EOF

# The image's generated builder config, plus where the supervisor keeps its state and how soon
# an idle VM is stopped.
{
    printf '[supervisor]\nstate-dir = "%s"\n\n' "$WORK/state"
    sed -e "/^host-key = /a idle-timeout = \"$IDLE_TIMEOUT\"\nboot-timeout = \"3m\"" \
        "$IMAGE_DIR/lazy-builder.toml"
} >"$WORK/lazy-builder.toml"

cat >"$WORK/hello.nix" <<'EOF'
{ n ? "1" }:
derivation {
  name = "hello-aarch64-${n}";
  system = "aarch64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo \"building on $(uname -m)\"; echo \"hello from $(uname -sm)\" > $out" ];
}
EOF

step "starting a private nix-daemon (build-hook = $BIN)"
mkdir -p /etc/nix
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    NIX_LAZY_BUILDER_CONFIG="$WORK/lazy-builder.toml" \
    NIX_LAZY_BUILDER_SUPERVISOR_LINGER_MS=5000 \
    unshare -m --propagation private sh -c '
        mount --bind "$1/nix" /nix && mount --bind "$1/etc-nix" /etc/nix && exec nix-daemon' \
    nlb-quickstart "$WORK" >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do
    nsenter -m -t "$DAEMON" test -S /nix/var/nix/daemon-socket/socket 2>/dev/null && break
    sleep 0.1
done
NS=$(readlink "/proc/$DAEMON/ns/mnt")
in_ns() { nsenter -m -t "$DAEMON" env NIX_REMOTE=daemon NIX_LAZY_BUILDER_CONFIG="$WORK/lazy-builder.toml" "$@"; }

step "nix-lazy-builder status before the build"
in_ns "$BIN" status

step "nix-build of an aarch64-linux derivation (the VM boots on demand)"
TB=$(date +%s.%N)
OUT=$(in_ns nix-build --no-out-link "$WORK/hello.nix")
BUILD_S=$(since "$TB")
echo "result: $OUT"
echo "contents: $(in_ns cat "$OUT")"
echo "nix-build took $BUILD_S s, including the boot"

step "a second build while the VM is up reuses it (no second boot)"
TB=$(date +%s.%N)
OUT2=$(in_ns nix-build --no-out-link "$WORK/hello.nix" --argstr n 2)
echo "result: $OUT2 ($(in_ns cat "$OUT2"))"
echo "nix-build took $(since "$TB") s on the running VM"

step "nix-lazy-builder status after the builds"
in_ns "$BIN" status
in_ns "$BIN" status --json | grep -q '"boots": 1,' || { echo "expected exactly one boot" >&2; exit 1; }

step "waiting for the idle VM to be powered off (idle-timeout = $IDLE_TIMEOUT)"
for _ in $(seq 240); do
    if in_ns "$BIN" status --json | grep -q '"state": "down"'; then
        break
    fi
    sleep 1
done
in_ns "$BIN" status
if ! in_ns "$BIN" status --json | grep -q '"state": "down"'; then
    echo "the VM was not stopped after idle" >&2
    exit 1
fi
grep -q aarch64 <<<"$(in_ns cat "$OUT")"
step "done: real aarch64 code built it, in a VM booted on demand and stopped when idle"
