"""The plan: a chunk length per layer, chosen from how skewed the layer's attention is at prefill.

Following LeoAM's observation, a layer whose queries put their mass on a few small regions (many
"attention deserts": blocks that receive almost nothing) is served best by short chunks, which let
selection pick the few places that matter without dragging in their empty neighbours; a layer whose
attention is spread flat gains nothing from fine chunks and pays for them in abstracts and table
entries, so it gets long ones.

desert rate = share of (query head, query, 16-token block) triples whose block receives less than
`tau / n_blocks` of the query's attention, i.e. less than a tenth of its fair share with tau = 0.1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

BLOCK = 16


def desert_rate(q: torch.Tensor, k: torch.Tensor, scaling: float, n_queries: int = 16, tau: float = 0.1,
                max_keys: Optional[int] = None) -> float:
    """Attention-desert rate of a layer from its prefill queries and keys (first sequence of the batch).

    q: [B, Hq, T, D], k: [B, Hkv, T, D]. The last `n_queries` queries attend causally over all T keys;
    only blocks fully before the first of those queries are judged (the recent tail is always attended).
    """
    T = k.shape[2]
    nq = min(n_queries, T)
    n_blocks = (T - nq) // BLOCK
    if n_blocks < 2:
        return 0.0
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    qs = q[0, :, T - nq :].float()  # [Hq, nq, D]
    deserts, total = 0, 0
    for h0 in range(0, Hkv, max(1, Hkv // 4)):  # a few KV heads at a time bounds the memory of the scores
        h1 = min(Hkv, h0 + max(1, Hkv // 4))
        kk = k[0, h0:h1].float().repeat_interleave(g, dim=0)  # [(h1-h0)*g, T, D]
        s = torch.matmul(qs[h0 * g : h1 * g], kk.transpose(-1, -2)) * scaling  # [., nq, T]
        causal = torch.arange(T, device=s.device)[None, :] > torch.arange(T - nq, T, device=s.device)[:, None]
        s = s.masked_fill(causal, float("-inf"))
        p = torch.softmax(s, dim=-1)[..., : n_blocks * BLOCK]
        mass = p.reshape(*p.shape[:-1], n_blocks, BLOCK).sum(-1)  # [., nq, n_blocks]
        deserts += int((mass < tau / n_blocks).sum())
        total += mass.numel()
    return deserts / total


def plan_length(rate: float, lengths: Sequence[int]) -> int:
    """Map a desert rate in [0, 1] to one of the allowed chunk lengths: high rate -> short chunks."""
    lengths = sorted(lengths)
    rate = min(1.0, max(0.0, rate))
    idx = round((1.0 - rate) * (len(lengths) - 1))
    return lengths[idx]
