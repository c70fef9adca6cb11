"""How a chunk's copies move between tiers: the mechanics under the store's public API.

Every chunk always has a copy in the cpu or the disk tier (its record); the gpu tier is a cache on
top. A memory tier makes room by evicting what the eviction policy names; an evicted copy that is the
last one above disk moves down first (gpu -> cpu -> disk), so nothing is lost; only when the bottom of
the hierarchy is full does a put fail with CapacityError. Every copy entering or leaving a tier is
announced to the listeners.
"""

from __future__ import annotations

from typing import Callable, Collection, List

import torch

from ..errors import CapacityError, ConfigError
from ..keys import ChunkKey
from ..tiers import TIER_NAMES
from .copies import CopyEngine, Placed
from .eviction import EvictionPolicy
from .stats import Counters


class Residency:
    """Placement of copies across the tiers. Not thread-safe: the store calls it under its lock.

    gpu, cpu: the memory tiers; disk: a ColdTier or None. The policy picks victims and keeps the
    chunks' records; the copy engine does (and waits for) every copy into or out of a slot.
    """

    def __init__(self, gpu, cpu, disk, policy: EvictionPolicy, copies: CopyEngine, counters: Counters) -> None:
        self.gpu, self.cpu, self.disk = gpu, cpu, disk
        self._policy = policy
        self._copies = copies
        self._counts = counters
        self._listeners: List[Callable[[ChunkKey, str], None]] = []

    # --- names and holders -----------------------------------------------------------------------
    def tier(self, name: str):
        if name == "gpu":
            return self.gpu
        if name == "cpu":
            return self.cpu
        if name == "disk":
            if self.disk is None:
                raise ConfigError("tier 'disk': this store has no disk tier (TierConfig.disk_path is None)")
            return self.disk
        raise ConfigError(f"tier: expected one of {', '.join(TIER_NAMES)}, got {name!r}")

    def holders(self, key: ChunkKey) -> List[str]:
        out = [n for n, t in (("gpu", self.gpu), ("cpu", self.cpu)) if key in t]
        if self.disk is not None and key in self.disk:
            out.append("disk")
        return out

    # --- listeners -------------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[ChunkKey, str], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def notify(self, key: ChunkKey, tier: str) -> None:
        for fn in self._listeners:
            fn(key, tier)

    # --- putting copies ----------------------------------------------------------------------------
    def reserve_memory(self, tier, key: ChunkKey, nbytes: int, protect: Collection[ChunkKey] = ()) -> torch.Tensor:
        """A slot of nbytes for `key` in a memory tier, evicting (never `protect`) until it fits."""
        while True:
            view = tier.reserve(key, nbytes)
            if view is not None:
                if key in self._policy:
                    self._policy.entered(tier, key)
                return view
            guard = {key, *protect}
            if not any(k not in guard for k in tier.keys()):
                raise CapacityError(
                    f"the {tier.name} tier (budget {tier.budget} bytes, {tier.used_bytes} used) has no room for "
                    f"chunk {key} of {nbytes} bytes even after eviction"
                    + (" (the rest are held for a gather about to read them)" if protect else "")
                )
            name = tier.name
            self._policy.evict_for(tier, nbytes, guard, lambda victim: self.evict_from(victim, name))

    def put_memory(self, tier, key: ChunkKey, data: torch.Tensor, protect: Collection[ChunkKey] = ()) -> None:
        view = self.reserve_memory(tier, key, data.numel(), protect)
        self._copies.write(view, data, into_gpu=tier is self.gpu)
        self.notify(key, tier.name)

    def put_disk(self, key: ChunkKey, data: torch.Tensor) -> None:
        self.tier("disk").put(key, data.cpu() if data.device.type != "cpu" else data)
        self.notify(key, "disk")

    def place(self, key: ChunkKey, data: torch.Tensor, tier: str, src: str) -> None:
        if tier == "disk":
            self.put_disk(key, data)
        else:
            self.put_memory(self.tier(tier), key, data)
        self._counts.moved[f"{src}->{tier}"] += data.numel()

    def upload(self, placed: Placed, from_cpu_slots: bool = False) -> None:
        """Host bytes into their gpu slots (the copy engine's upload), placed = [(key, bytes, slot view)],
        and announce them."""
        if not placed:
            return
        self._copies.upload(placed, from_cpu_slots)
        for k, _, _ in placed:
            self.notify(k, "gpu")
            if k in self.cpu:
                self._policy.shadow(k)

    # --- dropping copies ---------------------------------------------------------------------------
    def evict_copy(self, tier, key: ChunkKey) -> int:
        if tier is self.cpu:  # a copy or a gather still in flight may read this slot
            self._copies.settle_cpu()
            self._copies.fence_readers()
        n = tier.evict(key)
        self._counts.evictions[tier.name] += 1
        self.notify(key, tier.name)
        return n

    def evict_from(self, key: ChunkKey, tier: str) -> int:
        """Drop a chunk's copy from `tier`, moving it down first when that copy is the last one above disk."""
        if tier == "cpu":
            self._copies.settle_cpu()  # a copy in flight may read or write the slot (ingest, promotion)
            if self.disk is not None and key in self.disk:  # the common case (a decode step evicts one
                return self.evict_copy(self.cpu, key)  # per chunk it installs): nothing to move down
        holders = self.holders(key)
        below = [t for t in holders if TIER_NAMES.index(t) > TIER_NAMES.index(tier)]
        if tier == "disk":
            raise ConfigError("tier 'disk' is the bottom tier; use delete() to drop a chunk")
        t = self.tier(tier)
        if not below:
            self._move_down(key, t)
        return self.evict_copy(t, key)

    def _move_down(self, key: ChunkKey, t) -> None:
        """Copy the last copy above disk of a chunk, in memory tier t, into the tier below it."""
        lower = "cpu" if t is self.gpu else "disk"
        if lower == "disk" and self.disk is None:
            raise CapacityError(
                f"the cpu tier (budget {self.cpu.budget} bytes) is full and there is no disk tier to "
                f"demote chunk {key} to; raise cpu_budget or set disk_path"
            )
        self._copies.settle()  # a promotion may still be writing the gpu slot read here
        data = t.read(key)
        if lower == "cpu":
            self.put_memory(self.cpu, key, data)
        else:
            self.put_disk(key, data)
        self._counts.moved[f"{t.name}->{lower}"] += data.numel()

    def drop(self, key: ChunkKey) -> None:
        """Remove every copy of a chunk and its record."""
        self._copies.settle()
        if key in self.cpu:
            self._copies.fence_readers()
        for name in ("gpu", "cpu"):
            t = self.tier(name)
            if key in t:
                t.evict(key)
                self.notify(key, name)
        if self.disk is not None and key in self.disk:
            self.disk.delete(key)
            self.notify(key, "disk")
        self._policy.forget(key)
