"""How the disk tier's read rate depends on how many reads are in flight, for reads the size decode makes.

A decode step does not read the disk in one long stream: each layer, once it has chosen, needs the few
dozen chunks it chose that live only on disk, at random places, and waits for them. Such a batch is
served at the disk's latency, not its bandwidth, unless enough reads are in flight at once. This
script measures, on the same chunk files (written through DiskTier, cold: pages dropped before each
pass, a fresh random subset of files per pass):

  raw    O_DIRECT reads of the files by T threads (plain os.open/readv/close), batch by batch
  store  DiskTier.read_many with read_threads=T (O_DIRECT, crc32c check, lz4 decode), batch by batch,
         with the C reader (tiers/disk/native.py; "store") and with the Python reader ("store_python");
         read_many gives each thread at least DiskTuning.min_per_thread chunks, so a small batch uses fewer
         than T

for batch sizes (chunks per wait) and thread counts given; store/raw is reported per pair.

    python bench/bench_disk_depth.py --dir /tmp/tierkv-depth --files 8192 --chunk-bytes 73728 \\
        --batches 28 1024 --threads 1 8 16 32 64 --json depth.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierkv.keys import ChunkKey  # noqa: E402
from tierkv.profiling import drop_pages  # noqa: E402
from tierkv.tiers.disk import native as c_reader  # noqa: E402
from tierkv.tiers.disk import DiskTier  # noqa: E402


def build(path: str, files: int, nbytes: int) -> None:
    if os.path.isdir(path):
        try:
            with DiskTier(path) as d:
                if len(d.keys()) >= files and all(d.nbytes(k) == nbytes for k in d.keys()[:8]):
                    return
        except Exception:  # noqa: BLE001 - anything else there is rebuilt
            pass
        shutil.rmtree(path)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with DiskTier(path) as d:
        for i in range(files):
            # int4-like payload: random bytes (what random KV quantizes to; lz4 cannot shrink it)
            d.put(ChunkKey("probe", i % 32, i // 32), rng.integers(0, 256, nbytes, dtype=np.uint8))
            if (i + 1) % 1024 == 0:
                print(f"  wrote {i + 1}/{files} chunks ({time.perf_counter() - t0:.1f} s)", flush=True)
        d.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/tierkv-bench-depth")
    p.add_argument("--files", type=int, default=8192)
    p.add_argument("--chunk-bytes", type=int, default=73728, help="llama8b int4 shared chunk of 64 tokens: 73728")
    p.add_argument("--batches", type=int, nargs="+", default=[28, 1024], help="chunks read per wait")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    p.add_argument("--per-pass", type=int, default=1024, help="chunks read per (batch, threads, path) pass")
    p.add_argument("--python-reader", action="store_true", help="also measure the store with its Python reader")
    p.add_argument("--keep", action="store_true", help="leave the chunk files for another run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.per_pass > args.files:
        p.error(f"--per-pass {args.per_pass} is more than --files {args.files}")

    build(args.dir, args.files, args.chunk_bytes)
    rng = random.Random(1)
    rows = []
    with DiskTier(args.dir) as probe:
        keys = sorted(probe.keys())
        paths = {k: probe.chunk_path(k) for k in keys}
        direct = probe.direct_reads
    size = max(os.path.getsize(p) for p in paths.values())
    size = (size + 4095) // 4096 * 4096
    for batch in args.batches:
        for threads in args.threads:
            pair = {}
            for path in ("raw", "store", "store_python")[: 3 if args.python_reader else 2]:
                ks = rng.sample(keys, args.per_pass)
                ps = [paths[k] for k in ks]
                drop_pages(ps)
                if path == "raw":
                    bufs = [mmap.mmap(-1, size) for _ in range(threads)]

                    def one(j, group):
                        got = 0
                        for q in group[j::threads]:
                            fd = os.open(q, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                            try:
                                got += os.readv(fd, [bufs[j]])
                            finally:
                                os.close(fd)
                        return got

                    with ThreadPoolExecutor(threads) as ex:
                        list(ex.map(lambda j: one(j, ps[:threads]), range(threads)))  # threads started
                        drop_pages(ps[:threads])
                        t0 = time.perf_counter()
                        nb = 0
                        for s in range(0, len(ps), batch):
                            group = ps[s : s + batch]
                            nb += sum(ex.map(lambda j: one(j, group), range(min(threads, len(group)))))
                        dt = time.perf_counter() - t0
                else:
                    store = DiskTier(args.dir, read_threads=threads, native_reads=path == "store")
                    whole = torch.empty(batch * args.chunk_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                    outs = list(torch.split(whole, args.chunk_bytes))
                    store.read_many(ks[: 2 * threads], [outs[i % batch] for i in range(2 * threads)])
                    drop_pages(ps[: 2 * threads])
                    t0 = time.perf_counter()
                    nb = 0
                    for s in range(0, len(ks), batch):
                        group = ks[s : s + batch]
                        store.read_many(group, outs[: len(group)])
                        nb += len(group) * args.chunk_bytes
                    dt = time.perf_counter() - t0
                    store.close()
                pair[path] = dict(seconds=dt, bytes=nb, gbps=nb / dt / 1e9,
                                  ms_per_batch=dt / -(-args.per_pass // batch) * 1e3)
            r = dict(batch=batch, threads=threads, **pair, store_over_raw=pair["store"]["gbps"] / pair["raw"]["gbps"])
            if "store_python" in pair:
                r["store_python_over_raw"] = pair["store_python"]["gbps"] / pair["raw"]["gbps"]
            rows.append(r)
            py = (f"  python reader {pair['store_python']['gbps']:.2f} GB/s ({r['store_python_over_raw']:.2f})"
                  if "store_python" in pair else "")
            print(f"batch {batch:5d} threads {threads:3d}: raw {pair['raw']['gbps']:.2f} GB/s "
                  f"({pair['raw']['ms_per_batch']:.2f} ms/batch)  store {pair['store']['gbps']:.2f} GB/s "
                  f"({pair['store']['ms_per_batch']:.2f} ms/batch)  store/raw {r['store_over_raw']:.2f}{py}", flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    out = dict(bench="disk_depth", git_commit=_git(), command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:], o_direct=direct, c_reader=c_reader.missing() or "in use", chunk_bytes=args.chunk_bytes, files=args.files,
               per_pass=args.per_pass, cpu_count=os.cpu_count(), torch=torch.__version__,
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _git():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
