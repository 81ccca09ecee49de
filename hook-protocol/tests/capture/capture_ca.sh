#!/usr/bin/env bash
# Throw-away capture of what REAL Nix sends and answers when content-addressed derivations are
# built remotely, as golden data for hook-protocol's tests (not part of the product).
#
# A private Nix 2.34 nix-daemon (the Debian sid chroot, tests/env/chroot-run.sh, scratch dirs
# bind-mounted over /nix) with `experimental-features = ca-derivations`, `max-jobs = 0` and Nix's
# OWN build hook builds two floating CA derivations (caB depends on caA, so the daemon hands the
# hook caB *resolved*) on a private Nix 2.34 remote reached over real sshd, once over ssh:// and
# once over ssh-ng://, and an input-addressed one over each scheme with
# `builders-use-substitutes`. The remote's `nix-store --serve --write` / `nix-daemon --stdio`
# runs through a `remote-program` wrapper that tees both directions, so every byte Nix's client
# sent and the remote answered is recorded. Then `nix copy --to ssh-ng://` copies caB's outputs
# with their realisations to a second, empty remote (RegisterDrvOutput, op 42), and
# capture_realisations.py asks that remote for realisations and registers one (ops 43 and 42)
# at worker 1.35 and 1.30.
#
# Writes DEST/nix-<version>/: per connection <session>.{client,server}.bin and <session>.argv,
# the realisations-<client version>/ step captures, and manifest.json (the local daemon's .drv
# files and realisations). What each file is, and what varies run to run:
# hook-protocol/tests/data/ca/README.md. Usage (root, under the integration-test lock: the
# remote builds with the chroot's nixrbld users):
#   flock /tmp/nlb-itest.lock hook-protocol/tests/capture/capture_ca.sh [DEST]
# DEST defaults to hook-protocol/tests/data/ca. About 15 s.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
DEST=$(realpath -m "${1:-$REPO/hook-protocol/tests/data/ca}")
RUN=$REPO/tests/env/chroot-run.sh
# Fixed, so the same expressions give the same store paths in every run.
W=/tmp/nlb-ca-capture
CLEAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PIDS=()

cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
if awk '{print $5}' /proc/self/mountinfo | grep -q "^$W\(/\|$\)"; then
    echo "something is mounted below $W; refusing to reuse it" >&2
    exit 1
fi
rm -rf --one-file-system "$W"
mkdir -p "$W"/{cap,expr,log,local/nix,local/conf,local/home}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The remote's programs, teeing both directions into $W/cap/<session named in $W/cap/next>.
for prog in nix-store nix-daemon; do
    cat >"$W/wrap-$prog" <<EOF
#!/bin/sh
n=\$(cat $W/cap/next).\$(date +%s%N)
echo "$prog \$*" >"$W/cap/\$n.argv"
tee "$W/cap/\$n.client.bin" | /usr/bin/$prog "\$@" | tee "$W/cap/\$n.server.bin"
EOF
    chmod +x "$W/wrap-$prog"
done

# start_remote NAME: a Nix 2.34 store reachable over sshd on 127.0.0.1.
start_remote() {
    local n=$1 D=$W/$1 port i
    mkdir -p "$D"/{nix,etc-nix,ssh,home}
    ssh-keygen -q -t ed25519 -N '' -C "$n-host" -f "$D/ssh/host_key"
    ssh-keygen -q -t ed25519 -N '' -C "$n-client" -f "$D/ssh/client_key"
    cp "$D/ssh/client_key.pub" "$D/ssh/authorized_keys"
    cat >"$D/etc-nix/nix.conf" <<EOF
build-users-group = nixrbld
experimental-features = ca-derivations
substituters =
sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=/bin/busybox
EOF
    port=$(free_port)
    cat >"$D/ssh/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $D/ssh/host_key
AuthorizedKeysFile $D/ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
SetEnv HOME=$D/home
EOF
    echo "$port" >"$D/port"
    # shellcheck disable=SC2016 # the inner shell expands $1
    setsid "$RUN" sid --tmpfs /tmp --bind "$W" "$W" --bind "$D/nix" /nix --bind "$D/etc-nix" /etc/nix \
        --tmpfs /run -- /bin/sh -ec 'mkdir -p /run/sshd; exec /usr/sbin/sshd -D -e -f "$1"' sh \
        "$D/ssh/sshd_config" </dev/null >"$W/log/$n-sshd.log" 2>&1 &
    PIDS+=($!)
    for i in $(seq 100); do
        ssh -p "$port" -i "$D/ssh/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
            -o LogLevel=ERROR root@127.0.0.1 true 2>/dev/null && break
        sleep 0.1
    done
    echo "remote $n: sshd on port $port"
}

