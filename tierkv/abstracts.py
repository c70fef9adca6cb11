"""Chunk abstracts and 2-bit key codes (the data a layer's chunks are scored from), and the attention-mass
arithmetic the scorer calls. Scoring and choosing themselves are in selection.py.

An abstract is, per chunk per KV head, the element-wise min and max of the chunk's keys. For a query q
    bound(q) = sum_d max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min  >=  max_k q . k
over every key k of the chunk, since each term of q . k is at most the larger of its two corner values.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import FormatError


def chunk_abstract(k: torch.Tensor) -> torch.Tensor:
    """Keys [..., H, L, D] -> abstracts [..., H, 2, D] (min, max over the L tokens), in the keys' dtype."""
    if k.dim() < 3:
        raise FormatError(f"expected keys [..., H, L, D], got shape {tuple(k.shape)}")
    return torch.stack((k.amin(-2), k.amax(-2)), dim=-2)


def as_rows(abstracts: torch.Tensor) -> torch.Tensor:
    """Abstracts [B, C, H, 2, D] -> the layout a layer keeps and scoring reads, [B, H, 2D, C]: per KV head,
    the channels' minima in rows :D and maxima in rows D:, one column per chunk."""
    B, C, H, _, D = abstracts.shape
    return abstracts.permute(0, 2, 3, 4, 1).reshape(B, H, 2 * D, C)


# --- attention-mass scoring from 2-bit key codes ---------------------------------------------------------
# The bound above ranks a chunk by the most any one of its keys could score, which says little about how
# much of a query's softmax the chunk holds: a chunk of sixteen moderately matching keys outweighs one
# whose single corner the bound flatters. Mass scoring keeps, beside the abstract's per-channel min m and
# max M, a 2-bit code per key channel (KIVI int2 over the chunk: k ~ m + code * (M - m) / 3), estimates
# every key's logit from it, and ranks a chunk by the share of each query head's softmax it takes (the
# hot set's exact logits in the denominator), summed over the grouped query heads. Codes are packed four
# channels to a byte: channel 4i + j sits at bits 2j..2j+1 of byte i.

def key_codes(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Keys [..., L, D] with their chunk's min/max [..., D] -> packed 2-bit codes [..., L, D/4] uint8."""
    D = k.shape[-1]
    if D % 4:
        raise FormatError(f"mass scoring packs 4 channels a byte: head dim {D} is not a multiple of 4")
    lo_f, hi_f = lo.float().unsqueeze(-2), hi.float().unsqueeze(-2)
    width = hi_f - lo_f
    c = ((k.float() - lo_f) / torch.where(width > 0, width, torch.ones_like(width)) * 3).round_().clamp_(0, 3)
    c = c.to(torch.uint8).reshape(*k.shape[:-1], D // 4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Packed codes [..., D/4] uint8 -> codes [..., D] uint8 in 0..3."""
    parts = [(codes >> s) & 3 for s in (0, 2, 4, 6)]
    return torch.stack(parts, dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 4)


def chunk_log_mass(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, codes: torch.Tensor, scaling: float,
                   block_elems: int = 1 << 24) -> torch.Tensor:
    """log sum_t exp(scaling * q . k_t) over each chunk's keys as their codes give them.

    q: [B, H, G, D] (G query rows per KV head); lo, hi: [B, H, C, D]; codes: [B, H, C, L, D/4].
    returns [B, H, G, C] float32. Work runs over blocks of chunks of at most `block_elems` key elements,
    in the keys' dtype on CUDA (float32 on the CPU, where half-precision matmuls are slow).
    """
    B, H, G, D = q.shape
    C, L = codes.shape[2], codes.shape[3]
    dt = lo.dtype if (lo.is_cuda and lo.dtype in (torch.bfloat16, torch.float16)) else torch.float32
    qd = q.to(dt)
    out = torch.empty(B, H, G, C, dtype=torch.float32, device=q.device)
    step = max(1, block_elems // max(1, B * H * L * D))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        l, h = lo[:, :, c0:c1].to(dt), hi[:, :, c0:c1].to(dt)
        k = unpack_codes(codes[:, :, c0:c1]).to(dt) * ((h - l) / 3).unsqueeze(3) + l.unsqueeze(3)  # [B,H,c,L,D]
        logits = torch.matmul(qd, k.reshape(B, H, (c1 - c0) * L, D).transpose(-1, -2)).float() * scaling
        out[..., c0:c1] = logits.reshape(B, H, G, c1 - c0, L).logsumexp(-1)
    return out


def mass_shares(log_mass: torch.Tensor, q_scaled: torch.Tensor, hot_keys: Optional[torch.Tensor]) -> torch.Tensor:
    """Chunks' log-masses [B, H, G, C] -> their softmax shares summed over the G query rows [B, H, C],
    the hot set's exact logits (q_scaled [B, H, G, D] . hot_keys [B, H, S, D]) in the denominator."""
    if hot_keys is not None and hot_keys.shape[-2] > 0:
        # the hot keys' logits enter the softmax one by one (the same denominator as their log-sum-exp,
        # without logsumexp's host cost, which on a decode step is more than the arithmetic)
        hot = torch.matmul(q_scaled, hot_keys.to(q_scaled.dtype).transpose(-1, -2))
        n = hot.shape[-1]
        return torch.softmax(torch.cat([hot, log_mass], dim=-1), dim=-1)[..., n:].sum(2)
    return torch.softmax(log_mass, dim=-1).sum(2)
