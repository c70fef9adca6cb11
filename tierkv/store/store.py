"""ChunkStore: the residency map of every chunk across the gpu, cpu and disk tiers, and its statistics.

The store is the one owner of residency. Tiers only hold bytes; the store decides where a chunk goes
and what leaves a tier when it is full. Every chunk always has a copy in the cpu or the disk tier (its
record); the gpu tier is a cache on top. A tier makes room by evicting its least valuable chunks
(eviction.py), moving a chunk down first when the copy evicted is its last above disk (residency.py),
so nothing is lost; only when the bottom of the hierarchy is full does a put fail with CapacityError.
Asynchronous copies are the copy engine's (copies.py); admission of chunks read from below into a
memory tier is admission.py's.
"""

from __future__ import annotations

import threading
from typing import Callable, Collection, List, Optional, Sequence, Tuple

import torch

from ..config import TierConfig
from ..errors import ChunkNotFoundError, ConfigError
from ..keys import ChunkKey
from ..tiers import TIER_NAMES, CpuTier, GpuTier
from .admission import Admission
from .copies import CopyEngine
from .eviction import EvictionPolicy
from .ingest import Ingest
from .promotion import Promotion
from .residency import Residency
from .sources import SourceMap
from .stats import Counters, StoreStats


class ChunkStore:
    """Residency map and placement across tiers. Thread-safe: every public method holds one lock.

    Attributes: config; gpu, cpu (memory tiers); disk (a ColdTier, or None); eviction (the policy:
    chunk values, victim order).
    """

    def __init__(self, config: TierConfig, device=None, disk=None) -> None:
        if not isinstance(config, TierConfig):
            raise ConfigError(f"config: expected a TierConfig, got {type(config).__name__}")
        self.config = config
        self.gpu = GpuTier(config.gpu_budget, device)
        # a few large pinned segments rather than many: every gather passes the whole list of sources
        self.cpu = CpuTier(config.cpu_budget, pinned=self.gpu.device.type == "cuda",
                           segment_bytes=max(256 << 20, config.cpu_budget // 8))
        if disk is None and config.disk_path is not None:
            from ..tiers.disk import DiskTier  # zarr and lz4 load only when a disk tier is asked for

            disk = DiskTier(config.disk_path, budget=config.disk_budget, queue_depth=config.write_queue)
        self.disk = disk
        self._lock = threading.RLock()
        self._counts = Counters()
        self.eviction = EvictionPolicy(config.importance_decay, self.gpu, self.cpu, disk)
        self._copies = CopyEngine(self._lock, self.gpu.device, self.cpu.arena.pinned)
        self._res = Residency(self.gpu, self.cpu, disk, self.eviction, self._copies, self._counts)
        self._admission = Admission(self._res, self.eviction, self._copies, self._counts)
        self._promotion = Promotion(self._res, self.eviction, self._copies, self._counts)
        self._ingest = Ingest(self._res, self.eviction, self._copies, self._counts)
        self._sources = SourceMap(self.gpu, self.cpu)
        if self.disk is not None:  # a reopened disk tier brings its chunks with it
            for key in self.disk.keys():
                self.eviction.admit(key, self.disk.nbytes(key), 0.0)

    # --- putting chunks ------------------------------------------------------------------------------
    def put(self, key: ChunkKey, data: torch.Tensor, tier: str = "cpu", importance: float = 0.0) -> None:
        """Store a packed chunk (1-D uint8) in `tier`, replacing any earlier chunk under the same key."""
        if not isinstance(key, ChunkKey):
            raise ConfigError(f"key: expected a ChunkKey, got {type(key).__name__}")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 or data.numel() == 0:
            raise ConfigError(f"data: expected a non-empty 1-D uint8 tensor, got {getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}")
        with self._lock:
            self._ingest.put(key, data, tier, importance)

    def put_many(self, keys: Sequence[ChunkKey], data: torch.Tensor, tier: str = "cpu", importance: float = 0.0) -> None:
        """Store chunks data[i] (a [N, nbytes] uint8 tensor, possibly on the GPU) under keys[i].

        Data on the GPU comes over in one copy rather than one per chunk: into a pinned cpu tier, by
        device-to-host copies straight into the slots on a side stream that nothing waits for here.
        """
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2 or data.shape[0] != len(keys):
            raise ConfigError(f"data: expected a uint8 tensor [{len(keys)}, nbytes] for {len(keys)} keys, got "
                              f"{getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}")
        if tier == "cpu" and data.device.type == "cuda" and self.cpu.arena.pinned:
            with self._lock:
                self._ingest.put_many_async(keys, data, importance)
            return
        if tier != "gpu" and data.device.type != "cpu":
            data = data.to("cpu")
        with self._lock:
            for i, key in enumerate(keys):
                self.put(key, data[i], tier=tier, importance=importance)

    def write_back(self) -> int:
        """Queue a disk copy (written behind by the disk tier's worker) of every chunk put into the cpu
        tier since the last call that still has no copy on disk; returns how many were queued. Returns
        0 at once, without the lock, when there is none: callers may call it after every pass.

        A chunk with a disk copy leaves the cpu tier at the cost of a few dictionary updates; one without
        is written on the way out, by whatever evicts it, which during decode is a step installing the
        chunks it read from disk. Called at the end of a forward pass (the HF cache does), it moves the
        writes of a prefill's last chunks into the prefill, instead of into the first hundreds of decode
        steps. Blocks while the write queue is full. A disk budget too small for them stops it quietly:
        the rest are written on eviction as before (where a full disk raises).
        """
        if self.disk is None or not self._ingest.unwritten:
            return 0
        with self._lock:
            return self._ingest.write_back()

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
            return self._admission.add_copies(items, tier, min_prior, protect)

    def preallocate(self) -> None:
        """Allocate (and page-lock) the cpu tier's whole budget now, so no request pays for it later."""
        with self._lock:
            self.cpu.arena.reserve_all()

    # --- moving chunks -------------------------------------------------------------------------------
    def read(self, key: ChunkKey, tier: Optional[str] = None) -> torch.Tensor:
        """The chunk's bytes from the fastest tier holding it (or from `tier`).

        Memory tiers return a view that stays valid only until the store next changes; copy it to keep it.
        """
        with self._lock:
            m = self.eviction.require(key)
            self._copies.settle()  # the view handed out must hold its chunk's bytes, on the host and the device
            holders = self._res.holders(key)
            order = [tier] if tier is not None else list(TIER_NAMES)
            for name in order:
                if name in holders:
                    self._counts.hits[name] += 1
                    self.eviction.used(m)
                    data = self._res.tier(name).read(key)
                    if name == "disk":
                        self._counts.moved["disk->cpu"] += data.numel()
                    return data
                if name != "disk" or self.disk is not None:
                    self._counts.misses[name] += 1
            raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier (it is in: {', '.join(holders)})")

    def promote(self, key: ChunkKey, to: str = "gpu") -> None:
        """Copy a chunk up into `to` (gpu or cpu) from the nearest tier below that holds it."""
        with self._lock:
            self._promotion.promote(key, to)

    def promote_many(self, keys: Sequence[ChunkKey], importance: Optional[Sequence[float]] = None) -> int:
        """Copy chunks of the cpu tier up into the gpu tier, as promote(key, "gpu") would each, making
        room by evicting the gpu tier's lowest chunks outside `keys`, until no more room can be made.
        `importance`: one value per key, touched first as touch([key], value) would, and the keys go
        up highest first. Chunks already in the gpu tier count as hits; chunks not in the cpu tier (or
        gone from the store) are skipped. On CUDA the copies go on the promotion stream under one event
        for each run of them into free room (an event per chunk cost more host time than a chunk's
        copy). Returns how many went up."""
        with self._lock:
            return self._promotion.promote_many(keys, importance)

    def demote(self, key: ChunkKey, to: str = "disk") -> None:
        """Make `to` (cpu or disk) the chunk's highest tier: copy it down if needed, drop the copies above."""
        with self._lock:
            self._promotion.demote(key, to)

    def evict(self, key: ChunkKey, tier: str) -> None:
        """Drop the chunk's copy in a memory tier (moving it down first if that copy is its last)."""
        with self._lock:
            self.eviction.require(key)
            if key not in self._res.tier(tier):
                raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier")
            self._res.evict_from(key, tier)

    def delete(self, key: ChunkKey) -> None:
        """Remove a chunk from every tier."""
        with self._lock:
            self.eviction.require(key)
            self._res.drop(key)

    # --- value ---------------------------------------------------------------------------------------
    def touch(self, keys, importance: float = 1.0) -> None:
        """Record that chunks were used this step with the given importance (added to their decayed value)."""
        with self._lock:
            self.eviction.touch(keys, importance)

    def tick(self, steps: int = 1) -> int:
        """Advance the store's clock (one decode step): importance decays per tick."""
        with self._lock:
            return self.eviction.tick(steps)

    def value(self, key: ChunkKey) -> float:
        with self._lock:
            return self.eviction.value(key)

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self._counts.stall += seconds

    # --- copies in flight ----------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait for every asynchronous copy into or out of a tier's slots (and release what they kept
        alive). Returns at once, without the lock, when none is in flight: callers may call it after
        every pass."""
        if self._copies.idle:
            return
        with self._lock:
            self._copies.settle()

    def settle_uploads(self) -> None:
        """Wait for the uploads into gpu slots (and release the host bytes they read)."""
        with self._lock:
            self._copies.settle_uploads()

    def wait_inflight(self, stream) -> None:
        """Order `stream` (a CUDA stream about to read the cpu or gpu tier) after the copies in flight."""
        self._copies.wait_inflight(stream)

    def note_readers(self, stream) -> None:
        """Record that kernels queued on `stream` so far may read cpu slots (a gather through unified
        addressing): no cpu slot is freed, and so rewritten by the host, before they are done."""
        self._copies.note_readers(stream)

    # --- inspection ----------------------------------------------------------------------------------
    def __contains__(self, key: ChunkKey) -> bool:
        return key in self.eviction

    def __len__(self) -> int:
        return len(self.eviction)

    def keys(self) -> List[ChunkKey]:
        with self._lock:
            return list(self.eviction.records)

    def residency(self, key: ChunkKey) -> Tuple[str, ...]:
        with self._lock:
            self.eviction.require(key)
            return tuple(self._res.holders(key))

    def location(self, key: ChunkKey, tier: str) -> Tuple[int, int]:
        """(source index, byte offset) of a chunk in a memory tier: coordinates for the gather kernel."""
        with self._lock:
            t = self._res.tier(tier)
            if key not in t:
                raise ChunkNotFoundError(f"chunk {key} is not in the {tier} tier")
            return t.location(key)

    def add_listener(self, fn: Callable[[ChunkKey, str], None]) -> None:
        """fn(key, tier) is called whenever a copy of a chunk enters or leaves a tier."""
        with self._lock:
            self._res.add_listener(fn)

    def remove_listener(self, fn) -> None:
        with self._lock:
            self._res.remove_listener(fn)

    def sources(self) -> List[torch.Tensor]:
        """Every memory segment of the gpu and cpu tiers, in a stable order: the gather kernel's sources.

        The list only ever grows (segments are never freed), so callers may keep it while its length
        equals n_sources().
        """
        with self._lock:
            return self._sources.sources()

    def n_sources(self) -> int:
        return len(self._sources)

    def best_locations(self, keys: Sequence[ChunkKey]) -> List[Tuple[Optional[Tuple[int, int]], Optional[str]]]:
        """Per key, ((index into sources(), byte offset), tier) of its copy in the fastest memory tier
        holding one (gpu, then cpu), or (None, None): source_location for many keys under one lock."""
        with self._lock:
            return self._sources.best_locations(keys)

    def source_location(self, key: ChunkKey, tier: str) -> Optional[Tuple[int, int]]:
        """(index into sources(), byte offset) of the chunk's copy in a memory tier, or None if it has none."""
        with self._lock:
            return self._sources.source_location(key, tier, self._res.tier(tier))

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = [("gpu", self.gpu), ("cpu", self.cpu)] + ([("disk", self.disk)] if self.disk is not None else [])
            return self._counts.snapshot(tiers, len(self.eviction))

    # --- the end -------------------------------------------------------------------------------------
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
