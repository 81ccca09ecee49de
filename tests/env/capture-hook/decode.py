#!/usr/bin/env python3
"""Decodes a captured build-hook stdin stream (tests/env/capture-hook; a tool, not the product).

Prints the settings preamble (count and name = value), every `try` request, and the inputs and
outputs sets that follow an accept. Fails loudly on anything it cannot decode exactly (bad padding,
trailing bytes), so it doubles as an independent check of the golden files.
Usage: decode.py FILE.stdin [--settings]   (--settings also lists every setting)
"""
import struct
import sys


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError(f"truncated u64 at {self.pos}")
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def bytes_(self) -> bytes:
        n = self.u64()
        pad = (8 - n % 8) % 8
        if self.pos + n + pad > len(self.data):
            raise ValueError(f"truncated string of {n} bytes at {self.pos}")
        s = self.data[self.pos : self.pos + n]
        if any(self.data[self.pos + n : self.pos + n + pad]):
            raise ValueError(f"non-zero padding at {self.pos + n}")
        self.pos += n + pad
        return s

    def str_(self) -> str:
        return self.bytes_().decode()

    def strings(self) -> list:
        return [self.str_() for _ in range(self.u64())]

    def peek_try(self) -> bool:
        return self.data[self.pos : self.pos + 16] == struct.pack("<Q", 3) + b"try\0\0\0\0\0"

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def decode(data: bytes) -> dict:
    r = Reader(data)
    settings = []
    while True:
        tag = r.u64()
        if tag == 0:
            break
        if tag != 1:
            raise ValueError(f"preamble tag {tag} at {r.pos - 8}")
        settings.append((r.str_(), r.str_()))
    preamble_end = r.pos
    tries = []
    while r.peek_try():
        start = r.pos
        r.str_()
        tries.append(
            {
                "offset": start,
                "am_willing": r.u64(),
                "needed_system": r.str_(),
                "drv_path": r.str_(),
                "required_features": r.strings(),
            }
        )
    accepted = None
    if not r.at_end():
        accepted = {"offset": r.pos, "inputs": r.strings(), "wanted_outputs": r.strings()}
    if not r.at_end():
        raise ValueError(f"{len(data) - r.pos} undecoded bytes at {r.pos}")
    return {"settings": settings, "preamble_bytes": preamble_end, "tries": tries, "accepted": accepted}


def main() -> None:
    path = sys.argv[1]
    d = decode(open(path, "rb").read())
    print(f"{path}: {len(d['settings'])} settings, preamble {d['preamble_bytes']} bytes")
    if "--settings" in sys.argv[2:]:
        for name, value in d["settings"]:
            print(f"  {name} = {value!r}")
    for t in d["tries"]:
        print(
            f"try @{t['offset']}: am_willing={t['am_willing']} system={t['needed_system']} "
            f"drv={t['drv_path']} features={t['required_features']}"
        )
    if d["accepted"]:
        a = d["accepted"]
        print(f"after accept @{a['offset']}: inputs={a['inputs']} outputs={a['wanted_outputs']}")


if __name__ == "__main__":
    main()
