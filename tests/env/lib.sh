# shellcheck shell=bash
# Shared shell helpers for tests/env/*.sh (sourced, not run): the Debian mirror from the machine's
# own apt configuration, where each cached chroot lives, and elapsed-time formatting. Never
# hard-code a mirror host.

# The URI of the main Debian archive: the first `URIs:` line of debian.sources whose stanza is not
# a -security suite.
debian_mirror() {
    local src=/etc/apt/sources.list.d/debian.sources uri
    uri=$(awk '
        /^[[:space:]]*$/ { if (u != "" && !sec) { print u; exit } u=""; sec=0; next }
        /^URIs:/ { u=$2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i ~ /-security$/) sec=1 }
        END { if (u != "" && !sec) print u }
    ' "$src" | head -n 1)
    if [[ -z "$uri" ]]; then
        echo "no Debian archive URI found in $src" >&2
        return 1
    fi
    echo "$uri"
}

# elapsed START END: seconds between two `date +%s.%N` stamps, one decimal.
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'
}

# chroot_dir SUITE: where tests/env/chroot.sh caches the Debian SUITE chroot: $NLB_<SUITE>_CHROOT
# (e.g. NLB_SID_CHROOT, NLB_TRIXIE_CHROOT) or /var/cache/nix-lazy-builder/chroot-<suite>.
chroot_dir() {
    local var
    var="NLB_$(tr '[:lower:]' '[:upper:]' <<<"$1")_CHROOT"
    echo "${!var:-/var/cache/nix-lazy-builder/chroot-$1}"
}
