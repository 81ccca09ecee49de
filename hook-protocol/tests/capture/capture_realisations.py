#!/usr/bin/env python3
"""Throw-away capture of a REAL nix-daemon's replies to RegisterDrvOutput (op 42) and
QueryRealisation (op 43), for hook-protocol's golden tests (not part of the product).

Run by capture_ca.sh once a remote Nix 2.34 store (with `experimental-features = ca-derivations`)
holds caB's outputs with their realisations and caA's output without one. Speaks the worker
protocol over `ssh ... nix-daemon --stdio` (the command line is passed after `--`) and records the
exact reply bytes of each step, one file per step, plus a manifest with what was sent, in the same
layout as capture.py's captures (it reuses capture.py's wire helpers).

    capture_realisations.py --client-version 1.35 --out DIR --have ID=OUTPATH --lack ID=OUTPATH
        --unknown-path BASENAME -- ssh ... nix-daemon --stdio
"""

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture import u64, ver, worker_stderr, wstr  # noqa: E402

TIMEOUT = 60.0


class Conn:
    """A recording reader over a child process's stdout (the same interface capture.Server has)."""

    def __init__(self, cmd, log):
        self.log = log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.rfd = self.proc.stdout.fileno()
        self.buf = b""
        self.recorded = b""

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_exact(self, n):
        deadline = time.monotonic() + TIMEOUT
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the daemon sent nothing for %ds" % TIMEOUT)
            r, _, _ = select.select([self.rfd], [], [], left)
            if r:
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    raise EOFError("the daemon closed its output")
                self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        self.recorded += out
        return out

    def take(self):
        out, self.recorded = self.recorded, b""
        return out

    def u64(self):
        return int.from_bytes(self.read_exact(8), "little")

    def bytes(self):
        n = self.u64()
        data = self.read_exact(n)
        self.read_exact((8 - n % 8) % 8)
        return data

    def str(self):
        return self.bytes().decode("utf-8", "replace")

    def strs(self):
        return [self.str() for _ in range(self.u64())]


def realisation_json(drv_output, out_path):
    """Exactly as Nix 2.34 writes a realisation: keys sorted, no spaces."""
    return json.dumps({"dependentRealisations": {}, "id": drv_output, "outPath": out_path,
                       "signatures": []}, sort_keys=True, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client-version", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--have", required=True, help="ID=OUTPATH of a realisation the daemon has")
    ap.add_argument("--lack", required=True, help="ID=OUTPATH: the path is valid, the realisation unknown")
    ap.add_argument("--unknown-path", required=True, help="a valid-looking basename the store lacks")
    ap.add_argument("cmd", nargs="+")
    args = ap.parse_args()
    have_id, have_path = args.have.split("=", 1)
    lack_id, lack_path = args.lack.split("=", 1)
    client_version = ver(args.client_version)

    log = tempfile.TemporaryFile()
    srv = Conn(args.cmd, log)
    steps = []

    def step(name, **info):
        steps.append(dict(name=name, bytes=srv.take(), **info))

    srv.send(u64(0x6E697863) + u64(client_version))
    assert srv.u64() == 0x6478696F
    server_version = srv.u64()
    v = min(server_version, client_version)
    features = u64(0) if v >= 0x126 else b""  # an empty feature list
    srv.send(features + u64(0) + u64(0))
    if v >= 0x126:
        srv.strs()
    nix_version = srv.str() if v >= 0x121 else None
    trust = srv.u64() if v >= 0x123 else None
    assert worker_stderr(srv, v) is None
    step("handshake", server_version="%d.%d" % (server_version >> 8, server_version & 0xFF),
         nix_version=nix_version, trust=trust)

    closed = []

    def op(name, req, reply, **info):
        if closed:
            return None
        srv.send(req)
        try:
            err = worker_stderr(srv, v)
            result = reply() if err is None else None
        except EOFError:
            # Recorded too: what the daemon sent before it hung up.
            closed.append(name)
            step(name, error=None, closed=True, **info)
            return None
        step(name, error=err, closed=False, **info)
        return result

    def register(drv_output, out_path):
        if v >= 0x11F:
            return u64(42) + wstr(realisation_json(drv_output, out_path))
        return u64(42) + wstr(drv_output) + wstr(out_path)

    # A realisation reply: a set of realisation JSON strings from 1.31, of out paths before.
    op("query-realisation-have", u64(43) + wstr(have_id), srv.strs, request={"id": have_id})
    op("query-realisation-lack", u64(43) + wstr(lack_id), srv.strs, request={"id": lack_id})
    op("register-drv-output-lack", register(lack_id, lack_path), lambda: None,
       request={"id": lack_id, "out_path": lack_path})
    op("query-realisation-registered", u64(43) + wstr(lack_id), srv.strs, request={"id": lack_id})
    bogus = lack_id.rsplit("!", 1)[0] + "!bogus"
    op("register-drv-output-unknown-path", register(bogus, args.unknown_path), lambda: None,
       request={"id": bogus, "out_path": args.unknown_path})
    # The connection is still in step after that error.
    op("is-valid-path", u64(1) + wstr("/nix/store/" + lack_path), srv.u64, request={"path": lack_path})
    if v >= 0x11F:
        # Not a Nix error but a JSON library exception: the daemon reports it and hangs up, so the
        # next request finds the connection closed.
        op("register-drv-output-bad-json", u64(42) + wstr("{not json"), lambda: None,
           request={"json": "{not json"})
        op("is-valid-path-after-bad-json", u64(1) + wstr("/nix/store/" + lack_path), srv.u64,
           request={"path": lack_path})

    try:
        srv.proc.stdin.close()
    except BrokenPipeError:
        pass
    rest = srv.buf + srv.proc.stdout.read()
    rc = srv.proc.wait(timeout=30)
    if rest:
        raise RuntimeError("unexpected trailing output: %r" % rest[:200])

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    manifest_steps = []
    for i, s in enumerate(steps):
        fname = "%02d-%s.bin" % (i, s["name"])
        with open(os.path.join(out, fname), "wb") as f:
            f.write(s["bytes"])
        manifest_steps.append(dict({k: x for k, x in s.items() if k != "bytes"}, file=fname,
                                   size=len(s["bytes"])))
    manifest = {
        "captured_by": "hook-protocol/tests/capture/capture_realisations.py",
        "protocol": "worker",
        "client_version": args.client_version,
        "negotiated": "%d.%d" % (v >> 8, v & 0xFF),
        "nix_version": nix_version,
        "have": {"id": have_id, "out_path": have_path},
        "lack": {"id": lack_id, "out_path": lack_path},
        "unknown_path": args.unknown_path,
        "server_exit_status": rc,
        "closed_after": closed[0] if closed else None,
        "steps": manifest_steps,
    }
    log.seek(0)
    with open(os.path.join(out, "server-stderr.txt"), "wb") as f:
        f.write(log.read())
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote %s (%d steps)" % (out, len(steps)))


if __name__ == "__main__":
    main()
