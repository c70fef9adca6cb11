"""The work of a forward pass that is no single layer's: shared device buffers, counters of what the
gathers read, and the duties at the end of a pass (installs, the gates' looks, the gpu tier's refresh).
"""

from __future__ import annotations

import time
from typing import List, Optional

import numpy as np
import torch

from ..pipeline.policies import PipelineTuning, StepWindow, cadence_for
from ..tiers.arena import round_up


class PinnedRing:
    """Small host tables (lists of int64 rows) as device tensors, through one pinned staging buffer.

    A pageable copy would sync the stream, and pin_memory() per table costs tens of microseconds; here a
    table is written into the next free part of the ring and copied from there without a sync. Before the
    ring wraps around, the host waits for the stream to be done with it (once per lap of many tables).
    """

    def __init__(self, device, elements: int = 1 << 18) -> None:
        self.device = device
        self.buf = torch.empty(elements, dtype=torch.int64, pin_memory=True)
        self._host = self.buf.numpy()  # the same memory, written through numpy (no torch op per table)
        self.pos = 0

    def to_device(self, rows) -> torch.Tensor:
        """rows: a list of ints or of equal-length int rows, or an int64 numpy array."""
        a = np.asarray(rows, dtype=np.int64)  # (no copy of an int64 array)
        n = a.size
        if n > self.buf.numel():
            return torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(self.device, non_blocking=True)
        if self.pos + n > self.buf.numel():
            torch.cuda.current_stream(self.device).synchronize()  # every copy out of the ring is done
            self.pos = 0
        start = self.pos
        self.pos += n
        self._host[start : start + n] = a.reshape(-1)
        return self.buf[start : start + n].view(a.shape).to(self.device, non_blocking=True)


class EntryCounts:
    """Gather entries (one per KV head per chunk) of the decode steps: all of them, counted on the host,
    and those served from the gpu tier, counted on the device (counting costs no sync)."""

    def __init__(self) -> None:
        self.entries = 0
        self.gpu: Optional[torch.Tensor] = None

    def add_gpu(self, n: Optional[torch.Tensor]) -> None:
        if n is not None:
            self.gpu = n if self.gpu is None else self.gpu + n


