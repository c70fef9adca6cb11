"""How fast is the disk tier next to plain files holding the same bytes, and how well does lz4 do on chunks?

In one run, for each chunk size, on the same directory's filesystem:
  writes  DiskTier.put + flush (lz4 + crc32c, temp file, fsync, rename, one directory fsync per batch)
          next to plain files written the same durable way (temp, fsync, rename, directory fsync),
          plain files without any fsync, and zarr-python writing the same arrays (no fsync);
  reads   DiskTier.read into a reused buffer, one chunk after another, next to os.readv of the plain
          files into the same buffer; DiskTier.read_many next to plain reads on a thread pool of the
          same size; zarr-python reading the very same store one chunk at a time and as one slice;
          each warm (page cache) and cold (every file's pages dropped with POSIX_FADV_DONTNEED after
          fsync, for both sides, before each timed pass).
Then the size lz4 leaves of chunks of every format (tierkv.formats.encode) from random-normal K/V and
from K/V shaped more like a model's (a few key channels of large magnitude, smooth over tokens), and
whether lz4 and crc32c let other threads run while they work (the GIL).

    python bench/bench_store.py --json bench/results/store_cpu.json
    python bench/bench_store.py --sizes 256 --mib 16 --repeat 2        # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tierkv import formats  # noqa: E402
from tierkv.config import FORMATS  # noqa: E402
from tierkv.keys import ChunkKey  # noqa: E402
from tierkv.tiers.disk import layout as disk_layout  # noqa: E402
from tierkv.tiers.disk import DiskTier  # noqa: E402

STREAM = "bench"


# --- data ----------------------------------------------------------------------------------------
def bf16_chunks(n_chunks: int, nbytes: int, seed: int) -> list:
    """Chunks of random-normal bf16 values: what a raw bf16 chunk of K/V looks like to lz4."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(nbytes // 2, generator=g).to(torch.bfloat16).view(torch.uint8).numpy()
            for _ in range(n_chunks)]


def kv(kind: str, heads: int, tokens: int, dim: int, g: torch.Generator):
    if kind == "random_normal":
        return torch.randn(heads, tokens, dim, generator=g), torch.randn(heads, tokens, dim, generator=g)
    # "realistic": keys with a few outlier channels (as RoPE'd keys of LLMs have), channel offsets and
    # slow drift over tokens; values closer to plain noise with per-token scale.
    scale = torch.ones(heads, 1, dim)
    for h in range(heads):
        scale[h, 0, torch.randperm(dim, generator=g)[:4]] = 12.0
    drift = torch.cumsum(torch.randn(heads, tokens, dim, generator=g) * 0.1, dim=1)
    k = (torch.randn(heads, tokens, dim, generator=g) * 0.5 + drift + torch.randn(heads, 1, dim, generator=g)) * scale
    v = torch.randn(heads, tokens, dim, generator=g) * (0.2 + torch.rand(heads, tokens, 1, generator=g))
    return k, v


# --- plain-file side -------------------------------------------------------------------------------
def plain_write(d: str, chunks: list, durable: bool) -> None:
    for i, c in enumerate(chunks):
        final = os.path.join(d, f"{i}.bin")
        tmp = final + ".tmp" if durable else final
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, c)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            os.rename(tmp, final)
            disk_layout.fsync_dir(d)


def plain_read(path: str, out: np.ndarray) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.readv(fd, [out])
    finally:
        os.close(fd)


