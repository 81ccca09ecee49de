#!/usr/bin/env bash
# The sid (Nix 2.34) chroot: `tests/env/chroot.sh sid`, kept under its old name for its callers.
exec "$(dirname "$0")/chroot.sh" sid "$@"
