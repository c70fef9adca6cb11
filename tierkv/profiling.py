"""What `tierkv profile` measures, the JSON it saves, and the defaults a saved profile gives TierConfig.

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
                      PLATEAU (90%) of the best host-source gather of that format (its plateau).
  prefetch_depth[fmt] chunks in flight to hide disk latency (Little's law), at that chunk length:
                          depth = clamp(ceil(min(R_cpu, R_disk) * W), 1, DEPTH_MAX)
                      W = cold latency of one store read (sequential cold read time per chunk),
                      R_cpu = chunks/s the host-source gather consumes, R_disk = chunks/s the store's
                      parallel cold reads deliver. Without a disk measurement: DEFAULT_PREFETCH_DEPTH.
  Without any measurement of a format the defaults are DEFAULT_CHUNK_LENGTH and DEFAULT_PREFETCH_DEPTH.

JSON schema (schema "tierkv-profile", schema_version 1); sizes in bytes, times in seconds, rates in GB/s
(1e9 bytes/s):
  schema, schema_version, date (ISO 8601, local time with offset), command (argv),
  versions: {tierkv, python, torch, cuda (torch.version.cuda or null), cupy (or null), numpy, platform}
  git_commit: HEAD of the source tree, or null
  device: {name ("cpu" | "cuda:N"), cuda (bool), gpu_name, gpu_memory_bytes, host_cpus}
  backend: kernel backend in use for CUDA tensors ("ext" | "cupy" | "torch"), or "torch" on the CPU
  backends: {ext, cupy, torch: null if available, else why not}
  settings: {sizes, chunk_lengths, formats, heads, head_dim, group_size, tokens, torch_tokens, disk_dir,
             disk_bytes, min_time_s, max_reps, quick}
  transfers: {available, reason, rows: [{direction ("h2d"|"d2h"), memory ("pinned"|"pageable"), bytes,
             seconds, gbps}]}
  gather: {rows: [{format, backend, source ("device"|"host"), device, chunk_tokens, chunk_bytes, chunks,
           bytes_read, bytes_written, seconds, gbps, read_gbps, tokens_per_s}],
           skipped: [{backend, source, reason}]}
  disk: {available, reason, path, o_direct (null if usable, else why not), rows: [{path ("raw"|"store"),
         op ("write"|"read_warm"|"read_cold"|"read_direct"|"read_cold_parallel"), chunk_bytes, chunks,
         bytes, seconds, gbps, latency_s}]}
  effective: [{format, chunk_tokens, chunk_bytes, tier ("gpu"|"cpu"|"disk"), gbps (null if not
              measured), tokens_per_s, via}]
  recommendations: {default_format, chunk_length: {fmt: int}, prefetch_depth: {fmt: int},
                    chunk_length_default, prefetch_depth_default, plateau_fraction, depth_max,
                    basis: {fmt: {plateau_gbps, chunk_bytes, latency_s, consume_chunks_per_s,
                    disk_chunks_per_s, note}}}

TierConfig(profile=path) reads only `recommendations` (profile_defaults()); this module imports torch
only inside the measurements so that reading a profile stays cheap.
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
from .errors import ConfigError

SCHEMA = "tierkv-profile"
SCHEMA_VERSION = 1
PLATEAU = 0.9
DEPTH_MAX = 64
DEFAULT_CHUNK_LENGTH = 64
DEFAULT_PREFETCH_DEPTH = 2
DEFAULT_FORMAT = "bf16"
MIN_PLANNER_LENGTH = 16  # planner.BLOCK: shorter chunks than its skew blocks are never planned

FULL_SIZES = tuple(1 << s for s in (16, 18, 20, 22, 24, 26, 28))  # 64 KiB .. 256 MiB
QUICK_SIZES = (1 << 16, 1 << 20, 1 << 24)
FULL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024)
QUICK_LENGTHS = (16, 64, 256)

Tick = Callable[[str], None]
SECTIONS = ("device", "backend", "backends", "settings", "transfers", "gather", "disk", "effective", "recommendations")


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

    return {name: ops._missing(name) for name in ops.BACKENDS}


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
                tokens = s.torch_tokens if backend == "torch" else s.tokens
                n_chunks = max(1, tokens // L)
                if n_chunks not in by_tokens:
                    by_tokens.clear()
                    flat, nbytes = _chunks(fmt, L, n_chunks, s)
                    host = flat.pin_memory() if dev.type == "cuda" else flat
                    device_src = flat.to(dev) if dev.type == "cuda" else None
                    c = torch.arange(n_chunks, dtype=torch.int64).repeat_interleave(s.heads)
                    h = torch.arange(s.heads, dtype=torch.int64).repeat(n_chunks)
                    table = ops.make_table(0, c * nbytes, L, 0, h, c * L, n_kv_heads=s.heads, fmt=fmt,
                                           head_dim=s.head_dim, group_size=s.group_size, device=dev)
                    k_out = torch.empty(1, s.heads, n_chunks * L, s.head_dim, dtype=torch.bfloat16, device=dev)
                    v_out = torch.empty_like(k_out)
                    by_tokens[n_chunks] = (host, device_src, table, k_out, v_out, nbytes)
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


def _drop_pages(paths: Sequence[str]) -> None:
    """Push clean (fsynced) files out of the page cache so the next read goes to the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def measure_disk(s: Settings, tick: Tick) -> dict:
    import numpy as np
    import torch

    sizes = disk_sizes(s)
    out = {"available": True, "reason": None, "path": s.disk_dir, "o_direct": None, "rows": []}
    try:
        from .keys import ChunkKey
        from .tiers.disk import DiskTier
    except ImportError as e:
        DiskTier = None
        out["reason"] = f"the disk tier cannot be imported ({e}); store rows skipped"
    rows = out["rows"]
    pin = s.device != "cpu"
    root = tempfile.mkdtemp(prefix="tierkv-profile-", dir=s.disk_dir)
    try:
        for size in sizes:
            n = max(8 if not s.quick else 4, min(128 if not s.quick else 64, s.disk_bytes // size))
            g = torch.Generator().manual_seed(size)
            # random-normal bf16: what a raw chunk of K/V looks like to lz4 (it barely compresses)
            data = [torch.randn(size // 2, generator=g).to(torch.bfloat16).view(torch.uint8).numpy() for _ in range(n)]

            def row(path, op, sec, chunks=n):
                rows.append({"path": path, "op": op, "chunk_bytes": size, "chunks": chunks, "bytes": chunks * size,
                             "seconds": sec, "gbps": _gbps(chunks * size, sec), "latency_s": sec / chunks})

            # raw: plain files, each written and fsynced, the directory fsynced once
            rdir = os.path.join(root, f"raw{size}")
            os.makedirs(rdir)
            paths = [os.path.join(rdir, f"{i}.bin") for i in range(n)]
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

            def raw_read(paths=paths, buf=buf):
                for p in paths:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.preadv(fd, [buf], 0)
                    finally:
                        os.close(fd)

            row("raw", "read_warm", _timed(raw_read, lambda: None, s.min_time_s, s.max_reps))
            _drop_pages(paths)
            t0 = time.perf_counter()
            raw_read()
            row("raw", "read_cold", time.perf_counter() - t0)
            if out["o_direct"] is None:
                out["o_direct"] = _o_direct_problem(paths[0], size)
            if out["o_direct"] is None:
                abuf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
                t0 = time.perf_counter()
                for p in paths:
                    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                    try:
                        os.preadv(fd, [abuf], 0)
                    finally:
                        os.close(fd)
                row("raw", "read_direct", time.perf_counter() - t0)
                abuf.close()
            shutil.rmtree(rdir)

            if DiskTier is not None:
                sdir = os.path.join(root, f"store{size}")
                keys = [ChunkKey("profile", 0, i) for i in range(n)]
                with DiskTier(sdir, queue_depth=64) as tier:
                    t0 = time.perf_counter()
                    for k, d in zip(keys, data):
                        tier.put(k, d)
                    tier.flush()
                    row("store", "write", time.perf_counter() - t0)
                    big = torch.empty(n * size, dtype=torch.uint8, pin_memory=pin)
                    outs = [big[i * size:(i + 1) * size] for i in range(n)]

                    def store_read(tier=tier, keys=keys, outs=outs):
                        for k, o in zip(keys, outs):
                            tier.read(k, o)

                    row("store", "read_warm", _timed(store_read, lambda: None, s.min_time_s, s.max_reps))
                    files = _files_under(sdir)
                    _drop_pages(files)
                    t0 = time.perf_counter()
                    store_read()
                    row("store", "read_cold", time.perf_counter() - t0)
                    _drop_pages(files)
                    t0 = time.perf_counter()
                    tier.read_many(keys, outs)
                    row("store", "read_cold_parallel", time.perf_counter() - t0)
                    del big, outs
                shutil.rmtree(sdir)
            tick(f"disk {_size(size)} x {n}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if DiskTier is None:
        out["available"] = bool(rows)
    return out


# --- derived figures -------------------------------------------------------------------------------
def _interp(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
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


def derive(result: dict) -> Tuple[list, dict]:
    """(effective rows, recommendations) from the measurements in `result` (see the module docstring)."""
    s = result["settings"]
    rows = result["gather"]["rows"]
    backend = result["backend"]
    disk_rows = result["disk"]["rows"]

    def disk_curve(op, key="gbps"):
        return [(r["chunk_bytes"], r[key]) for r in disk_rows if r["path"] == "store" and r["op"] == op]

    parallel = disk_curve("read_cold_parallel") or disk_curve("read_cold")
    latency = disk_curve("read_cold", "latency_s")
    effective, chunk_length, depth, basis = [], {}, {}, {}
    for fmt in s["formats"]:
        gpu = _gather_curve(rows, fmt, "device", backend)
        cpu = _gather_curve(rows, fmt, "host", backend)
        for L in s["chunk_lengths"]:
            c = cpu.get(L)
            nbytes = c["chunk_bytes"] if c else (gpu[L]["chunk_bytes"] if L in gpu else None)
            per_tier = {
                "gpu": (gpu[L]["read_gbps"] if L in gpu else None,
                        f"device-source gather ({gpu[L]['backend']})" if L in gpu else "no CUDA device" if not result["device"]["cuda"] else "not measured"),
                "cpu": (c["read_gbps"] if c else None,
                        f"host-source gather ({c['backend']}{', UVA' if result['device']['cuda'] else ', CPU'})" if c else "not measured"),
            }
            disk_gbps = _interp(parallel, nbytes) if nbytes else None
            if disk_gbps is not None and c:
                per_tier["disk"] = (min(disk_gbps, c["read_gbps"]), "min(store cold read_many, cpu tier)")
            else:
                per_tier["disk"] = (None, "not measured")
            for tier, (gbps, via) in per_tier.items():
                tps = gbps * 1e9 / nbytes * L if gbps and nbytes else None
                effective.append({"format": fmt, "chunk_tokens": L, "chunk_bytes": nbytes, "tier": tier,
                                  "gbps": gbps, "tokens_per_s": tps, "via": via})
        b = {"plateau_gbps": None, "chunk_bytes": None, "latency_s": None, "consume_chunks_per_s": None,
             "disk_chunks_per_s": None, "note": ""}
        if cpu:
            plateau = max(r["gbps"] for r in cpu.values())
            rec = min(L for L, r in cpu.items() if r["gbps"] >= PLATEAU * plateau)
            b["plateau_gbps"] = plateau
            nbytes = cpu[rec]["chunk_bytes"]
            b["chunk_bytes"] = nbytes
            W = _interp(latency, nbytes)
            R_cpu = cpu[rec]["read_gbps"] * 1e9 / nbytes
            disk_gbps = _interp(parallel, nbytes)
            if W is not None and disk_gbps is not None:
                R_disk = disk_gbps * 1e9 / nbytes
                d = max(1, min(DEPTH_MAX, math.ceil(min(R_cpu, R_disk) * W)))
                b.update(latency_s=W, consume_chunks_per_s=R_cpu, disk_chunks_per_s=R_disk,
                         note="depth = clamp(ceil(min(R_cpu, R_disk) * W), 1, DEPTH_MAX)")
            else:
                d = DEFAULT_PREFETCH_DEPTH
                b.update(consume_chunks_per_s=R_cpu, note="no disk measurement: default prefetch depth")
        else:
            rec, d = DEFAULT_CHUNK_LENGTH, DEFAULT_PREFETCH_DEPTH
            b["note"] = "no host-source gather measured: defaults"
        chunk_length[fmt], depth[fmt], basis[fmt] = rec, d, b
    default = DEFAULT_FORMAT if DEFAULT_FORMAT in chunk_length else (next(iter(chunk_length), None))
    recs = {
        "default_format": default,
        "chunk_length": chunk_length,
        "prefetch_depth": depth,
        "chunk_length_default": chunk_length.get(default, DEFAULT_CHUNK_LENGTH),
        "prefetch_depth_default": depth.get(default, DEFAULT_PREFETCH_DEPTH),
        "plateau_fraction": PLATEAU,
        "depth_max": DEPTH_MAX,
        "basis": basis,
    }
    return effective, recs


# --- the whole run ---------------------------------------------------------------------------------
def total_steps(s: Settings) -> int:
    return transfer_steps(s) + gather_steps(s) + disk_steps(s)


def run_profile(s: Settings, tick: Optional[Tick] = None, command: Optional[Sequence[str]] = None) -> dict:
    """Every measurement of `s`, in the JSON schema of the module docstring (tick(label) after each step)."""
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


# --- reading a saved profile --------------------------------------------------------------------------
def load(path: str) -> dict:
    """A saved profile, checked to be one; ConfigError naming `profile` otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"profile: {path!r} is not valid JSON ({e}); expected a file saved by `tierkv profile --json`") from None
    except OSError as e:
        raise ConfigError(f"profile: cannot read {path!r}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ConfigError(f"profile: {path!r} is not a tierkv profile (expected \"schema\": \"{SCHEMA}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"profile: {path!r} has schema_version {data.get('schema_version')!r}; this build reads version {SCHEMA_VERSION}"
        )
    recs = data.get("recommendations")
    if not isinstance(recs, dict):
        raise ConfigError(f"profile: {path!r} lacks the \"recommendations\" object")
    for name in ("chunk_length_default", "prefetch_depth_default"):
        _check_int(recs.get(name), f"recommendations.{name}", path, 1 if name.startswith("chunk") else 0)
    for name in ("chunk_length", "prefetch_depth"):
        per = recs.get(name)
        if not isinstance(per, dict):
            raise ConfigError(f"profile: {path!r} lacks recommendations.{name} (an object of format -> integer)")
        for fmt, v in per.items():
            _check_int(v, f"recommendations.{name}.{fmt}", path, 1 if name == "chunk_length" else 0)
    return data


def _check_int(v, what: str, path: str, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"profile: {path!r} has {what} = {v!r}; expected an integer >= {lo}")


def profile_defaults(path: str, fmt: str) -> Tuple[int, int]:
    """(recommended chunk length, prefetch depth) of the saved profile at `path` for chunk format `fmt`
    (the profile's defaults where it did not measure that format)."""
    recs = load(path)["recommendations"]
    return (recs["chunk_length"].get(fmt, recs["chunk_length_default"]),
            recs["prefetch_depth"].get(fmt, recs["prefetch_depth_default"]))


def lengths_around(length: int) -> Tuple[int, ...]:
    """Planner chunk lengths around a recommended one: length/4 .. 4*length by doubling, none below
    MIN_PLANNER_LENGTH unless the recommendation itself is (64 gives TierConfig's defaults)."""
    lo = min(length, MIN_PLANNER_LENGTH)
    return tuple(sorted(x for x in {length >> 2, length >> 1, length, length << 1, length << 2} if x >= lo))


def _size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n} B"
