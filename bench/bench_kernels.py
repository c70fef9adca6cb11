"""Gather + dequantize kernel throughput, next to the copies it should approach, in one run.

Per format and chunk length, a pool of packed chunks twice the size of what is selected lies in GPU
memory ("device") or pinned host memory ("host"); every (sequence, KV head) selects a random half of
its pool's chunks, N tokens, which one gather writes to K/V [B, H, N, D]. Measured side by side:

  kernel      ops.gather with the ext backend (and cupy with --cupy)
  ref         the torch reference (index_select + formats.decode), same table
  memcpy      one cudaMemcpyAsync per table entry (head block), no decode: the naive DMA path
  copy        one cudaMemcpyAsync of the same source bytes, contiguous: D2D for device sources,
              pinned H2D for host sources
and once per run the copy peaks: a 256 MiB device-to-device copy and a 256 MiB pinned H2D copy.

Kernel and copy times are CUDA events around 10 back-to-back calls (so the GPU, not Python's
dispatch of some 20 us per call, sets the pace), and for the ext kernel also CUDA-graph replays of
the kernel alone; the bandwidth targets are judged on the latter. (bench/results/kernels_h100.json
predates this: one isolated call per sample, which adds Python's dispatch time, ~20 us, to
device-source kernels of 40-80 us; docs/decisions.md.)

Effective GB/s counts bytes read plus bytes written (the packed source bytes + the K/V output) over
the time. Targets: device sources at least 80% of the D2D copy peak (both read+written); host
sources at least 85% of the pinned H2D peak in source bytes over PCIe per second, for head blocks of
8 KiB and more; at least 5x the torch reference. Beside the D2D fraction, device rows give the
fraction of their traffic's ceiling: a D2D copy of the bytes read plus a fill (write-only) of the rest
of the bytes written, at the peaks' rates. A quantized gather writes 2-6x what it reads, and the copy
peak (half reads, half writes) is only its ceiling if writes alone go no faster than that. (On the
H200 they go faster: 4.35 TB/s filled as int64 against a 4.1 TB/s copy, so the ceiling of a
quantized gather lies above the copy peak.)

    python bench/bench_kernels.py --out bench/results/kernels_h100.json      # kernels_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierkv import ops  # noqa: E402
from tierkv.formats import ChunkLayout  # noqa: E402
from tierkv.profiling import git_commit  # noqa: E402

FORMATS = ("bf16", "fp16", "int8", "int4", "int2")


def timed(fn, iters: int, warmup: int = 3, reps: int = 1) -> float:
    """Median seconds per fn() call: `iters` samples, each CUDA events around `reps` back-to-back calls.
    With reps > 1 the launches queue up while the GPU works, so a kernel longer than its Python
    dispatch (tens of us) is timed by the GPU, not by the dispatch; reps=1 times one isolated call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times)


