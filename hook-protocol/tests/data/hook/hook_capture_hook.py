#!/usr/bin/python3
# Throw-away build hook used only by hook_capture.sh: records every byte the daemon writes on
# stdin (preamble, the first `try`, and what follows `# accept`), accepts the first `try`, then
# exits 1 so nothing is ever built. Output goes to $CAPTURE_OUT. To check that the daemon takes
# the `@nix` lines hook-protocol encodes, it writes $LOG_LINES/log_hook_before_accept.txt to
# stderr before `# accept`, log_hook_after_accept.txt after it, and one plain line to fd 4.
import os
import struct
import sys

out = os.environ["CAPTURE_OUT"]
lines = os.environ["LOG_LINES"]
buf = bytearray()


def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    buf.extend(data)
    return data


def u64():
    return struct.unpack("<Q", read(8))[0]


def string():
    n = u64()
    data = read(n)
    read((8 - n % 8) % 8)
    return data


try:
    while u64() == 1:
        string()
        string()
    assert string() == b"try"
    u64()
    string()
    string()
    for _ in range(u64()):
        string()
    with open(lines + "/log_hook_before_accept.txt", "rb") as f:
        os.write(2, f.read())
    os.write(2, b"# accept\nssh://capture-machine\n")
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf.extend(chunk)
    with open(lines + "/log_hook_after_accept.txt", "rb") as f:
        os.write(2, f.read())
    os.write(4, b"plain line on fd 4\n")
finally:
    with open(out + "/hook_capture_2.8.stdin", "wb") as f:
        f.write(buf)
    with open(out + "/hook_capture_2.8.argc", "w") as f:
        f.write("%d\n%s\n" % (len(sys.argv), sys.argv[-1]))
sys.exit(1)