# uri NAME SCHEME: the store URI of remote NAME through the teeing wrapper.
uri() {
    local D=$W/$1 prog=nix-store
    [[ $2 == ssh-ng ]] && prog=nix-daemon
    echo "$2://root@127.0.0.1?remote-program=$W/wrap-$prog&ssh-key=$D/ssh/client_key&base64-ssh-public-host-key=$(base64 -w0 <"$D/ssh/host_key.pub")"
}

start_remote builder
start_remote empty

cat >"$W/local/conf/nix.conf" <<EOF
build-users-group = nixbld
experimental-features = nix-command ca-derivations
substituters =
sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=/bin/busybox
max-jobs = 0
builders = @$W/local/conf/machines
EOF
: >"$W/local/conf/machines"
setsid "$RUN" sid --tmpfs /tmp --bind "$W" "$W" --bind "$W/local/nix" /nix --tmpfs /run -- \
    env -i "PATH=$CLEAN_PATH" "HOME=$W/local/home" "NIX_CONF_DIR=$W/local/conf" \
    "NIX_SSHOPTS=-p $(cat "$W/builder/port")" nix-daemon </dev/null >"$W/log/local-daemon.log" 2>&1 &
LOCAL=$!
PIDS+=("$LOCAL")
for i in $(seq 100); do [[ -S $W/local/nix/var/nix/daemon-socket/socket ]] && break; sleep 0.1; done
[[ -S $W/local/nix/var/nix/daemon-socket/socket ]] || { cat "$W/log/local-daemon.log" >&2; exit 1; }

client() { # client [ENV=V...] -- CMD...: a trusted client of the local daemon, in its namespace
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    nsenter -m -r -w -t "$LOCAL" env -i "PATH=$CLEAN_PATH" "HOME=$W/local/home" NIX_REMOTE=daemon \
        "NIX_CONF_DIR=$W/local/conf" "${envs[@]}" timeout 120 "$@"
}

cat >"$W/expr/ca.nix" <<'NIX'
{ tag }:
let
  caA = derivation {
    name = "capture-caA-${tag}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    args = [ "-c" "echo building caA ${tag}; echo caA ${tag} > $out" ];
  };
  caB = derivation {
    name = "capture-caB-${tag}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputs = [ "out" "dev" ];
    inherit caA;
    args = [ "-c" "echo building caB ${tag}; mkdir $out; echo $caA > $out/ref; cat $caA > $out/copy; echo dev > $dev" ];
  };
in { inherit caA caB; }
NIX
cat >"$W/expr/subst.nix" <<'NIX'
{ tag }:
derivation {
  name = "capture-subst-${tag}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  src = builtins.toFile "capture-subst-src-${tag}.txt" "input ${tag}\n";
  args = [ "-c" "cat $src > $out" ];
}
NIX

# build SESSION SCHEME EXPR TAG [nix-build args...]: one nix-build whose remote builds are captured.
build() {
    local session=$1 scheme=$2 expr=$3 tag=$4 rc=0
    shift 4
    local D=$W/builder prog=nix-store
    [[ $scheme == ssh-ng ]] && prog=nix-daemon
    # Key and host key as machine fields: Nix names a lock file after the URI, which must stay short.
    echo "$scheme://root@127.0.0.1?remote-program=$W/wrap-$prog x86_64-linux $D/ssh/client_key 1 1" \
        "ca-derivations - $(base64 -w0 <"$D/ssh/host_key.pub")" >"$W/local/conf/machines"
    echo "$session" >"$W/cap/next"
    client -- nix-build --no-out-link "$W/expr/$expr" --argstr tag "$tag" "$@" \
        >"$W/log/$session.client" 2>&1 || rc=$?
    echo "  $session: nix-build exit $rc"
    ((rc == 0)) || { cat "$W/log/$session.client" >&2; exit 1; }
}

build ssh ssh ca.nix ssh -A caB
build ssh-ng ssh-ng ca.nix ssh-ng -A caB
build subst-ssh ssh subst.nix subst-ssh --option builders-use-substitutes true
build subst-ssh-ng ssh-ng subst.nix subst-ssh-ng --option builders-use-substitutes true

# The local daemon's view: derivations (original and resolved), realisations, output paths.
drv_b=$(client -- nix-instantiate "$W/expr/ca.nix" --argstr tag ssh-ng -A caB)
drv_a=$(client -- nix-instantiate "$W/expr/ca.nix" --argstr tag ssh-ng -A caA)
echo copy-to-empty >"$W/cap/next"
client "NIX_SSHOPTS=-p $(cat "$W/empty/port")" -- nix copy --no-check-sigs --to "$(uri empty ssh-ng)" \
    "$drv_b^*" >"$W/log/copy.client" 2>&1 || { cat "$W/log/copy.client" >&2; exit 1; }
