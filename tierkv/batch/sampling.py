"""Choosing each row's next token: greedy, or sampled with the row's own temperature, top-k, top-p
and random generator.

Each sampled row draws from a generator of its own, seeded from its request (its seed, or its id), and
sampling runs on the CPU in float32: a row's draws depend on its own logits only, not on the other rows
of its batch, the device, or whether the batch was cut short by a crash and run again.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .requests import Request


class RowSampler:
    def __init__(self, requests: Sequence[Request]) -> None:
        self.requests = list(requests)
        self.sampled = [i for i, r in enumerate(self.requests) if not r.greedy]
        self.generators = {}
        for i in self.sampled:
            g = torch.Generator(device="cpu")
            g.manual_seed(self.requests[i].sampling_seed())
            self.generators[i] = g

    def __call__(self, logits: torch.Tensor) -> List[int]:
        """Next token ids [B] from the last position's logits [B, V]."""
        out = logits.argmax(dim=-1).tolist()
        if self.sampled:
            rows = logits[self.sampled].float().cpu()
            for j, i in enumerate(self.sampled):
                r = self.requests[i]
                out[i] = sample(rows[j], r.temperature, r.top_k, r.top_p, self.generators[i])
        return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token from a row of logits [V]: scaled by 1/temperature, cut to the top_k best (0: all),
    then to the fewest best whose probabilities sum to top_p (always at least one)."""
    x = logits / temperature
    if 0 < top_k < x.shape[0]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
        drop = before >= top_p
        drop[0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
