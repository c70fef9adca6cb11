"""What `tierkv profile` measures, and the chunk length and prefetch depth it derives from that.

Measured (every figure is bytes per second over the whole operation, wall clock, GPU work synchronized):
  transfers  host <-> device copies of one buffer, pinned and pageable, per transfer size.
  gather     ops.gather (fused gather + dequantize) of a table of many chunks of one length into dense
             bf16 K/V [1, heads, tokens, head_dim], per format, per available backend (ext, cupy, torch),
             with the chunks in device memory ("device") or in pinned host memory read over UVA ("host").
             Without CUDA: the torch reference on the CPU, source "host" (plain memory). gbps counts
             bytes read (packed chunks) + bytes written (K and V); read_gbps the packed bytes alone.
  disk       per chunk size (the bf16 size of each chunk length), in a fresh directory under --disk-dir:
             raw  = plain files: write + fsync each file, one directory fsync; reads with os.preadv into a
                    reused buffer, warm (page cache), cold (POSIX_FADV_DONTNEED first) and O_DIRECT
                    (page-aligned buffer; absent where the filesystem refuses it);
             store = DiskTier (lz4 + crc32c, temp file, fsync, rename): put + flush; read() one chunk after
                    another warm and cold, and read_many() cold (its reader threads in parallel).

Derived (`effective`, `recommendations`), with the kernel backend in use (ops.backend()):
  effective fetch bandwidth of packed chunk bytes, per format, chunk length and tier:
    gpu   the device-source gather;   cpu   the host-source gather (UVA);
    disk  disk through cpu: min(store cold read_many rate at the chunk's size, the cpu figure), i.e.
          with prefetching overlapping the disk read and the gather. Disk rates at a chunk size between
          two measured sizes are interpolated in log-log space (clamped at the ends).
  chunk_length[fmt]   the smallest measured chunk length whose host-source gather reaches
                      `plateau` (90%) of the best host-source gather of that format (its plateau).
  prefetch_depth[fmt] chunks in flight to hide disk latency (Little's law), at that chunk length:
                          depth = clamp(ceil(min(R_cpu, R_disk) * W), 1, depth_max)
                      W = cold latency of one store read (sequential cold read time per chunk),
                      R_cpu = chunks/s the host-source gather consumes, R_disk = chunks/s the store's
                      parallel cold reads deliver. Without a disk measurement: DEFAULT_PREFETCH_DEPTH.
  Without any measurement of a format the defaults are DEFAULT_CHUNK_LENGTH and DEFAULT_PREFETCH_DEPTH.
  `plateau` and `depth_max` are the fields of Rules.

The JSON it saves, and how TierConfig reads it back, are tierkv.profiles' (no torch there); this module
imports torch only inside the measurements.
"""

from __future__ import annotations

import datetime
import json
import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .config import FORMATS
from .profiles import (
    DEFAULT_CHUNK_LENGTH,
    DEFAULT_FORMAT,
    DEFAULT_PREFETCH_DEPTH,
    SCHEMA,
    SCHEMA_VERSION,
)

__all__ = ["Settings", "Rules", "build_settings", "run_profile", "derive", "save", "total_steps",
           "backend_in_use", "backends_status", "drop_pages", "interpolate"]

FULL_SIZES = tuple(1 << s for s in (16, 18, 20, 22, 24, 26, 28))  # 64 KiB .. 256 MiB
QUICK_SIZES = (1 << 16, 1 << 20, 1 << 24)
FULL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024)
QUICK_LENGTHS = (16, 64, 256)

Tick = Callable[[str], None]


@dataclass(frozen=True)
class Rules:
    """How measurements become recommendations.

    plateau:   a format's recommended chunk length is the smallest whose host-source gather reaches this
               share of that format's best host-source gather (shorter chunks cost more per byte).
    depth_max: the most chunks per head a recommendation keeps in flight, whatever Little's law says.
    """

    plateau: float = 0.9
    depth_max: int = 64


@dataclass(frozen=True)
class Settings:
    """What one profile run measures (see build_settings for the defaults)."""

    device: str
    disk_dir: str
    sizes: Tuple[int, ...]
    chunk_lengths: Tuple[int, ...]
    formats: Tuple[str, ...]
    heads: int
    head_dim: int
    group_size: int
    tokens: int
    torch_tokens: int
    disk_bytes: int
    min_time_s: float
    max_reps: int
    quick: bool


