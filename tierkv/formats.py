"""Chunk formats: the packed byte layout of a chunk, and the reference encode / decode in torch.

This module is the one source of truth for the layout; the CUDA kernels (csrc/) read and write
exactly the bytes described here, and the tests hold them to this code bit for bit.

A chunk is a token range [start, end) of one layer of one sequence, all KV heads. With H KV heads,
L tokens and head dimension D it is H *head blocks* of `head_bytes` each, head 0 first, so a kernel
that needs head h of a chunk at address A reads from A + h * head_bytes. Inside a head block every
section starts on a 16-byte boundary (zero padding after a section that does not end on one):

raw formats (bf16, fp16), element type T (2 bytes):
    K  [L, D] T  row-major (token-major, channels contiguous)
    V  [L, D] T

integer formats (int8, int4, int2; b bits, P = 8 // b codes per byte, Q = 2**b - 1):
    K codes  [L, D*b/8] uint8   token-major; channel d of a token sits in byte d // P at bits
                                (d % P) * b .. (d % P) * b + b - 1 (little end first)
    K scale  [D]        fp16    per channel over the chunk's L tokens (KIVI keys)
    K zero   [D]        fp16
    V codes  [L, D*b/8] uint8   same packing as K
    V scale  [L, D/G]   fp16    per token per group of G consecutive channels (KIVI values)
    V zero   [L, D/G]   fp16

Quantization is asymmetric: for a set S of values (a key channel over the chunk's tokens, or a value
token's group of channels), with every step in float32 and correctly rounded (no fused multiply-add):
    scale = fp16(min((max(S) - min(S)) / Q, 65504))      zero = fp16(clamp(min(S), -65504, 65504))
    code  = clamp(round_half_even((x - zero) / scale), 0, Q)   (code = 0 where scale == 0)
    x'    = T(float(code) * float(scale) + float(zero))        (the multiply and the add rounded apart)
Integer-format scales and zeros beyond fp16's range saturate; raw fp16 chunks of bf16 data beyond
fp16's range become +-inf (as torch's conversion does), so keep bf16 models in bf16 or integer formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .config import FORMATS
from .errors import FormatError

ALIGN = 16
FP16_MAX = 65504.0
BITS = {"int8": 8, "int4": 4, "int2": 2}
RAW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUT_DTYPES = (torch.bfloat16, torch.float16)


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_quantized(fmt: str) -> bool:
    return fmt in BITS


@dataclass(frozen=True)
class ChunkLayout:
    """Byte layout of one chunk of `n_tokens` tokens, `n_heads` KV heads of `head_dim` channels."""

    format: str
    n_tokens: int
    n_heads: int
    head_dim: int
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise FormatError(f"format: unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        for name in ("n_tokens", "n_heads", "head_dim", "group_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FormatError(f"{name}: expected a positive integer, got {v!r}")
        if self.head_dim % 8:
            raise FormatError(f"head_dim: expected a multiple of 8, got {self.head_dim}")
        if is_quantized(self.format) and self.head_dim % self.group:
            raise FormatError(
                f"group_size: head_dim {self.head_dim} is not a multiple of the value group {self.group}"
            )

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return BITS.get(self.format, 16)

    @property
    def group(self) -> int:
        """Channels per value group: the configured group size, capped at the head dimension."""
        return min(self.group_size, self.head_dim)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's codes (or raw elements) for one head, K or V."""
        return self.head_dim * self.bits // 8

    def sections(self) -> Tuple[Tuple[str, int, int], ...]:
        """(name, offset, size) of every section of a head block, in order."""
        L, D = self.n_tokens, self.head_dim
        if is_quantized(self.format):
            sizes = [
                ("k_codes", L * self.row_bytes),
                ("k_scale", D * 2),
                ("k_zero", D * 2),
                ("v_codes", L * self.row_bytes),
                ("v_scale", L * (D // self.group) * 2),
                ("v_zero", L * (D // self.group) * 2),
            ]
        else:
            sizes = [("k", L * D * 2), ("v", L * D * 2)]
        out, off = [], 0
        for name, size in sizes:
            out.append((name, off, size))
            off = _pad(off + size)
        return tuple(out)

    def offset(self, name: str) -> int:
        for n, off, _ in self.sections():
            if n == name:
                return off
        raise KeyError(name)

    @property
    def head_bytes(self) -> int:
        name, off, size = self.sections()[-1]
        return _pad(off + size)

    @property
    def nbytes(self) -> int:
        return self.n_heads * self.head_bytes

    def with_tokens(self, n_tokens: int) -> "ChunkLayout":
        return ChunkLayout(self.format, n_tokens, self.n_heads, self.head_dim, self.group_size)


def raw_bytes_per_token(n_heads: int, head_dim: int) -> int:
    """Bytes of K and V of one token, all heads, at 16 bits: the denominator of compression ratios."""
    return n_heads * head_dim * 2 * 2


# --- encode ------------------------------------------------------------------------------------
def _check_kv(k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout) -> None:
    want = (layout.n_heads, layout.n_tokens, layout.head_dim)
    if k.shape != v.shape:
        raise FormatError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
    if tuple(k.shape[-3:]) != want:
        raise FormatError(f"expected K/V of shape [..., H={want[0]}, L={want[1]}, D={want[2]}], got {tuple(k.shape)}")
    if not k.is_floating_point() or not v.is_floating_point():
        raise FormatError(f"expected floating-point K/V, got {k.dtype} and {v.dtype}")


def _quant_params(lo: torch.Tensor, hi: torch.Tensor, q: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # divide by a tensor: on CUDA, torch turns division by a Python scalar into a multiplication by its
    # reciprocal, which is not correctly rounded and would make GPU encodes differ from CPU ones
    levels = torch.tensor(float(q), dtype=torch.float32, device=lo.device)
    scale = torch.clamp((hi - lo) / levels, max=FP16_MAX).to(torch.float16)
    zero = torch.clamp(lo, -FP16_MAX, FP16_MAX).to(torch.float16)
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: int) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.round((x - z) / safe)
    c = torch.where(s > 0, c, torch.zeros_like(c))
    return torch.clamp(c, 0, q).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes < 2**bits -> [..., D*bits/8] bytes, lower channels in lower bits."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _as_bytes(t: torch.Tensor, lead: Tuple[int, ...]) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(*lead, -1)


def encode(k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """K, V [..., H, L, D] -> packed chunks [..., layout.nbytes] uint8 (one chunk per leading index)."""
    _check_kv(k, v, layout)
    lead = tuple(k.shape[:-2])  # [..., H]
    if not is_quantized(layout.format):
        dt = RAW_DTYPES[layout.format]
        parts = {"k": _as_bytes(k.to(dt), lead), "v": _as_bytes(v.to(dt), lead)}
    else:
        q = (1 << layout.bits) - 1
        kf, vf = k.float(), v.float()
        k_scale, k_zero = _quant_params(kf.amin(-2), kf.amax(-2), q)  # [..., H, D]
        k_codes = _codes(kf, k_scale.unsqueeze(-2), k_zero.unsqueeze(-2), q)
        g = layout.group
        vg = vf.reshape(*vf.shape[:-1], layout.head_dim // g, g)
        v_scale, v_zero = _quant_params(vg.amin(-1), vg.amax(-1), q)  # [..., H, L, D/G]
        v_codes = _codes(vg, v_scale.unsqueeze(-1), v_zero.unsqueeze(-1), q).reshape(vf.shape)
        parts = {
            "k_codes": _as_bytes(pack_codes(k_codes, layout.bits), lead),
            "k_scale": _as_bytes(k_scale, lead),
            "k_zero": _as_bytes(k_zero, lead),
            "v_codes": _as_bytes(pack_codes(v_codes, layout.bits), lead),
            "v_scale": _as_bytes(v_scale, lead),
            "v_zero": _as_bytes(v_zero, lead),
        }
    pieces = []
    for name, off, size in layout.sections():
        pieces.append(parts[name])
        pad = _pad(off + size) - (off + size)
        if pad:
            pieces.append(torch.zeros(*lead, pad, dtype=torch.uint8, device=k.device))
    block = torch.cat(pieces, dim=-1)  # [..., H, head_bytes]
    return block.reshape(*lead[:-1], layout.nbytes)


# --- decode ------------------------------------------------------------------------------------
def _section(blocks: torch.Tensor, layout: ChunkLayout, name: str) -> torch.Tensor:
    for n, off, size in layout.sections():
        if n == name:
            return blocks[..., off : off + size]
    raise KeyError(name)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_dtype) -> torch.Tensor:
    """x' = out_dtype(code * scale + zero) in float32, multiply and add rounded apart (no FMA)."""
    x = codes.float() * scale.float()
    x = x + zero.float()
    return x.to(out_dtype)


def decode(buf: torch.Tensor, layout: ChunkLayout, out_dtype=torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed chunks [..., nbytes] uint8 -> K, V [..., H, L, D] in out_dtype (bf16 or fp16)."""
    if buf.dtype != torch.uint8:
        raise FormatError(f"expected packed chunks as uint8, got {buf.dtype}")
    if buf.shape[-1] != layout.nbytes:
        raise FormatError(f"expected chunks of {layout.nbytes} bytes for {layout}, got {buf.shape[-1]}")
    if out_dtype not in OUT_DTYPES:
        raise FormatError(f"out_dtype: expected torch.bfloat16 or torch.float16, got {out_dtype}")
    H, L, D = layout.n_heads, layout.n_tokens, layout.head_dim
    lead = tuple(buf.shape[:-1])
    blocks = buf.reshape(*lead, H, layout.head_bytes)
    if not is_quantized(layout.format):
        dt = RAW_DTYPES[layout.format]

        def raw(name):
            return _section(blocks, layout, name).contiguous().view(dt).reshape(*lead, H, L, D).to(out_dtype)

        return raw("k"), raw("v")

    bits, g = layout.bits, layout.group

    def f16(name, *shape):
        return _section(blocks, layout, name).contiguous().view(torch.float16).reshape(*lead, H, *shape)

    def codes(name):
        return unpack_codes(_section(blocks, layout, name).reshape(*lead, H, L, layout.row_bytes), bits)

    k = dequantize_codes(codes("k_codes"), f16("k_scale", 1, D), f16("k_zero", 1, D), out_dtype)
    vc = codes("v_codes").reshape(*lead, H, L, D // g, g)
    v = dequantize_codes(vc, f16("v_scale", L, D // g, 1), f16("v_zero", L, D // g, 1), out_dtype)
    return k, v.reshape(*lead, H, L, D)


def roundtrip(k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, out_dtype=None):
    """encode then decode: what attention sees of K/V stored in `layout`."""
    return decode(encode(k, v, layout), layout, out_dtype or k.dtype)
