"""Chunks read from disk, on their way into the memory tiers.

A chunk a step read from disk is offered a copy in the cpu tier (and, with `gpu`, the gpu tier), ranked
with the tier's chunks by value (store.add_copies): one that is worth less than the tier's least
valuable chunks is not copied. The admission gate sets the value a chunk needs first: while choices
do not persist, only chunks chosen again within a few steps are worth a copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .policies import PipelineTuning, admission_for
from .timers import HostTimers


class Installs:
    """Offers chunks read from disk to the memory tiers. `admission`: the AdmissionGate; `gpu`: offer
    them to the gpu tier too (PipelineTuning.gpu_installs)."""

    def __init__(self, store, timers: Optional[HostTimers] = None, tuning: Optional[PipelineTuning] = None) -> None:
        tuning = tuning or PipelineTuning()
        self.store = store
        self.timers = timers or HostTimers()
        self.admission = admission_for(tuning)
        self.gpu = tuning.gpu_installs
        self._direct: Dict[int, list] = {}  # per layer, (key, bytes) read outside staging, not yet offered

    def add(self, items) -> None:
        """Chunks (key, bytes) a layer read from disk outside staging, for install() to offer to the memory
        tiers later: while a later layer waits for its own reads, or before this layer next places."""
        for key, data in items:
            self._direct.setdefault(key.layer, []).append((key, data))

    def pending(self) -> List:
        """Keys of the chunks add() holds, not offered to the memory tiers yet."""
        return [k for entries in self._direct.values() for k, _ in entries]

    def install(self, protect=(), layer: Optional[int] = None) -> None:
        """Offer the chunks add() holds (only `layer`'s, when given) a copy in the memory tiers; the
        chunks in `protect` are not evicted for them.

        Done while a layer's disk reads are in flight (the host work overlaps the disk), or at the latest
        when their own layer places next: a layer's addresses are always computed after its chunks read
        before were offered, so a chunk read once is not read from disk again for want of a copy.
        Evicting waits for the kernels that may read the evicted slots (the store fences its readers).
        """
        if not self._direct or (layer is not None and layer not in self._direct):
            return
        with self.timers.part("install"):
            if layer is None:
                todo = [e for entries in self._direct.values() for e in entries]
                self._direct = {}
            else:
                todo = self._direct.pop(layer)
            self.offer(list(dict(todo).items()), protect)  # a key read twice is offered once

    def offer(self, items, protect=()) -> None:
        """Chunks read from disk (key, host bytes) into the memory tiers, ranked by value in each: the cpu
        tier, and with `gpu` the gpu tier too (chunks it keeps are not read from disk again, and gathers
        read them from device memory). Chunks in `protect` are not evicted from either."""
        store, prior = self.store, self.admission.min_prior
        store.add_copies(items, "cpu", min_prior=prior, protect=protect)
        if self.gpu and store.gpu.budget > 0:
            store.add_copies(items, "gpu", min_prior=prior, protect=protect)

    def clear(self) -> None:
        self._direct = {}
