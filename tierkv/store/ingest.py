"""Chunks arriving from the model: puts (one chunk, or a batch copied off the device asynchronously) and
the write-back that gives every chunk put into the cpu tier its disk copy ahead of its eviction."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import CapacityError, ConfigError
from ..keys import ChunkKey
from .copies import CopyEngine
from .eviction import EvictionPolicy
from .residency import Residency
from .stats import Counters


class Ingest:
    """put, put_many's asynchronous path and write_back. Not thread-safe: the store calls it under its lock."""

    def __init__(self, residency: Residency, policy: EvictionPolicy, copies: CopyEngine, counters: Counters) -> None:
        self._res = residency
        self._policy = policy
        self._copies = copies
        self._counts = counters
        # chunks put into the cpu tier with no disk copy yet (only where there is a disk tier): write_back
        # gives them one, so that evicting them later costs no write on the path that evicts
        self._unwritten: set = set()

    @property
    def unwritten(self) -> int:
        """How many chunks wait for write_back (read without the lock: a hint for a fast path)."""
        return len(self._unwritten)

    def put(self, key: ChunkKey, data: torch.Tensor, tier: str, importance: float) -> None:
        """See ChunkStore.put (arguments checked there)."""
        res = self._res
        res.tier(tier)
        if key in self._policy:
            res.drop(key)
        self._policy.admit(key, data.numel(), importance)
        try:
            res.place(key, data, tier, "ingest")
            if tier == "gpu":  # the gpu tier is a cache: the record goes to the cpu tier as well
                res.place(key, data, "cpu", "gpu")
                self._policy.shadow(key)
            if tier != "disk" and res.disk is not None:
                self._unwritten.add(key)
        except BaseException:
            res.drop(key)
            raise

    def put_many_async(self, keys: Sequence[ChunkKey], data: torch.Tensor, importance: float) -> None:
        """Device-to-host copies straight into pinned cpu slots on a side stream; nothing waits here.

        Adjacent slots are filled by one copy. Until the copies finish, host readers settle first and
        device readers order themselves after them (wait_inflight). A batch larger than the room in the
        tier evicts its own first chunks to make room for its last ones: settling issues the copies
        reserved so far before anything is evicted, so a chunk moved down to disk takes its own bytes
        there, never whatever its slot held before.
        """
        res, n = self._res, data.shape[1]
        for key in keys:
            if not isinstance(key, ChunkKey):
                raise ConfigError(f"key: expected a ChunkKey, got {type(key).__name__}")
            if key in self._policy:
                res.drop(key)
        self._copies.begin_ingest(data)
        try:
            for i, key in enumerate(keys):
                self._policy.admit(key, n, importance)
                view = res.reserve_memory(res.cpu, key, n)
                self._copies.stage_ingest(i, view)
            self._copies.issue_ingest()
        except BaseException:
            for key in keys:
                if key in self._policy:
                    res.drop(key)
            raise
        finally:
            self._copies.end_ingest()
        self._counts.moved["ingest->cpu"] += n * len(keys)
        if res.disk is not None:
            self._unwritten.update(keys)
        for key in keys:
            res.notify(key, "cpu")

    def write_back(self) -> int:
        """See ChunkStore.write_back."""
        res, disk = self._res, self._res.disk
        if disk is None or not self._unwritten:
            return 0
        self._copies.settle_cpu()  # the ingest copies into the slots are done before the bytes are read
        todo = sorted(self._unwritten, key=lambda k: (k.stream, k.layer, k.index))
        self._unwritten.clear()
        n = 0
        for key in todo:
            if key not in self._policy or key not in res.cpu or key in disk:
                continue
            data = res.cpu.read(key)
            try:
                disk.put(key, data)  # a copy of the slot's bytes is queued
            except CapacityError:
                break
            self._counts.moved["cpu->disk"] += data.numel()
            res.notify(key, "disk")
            n += 1
        return n