def build_settings(device: str, disk_dir: Optional[str] = None, quick: bool = False, sizes=None, chunk_lengths=None,
                   formats=None, tokens: Optional[int] = None, heads: int = 8, head_dim: int = 128,
                   group_size: int = 32) -> Settings:
    """Settings with defaults for a full or a --quick run; device is "cpu" or "cuda:N".

    The torch backend gathers at most torch_tokens tokens per measurement: its reference builds an index
    of 8 bytes per byte moved, which would not fit beside a full-size table.
    """
    cpu = device == "cpu"
    if tokens is None:
        tokens = (2048 if cpu else 4096) if quick else (8192 if cpu else 32768)
    return Settings(
        device=device,
        disk_dir=disk_dir or tempfile.gettempdir(),
        sizes=tuple(sorted(set(sizes))) if sizes else (QUICK_SIZES if quick else FULL_SIZES),
        chunk_lengths=tuple(sorted(set(chunk_lengths))) if chunk_lengths else (QUICK_LENGTHS if quick else FULL_LENGTHS),
        formats=tuple(dict.fromkeys(formats)) if formats else FORMATS,
        heads=heads,
        head_dim=head_dim,
        group_size=group_size,
        tokens=tokens,
        torch_tokens=min(tokens, 1024 if quick else 4096),
        disk_bytes=(8 << 20) if quick else (48 << 20),
        min_time_s=0.02 if quick else 0.05,
        max_reps=10 if quick else 40,
        quick=quick,
    )


