#!/usr/bin/env python3
"""Checks a raw disk image written by the test guest's `blk` scenario.

Pattern (see README.md): 8-byte little-endian word i (0..63) of 512-byte
sector s is (s << 32) ^ (i * 0x9E3779B97F4A7C15 mod 2**64) ^ seed.

Usage: check-blk-pattern.py IMAGE [--seed S] [--sectors N]
Checks the first N sectors (default: the whole image, rounded down to whole
sectors). Exit status 0 and "ok" if every sector matches; 1 and the first
mismatching sector otherwise; 2 on usage errors.
"""
import argparse
import struct
import sys

K = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def expected(sector, seed):
    hi = (sector << 32) ^ seed
    return struct.pack("<64Q", *[(hi ^ ((i * K) & MASK)) & MASK for i in range(64)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--seed", type=lambda s: int(s, 0), default=1)
    ap.add_argument("--sectors", type=lambda s: int(s, 0), default=None)
    a = ap.parse_args()
    with open(a.image, "rb") as f:
        data = f.read()
    total = len(data) // 512
    n = total if a.sectors is None else a.sectors
    if n > total:
        print(f"image has {total} sectors, fewer than {n}", file=sys.stderr)
        return 2
    for s in range(n):
        if data[s * 512:(s + 1) * 512] != expected(s, a.seed):
            print(f"FAIL at sector {s} (seed {a.seed:#x})")
            return 1
    print(f"ok: {n} sectors match (seed {a.seed:#x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
