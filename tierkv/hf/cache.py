"""TierKVCache: a transformers Cache whose KV lives in tierkv's tiers, chunk by chunk.

This class is the transformers Cache protocol and the wiring of the parts that do the work:
- TierKVLayer (hf/layer.py), one per model layer: the hot set and the cut of tokens into chunks; its
  ChunkTable (hf/table.py) holds the per-chunk device state, its ChunkGather (hf/gather.py) decodes.
- Fetcher (pipeline/fetch.py): where each chosen chunk is read from, and everything to do with disk.
- Predictor (pipeline/predictor.py): guesses of the next layer's choice, and their hit rates.
- PassWork (hf/passes.py): the shared buffers and the duties at the end of a forward pass.
- PipelineTuning (pipeline/policies.py): the pipeline's cadences and thresholds.

The decode path is kept to a handful of kernel launches per layer and no host synchronisation: chunk
addresses live in a device table that is patched only where the store moved something, abstracts are
stored ready for one matrix product, and the selected chunks are decoded straight into a work buffer
between copies of the sink and the tail, which is what attention then reads.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Callable, List, Optional

import torch
from transformers.cache_utils import Cache

from .. import ops
from ..config import TierConfig
from ..keys import ChunkKey
from ..pipeline import Fetcher, HostTimers, PipelineTuning, Placement, Predictor
from ..store import ChunkStore
from .layer import TierKVLayer
from .passes import PassWork

_ids = itertools.count()
ChoiceListener = Callable[[TierKVLayer, torch.Tensor, torch.Tensor], None]


class TierKVCache(Cache):
    """A transformers Cache backed by a tierkv ChunkStore. Create it through `tierkv.offload`.

    Public parts: `store`, `fetcher`, `predictor`, `passes` (see the module docstring), `tuning`.
    `config` may be replaced between steps (a new budget or scoring applies from the next step; chunks
    already cut keep their length and format).
    """

    def __init__(self, config: TierConfig, num_layers: int, store: ChunkStore, name: Optional[str] = None,
                 tuning: Optional[PipelineTuning] = None) -> None:
        self._config = config
        self.store = store
        self.tuning = tuning or PipelineTuning()
        self.cache_id = name or f"c{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.timers = HostTimers()
        self.fetcher = Fetcher(store, config, num_layers, self.timers, self.tuning)
        self.predictor = Predictor(self.tuning)
        layers: List[TierKVLayer] = []
        self.passes = PassWork(config, layers, store, self.fetcher, self.predictor, self.timers, self.tuning)
        fast_ext = ops.backend() == "ext" and store.gpu.device.type == "cuda"
        layers.extend(TierKVLayer(i, config, store, self.passes, self.fetcher, self.key, fast_ext,
                                  self.tuning.min_chunks_in_budget, self.tuning.selection_flush_max)
                      for i in range(num_layers))
        super().__init__(layers=layers)
        self._choice_listeners: List[ChoiceListener] = []
        self._stream_rows: dict = {}  # stream name -> its batch row (None: another cache's), for _on_move
        store.add_listener(self._on_move)

    # --- settings --------------------------------------------------------------------------------------
    @property
    def config(self) -> TierConfig:
        return self._config

    @config.setter
    def config(self, config: TierConfig) -> None:
        self._config = config
        for part in [self.fetcher, self.passes, *self.layers, *(l.table for l in self.layers if l.table is not None)]:
            part.config = config

    @property
    def next_layer_prefetch(self) -> bool:
        """Whether next-layer guesses are read ahead from disk now (the predictor's PrefetchGate decides)."""
        return self.predictor.gate.on

    @next_layer_prefetch.setter
    def next_layer_prefetch(self, on: bool) -> None:
        self.predictor.gate.on = bool(on)

    @property
    def predict(self) -> bool:
        """Whether the next layer's choice is guessed (off: chunks are read when asked for only)."""
        return self.predictor.enabled

    @predict.setter
    def predict(self, on: bool) -> None:
        self.predictor.enabled = bool(on)

    @property
    def gpu_installs(self) -> bool:
        """Whether chunks read from disk are offered to the gpu tier as well as the cpu tier."""
        return self.fetcher.installs.gpu

    @gpu_installs.setter
    def gpu_installs(self, on: bool) -> None:
        self.fetcher.installs.gpu = bool(on)

    @property
    def promote_every(self) -> int:
        """Decode steps between refreshes of the gpu tier now (the PromotionCadence adapts it)."""
        return self.passes.cadence.every

    @promote_every.setter
    def promote_every(self, steps: int) -> None:
        self.passes.cadence.every = steps

    @property
    def lookahead(self):
        """hf.lookahead.Lookahead when the model has one (set by tierkv.offload, closed here)."""
        return self.predictor.lookahead

    @lookahead.setter
    def lookahead(self, lookahead) -> None:
        self.predictor.lookahead = lookahead

    # --- keys and the store's moves --------------------------------------------------------------------
    def key(self, b: int, layer: int, c: int) -> ChunkKey:
        return ChunkKey(f"{self.cache_id}-b{b}", layer, c)

    def _on_move(self, key: ChunkKey, tier: str) -> None:
        b = self._stream_rows.get(key.stream, -1)  # called per chunk moved: the stream's row parsed once
        if b == -1:
            prefix = self.cache_id + "-b"
            b = int(key.stream[len(prefix):]) if key.stream.startswith(prefix) else None
            self._stream_rows[key.stream] = b
        if b is not None:
            self.layers[key.layer].table.dirty.add((b, key.index))

    # --- the sparse step's parts that are no single layer's (hf/attention.py) --------------------------
    def place(self, layer: TierKVLayer, q: torch.Tensor, idx: torch.Tensor) -> Placement:
        """Where the chunks idx [B, H, k] that `layer` chose for q are read from this step. With a disk
        tier, the next layer's choice is guessed first, for its reads to be queued after this layer's."""
        if self.store.disk is not None:
            with self.timers.part("predict"):
                i = layer.layer_idx
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                guess = self.predictor.after_choice(layer, nxt, q, idx, self.passes.steps, self.config.budget)
                self.fetcher.expect(nxt.table if guess is not None else None, guess, self.predictor.prefetching)
        return self.fetcher.place(layer.table, idx, wait=self.config.miss_policy == "wait")

    def note_choice(self, layer: TierKVLayer, q: torch.Tensor, idx: torch.Tensor) -> None:
        """After `layer` gathered the chunks idx it chose for q: the next layer's guessed chunks are read
        while this layer computes; the choice counts into importance; listeners hear of it."""
        if self.store.disk is not None:
            with self.timers.part("issue_prefetch"):
                self.fetcher.issue_prefetch()
        layer.table.note_selection(idx)
        self.passes.note_sparse(layer.layer_idx)
        for fn in self._choice_listeners:
            fn(layer, q, idx)

    def add_choice_listener(self, fn: ChoiceListener) -> None:
        """Call fn(layer, q, idx) after each sparse step of a layer: its query q [B, Hq, 1, D] and the
        chunks idx [B, H, k] it chose (while the layer's geometry is still the step's)."""
        self._choice_listeners.append(fn)

    def remove_choice_listener(self, fn: ChoiceListener) -> None:
        if fn in self._choice_listeners:
            self._choice_listeners.remove(fn)

    def end_forward(self) -> None:
        """After the last layer of a forward pass (hf/attention.py calls it): see PassWork.end_forward."""
        self.passes.end_forward()

    # --- read-outs ---------------------------------------------------------------------------------------
    def stats(self):
        """The store's statistics, with the gather entries of this cache counted as tier hits and misses.

        Units there: one entry is one KV head's block of one chunk. An entry served from the gpu tier is
        a gpu hit; from the cpu tier a gpu miss and cpu hit; from disk a miss at both and a disk hit.
        """
        s = self.store.stats()
        counts = self.passes.counts
        for layer in self.layers:
            if layer.table is not None:
                counts.add_gpu(layer.table.take_gpu_hits())
        gpu = int(counts.gpu) if counts.gpu is not None else 0
        disk = self.fetcher.disk_entries
        cpu = counts.entries - gpu - disk
        for tier, hit, miss in (("gpu", gpu, cpu + disk), ("cpu", cpu, disk), ("disk", disk, 0)):
            s.hits[tier] = s.hits.get(tier, 0) + hit
            s.misses[tier] = s.misses.get(tier, 0) + miss
        gate = self.predictor.gate
        p = {"skipped_entries": self.fetcher.skipped_entries, "next_layer_prefetch_on": gate.on,
             # the gate's last measured mean step time with and without next-layer prefetching
             "gate_step_s_on": gate.step_seconds[True], "gate_step_s_off": gate.step_seconds[False],
             "host_seconds": dict(self.timers.seconds)}
        p.update(self.predictor.stats())
        p.update(self.fetcher.stats())
        s.prefetch = p
        return s

    def device_bytes(self) -> dict:
        """Bytes of KV state this cache keeps in device memory: the hot set, the abstracts, the gpu tier."""
        hot = abstracts = codes = 0
        for layer in self.layers:
            for t in (layer.sink, layer.tail_buffer):
                hot += 0 if t is None else t.numel() * t.element_size()
            if layer.table is not None:
                a, c = layer.table.device_bytes()
                abstracts, codes = abstracts + a, codes + c
        return {"hot_set": hot, "abstracts": abstracts, "key_codes": codes, "gpu_tier": self.store.gpu.used_bytes}

    def wait_idle(self) -> None:
        """Wait until the work this cache left running in the background is done: prefetch reads in
        flight, and chunks queued for writing to disk (before timing something else in this process,
        say, which those threads would otherwise compete with)."""
        self.fetcher.wait_idle()
        self.store.flush()

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
            self.lookahead = None
        self.store.remove_listener(self._on_move)
        self.passes.close()
        self.fetcher.close()
