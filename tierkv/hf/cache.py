"""TierKVCache: a transformers Cache whose KV lives in tierkv's tiers, chunk by chunk.

Per layer the cache keeps on the GPU only the hot set (the first `sink` tokens and a tail of at least
`window` recent tokens) and the layer's abstracts; everything between is cut into chunks of the layer's
planned length, encoded in the configured format and handed to the store (cpu tier, demoted to disk
when it is full). `update` only appends the new tokens to the tail; the registered attention function
(hf/attention.py) does the attention over what it needs and then calls `compact`, which moves tokens
from the tail into chunks.
"""

from __future__ import annotations

import itertools
import uuid
from typing import List, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops
from ..config import TierConfig
from ..errors import CapacityError, TierKVError
from ..formats import ChunkLayout, RAW_DTYPES, is_quantized
from ..keys import ChunkKey
from ..planner import desert_rate, plan_length
from ..store import ChunkStore

_ids = itertools.count()


class TierKVLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "TierKVCache", layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0  # tokens seen
        self.sink_k: Optional[torch.Tensor] = None
        self.sink_v: Optional[torch.Tensor] = None
        self.tail_k: Optional[torch.Tensor] = None
        self.tail_v: Optional[torch.Tensor] = None
        self.n_chunks = 0
        self.layout: Optional[ChunkLayout] = None  # set by the plan, when the first chunk is cut
        self.abstracts: Optional[torch.Tensor] = None  # [B, capacity, H, 2, D]
        self.addr: Optional[torch.Tensor] = None  # [B, capacity, 2] int64 (source, offset) or -1: disk only
        self.rate: Optional[float] = None  # attention-desert rate measured at prefill
        self.pending: Optional[torch.Tensor] = None  # key states returned by the last update
        self.on_gpu: Optional[torch.Tensor] = None  # [B, capacity] bool: a copy sits in the gpu tier
        self.importance: Optional[torch.Tensor] = None  # [B, capacity] float32: decayed selection counts
        self.dirty: set = set()  # (b, c) whose address must be refreshed from the store
        self.disk_only: set = set()

    # --- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.n_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise TierKVError(
                f"batch size changed from {self.batch_size} to {key_states.shape[0]} within one tierkv cache; "
                "use a new cache for a new batch"
            )
        if self.tail_k is None:
            self.tail_k, self.tail_v = key_states, value_states
        else:
            self.tail_k = torch.cat([self.tail_k, key_states], dim=-2)
            self.tail_v = torch.cat([self.tail_v, value_states], dim=-2)
        self.length += key_states.shape[-2]
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
        return 0 if self.sink_k is None else self.sink_k.shape[-2]

    @property
    def tail_len(self) -> int:
        return 0 if self.tail_k is None else self.tail_k.shape[-2]

    @property
    def chunk_len(self) -> int:
        return self.layout.n_tokens if self.layout is not None else 0

    def chunk_start(self, c: int) -> int:
        return self.sink_len + c * self.chunk_len

    # --- moving tokens from the tail into sink and chunks ------------------------------------------
    def observe_prefill(self, q: torch.Tensor, k: torch.Tensor, scaling: float) -> None:
        """Measure the layer's attention skew on its first (prefill) queries, for the plan."""
        cfg = self.cache.config
        if self.rate is None and cfg.chunk_length is None and k.shape[-2] >= 4 * 16:
            self.rate = desert_rate(q, k, scaling)

    def _plan(self) -> int:
        cfg = self.cache.config
        if cfg.chunk_length is not None:
            return cfg.chunk_length
        lengths = cfg.chunk_lengths
        if self.rate is None:
            return lengths[len(lengths) // 2]
        return plan_length(self.rate, lengths)

    def compact(self) -> None:
        cfg = self.cache.config
        need_sink = cfg.sink - self.sink_len
        if need_sink > 0 and self.tail_len > 0:
            n = min(need_sink, self.tail_len)
            head_k, head_v = self.tail_k[:, :, :n], self.tail_v[:, :, :n]
            self.sink_k = head_k.clone() if self.sink_k is None else torch.cat([self.sink_k, head_k], dim=-2)
            self.sink_v = head_v.clone() if self.sink_v is None else torch.cat([self.sink_v, head_v], dim=-2)
            self.tail_k, self.tail_v = self.tail_k[:, :, n:], self.tail_v[:, :, n:]
        if self.sink_len < cfg.sink:
            self._own_tail()
            return
        if self.layout is None:
            if self.tail_len - cfg.window < min(cfg.chunk_lengths if cfg.chunk_length is None else (cfg.chunk_length,)):
                self._own_tail()
                return
            fmt = cfg.format
            self.layout = ChunkLayout(fmt, self._plan(), self.n_heads, self.head_dim, cfg.group_size)
        L = self.chunk_len
        n_cut = (self.tail_len - cfg.window) // L
        if n_cut > 0:
            k = self.tail_k[:, :, : n_cut * L]
            v = self.tail_v[:, :, : n_cut * L]
            self._ingest(k, v, n_cut)
            self.tail_k, self.tail_v = self.tail_k[:, :, n_cut * L :], self.tail_v[:, :, n_cut * L :]
        self._own_tail()

    def _own_tail(self) -> None:
        # a slice keeps the whole prompt's K/V alive; a copy of the tail lets it go
        if self.tail_k is not None and self.tail_k.storage_offset() != 0:
            self.tail_k, self.tail_v = self.tail_k.clone(), self.tail_v.clone()

    def _grow(self, need: int) -> None:
        cap = 0 if self.abstracts is None else self.abstracts.shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        B, H, D = self.batch_size, self.n_heads, self.head_dim
        ab = torch.empty(B, new_cap, H, 2, D, dtype=self.dtype, device=self.device)
        addr = torch.full((B, new_cap, 2), -1, dtype=torch.int64, device=self.device)
        on_gpu = torch.zeros(B, new_cap, dtype=torch.bool, device=self.device)
        imp = torch.zeros(B, new_cap, dtype=torch.float32, device=self.device)
        if cap:
            ab[:, :cap] = self.abstracts
            addr[:, :cap] = self.addr
            on_gpu[:, :cap] = self.on_gpu
            imp[:, :cap] = self.importance
        self.abstracts, self.addr, self.on_gpu, self.importance = ab, addr, on_gpu, imp

    def _ingest(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        lay = self.layout
        packed, abstracts = ops.ingest(k, v, lay.n_tokens, lay.format, lay.group_size)
        c0 = self.n_chunks
        self._grow(c0 + n)
        self.abstracts[:, c0 : c0 + n] = abstracts
        keys = [self.cache.key(b, self.layer_idx, c) for b in range(self.batch_size) for c in range(c0, c0 + n)]
        self.cache.store_put(keys, packed.reshape(self.batch_size * n, lay.nbytes))
        self.n_chunks += n

    # --- reading chunks back -------------------------------------------------------------------------
    def refresh_addresses(self) -> None:
        """Bring the (source, offset) table up to date with what the store moved since the last step."""
        if not self.dirty:
            return
        cache = self.cache
        idx, vals, gpu = [], [], []
        for b, c in self.dirty:
            key = cache.key(b, self.layer_idx, c)
            loc, tier = cache.best_location(key)
            idx.append((b, c))
            vals.append(loc if loc is not None else (-1, -1))
            gpu.append(tier == "gpu")
            if loc is None:
                self.disk_only.add((b, c))
            else:
                self.disk_only.discard((b, c))
        self.dirty.clear()
        ii = torch.tensor(idx, dtype=torch.int64).to(self.device)
        self.addr[ii[:, 0], ii[:, 1]] = torch.tensor(vals, dtype=torch.int64).to(self.device)
        self.on_gpu[ii[:, 0], ii[:, 1]] = torch.tensor(gpu, dtype=torch.bool).to(self.device)

    def _stage_from_disk(self, chunk_idx: torch.Tensor, a: torch.Tensor, sources: List[torch.Tensor]) -> torch.Tensor:
        """Read the selected chunks that live only on disk into one staging buffer, added as a source.

        The store is not changed here: putting them into the cpu tier could evict another chunk this
        very gather is about to read. (The prefetch pipeline moves chunks up ahead of need instead.)
        """
        missing = a[..., 0] < 0
        if not bool(missing.any()):
            return a
        B, H, kk = chunk_idx.shape
        b_of = torch.arange(B, device=self.device).view(B, 1, 1).expand(B, H, kk)
        pairs = torch.stack([b_of[missing], chunk_idx[missing]], dim=1)
        uniq = torch.unique(pairs, dim=0)
        nb = self.layout.nbytes
        pin = self.device.type == "cuda"
        staging = torch.empty(len(uniq), nb, dtype=torch.uint8, pin_memory=pin)
        slot = torch.full((B, self.n_chunks), -1, dtype=torch.int64)
        for m, (b, c) in enumerate(uniq.tolist()):
            staging[m] = self.cache.store.read(self.cache.key(b, self.layer_idx, c), tier="disk")
            slot[b, c] = m
        sources.append(staging.view(-1))
        slot = slot.to(self.device)
        off = slot.gather(1, chunk_idx.reshape(B, H * kk)).reshape(B, H, kk) * nb
        src = torch.full_like(off, len(sources) - 1)
        return torch.stack([torch.where(missing, src, a[..., 0]), torch.where(missing, off, a[..., 1])], dim=-1)

    def gather(self, chunk_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V [B, H, k*L, D] of the chunks chunk_idx [B, H, k] (per KV head), via the kernels."""
        self.refresh_addresses()
        B, H, kk = chunk_idx.shape
        L, D = self.chunk_len, self.head_dim
        a = self.addr.gather(1, chunk_idx.reshape(B, H * kk, 1).expand(B, H * kk, 2)).reshape(B, H, kk, 2)
        sources = self.cache.store_sources()
        if self.disk_only:
            a = self._stage_from_disk(chunk_idx, a, sources)
        hb = self.layout.head_bytes
        b_idx = torch.arange(B, device=self.device).view(B, 1, 1).expand(B, H, kk)
        h_idx = torch.arange(H, device=self.device).view(1, H, 1).expand(B, H, kk)
        j_idx = torch.arange(kk, device=self.device).view(1, 1, kk).expand(B, H, kk)
        table = torch.stack(
            [a[..., 0], a[..., 1] + h_idx * hb, torch.full_like(j_idx, L), b_idx * H + h_idx, j_idx * L], dim=-1
        ).reshape(-1, 5)
        k_out = torch.empty(B, H, kk * L, D, dtype=self.dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        if self.device.type == "cuda":
            self.cache.store.wait_inflight(torch.cuda.current_stream(self.device))
        ops.gather(sources, table, self.layout.format, D, self.layout.group_size, k_out, v_out)
        return k_out, v_out

    def note_selection(self, idx: torch.Tensor) -> None:
        """Count the heads that chose each chunk this step into its decayed importance."""
        B, C = self.batch_size, self.n_chunks
        counts = torch.zeros(B, C, dtype=torch.float32, device=self.device)
        flat = idx.reshape(B, -1)
        counts.scatter_add_(1, flat, torch.ones(flat.shape, dtype=torch.float32, device=self.device))
        self.importance[:, :C].mul_(self.cache.config.importance_decay).add_(counts)
        self.cache.selected_layers.add(self.layer_idx)

    def promote_hot(self, limit: int) -> None:
        """Copy up to `limit` of the most important chunks not yet on the GPU into the gpu tier."""
        C = self.n_chunks
        if limit <= 0 or C == 0:
            return
        self.refresh_addresses()
        # only chunks in the cpu tier: a disk read here would stall the step (the pipeline prefetches those)
        skip = self.on_gpu[:, :C] | (self.addr[:, :C, 0] < 0)
        imp = torch.where(skip, torch.zeros_like(self.importance[:, :C]), self.importance[:, :C])
        vals, flat = torch.topk(imp.reshape(-1), min(limit, imp.numel()))
        store = self.cache.store
        for val, f in zip(vals.tolist(), flat.tolist()):
            if val < 1.0:  # chosen by fewer than one head per step on average: not worth a copy
                break
            key = self.cache.key(f // C, self.layer_idx, f % C)
            store.touch([key], val)
            try:
                store.promote(key, "gpu")
            except CapacityError:
                break
        self.refresh_addresses()

    def gather_all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        C = self.n_chunks
        idx = torch.arange(C, device=self.device).view(1, 1, C).expand(self.batch_size, self.n_heads, C)
        return self.gather(idx)


class TierKVCache(Cache):
    """A transformers Cache backed by a tierkv ChunkStore. Create it through `tierkv.offload`."""

    def __init__(self, config: TierConfig, num_layers: int, store: ChunkStore, name: Optional[str] = None) -> None:
        self.config = config
        self.store = store
        self.cache_id = name or f"c{next(_ids)}-{uuid.uuid4().hex[:8]}"
        super().__init__(layers=[TierKVLayer(self, i) for i in range(num_layers)])
        self.selected_layers: set = set()
        store.add_listener(self._on_move)

    # --- keys and addresses ---------------------------------------------------------------------------
    def key(self, b: int, layer: int, c: int) -> ChunkKey:
        return ChunkKey(f"{self.cache_id}-b{b}", layer, c)

    def _on_move(self, key: ChunkKey, tier: str) -> None:
        if not key.stream.startswith(self.cache_id + "-b"):
            return
        b = int(key.stream[len(self.cache_id) + 2 :])
        self.layers[key.layer].dirty.add((b, key.index))

    def store_sources(self) -> List[torch.Tensor]:
        return self.store.sources()

    def best_location(self, key: ChunkKey) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
        for tier in ("gpu", "cpu"):
            loc = self.store.source_location(key, tier)
            if loc is not None:
                return loc, tier
        return None, None

    def end_forward(self) -> None:
        """After the last layer of a forward pass: age importance, refresh the gpu tier's contents."""
        self.store.tick()
        limit = self.config.prefetch_depth
        for i in sorted(self.selected_layers):
            layer = self.layers[i]
            layer.promote_hot(limit * layer.n_heads)
        self.selected_layers.clear()

    def device_bytes(self) -> dict:
        """Bytes of KV state this cache keeps in device memory: the hot set, the abstracts, the gpu tier."""
        hot = abstracts = 0
        for layer in self.layers:
            for t in (layer.sink_k, layer.sink_v, layer.tail_k, layer.tail_v):
                hot += 0 if t is None else t.numel() * t.element_size()
            if layer.abstracts is not None:
                abstracts += layer.abstracts[:, : layer.n_chunks].numel() * layer.abstracts.element_size()
        return {"hot_set": hot, "abstracts": abstracts, "gpu_tier": self.store.gpu.used_bytes}

    def store_put(self, keys: List[ChunkKey], packed: torch.Tensor) -> None:
        self.store.put_many(keys, packed, tier="cpu")

    def close(self) -> None:
        self.store.remove_listener(self._on_move)