echo "  copy-to-empty: done"
# An output path without its realisation, for QueryRealisation to miss (not kept).
drv_a_ssh=$(client -- nix-instantiate "$W/expr/ca.nix" --argstr tag ssh -A caA)
client -- nix realisation info --json "$drv_b^*" "$drv_a^out" "$drv_a_ssh^out" >"$W/log/local-realisations.json"
# Whether the local daemon recorded caB's realisations after the ssh:// build (observed: `out`
# but not `dev`), kept in the manifest as found.
drv_b_ssh=$(client -- nix-instantiate "$W/expr/ca.nix" --argstr tag ssh -A caB)
for o in out dev; do
    client -- nix realisation info --json "$drv_b_ssh^$o" >"$W/log/caB-ssh-$o.json" \
        2>"$W/log/caB-ssh-$o.err" || true
done
real() { # real DRV OUTPUT: ID=OUTPATH of the local daemon's realisation of DRV^OUTPUT
    client -- nix realisation info --json "$1^$2" |
        python3 -c 'import json, sys; r = json.load(sys.stdin)[0]; print(r["id"] + "=" + r["outPath"])'
}
echo uncaptured >"$W/cap/next"
client "NIX_SSHOPTS=-p $(cat "$W/empty/port")" -- nix copy --no-check-sigs --to "$(uri empty ssh-ng)" \
    "/nix/store/$(real "$drv_a_ssh" out | cut -d= -f2)" >"$W/log/copy-opaque.client" 2>&1 ||
    { cat "$W/log/copy-opaque.client" >&2; exit 1; }
E=$W/empty
for cv in 1.35 1.30; do
    if [[ $cv == 1.35 ]]; then have=$(real "$drv_b" out) lack=$(real "$drv_a" out)
    else have=$(real "$drv_b" dev) lack=$(real "$drv_a_ssh" out); fi
    python3 "$HERE/capture_realisations.py" --client-version "$cv" --out "$W/steps/realisations-$cv" \
        --have "$have" --lack "$lack" --unknown-path 00000000000000000000000000000000-capture-unknown -- \
        ssh -p "$(cat "$E/port")" -i "$E/ssh/client_key" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1 nix-daemon --stdio
done

for tag in ssh ssh-ng; do
    for a in caA caB; do
        client -- nix-instantiate "$W/expr/ca.nix" --argstr tag "$tag" -A "$a" >>"$W/log/drvs.txt"
    done
done
mapfile -t drvs <"$W/log/drvs.txt"
# shellcheck disable=SC2016 # the inner shell expands $d
client -- sh -c 'for d in "$@"; do echo "$d"; cat "$d"; echo; done' sh "${drvs[@]}" \
    >"$W/log/drvs-aterm.txt"
client -- nix-store --version >"$W/log/version.txt"

version=$(awk '{print $NF}' "$W/log/version.txt")
out=$DEST/nix-$version
rm -rf "$out"
mkdir -p "$out"
cp -r "$W"/steps/* "$out/"
for f in "$W"/cap/*.client.bin; do
    [[ $(basename "$f") == uncaptured.* ]] && continue
    base=${f%.client.bin}
    name=$(basename "$base")
    name=${name%.*}
    # Connections of a session in the order they were opened: <session>, <session>-1, …
    n=$name
    i=1
    while [[ -e $out/$n.client.bin ]]; do n=$name-$i; i=$((i + 1)); done
    cp "$f" "$out/$n.client.bin"
    cp "$base.server.bin" "$out/$n.server.bin"
    cp "$base.argv" "$out/$n.argv"
done
python3 - "$W" "$out" <<'PY'
import json, os, sys
w, out = sys.argv[1:3]
drvs = {}
text = open(os.path.join(w, "log", "drvs-aterm.txt")).read().split("\n")
for path, aterm in zip(text[0::2], text[1::2]):
    if path:
        drvs[path] = aterm
manifest = {
    "captured_by": "hook-protocol/tests/capture/capture_ca.sh",
    "nix_version": open(os.path.join(w, "log", "version.txt")).read().split()[-1],
    "sessions": sorted(f[: -len(".client.bin")] for f in os.listdir(out) if f.endswith(".client.bin")),
    "derivations": drvs,
    "local_realisations": json.load(open(os.path.join(w, "log", "local-realisations.json"))),
    "caB_ssh_local_realisations": {},
}
for o in ("out", "dev"):
    text = open(os.path.join(w, "log", "caB-ssh-%s.json" % o)).read()
    err = open(os.path.join(w, "log", "caB-ssh-%s.err" % o)).read().strip().splitlines()
    manifest["caB_ssh_local_realisations"][o] = json.loads(text) if text.strip() else err[-1:]
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
PY
echo "captures in $out"