# --- timing -----------------------------------------------------------------------------------------
def _timed(fn: Callable[[], None], sync: Callable[[], None], min_time: float, max_reps: int) -> float:
    """Seconds per call of fn: one warm-up call, one timed call to size the batch, then a timed batch."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    n = max(1, min(max_reps, int(min_time / max(one, 1e-9))))
    if n == 1:
        return one
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return min(one, (time.perf_counter() - t0) / n)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _sync_for(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- environment ------------------------------------------------------------------------------------
def backends_status() -> Dict[str, Optional[str]]:
    """{backend: None if it can run here, else why not}."""
    from . import ops

    return {name: ops.missing(name) for name in ops.BACKENDS}


def backend_in_use(device: str) -> str:
    if device == "cpu":
        return "torch"
    from . import ops

    return ops.backend()


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def versions() -> dict:
    import numpy
    import torch

    from ._version import __version__

    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:  # absent, or built for another CUDA: either way not part of this profile
        cupy_version = None
    return {
        "tierkv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": cupy_version,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def device_info(device: str) -> dict:
    import torch

    info = {"name": device, "cuda": device != "cpu", "gpu_name": None, "gpu_memory_bytes": None,
            "host_cpus": os.cpu_count()}
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu_name"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
    return info


# --- host <-> device ---------------------------------------------------------------------------------
def transfer_steps(s: Settings) -> int:
    return len(s.sizes)


def measure_transfers(s: Settings, tick: Tick) -> dict:
    import torch

    if s.device == "cpu":
        for size in s.sizes:
            tick(f"transfers {_size(size)}: no CUDA device")
        return {"available": False, "reason": "no CUDA device", "rows": []}
    dev = torch.device(s.device)
    sync = _sync_for(dev)
    rows = []
    for size in s.sizes:
        d = torch.empty(size, dtype=torch.uint8, device=dev)
        pinned = torch.ones(size, dtype=torch.uint8).pin_memory()
        pageable = torch.ones(size, dtype=torch.uint8)  # touched, so no first-touch page faults are timed
        cases = (
            ("h2d", "pinned", lambda: d.copy_(pinned, non_blocking=True)),
            ("h2d", "pageable", lambda: d.copy_(pageable)),
            ("d2h", "pinned", lambda: pinned.copy_(d, non_blocking=True)),
            ("d2h", "pageable", lambda: pageable.copy_(d)),
        )
        for direction, memory, fn in cases:
            sec = _timed(fn, sync, s.min_time_s / 2, 200)
            rows.append({"direction": direction, "memory": memory, "bytes": size, "seconds": sec,
                         "gbps": _gbps(size, sec)})
        del d, pinned, pageable
        tick(f"transfers {_size(size)}")
    return {"available": True, "reason": None, "rows": rows}


# --- gather + dequantize ------------------------------------------------------------------------------
def gather_cases(s: Settings) -> List[Tuple[str, str]]:
    """(backend, source) pairs measured for the device: every available backend, device and host sources."""
    if s.device == "cpu":
        return [("torch", "host")]
    from . import ops

    return [(b, src) for b in ops.available_backends() for src in ("device", "host")]


def gather_steps(s: Settings) -> int:
    return len(s.formats) * len(s.chunk_lengths)


def chunk_bytes(fmt: str, chunk_tokens: int, s: Settings) -> int:
    from .formats import ChunkLayout

    return ChunkLayout(fmt, chunk_tokens, s.heads, s.head_dim, s.group_size).nbytes


def _chunks(fmt: str, L: int, n_chunks: int, s: Settings):
    """n_chunks packed chunks (a few distinct ones repeated: throughput does not depend on the values)."""
    import torch

    from .formats import ChunkLayout, encode

    layout = ChunkLayout(fmt, L, s.heads, s.head_dim, s.group_size)
    g = torch.Generator().manual_seed(L)
    distinct = min(n_chunks, 4)
    k = torch.randn(distinct, s.heads, L, s.head_dim, generator=g).to(torch.bfloat16)
    v = torch.randn(distinct, s.heads, L, s.head_dim, generator=g).to(torch.bfloat16)
    packed = encode(k, v, layout)  # [distinct, nbytes]
    reps = -(-n_chunks // distinct)
    return packed.repeat(reps, 1)[:n_chunks].reshape(-1).contiguous(), layout.nbytes


def _gather_buffers(fmt: str, L: int, n_chunks: int, s: Settings, dev):
    """(host source, device source or None, table, k_out, v_out, chunk bytes) for one gather measurement."""
    import torch

    from . import ops

    flat, nbytes = _chunks(fmt, L, n_chunks, s)
    host = flat.pin_memory() if dev.type == "cuda" else flat
    device_src = flat.to(dev) if dev.type == "cuda" else None
    c = torch.arange(n_chunks, dtype=torch.int64).repeat_interleave(s.heads)
    h = torch.arange(s.heads, dtype=torch.int64).repeat(n_chunks)
    table = ops.make_table(0, c * nbytes, L, 0, h, c * L, n_kv_heads=s.heads, fmt=fmt,
                           head_dim=s.head_dim, group_size=s.group_size, device=dev)
    k_out = torch.empty(1, s.heads, n_chunks * L, s.head_dim, dtype=torch.bfloat16, device=dev)
    return host, device_src, table, k_out, torch.empty_like(k_out), nbytes


def measure_gather(s: Settings, tick: Tick) -> dict:
    import torch

    from . import ops

    dev = torch.device(s.device)
    sync = _sync_for(dev)
    cases = gather_cases(s)
    rows, skipped = [], []
    if s.device == "cpu":
        skipped.append({"backend": "ext/cupy", "source": "device", "reason": "no CUDA device"})
    for fmt in s.formats:
        for L in s.chunk_lengths:
            by_tokens: Dict[int, tuple] = {}  # one set of buffers per token count, shared by the backends
            for backend, source in cases:
                n_chunks = max(1, (s.torch_tokens if backend == "torch" else s.tokens) // L)
                if n_chunks not in by_tokens:
                    by_tokens.clear()
                    by_tokens[n_chunks] = _gather_buffers(fmt, L, n_chunks, s, dev)
                host, device_src, table, k_out, v_out, nbytes = by_tokens[n_chunks]
                src = device_src if source == "device" else host

                def run(src=src, table=table, k_out=k_out, v_out=v_out, backend=backend):
                    ops.gather([src], table, fmt, s.head_dim, s.group_size, k_out, v_out, backend=backend,
                               chunk_tokens=L)

                try:
                    sec = _timed(run, sync, s.min_time_s, s.max_reps)
                except Exception as e:  # a backend that fails here is reported, not allowed to end the profile
                    skipped.append({"backend": backend, "source": source, "reason": f"{fmt} L={L}: {e!r}"[:300]})
                    continue
                read = n_chunks * nbytes
                written = 2 * k_out.numel() * k_out.element_size()
                rows.append({
                    "format": fmt, "backend": backend, "source": source, "device": s.device, "chunk_tokens": L,
                    "chunk_bytes": nbytes, "chunks": n_chunks, "bytes_read": read, "bytes_written": written,
                    "seconds": sec, "gbps": _gbps(read + written, sec), "read_gbps": _gbps(read, sec),
                    "tokens_per_s": n_chunks * L / sec,
                })
            by_tokens.clear()
            tick(f"gather {fmt} L={L}")
    return {"rows": rows, "skipped": skipped}


# --- disk ---------------------------------------------------------------------------------------------
def disk_sizes(s: Settings) -> List[int]:
    return sorted({chunk_bytes("bf16", L, s) for L in s.chunk_lengths})


def disk_steps(s: Settings) -> int:
    return len(disk_sizes(s))


def drop_pages(paths: Sequence[str]) -> None:
    """Push clean (fsynced) files out of the page cache so the next read goes to the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# the benches bench_pipeline and bench_disk_depth still import the old name; drop it once they do not


