"""`tierkv roundtrip`: push random KV chunks through all three tiers and check every one reads back.

A self-check of an installation that needs no model and no GPU: chunks are encoded in a format, put
into a store whose gpu and cpu budgets are far too small to hold them, so most are demoted to disk,
then read back (promoted through cpu to gpu) and decoded, and compared with what went in.
"""

from __future__ import annotations

import tempfile
import time

import torch
from rich.console import Console
from rich.progress import Progress

from ..config import FORMATS, TierConfig
from ..formats import ChunkLayout, decode, encode


def register(sub) -> None:
    p = sub.add_parser("roundtrip", help="push random KV chunks through gpu/cpu/disk tiers and verify them")
    p.add_argument("--chunks", type=int, default=256, help="number of chunks (default 256)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per chunk (default 64)")
    p.add_argument("--format", choices=FORMATS, default="int4", help="chunk format (default int4)")
    p.add_argument("--disk-dir", default=None, help="directory of the disk tier (default: a temporary one)")
    p.set_defaults(func=run)


def run(args) -> int:
    console = Console()
    if args.chunks < 1 or args.tokens < 1:
        console.print("[red]--chunks and --tokens must be positive[/red]")
        return 2
    from ..keys import ChunkKey
    from ..store import ChunkStore
    from .report import moved_table, stats_table

    layout = ChunkLayout(args.format, args.tokens, 8, 128)
    with tempfile.TemporaryDirectory(prefix="tierkv-") as tmp:
        disk_dir = args.disk_dir or tmp
        n = layout.nbytes
        cfg = TierConfig(gpu_budget=max(8 * n, 1 << 20), cpu_budget=max(32 * n, 4 << 20), disk_path=disk_dir,
                         format=args.format)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with ChunkStore(cfg) as store, Progress(console=console, transient=True) as progress:
            task = progress.add_task("writing", total=args.chunks)
            originals = []
            for i in range(args.chunks):
                k = torch.randn(8, args.tokens, 128, generator=gen).to(torch.bfloat16)
                v = torch.randn(8, args.tokens, 128, generator=gen).to(torch.bfloat16)
                packed = encode(k, v, layout)
                store.put(ChunkKey("roundtrip", 0, i), packed, importance=float(i % 7))
                originals.append(packed)
                progress.advance(task)
            store.flush()
            task = progress.add_task("reading back", total=args.chunks)
            bad = 0
            for i, packed in enumerate(originals):
                key = ChunkKey("roundtrip", 0, i)
                store.promote(key, "gpu")
                got = store.read(key).cpu()
                if not torch.equal(got, packed):
                    bad += 1
                decode(got, layout)
                progress.advance(task)
            stats = store.stats()
        dt = time.perf_counter() - t0
    console.print(stats_table(stats))
    console.print(moved_table(stats))
    if bad:
        console.print(f"[red]{bad} of {args.chunks} chunks did not read back as written[/red]")
        return 1
    console.print(f"[green]all {args.chunks} chunks ({args.format}, {n} bytes each) read back intact[/green] in {dt:.2f} s")
    return 0
