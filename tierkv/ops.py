"""Kernel dispatch: the compiled extension, else the cupy JIT of the same CUDA source, else torch.

Two operations, each with a plain-torch reference beside it (the definition the kernels are held to,
bit for bit, and what runs on the CPU):

gather(sources, table, fmt, head_dim, group_size, k_out, v_out)
    Decodes selected chunks straight into dense K and V [B, H_kv, N, D] in one launch. `sources` are
    flat uint8 tensors holding packed chunks (formats.ChunkLayout), on the output's GPU or in pinned
    host memory, which the kernel reads itself over PCIe (no staging copy); one call may mix both.
    `table` is an int64 [E, 5] tensor on the output's device, one row per (sequence b, KV head h,
    chunk) written:
        (source index, byte offset of the head block in that source, n_tokens, b * H_kv + h, n0)
    where the head block offset is the chunk's offset + h * ChunkLayout(fmt, n_tokens, ...).head_bytes.
    Row (b, h) of the outputs receives the chunk's n_tokens tokens at [n0, n0 + n_tokens); nothing
    else of the outputs is written. make_table() builds the table with tensor ops (no per-chunk
    Python loop), dest_offsets() packs chunks of one row one after another.

ingest(k, v, chunk_len, fmt, group_size) -> (packed [B, C, nbytes] uint8, abstracts [B, C, H, 2, D])
    Cuts fresh K/V [B, H, T, D] into C = T / chunk_len chunks, encodes each (formats.encode) and
    computes its abstract (abstracts.chunk_abstract) in one fused pass.

Backends: backend() names the best available for CUDA tensors ("ext", "cupy" or "torch");
TIERKV_BACKEND=ext|cupy|torch forces one (BackendError if it cannot be had). CPU tensors always take
the torch reference. Kernels run on torch's current CUDA stream.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .abstracts import chunk_abstract, chunk_log_mass
from .config import FORMATS
from .errors import BackendError, FormatError
from .formats import BITS, OUT_DTYPES, ChunkLayout, decode, encode, is_quantized
from .kernel_abi import FMT_CODES, MAX_HEAD_DIM, MAX_SOURCES, THREADS  # noqa: F401  (MAX_SOURCES: read as ops.MAX_SOURCES)

BACKENDS = ("ext", "cupy", "torch")
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

IntOrTensor = Union[int, torch.Tensor]


# --- backend choice -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _ext_missing() -> Optional[str]:
    """Why the compiled extension cannot run here, or None if it can (probed once per process)."""
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    try:
        importlib.import_module("tierkv._C")
    except ImportError as e:
        return f"the extension tierkv._C is not built ({e}); build it with `pip install --no-build-isolation -e .` beside a CUDA torch and nvcc"
    if not hasattr(torch.ops.tierkv, "gather"):
        return "tierkv._C loaded but registered no tierkv ops"
    return None


@functools.lru_cache(maxsize=None)
def _cupy_missing() -> Optional[str]:
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    from . import _cupy_backend

    return _cupy_backend.missing()


def missing(name: str) -> Optional[str]:
    """Why backend `name` cannot run here, or None if it can."""
    if name == "ext":
        return _ext_missing()
    if name == "cupy":
        return _cupy_missing()
    return None


def backend() -> str:
    """The kernel backend used for CUDA tensors: "ext", "cupy" or "torch" (TIERKV_BACKEND forces one)."""
    forced = os.environ.get("TIERKV_BACKEND", "").strip().lower()
    if forced:
        return _resolve(forced, "TIERKV_BACKEND")
    for name in ("ext", "cupy"):
        if missing(name) is None:
            return name
    return "torch"


def _resolve(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    why = missing(name)
    if why is not None:
        raise BackendError(f"{what}={name} cannot be used: {why}")
    return name


def available_backends() -> List[str]:
    """Every backend that can run here, best first (torch always)."""
    return [b for b in BACKENDS if missing(b) is None]


def _pick(device: torch.device, requested: Optional[str]) -> str:
    if device.type != "cuda":
        if requested not in (None, "torch"):
            raise BackendError(f"backend={requested!r} needs CUDA tensors, got tensors on {device}")
        return "torch"
    if requested is not None:
        return _resolve(requested, "backend")
    return backend()


# --- layout helpers -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def value_group(fmt: str, head_dim: int, group_size: int) -> int:
    """Channels per value group as the kernels use it (ChunkLayout.group; head_dim for raw formats).
    Cached: gather runs once per layer per decode step, and this validation is the same every time."""
    layout = ChunkLayout(fmt, 1, 1, head_dim, group_size)  # validates fmt, head_dim, group_size
    return layout.group if is_quantized(fmt) else head_dim


def _pad16(x: IntOrTensor) -> IntOrTensor:
    return (x + 15) // 16 * 16


def head_bytes(n_tokens: IntOrTensor, fmt: str, head_dim: int, group_size: int = 32) -> IntOrTensor:
    """ChunkLayout(fmt, n_tokens, 1, head_dim, group_size).head_bytes, for an int or element-wise for a tensor."""
    g = value_group(fmt, head_dim, group_size)
    if not is_quantized(fmt):
        return 4 * n_tokens * head_dim
    codes = n_tokens * head_dim * BITS[fmt] // 8
    vsz = n_tokens * (head_dim // g) * 2
    return 2 * _pad16(codes) + 4 * head_dim + 2 * _pad16(vsz)


def make_table(
    source: IntOrTensor,
    chunk_offset: IntOrTensor,
    n_tokens: IntOrTensor,
    batch: IntOrTensor,
    head: IntOrTensor,
    n0: IntOrTensor,
    *,
    n_kv_heads: int,
    fmt: str,
    head_dim: int,
    group_size: int = 32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """The gather table, one row per (sequence, KV head, chunk), from broadcastable 1-D int tensors.

    source:       index into the `sources` list of the chunk's buffer.
    chunk_offset: byte offset of the chunk (all heads) in that buffer; the head's block is found at
                  chunk_offset + head * head_bytes(n_tokens).
    n_tokens:     tokens of the chunk; batch, head: where it goes; n0: first token row in the output.
    """
    cols = [torch.atleast_1d(torch.as_tensor(x, dtype=torch.int64)) for x in (source, chunk_offset, n_tokens, batch, head, n0)]
    if device is None:
        device = next((c.device for c in cols if c.device.type != "cpu"), cols[0].device)
    cols = [c.to(device) for c in cols]
    src, off, n, b, h, start = torch.broadcast_tensors(*cols)
    if src.dim() != 1:
        raise FormatError(f"make_table: expected 1-D columns, got shape {tuple(src.shape)}")
    offset = off + h * head_bytes(n, fmt, head_dim, group_size)
    return torch.stack((src, offset, n, b * n_kv_heads + h, start), dim=1).contiguous()


def dest_offsets(n_tokens: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """n0 for entries grouped by output row: each row's chunks packed one after another from 0."""
    n = torch.as_tensor(n_tokens, dtype=torch.int64)
    r = torch.as_tensor(row, dtype=torch.int64).to(n.device)
    if n.numel() == 0:
        return n.clone()
    before = torch.cumsum(n, 0) - n
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    run = torch.cumsum(first.to(torch.int64), 0) - 1
    return before - before[first][run]


