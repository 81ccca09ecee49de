#!/bin/sh
# Captures what real Nix (2.8 from Debian) sends a build hook, and what it makes of the hook's
# `@nix` lines: runs nix-build with hook_capture_hook.py as `build-hook` inside a private mount
# namespace over a throw-away tmpfs store (the machine's own /nix is untouched). Writes:
#   hook_capture_2.8.stdin   preamble + `try` + input paths + missing outputs, byte for byte
#   hook_capture_2.8.argc    the hook's argc and last argument (the verbosity)
#   hook_capture_2.8.drv     the .drv the `try` names
#   ../log/log_nix_2.8_build.jsonl   nix-build's own `--log-format internal-json` output
#   ../log/log_nix_2.8_nix_log.txt   `nix log` of the derivation afterwards
# Run as root. The nix-build itself fails by design (the hook exits 1).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
logs=$(cd "$here/../log" && pwd)
conf=$(mktemp -d)
trap 'rm -rf "$conf"' EXIT
cat > "$conf/nix.conf" <<CONF
build-hook = $here/hook_capture_hook.py
builders = ssh://capture-machine x86_64-linux
max-jobs = 0
substituters =
sandbox = false
build-users-group =
CONF
unset NIX_REMOTE
export NIX_CONF_DIR="$conf" CAPTURE_OUT="$here" LOG_LINES="$logs"
unshare -m --propagation private sh -eu -c '
  here=$1 logs=$2
  mount -t tmpfs tmpfs /nix
  mkdir -p /nix/store /nix/var/nix
  nix-build --log-format internal-json --no-out-link "$here/hook_capture.nix" \
    >/dev/null 2>"$logs/log_nix_2.8_build.jsonl" || true
  drv=$(ls /nix/store/*-captured.drv)
  cp "$drv" "$here/hook_capture_2.8.drv"
  chmod 0644 "$here/hook_capture_2.8.drv"
  nix --extra-experimental-features nix-command log "$drv" > "$logs/log_nix_2.8_nix_log.txt"
' sh "$here" "$logs"
ls -l "$here"/hook_capture_2.8.* "$logs"/log_nix_2.8_*
