"""Chunks moving up or down the tiers by request: promote one, promote a batch into the gpu tier (best
first, never evicting its own batch), demote one."""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import CapacityError, ConfigError
from ..keys import ChunkKey
from ..tiers import TIER_NAMES
from .copies import CopyEngine
from .eviction import EvictionPolicy
from .residency import Residency
from .stats import Counters


class Promotion:
    """promote, promote_many and demote. Not thread-safe: the store calls it under its lock."""

    def __init__(self, residency: Residency, policy: EvictionPolicy, copies: CopyEngine, counters: Counters) -> None:
        self._res = residency
        self._policy = policy
        self._copies = copies
        self._counts = counters

    def promote(self, key: ChunkKey, to: str) -> None:
        """See ChunkStore.promote."""
        res = self._res
        self._policy.require(key)
        if to not in ("gpu", "cpu"):
            raise ConfigError(f"promote: target tier must be 'gpu' or 'cpu', got {to!r}")
        holders = res.holders(key)
        if to in holders:
            self._counts.hits[to] += 1
            return
        self._counts.misses[to] += 1
        if to == "gpu" and "cpu" not in holders:
            self.promote(key, "cpu")
            holders = res.holders(key)
        src = next(t for t in TIER_NAMES if t in holders and TIER_NAMES.index(t) > TIER_NAMES.index(to))
        data = res.tier(src).read(key)
        res.place(key, data, to, src)
        if to == "gpu" and src == "cpu":
            self._policy.shadow(key)
        self._policy.used(self._policy.records[key])

    def promote_many(self, keys: Sequence[ChunkKey], importance: Optional[Sequence[float]]) -> int:
        """See ChunkStore.promote_many. The copies go through Residency.upload, each run of them into free
        room queued before any eviction can free a slot."""
        if importance is not None:
            keys = self._touch_and_order(keys, importance)
        res, meta = self._res, self._policy.records
        gpu, cpu = res.gpu, res.cpu
        todo = []
        for k in dict.fromkeys(keys):  # once each, in order
            if k not in meta or k not in cpu:
                continue
            if k in gpu:
                self._counts.hits["gpu"] += 1
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
                        # evictions next: the copies so far are queued (and noted in flight) before any
                        # of them can free a slot
                        res.upload(placed, from_cpu_slots=True)
                        placed = []
                        view = res.reserve_memory(gpu, k, nbytes, protect)
                    else:
                        self._policy.entered(gpu, k)
                except CapacityError:  # no room can be made (or the chunk exceeds the whole tier)
                    break
                if k not in cpu:  # its cpu copy was evicted to make that room (a move down into it)
                    gpu.evict(k)  # the slot, never filled nor announced
                    continue
                data = cpu.read(k)
                self._counts.misses["gpu"] += 1
                self._counts.moved["cpu->gpu"] += nbytes
                self._policy.used(meta[k])
                n += 1
                placed.append((k, data, view))
        finally:
            res.upload(placed, from_cpu_slots=True)
        return n

    def _touch_and_order(self, keys: Sequence[ChunkKey], importance: Sequence[float]) -> list:
        """Touch each key with its importance (as touch([key], value) would); the keys, highest first."""
        if len(importance) != len(keys):
            raise ConfigError(f"promote_many: {len(keys)} keys but {len(importance)} importance values")
        for k, v in zip(keys, importance):
            if k in self._policy:
                self._policy.touch([k], v)
        order = sorted(range(len(keys)), key=importance.__getitem__, reverse=True)
        return [keys[i] for i in order]

    def demote(self, key: ChunkKey, to: str) -> None:
        """See ChunkStore.demote."""
        res = self._res
        self._policy.require(key)
        if to not in ("cpu", "disk"):
            raise ConfigError(f"demote: target tier must be 'cpu' or 'disk', got {to!r}")
        res.tier(to)
        self._copies.settle()
        holders = res.holders(key)
        if to not in holders:
            src = holders[0]
            data = res.tier(src).read(key)
            res.place(key, data, to, src)
        for name in ("gpu", "cpu"):
            if TIER_NAMES.index(name) < TIER_NAMES.index(to) and key in res.tier(name):
                res.evict_copy(res.tier(name), key)
