"""One layer's per-chunk state: what scoring reads and what the gather's addresses come from.

Per chunk, with room to grow (capacity columns):
- abstracts [B, H, 2D, cap] (rows :D min, D: max, in the keys' dtype; see abstracts.as_rows) and, for
  scoring 'mass', packed 2-bit key codes [B, H, cap, L, D/4] (abstracts.key_codes): scoring's input.
- addr [B, cap, 3]: where the gather reads the chunk (index into the store's sources, byte offset, 1 if
  that copy is in the gpu tier; -1, -1, 0: on disk only). Patched only where the store moved something
  (dirty), in one host-to-device copy per step, without a sync.
- importance [B, cap]: decayed count of the heads that chose the chunk (what promotions rank by), and
  chosen [B, cap]: times chosen since gpu hits were last counted.
- keys [b][c]: the store key of each chunk, made once when it is cut.
The host keeps `dirty` (chunks whose address must be refreshed from the store) and `disk_only` (chunks
the store holds on disk alone), so a step knows without a sync which chosen chunks need the fetcher.
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..abstracts import as_rows, key_codes
from ..formats import ChunkLayout
from ..keys import ChunkKey


class ChunkTable:
    """The per-chunk device state of one layer (see the module docstring).

    `host_table` turns a small int64 numpy array into a device tensor without a sync (passes.PinnedRing).
    `flush_max`: decode steps choices may wait before they are folded into importance.
    """

    def __init__(self, layer_idx: int, batch: int, n_heads: int, head_dim: int, dtype, device, store, config,
                 host_table: Callable[[np.ndarray], torch.Tensor], flush_max: int = 32) -> None:
        self.layer_idx = layer_idx
        self.batch_size, self.n_heads, self.head_dim = batch, n_heads, head_dim
        self.dtype, self.device = dtype, device
        self.store, self.config = store, config
        self.host_table = host_table
        self.flush_max = flush_max
        self.layout: Optional[ChunkLayout] = None  # set by the layer's plan, when its first chunk is cut
        self.n_chunks = 0
        self.abstracts: Optional[torch.Tensor] = None
        self.codes: Optional[torch.Tensor] = None
        self.addr: Optional[torch.Tensor] = None
        self.importance: Optional[torch.Tensor] = None
        self.chosen: Optional[torch.Tensor] = None
        self.keys: List[List[ChunkKey]] = []
        # NOTE: others only add to these two (the store's moves through the cache's listener, the
        # fetcher's places that hold for one step); refresh_rows empties `dirty` and keeps `disk_only`
        self.dirty: set = set()
        self.disk_only: set = set()
        self._sel: list = []  # choices [B, H, k] not yet folded into importance and chosen
        self._sel_weights = None  # ((steps, per step, decay), (decay weights, ones)) of the last fold

    @property
    def capacity(self) -> int:
        return 0 if self.addr is None else self.addr.shape[1]

    @property
    def pending_selections(self) -> int:
        """Steps of choices not yet folded into importance and chosen."""
        return len(self._sel)

    # --- new chunks ----------------------------------------------------------------------------------
    def append(self, abstracts: torch.Tensor, k: torch.Tensor, keys: List[List[ChunkKey]]) -> None:
        """Chunks cut from the tail: their abstracts [B, n, H, 2, D] (as ops.ingest gives them), their
        keys [B, H, n*L, D] (for the key codes) and store keys [b][n]."""
        B, n, H, _, D = abstracts.shape
        c0 = self.n_chunks
        self._grow(c0 + n)
        self.abstracts[..., c0 : c0 + n] = as_rows(abstracts)
        if self.codes is not None:
            ab = abstracts.transpose(1, 2)  # [B, H, n, 2, D]
            kc = k.reshape(B, H, n, self.layout.n_tokens, D)
            self.codes[:, :, c0 : c0 + n] = key_codes(kc, ab[:, :, :, 0], ab[:, :, :, 1])
        if not self.keys:
            self.keys = [[] for _ in range(B)]
        for b in range(B):
            self.keys[b].extend(keys[b])
        self.n_chunks += n

    def _grow(self, need: int) -> None:
        cap = 0 if self.abstracts is None else self.abstracts.shape[-1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        B, H, D = self.batch_size, self.n_heads, self.head_dim
        ab = torch.empty(B, H, 2 * D, new_cap, dtype=self.dtype, device=self.device)
        addr = torch.full((B, new_cap, 3), -1, dtype=torch.int64, device=self.device)
        addr[..., 2] = 0
        imp = torch.zeros(B, new_cap, dtype=torch.float32, device=self.device)
        chosen = torch.zeros(B, new_cap, dtype=torch.float32, device=self.device)
        codes = None
        if self.config.scoring == "mass" and (cap == 0 or self.codes is not None):
            L = self.layout.n_tokens
            codes = torch.empty(B, H, new_cap, L, D // 4, dtype=torch.uint8, device=self.device)
            if cap:
                codes[:, :, :cap] = self.codes
        self.codes = codes
        if cap:
            self.flush_selection()
            chosen[:, :cap] = self.chosen
            ab[..., :cap] = self.abstracts
            addr[:, :cap] = self.addr
            imp[:, :cap] = self.importance
        self.abstracts, self.addr, self.importance, self.chosen = ab, addr, imp, chosen

    # --- importance ----------------------------------------------------------------------------------
    def note_selection(self, idx: torch.Tensor) -> None:
        """Count the heads that chose each chunk this step into its decayed importance.

        Deferred: the choices are kept and folded in by flush_selection, all steps at once, before anything
        reads importance or chosen (three launches per layer and step saved on a host-bound decode).
        """
        self._sel.append(idx)
        if len(self._sel) >= self.flush_max:
            self.flush_selection()

    def flush_selection(self) -> None:
        """Fold the deferred choices into importance and chosen: after n steps with counts c_1..c_n,
        importance = importance * d^n + sum_j d^(n-j) c_j (d = importance_decay), as stepping would give."""
        sel = self._sel
        if not sel:
            return
        self._sel = []
        if self.importance is None:
            return
        B, n = self.batch_size, len(sel)
        per_step = sel[0][0].numel()
        if any(i[0].numel() != per_step for i in sel):  # the budget changed in between: one step at a time
            for i in sel:
                self._sel = [i]
                self.flush_selection()
            return
        d = self.config.importance_decay
        key = (n, per_step, d)
        if self._sel_weights is None or self._sel_weights[0] != key:
            w = torch.tensor([d ** (n - 1 - j) for j in range(n)], dtype=torch.float32)
            decay = w.repeat_interleave(per_step).to(self.device).view(1, -1).expand(B, -1).contiguous()
            self._sel_weights = (key, (decay, torch.ones(B, n * per_step, dtype=torch.float32, device=self.device)))
        wts = self._sel_weights[1]
        flat = torch.cat([i.reshape(B, -1) for i in sel], dim=1) if n > 1 else sel[0].reshape(B, -1)
        # chunk ids only grow, so every id is below today's n_chunks
        C = self.n_chunks
        imp = self.importance[:, :C]
        if d != 1.0:
            imp.mul_(d ** n)
        imp.scatter_add_(1, flat, wts[0])
        self.chosen[:, :C].scatter_add_(1, flat, wts[1])

    def take_gpu_hits(self) -> Optional[torch.Tensor]:
        """Gather entries served from the gpu tier since the last call (a device scalar; None: none yet).

        A chunk chosen n times while a copy sat in the gpu tier was n gpu hits: residency only changes
        at promotions, so counting there (and when statistics are read) needs no work per step.
        """
        self.flush_selection()
        if self.chosen is None or self.n_chunks == 0:
            return None
        C = self.n_chunks
        hits = (self.chosen[:, :C] * self.addr[:, :C, 2]).sum()
        self.chosen.zero_()
        return hits

    def promotion_candidates(self, limit: int) -> Optional[torch.Tensor]:
        """Up to `limit` rows (value, b * C + c) of the most important chunks in the cpu tier but not on the GPU."""
        C = self.n_chunks
        if limit <= 0 or C == 0:
            return None
        self.flush_selection()
        self.refresh()
        skip = (self.addr[:, :C, 2] != 0) | (self.addr[:, :C, 0] < 0)
        imp = torch.where(skip, torch.zeros_like(self.importance[:, :C]), self.importance[:, :C]).reshape(-1)
        vals, flat = torch.topk(imp, min(limit, imp.numel()))
        return torch.stack([vals, flat.to(torch.float32)], dim=1)

    def key_of(self, flat: int) -> ChunkKey:
        """The store key of chunk b * n_chunks + c (a promotion candidate's index)."""
        return self.keys[flat // self.n_chunks][flat % self.n_chunks]

    # --- addresses -----------------------------------------------------------------------------------
    def mark_dirty(self, pairs) -> None:
        """Chunks (b, c) whose address must be looked up in the store again before they are gathered."""
        self.dirty.update(pairs)

    def refresh(self) -> None:
        """Bring the address table up to date with what the store moved since the last step."""
        if self.dirty:
            self.apply_rows(self.refresh_rows())

    def refresh_rows(self) -> dict:
        """The host half of refresh: {b * cap + c: (source, offset, on gpu)} of the chunks the store moved
        (disk_only kept up to date here), for apply_rows."""
        dirty, keys, disk_only, cap = list(self.dirty), self.keys, self.disk_only, self.capacity
        self.dirty.clear()
        rows = {}
        for (b, c), (loc, tier) in zip(dirty, self.store.best_locations([keys[b][c] for b, c in dirty])):
            if loc is None:
                disk_only.add((b, c))
                rows[b * cap + c] = (-1, -1, 0)
            else:
                disk_only.discard((b, c))
                rows[b * cap + c] = (loc[0], loc[1], int(tier == "gpu"))
        return rows

    def apply_rows(self, rows: dict) -> None:
        """Write rows {b * cap + c: (source, offset, on gpu)} into the address table: one host-to-device
        copy (the indices, then the values) and one kernel, queued without a sync."""
        if not rows:
            return
        n = len(rows)
        flat = np.fromiter(itertools.chain(rows, itertools.chain.from_iterable(rows.values())), np.int64, 4 * n)
        t = self.host_table(flat)
        self.addr.view(-1, 3).index_copy_(0, t[:n], t[n:].view(n, 3))

    def addresses(self, idx: torch.Tensor) -> torch.Tensor:
        """(source, offset) [B, H*k, 2] of the chunks idx [B, H, k]."""
        B, H, kk = idx.shape
        return self.addr[..., :2].gather(1, idx.reshape(B, H * kk, 1).expand(B, H * kk, 2))

    def disk_only_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The chunks of flat [B, n] that are on disk only (as addressed now), -1 for the others."""
        return torch.where(self.addr[..., 0].gather(1, flat) < 0, flat, -1)

    def device_bytes(self) -> Tuple[int, int]:
        """Bytes of (abstracts, key codes) of the chunks held."""
        ab = 0 if self.abstracts is None else self.abstracts[..., : self.n_chunks].numel() * self.abstracts.element_size()
        codes = 0 if self.codes is None else self.codes[:, :, : self.n_chunks].numel()
        return ab, codes