def graph_timed(fn, iters: int, reps: int = 10):
    """Seconds per fn() on the GPU alone: `reps` calls captured in a CUDA graph, replays timed.
    None if the call cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        return timed(g.replay, iters) / reps
    except Exception as e:  # capture unsupported here
        print(f"  (no CUDA graph: {type(e).__name__}: {e})", flush=True)
        return None


def copy_peaks(nbytes: int, iters: int) -> dict:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_d2d = timed(lambda: dst.copy_(src, non_blocking=True), iters, reps=5)
    # write-only: a fill of the same bytes (a gather of a quantized format writes 2-6x what it reads, so
    # the copy peak, half reads and half writes, is not the ceiling of its traffic; see traffic_ceiling).
    # Filled as int64: torch's uint8 fill_ stores 4 bytes a thread and writes at ~3.2 TB/s on the H200,
    # where 8- and 16-byte stores write at 3.9-4.4 TB/s (bench/results/store_paths_h200.json).
    wide = dst.view(torch.int64)
    t_fill = timed(lambda: wide.fill_(7), iters, reps=5)
    host = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    t_h2d = timed(lambda: dst.copy_(host, non_blocking=True), iters, reps=2)
    return {
        "bytes": nbytes,
        "d2d_s": t_d2d, "d2d_GBps_read_plus_written": 2 * nbytes / t_d2d / 1e9,
        "fill_s": t_fill, "fill_GBps_written": nbytes / t_fill / 1e9,
        "h2d_s": t_h2d, "h2d_GBps": nbytes / t_h2d / 1e9, "h2d_GBps_read_plus_written": 2 * nbytes / t_h2d / 1e9,
    }


def traffic_ceiling(read: int, written: int, peaks: dict) -> float:
    """Seconds the fastest primitives take for this traffic at the peaks' rates: a D2D copy of the bytes
    read (as many written) plus a fill of the rest of the bytes written. For 16-bit formats (read ==
    written) it is the copy peak itself; for quantized ones, which write more than they read, it says
    how far the kernel is from what the memory system does with the same reads and writes."""
    copied = min(read, written)
    return copied * peaks["d2d_s"] / peaks["bytes"] + max(0, written - copied) * peaks["fill_s"] / peaks["bytes"] \
        + max(0, read - copied) * peaks["d2d_s"] / peaks["bytes"]


def scene(fmt: str, L: int, B: int, H: int, D: int, N: int, G: int, where: str):
    """A pool of 2N/L chunks per sequence (all heads, packed back to back) and a table selecting N/L of
    them per (sequence, head) at random."""
    lay = ChunkLayout(fmt, L, H, D, G)
    per_row = N // L
    pool = 2 * per_row
    nbytes = B * pool * lay.nbytes
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    src = data if where == "device" else data.cpu().pin_memory()
    sel = torch.rand(B, H, pool, device="cuda").argsort(-1)[..., :per_row].sort(-1).values  # [B, H, per_row]
    b = torch.arange(B, device="cuda").view(B, 1, 1).expand_as(sel)
    h = torch.arange(H, device="cuda").view(1, H, 1).expand_as(sel)
    j = torch.arange(per_row, device="cuda").view(1, 1, per_row).expand_as(sel)
    table = ops.make_table(0, (b * pool + sel).reshape(-1) * lay.nbytes, L, b.reshape(-1), h.reshape(-1),
                           (j * L).reshape(-1), n_kv_heads=H, fmt=fmt, head_dim=D, group_size=G)
    return src, table, lay


def run(args) -> dict:
    dev = torch.cuda.get_device_properties(0)
    results = {
        "device": dev.name, "sm_count": dev.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "backends": ops.available_backends(),
        "git_commit": git_commit(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {"batch": args.batch, "kv_heads": args.heads, "head_dim": args.head_dim, "tokens_per_row": args.tokens,
                   "group_size": args.group, "out_dtype": "bfloat16", "iters": args.iters},
    }
    warm = torch.randn(4096, 4096, device="cuda")
    t_end = time.time() + 1.0  # clocks up before anything is timed
    while time.time() < t_end:
        warm = warm @ warm.T / 4096
    torch.cuda.synchronize()
    peaks = copy_peaks(256 << 20, args.iters)
    results["peaks"] = peaks
    print(f"{dev.name}: D2D copy peak {peaks['d2d_GBps_read_plus_written']:.0f} GB/s (read+written), "
          f"fill {peaks['fill_GBps_written']:.0f} GB/s (written), pinned H2D peak {peaks['h2d_GBps']:.1f} GB/s", flush=True)
    B, H, D, N = args.batch, args.heads, args.head_dim, args.tokens
    k_out = torch.empty(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    v_out = torch.empty_like(k_out)
    rows = []
    for fmt in args.formats:
        for L in args.lengths:
            for where in ("device", "host"):
                r = measure_scene(args, fmt, L, where, k_out, v_out, peaks)
                rows.append(r)
                _print_row(r)
                torch.cuda.empty_cache()  # free the scene before the next one is allocated
    results["rows"] = rows
    results["small"] = small_calls(args)
    if args.sweep:
        results["sweep"] = sweep(args)
    return results


def measure_scene(args, fmt: str, L: int, where: str, k_out, v_out, peaks: dict) -> dict:
    """One row: the kernel (ext, and cupy with --cupy), the torch reference, per-chunk memcpy and one
    contiguous copy of the same source bytes, on one scene of `fmt` chunks of L tokens in `where`."""
    B, H, D, N, G = args.batch, args.heads, args.head_dim, args.tokens, args.group
    written = 2 * k_out.numel() * k_out.element_size()
    src, table, lay = scene(fmt, L, B, H, D, N, G, where)
    E = table.shape[0]
    hb = lay.head_bytes
    read = E * hb
    r = {"format": fmt, "chunk_len": L, "source": where, "entries": E, "head_block_bytes": hb,
         "chunk_bytes": lay.nbytes, "bytes_read": read, "bytes_written": written}
    kernel_backends = ["ext"] + (["cupy"] if args.cupy and "cupy" in ops.available_backends() else [])
    for name in kernel_backends:
        fn = lambda name=name: ops.gather([src], table, fmt, D, G, k_out, v_out, backend=name,  # noqa: E731
                                          chunk_tokens=L)
        t = timed(fn, args.iters, reps=10)
        r[f"{name}_s"] = t
        r[f"{name}_GBps"] = (read + written) / t / 1e9
        if name == "ext":  # the kernel alone, Python dispatch excluded
            tg = graph_timed(fn, args.iters)
            r["ext_graph_s"] = tg
            r["ext_graph_GBps"] = (read + written) / tg / 1e9 if tg else None
    t_ref = timed(lambda: ops.gather([src], table, fmt, D, G, k_out, v_out, backend="torch"), args.ref_iters, warmup=1)
    r["ref_s"] = t_ref
    r["ref_GBps"] = (read + written) / t_ref / 1e9
    # one cudaMemcpyAsync per entry (head block) into a staging buffer, no decode
    staging = torch.empty(read, dtype=torch.uint8, device="cuda")
    tc = table.cpu()
    copies = torch.stack([tc[:, 0], tc[:, 1], torch.full_like(tc[:, 0], hb), torch.arange(E) * hb], 1).contiguous()
    t_mc = timed(lambda: torch.ops.tierkv.copy_chunks([src], copies, staging), max(3, args.iters // 4), warmup=1)
    r["memcpy_per_chunk_s"] = t_mc
    r["memcpy_per_chunk_GBps"] = 2 * read / t_mc / 1e9
    # one contiguous copy of the same number of source bytes
    t_cp = timed(lambda: staging.copy_(src[:read], non_blocking=True), args.iters, reps=5)  # D2D or pinned H2D
    r["copy_same_bytes_s"] = t_cp
    r["copy_same_bytes_GBps"] = read / t_cp / 1e9
    t = r["ext_graph_s"] or r["ext_s"]
    if where == "device":
        r["frac_of_d2d_peak"] = (read + written) / t / 1e9 / peaks["d2d_GBps_read_plus_written"]
        r["traffic_ceiling_s"] = traffic_ceiling(read, written, peaks)
        r["frac_of_traffic_ceiling"] = r["traffic_ceiling_s"] / t
    else:
        r["pcie_GBps"] = read / t / 1e9
        r["frac_of_h2d_peak"] = r["pcie_GBps"] / peaks["h2d_GBps"]
    r["x_ref"] = t_ref / r["ext_s"]  # per call, dispatch included on both sides
    r["x_memcpy_per_chunk"] = t_mc / r["ext_s"]
    return r


def sweep(args) -> list:
    """Launch-shape sensitivity of a few configurations: parts, tile_tokens and blocks forced."""
    B, H, D, N, G = args.batch, args.heads, args.head_dim, args.tokens, args.group
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k_out = torch.empty(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    v_out = torch.empty_like(k_out)
    out = []
    for fmt, L, where in (("bf16", 64, "device"), ("bf16", 16, "host"), ("int4", 64, "device"), ("int2", 16, "device"),
                          ("int8", 128, "device"), ("int4", 64, "host")):
        src, table, lay = scene(fmt, L, B, H, D, N, G, where)
        total = table.shape[0] * lay.head_bytes + 2 * k_out.numel() * 2
        tiles = [None] + ([8, 32] if fmt.startswith("int") else [])
        for parts in (None, 1, 2, 4):
            for tile in tiles:
                for blocks in (None, 2 * sms, 8 * sms):
                    fn = lambda: ops.gather([src], table, fmt, D, G, k_out, v_out, backend="ext", parts=parts,  # noqa: E731
                                            tile_tokens=tile, blocks=blocks)
                    t = timed(fn, args.iters)
                    plan = ops.launch_plan(fmt, table.shape[0], D, G if fmt.startswith("int") else D, N, 0, parts, tile, blocks)
                    out.append({"format": fmt, "chunk_len": L, "source": where, "parts": plan[0], "tile_tokens": plan[1],
                                "blocks": plan[2], "GBps": total / t / 1e9, "forced": [parts, tile, blocks]})
        best = max((r for r in out if r["format"] == fmt and r["chunk_len"] == L and r["source"] == where),
                   key=lambda r: r["GBps"])
        auto = next(r for r in out if r["format"] == fmt and r["chunk_len"] == L and r["source"] == where
                    and r["forced"] == [None, None, None])
        print(f"sweep {fmt} L={L} {where}: auto {auto['GBps']:.0f} GB/s (parts {auto['parts']}, tile {auto['tile_tokens']}, "
              f"blocks {auto['blocks']}); best {best['GBps']:.0f} GB/s (parts {best['parts']}, tile {best['tile_tokens']}, "
              f"blocks {best['blocks']})", flush=True)
    return out


def small_calls(args) -> list:
    """One decode-sized gather (B=1, 8 KV heads, 2048 selected tokens of 32-token chunks): GPU time of
    the kernel (CUDA graph of 20 calls, replayed) and wall time per call from Python (what a decode
    step pays per layer, dispatch and checks included)."""
    out = []
    for fmt in args.formats:
        for where in ("device", "host"):
            src, table, lay = scene(fmt, 32, 1, 8, args.head_dim, 2048, args.group, where)
            k = torch.empty(1, 8, 2048, args.head_dim, dtype=torch.bfloat16, device="cuda")
            v = torch.empty_like(k)
            call = lambda: ops.gather([src], table, fmt, args.head_dim, args.group, k, v, backend="ext",  # noqa: E731
                                      chunk_tokens=32)
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                call()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 200
            gpu = None
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(20):
                        call()
                gpu = timed(g.replay, args.iters) / 20
            except Exception as e:  # capture unsupported here: report wall time only
                print(f"  (no CUDA graph: {type(e).__name__}: {e})")
            rw = table.shape[0] * lay.head_bytes + 2 * k.numel() * 2
            out.append({"format": fmt, "source": where, "wall_us_per_call": wall * 1e6,
                        "gpu_us": gpu * 1e6 if gpu else None, "bytes_read": table.shape[0] * lay.head_bytes,
                        "bytes_written": 2 * k.numel() * 2, "gpu_GBps": rw / gpu / 1e9 if gpu else None})
            print(f"  decode-sized gather {fmt:5s} {where:6s}: kernel {gpu * 1e6 if gpu else float('nan'):6.1f} us "
                  f"({rw / gpu / 1e9 if gpu else float('nan'):6.0f} GB/s), {wall * 1e6:6.1f} us per call from Python",
                  flush=True)
    return out


def _print_row(r):
    extra = (f"{100 * r['frac_of_d2d_peak']:5.1f}% of D2D peak, {100 * r['frac_of_traffic_ceiling']:5.1f}% of its "
             f"traffic's ceiling" if r["source"] == "device"
             else f"PCIe {r['pcie_GBps']:5.1f} GB/s = {100 * r['frac_of_h2d_peak']:5.1f}% of H2D peak")
    cupy = f" cupy {r['cupy_GBps']:7.1f}" if "cupy_GBps" in r else ""
    graph = f" (kernel alone {r['ext_graph_GBps']:7.1f})" if r.get("ext_graph_GBps") else ""
    print(f"{r['format']:5s} L={r['chunk_len']:3d} {r['source']:6s} block {r['head_block_bytes'] / 1024:6.1f} KiB: "
          f"ext {r['ext_GBps']:7.1f} GB/s{graph}{cupy} | {extra} | ref {r['ref_GBps']:6.1f} (x{r['x_ref']:.0f}) | "
          f"memcpy/chunk {r['memcpy_per_chunk_GBps']:6.1f} (x{r['x_memcpy_per_chunk']:.1f}) | "
          f"copy same bytes {r['copy_same_bytes_GBps']:6.1f}", flush=True)


# bench_store_paths still reads this name; drop it once it calls tierkv.profiling.git_commit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096, help="selected tokens per (sequence, KV head)")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ref-iters", type=int, default=3)
    p.add_argument("--cupy", action="store_true", help="also time the cupy backend")
    p.add_argument("--sweep", action="store_true", help="also sweep forced launch shapes on a few configurations")
    p.add_argument("--profile", metavar="FMT:L:WHERE", help="only run that gather 8 times (under a profiler such as ncu)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    if "ext" not in ops.available_backends():
        raise SystemExit(f"the extension is not built: {ops.missing('ext')}")
    if args.profile:
        fmt, L, where = args.profile.split(":")
        B, H, D, N, G = args.batch, args.heads, args.head_dim, args.tokens, args.group
        src, table, lay = scene(fmt, int(L), B, H, D, N, G, where)
        k_out = torch.empty(B, H, N, D, dtype=torch.bfloat16, device="cuda")
        v_out = torch.empty_like(k_out)
        for _ in range(8):
            ops.gather([src], table, fmt, D, G, k_out, v_out, backend="ext", chunk_tokens=int(L))
        torch.cuda.synchronize()
        return
    write_results(run(args), args.out)


def write_results(res: dict, path) -> None:
    """The results as JSON at `path` (nothing if None), folders made as needed."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
