#!/bin/sh
# Throw-away build hook that records what nix-daemon gives a hook (tests/env/capture-hook; not part
# of the product). Started through the argv0 front (capture-hook). Per invocation it writes into
# $CAPTURE_DIR/hook.<pid>/: argv, fds and status (from the front), cwd, env, stat, namespaces, umask,
# the exact bytes of stdin (copied by a detached `cat`, which outlives the kill the daemon sends
# after a decline) and the replies it sent. It answers each burst of stdin data with the next word
# of $CAPTURE_DIR/mode (the last word repeats; default "decline"); `accept` is followed by the
# machine line `ssh://capture`, after which it waits for stdin to close and exits 1 (it builds
# nothing). POSIX sh: it also runs inside the Nix 2.34 chroot.
set -eu
dir=${CAPTURE_DIR:?CAPTURE_DIR must be set}
me=$$
out=$dir/hook.$me
mkdir -p "$out"
# argv, fds and /proc status as the daemon handed them over, recorded by the argv0 front.
for f in argv fds status; do
    [ -e "$dir/$f.$me" ] && mv "$dir/$f.$me" "$out/$f"
done

# Facts, gathered by child processes so that this shell opens no extra fds of its own. A failed
# fact must not kill the hook (the daemon would report "unexpected EOF reading a line").
set +e
readlink "/proc/$me/cwd" >"$out/cwd"
tr '\0' '\n' <"/proc/$me/environ" >"$out/env"
cat "/proc/$me/stat" >"$out/stat"
ppid=$(cut -d' ' -f4 <"/proc/$me/stat")
{
    for ns in mnt pid net uts ipc user; do
        printf '%s self=%s parent=%s\n' "$ns" "$(readlink "/proc/$me/ns/$ns")" "$(readlink "/proc/$ppid/ns/$ns")"
    done
    printf 'parent pid=%s cmdline=%s\n' "$ppid" "$(tr '\0' ' ' <"/proc/$ppid/cmdline")"
} >"$out/ns"
umask >"$out/umask"
id >"$out/id"
set -e

# Copy stdin in its own session, without fds 1-5 of the hook (they must not keep pipes open). An
# asynchronous command's stdin would be /dev/null, so hand it the pipe through fd 6.
exec 6<&0
setsid sh -c 'cat >"$1/stdin"; touch "$1/stdin.eof"' capture-cat "$out" \
    <&6 >/dev/null 2>/dev/null 3>&- 4>&- 5>&- 6<&- &
exec 6<&-

size() { wc -c 2>/dev/null <"$out/stdin" || echo 0; }
# wait_burst SEEN: wait until stdin has grown past SEEN bytes and then stayed unchanged for 0.3 s;
# print the new size. Returns 1 on EOF without new data.
wait_burst() {
    seen=$1 last=-1 still=0
    while :; do
        now=$(size)
        if [ "$now" -gt "$seen" ]; then
            if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0; fi
            [ "$still" -ge 3 ] && { echo "$now"; return 0; }
        elif [ -e "$out/stdin.eof" ]; then
            return 1
        fi
        last=$now
        sleep 0.1
    done
}

words=$(cat "$dir/mode" 2>/dev/null || echo decline)
seen=0 n=0
while seen=$(wait_burst "$seen"); do
    n=$((n + 1))
    word=$(echo $words | awk -v n="$n" '{ print (n <= NF) ? $n : $NF }')
    printf '%s after %s bytes: %s\n' "$(date +%s.%N)" "$seen" "$word" >>"$out/replies"
    if [ "$word" = accept ]; then
        printf '# accept\nssh://capture\n' >&2
        # The daemon now sends the inputs and outputs sets and closes stdin.
        while [ ! -e "$out/stdin.eof" ]; do sleep 0.1; done
        echo "capture-hook: this hook only records; it builds nothing" >&4
        exit 1
    fi
    printf '# %s\n' "$word" >&2
done
exit 0
