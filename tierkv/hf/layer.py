"""TierKVLayer: one model layer's cache, as transformers sees it, and the cut of its tokens into chunks.

The layer keeps on the device only the hot set (the first `sink` tokens and a tail of at least `window`
recent tokens); everything between is cut into chunks of the layer's planned length, encoded in the
configured format and handed to the store (ingest). `update` only appends the new tokens to the tail;
the registered attention function (hf/attention.py) attends, then calls `compact`, which moves tokens
from the tail into the sink and into chunks. The per-chunk state (abstracts, key codes, addresses,
importance) is the layer's ChunkTable; choosing chunks goes through tierkv.selection; reading them back
through a Placement from the fetcher and the layer's ChunkGather.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import ops, selection
from ..errors import TierKVError
from ..formats import ChunkLayout
from ..keys import ChunkKey
from ..pipeline.fetch import Placement
from ..planner import desert_rate, plan_length
from .gather import ChunkGather
from .table import ChunkTable


def cat_tokens(parts) -> Optional[torch.Tensor]:
    """The non-empty tensors of `parts` joined along the token axis (None when there are none)."""
    parts = [p for p in parts if p is not None and p.shape[-2] > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class TierKVLayer(CacheLayerMixin):
    """One layer of a TierKVCache. `key(b, layer, c)` names a chunk in the store; `passes` is the cache's
    PassWork (pass start, host tables, entry counts); `fetcher` places chosen chunks for gather_all;
    `fast_ext`: gathers launch the compiled extension's op straight (hf.gather.ChunkGather).

    `scorer`: None, or a callable (layer, q, hot_keys) -> scores [B, H, C] that replaces the configured
    scoring (an experiment's hook: quality.SelectionProbe)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_idx: int, config, store, passes, fetcher, key: Callable[[int, int, int], ChunkKey],
                 fast_ext: bool = False, min_chunks_in_budget: int = 4, flush_max: int = 32) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config, self.store, self.passes, self.fetcher, self.key = config, store, passes, fetcher, key
        self.min_chunks_in_budget, self.flush_max = min_chunks_in_budget, flush_max
        self.length = 0  # tokens seen
        self.sink: Optional[torch.Tensor] = None  # [2, B, H, S, D]: K and V of the first tokens
        self.tail_k: Optional[torch.Tensor] = None  # views into tail_buffer once the prompt is ingested
        self.tail_v: Optional[torch.Tensor] = None
        self.tail_buffer: Optional[torch.Tensor] = None  # [2, B, H, capacity, D]
        self.table: Optional[ChunkTable] = None  # made with the first update
        self.gatherer = ChunkGather(store, fast_ext)
        self.scaling: Optional[float] = None  # the attention's softmax scale, set by the first sparse step
        self.rate: Optional[float] = None  # attention-desert rate measured at prefill
        self.pending: Optional[torch.Tensor] = None  # key states returned by the last update
        self.scorer = None

    # --- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.n_heads, _, self.head_dim = key_states.shape
        self.table = ChunkTable(self.layer_idx, self.batch_size, self.n_heads, self.head_dim, self.dtype,
                                self.device, self.store, self.config, self.passes.host_table, self.flush_max)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise TierKVError(
                f"batch size changed from {self.batch_size} to {key_states.shape[0]} within one tierkv cache; "
                "use a new cache for a new batch"
            )
        if self.layer_idx == 0:
            self.passes.begin_pass()
        q = key_states.shape[-2]
        T = self.tail_len
        buf = self.tail_buffer
        if T == 0 and buf is None:
            self.tail_k, self.tail_v = key_states, value_states
        elif buf is not None and self.tail_in_buffer() and T + q <= buf.shape[3]:
            buf[0, :, :, T : T + q] = key_states
            buf[1, :, :, T : T + q] = value_states
            self.tail_k, self.tail_v = buf[0, :, :, : T + q], buf[1, :, :, : T + q]
        else:
            self.tail_k = torch.cat([self.tail_k, key_states], dim=-2)
            self.tail_v = torch.cat([self.tail_v, value_states], dim=-2)
        self.length += q
        self.pending = key_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise TierKVError("a tierkv cache cannot be reset in place; create a new one with tierkv.offload")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise TierKVError("beam search is not supported by tierkv caches (reorder_cache); use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise TierKVError("cropping a tierkv cache is not supported (assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise TierKVError("expanding a tierkv cache's batch is not supported (num_return_sequences > 1 or beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TierKVError("selecting rows of a tierkv cache's batch is not supported")

    # --- geometry ----------------------------------------------------------------------------------
    @property
    def sink_len(self) -> int:
        return 0 if self.sink is None else self.sink.shape[-2]

    @property
    def sink_k(self) -> Optional[torch.Tensor]:
        return None if self.sink is None else self.sink[0]

    @property
    def sink_v(self) -> Optional[torch.Tensor]:
        return None if self.sink is None else self.sink[1]

    def tail_in_buffer(self) -> bool:
        return self.tail_buffer is not None and self.tail_k.data_ptr() == self.tail_buffer.data_ptr()

    @property
    def tail_len(self) -> int:
        return 0 if self.tail_k is None else self.tail_k.shape[-2]

    @property
    def layout(self) -> Optional[ChunkLayout]:
        """The layer's chunk layout, set by the plan when the first chunk is cut."""
        return None if self.table is None else self.table.layout

    @property
    def chunk_len(self) -> int:
        return self.layout.n_tokens if self.layout is not None else 0

    @property
    def n_chunks(self) -> int:
        return 0 if self.table is None else self.table.n_chunks

    # --- moving tokens from the tail into sink and chunks ------------------------------------------
    def observe_prefill(self, q: torch.Tensor, k: torch.Tensor, scaling: float) -> None:
        """Measure the layer's attention skew on its first (prefill) queries, for the plan."""
        if self.rate is None and self.config.chunk_length is None and k.shape[-2] >= 4 * 16:
            self.rate = desert_rate(q, k, scaling)

    def _plan(self) -> int:
        cfg = self.config
        if cfg.chunk_length is not None:
            return cfg.chunk_length
        lengths = cfg.chunk_lengths
        if cfg.budget is not None:
            # at least min_chunks_in_budget chunks fit the budget (see PipelineTuning)
            fit = [n for n in lengths if n * self.min_chunks_in_budget <= cfg.budget]
            lengths = fit or lengths[:1]
        if self.rate is None:
            return lengths[len(lengths) // 2]
        return plan_length(self.rate, lengths)

    def compact(self) -> None:
        cfg = self.config
        need_sink = cfg.sink - self.sink_len
        if need_sink > 0 and self.tail_len > 0:
            n = min(need_sink, self.tail_len)
            head = torch.stack([self.tail_k[:, :, :n], self.tail_v[:, :, :n]])
            self.sink = head if self.sink is None else torch.cat([self.sink, head], dim=-2)
            self.tail_k, self.tail_v = self.tail_k[:, :, n:], self.tail_v[:, :, n:]
        if self.sink_len >= cfg.sink:
            if self.layout is None:
                shortest = cfg.chunk_length if cfg.chunk_length is not None else min(cfg.chunk_lengths)
                if self.tail_len - cfg.window >= shortest:
                    self.table.layout = ChunkLayout(cfg.format, self._plan(), self.n_heads, self.head_dim, cfg.group_size)
            if self.layout is not None:
                L = self.chunk_len
                n_cut = (self.tail_len - cfg.window) // L
                if n_cut > 0:
                    self._ingest(self.tail_k[:, :, : n_cut * L], self.tail_v[:, :, : n_cut * L], n_cut)
                    self.tail_k, self.tail_v = self.tail_k[:, :, n_cut * L :], self.tail_v[:, :, n_cut * L :]
        self._own_tail()

    def _own_tail(self) -> None:
        """Keep the tail at the front of a buffer of its own with room to grow.

        A slice of the prompt's K/V would keep the whole prompt alive; a fresh buffer lets it go, and
        the room lets the next steps append in place instead of reallocating.
        """
        if self.tail_k is None or self.tail_in_buffer():
            return
        T = self.tail_len
        cap = T + max(self.chunk_len, 64) + 64
        B, H, D = self.batch_size, self.n_heads, self.head_dim
        buf = torch.empty(2, B, H, cap, D, dtype=self.dtype, device=self.device)
        buf[0, :, :, :T] = self.tail_k
        buf[1, :, :, :T] = self.tail_v
        self.tail_buffer = buf
        self.tail_k, self.tail_v = buf[0, :, :, :T], buf[1, :, :, :T]

    def _ingest(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        lay = self.layout
        packed, abstracts = ops.ingest(k, v, lay.n_tokens, lay.format, lay.group_size)  # [B,n,nb], [B,n,H,2,D]
        B, c0 = self.batch_size, self.n_chunks
        keys = [[self.key(b, self.layer_idx, c) for c in range(c0, c0 + n)] for b in range(B)]
        self.table.append(abstracts, k, keys)
        self.store.put_many([key for row in keys for key in row], packed.reshape(B * n, lay.nbytes), tier="cpu")

    # --- choosing and reading chunks -----------------------------------------------------------------
    def hot_keys(self) -> Optional[torch.Tensor]:
        """The sink's and tail's keys [B, H, S + T, D] together (a copy)."""
        return cat_tokens([self.sink_k, self.tail_k])

    def score(self, q: torch.Tensor, hot_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Importance of each chunk per KV head [B, H, C] for the query q [B, Hq, T, D] (selection.score).
        hot_keys: the sink's and tail's keys where the caller already holds them together (else they are
        joined here, for scoring 'mass')."""
        if self.scorer is not None:
            return self.scorer(self, q, hot_keys)
        t = self.table
        mass = t.codes is not None and self.config.scoring == "mass"
        if mass and hot_keys is None:
            hot_keys = self.hot_keys()
        return selection.score(q, t.abstracts, t.codes, t.n_chunks, scoring=self.config.scoring,
                               scaling=self.scaling, hot_keys=hot_keys)

    def choose(self, q: torch.Tensor, k: int, hot_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The k chunks [B, H, k] this layer reads for query q (selection.choose of the scores)."""
        return selection.choose(self.score(q, hot_keys), k, self.config.selection)

    def gather(self, idx: torch.Tensor, placement: Placement, k_out: torch.Tensor, v_out: torch.Tensor,
               n0: int = 0) -> Optional[torch.Tensor]:
        """Decode the chunks idx [B, H, k] (per KV head), read from where `placement` says, into rows
        n0 + j*L of k_out / v_out [B, H, N, D]. Returns None, or (placement.skip_source set) a [B, H, k]
        mask of the chunks left out of this step."""
        t = self.table
        if placement.rows:
            with self.passes.timers.part("refresh"):
                t.apply_rows(placement.rows)
        B, H, kk = idx.shape
        a = t.addresses(idx)
        skipped = None if placement.skip_source is None else (a[..., 0] == placement.skip_source).reshape(B, H, kk)
        table = self.gatherer.table(a, self.layout, B, kk, n0, self.device)
        self.passes.counts.entries += table.shape[0]
        self.gatherer.launch(placement.sources, table, self.layout, k_out, v_out)
        return skipped

    def gather_all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V [B, H, C*L, D] of every chunk, in order (exact attention; waits for disk reads)."""
        B, H, C = self.batch_size, self.n_heads, self.n_chunks
        idx = torch.arange(C, device=self.device).view(1, 1, C).expand(B, H, C)
        placement = self.fetcher.place(self.table, idx, wait=True, every=True)
        k_out = torch.empty(B, H, C * self.chunk_len, self.head_dim, dtype=self.dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        self.gather(idx, placement, k_out, v_out)
        return k_out, v_out
