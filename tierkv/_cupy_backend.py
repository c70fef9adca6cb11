"""The cupy backend: csrc/tierkv_kernels.cuh compiled at run time by NVRTC, run on torch's stream.

Used when the compiled extension is absent. The kernels are the same source as the extension's; the
argument structs are built here byte for byte as the header declares them (every field 8 bytes, so
the layout has no padding to get wrong).
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import BackendError
from .kernel_abi import DTYPE_CODES, MASS_WARPS, MAX_SOURCES, THREADS

HEADER = "tierkv_kernels.cuh"

_GATHER_FIELDS = (
    [("src_ptr", "<u8", (MAX_SOURCES,)), ("src_size", "<u8", (MAX_SOURCES,))]
    + [(f, "<u8") for f in ("extra", "table", "k_out", "v_out")]
    + [
        (f, "<i8")
        for f in (
            "n_entries", "n_sources", "out_b", "out_h", "out_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n",
            "head_dim", "group", "parts", "tile_tokens", "out_vec",
        )
    ]
)
_INGEST_FIELDS = [(f, "<u8") for f in ("k", "v", "packed", "abstracts")] + [
    (f, "<i8")
    for f in (
        "b", "h", "t", "d", "chunk", "c", "group", "sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "head_bytes",
        "in_vec", "v_tile",
    )
]
_MASS_FIELDS = [(f, "<u8") for f in ("q", "ab", "codes", "out")] + [(f, "<i8") for f in ("bh", "g", "d", "c", "l", "cap")]
MASS_DTYPE = np.dtype(_MASS_FIELDS)
MASS_KERNELS = {(dt, gt): f"tierkv::mass_logits<{c}, {gt}>" for dt, c in ((torch.bfloat16, 0), (torch.float16, 1))
                for gt in (1, 2, 4, 8)}
GATHER_DTYPE = np.dtype(_GATHER_FIELDS)
INGEST_DTYPE = np.dtype(_INGEST_FIELDS)

GATHER_KERNELS = {
    # (format code, output dtype code) -> template instance
    (0, 0): "tierkv::gather_raw<0, 0>", (0, 1): "tierkv::gather_raw<0, 1>",
    (1, 0): "tierkv::gather_raw<1, 0>", (1, 1): "tierkv::gather_raw<1, 1>",
    **{(b, o): f"tierkv::gather_int<{b}, {o}>" for b in (2, 4, 8) for o in (0, 1)},
}
INGEST_KERNELS = {(i, f): f"tierkv::ingest<{i}, {f}>" for i in (0, 1, 2) for f in (0, 1, 2, 4, 8)}

# the rounding the torch reference does: no contraction into FMA, IEEE division
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--prec-div=true", "--ftz=false")


def header_path() -> str:
    """The kernel header: packaged beside this module (installed), or <repo>/csrc (source tree)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc", HEADER), os.path.join(os.path.dirname(here), "csrc", HEADER)):
        if os.path.isfile(candidate):
            return candidate
    raise BackendError(f"cannot find the kernel source {HEADER} in {here}/csrc or {os.path.dirname(here)}/csrc")


def missing() -> Optional[str]:
    """Why this backend cannot run here, or None."""
    try:
        import cupy  # noqa: F401  (importable is what is asked)
    except Exception as e:  # ImportError, or a cupy built for another CUDA failing at import
        return f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        header_path()
    except BackendError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with open(header_path()) as f:
        source = f.read()
    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(
            code=source,
            options=NVRTC_OPTIONS,
            name_expressions=list(GATHER_KERNELS.values()) + list(INGEST_KERNELS.values()) + list(MASS_KERNELS.values()),
        )
        mod.compile()
    return mod


def _struct_arg(rec: np.ndarray):
    """A kernel argument passed by value from the bytes of a one-element structured array."""
    from cupy.cuda import function

    return function.CPointer(rec.ctypes.data)


def _launch(device: torch.device, name: str, grid: int, args: np.ndarray, smem: int, threads: int = THREADS) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(index).get_function(name)
    if smem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = smem
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kernel((grid,), (threads,), (_struct_arg(args),), shared_mem=smem)


def _vec_ok(t: torch.Tensor, per16: int) -> bool:
    return t.data_ptr() % 16 == 0 and all(s % per16 == 0 for s in t.stride()[:-1])


