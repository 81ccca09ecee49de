#!/bin/sh
# Fills fuzz/corpus/<target>/ with valid inputs to start from: the real captures of Nix 2.8 and
# 2.34 that hook-protocol's golden tests use, plus small hand-written configs. Run from
# anywhere; existing corpus files are kept (libFuzzer adds its own next to them).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../hook-protocol/tests/data"
c="$here/corpus"
mkdir -p "$c/hook_stream" "$c/aterm" "$c/serve_replies" "$c/worker_replies" \
         "$c/machines" "$c/toml_config"

n=0
for f in "$data"/hook/*/*.stdin "$data"/hook/*.stdin; do
  [ -f "$f" ] || continue
  n=$((n + 1)); cp "$f" "$c/hook_stream/capture-$n"
done
for f in "$data"/drv/*.drv; do
  cp "$f" "$c/aterm/$(basename "$f")"
done
# serve and worker targets: the first byte picks the protocol version (see the targets).
# Copies each .bin file of directory $1 to $3<its name>, with the version byte $2 in front.
with_version() {
  for f in "$1"*.bin; do
    { printf "$2"; cat "$f"; } > "$3$(basename "$f")"
  done
}
for d in "$data"/serve/*/; do
  with_version "$d" '\007' "$c/serve_replies/$(basename "$d")-"   # 2.7, as every capture negotiated
done
for d in "$data"/worker/*/; do
  case "$d" in
    *client-1.38*) v='\021' ;;   # 1.38
    *2.8.0*) v='\015' ;;         # 1.34
    *) v='\016' ;;               # 1.35
  esac
  with_version "$d" "$v" "$c/worker_replies/$(basename "$d")-"
done
# Content-addressed builds (Nix 2.34, tests/data/ca): the realisation operations' replies at 1.35
# and 1.30, and whole server streams (their handshake, and everything after it, as a start).
for d in "$data"/ca/*/realisations-*/; do
  case "$d" in
    *1.30*) v='	' ;;          # 1.30
    *) v='' ;;               # 1.35
  esac
  with_version "$d" "$v" "$c/worker_replies/ca-$(basename "$d")-"
done
for f in "$data"/ca/*/*.server.bin; do
  case "$f" in
    *ssh-ng*|*copy*) { printf ''; cat "$f"; } > "$c/worker_replies/ca-$(basename "$f")" ;;
    *) { printf ''; cat "$f"; } > "$c/serve_replies/ca-$(basename "$f")" ;;
  esac
done

key='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC root@b'
b64=$(printf '%s' "$key" | base64 -w0)
# machines: spec, 0xff 0x00, /m1, 0xff 0x00, /m2, 0xff 0x00, NIX_SSHOPTS
{
  printf 'ssh://root@127.0.0.1:2222 aarch64-linux /k 2 1.5 kvm,big-parallel - %s # c\n' "$b64"
  printf 'ssh-ng://b?remote-program=/bin/nix-daemon x86_64-linux - 4 - - benchmark -; @/m1'
  printf '\377\000user@host i686-linux\n@/m2\n\377\000@/m1\n\377\000-p 2222 -i /root/.ssh/id -o Port=22'
} > "$c/machines/table"

# The valid config with every backend that tests/it/bad_input mutates too.
sed "s|@HOST_KEY@|$key|g" "$here/../tests/fixtures/every-backend.toml" > "$c/toml_config/full.toml"
echo "seeded: $(find "$c" -type f | wc -l) files in $c"
