#!/usr/bin/env bash
# Runs a command in the sid (Nix 2.34) chroot: `tests/env/chroot-run.sh sid ...`, kept under its old
# name for its callers.
exec "$(dirname "$0")/chroot-run.sh" sid "$@"
