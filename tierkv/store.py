"""ChunkStore: the residency map of every chunk across the gpu, cpu and disk tiers, and its statistics.

The store is the one owner of residency. Tiers only hold bytes; the store decides where a chunk goes
and what leaves a tier when it is full. Every chunk always has a copy in the cpu or the disk tier (its
record); the gpu tier is a cache on top. A tier makes room by evicting its least valuable chunks, where
value is importance decayed by age: importance * decay ** (steps since last use), least recently used
first among equals. An evicted chunk that has no copy below moves down (gpu -> cpu -> disk) first, so
nothing is lost; only when the bottom of the hierarchy is full does a put fail with CapacityError.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TierConfig
from .errors import CapacityError, ChunkNotFoundError, ConfigError
from .keys import ChunkKey
from .tiers import TIER_NAMES, CpuTier, GpuTier
from .tiers.arena import round_up


@dataclass
class StoreStats:
    """Counters of one store. Tier pairs are named 'src->dst'; 'ingest' is data arriving from the model."""

    bytes_moved: Dict[str, int] = field(default_factory=dict)
    hits: Dict[str, int] = field(default_factory=dict)
    misses: Dict[str, int] = field(default_factory=dict)
    evictions: Dict[str, int] = field(default_factory=dict)
    resident_chunks: Dict[str, int] = field(default_factory=dict)
    used_bytes: Dict[str, int] = field(default_factory=dict)
    budget_bytes: Dict[str, Optional[int]] = field(default_factory=dict)
    stall_seconds: float = 0.0
    chunks: int = 0
    prefetch: Dict[str, float] = field(default_factory=dict)  # pipeline counters, where a cache has one

    def hit_rate(self, tier: str) -> float:
        h, m = self.hits.get(tier, 0), self.misses.get(tier, 0)
        return h / (h + m) if h + m else 0.0


@dataclass(slots=True)  # read and written per chunk on the decode path (touch, ranking): no __dict__
class _Meta:
    nbytes: int
    importance: float
    step: int
    order: int
    prior: float = 0.0  # its value just before the step it was last touched in (0: never touched before)
    last_touch: int = -1  # the clock of that step
    rank: tuple = ()  # eviction order key, see ChunkStore._stamp


def _host_copy(view: torch.Tensor, data: torch.Tensor) -> None:
    """Host bytes into a host slot view: one memcpy in this thread (torch's copy_ splits even a few KiB
    over its intra-op threads, which wait for cores the disk readers hold: measured at 0.1-0.5 ms per
    75 KiB chunk)."""
    np.copyto(view.numpy(), (data if data.dim() == 1 else data.reshape(-1)).numpy())


class ChunkStore:
    """Residency map and placement across tiers. Thread-safe: every public method holds one lock."""

    def __init__(self, config: TierConfig, device=None, disk=None) -> None:
        if not isinstance(config, TierConfig):
            raise ConfigError(f"config: expected a TierConfig, got {type(config).__name__}")
        self.config = config
        self.gpu = GpuTier(config.gpu_budget, device)
        # a few large pinned segments rather than many: every gather passes the whole list of sources
        self.cpu = CpuTier(config.cpu_budget, pinned=self.gpu.device.type == "cuda",
                           segment_bytes=max(256 << 20, config.cpu_budget // 8))
        if disk is None and config.disk_path is not None:
            from .tiers.disk import DiskTier  # zarr and lz4 load only when a disk tier is asked for

            disk = DiskTier(config.disk_path, budget=config.disk_budget, queue_depth=config.write_queue)
        self.disk = disk
        self._meta: Dict[ChunkKey, _Meta] = {}
        self._lock = threading.RLock()
        self._clock = 0
        self._order = 0
        self._moved = defaultdict(int)
        self._hits = defaultdict(int)
        self._misses = defaultdict(int)
        self._evictions = defaultdict(int)
        self._stall = 0.0
        # per memory tier, a heap of (rank, n, key) from which victims are taken lowest rank first without
        # ranking the whole tier each time (see _lowest): an entry is pushed when a chunk enters the tier;
        # a chunk's rank only rises after that (touch, use), so an entry whose rank is stale is pushed
        # again with the current one when it comes up
        self._heaps: Dict[str, list] = {"gpu": [], "cpu": []}
        self._heap_n = itertools.count()
        self._listeners: List[Callable[[ChunkKey, str], None]] = []
        # asynchronous copies not known to be done: (CUDA event, tensor kept alive until then). Ingest's
        # device-to-host copies into cpu slots (on _copy_stream) and promotions' host-to-device copies
        # from cpu slots into gpu slots (on _promote_stream): host code waits for them before it reads
        # or reuses cpu slots (_settle), device readers order their stream after them (wait_inflight)
        self._inflight: List[tuple] = []
        # copies of host bytes that are no cpu slot (a step's disk reads) into gpu slots (_put_gpu_batch):
        # device readers wait for them like the others (wait_inflight), and the host before it reads or
        # frees a gpu slot (_settle), but freeing or reusing a cpu slot need not wait for them
        self._uploads: List[tuple] = []
        self._copy_stream = None
        self._promote_stream = None
        self._ingest_pending = None  # (data, [(row, cpu slot)]): a put_many's copies not yet queued
        # the last kernel queued that may read cpu slots through unified addressing (note_readers): a
        # freed cpu slot is rewritten by the host at once (a disk read, a promotion's staging), so the
        # host waits for that kernel before it frees one
        self._readers = None
        self._readers_done = True  # the host has waited for _readers since it was last recorded
        # chunks put into the cpu tier with no disk copy yet (only where there is a disk tier): write_back
        # gives them one, so that evicting them later costs no write on the path that evicts
        self._unwritten: set = set()
        # cpu copies shadowed by a gpu copy (an insertion-ordered set): while a chunk is in the gpu tier,
        # gathers read it there and its cpu copy serves nothing; with a disk copy below, evicting that
        # cpu copy loses nothing, so the cpu tier gives up these first (see _shadow_victim), and caches
        # other chunks instead of the gpu tier's hottest ones a second time
        self._shadowed: "OrderedDict[ChunkKey, None]" = OrderedDict()
        self._sources: List[torch.Tensor] = []
        self._source_index: Dict[Tuple[str, int], int] = {}
        if self.disk is not None:  # a reopened disk tier brings its chunks with it
            for key in self.disk.keys():
                self._meta[key] = self._new_meta(self.disk.nbytes(key), 0.0, 0)

    # --- small helpers ---------------------------------------------------------------------------
    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def _tier(self, name: str):
        if name == "gpu":
            return self.gpu
        if name == "cpu":
            return self.cpu
        if name == "disk":
            if self.disk is None:
                raise ConfigError("tier 'disk': this store has no disk tier (TierConfig.disk_path is None)")
            return self.disk
        raise ConfigError(f"tier: expected one of {', '.join(TIER_NAMES)}, got {name!r}")

    def _holders(self, key: ChunkKey) -> List[str]:
        out = [n for n, t in (("gpu", self.gpu), ("cpu", self.cpu)) if key in t]
        if self.disk is not None and key in self.disk:
            out.append("disk")
        return out

    def _value(self, m: _Meta) -> float:
        return m.importance * self.config.importance_decay ** (self._clock - m.step)

    def _require(self, key: ChunkKey) -> _Meta:
        m = self._meta.get(key)
        if m is None:
            raise ChunkNotFoundError(f"chunk {key} is not in the store")
        return m

    # --- placement ---------------------------------------------------------------------------------
    def _new_meta(self, nbytes: int, importance: float, step: int) -> _Meta:
        return self._stamp(_Meta(nbytes, float(importance), step, self._next_order()))

    def _stamp(self, m: _Meta) -> _Meta:
        """Set m.rank after its importance or step changed.

        The value at clock c is importance * d ** (c - step) (d = importance_decay): for every chunk the
        same factor d ** c times importance * d ** -step, so the order of values is the order of
        log(importance) - step * log(d), which stays fixed until the chunk is used again. Kept with the
        chunk, eviction ranks thousands of chunks without computing a power for each at every step.
        """
        d = self.config.importance_decay
        key = math.log(m.importance) - m.step * math.log(d) if m.importance > 0 else -math.inf
        m.rank = (key, m.step, m.order)
        return m

    def _rank(self, key: ChunkKey) -> Tuple[float, int, int]:
        """Eviction order, lowest first: decayed importance, then last use, then age."""
        return self._meta[key].rank

    def _heap_add(self, tier, key: ChunkKey) -> None:
        """Enter a chunk now in `tier` into its victim heap (rebuilt when stale entries pile up)."""
        h = self._heaps[tier.name]
        if len(h) > 4 * len(tier) + 1024:  # the tier's chunks (this one among them) afresh
            h[:] = [(self._meta[k].rank, next(self._heap_n), k) for k in tier.keys() if k in self._meta]
            heapq.heapify(h)
            return
        heapq.heappush(h, (self._meta[key].rank, next(self._heap_n), key))

    def _lowest(self, tier, skip: Collection[ChunkKey], held: List[ChunkKey]) -> Optional[ChunkKey]:
        """Pop the chunk of `tier` lowest in the eviction order (_rank) that is not in `skip`; None when
        there is none. Chunks passed over for being in `skip` are appended to `held`: the caller gives
        them and any popped chunk it keeps back with _heap_return."""
        h = self._heaps[tier.name]
        meta = self._meta
        while h:
            rank, _, key = heapq.heappop(h)
            m = meta.get(key)
            if m is None or key not in tier:
                continue
            if m.rank != rank:  # used since it was pushed: its place is further up
                heapq.heappush(h, (m.rank, next(self._heap_n), key))
                continue
            if key in skip:
                held.append(key)
                continue
            return key
        return None

    def _heap_return(self, tier, keys: Iterable[ChunkKey]) -> None:
        h = self._heaps[tier.name]
        for key in keys:
            if key in tier and key in self._meta:
                heapq.heappush(h, (self._meta[key].rank, next(self._heap_n), key))

    def _shadow(self, key: ChunkKey) -> None:
        """Note that `key` now has a gpu copy above its cpu copy (see _shadowed). Only with a disk tier
        (without one a cpu copy is a chunk's record and never shadowed); entries no longer shadowed
        are dropped when they pile up."""
        if self.disk is None:
            return
        sh = self._shadowed
        sh[key] = None
        if len(sh) > 2 * len(self.gpu) + 64:
            gpu, cpu = self.gpu, self.cpu
            for k in [k for k in sh if k not in gpu or k not in cpu]:
                del sh[k]

    def _shadow_victim(self, skip: Collection[ChunkKey]) -> Optional[ChunkKey]:
        """The oldest cpu copy still shadowed by a gpu copy, with a disk copy below and not in `skip`
        (taken out of _shadowed), or None. Entries no longer shadowed are dropped as they come up."""
        sh, gpu, cpu, disk = self._shadowed, self.gpu, self.cpu, self.disk
        if disk is None or not sh:
            return None
        passed = []
        found = None
        while sh:
            key, _ = sh.popitem(last=False)
            if key not in gpu or key not in cpu or key not in self._meta or key not in disk:
                continue
            if key in skip:
                passed.append(key)
                continue
            found = key
            break
        for key in reversed(passed):  # still shadowed: kept, first in line, for a later call
            sh[key] = None
            sh.move_to_end(key, last=False)
        return found

    def _make_room(self, tier, nbytes: int, protect: Collection[ChunkKey]) -> None:
        """Evict from a memory tier until an allocation of nbytes succeeds; `protect`: keys never evicted.

        Victims are taken lowest rank first and at least 1/64 of the budget is reclaimed, so a full tier
        under a stream of puts evicts once per many puts rather than once per put.
        """
        want = max(nbytes, tier.budget // 64)
        freed, held = 0, []
        try:
            while freed < want:
                victim = self._shadow_victim(protect) if tier is self.cpu else None
                if victim is None:
                    victim = self._lowest(tier, protect, held)
                if victim is None:
                    break
                freed += self._evict_from(victim, tier.name)
        finally:
            self._heap_return(tier, held)

    def _notify(self, key: ChunkKey, tier: str) -> None:
        for fn in self._listeners:
            fn(key, tier)

    def _issue_ingest(self) -> None:
        """Queue the device-to-host copies of a put_many reserved so far (on _copy_stream, which is
        already ordered after the stream that produced the data), coalescing adjacent slots."""
        pending = self._ingest_pending
        if pending is None or not pending[1]:
            return
        data, items = pending
        self._ingest_pending = (data, [])
        n = data.shape[1]
        with torch.cuda.stream(self._copy_stream):
            i = 0
            while i < len(items):
                row0, base = items[i]
                store = base.untyped_storage().data_ptr()
                j = i + 1
                while j < len(items) and items[j][0] == items[j - 1][0] + 1 \
                        and items[j][1].data_ptr() == items[j - 1][1].data_ptr() + n \
                        and items[j][1].untyped_storage().data_ptr() == store:
                    j += 1
                dst = torch.empty(0, dtype=torch.uint8).set_(base.untyped_storage(), base.storage_offset(), ((j - i) * n,))
                dst.copy_(data[row0 : row0 + j - i].reshape(-1), non_blocking=True)
                i = j
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._inflight.append((ev, data))

    def _settle(self) -> None:
        """Wait for the asynchronous copies (into cpu slots, or out of them into gpu slots) before the
        host reads or frees those bytes; copies of a put_many still being reserved are queued first."""
        self._settle_cpu()
        self._settle_uploads()

    def _settle_cpu(self) -> None:
        """_settle for freeing or reusing cpu slots: the copies that read or write them, not the uploads."""
        self._issue_ingest()
        while self._inflight:
            ev, _ = self._inflight.pop()
            ev.synchronize()

    def _settle_uploads(self) -> None:
        while self._uploads:
            ev, _ = self._uploads.pop()
            ev.synchronize()

    def note_readers(self, stream) -> None:
        """Record that kernels queued on `stream` so far may read cpu slots (a gather through unified
        addressing): no cpu slot is freed, and so rewritten by the host, before they are done."""
        if self._readers is None:
            self._readers = torch.cuda.Event()
        self._readers.record(stream)
        self._readers_done = False

    def _fence_readers(self) -> None:
        """Wait for the kernels note_readers recorded; once waited for, no wait again until the next one
        (a batch of evictions waits once, not once per victim)."""
        if not self._readers_done:
            self._readers.synchronize()
            self._readers_done = True

    def wait_inflight(self, stream) -> None:
        """Order `stream` (a CUDA stream about to read the cpu or gpu tier) after the copies in flight."""
        if not self._inflight and not self._uploads:
            return
        with self._lock:
            self._inflight = [(ev, ref) for ev, ref in self._inflight if not ev.query()]
            self._uploads = [(ev, ref) for ev, ref in self._uploads if not ev.query()]
            for ev, _ in self._inflight + self._uploads:
                stream.wait_event(ev)

    def settle_uploads(self) -> None:
        """Wait for the uploads into gpu slots (and release the host bytes they read)."""
        with self._lock:
            self._settle_uploads()

    def settle(self) -> None:
        """Wait for every asynchronous copy into the cpu tier (and release what they kept alive)."""
        with self._lock:
            self._settle()

    def _evict_copy(self, tier, key: ChunkKey) -> int:
        if tier is self.cpu:  # a copy or a gather still in flight may read this slot
            self._settle_cpu()
            self._fence_readers()
        n = tier.evict(key)
        self._evictions[tier.name] += 1
        self._notify(key, tier.name)
        return n

    def _reserve_memory(self, tier, key: ChunkKey, nbytes: int, protect: Collection[ChunkKey] = ()) -> torch.Tensor:
        while True:
            view = tier.reserve(key, nbytes)
            if view is not None:
                if key in self._meta:
                    self._heap_add(tier, key)
                return view
            guard = {key, *protect}
            if not any(k not in guard for k in tier.keys()):
                raise CapacityError(
                    f"the {tier.name} tier (budget {tier.budget} bytes, {tier.used_bytes} used) has no room for "
                    f"chunk {key} of {nbytes} bytes even after eviction"
                    + (" (the rest are held for a gather about to read them)" if protect else "")
                )
            self._make_room(tier, nbytes, guard)

    def _put_memory(self, tier, key: ChunkKey, data: torch.Tensor, protect: Collection[ChunkKey] = ()) -> None:
        view = self._reserve_memory(tier, key, data.numel(), protect)
        if tier is self.cpu and not data.is_cuda:  # the common case first (the branches below, in short)
            _host_copy(view, data)
        elif view.device.type == "cuda" and tier is self.gpu and self.cpu.arena.pinned and data.device.type == "cpu":
            self._copy_up([(key, data, view)], from_cpu_slots=True)
        elif view.device.type == "cuda":
            self.wait_inflight(torch.cuda.current_stream(view.device))  # a promotion may still write the slot
            view.copy_(data.reshape(-1))
        elif view.device.type == "cpu" and data.device.type == "cpu":  # a gpu tier in host memory (no CUDA)
            _host_copy(view, data)
        else:
            view.copy_(data.reshape(-1))
        self._notify(key, tier.name)

    def _upload_stream(self, dev):
        """The promotion stream, ordered after what the compute stream has queued so far."""
        if self._promote_stream is None:
            self._promote_stream = torch.cuda.Stream(device=dev)
        self._promote_stream.wait_stream(torch.cuda.current_stream(dev))
        return self._promote_stream

    def _copy_up(self, placed, from_cpu_slots: bool) -> None:
        """Queue host-to-device copies into gpu slots, placed = [(key, host bytes, slot view)], on the
        promotion stream under one event, so that they overlap the compute stream's work instead of
        queueing in it (a per-chunk event and stream wait cost more host time than the copy). They start
        after what the compute stream has queued so far (a kernel may still read a slot's previous chunk);
        gathers wait for them (wait_inflight). from_cpu_slots: the bytes are cpu slots (or may be), so
        the host waits for the copies before it frees or rewrites one (_settle_cpu); else before it
        lets the bytes go (_settle_uploads). The sources stay referenced until then."""
        stream = self._upload_stream(self.gpu.device)
        with torch.cuda.stream(stream):
            for _, d, view in placed:
                view.copy_(d if d.dim() == 1 else d.reshape(-1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        (self._inflight if from_cpu_slots else self._uploads).append((ev, [d for _, d, _ in placed]))

    def _put_disk(self, key: ChunkKey, data: torch.Tensor) -> None:
        self._tier("disk").put(key, data.cpu() if data.device.type != "cpu" else data)
        self._notify(key, "disk")

    def _place(self, key: ChunkKey, data: torch.Tensor, tier: str, src: str) -> None:
        if tier == "disk":
            self._put_disk(key, data)
        else:
            self._put_memory(self._tier(tier), key, data)
        self._moved[f"{src}->{tier}"] += data.numel()

    def _evict_from(self, key: ChunkKey, tier: str) -> int:
        """Drop a chunk's copy from `tier`, moving it down first when that copy is the last one above disk."""
        if tier == "cpu":
            self._settle_cpu()  # a copy in flight may read or write the slot (ingest, promotion)
            if self.disk is not None and key in self.disk:  # the common case (a decode step evicts one
                return self._evict_copy(self.cpu, key)  # per chunk it installs): nothing to move down
        holders = self._holders(key)
        below = [t for t in holders if TIER_NAMES.index(t) > TIER_NAMES.index(tier)]
        if tier == "disk":
            raise ConfigError("tier 'disk' is the bottom tier; use delete() to drop a chunk")
        t = self._tier(tier)
        if not below:
            lower = "cpu" if tier == "gpu" else "disk"
            if lower == "disk" and self.disk is None:
                raise CapacityError(
                    f"the cpu tier (budget {self.cpu.budget} bytes) is full and there is no disk tier to "
                    f"demote chunk {key} to; raise cpu_budget or set disk_path"
                )
            self._settle()  # a promotion may still be writing the gpu slot read here
            data = t.read(key)
            if lower == "cpu":
                self._put_memory(self.cpu, key, data)
            else:
                self._put_disk(key, data)
            self._moved[f"{tier}->{lower}"] += data.numel()
        return self._evict_copy(t, key)

    # --- public API ----------------------------------------------------------------------------------
    def put(self, key: ChunkKey, data: torch.Tensor, tier: str = "cpu", importance: float = 0.0) -> None:
        """Store a packed chunk (1-D uint8) in `tier`, replacing any earlier chunk under the same key."""
        if not isinstance(key, ChunkKey):
            raise ConfigError(f"key: expected a ChunkKey, got {type(key).__name__}")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 or data.numel() == 0:
            raise ConfigError(f"data: expected a non-empty 1-D uint8 tensor, got {getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}")
        with self._lock:
            self._tier(tier)
            if key in self._meta:
                self._drop(key)
            self._meta[key] = self._new_meta(data.numel(), importance, self._clock)
            try:
                self._place(key, data, tier, "ingest")
                if tier == "gpu":  # the gpu tier is a cache: the record goes to the cpu tier as well
                    self._place(key, data, "cpu", "gpu")
                    self._shadow(key)
                if tier != "disk" and self.disk is not None:
                    self._unwritten.add(key)
            except BaseException:
                self._drop(key)
                raise

    def put_many(self, keys: Sequence[ChunkKey], data: torch.Tensor, tier: str = "cpu", importance: float = 0.0) -> None:
        """Store chunks data[i] (a [N, nbytes] uint8 tensor, possibly on the GPU) under keys[i].

        Data on the GPU comes over in one copy rather than one per chunk.
        """
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2 or data.shape[0] != len(keys):
            raise ConfigError(f"data: expected a uint8 tensor [{len(keys)}, nbytes] for {len(keys)} keys, got "
                              f"{getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}")
        if tier == "cpu" and data.device.type == "cuda" and self.cpu.arena.pinned:
            self._put_many_async(keys, data, importance)
            return
        if tier != "gpu" and data.device.type != "cpu":
            data = data.to("cpu")
        with self._lock:
            for i, key in enumerate(keys):
                self.put(key, data[i], tier=tier, importance=importance)

    def _put_many_async(self, keys: Sequence[ChunkKey], data: torch.Tensor, importance: float) -> None:
        """Device-to-host copies straight into pinned cpu slots on a side stream; nothing waits here.

        Adjacent slots are filled by one copy. Until the copies finish, host readers settle first and
        device readers order themselves after them (wait_inflight). A batch larger than the room in the
        tier evicts its own first chunks to make room for its last ones: _settle issues the copies
        reserved so far before anything is evicted, so a chunk moved down to disk takes its own bytes
        there, never whatever its slot held before.
        """
        n = data.shape[1]
        with self._lock:
            for key in keys:
                if not isinstance(key, ChunkKey):
                    raise ConfigError(f"key: expected a ChunkKey, got {type(key).__name__}")
                if key in self._meta:
                    self._drop(key)
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=data.device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(data.device))
            self._ingest_pending = (data, [])
            try:
                for i, key in enumerate(keys):
                    self._meta[key] = self._new_meta(n, importance, self._clock)
                    view = self._reserve_memory(self.cpu, key, n)
                    self._ingest_pending[1].append((i, view))
                self._issue_ingest()
            except BaseException:
                for key in keys:
                    if key in self._meta:
                        self._drop(key)
                raise
            finally:
                self._ingest_pending = None
            self._moved["ingest->cpu"] += n * len(keys)
            if self.disk is not None:
                self._unwritten.update(keys)
            for key in keys:
                self._notify(key, "cpu")

    def write_back(self) -> int:
        """Queue a disk copy (written behind by the disk tier's worker) of every chunk put into the cpu
        tier since the last call that still has no copy on disk; returns how many were queued.

        A chunk with a disk copy leaves the cpu tier at the cost of a few dictionary updates; one without
        is written on the way out, by whatever evicts it, which during decode is a step installing the
        chunks it read from disk. Called at the end of a forward pass (the HF cache does), it moves the
        writes of a prefill's last chunks into the prefill, instead of into the first hundreds of decode
        steps. Blocks while the write queue is full. A disk budget too small for them stops it quietly:
        the rest are written on eviction as before (where a full disk raises).
        """
        with self._lock:
            if self.disk is None or not self._unwritten:
                return 0
            self._settle_cpu()  # the ingest copies into the slots are done before the bytes are read
            todo = sorted(self._unwritten, key=lambda k: (k.stream, k.layer, k.index))
            self._unwritten.clear()
            n = 0
            for key in todo:
                if key not in self._meta or key not in self.cpu or key in self.disk:
                    continue
                data = self.cpu.read(key)
                try:
                    self.disk.put(key, data)  # a copy of the slot's bytes is queued
                except CapacityError:
                    break
                self._moved["cpu->disk"] += data.numel()
                self._notify(key, "disk")
                n += 1
            return n

    def read(self, key: ChunkKey, tier: Optional[str] = None) -> torch.Tensor:
        """The chunk's bytes from the fastest tier holding it (or from `tier`).

        Memory tiers return a view that stays valid only until the store next changes; copy it to keep it.
        """
        with self._lock:
            m = self._require(key)
            self._settle()  # the view handed out must hold its chunk's bytes, on the host and the device
            holders = self._holders(key)
            order = [tier] if tier is not None else list(TIER_NAMES)
            for name in order:
                if name in holders:
                    self._hits[name] += 1
                    m.step = self._clock
                    self._stamp(m)
                    data = self._tier(name).read(key)
                    if name == "disk":
                        self._moved["disk->cpu"] += data.numel()
                    return data
                if name != "disk" or self.disk is not None:
                    self._misses[name] += 1
            raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier (it is in: {', '.join(holders)})")

    def preallocate(self) -> None:
        """Allocate (and page-lock) the cpu tier's whole budget now, so no request pays for it later."""
        with self._lock:
            self.cpu.arena.reserve_all()

    def add_copies(self, items: Sequence[Tuple[ChunkKey, torch.Tensor]], tier: str = "cpu",
                   min_prior: float = 0.0, protect: Collection[ChunkKey] = ()) -> int:
        """Give chunks that live below `tier` a copy there from bytes read elsewhere (a step's prefetches),
        with value-based admission.

        When they do not all fit, the tier's chunks and the newcomers are ranked together by the
        eviction order (decayed importance, then recency, then age) and the best are kept: residents
        below them are evicted, newcomers below them are not copied in (copying one by one would, with
        a batch larger than the tier, evict its own first newcomers). The tier's chunks come from its
        victim heap lowest first, so a batch costs in proportion to what it moves, not to the size of
        the tier (a decode step installs once per layer). Returns how many got a copy; chunks gone from
        the store or already in the tier are skipped, and so are chunks whose value before the step
        they were last touched in was below `min_prior`: with min_prior=0.5 (and importance decay 0.9) a
        chunk gets a copy when it is used again within about six steps, so chunks used once (a step's
        one-off choices, a prefetch that guessed wrong) cost no copy and evict nothing. Chunks in
        `protect` (a gather is about to read them from the tier) are kept whatever their rank.
        """
        with self._lock:
            t = self._tier(tier)
            meta = self._meta
            todo = [(k, d) for k, d in items if k in meta and k not in t and meta[k].prior >= min_prior]
            if not todo:
                return 0

            size = round_up  # in the arena's allocation units

            need = sum(size(d.numel()) for _, d in todo) - (t.budget - t.used_bytes)
            n = 0  # newcomers put
            if need > 0:
                # the tier's chunks and the newcomers in one eviction order: while room is short, the
                # lowest of the tier's lowest chunk (evicted) and the lowest newcomer (not copied in) goes
                rank = self._rank
                todo.sort(key=lambda e: rank(e[0]), reverse=True)  # best first: the lowest at the end
                protect = protect if isinstance(protect, (set, frozenset, dict)) else set(protect)
                held, resident, victims, taken, free = [], None, [], set(), False
                try:
                    while need > 0 and todo:
                        if resident is None:
                            # a cpu copy shadowed by a gpu copy goes first, whatever its rank: it serves
                            # no read while the gpu copy is there
                            resident = self._shadow_victim(protect) if t is self.cpu else None
                            free = resident is not None
                            if not free:
                                resident = self._lowest(t, protect, held)
                            if resident is not None and resident in taken:  # a second heap entry of one
                                resident = None
                                continue
                        k, d = todo[-1]
                        if resident is not None and (free or rank(resident) < rank(k)):
                            victims.append(resident)  # evicted below, once the newcomers are known
                            taken.add(resident)
                            need -= size(meta[resident].nbytes)
                            resident = None
                        else:
                            todo.pop()
                            need -= size(d.numel())
                finally:
                    if resident is not None and free:  # taken from _shadowed, not the heap: put back
                        self._shadowed[resident] = None
                        self._shadowed.move_to_end(resident, last=False)
                        resident = None
                    self._heap_return(t, held + ([resident] if resident is not None else []))
                try:
                    if (t is self.cpu and self.disk is not None) or (t is self.gpu and t.device.type == "cuda"):
                        n, todo, victims = self._hand_over(t, todo, victims)
                    while victims:
                        self._evict_from(victims[-1], tier)
                        victims.pop()
                finally:
                    self._heap_return(t, victims)  # victims left in the tier by an error part way
            if t is self.gpu and t.device.type == "cuda" and all(not d.is_cuda for _, d in todo):
                return n + self._put_gpu_batch(todo, protect)
            for k, d in todo:
                try:
                    self._put_memory(t, k, d, protect)
                except CapacityError:
                    break
                self._moved[f"disk->{tier}"] += d.numel()
                n += 1
            return n

    def _hand_over(self, t, todo, victims):
        """Newcomers of add_copies (host bytes) into the slots of victims of the same slot size whose
        copy in tier `t` is not their last (a disk copy below a cpu copy; a cpu or disk copy below a gpu
        copy): each pair is an eviction and a put without the allocator or the general paths (a decode
        step installs dozens of chunks a layer, each evicting one). Returns (how many were put, the
        newcomers left to put, the victims left to evict)."""
        meta, size, cpu, disk = self._meta, round_up, self.cpu, self.disk
        on_gpu = t is self.gpu
        pools: Dict[int, list] = {}
        rest_victims = []
        for v in victims:
            if (disk is not None and v in disk) or (on_gpu and v in cpu):
                pools.setdefault(size(meta[v].nbytes), []).append(v)
            else:  # its last copy: moved down by _evict_from
                rest_victims.append(v)
        if not pools:
            return 0, todo, victims
        if not on_gpu:  # the host rewrites the slots: copies in flight may read or write them, and gathers
            self._settle_cpu()
            self._fence_readers()
        rest, placed = [], []
        for k, d in todo:
            pool = None if d.is_cuda else pools.get(size(d.numel()))
            if not pool:
                rest.append((k, d))
                continue
            v = pool.pop()
            view = t.handover(v, k, d.numel())
            self._evictions[t.name] += 1
            self._notify(v, t.name)
            self._heap_add(t, k)
            if not on_gpu:
                _host_copy(view, d)
                self._notify(k, t.name)
            placed.append((k, d, view))
        if on_gpu:
            self._upload(placed)
        self._moved[f"disk->{t.name}"] += sum(d.numel() for _, d, _ in placed)
        for pool in pools.values():
            rest_victims.extend(pool)
        return len(placed), rest, rest_victims

    def _put_gpu_batch(self, items, protect) -> int:
        """Host bytes into gpu slots, as _put_memory would, but the host-to-device copies of the whole
        batch go on the promotion stream under one wait and one event (see _upload)."""
        t, placed = self.gpu, []
        for k, d in items:
            try:
                placed.append((k, d, self._reserve_memory(t, k, d.numel(), protect)))
            except CapacityError:
                break
        self._upload(placed)
        self._moved["disk->gpu"] += sum(d.numel() for _, d, _ in placed)
        return len(placed)

    def _upload(self, placed, from_cpu_slots: bool = False) -> None:
        """Copy host bytes into their gpu slots and announce them, placed = [(key, bytes, slot view)]: on
        CUDA the whole batch under one event (_copy_up); a gpu tier in host memory (no CUDA) gets its
        copies here, in this thread."""
        if not placed:
            return
        if self.gpu.device.type != "cuda":  # a gpu tier in host memory: copied here and now
            for _, d, view in placed:
                _host_copy(view, d)
        else:
            self._copy_up(placed, from_cpu_slots)
        for k, _, _ in placed:
            self._notify(k, "gpu")
            if k in self.cpu:
                self._shadow(k)

    def promote(self, key: ChunkKey, to: str = "gpu") -> None:
        """Copy a chunk up into `to` (gpu or cpu) from the nearest tier below that holds it."""
        with self._lock:
            self._require(key)
            if to not in ("gpu", "cpu"):
                raise ConfigError(f"promote: target tier must be 'gpu' or 'cpu', got {to!r}")
            holders = self._holders(key)
            if to in holders:
                self._hits[to] += 1
                return
            self._misses[to] += 1
            if to == "gpu" and "cpu" not in holders:
                self.promote(key, "cpu")
                holders = self._holders(key)
            src = next(t for t in TIER_NAMES if t in holders and TIER_NAMES.index(t) > TIER_NAMES.index(to))
            data = self._tier(src).read(key)
            self._place(key, data, to, src)
            if to == "gpu" and src == "cpu":
                self._shadow(key)
            self._meta[key].step = self._clock
            self._stamp(self._meta[key])

    def promote_many(self, keys: Sequence[ChunkKey], importance: Optional[Sequence[float]] = None) -> int:
        """Copy chunks of the cpu tier up into the gpu tier, as promote(key, "gpu") would each, making
        room by evicting the gpu tier's lowest chunks outside `keys`, until no more room can be made.
        `importance`: one value per key, touched first as touch([key], value) would, and the keys go
        up highest first. Chunks already in the gpu tier count as hits; chunks not in the cpu tier (or
        gone from the store) are skipped. The copies go through _upload: on CUDA, on the promotion stream
        under one event for each run of them into free room (an event per chunk cost more host time
        than a chunk's copy). Returns how many went up."""
        with self._lock:
            gpu, cpu, meta = self.gpu, self.cpu, self._meta
            if importance is not None:
                if len(importance) != len(keys):
                    raise ConfigError(f"promote_many: {len(keys)} keys but {len(importance)} importance values")
                for k, v in zip(keys, importance):
                    if k in meta:
                        self.touch([k], v)
                order = sorted(range(len(keys)), key=importance.__getitem__, reverse=True)
                keys = [keys[i] for i in order]
            todo = []
            for k in dict.fromkeys(keys):  # once each, in order
                if k not in meta or k not in cpu:
                    continue
                if k in gpu:
                    self._hits["gpu"] += 1
                else:
                    todo.append(k)
            protect = {k for k in keys if k in meta}
            placed, n = [], 0
            try:
                for k in todo:
                    nbytes = meta[k].nbytes
                    try:
                        view = gpu.reserve(k, nbytes)
                        if view is None:
                            # evictions next: the copies so far are queued (and noted in flight) before
                            # any of them can free a slot
                            self._upload(placed, from_cpu_slots=True)
                            placed = []
                            view = self._reserve_memory(gpu, k, nbytes, protect)
                        else:
                            self._heap_add(gpu, k)
                    except CapacityError:  # no room can be made (or the chunk exceeds the whole tier)
                        break
                    if k not in cpu:  # its cpu copy was evicted to make that room (a move down into it)
                        gpu.evict(k)  # the slot, never filled nor announced
                        continue
                    data = cpu.read(k)
                    self._misses["gpu"] += 1
                    self._moved["cpu->gpu"] += nbytes
                    m = meta[k]
                    m.step = self._clock
                    self._stamp(m)
                    n += 1
                    placed.append((k, data, view))
            finally:
                self._upload(placed, from_cpu_slots=True)
            return n

    def demote(self, key: ChunkKey, to: str = "disk") -> None:
        """Make `to` (cpu or disk) the chunk's highest tier: copy it down if needed, drop the copies above."""
        with self._lock:
            self._require(key)
            if to not in ("cpu", "disk"):
                raise ConfigError(f"demote: target tier must be 'cpu' or 'disk', got {to!r}")
            self._tier(to)
            self._settle()
            holders = self._holders(key)
            if to not in holders:
                src = holders[0]
                data = self._tier(src).read(key)
                self._place(key, data, to, src)
            for name in ("gpu", "cpu"):
                if TIER_NAMES.index(name) < TIER_NAMES.index(to) and key in self._tier(name):
                    self._evict_copy(self._tier(name), key)

    def evict(self, key: ChunkKey, tier: str) -> None:
        """Drop the chunk's copy in a memory tier (moving it down first if that copy is its last)."""
        with self._lock:
            self._require(key)
            if key not in self._tier(tier):
                raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier")
            self._evict_from(key, tier)

    def _drop(self, key: ChunkKey) -> None:
        self._settle()
        if key in self.cpu:
            self._fence_readers()
        for name in ("gpu", "cpu"):
            t = self._tier(name)
            if key in t:
                t.evict(key)
                self._notify(key, name)
        if self.disk is not None and key in self.disk:
            self.disk.delete(key)
            self._notify(key, "disk")
        self._meta.pop(key, None)

    def delete(self, key: ChunkKey) -> None:
        """Remove a chunk from every tier."""
        with self._lock:
            self._require(key)
            self._drop(key)

    def touch(self, keys: Iterable[ChunkKey], importance: float = 1.0) -> None:
        """Record that chunks were used this step with the given importance (added to their decayed value).
        (_value and _stamp written out: a decode step touches every chunk it chose.)"""
        with self._lock:
            clock, meta, add = self._clock, self._meta, float(importance)
            d = self.config.importance_decay
            now = clock * math.log(d)  # _stamp's step * log(d), for step = clock
            log, lowest = math.log, -math.inf
            for key in keys:
                m = meta.get(key)
                if m is None:
                    self._require(key)
                age = clock - m.step
                value = m.importance * d ** age if age else m.importance
                if m.last_touch != clock:
                    m.prior, m.last_touch = value, clock
                m.importance = imp = value + add
                m.step = clock
                m.rank = (log(imp) - now if imp > 0 else lowest, clock, m.order)

    def tick(self, steps: int = 1) -> int:
        """Advance the store's clock (one decode step): importance decays per tick."""
        with self._lock:
            self._clock += steps
            return self._clock

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self._stall += seconds

    # --- inspection ---------------------------------------------------------------------------------
    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def keys(self) -> List[ChunkKey]:
        with self._lock:
            return list(self._meta)

    def residency(self, key: ChunkKey) -> Tuple[str, ...]:
        with self._lock:
            self._require(key)
            return tuple(self._holders(key))

    def location(self, key: ChunkKey, tier: str) -> Tuple[int, int]:
        """(source index, byte offset) of a chunk in a memory tier: coordinates for the gather kernel."""
        with self._lock:
            t = self._tier(tier)
            if key not in t:
                raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier")
            return t.location(key)

    def add_listener(self, fn: Callable[[ChunkKey, str], None]) -> None:
        """fn(key, tier) is called whenever a copy of a chunk enters or leaves a tier."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _sync_sources(self) -> None:
        for tier in (self.gpu, self.cpu):
            for i, seg in enumerate(tier.sources):
                if (tier.name, i) not in self._source_index:
                    self._source_index[(tier.name, i)] = len(self._sources)
                    self._sources.append(seg)

    def sources(self) -> List[torch.Tensor]:
        """Every memory segment of the gpu and cpu tiers, in a stable order: the gather kernel's sources.

        The list only ever grows (segments are never freed), so callers may keep it while its length
        equals n_sources().
        """
        with self._lock:
            self._sync_sources()
            return list(self._sources)

    def n_sources(self) -> int:
        return len(self.gpu.sources) + len(self.cpu.sources)

    def best_locations(self, keys: Sequence[ChunkKey]) -> List[Tuple[Optional[Tuple[int, int]], Optional[str]]]:
        """Per key, ((index into sources(), byte offset), tier) of its copy in the fastest memory tier
        holding one (gpu, then cpu), or (None, None): source_location for many keys under one lock."""
        with self._lock:
            self._sync_sources()
            index, out = self._source_index, []
            for key in keys:
                for name, t in (("gpu", self.gpu), ("cpu", self.cpu)):
                    if key in t:
                        seg, off = t.location(key)
                        out.append(((index[(name, seg)], off), name))
                        break
                else:
                    out.append((None, None))
            return out

    def source_location(self, key: ChunkKey, tier: str) -> Optional[Tuple[int, int]]:
        """(index into sources(), byte offset) of the chunk's copy in a memory tier, or None if it has none."""
        with self._lock:
            t = self._tier(tier)
            if key not in t:
                return None
            self._sync_sources()
            seg, off = t.location(key)
            return self._source_index[(tier, seg)], off

    def value(self, key: ChunkKey) -> float:
        with self._lock:
            return self._value(self._require(key))

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = [("gpu", self.gpu), ("cpu", self.cpu)] + ([("disk", self.disk)] if self.disk is not None else [])
            return StoreStats(
                bytes_moved=dict(self._moved),
                hits=dict(self._hits),
                misses=dict(self._misses),
                evictions=dict(self._evictions),
                resident_chunks={n: len(list(t.keys())) for n, t in tiers},
                used_bytes={n: t.used_bytes for n, t in tiers},
                budget_bytes={n: t.budget for n, t in tiers},
                stall_seconds=self._stall,
                chunks=len(self._meta),
            )

    def flush(self) -> None:
        """Wait until every chunk written behind to disk is durable."""
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

