"""Predicting a layer's chunk choice before it is made, and counting how often the predictions are right.

Two predictions, scored against every choice they are about:
- next layer: while layer l computes, guess layer l+1's choice of this step by scoring a query against
  layer l+1's abstracts: with a look-ahead (hf/lookahead.py) the next layer's own query guessed from
  the hidden state that entered layer l, else layer l's query. The fetcher reads the guessed chunks
  that live on disk while the guess's gate (PrefetchGate) is open.
- next step: "the same as last step" (importance persists); its rate feeds the admission gate.

Hit counts add up on the device (counting costs no host sync per step); a rate is read on the host
when a gate looks, once a window.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..selection import chunks_in_budget, overlap
from .policies import PipelineTuning, gate_for, sampler_for


class HitCounter:
    """Right guesses (a device scalar, summed without a sync) over guesses made (a host int)."""

    def __init__(self) -> None:
        self.hits: Optional[torch.Tensor] = None
        self.total = 0
        self._mark = (0, 0)  # (hits, total) when window_rate last read them

    def add(self, hits: torch.Tensor, total: int) -> None:
        self.hits = hits if self.hits is None else self.hits + hits
        self.total += total

    def rate(self) -> Optional[float]:
        """The hit rate over every guess so far (None: none made). One host sync."""
        return int(self.hits) / self.total if self.total else None

    def window_rate(self) -> Optional[float]:
        """The hit rate of the guesses made since the last call (None: none since). One host sync."""
        if self.hits is None:
            return None
        hits, total = int(self.hits), self.total
        h0, t0 = self._mark
        self._mark = (hits, total)
        return (hits - h0) / (total - t0) if total > t0 else None


class Predictor:
    """The next-layer and next-step predictions, their hit counters and the next-layer gate.

    `gate` (PrefetchGate) says whether guesses are read ahead; `sampler` (GuessSampler) how often
    guesses are made while they are not. `enabled` False makes no guesses at all (synchronous fetching:
    a guess is a scoring pass for a statistic only). `lookahead`: an hf.lookahead.Lookahead or None.
    """

    def __init__(self, tuning: Optional[PipelineTuning] = None) -> None:
        tuning = tuning or PipelineTuning()
        self.next_step_every = tuning.next_step_every
        self.next_layer = HitCounter()
        self.next_step = HitCounter()
        self.gate = gate_for(tuning)
        self.sampler = sampler_for(tuning)
        self.enabled = True
        self.lookahead = None
        self._last: Dict[int, torch.Tensor] = {}  # per layer, its last choice
        self._guesses: Dict[int, torch.Tensor] = {}  # per layer, the guess at its choice of this step

    @property
    def prefetching(self) -> bool:
        """Whether next-layer guesses are read ahead from disk now."""
        return self.gate.on

    def after_choice(self, layer, nxt, q: torch.Tensor, idx: torch.Tensor, step: int,
                     budget: Optional[int]) -> Optional[torch.Tensor]:
        """After `layer` chose idx [B, H, k] for query q at decode step `step`: score the predictions of
        that choice, then guess the choice of `nxt` (the next layer, or None) under `budget`.

        Returns the guess [B, H, k'] when one is made: while guesses are read ahead, and one step in
        sampler.every while they are not (made only to be scored). The next-step prediction is scored
        one step in next_step_every. Layers are hf layers: layer_idx, n_chunks, chunk_len, head_dim,
        scaling and choose(q, k) are what is used of them.
        """
        i = layer.layer_idx
        last = self._last.get(i)
        if last is not None and last.shape == idx.shape and step % self.next_step_every == 0:
            self.next_step.add(overlap(last, idx, layer.n_chunks), idx.numel())
        self._last[i] = idx
        guess = self._guesses.pop(i, None)  # a guess is for one step
        if guess is not None and guess.shape == idx.shape:
            self.next_layer.add(overlap(guess, idx, layer.n_chunks), idx.numel())
        if nxt is None or nxt.n_chunks == 0 or budget is None or not self.enabled:
            return None
        if not self.sampler.due(step, self.prefetching):
            return None
        k = chunks_in_budget(budget, nxt.chunk_len, nxt.n_chunks)
        if k <= 0 or nxt.head_dim != layer.head_dim:
            return None
        if nxt.scaling is None:
            nxt.scaling = layer.scaling
        qn = self.lookahead.query(nxt.layer_idx, i) if self.lookahead is not None else None
        guess = nxt.choose(qn if qn is not None else q, k)
        self._guesses[nxt.layer_idx] = guess
        return guess

    def end_window(self, seconds: float, steps: int) -> None:
        """Every gate_every steps: the last window's next-layer hit rate sets how often guesses are
        sampled, and with its mean sparse step time (seconds over steps) decides the gate."""
        rate = self.next_layer.window_rate()
        self.sampler.update(rate, self.gate.min_hit)
        if rate is None and not steps:
            return
        self.gate.update(rate, seconds / steps if steps else None)

    def stats(self) -> dict:
        return {"predict_next_layer_hit_rate": self.next_layer.rate(),
                "predict_next_step_hit_rate": self.next_step.rate()}
