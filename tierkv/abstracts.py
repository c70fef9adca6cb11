"""Chunk abstracts, the importance scores computed from them, and top-k selection under a token budget.

An abstract is, per chunk per KV head, the element-wise min and max of the chunk's keys. For a query q
    bound(q) = sum_d max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min  >=  max_k q . k
over every key k of the chunk, since each term of q . k is at most the larger of its two corner values.
Scores are these bounds; with grouped-query attention a KV head's chunk is worth what its most eager
query head (and query token) makes of it, so the bounds are combined by max over the group.
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


def score(q: torch.Tensor, abstracts: torch.Tensor, n_kv_heads: Optional[int] = None) -> torch.Tensor:
    """Upper bounds of q . k per KV head per chunk, combined over grouped query heads and query tokens.

    q:          [B, Hq, D] or [B, Hq, T, D] queries (one or T query tokens per sequence).
    abstracts:  [B, C, Hkv, 2, D] (min, max) per chunk per KV head.
    returns     [B, Hkv, C] float32.
    """
    if q.dim() == 3:
        q = q.unsqueeze(2)
    if q.dim() != 4 or abstracts.dim() != 5 or abstracts.shape[-2] != 2:
        raise FormatError(f"expected q [B, Hq, (T,) D] and abstracts [B, C, Hkv, 2, D], got {tuple(q.shape)}, {tuple(abstracts.shape)}")
    B, Hq, T, D = q.shape
    _, C, Hkv, _, Da = abstracts.shape
    if Da != D or abstracts.shape[0] != B:
        raise FormatError(f"q {tuple(q.shape)} and abstracts {tuple(abstracts.shape)} disagree on batch or head dim")
    if n_kv_heads is not None and n_kv_heads != Hkv:
        raise FormatError(f"expected {n_kv_heads} KV heads in abstracts, got {Hkv}")
    if Hq % Hkv:
        raise FormatError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    g = Hq // Hkv
    qf = q.float().reshape(B, Hkv, g * T, D)
    a = abstracts.float().permute(0, 2, 4, 1, 3)  # [B, Hkv, D, C, 2]
    lo, hi = a[..., 0], a[..., 1]  # [B, Hkv, D, C]
    bound = torch.matmul(qf.clamp(min=0), hi) + torch.matmul(qf.clamp(max=0), lo)  # [B, Hkv, g*T, C]
    return bound.amax(dim=2)


def select(scores: torch.Tensor, lengths: torch.Tensor, budget: int, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy top-scoring chunks whose lengths sum to at most `budget` tokens.

    scores:   [B, Hkv, C] (higher is more important).
    lengths:  [C] or [B, C] tokens per chunk (chunks of one layer may differ, e.g. a short last one).
    eligible: optional [B, C] or [B, Hkv, C] bool; ineligible chunks (padding, hot set) are never chosen.
    returns   [B, Hkv, C] bool: chosen chunks. Chunks are taken in descending score order while the
              running total stays within the budget; a chunk that would overflow it ends the selection.
    """
    if budget < 0:
        raise FormatError(f"budget: expected >= 0 tokens, got {budget}")
    B, H, C = scores.shape
    lens = lengths.to(scores.device).expand(B, C) if lengths.dim() == 1 else lengths.to(scores.device)
    lens = lens.unsqueeze(1).expand(B, H, C).to(torch.int64)
    s = scores.float()
    if eligible is not None:
        e = eligible if eligible.dim() == 3 else eligible.unsqueeze(1)
        s = torch.where(e.expand(B, H, C), s, torch.full_like(s, float("-inf")))
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    sorted_len = torch.gather(lens, -1, order)
    sorted_ok = torch.isfinite(torch.gather(s, -1, order))
    csum = torch.cumsum(torch.where(sorted_ok, sorted_len, torch.zeros_like(sorted_len)), dim=-1)
    # prefix property: once one chunk overflows, later ones are not taken either
    take_sorted = (csum <= budget) & sorted_ok
    take_sorted = torch.cumprod(take_sorted.to(torch.int8), dim=-1).bool()
    chosen = torch.zeros_like(take_sorted)
    chosen.scatter_(-1, order, take_sorted)
    return chosen
