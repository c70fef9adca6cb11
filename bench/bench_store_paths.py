"""Device-source gathers: write-path ceilings and store / loop / work-split variants, in one run.

The quantized gathers write 2-6x what they read, so the copy peak (half reads, half writes) is their
ceiling only if writes alone go no faster. bench_kernels.py measures writes with torch's fill_; this
script asks whether that is the hardware's write ceiling or fill_'s, and whether another store
instruction moves the gathers closer to it. Side by side, same process, same buffers:

  ceilings  256 MiB: torch copy_ and fill_/zero_ (what bench_kernels uses), and kernels of our own
            (compiled here by NVRTC): a 16-byte-per-thread read-only pass, copies and write-only
            passes with the default store and with .cs, .L1::no_allocate and an L2 evict-first
            policy, and a Hopper bulk store (cp.async.bulk, shared -> global), each at a few grid sizes
            with the best kept and all reported
  gathers   csrc/tierkv_kernels.cuh compiled by NVRTC once per variant (stores: TIERKV_ST_HINT /
            TIERKV_ST_L2_EVICT_FIRST; decode loops: TIERKV_ROW_UNROLL; work split: parts), outputs
            checked equal across variants, each gather timed as CUDA-graph replays beside the ext
            extension's (the default store) on the same scene, at bench_kernels' scene (4096 selected
            tokens per row) and at 4x that, next to a D2D copy moving the same bytes (the copy peak at
            that size, launch ramp and tail included as in the gather)

    python bench/bench_store_paths.py --out bench/results/store_paths_h200.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_kernels as bk  # noqa: E402
from tierkv import _cupy_backend as cb  # noqa: E402
from tierkv import ops  # noqa: E402
from tierkv.profiling import git_commit  # noqa: E402

MICRO = r"""
typedef unsigned long long u64;
typedef long long i64;
__device__ __forceinline__ unsigned smaddr(const void* p) {
  u64 a; asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p)); return (unsigned)a;
}
#define GRID_LOOP for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (i64)gridDim.x * blockDim.x)
#define ST(hint) asm volatile("st.global" hint ".v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p + 16 * i), "r"(v), "r"(v), "r"(v), "r"(v) : "memory")
extern "C" __global__ void w_plain(char* p, i64 n16, unsigned v) { GRID_LOOP ST(""); }
extern "C" __global__ void w_cs(char* p, i64 n16, unsigned v) { GRID_LOOP ST(".cs"); }
extern "C" __global__ void w_noalloc(char* p, i64 n16, unsigned v) { GRID_LOOP ST(".L1::no_allocate"); }
extern "C" __global__ void w_l2ef(char* p, i64 n16, unsigned v) {
  u64 pol; asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  GRID_LOOP asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" :: "l"(p + 16 * i), "r"(v), "r"(v), "r"(v), "r"(v), "l"(pol) : "memory");
}
extern "C" __global__ void r_nc(const char* p, i64 n16, unsigned* out) {
  unsigned acc = 0;
  GRID_LOOP {
    unsigned a, b, c, d;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p + 16 * i));
    acc ^= a ^ b ^ c ^ d;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; practically never taken
}
#define CP(hint) GRID_LOOP { unsigned a, b, c, d; \
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(s + 16 * i)); \
  asm volatile("st.global" hint ".v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p + 16 * i), "r"(a), "r"(b), "r"(c), "r"(d) : "memory"); }
extern "C" __global__ void c_plain(char* p, const char* s, i64 n16) { CP("") }
extern "C" __global__ void c_cs(char* p, const char* s, i64 n16) { CP(".cs") }
// bulk store: the block fills `chunk` bytes of shared memory once, then its first thread streams them
// to every chunk of the buffer it owns with cp.async.bulk (the TMA engine does the writes)
extern "C" __global__ void w_bulk(char* p, i64 n, int chunk, unsigned v) {
  extern __shared__ __align__(128) unsigned sm[];
  for (int i = threadIdx.x; i < chunk / 4; i += blockDim.x) sm[i] = v;
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    for (i64 off = (i64)blockIdx.x * chunk; off < n; off += (i64)gridDim.x * chunk) {
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(p + off), "r"(smaddr(sm)), "r"(chunk) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  }
  __syncthreads();
}
"""

# name -> (NVRTC defines, parts multiplier over ops' plan)
VARIANTS = {
    "plain": (('-DTIERKV_ST_HINT=""',), 1),  # the store before ab570a5
    "no_allocate": ((), 1),  # the default build
    "no_allocate_parts2x": ((), 2),
    "no_allocate_unroll2": (("-DTIERKV_ROW_UNROLL=2",), 1),
    "no_allocate_unroll4": (("-DTIERKV_ROW_UNROLL=4",), 1),
    "cs": (('-DTIERKV_ST_HINT=".cs"',), 1),
    "l2_evict_first": (("-DTIERKV_ST_L2_EVICT_FIRST",), 1),
}


def _stream():
    import cupy

    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream, torch.cuda.current_device())


def ceilings(nbytes: int, iters: int) -> dict:
    import cupy

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    mod = cupy.RawModule(code=MICRO, options=("--std=c++17",))
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    n16 = nbytes // 16
    out = {"bytes": nbytes, "torch": {}, "kernels": {}}
    for name, fn, moved in (("copy_", lambda: dst.copy_(src, non_blocking=True), 2 * nbytes),
                            ("fill_(7) uint8", lambda: dst.fill_(7), nbytes),
                            ("zero_", lambda: dst.zero_(), nbytes),
                            ("fill_ as int64", lambda: dst.view(torch.int64).fill_(7), nbytes)):
        t = bk.timed(fn, iters, reps=5)
        out["torch"][name] = {"s": t, "GBps": moved / t / 1e9}
        print(f"torch {name:16s} {moved / t / 1e9:7.0f} GB/s", flush=True)
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")

    def launch(kname, grid, threads, args, smem=0):
        k = mod.get_function(kname)
        if smem > 48 * 1024:
            k.max_dynamic_shared_size_bytes = smem
        with _stream():
            k((grid,), (threads,), args, shared_mem=smem)

    import numpy as np

    cases = [(f"write {k[2:]}", k, lambda g, k=k: launch(k, g, 256, (dst.data_ptr(), np.int64(n16), np.uint32(7))), nbytes)
             for k in ("w_plain", "w_cs", "w_noalloc", "w_l2ef")]
    cases.append(("read nc", "r_nc", lambda g: launch("r_nc", g, 256, (src.data_ptr(), np.int64(n16), sink.data_ptr())), nbytes))
    cases += [(f"copy {k[2:]}", k, lambda g, k=k: launch(k, g, 256, (dst.data_ptr(), src.data_ptr(), np.int64(n16))), 2 * nbytes)
              for k in ("c_plain", "c_cs")]
    for chunk in (4096, 16384, 32768):
        cases.append((f"write bulk {chunk // 1024} KiB", "w_bulk",
                      lambda g, c=chunk: launch("w_bulk", g, 128, (dst.data_ptr(), np.int64(nbytes), np.int32(c), np.uint32(7)), c),
                      nbytes))
    for label, kname, fn, moved in cases:
        per_grid = {}
        for mult in (2, 4, 8, 16, 32):
            g = sms * mult
            t = bk.timed(lambda: fn(g), iters, reps=5)
            per_grid[g] = moved / t / 1e9
        best = max(per_grid, key=per_grid.get)
        out["kernels"][label] = {"GBps_by_grid": per_grid, "best_grid": best, "GBps": per_grid[best]}
        print(f"kernel {label:20s} {per_grid[best]:7.0f} GB/s (grid {best}; "
              + ", ".join(f"{g}: {v:.0f}" for g, v in per_grid.items()) + ")", flush=True)
    # the bulk store must really have written the pattern
    dst.zero_()
    launch("w_bulk", sms * 4, 128, (dst.data_ptr(), np.int64(nbytes), np.int32(16384), np.uint32(0x07070707)), 16384)
    torch.cuda.synchronize()
    out["bulk_store_checked"] = bool((dst == 7).all().item())
    print(f"bulk store wrote every byte: {out['bulk_store_checked']}", flush=True)
    return out


def variant_module(defines):
    import cupy

    with open(cb.header_path()) as f:
        source = f.read()
    t0 = time.time()
    mod = cupy.RawModule(code=source, options=cb.NVRTC_OPTIONS + tuple(defines),
                         name_expressions=list(cb.GATHER_KERNELS.values()))
    mod.compile()
    return mod, time.time() - t0


def gathers(args, peaks) -> list:
    mods = {}
    for name, (defs, _) in VARIANTS.items():
        mods[name], dt = variant_module(defs)
        print(f"compiled variant {name} in {dt:.1f} s", flush=True)
    rows = []
    for N in args.tokens:
        rows += _gathers(args, peaks, mods, N)
    return rows


def _gathers(args, peaks, mods, N) -> list:
    B, H, D, G = args.batch, args.heads, args.head_dim, args.group
    k_out = torch.empty(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    v_out = torch.empty_like(k_out)
    written = 2 * k_out.numel() * 2
    original = cb._module
    rows = []
    try:
        for fmt in args.formats:
            for L in args.lengths:
                src, table, lay = bk.scene(fmt, L, B, H, D, N, G, "device")
                read = table.shape[0] * lay.head_bytes
                r = {"format": fmt, "chunk_len": L, "tokens_per_row": N, "bytes_read": read, "bytes_written": written}
                # a D2D copy moving as many bytes (read + written) as this gather: the copy peak at this
                # size, launch ramp and tail included as they are in the gather's time
                half = (read + written) // 2 // 16 * 16
                a_buf = torch.empty(half, dtype=torch.uint8, device="cuda")
                b_buf = torch.empty_like(a_buf)
                cp = lambda: b_buf.copy_(a_buf, non_blocking=True)  # noqa: E731
                t_cp = bk.graph_timed(cp, args.iters) or bk.timed(cp, args.iters, reps=10)
                r["copy_same_traffic_GBps"] = 2 * half / t_cp / 1e9
                a_buf = b_buf = None
                ext_fn = lambda: ops.gather([src], table, fmt, D, G, k_out, v_out, backend="ext")  # noqa: E731
                ext = bk.graph_timed(ext_fn, args.iters) or bk.timed(ext_fn, args.iters, reps=10)
                r["ext_GBps"] = (read + written) / ext / 1e9
                ref = None
                auto_parts = ops.launch_plan(fmt, table.shape[0], D, G if fmt.startswith("int") else D, N, 0)[0]
                for name, mod in mods.items():
                    pm = VARIANTS[name][1]
                    parts = auto_parts * pm if pm != 1 else None
                    cb._module = lambda index, mod=mod: mod
                    fn = lambda: ops.gather([src], table, fmt, D, G, k_out, v_out, backend="cupy",  # noqa: E731
                                            parts=parts)
                    fn()
                    torch.cuda.synchronize()
                    got = torch.cat([k_out.flatten(), v_out.flatten()]).view(torch.int16)
                    if ref is None:
                        ref = got.clone()
                    r[f"{name}_same_output"] = bool(torch.equal(got, ref))
                    t = bk.graph_timed(fn, args.iters) or bk.timed(fn, args.iters, reps=10)
                    r[f"{name}_GBps"] = (read + written) / t / 1e9 if t else None
                cb._module = original
                r["ceiling_GBps"] = (read + written) / bk.traffic_ceiling(read, written, peaks) / 1e9
                rows.append(r)
                print(f"{fmt:5s} L={L:3d} N={N}: copy of the same traffic {r['copy_same_traffic_GBps']:6.0f} | "
                      f"ext {r['ext_GBps']:6.0f} | " + " | ".join(
                    f"{n} {r[f'{n}_GBps'] or float('nan'):6.0f}" for n in mods) + f" | fill-based ceiling {r['ceiling_GBps']:6.0f}"
                    + ("" if all(r[f"{n}_same_output"] for n in mods) else "  OUTPUTS DIFFER"), flush=True)
                src = None
                torch.cuda.empty_cache()
    finally:
        cb._module = original
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4", "int2"])
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_store_paths needs a CUDA device")
    if "ext" not in ops.available_backends() or "cupy" not in ops.available_backends():
        raise SystemExit(f"needs both the extension and cupy: {ops.available_backends()}")
    dev = torch.cuda.get_device_properties(0)
    warm = torch.randn(4096, 4096, device="cuda")
    t_end = time.time() + 1.0
    while time.time() < t_end:
        warm = warm @ warm.T / 4096
    torch.cuda.synchronize()
    peaks = bk.copy_peaks(256 << 20, args.iters)
    res = {"device": dev.name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "git_commit": git_commit(), "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "peaks": peaks}
    res["ceilings"] = ceilings(256 << 20, args.iters)
    res["gathers"] = gathers(args, peaks)
    bk.write_results(res, args.out)


if __name__ == "__main__":
    main()
