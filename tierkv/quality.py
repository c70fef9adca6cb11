"""Measuring what sparse selection and quantized chunks cost in answers: helpers for bench/eval_quality.py,
tests/test_quality.py and `tierkv demo`.

Two shortcuts make a grid of (format x budget) cells affordable on a CPU, and both are exact (a third,
`float32_linears`, trades bf16 matmuls for float32 ones rounded back: same answers, other summation order):

- Prefill once, replay many times. Prefill through a TierKVCache is exact (the whole prompt is attended
  as usual) and its output does not depend on format or budget; only what the cache keeps afterwards
  does. So the prompt's K/V are computed once (`prefill`) and handed to each cache under test the way
  the registered attention function hands them over at prefill (`replay_prefill`: update, then
  compact, then end of the forward pass). tests/test_quality.py checks that a replayed cache decodes
  the same tokens as one filled by a real forward pass.
- Recall is read off the real decode path. `SelectionProbe` wraps, on one cache's layers only (instance
  attributes, nothing global), `update` (to keep the exact keys of every position), listens to the
  cache's choices (the query each selection was made for and the chunks it chose:
  TierKVCache.add_choice_listener), and compares the chosen set with the full softmax of that query
  over the exact keys.

Attention-mass recall of one query head at one decode step of one layer:
    p      = softmax(q . K_exact / sqrt(d))       over every position of the sequence so far
    total  = sum of p over sink + chosen chunks (the query's KV head's choice) + tail   (what it attended)
    middle = sum of p over chosen chunks / sum of p over all chunks   (the selection alone; hot set excluded)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .compat import cache_kwargs
from .errors import ConfigError

KV = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [B, H, T, D]


@contextmanager
def float32_linears(model) -> Iterator[None]:
    """Compute the model's bf16/fp16 linear layers as float32 matmuls rounded back to the model's dtype.

    On CPUs without native bf16 matrix units a bf16 matmul is several times slower than a float32 one
    (8 vs ~50 GFLOP/s on the 2-core CI machine), and it too accumulates in float32 and rounds once, so
    the result differs only by summation order: the same kind of difference as between two GPUs. Only
    speed changes; the model's activations, K/V and cache stay in its own dtype. Undone on exit.
    """
    patched = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype in (torch.bfloat16, torch.float16):
            w = m.weight.detach().float()
            b = None if m.bias is None else m.bias.detach().float()

            def forward(x, w=w, b=b):
                return F.linear(x.float(), w, b).to(x.dtype)

            m.forward = forward
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor) -> Tuple[KV, torch.Tensor]:
    """Run the prompt once with a DynamicCache: its K/V per layer and the greedy first answer token [B, 1]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, out.logits[:, -1].argmax(-1, keepdim=True)


def replay_prefill(cache, kv: KV, dtype: Optional[torch.dtype] = None) -> None:
    """Fill an empty cache (DynamicCache or TierKVCache) with a prompt's K/V as a prefill would.

    For a TierKVCache this is the sequence hf/attention.py runs for a prefill: `update` per layer, then
    `compact` (sink, chunks, tail), then `end_forward` after the last layer. The planner's skew
    measurement (which needs the queries) is skipped, so the config must fix `chunk_length`.
    """
    from .hf.cache import TierKVCache

    tier = isinstance(cache, TierKVCache)
    if tier and cache.config.chunk_length is None:
        raise ConfigError("replay_prefill: the config's chunk_length is None; the planner needs a real "
                          "prefill, so a replayed cache needs a fixed chunk_length")
    if tier and len(kv) != len(cache.layers):
        raise ConfigError(f"replay_prefill: {len(kv)} layers of K/V for a cache of {len(cache.layers)} layers")
    if cache.get_seq_length() != 0:
        raise ConfigError(f"replay_prefill: the cache already holds {cache.get_seq_length()} tokens; expected an empty one")
    for i, (k, v) in enumerate(kv):
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        cache.update(k, v, i)
        if tier:
            layer = cache.layers[i]
            layer.pending = None
            layer.compact()
    if tier:
        cache.end_forward()