def drop_pages(paths) -> None:
    """Push the files' pages out of the page cache (they are clean: fsynced) so the next read hits the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- timing ----------------------------------------------------------------------------------------
def timed_interleaved(methods: list, repeat: int) -> dict:
    """{name: [seconds per pass]} for (name, fn, before) run in turn, pass after pass, so that a change
    of load on a shared machine falls on every method alike. `before` (untimed) runs before each pass."""
    out = {name: [] for name, _, _ in methods}
    for _ in range(repeat):
        for name, fn, before in methods:
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def gbps(nbytes: int, secs: list) -> float:
    return nbytes / median(secs) / 1e9


def bench_size(base: str, kib: int, mib: int, repeat: int, threads: int, seed: int, log) -> dict:
    nbytes = kib * 1024
    n = max(8, mib * 1024 // kib)
    total = n * nbytes
    chunks = bf16_chunks(n, nbytes, seed)
    keys = [ChunkKey(STREAM, 0, i) for i in range(n)]
    d = os.path.join(base, f"size{kib}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    res = {"chunk_bytes": nbytes, "chunks": n, "total_bytes": total, "times_s": {}}
    T = res["times_s"]
    T.update(bench_writes(d, keys, chunks, nbytes, repeat))
    log(f"  {kib} KiB writes done")
    times, res["store_file_bytes"] = bench_reads(d, keys, chunks, nbytes, threads, repeat,
                                                 lambda cache: log(f"  {kib} KiB {cache} reads done"))
    T.update(times)
    res.update(summary(T, total, n))
    shutil.rmtree(d, ignore_errors=True)
    return res


def bench_writes(d: str, keys: list, chunks: list, nbytes: int, repeat: int) -> dict:
    """Times of DiskTier.put + flush, plain files (durable or not) and zarr-python writing the chunks;
    each pass into a fresh place so that every write creates its file."""
    import zarr

    def store_write():
        sd = os.path.join(d, "store_w")
        shutil.rmtree(sd, ignore_errors=True)
        with DiskTier(sd, queue_depth=64) as t:
            for k, c in zip(keys, chunks):
                t.put(k, c)
            t.flush()

    def plain_pass(durable):
        def f():
            pd = os.path.join(d, "plain_w")
            shutil.rmtree(pd, ignore_errors=True)
            os.makedirs(pd)
            plain_write(pd, chunks, durable)
        return f

    def zarr_write():
        zd = os.path.join(d, "zarr_w")
        shutil.rmtree(zd, ignore_errors=True)
        arr = zarr.create_array(zd, shape=(2**40, nbytes), chunks=(1, nbytes), dtype="uint8", fill_value=0,
                                compressors=[zarr.codecs.numcodecs.LZ4(acceleration=1), zarr.codecs.Crc32cCodec()],
                                chunk_key_encoding={"name": "default", "separator": "."})
        for i, c in enumerate(chunks):
            arr[i] = c

    return timed_interleaved([("write_store", store_write, None), ("write_plain_durable", plain_pass(True), None),
                              ("write_plain_nosync", plain_pass(False), None),
                              ("write_zarr_python", zarr_write, None)], repeat)


def bench_reads(d: str, keys: list, chunks: list, nbytes: int, threads: int, repeat: int, done) -> tuple:
    """(times of every read path, warm and cold; bytes of the store's chunk files) over one DiskTier store
    and one directory of plain files holding the same bytes; done(cache) after each cache state."""
    import zarr

    n = len(keys)
    sd, pd = os.path.join(d, "store"), os.path.join(d, "plain")
    with DiskTier(sd) as t:
        for k, c in zip(keys, chunks):
            t.put(k, c)
    os.makedirs(pd)
    plain_write(pd, chunks, durable=True)
    plain_paths = [os.path.join(pd, f"{i}.bin") for i in range(n)]
    adir = os.path.join(sd, STREAM, disk_layout.array_name(0, nbytes))
    store_paths = [os.path.join(adir, disk_layout.chunk_name(i)) for i in range(n)]
    file_bytes = sum(os.path.getsize(p) for p in store_paths)

    out = torch.empty(nbytes, dtype=torch.uint8)
    out_np = out.numpy()
    outs = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(n)]
    outs_np = [o.numpy() for o in outs]
    pool = ThreadPoolExecutor(threads)
    tier = DiskTier(sd, read_threads=threads)
    zarr_arr = zarr.open_array(adir, mode="r")

    def r_plain():
        for p in plain_paths:
            plain_read(p, out_np)

    def r_store():
        for k in keys:
            tier.read(k, out=out)

    def r_zarr():
        for i in range(n):
            zarr_arr[i]

    methods = [("plain", r_plain, plain_paths), ("store", r_store, store_paths),
               ("plain_parallel", lambda: list(pool.map(plain_read, plain_paths, outs_np)), plain_paths),
               ("store_read_many", lambda: tier.read_many(keys, outs=outs), store_paths),
               ("zarr_python", r_zarr, store_paths), ("zarr_python_slice", lambda: zarr_arr[0:n], store_paths)]
    # correctness first: every path returns the bytes written
    for i in (0, n - 1):
        assert np.array_equal(tier.read(keys[i]).numpy(), chunks[i]) and np.array_equal(zarr_arr[i], chunks[i])
    times = {}
    for cache in ("warm", "cold"):
        if cache == "warm":
            for _, fn, _ in methods:
                fn()  # fill the page cache
        runs = [(f"read_{cache}_{name}", fn, (lambda p=paths: drop_pages(p)) if cache == "cold" else None)
                for name, fn, paths in methods]
        times.update(timed_interleaved(runs, repeat))
        done(cache)
    tier.close()
    pool.shutdown()
    return times, file_bytes


def summary(T: dict, total: int, n: int) -> dict:
    """Throughput of every path, the ratios the questions ask about, and time per chunk."""
    thr = {k: gbps(total, v) for k, v in T.items()}
    ratios = {
        "write_store_over_plain_durable": thr["write_store"] / thr["write_plain_durable"],
        "write_zarr_python_over_plain_nosync": thr["write_zarr_python"] / thr["write_plain_nosync"],
    }
    for cache in ("warm", "cold"):
        p, pp = thr[f"read_{cache}_plain"], thr[f"read_{cache}_plain_parallel"]
        ratios[f"read_{cache}_store_over_plain"] = thr[f"read_{cache}_store"] / p
        ratios[f"read_{cache}_store_read_many_over_plain_parallel"] = thr[f"read_{cache}_store_read_many"] / pp
        ratios[f"read_{cache}_zarr_python_over_plain"] = thr[f"read_{cache}_zarr_python"] / p
        ratios[f"read_{cache}_zarr_python_slice_over_plain_parallel"] = thr[f"read_{cache}_zarr_python_slice"] / pp
    return {"throughput_GBps": thr, "ratios": ratios, "per_chunk_us": {k: median(v) / n * 1e6 for k, v in T.items()}}


# --- compression per format -----------------------------------------------------------------------
def compression(heads: int, tokens: int, dim: int, n_chunks: int, seed: int) -> dict:
    from numcodecs import LZ4, Shuffle, Zstd

    out = {}
    bf16_bytes = formats.raw_bytes_per_token(heads, dim) * tokens
    for kind in ("random_normal", "realistic"):
        g = torch.Generator().manual_seed(seed)
        kvs = [kv(kind, heads, tokens, dim, g) for _ in range(n_chunks)]
        out[kind] = {}
        for fmt in FORMATS:
            layout = formats.ChunkLayout(fmt, tokens, heads, dim)
            raw = file = shuffled = zstd = 0
            for k, v in kvs:
                buf = formats.encode(k.to(torch.bfloat16), v.to(torch.bfloat16), layout).numpy()
                comp, crc = disk_layout.encode(buf)
                raw += buf.shape[0]
                file += len(comp) + len(crc)
                # what other codecs would leave, for reference only (the store writes plain lz4)
                elem = 1 if formats.is_quantized(fmt) else 2
                shuffled += len(LZ4(1).encode(Shuffle(elem).encode(buf)))
                zstd += len(Zstd(1).encode(buf))
            out[kind][fmt] = {
                "chunk_bytes": layout.nbytes,
                "file_bytes_per_chunk": file / n_chunks,
                "lz4_ratio": file / raw,  # on-disk / encoded; < 1 means lz4 saved space
                "disk_over_bf16": file / (bf16_bytes * n_chunks),  # on-disk / raw bf16 K+V
                "disk_bytes_per_token": file / (tokens * n_chunks),
                "reference_byte_shuffle_lz4_ratio": shuffled / raw,
                "reference_zstd1_ratio": zstd / raw,
            }
    return {"heads": heads, "tokens_per_chunk": tokens, "head_dim": dim, "chunks": n_chunks, "by_data": out}


# --- the GIL ----------------------------------------------------------------------------------------
def gil_release(nbytes: int = 256 * 1024, secs: float = 0.3) -> dict:
    """Pure-Python progress of the main thread while a second thread loops on each call, relative to a
    second thread that loops on pure Python (which shares the GIL): ~2x that means the call runs
    without the GIL (given a free core)."""
    import google_crc32c
    import numcodecs.lz4

    from tierkv.tiers.disk.layout import crc32c_value

    raw = bf16_chunks(1, nbytes, 0)[0]
    comp = numcodecs.lz4.compress(raw)
    dest = np.empty(nbytes, np.uint8)
    calls = {
        "lz4_compress": lambda: numcodecs.lz4.compress(raw),
        "lz4_decompress": lambda: numcodecs.lz4.decompress(comp, dest),
        "crc32c_store": lambda: crc32c_value(comp),  # what the disk tier checks chunks with
        "google_crc32c": lambda: google_crc32c.value(comp),
        "pure_python": lambda: sum(range(2000)),
    }

    def progress(fn):
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                fn()

        th = threading.Thread(target=spin)
        th.start()
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < secs:
            k += 1
        stop.set()
        th.join()
        return k

    t0, alone = time.perf_counter(), 0
    while time.perf_counter() - t0 < secs:
        alone += 1
    res = {name: progress(fn) / alone for name, fn in calls.items()}
    return {"main_thread_progress_vs_alone": res, "chunk_bytes": nbytes,
            "crc32c_store": crc32c_value.__module__,
            "note": "google_crc32c releases the GIL only for bytes objects >= 1 MiB (its C source), the crc32c "
                    "package for large buffers (its automatic mode); numcodecs.lz4 releases it around LZ4 calls"}


# --- context ----------------------------------------------------------------------------------------
def host_info(d: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
        real = os.path.realpath(d)
        best = ("", "", "")
        with open("/proc/mounts") as f:
            for ln in f:
                dev, mnt, fstype = ln.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[1]):
                    best = (dev, mnt, fstype)
        info["bench_dir_filesystem"] = {"device": best[0], "mount": best[1], "type": best[2]}
    except OSError:
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "numpy", "zarr", "numcodecs", "lz4", "google-crc32c", "crc32c"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import tierkv

    out["tierkv"] = tierkv.__version__
    return out


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "tierkv", "bench"],
                               capture_output=True, text=True, check=True)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    ap.add_argument("--sizes", default="64,256,1024", help="chunk sizes in KiB, comma-separated")
    ap.add_argument("--mib", type=int, default=64, help="MiB of chunks per size")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per measurement (the median is used)")
    ap.add_argument("--threads", type=int, default=4, help="threads of read_many and of the parallel plain reads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    made = args.dir is None
    base = tempfile.mkdtemp(prefix="tierkv-bench-") if made else os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = {
        "bench": "store",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv) if argv is None else repr(argv),
        "args": vars(args),
        "host": host_info(base),
        "versions": versions(),
        "git": git_commit(),
        "data": "chunks of random-normal bf16 values (lz4 saves ~nothing on them: the read path pays the "
                "crc and the lz4 pass over every byte)",
        "sizes": {},
    }
    try:
        for kib in sizes:
            log(f"chunk size {kib} KiB")
            result["sizes"][str(kib)] = bench_size(base, kib, args.mib, args.repeat, args.threads, args.seed, log)
        result["compression"] = compression(heads=8, tokens=64, dim=128, n_chunks=8, seed=args.seed)
        result["gil"] = gil_release()
    finally:
        if made:
            shutil.rmtree(base, ignore_errors=True)
    print_summary(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    return result


def print_summary(r: dict) -> None:
    print(f"host: {r['host'].get('cpu')} x{r['host']['cpus']}, fs {r['host'].get('bench_dir_filesystem')}")
    print("throughput GB/s (median)      " + "".join(f"{k + ' KiB':>12}" for k in r["sizes"]))
    rows = next(iter(r["sizes"].values()))["throughput_GBps"].keys()
    for row in rows:
        print(f"  {row:<33}" + "".join(f"{s['throughput_GBps'][row]:12.3f}" for s in r["sizes"].values()))
    print("ratios")
    for row in next(iter(r["sizes"].values()))["ratios"]:
        print(f"  {row:<55}" + "".join(f"{s['ratios'][row]:8.2f}" for s in r["sizes"].values()))
    if "compression" in r:
        c = r["compression"]
        print(f"on-disk size / encoded size (lz4), chunks of {c['tokens_per_chunk']} tokens x {c['heads']} heads x {c['head_dim']}")
        for kind, per in c["by_data"].items():
            print(f"  {kind:<14}" + "".join(f"{fmt}:{v['lz4_ratio']:.3f} ({v['disk_over_bf16']:.3f} of bf16)  "
                                           for fmt, v in per.items()))
            print(f"  {'':<14}" + "".join(f"shuffle+lz4 {v['reference_byte_shuffle_lz4_ratio']:.3f} "
                                          f"zstd-1 {v['reference_zstd1_ratio']:.3f} | " for v in per.values()))
    if "gil" in r:
        print("main-thread progress beside a thread in each call (1.0: the call releases the GIL): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["gil"]["main_thread_progress_vs_alone"].items()))


if __name__ == "__main__":
    main()