class PassWork:
    """Per-pass state and duties of one cache: the shared work buffer, the pinned ring, the entry counts,
    the step count and the sparse steps' timing window, and end_forward (see there).

    `config`, `layers`, `fetcher`, `predictor` and `store` are the cache's; `timers` its HostTimers.
    """

    def __init__(self, config, layers, store, fetcher, predictor, timers, tuning: Optional[PipelineTuning] = None) -> None:
        self.config, self.layers, self.store = config, layers, store
        self.fetcher, self.predictor, self.timers = fetcher, predictor, timers
        self.tuning = tuning or PipelineTuning()
        self.counts = EntryCounts()
        self.cadence = cadence_for(self.tuning)
        self.window = StepWindow()
        self.steps = 0  # forward passes ended
        self.selected_layers: set = set()  # layers that chose chunks since the last refresh of the gpu tier
        self._sparse_pass = False  # a layer of this pass attended sparsely
        self._pass_start: Optional[float] = None  # perf_counter when layer 0 was last updated (a pass began)
        self._end_work = 0.0  # seconds the last end_forward took, if its pass was a sparse decode step
        self._work: Optional[torch.Tensor] = None
        self._ring: Optional[PinnedRing] = None

    # --- during a pass -------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        self._pass_start = time.perf_counter()

    def note_sparse(self, layer_idx: int) -> None:
        """A layer of this pass chose chunks (a sparse decode step)."""
        self.selected_layers.add(layer_idx)
        self._sparse_pass = True

    def host_table(self, rows: np.ndarray) -> torch.Tensor:
        """A small host table (an int64 numpy array, not used by the caller afterwards) as an int64 tensor
        on the device, without a sync."""
        dev = self.store.gpu.device
        if dev.type != "cuda":
            return torch.from_numpy(rows)
        if self._ring is None:
            self._ring = PinnedRing(dev)
        return self._ring.to_device(rows)

    def work_buffer(self, batch: int, heads: int, n: int, head_dim: int, dtype, device) -> torch.Tensor:
        """[2, B, H, >= n, D] scratch shared by all layers (they run one after another)."""
        w = self._work
        if w is None or w.shape[3] < n or w.shape[:3] != (2, batch, heads) or w.shape[4] != head_dim or w.dtype != dtype:
            w = torch.empty(2, batch, heads, max(n, 256), head_dim, dtype=dtype, device=device)
            self._work = w
        return w

    # --- the end of a pass ---------------------------------------------------------------------------
    def end_forward(self) -> None:
        """After the last layer of a forward pass: install what was read, age importance, let the gates
        look now and then, and now and then refresh the gpu tier."""
        now = time.perf_counter()
        # a sparse decode step, timed for the gate: from its first layer to here, plus the last step's work
        # here (installs of what it staged). Not from the end of the last pass: a pause between passes
        # (the caller's own work, between generate calls) would count as the state's step time; nor a
        # prefill pass or its end (writing its chunks back)
        sparse, self._sparse_pass = self._sparse_pass, False
        if sparse and self._pass_start is not None:
            self.window.add(now - self._pass_start + self._end_work)
        try:
            self._end_forward()
        finally:
            self._end_work = time.perf_counter() - now if sparse else 0.0

    def _end_forward(self) -> None:
        self.store.tick()
        if self.predictor.lookahead is not None:
            self.predictor.lookahead.end_pass()
        self.fetcher.end_pass(self.steps)
        self.store.settle()  # the end of a forward pass is where ingest may be waited for
        with self.timers.part("write_back"):
            self.store.write_back()  # chunks cut in this pass get their disk copy now
        self.steps += 1
        if self.steps % self.tuning.gate_every == 0:
            self.predictor.end_window(*self.window.take())
            self.fetcher.installs.admission.update(self.predictor.next_step.window_rate())
        if not self.selected_layers or not self.cadence.due(self.steps):
            return
        with self.timers.part("promote"):
            self.promote()

    def promote(self) -> None:
        """Copy the chunks the sparse layers chose most into the gpu tier (at the cadence's pace).

        Each layer offers its prefetch_depth chunks per head; while the gpu tier has free room, each
        also offers its share of that room, so that the tier fills within a few refreshes instead of
        a few hundred steps (a decode runs slower, reading more from the tiers below, until it does).
        Only chunks chosen by at least promote_min_value heads per step on average go up, in one batch.
        """
        layers = [self.layers[i] for i in sorted(self.selected_layers)]
        self.selected_layers.clear()
        cands, room = self._candidates(layers)
        if not cands:
            return
        gpu = self.counts.gpu
        hits = gpu.float().view(1, 1).expand(1, 2) if gpu is not None else None
        values = torch.cat([c for _, c in cands] + ([hits] if hits is not None else [])).tolist()  # one host sync
        if not self.cadence.worth_promoting(values[-1][0] if hits is not None else 0.0, self.counts.entries, room):
            return
        keys, vals, pos = [], [], 0
        for table, c in cands:
            rows, pos = values[pos : pos + len(c)], pos + len(c)
            for val, flat in rows:
                if val < self.tuning.promote_min_value:  # rows come best first
                    break
                keys.append(table.key_of(int(flat)))
                vals.append(val)
        if not self.store.promote_many(keys, vals) and room:
            self.cadence.end_fill()  # room left, but no chunk worth it
        self.cadence.promoted = True

    def _candidates(self, layers) -> tuple:
        """([(table, candidates)], whether the gpu tier has free room) of the layers' promotion offers."""
        per_layer = self.config.prefetch_depth
        gpu = self.store.gpu
        share = max(0, gpu.budget - gpu.used_bytes) // max(1, len(layers))
        cands: List[tuple] = []
        room = False
        for layer in layers:
            table = layer.table
            self.counts.add_gpu(table.take_gpu_hits())
            extra = share // round_up(layer.layout.nbytes) if layer.layout is not None else 0
            room = room or extra > 0
            c = table.promotion_candidates(per_layer * layer.n_heads + extra)
            if c is not None:
                cands.append((table, c))
        return cands, room

    def close(self) -> None:
        self._work = None
