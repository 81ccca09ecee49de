#!/usr/bin/env python3
"""A FAULT INJECTOR around a real Nix remote program, for tests/it/fault/proxy.rs only.

It is started by the remote's sshd in place of `nix-store --serve --write` or
`nix-daemon --stdio` (the machines URI says `?remote-program=<wrapper>`, and the wrapper runs
this script), starts the REAL program with the same arguments, relays the hook's bytes to it
unchanged, and relays its replies back, corrupting the chosen one:

  truncate  the NAR that contains MARKER is cut off in the middle of MARKER: everything up to
            there is sent, then the connection ends (stdout closed, real program killed);
  corrupt   one byte of MARKER is changed in the NAR, everything else passes: the NAR keeps
            its length but no longer has the hash the path info vouches for;
  garbage   the first reply after the hook sent TRIGGER (the derivation's file name, which
            only the build request carries) is replaced by 64 bytes of garbage, and nothing the
            real program says afterwards is passed on.

usage: proxy.py MODE TRIGGER LOGFILE PROGRAM [ARGS...]
It appends one line to LOGFILE when it injects the fault (the test checks the fault happened).
"""

import os
import select
import subprocess
import sys
import threading

MARKER = b"NLB-FAULT-42-MARKER"
GARBAGE = b"GARBAGE!" * 8


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def log(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def main():
    mode, trigger, logfile, program, *args = sys.argv[1:]
    child = subprocess.Popen([program] + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    triggered = threading.Event()
    trig = trigger.encode()

    def upstream():
        tail = b""
        while True:
            try:
                data = os.read(0, 1 << 16)
            except OSError:
                break
            if not data:
                break
            window = tail + data
            if trig and trig in window:
                triggered.set()
            tail = window[-len(trig):] if trig else b""
            try:
                write_all(child.stdin.fileno(), data)
            except OSError:
                break
        try:
            child.stdin.close()
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()

    out = child.stdout.fileno()
    pending = b""
    hold = len(MARKER) - 1 if mode in ("truncate", "corrupt") else 0
    done = False
    while True:
        ready, _, _ = select.select([out], [], [], 0.02)
        if not ready:
            # Quiet: nothing can be completing a marker now, pass on what was held back.
            if pending:
                write_all(1, pending)
                pending = b""
            continue
        data = os.read(out, 1 << 16)
        if not data:
            break
        if mode == "garbage" and not done and triggered.is_set():
            write_all(1, pending + GARBAGE)
            pending = b""
            done = True
            log(logfile, "garbage: replaced a %d-byte reply with %d bytes of garbage" % (len(data), len(GARBAGE)))
            # Swallow whatever the real program says from now on.
            while os.read(out, 1 << 16):
                pass
            break
        buf = pending + data
        i = buf.find(MARKER) if not done else -1
        if i >= 0 and mode == "truncate":
            cut = i + len(MARKER) // 2
            write_all(1, buf[:cut])
            log(logfile, "truncate: cut the NAR off inside the marker")
            os.close(1)
            child.kill()
            child.wait()
            return 0
        if i >= 0 and mode == "corrupt":
            buf = buf[:i] + MARKER.replace(b"MARKER", b"MARKEX") + buf[i + len(MARKER):]
            done = True
            log(logfile, "corrupt: changed one byte of the marker")
        keep = 0 if done else min(hold, len(buf))
        write_all(1, buf[: len(buf) - keep])
        pending = buf[len(buf) - keep:]
    if pending:
        write_all(1, pending)
    os.close(1)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
