"""Scoring a layer's chunks for a query, and choosing the ones a decode step reads.

The one implementation: the decode step (hf/layer.py), the next-layer guess (pipeline/predictor.py) and
the tests all call these functions. The data they score, abstracts and 2-bit key codes, is made in
abstracts.py, which also holds the attention-mass arithmetic.

A layer keeps its abstracts as one tensor [B, H, 2D, capacity] in the keys' dtype (abstracts.as_rows):
per KV head, the channels' minima in rows :D and maxima in rows D:, one column per chunk, so scoring is
one matrix product. Two scorings:

- 'bound': the most any key of the chunk could score, max over the grouped query heads and query
  tokens of sum_d max(q_d * min_d, q_d * max_d) = [min(q, 0), max(q, 0)] . [min; max] >= max_k q . k.
- 'mass': the chunk's estimated share of each query head's softmax, from its keys' 2-bit codes, with
  the hot set's exact logits in the denominator, summed over the grouped query heads.

Choosing: each KV head's top k chunks ('head'), or the top k of the heads' summed scores, the same for
every head of the layer ('shared'). k is how many of the layer's chunks fit the token budget.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .abstracts import mass_shares
from .errors import FormatError


def chunks_in_budget(budget: int, chunk_len: int, n_chunks: int) -> int:
    """How many chunks of `chunk_len` tokens a step reads under a budget of `budget` tokens."""
    return min(budget // chunk_len, n_chunks)


def bound_scores(q: torch.Tensor, abstracts: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Upper bounds of q . k [B, H, C] for q [B, Hq, T, D] over the first n_chunks chunks of abstracts
    [B, H, 2D, capacity], max over the group's query heads and tokens, in the abstracts' dtype."""
    B, Hq, T, D = q.shape
    qg = q.reshape(B, abstracts.shape[1], -1, D)
    qc = torch.cat([qg.clamp(max=0), qg.clamp(min=0)], dim=-1).to(abstracts.dtype)
    return torch.matmul(qc, abstracts[..., :n_chunks]).amax(dim=2)


def mass_scores(q: torch.Tensor, abstracts: torch.Tensor, codes: torch.Tensor, n_chunks: int,
                scaling: Optional[float] = None, hot_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Estimated attention mass [B, H, C] for q [B, Hq, T, D] of the first n_chunks chunks (abstracts
    [B, H, 2D, capacity], codes [B, H, capacity, L, D/4]); `scaling` is the softmax scale (None:
    1/sqrt(D)); hot_keys [B, H, S, D] the exact keys in the denominator (None: chunks only)."""
    B, Hq, T, D = q.shape
    scale = scaling if scaling is not None else D ** -0.5
    qs = q.float().reshape(B, abstracts.shape[1], -1, D) * scale
    return mass_shares(ops.mass_logits(qs, abstracts, codes, n_chunks), qs, hot_keys)


def score(q: torch.Tensor, abstracts: torch.Tensor, codes: Optional[torch.Tensor], n_chunks: int, *,
          scoring: str = "mass", scaling: Optional[float] = None, hot_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance [B, H, C] of each chunk per KV head for q [B, Hq, T, D]; higher is better.

    'mass' needs key codes: a layer without them (made under scoring 'bound') is ranked by its bound.
    """
    if q.dim() != 4 or abstracts.dim() != 4 or abstracts.shape[2] != 2 * q.shape[-1] or q.shape[1] % abstracts.shape[1]:
        raise FormatError(f"expected q [B, Hq, T, D] and abstracts [B, H, 2D, C] with H dividing Hq, got "
                          f"{tuple(q.shape)} and {tuple(abstracts.shape)}")
    if scoring == "mass" and codes is not None:
        return mass_scores(q, abstracts, codes, n_chunks, scaling, hot_keys)
    return bound_scores(q, abstracts, n_chunks)


def choose(scores: torch.Tensor, k: int, selection: str = "head") -> torch.Tensor:
    """The k chunks [B, H, k] to read for scores [B, H, C]: each head's top k ('head'), or the top k of
    the heads' summed scores, the same for every head ('shared'). In no particular order."""
    if selection == "shared":
        idx = torch.topk(scores.sum(1), k, dim=-1, sorted=False).indices
        return idx.unsqueeze(1).expand(-1, scores.shape[1], -1).contiguous()
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def overlap(a: torch.Tensor, b: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """How many of b's chosen chunks [B, H, k] are also in a's (a device scalar: counting needs no sync)."""
    mask = torch.zeros(a.shape[0], a.shape[1], n_chunks, dtype=torch.bool, device=a.device)
    mask.scatter_(2, a.clamp(max=n_chunks - 1), True)
    return mask.gather(2, b).sum()
