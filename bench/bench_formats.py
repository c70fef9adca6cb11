"""Reconstruction error and size of each chunk format against the value group size (CPU, seconds).

The default group size (TierConfig.group_size) is chosen from this: per format, the relative error of
the values (per-token groups of channels) and of the keys, and the bytes per token, for group sizes
8..128, on random-normal K/V and on K/V with a few large-magnitude channels (as real keys have).

    python bench/bench_formats.py --json bench/results/formats_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierkv.formats import ChunkLayout, decode, encode, raw_bytes_per_token  # noqa: E402
from tierkv.profiling import git_commit  # noqa: E402


def kv(kind: str, gen, H=8, L=64, D=128, n=16):
    k = torch.randn(n, H, L, D, generator=gen)
    v = torch.randn(n, H, L, D, generator=gen)
    if kind == "outliers":  # a few channels of keys 10-20x larger, values with heavy-tailed tokens
        idx = torch.randperm(D, generator=gen)[:4]
        k[..., idx] *= 15.0
        v *= torch.exp(torch.randn(n, H, L, 1, generator=gen))
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    data = {kind: kv(kind, gen) for kind in ("normal", "outliers")}
    for fmt in ("int8", "int4", "int2"):
        for g in (8, 16, 32, 64, 128):
            lay = ChunkLayout(fmt, 64, 8, 128, g)
            for kind, (k, v) in data.items():
                k2, v2 = decode(encode(k, v, lay), lay, torch.bfloat16)
                rows.append(dict(format=fmt, group_size=g, data=kind, key_rel_err=rel(k2, k), value_rel_err=rel(v2, v),
                                 bytes_per_token=lay.nbytes / 64,
                                 size_vs_bf16=lay.nbytes / (64 * raw_bytes_per_token(8, 128))))
    print(f"{'format':6s} {'group':>5s} {'size':>6s} {'V err normal':>12s} {'V err outl.':>12s}")
    for r in rows:
        if r["data"] == "normal":
            o = next(x for x in rows if x["format"] == r["format"] and x["group_size"] == r["group_size"] and x["data"] == "outliers")
            print(f"{r['format']:6s} {r['group_size']:5d} {r['size_vs_bf16']:6.3f} {r['value_rel_err']:12.4f} {o['value_rel_err']:12.4f}")
    out = dict(bench="formats", date=time.strftime("%Y-%m-%d %H:%M:%S"), git_commit=git_commit(), torch=torch.__version__,
               command=" ".join(sys.argv), chunk=dict(tokens=64, heads=8, head_dim=128), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