def gather(sources: List[torch.Tensor], table, fmt: int, head_dim: int, group: int, k_out, v_out, parts: int,
           tile_tokens: int, blocks: int) -> None:
    n_entries, n_sources = table.shape[0], len(sources)
    a = np.zeros(1, dtype=GATHER_DTYPE)
    for i, s in enumerate(sources[:MAX_SOURCES]):
        a["src_ptr"][0, i] = s.data_ptr()
        a["src_size"][0, i] = s.numel()
    extra = None
    if n_sources > MAX_SOURCES:
        host = torch.tensor([s.data_ptr() for s in sources] + [s.numel() for s in sources], dtype=torch.int64)
        extra = host.pin_memory().to(k_out.device, non_blocking=True)
        a["extra"] = extra.data_ptr()
    a["table"] = table.data_ptr()
    a["k_out"], a["v_out"] = k_out.data_ptr(), v_out.data_ptr()
    a["n_entries"], a["n_sources"] = n_entries, n_sources
    a["out_b"], a["out_h"], a["out_n"] = k_out.shape[0], k_out.shape[1], k_out.shape[2]
    a["sk_b"], a["sk_h"], a["sk_n"] = k_out.stride()[:3]
    a["sv_b"], a["sv_h"], a["sv_n"] = v_out.stride()[:3]
    a["head_dim"], a["group"], a["parts"], a["tile_tokens"] = head_dim, group, parts, tile_tokens
    a["out_vec"] = int(_vec_ok(k_out, 8) and _vec_ok(v_out, 8))
    out = DTYPE_CODES[k_out.dtype]
    smem = gather_smem_bytes(fmt, head_dim, head_dim // group, tile_tokens)
    _launch(k_out.device, GATHER_KERNELS[(fmt, out)], blocks, a, smem)
    del extra  # stream-ordered by torch's caching allocator: safe to release after the launch


def gather_smem_bytes(fmt: int, d: int, ngroups: int, tile: int) -> int:
    """Mirrors tierkv::gather_smem_bytes: THREADS / 32 warps, each K scale/zero floats and two tiles."""
    if fmt in (0, 1):
        return 0
    return THREADS // 32 * ((8 * d + 2 * tile * (2 * (d * fmt // 8) + 4 * ngroups) + 15) // 16 * 16)


def ingest_v_tile(chunk: int, ngroups: int) -> int:
    """Mirrors tierkv::ingest_v_tile."""
    return min(max(1, 1024 // ngroups), chunk)


def ingest_smem_bytes(d: int, ngroups: int, v_tile: int) -> int:
    """Mirrors tierkv::ingest_smem_bytes."""
    rows = THREADS // (d // 8)
    return 8 * rows * d + 8 * d + 8 * v_tile * ngroups


def head_bytes(fmt: int, n: int, d: int, group: int) -> int:
    """Mirrors tierkv::head_bytes."""
    if fmt in (0, 1):
        return 4 * n * d
    pad = lambda x: (x + 15) // 16 * 16  # noqa: E731
    codes, vsz = n * d * fmt // 8, n * (d // group) * 2
    return 2 * pad(codes) + 4 * d + 2 * pad(vsz)


def ingest(k: torch.Tensor, v: torch.Tensor, chunk: int, fmt: int, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = k.shape
    if fmt in (0, 1):
        group = D
    C = T // chunk
    hb = head_bytes(fmt, chunk, D, group)
    packed = torch.empty((B, C, H * hb), dtype=torch.uint8, device=k.device)
    abstracts = torch.empty((B, C, H, 2, D), dtype=k.dtype, device=k.device)
    if B * C * H == 0:
        return packed, abstracts
    a = np.zeros(1, dtype=INGEST_DTYPE)
    a["k"], a["v"], a["packed"], a["abstracts"] = k.data_ptr(), v.data_ptr(), packed.data_ptr(), abstracts.data_ptr()
    a["b"], a["h"], a["t"], a["d"], a["chunk"], a["c"], a["group"] = B, H, T, D, chunk, C, group
    a["sk_b"], a["sk_h"], a["sk_t"] = k.stride()[:3]
    a["sv_b"], a["sv_h"], a["sv_t"] = v.stride()[:3]
    a["head_bytes"] = hb
    per16 = 4 if k.dtype == torch.float32 else 8
    a["in_vec"] = int(_vec_ok(k, per16) and _vec_ok(v, per16))
    vt = ingest_v_tile(chunk, D // group)
    a["v_tile"] = vt
    smem = ingest_smem_bytes(D, D // group, vt)
    _launch(k.device, INGEST_KERNELS[(DTYPE_CODES[k.dtype], fmt)], B * C * H, a, smem)
    return packed, abstracts


def mass_logits(q: torch.Tensor, abstracts: torch.Tensor, codes: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Mirrors the extension's mass_logits (arguments already checked by tierkv.ops)."""
    B, H, G, D = q.shape
    out = torch.empty((B, H, G, n_chunks), dtype=torch.float32, device=q.device)
    if B * H * n_chunks == 0:
        return out
    a = np.zeros(1, dtype=MASS_DTYPE)
    a["q"], a["ab"], a["codes"], a["out"] = q.data_ptr(), abstracts.data_ptr(), codes.data_ptr(), out.data_ptr()
    a["bh"], a["g"], a["d"], a["c"], a["l"], a["cap"] = B * H, G, D, n_chunks, codes.shape[3], abstracts.shape[3]
    gt = 1 if G <= 1 else 2 if G <= 2 else 4 if G <= 4 else 8
    smem = MASS_WARPS * D * gt * 4  # mirrors tierkv::mass_smem_bytes
    _launch(q.device, MASS_KERNELS[(abstracts.dtype, gt)], (B * H * n_chunks + MASS_WARPS - 1) // MASS_WARPS, a, smem,
            threads=MASS_WARPS * 32)
    return out
