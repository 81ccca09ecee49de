#!/bin/sh
# Regenerates the golden .drv files with the machine's real Nix (2.8 on Debian bookworm), inside a
# private mount namespace over a throw-away tmpfs store, so the machine's own /nix is untouched.
# Run as root: hook-protocol/tests/data/drv/generate.sh  (writes <attr>.drv and paths.txt here).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
unset NIX_REMOTE
exec unshare -m --propagation private sh -eu -c '
  here=$1
  mount -t tmpfs tmpfs /nix
  mkdir -p /nix/store /nix/var/nix
  : > "$here/paths.txt"
  for attr in twoOutputs withInputs fixedRecursive fixedFlat escapes structured floatingCa deferred; do
    drv=$(nix-instantiate --option substituters "" \
      --option experimental-features "nix-command ca-derivations" \
      "$here/drv_golden.nix" -A "$attr" 2>/dev/null)
    cp "$drv" "$here/$attr.drv"
    chmod 0644 "$here/$attr.drv"
    echo "$attr $drv" >> "$here/paths.txt"
  done
  cat "$here/paths.txt"
' sh "$here"
