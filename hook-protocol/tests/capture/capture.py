#!/usr/bin/env python3
"""Throw-away capture client for the hook-protocol golden tests (not part of the product).

Talks to a REAL `nix-store --serve --write` or `nix-daemon --stdio`, run as root inside a private
mount namespace over a tmpfs /nix (the machine's own /nix is never touched), drives a realistic
session (handshake, valid-path queries, uploads, path infos, NAR download, builds that succeed and
fail) and records the exact bytes of every server reply, one file per step, plus a manifest with
what was sent and what the replies must say.

The checked-in captures were made with (from the repository root, as root):

    P=hook-protocol/tests; C=$P/capture/capture.py
    $C --nix host --protocol serve  --out $P/data/serve
    $C --nix host --protocol worker --out $P/data/worker
    $C --nix sid  --protocol serve  --out $P/data/serve
    $C --nix sid  --protocol worker --out $P/data/worker
    $C --nix sid  --protocol worker --client-version 1.38 \
       --client-features realisation-with-path-not-hash --suffix client-1.38 --out $P/data/worker

`--nix host` runs the machine's Nix (2.8 on Debian bookworm); `--nix sid` runs Nix from the
Debian sid chroot through tests/env/sid-run.sh. Output goes to OUT/nix-<version>[-<suffix>]/.
Run as root. The Rust side (tests/serve_golden.rs, tests/worker_golden.rs) decodes the files.
"""

import argparse
import base64
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TIMEOUT = 180.0

# ----------------------------------------------------------------------------------------------
# Wire primitives


def u64(v):
    return int(v).to_bytes(8, "little")


def pad(n):
    return b"\0" * ((8 - n % 8) % 8)


def wstr(s):
    if isinstance(s, str):
        s = s.encode()
    return u64(len(s)) + s + pad(len(s))


def wstrs(items):
    return u64(len(items)) + b"".join(wstr(s) for s in items)


NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix32(data):
    n_chars = (len(data) * 8 + 4) // 5
    out = []
    for n in range(n_chars - 1, -1, -1):
        b = n * 5
        i, j = b // 8, b % 8
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(NIX32[c & 31])
    return "".join(out)


def compress_hash(h, size):
    out = bytearray(size)
    for i, b in enumerate(h):
        out[i % size] ^= b
    return bytes(out)


def fake_path(seed, name):
    """An input-addressed-looking store path with a deterministic hash part."""
    return "/nix/store/%s-%s" % (nix32(hashlib.sha256(seed.encode()).digest()[:20]), name)


def ca_source_path(nar_sha256, name):
    """makeFixedOutputPath for recursive sha256 without references (the "source" type)."""
    fp = "source:sha256:%s:/nix/store:%s" % (nar_sha256.hex(), name)
    return "/nix/store/%s-%s" % (nix32(compress_hash(hashlib.sha256(fp.encode()).digest(), 20)), name)


# ----------------------------------------------------------------------------------------------
# NARs


def nar_node(node):
    kind = node[0]
    if kind == "file":
        _, contents, executable = node
        out = wstr("(") + wstr("type") + wstr("regular")
        if executable:
            out += wstr("executable") + wstr("")
        return out + wstr("contents") + wstr(contents) + wstr(")")
    if kind == "symlink":
        return wstr("(") + wstr("type") + wstr("symlink") + wstr("target") + wstr(node[1]) + wstr(")")
    out = wstr("(") + wstr("type") + wstr("directory")
    for name in sorted(node[1]):
        out += wstr("entry") + wstr("(") + wstr("name") + wstr(name) + wstr("node")
        out += nar_node(node[1][name]) + wstr(")")
    return out + wstr(")")


def make_nar(node):
    return wstr("nix-archive-1") + nar_node(node)


# ----------------------------------------------------------------------------------------------
# .drv (ATerm) parsing, enough for the derivations we instantiate


def parse_aterm(text):
    pos = 0

    def value():
        nonlocal pos
        c = text[pos]
        if c == '"':
            pos += 1
            out = []
            while text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                    out.append({"n": "\n", "t": "\t", "r": "\r"}.get(text[pos], text[pos]))
                else:
                    out.append(text[pos])
                pos += 1
            pos += 1
            return "".join(out)
        if c in "[(":
            close = "]" if c == "[" else ")"
            pos += 1
            items = []
            while text[pos] != close:
                items.append(value())
                if text[pos] == ",":
                    pos += 1
            pos += 1
            return items
        raise ValueError("unexpected %r at %d" % (c, pos))

    assert text.startswith("Derive(")
    pos = len("Derive")
    outputs, input_drvs, input_srcs, platform, builder, args, env = value()
    return {
        "outputs": outputs,
        "input_drvs": input_drvs,
        "input_srcs": input_srcs,
        "platform": platform,
        "builder": builder,
        "args": args,
        "env": env,
    }


