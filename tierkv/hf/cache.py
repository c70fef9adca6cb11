"""TierKVCache: a transformers Cache whose KV lives in tierkv's tiers, chunk by chunk.

Per layer the cache keeps on the GPU only the hot set (the first `sink` tokens and a tail of at least
`window` recent tokens) and the layer's abstracts; everything between is cut into chunks of the layer's
planned length, encoded in the configured format and handed to the store (cpu tier, demoted to disk
when it is full). `update` only appends the new tokens to the tail; the registered attention function
(hf/attention.py) does the attention over what it needs and then calls `compact`, which moves tokens
from the tail into chunks.

The decode path is kept to a handful of kernel launches per layer and no host synchronisation: chunk
addresses live in a device table that is patched only where the store moved something, abstracts are
stored ready for one matrix product, and the selected chunks are decoded straight into a work buffer
between copies of the sink and the tail, which is what attention then reads.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
import time
import uuid
from typing import List, Optional, Tuple

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops
from ..config import TierConfig
from ..errors import TierKVError
from ..abstracts import key_codes, mass_shares
from ..formats import ChunkLayout
from ..keys import ChunkKey
from ..pipeline import PrefetchGate
from ..planner import desert_rate, plan_length
from ..store import ChunkStore
from ..tiers.arena import round_up

_ids = itertools.count()
MIN_CHUNKS_IN_BUDGET = 4  # the planner gives no layer chunks longer than budget / 4
SELECTION_FLUSH_MAX = 32  # decode steps a layer's choices may wait before they are counted (see note_selection)
PROMOTE_EVERY = 16  # decode steps between refreshes of the gpu tier's contents (each costs a host sync)
PROMOTE_EVERY_MIN = 4  # the most often it is refreshed: while it fills, and while its chunks are hit
GATE_EVERY = 8  # decode steps between looks at the next-layer prediction's hit rate
NEXT_STEP_EVERY = 4  # the next-step prediction is scored one decode step in this many (GATE_EVERY a multiple)
# while the gate is shut for too few right guesses, guesses are still made and scored one step in
# GATE_EVERY, and one step in twice as many after each window that finds them below NEXT_LAYER_MIN_HIT
# again, up to one in GUESS_EVERY_MAX (a guess costs a scoring pass per layer on a host-bound step: on the
# H200 machine the sampling alone cost the pipeline 0.37 ms of a 16 ms step, bench/results/pipeline_h200_991d73a.json)
GUESS_EVERY_MAX = 64
# below this share of right guesses, next-layer guesses are not prefetched: wrong guesses' reads take the
# disk from the reads a step waits for, and on the H200 machine guesses right 32% (bench/results/
# pipeline_h200_45ec218.json) to 54% of the time made steps slower than reading on demand
NEXT_LAYER_MIN_HIT = 0.5
# whether next-layer guesses are read ahead from the first decode step, before any was scored: no. A
# window of prefetching guesses that turn out wrong costs far more than reading on demand (on the H200
# machine the first window of per-head selection ran 72 ms a step prefetching, against 16 without,
# bench/results/pipeline_h200_991d73a.json gate_step_s_on / _off; on the CPU machine 8% of the chunks
# it staged were used), so the gate opens only once a window's guesses were scored right often enough
NEXT_LAYER_PREFETCH_AT_START = False
# when choices do not persist from step to step (next-step hit rate below ADMIT_ALL_AT), a chunk read
# from disk gets a cpu copy only when it was chosen again within a few steps (its decayed importance
# before this step at least ADMIT_PRIOR); when they do, at once
ADMIT_PRIOR = 0.5
ADMIT_ALL_AT = 0.2


class _PinnedRing:
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


def _cat(parts) -> Optional[torch.Tensor]:
    """The non-empty tensors of `parts` joined along the token axis (None when there are none)."""
    parts = [p for p in parts if p is not None and p.shape[-2] > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class TierKVLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "TierKVCache", layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0  # tokens seen
        self.sink: Optional[torch.Tensor] = None  # [2, B, H, S, D]: K and V of the first tokens
        self.tail_k: Optional[torch.Tensor] = None  # views into _tbuf once the prompt is ingested
        self.tail_v: Optional[torch.Tensor] = None
        self._tbuf: Optional[torch.Tensor] = None  # [2, B, H, capacity, D]
        self.n_chunks = 0
        self.layout: Optional[ChunkLayout] = None  # set by the plan, when the first chunk is cut
        # per chunk, with room to grow: abstracts [B, H, 2D, cap] (rows :D min, D: max, in the keys' dtype),
        # address [B, cap, 3] (index into the store's sources, byte offset, 1 if that copy is in the gpu
        # tier; -1, -1, 0: only on disk), importance [B, cap] (decayed count of heads that chose the chunk)
        self.abstracts: Optional[torch.Tensor] = None
        self.addr: Optional[torch.Tensor] = None
        self.importance: Optional[torch.Tensor] = None
        # scoring 'mass': packed 2-bit key codes per chunk [B, H, cap, L, D/4] (see abstracts.key_codes)
        self.codes: Optional[torch.Tensor] = None
        self.scaling: Optional[float] = None  # the attention's softmax scale, set by the first sparse step
        self.chosen: Optional[torch.Tensor] = None  # [B, capacity]: times chosen since hits were last counted
        self.rate: Optional[float] = None  # attention-desert rate measured at prefill
        self.pending: Optional[torch.Tensor] = None  # key states returned by the last update
        self.dirty: set = set()  # (b, c) whose address must be refreshed from the store
        self.disk_only: set = set()
        self._static = None  # per-(k) cached parts of the gather table
        self.prev_idx: Optional[torch.Tensor] = None  # last step's choice (for the persistence statistic)
        self.predicted: Optional[torch.Tensor] = None  # the previous layer's guess at this step's choice
        self._launch_plans: dict = {}
        self._keys: List[List[ChunkKey]] = []  # [b][c]: the store key of each chunk, made once at ingest
        self._sel: list = []  # this layer's choices [B, H, k] since importance/chosen were last brought up to date
        self._sel_weights = None  # ((steps, per step, decay), (decay weights, ones)) of the last flush

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
        if self.layer_idx == 0:
            self.cache._pass_start = time.perf_counter()
        q = key_states.shape[-2]
        T = self.tail_len
        buf = self._tbuf
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
        return self._tbuf is not None and self.tail_k.data_ptr() == self._tbuf.data_ptr()

    @property
    def tail_len(self) -> int:
        return 0 if self.tail_k is None else self.tail_k.shape[-2]

    @property
    def chunk_len(self) -> int:
        return self.layout.n_tokens if self.layout is not None else 0

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
        if cfg.budget is not None:
            # at least MIN_CHUNKS_IN_BUDGET chunks fit the budget: a layer given chunks as long as its budget
            # would choose one or none and see little beyond sink and window
            fit = [n for n in lengths if n * MIN_CHUNKS_IN_BUDGET <= cfg.budget]
            lengths = fit or lengths[:1]
        if self.rate is None:
            return lengths[len(lengths) // 2]
        return plan_length(self.rate, lengths)

    def compact(self) -> None:
        cfg = self.cache.config
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
                    self.layout = ChunkLayout(cfg.format, self._plan(), self.n_heads, self.head_dim, cfg.group_size)
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
        self._tbuf = buf
        self.tail_k, self.tail_v = buf[0, :, :, :T], buf[1, :, :, :T]

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
        if self.cache.config.scoring == "mass" and (cap == 0 or self.codes is not None):
            codes = torch.empty(B, H, new_cap, self.chunk_len, D // 4, dtype=torch.uint8, device=self.device)
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

    def _ingest(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        lay = self.layout
        B, H, D = self.batch_size, self.n_heads, self.head_dim
        packed, abstracts = ops.ingest(k, v, lay.n_tokens, lay.format, lay.group_size)  # [B,n,nb], [B,n,H,2,D]
        c0 = self.n_chunks
        self._grow(c0 + n)
        self.abstracts[..., c0 : c0 + n] = abstracts.permute(0, 2, 3, 4, 1).reshape(B, H, 2 * D, n)
        if self.codes is not None:
            ab = abstracts.transpose(1, 2)  # [B, H, n, 2, D]
            kc = k.reshape(B, H, n, lay.n_tokens, D)
            self.codes[:, :, c0 : c0 + n] = key_codes(kc, ab[:, :, :, 0], ab[:, :, :, 1])
        if not self._keys:
            self._keys = [[] for _ in range(B)]
        for b in range(B):
            self._keys[b].extend(self.cache.key(b, self.layer_idx, c) for c in range(c0, c0 + n))
        keys = [self._keys[b][c] for b in range(B) for c in range(c0, c0 + n)]
        self.cache.store.put_many(keys, packed.reshape(B * n, lay.nbytes), tier="cpu")
        self.n_chunks += n

    # --- scoring and selection ---------------------------------------------------------------------
    def score(self, q: torch.Tensor, hot_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Importance of each chunk per KV head [B, H, C] for the query q [B, Hq, T, D]; higher is better.

        With key codes (scoring 'mass'): abstracts.mass_score, the chunk's estimated share of each query
        head's softmax (the exact sink and tail in the denominator) summed over the group. Without:
        upper bounds of q . k, max over grouped heads and query tokens, the same bound as abstracts.score
        from the stored layout: [min(q, 0), max(q, 0)] . [min; max]. hot_keys [B, H, S + T, D]: the sink's
        and tail's keys where the caller already holds them together (else they are concatenated here).
        """
        B, Hq, T, D = q.shape
        H, C = self.n_heads, self.n_chunks
        if self.codes is not None and self.cache.config.scoring == "mass":
            scale = self.scaling if self.scaling is not None else D ** -0.5
            qs = q.float().reshape(B, H, (Hq // H) * T, D) * scale
            log_mass = ops.mass_logits(qs, self.abstracts, self.codes, C)  # [B, H, G, C]
            return mass_shares(log_mass, qs, hot_keys if hot_keys is not None else _cat([self.sink_k, self.tail_k]))
        qg = q.reshape(B, H, (Hq // H) * T, D)
        qc = torch.cat([qg.clamp(max=0), qg.clamp(min=0)], dim=-1).to(self.dtype)
        return torch.matmul(qc, self.abstracts[..., :C]).amax(dim=2)

    def choose(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """The k chunks [B, H, k] to read for scores [B, H, C]: each head's top k, or (selection 'shared')
        the top k of the heads' summed scores, the same for every head of the layer."""
        if self.cache.config.selection == "shared":
            idx = torch.topk(scores.sum(1), k, dim=-1, sorted=False).indices
            return idx.unsqueeze(1).expand(-1, self.n_heads, -1).contiguous()
        return torch.topk(scores, k, dim=-1, sorted=False).indices

    def note_selection(self, idx: torch.Tensor) -> None:
        """Count the heads that chose each chunk this step into its decayed importance.

        Deferred: the choices are kept and folded in by flush_selection, all steps at once, before anything
        reads importance or chosen (three launches per layer and step saved on a host-bound decode).
        """
        self._sel.append(idx)
        if len(self._sel) >= SELECTION_FLUSH_MAX:
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
        d = self.cache.config.importance_decay
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

    # --- reading chunks back -------------------------------------------------------------------------
    def refresh_addresses(self) -> None:
        """Bring the address table up to date with what the store moved since the last step."""
        if self.dirty:
            self._apply_rows(self._address_rows())

    def _address_rows(self) -> dict:
        """The host half of refresh_addresses: {b * cap + c: (source, offset, on gpu)} of the chunks the
        store moved (disk_only kept up to date here), for _apply_rows."""
        dirty, keys, disk_only, cap = list(self.dirty), self._keys, self.disk_only, self.addr.shape[1]
        self.dirty.clear()
        rows = {}
        for (b, c), (loc, tier) in zip(dirty, self.cache.store.best_locations([keys[b][c] for b, c in dirty])):
            if loc is None:
                disk_only.add((b, c))
                rows[b * cap + c] = (-1, -1, 0)
            else:
                disk_only.discard((b, c))
                rows[b * cap + c] = (loc[0], loc[1], int(tier == "gpu"))
        return rows

    def _apply_rows(self, rows: dict) -> None:
        """Write rows {b * cap + c: (source, offset, on gpu)} into the address table: one host-to-device
        copy (the indices, then the values) and one kernel, queued without a sync."""
        if not rows:
            return
        n = len(rows)
        flat = np.fromiter(itertools.chain(rows, itertools.chain.from_iterable(rows.values())), np.int64, 4 * n)
        t = self.cache.host_table(flat)
        self.addr.view(-1, 3).index_copy_(0, t[:n], t[n:].view(n, 3))

    def _stage_from_disk(self, chunk_idx: torch.Tensor, rows: dict, sources: List[torch.Tensor],
                         wait: bool, every: bool = False) -> Optional[int]:
        """Point the selected chunks that live only on disk at staged copies of them.

        A chunk the prefetch pipeline has staged is read from its staging slot (waited for while in
        flight). With `wait` (miss policy 'wait', and always for exact attention) the others are read
        now, all in one batch into a pinned buffer of the step, and the time waited is counted as
        stall; without `wait` (policy 'skip') it is left out of this step: it points at a zero chunk
        (whose source index is returned, for attention to mask it out) and is queued for the next step.
        Their places go into `rows` (the address rows refresh_addresses would write, written here with
        them in one copy) and the chunks are marked dirty, so that the next refresh points them back at
        wherever the store then holds them. While this layer's reads are in flight, the host installs
        the chunks that earlier layers read from disk into the cpu tier (TierKVCache.install_direct),
        never evicting one this layer chose: that work and the disk overlap. The chosen chunks are
        touched, so that installs keep them. `every`: chunk_idx is every chunk for every head (exact
        attention), which says nothing about which chunks matter: nothing is touched, and the choice
        need not be read back.

        Which chosen chunks are on disk only is known on the host (disk_only, kept by
        refresh_addresses), so the one host sync here is the copy of a sparse choice.
        """
        cache = self.cache
        B, H, kk = chunk_idx.shape
        keys = self._keys
        per_row = None
        if every:
            want = sorted(self.disk_only)
            counts = dict.fromkeys(want, H)  # gather entries per (b, c): one per head
        else:
            with cache.device_wait():
                chosen = chunk_idx.reshape(B, H * kk).tolist()  # waits for the device to have chosen
            per_row = [Counter(row) for row in chosen]  # per chunk chosen, the heads that chose it
            disk_only = self.disk_only
            counts = {(b, c): n for b in range(B) for c, n in per_row[b].items() if (b, c) in disk_only}
            want = sorted(counts)

        def chosen_keys():  # built after the reads are started (they wait for nothing else)
            return {keys[b][c] for b in range(B) for c in per_row[b]} if per_row is not None else ()

        if not want:
            protect = chosen_keys()
            if protect:
                cache.store.touch(protect, 1.0)
            self._apply_rows(rows)
            return None
        nb = self.layout.nbytes
        pf = cache.prefetcher()
        # the chunks nobody staged are read on the disk tier's reader threads (the C reader holds no
        # GIL), all in one batch into one pinned buffer, and started first; staged ones are served from
        # their slots
        stride = round_up(nb)
        batches = []  # (chunks, buffer, its views, keys, wait for the reads)

        def start(pairs):
            buf = torch.empty(stride * len(pairs), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            bkeys = [keys[b][c] for b, c in pairs]
            wait_reads = cache.store.disk.read_into_async(bkeys, buf, stride)
            views = buf.view(len(pairs), stride).narrow(1, 0, nb).unbind(0)  # one C++ loop, not one slice each
            batches.append((pairs, buf, views, bkeys, wait_reads))

        staged = pf.staged([keys[b][c] for b, c in want])
        if wait and not all(staged):
            start([bc for bc, st in zip(want, staged) if not st])
        protect = chosen_keys()
        # what is chosen now is likely chosen next step: its value in the store rises, so installing
        # chunks read from disk evicts the cpu tier's unchosen chunks first
        if protect:
            cache.store.touch(protect, 1.0)
        ask = [bc for bc, st in zip(want, staged) if st] if wait else want
        t0 = time.perf_counter()
        locs = pf.fetch_many([keys[b][c] for b, c in ask], nb, wait)
        if wait:
            cache.store.add_stall(time.perf_counter() - t0)
        base = len(sources)
        sources.extend(pf.sources)  # the staging arena (its segments exist once something was staged)
        zero_src = len(sources)
        sources.append(cache.zero_chunk(nb))
        cap = self.addr.shape[1]
        skipped_n = 0
        late = []  # staged, but their request was dropped or cancelled: read here after all
        for (b, c), loc in zip(ask, locs):
            if loc is not None:
                rows[b * cap + c] = (base + loc[0], loc[1], 0)
            elif wait:
                late.append((b, c))
            else:
                rows[b * cap + c] = (zero_src, 0, 0)
                skipped_n += counts[(b, c)]
        if late:  # rare
            start(late)
        for pairs, buf, *_ in batches:  # where they will be once read
            cache.keep_alive(buf)
            sources.append(buf)
            src = len(sources) - 1
            for i, (b, c) in enumerate(pairs):
                rows[b * cap + c] = (src, i * stride, 0)
        self.dirty.update(want)  # these places hold for this step only
        cache.disk_entries += sum(counts.values())
        cache.skipped_entries += skipped_n
        self._apply_rows(rows)
        if batches:
            # the host's share of the work while the disk reads: earlier layers' chunks into the cpu tier
            # (not with `every`: all of this layer's chunks are about to be read, and none is protected)
            if not every:
                cache.install_direct(protect)
            t0 = time.perf_counter()
            for *_, wait_reads in batches:
                wait_reads()
            cache.store.add_stall(time.perf_counter() - t0)
            for pairs, _, views, bkeys, _ in batches:
                pf.stats.sync_reads += len(pairs)
                pf.stats.bytes_read += nb * len(pairs)  # counted with the staged reads: disk bytes per step
                cache.add_direct(zip(bkeys, views))  # offered to the memory tiers
        return None if wait else zero_src

    def _table_parts(self, kk: int, n0: int):
        """The columns of the gather table that do not change from step to step (cached per shape)."""
        key = (kk, n0)
        if self._static is None or self._static[0] != key:
            B, H, L = self.batch_size, self.n_heads, self.chunk_len
            dev = self.device
            b = torch.arange(B, device=dev).view(B, 1, 1).expand(B, H, kk)
            h = torch.arange(H, device=dev).view(1, H, 1).expand(B, H, kk)
            j = torch.arange(kk, device=dev).view(1, 1, kk).expand(B, H, kk)
            base = torch.stack([torch.zeros_like(j), torch.zeros_like(j), torch.full_like(j, L), b * H + h, n0 + j * L], dim=-1)
            hoff = torch.stack([torch.zeros_like(h), h * self.layout.head_bytes], dim=-1)
            self._static = (key, base.reshape(-1, 5).contiguous(), hoff.reshape(-1, 2).contiguous())
        return self._static[1], self._static[2]

    def gather_into(self, chunk_idx: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, n0: int = 0,
                    wait: bool = True, every: bool = False) -> Optional[torch.Tensor]:
        """Decode the chunks chunk_idx [B, H, k] (per KV head) into rows n0 + j*L of k_out / v_out [B, H, N, D].

        Returns None, or (wait=False) a [B, H, k] mask of chunks left out because they were on disk.
        """
        if self.layer_idx in self.cache._direct:  # chunks this layer read before: offered first
            self.cache.install_direct(layer=self.layer_idx)
        rows = {}
        if self.dirty:
            with self.cache.host_part("refresh"):
                rows = self._address_rows()
        sources = self.cache.sources()
        zero_src = None
        if self.disk_only:  # the refreshed rows are written with the staged ones
            with self.cache.host_part("stage_from_disk"):
                zero_src = self._stage_from_disk(chunk_idx, rows, sources, wait, every)
        elif rows:
            with self.cache.host_part("refresh"):
                self._apply_rows(rows)
        B, H, kk = chunk_idx.shape
        a = self.addr[..., :2].gather(1, chunk_idx.reshape(B, H * kk, 1).expand(B, H * kk, 2))
        skipped = None if zero_src is None else (a[..., 0] == zero_src).reshape(B, H, kk)
        table, hoff = self._table_parts(kk, n0)
        # the table is rewritten in place: the previous launch that read it is earlier on the same stream
        torch.add(a.reshape(-1, 2), hoff, out=table[:, :2])
        self.cache.entries += table.shape[0]
        self._launch(sources, table, k_out, v_out)
        return skipped

    def _launch(self, sources, table, k_out, v_out) -> None:
        lay = self.layout
        if self.device.type == "cuda":  # after the copies into cpu slots (ingest) and gpu slots (promotions)
            self.cache.store.wait_inflight(torch.cuda.current_stream(self.device))
        if self.device.type != "cuda" or not self.cache.fast_ext:
            ops.gather(sources, table, lay.format, self.head_dim, lay.group_size, k_out, v_out,
                       chunk_tokens=self.chunk_len)
        else:
            self._launch_ext(sources, table, k_out, v_out)
        if self.device.type == "cuda":  # cpu slots it reads are not freed (and rewritten) before it is done
            self.cache.store.note_readers(torch.cuda.current_stream(self.device))

    def _launch_ext(self, sources, table, k_out, v_out) -> None:
        lay = self.layout
        # the extension op straight: the arguments are ours and known good, and the per-call checks
        # (is every source pinned?) cost more host time than the launch itself
        E, N = table.shape[0], k_out.shape[2]
        key = (E, N)
        plan = self._launch_plans.get(key)
        if plan is None:
            g = ops._group(lay.format, self.head_dim, lay.group_size)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            plan = (g, tuple(ops.launch_plan(lay.format, E, self.head_dim, g, N, index, chunk_tokens=self.chunk_len)))
            self._launch_plans[key] = plan
        g, shape = plan
        torch.ops.tierkv.gather(sources, table, ops.FMT_CODES[lay.format], self.head_dim, g, k_out, v_out, *shape)

    def gather(self, chunk_idx: torch.Tensor, every: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V [B, H, k*L, D] of the chunks chunk_idx [B, H, k]."""
        B, H, kk = chunk_idx.shape
        k_out = torch.empty(B, H, kk * self.chunk_len, self.head_dim, dtype=self.dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        self.gather_into(chunk_idx, k_out, v_out, every=every)
        return k_out, v_out

    def gather_all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        C = self.n_chunks
        idx = torch.arange(C, device=self.device).view(1, 1, C).expand(self.batch_size, self.n_heads, C)
        return self.gather(idx, every=True)

    def count_hits(self) -> None:
        """Fold the choices since the last count into the cache's gpu-hit counter (before residency changes).

        A chunk chosen n times while a copy sat in the gpu tier was n gpu hits: residency only changes
        at promotions, so counting there (and when statistics are read) needs no work per step.
        """
        self.flush_selection()
        if self.chosen is None or self.n_chunks == 0:
            return
        C = self.n_chunks
        self.cache.add_gpu_hits((self.chosen[:, :C] * self.addr[:, :C, 2]).sum())
        self.chosen.zero_()

    def promotion_candidates(self, limit: int) -> Optional[torch.Tensor]:
        """Up to `limit` (value, b * C + c) of the most important chunks in the cpu tier but not on the GPU."""
        C = self.n_chunks
        if limit <= 0 or C == 0:
            return None
        self.flush_selection()
        self.refresh_addresses()
        skip = (self.addr[:, :C, 2] != 0) | (self.addr[:, :C, 0] < 0)
        imp = torch.where(skip, torch.zeros_like(self.importance[:, :C]), self.importance[:, :C]).reshape(-1)
        vals, flat = torch.topk(imp, min(limit, imp.numel()))
        return torch.stack([vals, flat.to(torch.float32)], dim=1)


def _overlap(a: torch.Tensor, b: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """How many of b's chosen chunks [B, H, k] are also in a's (a device scalar)."""
    mask = torch.zeros(a.shape[0], a.shape[1], n_chunks, dtype=torch.bool, device=a.device)
    mask.scatter_(2, a.clamp(max=n_chunks - 1), True)
    return mask.gather(2, b).sum()


class TierKVCache(Cache):
    """A transformers Cache backed by a tierkv ChunkStore. Create it through `tierkv.offload`."""

    def __init__(self, config: TierConfig, num_layers: int, store: ChunkStore, name: Optional[str] = None) -> None:
        self.config = config
        self.store = store
        self.cache_id = name or f"c{next(_ids)}-{uuid.uuid4().hex[:8]}"
        super().__init__(layers=[TierKVLayer(self, i) for i in range(num_layers)])
        self.selected_layers: set = set()
        self.steps = 0
        self.promote_every = PROMOTE_EVERY_MIN  # while the gpu tier fills (see _worth_promoting)
        self._filling = True
        self._promoted = False
        self._hits_mark = 0.0
        self._entries_mark = 0
        self._work: Optional[torch.Tensor] = None
        self._sources: Optional[List[torch.Tensor]] = None
        self._alive: list = []
        # per layer, (key, bytes) of chunks read from disk outside staging, not yet offered to the memory
        # tiers (see install_direct)
        self._direct: dict = {}
        self._nested = 0.0  # seconds of the host parts that have ended (see host_part)
        # gather entries (one per KV head per chunk) served from the gpu tier: counted on the device so
        # counting costs no sync; the rest came from the cpu tier, or from disk (counted on the host)
        self._gpu_entries: Optional[torch.Tensor] = None
        self.entries = 0
        self.disk_entries = 0
        self.fast_ext = ops.backend() == "ext" and store.gpu.device.type == "cuda"
        self.skipped_entries = 0
        self.predict = True  # prefetch what the next layer is predicted to need (off: only what is asked)
        # whether next-layer guesses are read from disk (next_layer_prefetch, the gate's state): while
        # shut they are still made and scored now and then, but not read: reading chunks nobody will use
        # only takes the disk from the ones that are asked for
        self._gate = PrefetchGate(NEXT_LAYER_MIN_HIT, on=NEXT_LAYER_PREFETCH_AT_START)
        self._guess_every = GATE_EVERY  # steps between guesses made only to be scored (see GUESS_EVERY_MAX)
        self._guess = None  # (next layer, its guessed chunks on disk, event): set by predict_next
        # host seconds spent in the disk path's parts of decode steps (the stall is counted apart, in the
        # store): where a step's time goes, without a profiler's overhead (bench_pipeline reports them).
        # wait_gpu: the host waiting for the device (a layer's choice read back in stage_from_disk, a guess
        # read back in issue_prefetch, the end of a pass waiting for its kernels): the device's backlog,
        # not host work, and not counted in the part where it happens; write_back: disk copies of chunks cut
        # in a pass (store.write_back); refresh: bringing a layer's address table up to date with the store
        self.host_seconds = dict.fromkeys(("predict", "issue_prefetch", "stage_from_disk", "install", "promote",
                                           "wait_gpu", "write_back", "refresh"), 0.0)
        self._marks: dict = {}  # per prediction, (hits, guesses) at the gates' last look
        self._pass_start: Optional[float] = None  # perf_counter when layer 0 was last updated (a pass began)
        self._end_work = 0.0  # seconds the last end_forward took, if its pass was a sparse decode step
        self._sparse_pass = False  # a layer of this pass attended sparsely (set by hf/attention.py)
        self._window = [0.0, 0]  # decode seconds and steps since the gate's last look
        self.admit_min_prior = 0.0  # see ADMIT_PRIOR; set from the next-step hit rate every GATE_EVERY steps
        self._prefetcher = None
        self.lookahead = None  # hf.lookahead.Lookahead when the model has one (set by tierkv.offload, closed here)
        self._zero: Optional[torch.Tensor] = None
        self._ring: Optional[_PinnedRing] = None  # see host_table
        # whether chunks read from disk are offered to the gpu tier too (see _offer): off by default. On
        # the H200 (bench/results/pipeline_h200_2000d0c_gpu_installs_*.json) it cut the disk bytes of per-head
        # selection from 2.0 to 1.1 MiB a token and made those steps faster, but cost shared selection,
        # which reads few chunks from disk, more host time in uploads than it saved
        self.gpu_installs = False
        self._pred = {"next_layer_hits": None, "next_layer_total": 0, "next_step_hits": None, "next_step_total": 0}
        self._stream_rows: dict = {}  # stream name -> its batch row (None: another cache's), for _on_move
        store.add_listener(self._on_move)

    @property
    def next_layer_prefetch(self) -> bool:
        """Whether next-layer guesses are read ahead from disk now (pipeline.PrefetchGate decides)."""
        return self._gate.on

    @next_layer_prefetch.setter
    def next_layer_prefetch(self, on: bool) -> None:
        self._gate.on = bool(on)

    # --- keys and addresses ---------------------------------------------------------------------------
    def key(self, b: int, layer: int, c: int) -> ChunkKey:
        return ChunkKey(f"{self.cache_id}-b{b}", layer, c)

    def _on_move(self, key: ChunkKey, tier: str) -> None:
        b = self._stream_rows.get(key.stream, -1)  # called per chunk moved: the stream's row parsed once
        if b == -1:
            prefix = self.cache_id + "-b"
            b = int(key.stream[len(prefix):]) if key.stream.startswith(prefix) else None
            self._stream_rows[key.stream] = b
        if b is not None:
            self.layers[key.layer].dirty.add((b, key.index))

    def sources(self) -> List[torch.Tensor]:
        """The store's sources, cached until a tier adds a segment (a fresh list each call: callers append)."""
        n = self.store.n_sources()
        if self._sources is None or len(self._sources) != n:
            self._sources = self.store.sources()
        return list(self._sources)

    def add_gpu_hits(self, n: torch.Tensor) -> None:
        self._gpu_entries = n if self._gpu_entries is None else self._gpu_entries + n

    def stats(self):
        """The store's statistics, with the gather entries of this cache counted as tier hits and misses.

        Units there: one entry is one KV head's block of one chunk. An entry served from the gpu tier is
        a gpu hit; from the cpu tier a gpu miss and cpu hit; from disk a miss at both and a disk hit.
        """
        s = self.store.stats()
        for layer in self.layers:
            layer.count_hits()
        gpu = int(self._gpu_entries) if self._gpu_entries is not None else 0
        disk = self.disk_entries
        cpu = self.entries - gpu - disk
        for tier, hit, miss in (("gpu", gpu, cpu + disk), ("cpu", cpu, disk), ("disk", disk, 0)):
            s.hits[tier] = s.hits.get(tier, 0) + hit
            s.misses[tier] = s.misses.get(tier, 0) + miss
        p = {"skipped_entries": self.skipped_entries, "next_layer_prefetch_on": self.next_layer_prefetch,
             # the gate's last measured mean step time with and without next-layer prefetching
             "gate_step_s_on": self._gate.step_seconds[True], "gate_step_s_off": self._gate.step_seconds[False],
             "host_seconds": dict(self.host_seconds)}
        for name in ("next_layer", "next_step"):
            hits, total = self._pred[name + "_hits"], self._pred[name + "_total"]
            p[f"predict_{name}_hit_rate"] = (int(hits) / total) if total else None
        if self._prefetcher is not None:
            p.update({k: v for k, v in self._prefetcher.stats.__dict__.items()})
        s.prefetch = p
        return s

    # --- the prefetch pipeline -------------------------------------------------------------------------
    def prefetcher(self):
        if self._prefetcher is None:
            from ..pipeline import Prefetcher
            from ..tiers.disk import io_threads

            layer = next(l for l in self.layers if l.is_initialized)
            cfg = self.config
            longest = cfg.chunk_length or max(cfg.chunk_lengths)
            shortest = cfg.chunk_length or min(cfg.chunk_lengths)
            slot = ChunkLayout(cfg.format, longest, layer.n_heads, layer.head_dim, cfg.group_size).nbytes
            # staged chunks keep their slots until the end of the pass (they are installed then), so
            # staging holds a whole pass of guesses: every layer's distinct chunks (one set per layer
            # with 'shared' selection, up to one per head with 'head'), within a quarter of the cpu budget
            heads = 1 if cfg.selection == "shared" else layer.n_heads
            per_layer = (cfg.budget // shortest if cfg.budget else 32) * heads * layer.batch_size
            cap = max(64, cfg.cpu_budget // 4 // round_up(slot))
            depth = max(64, min(cap, per_layer * len(self.layers) + per_layer))
            self._prefetcher = Prefetcher(self.store.disk, slot, depth=depth, workers=io_threads(),
                                          pinned=layer.device.type == "cuda")
        return self._prefetcher

    def host_table(self, rows: np.ndarray) -> torch.Tensor:
        """A small host table (an int64 numpy array, not used by the caller afterwards) as an int64 tensor
        on the device, without a sync."""
        dev = self.store.gpu.device
        if dev.type != "cuda":
            return torch.from_numpy(rows)
        if self._ring is None:
            self._ring = _PinnedRing(dev)
        return self._ring.to_device(rows)

    def zero_chunk(self, nbytes: int) -> torch.Tensor:
        """An all-zero source (decodes to zeros in every format) for entries left out of a step."""
        dev = self.store.gpu.device
        if self._zero is None or self._zero.numel() < nbytes:
            self._zero = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        return self._zero

    def predict_next(self, layer: "TierKVLayer", q: torch.Tensor, idx: torch.Tensor) -> None:
        """After `layer` chose idx for query q: guess the next layer's choice; what of it is on disk is
        queued for reading by issue_prefetch(), which the caller calls after this layer's own reads.

        The guess scores a query against the next layer's abstracts: with a look-ahead (config
        prediction 'lookahead', hf/lookahead.py) the next layer's query guessed from the hidden state
        that entered this layer, else this layer's own query. Both predictions are scored for the
        statistics: the guess when the next layer chooses, and "the same as last step" (importance
        persists) against this layer's choice, the latter one step in NEXT_STEP_EVERY (a statistic for
        the admission gate, sampled: counting costs a few launches per layer, on a host-bound step).
        While the guesses are not prefetched (the gate is shut), one step in GATE_EVERY still makes
        them, for the hit rate the gate and the statistics read (a guess costs a scoring pass), and one
        in up to GUESS_EVERY_MAX while those samples keep finding too few right (_gate_next_layer). With
        prediction off (predict False: synchronous fetching) none is made.
        """
        self._guess = None  # a guess is for the layer right after this one, never a later one
        B, H, kk = idx.shape
        prev = layer.prev_idx
        if prev is not None and prev.shape == idx.shape and self.steps % NEXT_STEP_EVERY == 0:
            self._count("next_step", _overlap(prev, idx, layer.n_chunks), idx.numel())
        layer.prev_idx = idx
        if layer.predicted is not None and layer.predicted.shape == idx.shape:
            self._count("next_layer", _overlap(layer.predicted, idx, layer.n_chunks), idx.numel())
        layer.predicted = None  # a guess is for one step
        nxt = self.layers[layer.layer_idx + 1] if layer.layer_idx + 1 < len(self.layers) else None
        if nxt is None or nxt.n_chunks == 0 or self.config.budget is None:
            return
        if not self.predict:  # synchronous fetching: no guesses (a scoring pass each, for a statistic only)
            return
        prefetching = self.next_layer_prefetch
        if not prefetching and self.steps % self._guess_every:
            return
        k = min(self.config.budget // nxt.chunk_len, nxt.n_chunks)
        if k <= 0 or nxt.head_dim != layer.head_dim:
            return
        if nxt.scaling is None:
            nxt.scaling = layer.scaling
        qn = self.lookahead.query(nxt.layer_idx, layer.layer_idx) if self.lookahead is not None else None
        pred = nxt.choose(nxt.score(qn if qn is not None else q), k)
        nxt.predicted = pred
        nxt.refresh_addresses()
        if not nxt.disk_only or self.store.disk is None or not prefetching:
            return
        # the guessed chunks that are on disk (the rest -1) go to the host without a sync: they are read
        # there by issue_prefetch(), after this layer's own disk reads, so that the guesses' reads do not
        # compete with the reads this layer waits for, and run while it computes
        flat = pred.reshape(B, -1)
        guess = torch.where(nxt.addr[..., 0].gather(1, flat) < 0, flat, -1)  # [B, H*k]
        if guess.device.type == "cuda":
            host = torch.empty(guess.shape, dtype=guess.dtype, pin_memory=True)
            host.copy_(guess, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = guess, None
        self._guess = (nxt, host, done)

    def issue_prefetch(self) -> None:
        """Queue the disk reads of the guess predict_next() made for the next layer (if any)."""
        pending, self._guess = self._guess, None
        if pending is None:
            return
        nxt, host, done = pending
        if done is not None:
            with self.device_wait():
                done.synchronize()  # waits for the guess only (the layer's later kernels are behind it)
        want = sorted({(b, c) for b, row in enumerate(host.tolist()) for c in row if c >= 0})
        if want:
            nb = nxt.layout.nbytes
            self.prefetcher().request([(nxt._keys[b][c], nb) for b, c in want])

    def _count(self, name: str, hits: torch.Tensor, total: int) -> None:
        acc = self._pred[name + "_hits"]
        self._pred[name + "_hits"] = hits if acc is None else acc + hits
        self._pred[name + "_total"] += total

    def _install_prefetched(self) -> bool:
        """Move staged chunks into the cpu tier (the next steps find them there) and recycle the slots.
        Returns whether it waited for this pass's kernels."""
        pf = self._prefetcher
        if pf is None:
            return False
        pf.check()
        ready = pf.take_ready()
        if ready:
            self._wait_for_kernels()  # kernels of this pass may still read the staging slots
            # while choices do not persist, only chunks used again within a few steps get a copy:
            # one-off choices and wrong guesses would cost a host copy each and evict chunks used again
            self._offer(ready)
            if self.gpu_installs:
                self.store.settle_uploads()  # uploads into gpu slots read the staging slots, recycled now
            pf.release([k for k, _ in ready])
        pf.begin_step(self.steps)
        pf.drop_stale()
        return bool(ready)

    def add_direct(self, items) -> None:
        """Chunks (key, bytes) a layer read from disk outside staging, for install_direct to offer to the
        memory tiers later: while a later layer waits for its own reads, or before this layer next gathers."""
        for key, data in items:
            self._direct.setdefault(key.layer, []).append((key, data))

    def install_direct(self, protect=(), layer: Optional[int] = None) -> None:
        """Offer the chunks add_direct() holds (only `layer`'s, when given) a copy in the cpu tier, ranked
        with its chunks by value (store.add_copies); the chunks in `protect` are not evicted for them.

        Done while a layer's disk reads are in flight (the host work overlaps the disk), or at the latest
        when their own layer gathers next: a layer's addresses are always computed after its chunks read
        before were offered, so a chunk read once is not read from disk again for want of a copy.
        Evicting waits for the kernels that may read the evicted slots (the store fences its readers).
        """
        if not self._direct or (layer is not None and layer not in self._direct):
            return
        with self.host_part("install"):
            if layer is None:
                todo = [e for entries in self._direct.values() for e in entries]
                self._direct = {}
            else:
                todo = self._direct.pop(layer)
            # while choices do not persist, only chunks used again within a few steps get a copy (see
            # ADMIT_PRIOR); a key read twice is offered once
            self._offer(list(dict(todo).items()), protect)

    def _offer(self, items, protect=()) -> None:
        """Chunks read from disk (key, host bytes) into the memory tiers, ranked by value in each: the cpu
        tier, and with gpu_installs the gpu tier too, which caches the chosen chunks (with a budget of its
        own, often larger than the cpu tier's: chunks it keeps are not read from disk again, and gathers
        read them from device memory). Chunks in `protect` are not evicted from either."""
        store, prior = self.store, self.admit_min_prior
        store.add_copies(items, "cpu", min_prior=prior, protect=protect)
        if self.gpu_installs and store.gpu.budget > 0:
            store.add_copies(items, "gpu", min_prior=prior, protect=protect)

    def keep_alive(self, t: torch.Tensor) -> None:
        """Hold a host buffer a kernel may still be reading until the end of the forward pass."""
        self._alive.append(t)

    @contextlib.contextmanager
    def host_part(self, name: str):
        """Adds the block's host seconds to host_seconds[name], less those of the parts nested in it (a
        wait for the device inside it is counted into host_seconds["wait_gpu"], an install into
        "install"): each second is counted in one part."""
        t0, n0 = time.perf_counter(), self._nested
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.host_seconds[name] += elapsed - (self._nested - n0)
            self._nested = n0 + elapsed

    def device_wait(self):
        """A block in which the host waits for the device: its seconds go to host_seconds["wait_gpu"]."""
        return self.host_part("wait_gpu")

    def _wait_for_kernels(self) -> None:
        """Block until this pass's kernels are done (no-op on the CPU): after it, host buffers they read
        may be reused. Pinned buffers come from torch's caching host allocator, which knows nothing of
        reads made by our kernels through unified addressing, so freeing one hands it out again at once."""
        dev = self.store.gpu.device
        if dev.type == "cuda":
            with self.device_wait():
                torch.cuda.current_stream(dev).synchronize()

    def work_buffer(self, layer: TierKVLayer, n: int) -> torch.Tensor:
        """[2, B, H, >= n, D] scratch shared by all layers (they run one after another)."""
        w = self._work
        shape = (2, layer.batch_size, layer.n_heads, n, layer.head_dim)
        if w is None or w.shape[3] < n or w.shape[:3] != shape[:3] or w.shape[4] != shape[4] or w.dtype != layer.dtype:
            w = torch.empty(shape[:3] + (max(n, 256),) + shape[4:], dtype=layer.dtype, device=layer.device)
            self._work = w
        return w

    def end_forward(self) -> None:
        """After the last layer of a forward pass: age importance, now and then refresh the gpu tier."""
        now = time.perf_counter()
        # a sparse decode step, timed for the gate: from its first layer to here, plus the last step's work
        # here (installs of what it staged). Not from the end of the last pass: a pause between passes
        # (the caller's own work, between generate calls) would count as the state's step time; nor a
        # prefill pass or its end (writing its chunks back)
        sparse, self._sparse_pass = self._sparse_pass, False
        if sparse and self._pass_start is not None:
            self._window[0] += now - self._pass_start + self._end_work
            self._window[1] += 1
        try:
            self._end_forward()
        finally:
            self._end_work = time.perf_counter() - now if sparse else 0.0

    def _end_forward(self) -> None:
        self.store.tick()
        if self.lookahead is not None:
            self.lookahead.end_pass()
        with self.host_part("install"):
            waited = self._install_prefetched()
        if self._alive:
            if not waited:
                self._wait_for_kernels()
            self._alive.clear()
        if self.store._inflight:  # the end of a forward pass is where ingest may be waited for
            self.store.settle()
        if self.store._unwritten:  # chunks cut in this pass get their disk copy now (see store.write_back)
            with self.host_part("write_back"):
                self.store.write_back()
        self.steps += 1
        if self.steps % GATE_EVERY == 0:
            self._gate_next_layer()
            self._gate_admission()
        if not self.selected_layers or self.steps % self.promote_every:
            return
        t0 = time.perf_counter()
        self._promote_chosen()
        self.host_seconds["promote"] += time.perf_counter() - t0

    def _promote_chosen(self) -> None:
        """Every promote_every steps: copy the chunks the sparse layers chose most into the gpu tier.

        Each layer offers its prefetch_depth chunks per head; while the gpu tier has free room, each
        also offers its share of that room, so that the tier fills within a few refreshes instead of
        a few hundred steps (a decode runs slower, reading more from the tiers below, until it does).
        Only chunks chosen by at least one head per step on average go up, in one batch.
        """
        per_layer = self.config.prefetch_depth
        layers = [self.layers[i] for i in sorted(self.selected_layers)]
        self.selected_layers.clear()
        gpu = self.store.gpu
        share = max(0, gpu.budget - gpu.used_bytes) // max(1, len(layers))
        cands, room = [], False
        for layer in layers:
            layer.count_hits()
            extra = share // round_up(layer.layout.nbytes) if layer.layout is not None else 0
            room = room or extra > 0
            c = layer.promotion_candidates(per_layer * layer.n_heads + extra)
            if c is not None:
                cands.append((layer, c))
        if not cands:
            return
        hits = self._gpu_entries.float().view(1, 1).expand(1, 2) if self._gpu_entries is not None else None
        values = torch.cat([c for _, c in cands] + ([hits] if hits is not None else [])).tolist()  # one host sync
        if not self._worth_promoting(values[-1][0] if hits is not None else 0.0, room):
            return
        keys, vals, pos = [], [], 0
        for layer, c in cands:
            rows, pos = values[pos : pos + len(c)], pos + len(c)
            for val, flat in rows:
                if val < 1.0:  # chosen by fewer than one head per step on average: not worth a copy
                    break
                flat = int(flat)
                keys.append(layer._keys[flat // layer.n_chunks][flat % layer.n_chunks])
                vals.append(val)
        if not self.store.promote_many(keys, vals) and room:
            self._end_fill()  # room left, but no chunk worth it
        self._promoted = True

    def _window_rate(self, name: str) -> Optional[float]:
        """Hit rate of the `name` prediction ('next_layer', 'next_step') since the last call for it
        (None: no guesses scored since). Reads the device-side counter: one host sync."""
        hits, total = self._pred[name + "_hits"], self._pred[name + "_total"]
        if hits is None:
            return None
        hits = int(hits)
        h0, t0 = self._marks.get(name, (0, 0))
        self._marks[name] = (hits, total)
        return (hits - h0) / (total - t0) if total > t0 else None

    def _gate_next_layer(self) -> None:
        """Every GATE_EVERY steps: prefetch next-layer guesses from disk only while enough of them hit
        and while steps with prefetching are faster than without (pipeline.PrefetchGate); the guesses
        and the step times of the last window decide the next one."""
        seconds, n = self._window
        self._window = [0.0, 0]
        rate = self._window_rate("next_layer")
        if rate is not None:
            # too few right again: sample less often (the gate holds this rate, and stays shut, until
            # the next sample); enough: every window again
            if rate >= self._gate.min_hit:
                self._guess_every = GATE_EVERY
            elif 2 * self._guess_every <= GUESS_EVERY_MAX:  # a multiple of GATE_EVERY: a window's first step
                self._guess_every *= 2
        if rate is None and not n:
            return
        self._gate.update(rate, seconds / n if n else None)

    def _gate_admission(self) -> None:
        """Every GATE_EVERY steps: while this layer's choices persist into the next step (the next-step
        hit rate of the last window), chunks read from disk go into the cpu tier at once, where the next
        steps find them; while they do not, only chunks chosen again within a few steps do (one-off
        choices would cost a host copy each and evict chunks that are used again)."""
        rate = self._window_rate("next_step")
        if rate is not None:
            self.admit_min_prior = 0.0 if rate >= ADMIT_ALL_AT else ADMIT_PRIOR

    def _worth_promoting(self, gpu_hits: float, room: bool = False) -> bool:
        """Adapt how often the gpu tier is refreshed to how often it serves the chosen chunks.

        At first the tier fills: refreshes come every PROMOTE_EVERY_MIN steps, whatever the hit rate
        (a refresh into free room evicts nothing, and the rate of a filling tier says little), until
        one finds the tier without room, or finds nothing worth a copy (see _promote_chosen). From
        then on, when choices churn (few hits since the last refresh), copying chunks up costs host
        time and PCIe traffic for nothing: refresh half as often (down to every 256 steps) and skip
        this one; when they persist, refresh more often again (up to every PROMOTE_EVERY_MIN steps).
        """
        entries = self.entries - self._entries_mark
        rate = (gpu_hits - self._hits_mark) / entries if entries else 0.0
        self._hits_mark, self._entries_mark = gpu_hits, self.entries
        if self._filling:
            if room:
                return True
            self._end_fill()
        if self._promoted and rate < 0.05:
            self.promote_every = min(256, self.promote_every * 2)
            return False
        if rate > 0.3:
            self.promote_every = max(PROMOTE_EVERY_MIN, self.promote_every // 2)
        return True

    def _end_fill(self) -> None:
        """The gpu tier has filled: refresh at the usual pace from now on (adapted by _worth_promoting)."""
        self._filling = False
        self.promote_every = max(self.promote_every, PROMOTE_EVERY)

    def device_bytes(self) -> dict:
        """Bytes of KV state this cache keeps in device memory: the hot set, the abstracts, the gpu tier."""
        hot = abstracts = codes = 0
        for layer in self.layers:
            for t in (layer.sink, layer._tbuf):
                hot += 0 if t is None else t.numel() * t.element_size()
            if layer.abstracts is not None:
                abstracts += layer.abstracts[..., : layer.n_chunks].numel() * layer.abstracts.element_size()
            if layer.codes is not None:
                codes += layer.codes[:, :, : layer.n_chunks].numel()
        return {"hot_set": hot, "abstracts": abstracts, "key_codes": codes, "gpu_tier": self.store.gpu.used_bytes}

    def wait_idle(self) -> None:
        """Wait until the work this cache left running in the background is done: prefetch reads in
        flight, and chunks queued for writing to disk (before timing something else in this process,
        say, which those threads would otherwise compete with)."""
        if self._prefetcher is not None:
            self._prefetcher.wait_idle()
        self.store.flush()

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
            self.lookahead = None
        self.store.remove_listener(self._on_move)
        self._work = None
        self._direct = {}
        if self._alive:
            self._wait_for_kernels()
            self._alive.clear()
        if self._prefetcher is not None:
            pf, self._prefetcher = self._prefetcher, None
            pf.close()