# --- validation -----------------------------------------------------------------------------------
def _check_gather(sources, table, fmt, head_dim, group_size, k_out, v_out, kernel: bool) -> int:
    if fmt not in FORMATS:
        raise FormatError(f"fmt: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 8 or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        raise FormatError(f"head_dim: expected a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise FormatError(f"group_size: expected an integer, got {group_size!r}")
    g = value_group(fmt, head_dim, group_size)
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] != head_dim:
            raise FormatError(f"{name}: expected a tensor [B, H_kv, N, {head_dim}], got {getattr(t, 'shape', t)!r}")
        if t.dtype not in OUT_DTYPES:
            raise FormatError(f"{name}: expected bfloat16 or float16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise FormatError(f"{name}: expected a contiguous last dimension, got strides {t.stride()}")
    if k_out.shape != v_out.shape or k_out.dtype != v_out.dtype or k_out.device != v_out.device:
        raise FormatError(
            f"k_out {tuple(k_out.shape)} {k_out.dtype} {k_out.device} and v_out {tuple(v_out.shape)} "
            f"{v_out.dtype} {v_out.device} must match in shape, dtype and device"
        )
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 5:
        raise FormatError(f"table: expected an int64 tensor [E, 5], got {getattr(table, 'dtype', type(table))} {tuple(getattr(table, 'shape', ()))}")
    if not isinstance(sources, (list, tuple)):
        raise FormatError(f"sources: expected a list of uint8 tensors, got {type(sources).__name__}")
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.dim() != 1:
            raise FormatError(f"sources[{i}]: expected a 1-D uint8 tensor, got {getattr(s, 'dtype', type(s))} {tuple(getattr(s, 'shape', ()))}")
        if kernel:
            if not s.is_contiguous():
                raise FormatError(f"sources[{i}]: expected a contiguous tensor")
            if s.device.type == "cpu":
                if not s.is_pinned():
                    raise FormatError(f"sources[{i}]: a host source must be in pinned memory (tensor.pin_memory())")
            elif s.device != k_out.device:
                raise FormatError(f"sources[{i}] is on {s.device}; expected {k_out.device} or pinned host memory")
    if kernel and table.device != k_out.device:
        raise FormatError(f"table is on {table.device}; expected it on the output's device {k_out.device}")
    return g


def check_table(sources, table, fmt: str, head_dim: int, group_size: int, k_out) -> None:
    """Host-side check of every table row (synchronizes); raises FormatError naming the first bad row."""
    t = table.detach().cpu()
    if t.numel() == 0:
        return
    B, H, N = k_out.shape[0], k_out.shape[1], k_out.shape[2]
    src, off, n, row, n0 = t.unbind(1)
    sizes = torch.tensor([s.numel() for s in sources] or [0], dtype=torch.int64)
    bad_src = (src < 0) | (src >= len(sources))
    hb = head_bytes(n.clamp(min=1), fmt, head_dim, group_size)
    size = sizes[src.clamp(0, max(len(sources) - 1, 0))]
    bad = bad_src | (n < 1) | (off < 0) | (off + hb > size) | (row < 0) | (row >= B * H) | (n0 < 0) | (n0 + n > N)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise FormatError(
            f"table row {i} = {t[i].tolist()} (source, offset, n_tokens, row, n0) is out of bounds: "
            f"{len(sources)} sources, source sizes {sizes.tolist()[:8]}, head block of {int(hb[i])} bytes, "
            f"{B * H} output rows of {N} tokens"
        )


# --- gather ---------------------------------------------------------------------------------------
def gather(
    sources: Sequence[torch.Tensor],
    table: torch.Tensor,
    fmt: str,
    head_dim: int,
    group_size: int,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    *,
    backend: Optional[str] = None,
    check: bool = False,
    parts: Optional[int] = None,
    tile_tokens: Optional[int] = None,
    blocks: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
) -> None:
    """Decode the chunks named by `table` into k_out / v_out (see the module docstring).

    backend: force one for this call; check: validate every table row on the host first (syncs);
    parts / tile_tokens / blocks: override the launch shape (tests and benchmarks; results do not
    depend on them); chunk_tokens: the longest chunk in the table, if the caller knows it (the launch
    then cuts chunks into items of whole tiles that fit them; results do not depend on it).
    Without check, rows that would read or write out of bounds are skipped by the kernels.
    """
    name = _pick(k_out.device, backend)
    g = _check_gather(sources, table, fmt, head_dim, group_size, k_out, v_out, kernel=name != "torch")
    if check:
        check_table(sources, table, fmt, head_dim, group_size, k_out)
    if table.shape[0] == 0:
        return
    if name == "torch":
        gather_reference(sources, table, fmt, head_dim, group_size, k_out, v_out)
        return
    index = k_out.device.index if k_out.device.index is not None else torch.cuda.current_device()
    plan = launch_plan(fmt, table.shape[0], head_dim, g, k_out.shape[2], index, parts, tile_tokens, blocks,
                       chunk_tokens)
    table = table.contiguous()
    if name == "ext":
        torch.ops.tierkv.gather(list(sources), table, FMT_CODES[fmt], head_dim, g, k_out, v_out, *plan)
    else:
        from . import _cupy_backend

        _cupy_backend.gather(list(sources), table, FMT_CODES[fmt], head_dim, g, k_out, v_out, *plan)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> Tuple[int, int, int]:
    """(multiprocessors, most dynamic shared memory a block may opt into, shared memory per
    multiprocessor) of a CUDA device."""
    p = torch.cuda.get_device_properties(index)
    opt_in = int(getattr(p, "shared_memory_per_block_optin", 227 * 1024))
    return p.multi_processor_count, opt_in, int(getattr(p, "shared_memory_per_multiprocessor", opt_in + 1024))


def warp_smem_bytes(fmt: str, head_dim: int, group: int, tile: int) -> int:
    """Mirrors tierkv::gather_warp_smem_bytes: K scale/zero as floats and two tiles, per warp."""
    if not is_quantized(fmt):
        return 0
    return int(_pad16(8 * head_dim + 2 * tile * (2 * head_dim * BITS[fmt] // 8 + 4 * (head_dim // group))))


# Items (runs of whole tiles) per resident warp that launch_plan aims at. 4, not 2: on the H200, with
# 4x bench_kernels' scene (16384 tokens per row), twice the parts that 2 gave made the int gathers
# 6-10% and bf16 3% faster (bench/results/store_paths_h200_ab570a5.json, "no_allocate_parts2x").
ITEMS_PER_WARP = 4
# ... but an item keeps at least this many tiles when its chunk has them, unless resident warps would
# be left idle: a warp stages an item's first tile (and the K scales) with nothing to overlap, so
# one-tile items cost more than they even out. At 4096 tokens per row, int4 gathers cut into 1-2
# tile items ran 5-12% slower than in 2-3 tile items (bench/results/kernels_h200_540c0ed.json
# against kernels_h200_ab570a5.json); a decode step's gather (512 entries of 2 tiles) took 7.7 us as
# 512 items and 5.7 us as 1024 (kernels_h200_2eb2687.json, kernels_h200_540c0ed.json, int2).
MIN_TILES_PER_ITEM = 2


@functools.lru_cache(maxsize=1024)
def launch_plan(fmt: str, n_entries: int, head_dim: int, group: int, n_out: int, index: int,
                parts: Optional[int] = None, tile_tokens: Optional[int] = None,
                blocks: Optional[int] = None, chunk_tokens: Optional[int] = None) -> Tuple[int, int, int]:
    """(parts, tile_tokens, blocks) of a gather launch.

    Work is divided into warp items, each a run of whole tiles of one entry. Integer formats stage
    tiles per warp through shared memory, double buffered: the largest power of two of tokens (8 to
    64) whose codes and scales take at most 1.25 KiB; raw formats move 16-token tiles. Warps are
    persistent: as many blocks of 8 warps as are resident at once (3 per multiprocessor, the
    kernels' launch bounds, fewer if shared memory says so) walk all items, each fetching its next
    item's table row while it moves the current one. When there are fewer entries than
    ITEMS_PER_WARP times the resident warps, entries are split into `parts` items (of at least
    MIN_TILES_PER_ITEM tiles of the longest chunk, `chunk_tokens` when the caller knows it, else the
    output length, unless resident warps would idle), so the work spreads and evens out: with few
    items per warp, the warps dealt one more than the others set the length of the launch. With the
    chunk length known, the part count is moved up to one that divides the chunk's tiles where one
    lies within those bounds, so items are equal.
    """
    sms, smem_max, smem_sm = _device_limits(index)
    if tile_tokens is None:
        if is_quantized(fmt):
            per_token = 2 * head_dim * BITS[fmt] // 8 + 4 * (head_dim // group)
            tile_tokens = 8
            while tile_tokens < 64 and 2 * tile_tokens * per_token <= 1280:
                tile_tokens *= 2
        else:
            tile_tokens = 16
    if tile_tokens < 8 or tile_tokens % 8:
        raise FormatError(f"tile_tokens: expected a positive multiple of 8, got {tile_tokens}")
    smem = THREADS // 32 * warp_smem_bytes(fmt, head_dim, group, tile_tokens)
    if smem > smem_max:
        raise FormatError(
            f"{fmt} chunks of head_dim {head_dim} in value groups of {group} need {smem} bytes of shared memory "
            f"per block with {tile_tokens}-token tiles; this GPU allows {smem_max}"
        )
    per_sm = 3 if smem == 0 else max(1, min(3, smem_sm // (smem + 1024)))
    resident_warps = per_sm * sms * (THREADS // 32)
    if parts is None:
        parts = max(1, -(-ITEMS_PER_WARP * resident_warps // max(n_entries, 1)))
        longest = n_out if chunk_tokens is None else min(n_out, max(1, chunk_tokens))
        tiles = -(-longest // tile_tokens)
        # one-tile items only where the launch would otherwise leave resident warps without an item
        # (a decode step's gather: latency, not per-item cost, sets its time)
        fill = min(tiles, -(-resident_warps // max(n_entries, 1)))
        cap = max(1, tiles // MIN_TILES_PER_ITEM, fill)
        parts = min(parts, cap)
        if chunk_tokens is not None:
            # items of equal size where the chunk allows: the nearest part count at or above this one
            # (within the cap) that divides its tiles. 16 tiles in 7 parts leave items of 2 and 3
            # tiles, and the warps given 3 set the launch's length.
            parts = next((d for d in range(parts, cap + 1) if tiles % d == 0), parts)
    if parts < 1:
        raise FormatError(f"parts: expected >= 1, got {parts}")
    items = n_entries * parts
    if items >= 2**31:
        raise FormatError(f"gather: {n_entries} entries in {parts} parts are too many for one launch")
    if blocks is None:
        blocks = max(1, min(-(-items // (THREADS // 32)), per_sm * sms))
    if blocks < 1:
        raise FormatError(f"blocks: expected >= 1, got {blocks}")
    return parts, tile_tokens, blocks


def gather_reference(sources, table, fmt: str, head_dim: int, group_size: int, k_out, v_out) -> None:
    """Torch reference of gather: index_select the head blocks, formats.decode them, scatter the rows.

    Entries are grouped by (source, n_tokens), so each group is one index_select and one batched
    decode; the source is indexed in units of the greatest common divisor of the offsets
    and the block size, so the index is not one int64 per byte.
    """
    if table.shape[0] == 0:
        return
    H = k_out.shape[1]
    dev = k_out.device
    tcpu = table.to(torch.int64).cpu()
    for s, n in torch.unique(tcpu[:, [0, 2]], dim=0).tolist():
        rows = tcpu[(tcpu[:, 0] == s) & (tcpu[:, 2] == n)]
        layout = ChunkLayout(fmt, int(n), 1, head_dim, group_size)
        hb = layout.head_bytes
        src = sources[int(s)]
        unit = functools.reduce(math.gcd, rows[:, 1].tolist(), hb)
        units = src[: src.numel() // unit * unit].view(-1, unit)
        idx = (rows[:, 1:2] // unit + torch.arange(hb // unit)).flatten().to(src.device)
        blocks = units.index_select(0, idx).reshape(-1, hb).to(dev)
        k, v = decode(blocks, layout, k_out.dtype)  # [E_g, 1, n, D]
        b = (rows[:, 3] // H).to(dev)
        h = (rows[:, 3] % H).to(dev)
        tok = (rows[:, 4:5] + torch.arange(int(n))).to(dev)
        k_out[b[:, None], h[:, None], tok] = k[:, 0]
        v_out[b[:, None], h[:, None], tok] = v[:, 0]


# --- ingest ---------------------------------------------------------------------------------------
def _check_ingest(k, v, chunk_len, fmt, group_size) -> int:
    if fmt not in FORMATS:
        raise FormatError(f"fmt: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 or k.shape != v.shape:
        raise FormatError(f"expected k and v [B, H, T, D] of one shape, got {tuple(getattr(k, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}")
    if k.dtype != v.dtype or k.dtype not in IN_DTYPES or k.device != v.device:
        raise FormatError(f"expected k and v of one dtype (bfloat16, float16 or float32) on one device, got {k.dtype} {k.device} and {v.dtype} {v.device}")
    B, H, T, D = k.shape
    if D % 8 or D < 8 or D > MAX_HEAD_DIM:
        raise FormatError(f"head_dim: expected a multiple of 8 in [8, {MAX_HEAD_DIM}], got {D}")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1 or T % chunk_len:
        raise FormatError(f"chunk_len: expected a positive divisor of T={T}, got {chunk_len!r}")
    return value_group(fmt, D, group_size)


def ingest(
    k: torch.Tensor, v: torch.Tensor, chunk_len: int, fmt: str, group_size: int = 32, *, backend: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """K, V [B, H, T, D] -> (packed chunks [B, T/chunk_len, nbytes] uint8, abstracts [B, C, H, 2, D] in k's dtype)."""
    g = _check_ingest(k, v, chunk_len, fmt, group_size)
    name = _pick(k.device, backend)
    if name == "torch":
        return ingest_reference(k, v, chunk_len, fmt, group_size)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if name == "ext":
        return torch.ops.tierkv.ingest(k, v, chunk_len, FMT_CODES[fmt], g)
    from . import _cupy_backend

    return _cupy_backend.ingest(k, v, chunk_len, FMT_CODES[fmt], g)


def ingest_reference(k, v, chunk_len: int, fmt: str, group_size: int = 32):
    """Torch reference of ingest: formats.encode and abstracts.chunk_abstract of every chunk."""
    _check_ingest(k, v, chunk_len, fmt, group_size)
    B, H, T, D = k.shape
    C = T // chunk_len

    def chunks(x):  # [B, H, T, D] -> [B, C, H, L, D]
        return x.reshape(B, H, C, chunk_len, D).permute(0, 2, 1, 3, 4)

    kc, vc = chunks(k), chunks(v)
    packed = encode(kc, vc, ChunkLayout(fmt, chunk_len, H, D, group_size))
    return packed.reshape(B, C, -1), chunk_abstract(kc)


# --- mass scoring ------------------------------------------------------------------------------------
MASS_MAX_G = 8  # query rows per KV head the kernel keeps in registers (csrc: TIERKV_MASS_MAX_G)
MASS_MAX_HEAD_DIM = 256


def mass_logits(q: torch.Tensor, abstracts: torch.Tensor, codes: torch.Tensor, n_chunks: int, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """log sum_t exp(q . k_t) per (b, KV head, query row, chunk) over the first n_chunks chunks, with keys
    as their 2-bit codes give them (abstracts.chunk_log_mass is the reference).

    q: [B, H, G, D] float32, already multiplied by the softmax scale; abstracts: [B, H, 2D, cap] (min rows
    then max rows, bf16/fp16); codes: [B, H, cap, L, D/4] uint8. Returns [B, H, G, n_chunks] float32.
    The kernels run where they can (CUDA, G <= 8, D <= 256, contiguous inputs); else the torch reference.
    """
    B, H, G, D = q.shape
    if abstracts.dim() != 4 or abstracts.shape[:3] != (B, H, 2 * D) or codes.dim() != 5 \
            or codes.shape[:3] != (B, H, abstracts.shape[3]) or codes.shape[4] * 4 != D:
        raise FormatError(f"mass_logits: q {tuple(q.shape)}, abstracts {tuple(abstracts.shape)} and codes "
                          f"{tuple(codes.shape)} do not fit together")
    if not 0 <= n_chunks <= abstracts.shape[3]:
        raise FormatError(f"mass_logits: n_chunks {n_chunks} outside [0, {abstracts.shape[3]}]")
    name = _pick(q.device, backend)
    fits = (G <= MASS_MAX_G and D <= MASS_MAX_HEAD_DIM and abstracts.dtype in (torch.bfloat16, torch.float16)
            and abstracts.is_contiguous() and codes.is_contiguous())
    if name == "torch" or not fits:
        lo = abstracts[:, :, :D, :n_chunks].transpose(-1, -2)
        hi = abstracts[:, :, D:, :n_chunks].transpose(-1, -2)
        return chunk_log_mass(q.float(), lo, hi, codes[:, :, :n_chunks], 1.0)
    q = q.float().contiguous()
    if name == "ext":
        return torch.ops.tierkv.mass_logits(q, abstracts, codes, n_chunks)
    from . import _cupy_backend

    return _cupy_backend.mass_logits(q, abstracts, codes, n_chunks)
