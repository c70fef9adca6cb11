"""Greedy exact-match evaluation of the retrieval models on prompts (tierkv.models.tasks.Prompt).

Anything with `input_ids` and `answer_ids` (and a length) can be evaluated: the decoding loop knows no
task, only prompts, a model and a cache factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tierkv.compat import cache_kwargs, output_cache
from tierkv.errors import ConfigError


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[tuple[int, ...]]
    hits: list[bool]

    def summary(self) -> str:
        return f"{self.correct}/{self.total} = {100 * self.accuracy:.1f}%"


@torch.inference_mode()
def generate_answers(model, prompts: Sequence, cache_factory: Callable[[], object] | None = None,
                     max_new_tokens: int | None = None, batch_size: int = 16) -> list[tuple[int, ...]]:
    """Greedy decoding of each prompt's answer, one prefill then token by token through a cache.

    `cache_factory()` makes a fresh cache object per batch (tierkv's cache, a DynamicCache,
    ...); None lets the model make its own DynamicCache. Prompts are batched only with prompts of the same
    length, so no padding or attention mask is ever needed (pass batch_size=1 for single-sequence caches).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} is invalid; expected >= 1")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    preds: list[tuple[int, ...] | None] = [None] * len(prompts)
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and j - i < batch_size and len(prompts[order[j]]) == len(prompts[order[i]]):
            j += 1
        batch = [prompts[k] for k in order[i:j]]
        n_new = max_new_tokens if max_new_tokens is not None else max(len(p.answer_ids) for p in batch)
        ids = torch.tensor([p.input_ids for p in batch], dtype=torch.long, device=device)
        cache = cache_factory() if cache_factory is not None else None
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        gen = [tok]
        for _ in range(n_new - 1):
            out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            cache = output_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            gen.append(tok)
        rows = torch.cat(gen, dim=1).tolist()
        for k, row in zip(order[i:j], rows):
            preds[k] = tuple(row)
        i = j
    return preds  # type: ignore[return-value]


def evaluate(model, prompts: Sequence, cache_factory: Callable[[], object] | None = None,
             max_new_tokens: int | None = None, batch_size: int = 16) -> EvalResult:
    """Exact-match accuracy of greedy answers: a prompt counts only if every answer token is right."""
    if len(prompts) == 0:
        raise ConfigError("evaluate got no prompts; expected at least one")
    was_training = model.training
    model.eval()
    try:
        preds = generate_answers(model, prompts, cache_factory, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    hits = [tuple(p[: len(q.answer_ids)]) == tuple(q.answer_ids) for p, q in zip(preds, prompts)]
    return EvalResult(sum(hits) / len(hits), sum(hits), len(hits), preds, hits)