def _files_under(root: str) -> List[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def _o_direct_problem(path: str, size: int) -> Optional[str]:
    """None if O_DIRECT reads of `path` work here, else why not."""
    if not hasattr(os, "O_DIRECT"):
        return "os.O_DIRECT is not defined on this platform"
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as e:
        return f"the filesystem refused an O_DIRECT read: {e}"
    finally:
        buf.close()
    return None


def _read_files(paths: Sequence[str], buf, flags: int = 0) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY | flags)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)


def _measure_raw(rdir: str, data: list, size: int, s: Settings, row, out: dict) -> None:
    """Plain files: each written and fsynced, the directory fsynced once; read warm, cold and O_DIRECT."""
    import numpy as np

    os.makedirs(rdir)
    paths = [os.path.join(rdir, f"{i}.bin") for i in range(len(data))]
    t0 = time.perf_counter()
    for p, d in zip(paths, data):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, d)
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(rdir, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    row("raw", "write", time.perf_counter() - t0)
    buf = np.empty(size, np.uint8)
    row("raw", "read_warm", _timed(lambda: _read_files(paths, buf), lambda: None, s.min_time_s, s.max_reps))
    drop_pages(paths)
    t0 = time.perf_counter()
    _read_files(paths, buf)
    row("raw", "read_cold", time.perf_counter() - t0)
    if out["o_direct"] is None:
        out["o_direct"] = _o_direct_problem(paths[0], size)
    if out["o_direct"] is None:
        abuf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        t0 = time.perf_counter()
        _read_files(paths, abuf, os.O_DIRECT)
        row("raw", "read_direct", time.perf_counter() - t0)
        abuf.close()
    shutil.rmtree(rdir)


def _measure_store(sdir: str, data: list, size: int, s: Settings, row) -> None:
    """DiskTier: put + flush; read() one chunk after another warm and cold; read_many() cold."""
    import torch

    from .keys import ChunkKey
    from .tiers.disk import DiskTier

    n = len(data)
    keys = [ChunkKey("profile", 0, i) for i in range(n)]
    with DiskTier(sdir, queue_depth=64) as tier:
        t0 = time.perf_counter()
        for k, d in zip(keys, data):
            tier.put(k, d)
        tier.flush()
        row("store", "write", time.perf_counter() - t0)
        big = torch.empty(n * size, dtype=torch.uint8, pin_memory=s.device != "cpu")
        outs = [big[i * size:(i + 1) * size] for i in range(n)]

        def store_read():
            for k, o in zip(keys, outs):
                tier.read(k, o)

        row("store", "read_warm", _timed(store_read, lambda: None, s.min_time_s, s.max_reps))
        files = _files_under(sdir)
        drop_pages(files)
        t0 = time.perf_counter()
        store_read()
        row("store", "read_cold", time.perf_counter() - t0)
        drop_pages(files)
        t0 = time.perf_counter()
        tier.read_many(keys, outs)
        row("store", "read_cold_parallel", time.perf_counter() - t0)
        del big, outs
    shutil.rmtree(sdir)


def _store_problem() -> Optional[str]:
    try:
        from .tiers.disk import DiskTier  # noqa: F401  (importable is what is asked)
    except ImportError as e:
        return f"the disk tier cannot be imported ({e}); store rows skipped"
    return None


def measure_disk(s: Settings, tick: Tick) -> dict:
    import torch

    out = {"available": True, "reason": _store_problem(), "path": s.disk_dir, "o_direct": None, "rows": []}
    rows = out["rows"]
    root = tempfile.mkdtemp(prefix="tierkv-profile-", dir=s.disk_dir)
    try:
        for size in disk_sizes(s):
            n = max(8 if not s.quick else 4, min(128 if not s.quick else 64, s.disk_bytes // size))
            g = torch.Generator().manual_seed(size)
            # random-normal bf16: what a raw chunk of K/V looks like to lz4 (it barely compresses)
            data = [torch.randn(size // 2, generator=g).to(torch.bfloat16).view(torch.uint8).numpy() for _ in range(n)]

            def row(path, op, sec, size=size, chunks=n):
                rows.append({"path": path, "op": op, "chunk_bytes": size, "chunks": chunks, "bytes": chunks * size,
                             "seconds": sec, "gbps": _gbps(chunks * size, sec), "latency_s": sec / chunks})

            _measure_raw(os.path.join(root, f"raw{size}"), data, size, s, row, out)
            if out["reason"] is None:
                _measure_store(os.path.join(root, f"store{size}"), data, size, s, row)
            tick(f"disk {_size(size)} x {n}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if out["reason"] is not None:
        out["available"] = bool(rows)
    return out


# --- derived figures -------------------------------------------------------------------------------
def interpolate(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """y at x, linear in log-log between the measured (x, y) points, clamped to the end points."""
    pts = sorted((px, py) for px, py in points if px > 0 and py and py > 0 and math.isfinite(py))
    if not pts:
        return None
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


def _gather_curve(rows: list, fmt: str, source: str, backend: str) -> Dict[int, dict]:
    """{chunk_tokens: row} of one format and source, for `backend`, else the fastest measured backend."""
    mine = {r["chunk_tokens"]: r for r in rows if r["format"] == fmt and r["source"] == source and r["backend"] == backend}
    if mine:
        return mine
    best: Dict[int, dict] = {}
    for r in rows:
        if r["format"] == fmt and r["source"] == source:
            if r["chunk_tokens"] not in best or r["gbps"] > best[r["chunk_tokens"]]["gbps"]:
                best[r["chunk_tokens"]] = r
    return best


def _effective_rows(fmt: str, lengths, gpu: dict, cpu: dict, parallel: list, cuda: bool) -> list:
    """The effective fetch rate of packed chunk bytes from each tier, per chunk length."""
    out = []
    for L in lengths:
        c = cpu.get(L)
        nbytes = c["chunk_bytes"] if c else (gpu[L]["chunk_bytes"] if L in gpu else None)
        per_tier = {
            "gpu": (gpu[L]["read_gbps"] if L in gpu else None,
                    f"device-source gather ({gpu[L]['backend']})" if L in gpu else "no CUDA device" if not cuda else "not measured"),
            "cpu": (c["read_gbps"] if c else None,
                    f"host-source gather ({c['backend']}{', UVA' if cuda else ', CPU'})" if c else "not measured"),
        }
        disk_gbps = interpolate(parallel, nbytes) if nbytes else None
        if disk_gbps is not None and c:
            per_tier["disk"] = (min(disk_gbps, c["read_gbps"]), "min(store cold read_many, cpu tier)")
        else:
            per_tier["disk"] = (None, "not measured")
        for tier, (gbps, via) in per_tier.items():
            tps = gbps * 1e9 / nbytes * L if gbps and nbytes else None
            out.append({"format": fmt, "chunk_tokens": L, "chunk_bytes": nbytes, "tier": tier,
                        "gbps": gbps, "tokens_per_s": tps, "via": via})
    return out


def _recommend(cpu: dict, latency: list, parallel: list, rules: Rules) -> Tuple[int, int, dict]:
    """(chunk length, prefetch depth, basis) of one format from its host-source gather curve."""
    b = {"plateau_gbps": None, "chunk_bytes": None, "latency_s": None, "consume_chunks_per_s": None,
         "disk_chunks_per_s": None, "note": ""}
    if not cpu:
        b["note"] = "no host-source gather measured: defaults"
        return DEFAULT_CHUNK_LENGTH, DEFAULT_PREFETCH_DEPTH, b
    plateau = max(r["gbps"] for r in cpu.values())
    rec = min(L for L, r in cpu.items() if r["gbps"] >= rules.plateau * plateau)
    nbytes = cpu[rec]["chunk_bytes"]
    b.update(plateau_gbps=plateau, chunk_bytes=nbytes)
    W = interpolate(latency, nbytes)
    R_cpu = cpu[rec]["read_gbps"] * 1e9 / nbytes
    disk_gbps = interpolate(parallel, nbytes)
    if W is None or disk_gbps is None:
        b.update(consume_chunks_per_s=R_cpu, note="no disk measurement: default prefetch depth")
        return rec, DEFAULT_PREFETCH_DEPTH, b
    R_disk = disk_gbps * 1e9 / nbytes
    depth = max(1, min(rules.depth_max, math.ceil(min(R_cpu, R_disk) * W)))
    b.update(latency_s=W, consume_chunks_per_s=R_cpu, disk_chunks_per_s=R_disk,
             note="depth = clamp(ceil(min(R_cpu, R_disk) * W), 1, depth_max)")
    return rec, depth, b


def derive(result: dict, rules: Rules = Rules()) -> Tuple[list, dict]:
    """(effective rows, recommendations) from the measurements in `result` (see the module docstring)."""
    s = result["settings"]
    rows = result["gather"]["rows"]
    disk_rows = result["disk"]["rows"]

    def disk_curve(op, key="gbps"):
        return [(r["chunk_bytes"], r[key]) for r in disk_rows if r["path"] == "store" and r["op"] == op]

    parallel = disk_curve("read_cold_parallel") or disk_curve("read_cold")
    latency = disk_curve("read_cold", "latency_s")
    effective, chunk_length, depth, basis = [], {}, {}, {}
    for fmt in s["formats"]:
        gpu = _gather_curve(rows, fmt, "device", result["backend"])
        cpu = _gather_curve(rows, fmt, "host", result["backend"])
        effective += _effective_rows(fmt, s["chunk_lengths"], gpu, cpu, parallel, result["device"]["cuda"])
        chunk_length[fmt], depth[fmt], basis[fmt] = _recommend(cpu, latency, parallel, rules)
    default = DEFAULT_FORMAT if DEFAULT_FORMAT in chunk_length else (next(iter(chunk_length), None))
    recs = {
        "default_format": default,
        "chunk_length": chunk_length,
        "prefetch_depth": depth,
        "chunk_length_default": chunk_length.get(default, DEFAULT_CHUNK_LENGTH),
        "prefetch_depth_default": depth.get(default, DEFAULT_PREFETCH_DEPTH),
        "plateau_fraction": rules.plateau,
        "depth_max": rules.depth_max,
        "basis": basis,
    }
    return effective, recs


# --- the whole run ---------------------------------------------------------------------------------
def total_steps(s: Settings) -> int:
    return transfer_steps(s) + gather_steps(s) + disk_steps(s)


def run_profile(s: Settings, tick: Optional[Tick] = None, command: Optional[Sequence[str]] = None) -> dict:
    """Every measurement of `s`, in the JSON schema of tierkv.profiles (tick(label) after each step)."""
    tick = tick or (lambda label: None)
    import torch

    if s.device != "cpu":
        torch.cuda.set_device(torch.device(s.device))
    result = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": list(command) if command is not None else list(sys.argv),
        "versions": versions(),
        "git_commit": git_commit(),
        "device": device_info(s.device),
        "backend": backend_in_use(s.device),
        "backends": backends_status(),
        "settings": asdict(s),
    }
    result["transfers"] = measure_transfers(s, tick)
    result["gather"] = measure_gather(s, tick)
    result["disk"] = measure_disk(s, tick)
    result["effective"], result["recommendations"] = derive(result)
    return result


def save(result: dict, path: str) -> None:
    """Write the profile as JSON: temporary name, fsync, rename (never a half-written file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    raise TypeError(f"profile: cannot save {type(x).__name__} {x!r} as JSON")


def _size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n} B"