def basic_derivation(drv):
    out = u64(len(drv["outputs"]))
    for name, path, algo, h in sorted(drv["outputs"]):
        out += wstr(name) + wstr(path) + wstr(algo) + wstr(h)
    out += wstrs(sorted(drv["input_srcs"]))
    out += wstr(drv["platform"]) + wstr(drv["builder"]) + wstrs(drv["args"])
    out += u64(len(drv["env"]))
    for k, v in sorted(drv["env"]):
        out += wstr(k) + wstr(v)
    return out


# ----------------------------------------------------------------------------------------------
# The server process and a recording reader


NIX_CONF = """build-users-group =
sandbox = false
substituters =
"""

EXPR = r"""
let
  mk = name: script: extra: derivation ({
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // extra);
in {
  bdOk = mk "capture-bd-ok"
    "echo building capture-bd-ok; echo to-stderr >&2; echo ok > $out; echo dev > $dev"
    { outputs = [ "out" "dev" ]; };
  bdFail = mk "capture-bd-fail" "echo about to fail; exit 3" { };
  bpOk = mk "capture-bp-ok" "echo building capture-bp-ok; echo ok > $out" { };
  bpFail = mk "capture-bp-fail" "echo about to fail too; exit 4" { };
}
"""

SERVER_SCRIPT = r"""
work=$1 protocol=$2 mount_tmpfs=$3
if [ "$mount_tmpfs" = yes ]; then mount -t tmpfs tmpfs /nix; fi
mkdir -p /nix/store /nix/var/nix
export NIX_CONF_DIR=$work/conf
unset NIX_REMOTE NIX_PATH
nix-store --version > "$work/version.txt"
nix-instantiate "$work/capture.nix" -A bdOk -A bdFail -A bpOk -A bpFail > "$work/drvs.txt"
for d in $(cat "$work/drvs.txt"); do cp "$d" "$work/"; done
if [ "$protocol" = serve ]; then exec nix-store --serve --write; else exec nix-daemon --stdio; fi
"""