@torch.inference_mode()
def continue_greedy(model, cache, first: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy tokens [B, n_new] after a (replayed) prefill whose greedy next token is `first` [B, 1]."""
    tok, gen = first, [first]
    for _ in range(n_new - 1):
        out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        gen.append(tok)
    return torch.cat(gen, dim=1)


@dataclass
class RecallStats:
    """Per-layer sums over (sequence, decode step, query head) of the recall measures, and needle counts.

    total:  attention mass on what was attended (sink + chosen chunks + tail)
    middle: the chosen chunks' share of the mass on all chunks (the selection alone, hot set excluded)
    oracle: `total` of the best choice the same budget allows (per KV head, the chunks with the most
            mass summed over its query heads): what any scoring could reach, so `oracle - total` is what
            the scoring loses and `1 - oracle` what the budget and chunk length lose.
    maxkey: `total` had the chunks been ranked by the exact max of q . k over their keys (max over the
            group's query heads), the quantity the abstracts' bound stands in for: `maxkey - total` is
            what the bound's looseness loses, `oracle - maxkey` what ranking by a max (not mass) loses.
    needle: per (sequence, decode step, KV head) whose needle lies in the chunks (not the hot set),
            whether every chunk holding part of it was chosen.
    alpha_*: `total` had the chunks been ranked, from the same stored abstracts (min m, max M per
            channel), by q . (m + M)/2 + alpha * |q| . (M - m)/2 (max over the group's query heads).
            alpha = 1 is exactly the bound tierkv ranks by (so alpha_1 ~ total, a check of the probe);
            alpha = 0 ranks by the box's centre alone; values between shrink the bound's width term.
    kept:   per (sequence, decode step after the first, KV head), the share of the chunks it chose that it
            had also chosen at the step before (the persistence next-step prediction and eviction rest on).
    lowbit: `total` had the chunks been ranked by their attention mass computed from a KIVI int2 copy of
            the keys (per-channel scale and zero per chunk, what the int2 format stores) instead of
            abstracts: a scoring that keeps 2 bits per key channel on the GPU (16 B per token and head
            at head_dim 64, the size of min/max bf16 abstracts of 16-token chunks). Only with
            SelectionProbe(lowbit=True); None otherwise.
    """

    n_layers: int
    ALPHAS = (0.0, 0.25, 0.5, 1.0)
    FIELDS = ("count", "total", "middle", "oracle", "maxkey", "low_total", "needle_hit", "needle_count",
              "alpha_0", "alpha_0.25", "alpha_0.5", "alpha_1", "lowbit", "lowbit_count", "kept", "kept_count")

    def __post_init__(self):
        for name in self.FIELDS:
            setattr(self, name, [0] * self.n_layers)

    def add(self, other: "RecallStats") -> None:
        for name in self.FIELDS:
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])

    def mean(self, what: str = "total", layer: Optional[int] = None) -> Optional[float]:
        vals = getattr(self, what)
        den = {"needle_hit": self.needle_count, "lowbit": self.lowbit_count, "kept": self.kept_count}.get(what, self.count)
        n = den[layer] if layer is not None else sum(den)
        if n == 0:
            return None
        return (vals[layer] if layer is not None else sum(vals)) / n

    def as_dict(self) -> dict:
        layers = range(self.n_layers)
        return {
            "queries": sum(self.count),
            "total": self.mean("total"),
            "middle": self.mean("middle"),
            "oracle": self.mean("oracle"),
            "maxkey": self.mean("maxkey"),
            "lowbit": self.mean("lowbit"),
            "alpha": {str(a): self.mean(f"alpha_{a:g}") for a in self.ALPHAS},
            "share_total_below_0.9": self.mean("low_total"),
            "needle_chosen": self.mean("needle_hit"),
            "kept": self.mean("kept"),
            "per_layer_total": [self.mean("total", i) for i in layers],
            "per_layer_middle": [self.mean("middle", i) for i in layers],
            "per_layer_oracle": [self.mean("oracle", i) for i in layers],
            "per_layer_maxkey": [self.mean("maxkey", i) for i in layers],
            "per_layer_lowbit": [self.mean("lowbit", i) for i in layers],
            "per_layer_needle_chosen": [self.mean("needle_hit", i) for i in layers],
            "per_layer_kept": [self.mean("kept", i) for i in layers],
        }


class SelectionProbe:
    """Records, on one TierKVCache, each sparse decode step's query and chosen chunks, and scores them
    against full attention over the exact keys (see the module docstring). Use as a context manager
    around the decode; `stats` then holds the sums. Wrapping is per layer instance and undone on exit.

    lowbit=True also measures the int2-mass ranking (RecallStats.lowbit); rescore=True makes the cache
    select by it (set as these layers' `scorer`). This experiment is what led to
    TierConfig(scoring="mass"), the runtime's default since, which ranks the same way from the int2 codes
    it keeps on the GPU (with the hot set exact in the denominator)."""

    def __init__(self, cache, scaling: float, needles: Optional[Sequence[Tuple[int, int]]] = None,
                 lowbit: bool = False, rescore: bool = False):
        self.cache = cache
        self.rescore = rescore  # select by _int2_mass instead of the runtime's bound (an experiment)
        self.scaling = scaling
        self.lowbit = lowbit or rescore
        self._lowbit_keys: dict = {}  # layer -> (n chunks, chunk length, int2 round trip of the chunks' keys)
        self.needles = needles  # per sequence of the batch: token range [start, end) holding the answer
        self.stats = RecallStats(len(cache.layers))
        self._keys: List[Optional[torch.Tensor]] = [None] * len(cache.layers)
        self._last_choice: List[Optional[torch.Tensor]] = [None] * len(cache.layers)

    def __enter__(self) -> "SelectionProbe":
        for layer in self.cache.layers:
            self._wrap_update(layer)
            if self.rescore:
                layer.scorer = self._rescore
        self.cache.add_choice_listener(self._on_choice)
        return self

    def __exit__(self, *exc) -> None:
        self.cache.remove_choice_listener(self._on_choice)
        for layer in self.cache.layers:
            layer.__dict__.pop("update", None)
            if self.rescore:
                layer.scorer = None

    def _wrap_update(self, layer) -> None:
        i, update = layer.layer_idx, layer.update

        def probe_update(key_states, value_states, *args, **kwargs):
            k = key_states.detach()
            self._keys[i] = k.clone() if self._keys[i] is None else torch.cat([self._keys[i], k], dim=-2)
            return update(key_states, value_states, *args, **kwargs)

        layer.update = probe_update  # on this instance only

    def _rescore(self, layer, q, hot_keys) -> torch.Tensor:
        return self._int2_mass(layer.layer_idx, q, self._keys[layer.layer_idx], layer.sink_len, layer.chunk_len,
                               layer.n_chunks)

    def _on_choice(self, layer, q, chunk_idx) -> None:
        # the geometry as the sparse step saw it: the layer compacts only after attending
        C = layer.n_chunks
        step = (q.detach(), layer.sink_len, layer.chunk_len, C, layer.tail_len, layer.length,
                layer.table.abstracts[..., :C])
        self._record(layer.layer_idx, chunk_idx, step)
        self._record_kept(layer.layer_idx, chunk_idx, C)

    def _record_kept(self, i: int, chunk_idx: torch.Tensor, n_chunks: int) -> None:
        """Share of this step's choice that the layer's previous step chose too (chunk indices are stable:
        chunks cut since then only add indices)."""
        from .selection import overlap

        last = self._last_choice[i]
        if last is not None and last.shape[:2] == chunk_idx.shape[:2] and chunk_idx.numel():
            B, H, k = chunk_idx.shape
            s = self.stats
            s.kept[i] += float(overlap(last, chunk_idx, n_chunks)) / k
            s.kept_count[i] += B * H
        self._last_choice[i] = chunk_idx.detach().clone()

    def _int2_keys(self, i: int, keys: torch.Tensor, S: int, L: int, C: int) -> torch.Tensor:
        """The chunks' keys as the int2 format stores them (per chunk, per channel), cached per layer."""
        from .formats import ChunkLayout, roundtrip

        got = self._lowbit_keys.get(i)
        if got is None or got[0] != C or got[1] != L:
            B, H, _, D = keys.shape
            kc = keys[:, :, S : S + C * L].reshape(B, H, C, L, D).transpose(1, 2)  # [B, C, H, L, D]
            kq, _ = roundtrip(kc, torch.zeros_like(kc), ChunkLayout("int2", L, H, D))
            got = (C, L, kq.transpose(1, 2).reshape(B, H, C * L, D).float())
            self._lowbit_keys[i] = got
        return got[2]

    def _int2_mass(self, i, q, keys, S, L, C) -> torch.Tensor:
        """Per KV head per chunk [B, H, C]: attention mass summed over the group's query heads, with the
        chunks' logits from int2 keys and the hot set's from the exact ones (the hot set stays exact)."""
        B, Hq, _, D = q.shape
        H = keys.shape[1]
        qf = q.float().reshape(B, H, Hq // H, D)
        logits = torch.matmul(qf, keys.float().transpose(-1, -2)) * self.scaling
        kq = self._int2_keys(i, keys, S, L, C)
        logits[..., S : S + C * L] = torch.matmul(qf, kq.transpose(-1, -2)) * self.scaling
        p = torch.softmax(logits, dim=-1)[..., S : S + C * L]
        return p.reshape(B, H, -1, C, L).sum(-1).sum(2)

    def _record(self, i: int, chunk_idx: torch.Tensor, step: tuple) -> None:
        q, S, L, C, T, length, abstracts = step
        keys = self._keys[i]
        if keys is None or keys.shape[-2] != length:
            raise ConfigError(f"SelectionProbe: layer {i} saw {0 if keys is None else keys.shape[-2]} keys but holds "
                              f"{length} tokens; the probe must wrap the cache before its prefill")
        B, Hq, _, D = q.shape
        H = keys.shape[1]
        g = Hq // H
        kk = chunk_idx.shape[-1]
        logits = torch.matmul(q.float().reshape(B, H, g, D), keys.float().transpose(-1, -2)) * self.scaling
        p = torch.softmax(logits, dim=-1)  # [B, H, g, length]
        chunk_mass = p[..., S : S + C * L].reshape(B, H, g, C, L).sum(-1)  # [B, H, g, C]
        hot = p[..., :S].sum(-1) + p[..., length - T :].sum(-1)
        chosen = chunk_mass.gather(-1, chunk_idx.unsqueeze(2).expand(B, H, g, kk)).sum(-1)
        best = torch.topk(chunk_mass.sum(2), kk, dim=-1).indices  # per KV head, for its whole group
        oracle = chunk_mass.gather(-1, best.unsqueeze(2).expand(B, H, g, kk)).sum(-1)
        chunk_max = logits[..., S : S + C * L].reshape(B, H, g, C, L).amax(-1).amax(2)  # [B, H, C]
        by_max = torch.topk(chunk_max, kk, dim=-1).indices
        maxkey = chunk_mass.gather(-1, by_max.unsqueeze(2).expand(B, H, g, kk)).sum(-1)
        ab = abstracts.float()  # [B, H, 2D, C]: rows :D min, D: max per channel
        centre, half = (ab[:, :, :D] + ab[:, :, D:]) / 2, (ab[:, :, D:] - ab[:, :, :D]) / 2
        qf = q.float().reshape(B, H, g, D)
        by_centre, by_width = torch.matmul(qf, centre), torch.matmul(qf.abs(), half)  # [B, H, g, C]
        alt = {}
        for a in RecallStats.ALPHAS:
            pick = torch.topk((by_centre + a * by_width).amax(2), kk, dim=-1).indices
            alt[a] = (hot + chunk_mass.gather(-1, pick.unsqueeze(2).expand(B, H, g, kk)).sum(-1)).clamp(max=1.0)
        if self.lowbit:
            pick = torch.topk(self._int2_mass(i, q, keys, S, L, C), kk, dim=-1).indices
            lowbit = (hot + chunk_mass.gather(-1, pick.unsqueeze(2).expand(B, H, g, kk)).sum(-1)).clamp(max=1.0)
        all_chunks = chunk_mass.sum(-1)
        total = (hot + chosen).clamp(max=1.0)
        middle = torch.where(all_chunks > 0, chosen / all_chunks.clamp(min=1e-30), torch.ones_like(chosen))
        s = self.stats
        s.count[i] += total.numel()
        s.total[i] += float(total.sum())
        s.middle[i] += float(middle.sum())
        s.oracle[i] += float((hot + oracle).clamp(max=1.0).sum())
        s.maxkey[i] += float((hot + maxkey).clamp(max=1.0).sum())
        for a, v in alt.items():
            getattr(s, f"alpha_{a:g}")[i] += float(v.sum())
        if self.lowbit:
            s.lowbit[i] += float(lowbit.sum())
            s.lowbit_count[i] += lowbit.numel()
        s.low_total[i] += int((total < 0.9).sum())
        if self.needles is not None:
            picked = chunk_idx.tolist()
            for b, (a, e) in enumerate(self.needles):
                if a < S or e > S + C * L:  # partly in the hot set: nothing for the selection to find
                    continue
                need = set(range((a - S) // L, (e - 1 - S) // L + 1))
                for h in range(H):
                    s.needle_count[i] += 1
                    s.needle_hit[i] += int(need <= set(picked[b][h]))


def exact_match(pred: torch.Tensor, answers: Sequence[Sequence[int]]) -> List[bool]:
    """Per row: every answer token right (pred [B, >= len(answer)])."""
    rows = pred.tolist()
    return [tuple(r[: len(a)]) == tuple(a) for r, a in zip(rows, answers)]