class Peer:
    """A child process spoken to over its stdin and stdout; every byte read is recorded until
    take(). Subclasses name themselves in errors (`who`) and may add context to them."""

    who = "server"
    timeout = TIMEOUT

    def start(self, cmd, **popen):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **popen)
        self.rfd = self.proc.stdout.fileno()
        self.buf = b""
        self.recorded = b""

    def failure_context(self):
        return ""

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_exact(self, n):
        deadline = time.monotonic() + self.timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%s sent nothing for %ds%s"
                                   % (self.who, self.timeout, self.failure_context()))
            r, _, _ = select.select([self.rfd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise EOFError("%s closed its output%s" % (self.who, self.failure_context()))
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        self.recorded += out
        return out

    def take(self):
        """The bytes read since the last take()."""
        out, self.recorded = self.recorded, b""
        return out

    def u64(self):
        return int.from_bytes(self.read_exact(8), "little")

    def bytes(self):
        n = self.u64()
        data = self.read_exact(n)
        self.read_exact(len(pad(n)))
        return data

    def str(self):
        return self.bytes().decode("utf-8", "replace")

    def strs(self):
        return [self.str() for _ in range(self.u64())]


class Server(Peer):
    def __init__(self, nix, protocol):
        self.work = tempfile.mkdtemp(prefix="nlb-capture-")
        os.makedirs(os.path.join(self.work, "conf"))
        with open(os.path.join(self.work, "conf", "nix.conf"), "w") as f:
            f.write(NIX_CONF)
        with open(os.path.join(self.work, "capture.nix"), "w") as f:
            f.write(EXPR)
        self.log = open(os.path.join(self.work, "server.log"), "wb")
        if nix == "host":
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-euc", SERVER_SCRIPT,
                   "sh", self.work, protocol, "yes"]
            self.inside = self.work
        else:
            cmd = [os.path.join(REPO, "tests", "env", "sid-run.sh"), "--tmpfs", "/nix",
                   "--bind", self.work, "/capture", "--", "sh", "-euc", SERVER_SCRIPT,
                   "sh", "/capture", protocol, "no"]
            self.inside = "/capture"
        env = {k: v for k, v in os.environ.items() if k not in ("NIX_REMOTE", "NIX_CONF_DIR")}
        self.start(cmd, stderr=self.log, env=env)

    def failure_context(self):
        return "; log:\n" + self.log_text()

    def nar(self):
        start = len(self.recorded)

        def node():
            assert self.str() == "("
            assert self.str() == "type"
            kind = self.str()
            if kind == "regular":
                tok = self.str()
                if tok == "executable":
                    self.str()
                    tok = self.str()
                assert tok == "contents"
                self.bytes()
                assert self.str() == ")"
            elif kind == "symlink":
                assert self.str() == "target"
                self.str()
                assert self.str() == ")"
            else:
                while True:
                    tok = self.str()
                    if tok == ")":
                        break
                    assert tok == "entry"
                    assert self.str() == "("
                    assert self.str() == "name"
                    self.str()
                    assert self.str() == "node"
                    node()
                    assert self.str() == ")"

        assert self.str() == "nix-archive-1"
        node()
        return self.recorded[start:]

    def finish(self):
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        rc = self.proc.wait(timeout=60)
        self.log.close()
        return rest, rc

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        with open(os.path.join(self.work, "server.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def version(self):
        with open(os.path.join(self.work, "version.txt")) as f:
            return f.read().split()[-1]

    def drvs(self):
        with open(os.path.join(self.work, "drvs.txt")) as f:
            paths = f.read().split()
        out = {}
        for key, path in zip(["bdOk", "bdFail", "bpOk", "bpFail"], paths):
            with open(os.path.join(self.work, os.path.basename(path))) as f:
                drv = parse_aterm(f.read())
            out[key] = {
                "drv_path": path,
                "outputs": {o[0]: o[1] for o in drv["outputs"]},
                "basic": drv,
            }
        return out

    def cleanup(self):
        shutil.rmtree(self.work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The paths we upload


def make_paths():
    b_tree = ("file", b"content-addressed input\n", False)
    b_nar = make_nar(b_tree)
    b_hash = hashlib.sha256(b_nar).digest()
    b = {
        "path": ca_source_path(b_hash, "capture-b"),
        "nar": b_nar,
        "references": [],
        "deriver": "",
        "sigs": [],
        "ca": "fixed:r:sha256:" + nix32(b_hash),
        "ultimate": True,
    }
    a_tree = ("dir", {
        "hello.txt": ("file", b"hello from capture\n", False),
        "bin": ("dir", {"run.sh": ("file", b"#!/bin/sh\necho hi\n", True)}),
        "link": ("symlink", "hello.txt"),
        "empty": ("file", b"", False),
    })
    a = {
        "path": fake_path("capture-a", "capture-a"),
        "nar": make_nar(a_tree),
        "references": [b["path"]],
        "deriver": fake_path("capture-a-drv", "capture-a.drv"),
        "sigs": ["capture-key-1:" + base64.b64encode(bytes(range(64))).decode()],
        "ca": "",
        "ultimate": True,
    }
    c = {
        "path": fake_path("capture-c", "capture-c"),
        "nar": make_nar(("file", b"imported via an export stream\n", False)),
        "references": [],
        "deriver": "",
        "sigs": [],
        "ca": "",
        "ultimate": False,
    }
    for p in (a, b, c):
        p["nar_sha256"] = hashlib.sha256(p["nar"]).hexdigest()
        p["nar_size"] = len(p["nar"])
        p["registration_time"] = 1700000000
    return {"A": a, "B": b, "C": c}


def upload_info(p, nar_hash=None):
    """The upload layout (serve cmd 9 / worker ops 39 and 44)."""
    return (wstr(p["path"]) + wstr(p["deriver"]) + wstr(nar_hash or p["nar_sha256"])
            + wstrs(sorted(p["references"])) + u64(p["registration_time"]) + u64(p["nar_size"])
            + u64(1 if p["ultimate"] else 0) + wstrs(p["sigs"]) + wstr(p["ca"]))


def manifest_paths(paths):
    return {k: {f: v for f, v in p.items() if f != "nar"} for k, p in paths.items()}


# ----------------------------------------------------------------------------------------------
# serve


def ver(s):
    major, minor = s.split(".")
    return int(major) << 8 | int(minor)


def built_outputs(srv, with_list):
    """Skips a BuildResult's builtOutputs map: two strings an entry, then a string list too
    when `with_list` (serve >= 2.8, worker with realisation-with-path-not-hash)."""
    for _ in range(srv.u64()):
        srv.str(), srv.str()
        if with_list:
            srv.strs()


def serve_build_result(srv, version):
    status = srv.u64()
    msg = srv.str()
    if version >= 0x203:
        [srv.u64() for _ in range(4)]
    if version >= 0x206:
        built_outputs(srv, version >= 0x208)
    return status, msg


def build_options(version):
    # maxSilentTime 300, buildTimeout 600, maxLogSize 1 MiB, nrRepeats 0, enforceDeterminism 0,
    # keepFailed 0
    out = u64(300) + u64(600)
    if version >= 0x202:
        out += u64(1 << 20)
    if version >= 0x203:
        out += u64(0) + u64(0)
    if version >= 0x207:
        out += u64(0)
    return out


def run_serve(srv, client_version, steps):
    paths = make_paths()
    A, B, C = paths["A"], paths["B"], paths["C"]
    missing = fake_path("capture-missing", "capture-missing")

    def step(name, **info):
        steps.append(dict(name=name, bytes=srv.take(), **info))

    srv.send(u64(0x390C9DEB) + u64(client_version))
    assert srv.u64() == 0x5452EECB
    server_version = srv.u64()
    v = min(server_version, client_version)
    step("hello", server_version="%d.%d" % (server_version >> 8, server_version & 0xFF))
    drvs = srv.drvs()

    srv.send(u64(1) + u64(0) + u64(0) + wstrs(sorted([A["path"], B["path"], missing])))
    srv.strs()
    step("query-valid-before", request={"lock": False, "substitute": False,
                                        "paths": ["A", "B", "missing"]})

    for key, p in (("B", B), ("A", A)):
        srv.send(u64(9) + upload_info(p) + p["nar"])
        assert srv.u64() == 1
        step("add-to-store-nar-" + key, request={"path": key})

    srv.send(u64(4) + u64(1) + C["nar"] + u64(0x4558494E) + wstr(C["path"]) + wstrs([])
             + wstr("") + u64(0) + u64(0))
    assert srv.u64() == 1
    step("import-paths-C", request={"path": "C"})

    srv.send(u64(1) + u64(1) + u64(0) + wstrs(sorted([A["path"], B["path"], C["path"], missing])))
    srv.strs()
    step("query-valid-after", request={"lock": True, "substitute": False,
                                       "paths": ["A", "B", "C", "missing"]})

    srv.send(u64(2) + wstrs(sorted([A["path"], B["path"], C["path"], missing])))
    while srv.str():
        srv.str(), srv.strs(), srv.u64(), srv.u64()
        if v >= 0x204:
            srv.str(), srv.str(), srv.strs()
    step("query-path-infos", request={"paths": ["A", "B", "C", "missing"]})

    srv.send(u64(3) + wstr(A["path"]))
    srv.nar()
    step("dump-store-path-A", request={"path": "A"})

    srv.send(u64(7) + u64(0) + wstrs([A["path"]]))
    srv.strs()
    step("query-closure-A", request={"include_outputs": False, "paths": ["A"]})

    for key in ("bdOk", "bdFail"):
        d = drvs[key]
        srv.send(u64(8) + wstr(d["drv_path"]) + basic_derivation(d["basic"]) + build_options(v))
        status, msg = serve_build_result(srv, v)
        step("build-derivation-" + key, request={"drv": key}, status=status, error_msg=msg)

    for key, spec in (("bpOk", "!out"), ("bpFail", "")):
        d = drvs[key]
        srv.send(u64(6) + wstrs([d["drv_path"] + spec]) + build_options(v))
        status = srv.u64()
        if status != 0:
            srv.str()
        step("build-paths-" + key, request={"drv": key, "spec": d["drv_path"] + spec}, status=status)

    return {"paths": manifest_paths(paths), "missing": missing,
            "drvs": {k: {"drv_path": d["drv_path"], "outputs": d["outputs"]} for k, d in drvs.items()},
            "negotiated": "%d.%d" % (v >> 8, v & 0xFF)}


# ----------------------------------------------------------------------------------------------
# worker

STDERR_NEXT = 0x6F6C6D67
STDERR_READ = 0x64617461
STDERR_WRITE = 0x64617416
STDERR_LAST = 0x616C7473
STDERR_ERROR = 0x63787470
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54


def worker_stderr(srv, v):
    """Reads stderr messages up to LAST (returns None) or ERROR (returns the message)."""
    while True:
        tag = srv.u64()
        if tag == STDERR_LAST:
            return None
        if tag == STDERR_NEXT:
            srv.str()
        elif tag == STDERR_START_ACTIVITY:
            srv.u64(), srv.u64(), srv.u64(), srv.str()
            fields(srv)
            srv.u64()
        elif tag == STDERR_STOP_ACTIVITY:
            srv.u64()
        elif tag == STDERR_RESULT:
            srv.u64(), srv.u64()
            fields(srv)
        elif tag == STDERR_WRITE:
            srv.bytes()
        elif tag == STDERR_ERROR:
            if v >= 0x11A:
                assert srv.str() == "Error"
                srv.u64(), srv.str()
                msg = srv.str()
                assert srv.u64() == 0
                for _ in range(srv.u64()):
                    assert srv.u64() == 0
                    srv.str()
            else:
                msg = srv.str()
                srv.u64()
            return msg
        else:
            raise ValueError("unexpected stderr tag %#x" % tag)


def fields(srv):
    for _ in range(srv.u64()):
        kind = srv.u64()
        if kind == 0:
            srv.u64()
        else:
            srv.str()


def worker_build_result(srv, v, features):
    status = srv.u64()
    msg = srv.str()
    if v >= 0x11D:
        [srv.u64() for _ in range(4)]
    if v >= 0x125:
        for _ in range(2):
            if srv.u64() == 1:
                srv.u64()
    with_list = "realisation-with-path-not-hash" in features
    if with_list or v >= 0x11C:
        built_outputs(srv, with_list)
    return status, msg


def framed(data, chunk=1000):
    out = b""
    for i in range(0, len(data), chunk):
        out += u64(len(data[i:i + chunk])) + data[i:i + chunk]
    return out + u64(0)


def worker_hello(srv, client_version):
    """The worker handshake's first exchange: the magic numbers and versions. Returns the
    daemon's version and the one both speak."""
    srv.send(u64(0x6E697863) + u64(client_version))
    assert srv.u64() == 0x6478696F
    server_version = srv.u64()
    return server_version, min(server_version, client_version)


def write_steps(out, steps):
    """Writes each step's bytes to its own file in a fresh `out`; returns the manifest's
    entries for them (what was sent, the file, its size)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    manifest_steps = []
    for i, s in enumerate(steps):
        fname = "%02d-%s.bin" % (i, s["name"])
        with open(os.path.join(out, fname), "wb") as f:
            f.write(s["bytes"])
        manifest_steps.append(dict({k: v for k, v in s.items() if k != "bytes"}, file=fname,
                                   size=len(s["bytes"])))
    return manifest_steps


def run_worker(srv, client_version, client_features, steps):
    paths = make_paths()
    A, B, C = paths["A"], paths["B"], paths["C"]
    missing = fake_path("capture-missing", "capture-missing")

    def step(name, **info):
        steps.append(dict(name=name, bytes=srv.take(), **info))

    server_version, v = worker_hello(srv, client_version)
    tail = b""
    if v >= 0x126:
        tail += wstrs(sorted(client_features))
    tail += u64(0) + u64(0)
    srv.send(tail)
    server_features = srv.strs() if v >= 0x126 else []
    nix_version = srv.str() if v >= 0x121 else None
    trust = srv.u64() if v >= 0x123 else None
    assert worker_stderr(srv, v) is None
    features = sorted(set(server_features) & set(client_features))
    step("handshake", server_version="%d.%d" % (server_version >> 8, server_version & 0xFF),
         server_features=server_features, nix_version=nix_version, trust=trust)
    drvs = srv.drvs()

    def op(name, request_bytes, reply, **info):
        srv.send(request_bytes)
        err = worker_stderr(srv, v)
        result = reply() if err is None else None
        step(name, error=err, **info)
        return result

    op("is-valid-path-missing", u64(1) + wstr(missing), srv.u64, request={"path": "missing"})
    subst = u64(0) if v >= 0x11B else b""
    op("query-valid-before", u64(31) + wstrs(sorted([A["path"], B["path"], missing])) + subst,
       srv.strs, request={"paths": ["A", "B", "missing"], "substitute": False})

    # AddToStoreNar for B, framed.
    op("add-to-store-nar-B", u64(39) + upload_info(B) + u64(0) + u64(1) + framed(B["nar"]),
       lambda: None, request={"path": "B"})
    # AddMultipleToStore for A (refers to B) and C.
    content = u64(2) + upload_info(C) + C["nar"] + upload_info(A) + A["nar"]
    op("add-multiple-to-store-C-A", u64(44) + u64(0) + u64(1) + framed(content, 256),
       lambda: None, request={"paths": ["C", "A"]})

    op("query-valid-after",
       u64(31) + wstrs(sorted([A["path"], B["path"], C["path"], missing])) + subst,
       srv.strs, request={"paths": ["A", "B", "C", "missing"], "substitute": False})

    def path_info_reply():
        if v >= 0x111 and srv.u64() == 0:
            return
        srv.str(), srv.str(), srv.strs(), srv.u64(), srv.u64()
        if v >= 0x110:
            srv.u64(), srv.strs(), srv.str()

    for key, p in (("A", A["path"]), ("B", B["path"]), ("missing", missing)):
        op("query-path-info-" + key, u64(26) + wstr(p), path_info_reply, request={"path": key})

    op("nar-from-path-A", u64(38) + wstr(A["path"]), srv.nar, request={"path": "A"})

    for key in ("bdOk", "bdFail"):
        d = drvs[key]
        op("build-derivation-" + key,
           u64(36) + wstr(d["drv_path"]) + basic_derivation(d["basic"]) + u64(0),
           lambda: worker_build_result(srv, v, features), request={"drv": key})

    def keyed():
        for _ in range(srv.u64()):
            srv.str()
            worker_build_result(srv, v, features)

    for key, wanted in (("bpOk", [drvs["bpOk"]["drv_path"] + "!*", A["path"]]),
                        ("bpFail", [drvs["bpFail"]["drv_path"] + "!out"])):
        op("build-paths-with-results-" + key, u64(46) + wstrs(wanted) + u64(0), keyed,
           request={"paths": wanted})

    # An upload whose NAR hash is wrong: the daemon reports an error and keeps the connection.
    bad = dict(A, path=fake_path("capture-bad", "capture-bad"), references=[], deriver="",
               sigs=[], ultimate=False)
    op("add-to-store-nar-bad-hash",
       u64(39) + upload_info(bad, hashlib.sha256(b"wrong").hexdigest()) + u64(0) + u64(1)
       + framed(bad["nar"]), lambda: None, request={"path": bad["path"]})
    op("is-valid-path-A", u64(1) + wstr(A["path"]), srv.u64, request={"path": "A"})

    return {"paths": manifest_paths(paths), "missing": missing,
            "drvs": {k: {"drv_path": d["drv_path"], "outputs": d["outputs"]} for k, d in drvs.items()},
            "negotiated": "%d.%d" % (v >> 8, v & 0xFF), "features": features}


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nix", choices=["host", "sid"], required=True)
    ap.add_argument("--protocol", choices=["serve", "worker"], required=True)
    ap.add_argument("--client-version", help="e.g. 2.7 or 1.35 (default: ours)")
    ap.add_argument("--client-features", default="", help="comma-separated (worker ≥ 1.38)")
    ap.add_argument("--suffix", default="", help="appended to the output directory name")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the server runs in a private mount namespace)")

    client_version = ver(args.client_version or ("2.7" if args.protocol == "serve" else "1.35"))
    features = [f for f in args.client_features.split(",") if f]
    srv = Server(args.nix, args.protocol)
    steps = []
    try:
        if args.protocol == "serve":
            info = run_serve(srv, client_version, steps)
        else:
            info = run_worker(srv, client_version, features, steps)
        rest, rc = srv.finish()
        if rest:
            raise RuntimeError("unexpected trailing server output: %r" % rest[:200])
        nix_version = srv.version()
        log = srv.log_text()
    except BaseException:
        print(srv.log_text(), file=sys.stderr)
        srv.proc.kill()
        raise
    finally:
        srv.cleanup()

    name = "nix-" + nix_version + (("-" + args.suffix) if args.suffix else "")
    out = os.path.join(args.out, name)
    manifest_steps = write_steps(out, steps)
    manifest = dict(info, nix_version=nix_version, protocol=args.protocol,
                    client_version="%d.%d" % (client_version >> 8, client_version & 0xFF),
                    client_features=features, server_exit_status=rc, steps=manifest_steps,
                    captured_by="hook-protocol/tests/capture/capture.py")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "server-stderr.txt"), "w") as f:
        f.write(log)
    print("wrote %s (%d steps)" % (out, len(steps)))


if __name__ == "__main__":
    main()
