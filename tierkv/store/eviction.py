"""The eviction policy: which chunk a memory tier gives up when it needs room.

A chunk's value is importance * decay ** (steps since last use): touched chunks gain, idle ones fade.
A tier evicts lowest value first, then least recently used, then oldest. A cpu copy shadowed by a gpu
copy of the same chunk (with a disk copy below it) goes before any ranked victim: gathers read the gpu
copy, so the cpu copy serves nothing.

The policy holds a record per chunk of the store (its size and value) and knows the tiers only as
containers of keys (`key in tier`, `len(tier)`, `tier.keys()`, `tier.name`, `tier.budget`), so tests
drive it with plain sets and no store.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterable, List, Optional, Tuple

from ..errors import ChunkNotFoundError
from ..keys import ChunkKey


@dataclass(frozen=True)
class EvictionTuning:
    """Bounds on the policy's bookkeeping; none of them changes which chunk is evicted, only how often
    work is batched or stale entries are swept.

    min_reclaim:   a tier that must make room frees at least budget // min_reclaim bytes at once, so a
                   full tier under a stream of puts evicts once per many puts rather than once per put.
    heap_slack:    a victim heap is rebuilt from its tier when it holds more than
    heap_floor:    heap_slack * (chunks in the tier) + heap_floor entries (stale entries pile up there).
    shadow_slack:  notes of shadowed cpu copies are swept of chunks no longer shadowed when there are more
    shadow_floor:  than shadow_slack * (chunks in the gpu tier) + shadow_floor of them.
    """

    min_reclaim: int = 64
    heap_slack: int = 4
    heap_floor: int = 1024
    shadow_slack: int = 2
    shadow_floor: int = 64


@dataclass(slots=True)  # read and written per chunk on the decode path (touch, ranking): no __dict__
class ChunkRecord:
    """What the policy knows of one chunk. NOTE: only EvictionPolicy changes these fields."""

    nbytes: int
    importance: float
    step: int
    order: int
    prior: float = 0.0  # its value just before the step it was last touched in (0: never touched before)
    last_touch: int = -1  # the clock of that step
    rank: tuple = ()  # eviction order key, see EvictionPolicy.rank_for


Tier = object  # a container of keys with .name and .budget: a memory tier, or a stand-in in a test


class EvictionPolicy:
    """Records of every chunk, their eviction order, and victims for a tier that needs room.

    gpu, cpu: the memory tiers (victims come from them); disk: the tier below, or None (without one a
    cpu copy is a chunk's record and never shadowed). Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, decay: float, gpu: Tier, cpu: Tier, disk: Optional[Tier] = None,
                 tuning: EvictionTuning = EvictionTuning()) -> None:
        self.decay = decay
        self.tuning = tuning
        self._gpu, self._cpu, self._disk = gpu, cpu, disk
        self._records: Dict[ChunkKey, ChunkRecord] = {}
        self._clock = 0
        self._order = 0
        # per memory tier, a heap of (rank, n, key) from which victims are taken lowest rank first without
        # ranking the whole tier each time (see lowest): an entry is pushed when a chunk enters the tier;
        # a chunk's rank only rises after that (touch, use), so an entry whose rank is stale is pushed
        # again with the current one when it comes up
        self._heaps: Dict[str, list] = {"gpu": [], "cpu": []}
        self._heap_n = itertools.count()
        # cpu copies shadowed by a gpu copy (an insertion-ordered set): while a chunk is in the gpu tier,
        # gathers read it there and its cpu copy serves nothing; with a disk copy below, evicting that
        # cpu copy loses nothing, so the cpu tier gives up these first (see shadow_victim), and caches
        # other chunks instead of the gpu tier's hottest ones a second time
        self._shadowed: "OrderedDict[ChunkKey, None]" = OrderedDict()

    # --- records ---------------------------------------------------------------------------------
    @property
    def clock(self) -> int:
        """Decode steps so far (tick)."""
        return self._clock

    @property
    def records(self) -> Dict[ChunkKey, ChunkRecord]:
        """Every chunk's record, by key (read-only for callers: the store's fast membership test)."""
        return self._records

    def __contains__(self, key) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def require(self, key: ChunkKey) -> ChunkRecord:
        m = self._records.get(key)
        if m is None:
            raise ChunkNotFoundError(f"chunk {key} is not in the store")
        return m

    def admit(self, key: ChunkKey, nbytes: int, importance: float) -> ChunkRecord:
        """on_admit: a new chunk of nbytes enters the store now with this importance."""
        self._order += 1
        m = self._records[key] = self._stamp(ChunkRecord(nbytes, float(importance), self._clock, self._order))
        return m

    def forget(self, key: ChunkKey) -> None:
        self._records.pop(key, None)

    def tick(self, steps: int = 1) -> int:
        self._clock += steps
        return self._clock

    def used(self, m: ChunkRecord) -> None:
        """A chunk was read or copied up now: its last use is this step (importance unchanged)."""
        m.step = self._clock
        self._stamp(m)

    def value(self, key: ChunkKey) -> float:
        m = self.require(key)
        return m.importance * self.decay ** (self._clock - m.step)

    def touch(self, keys: Iterable[ChunkKey], importance: float = 1.0) -> None:
        """on_touch: chunks used this step with the given importance (added to their decayed value).
        (value and rank_for written out: a decode step touches every chunk it chose.)"""
        clock, meta, add = self._clock, self._records, float(importance)
        d = self.decay
        now = clock * math.log(d)  # rank_for's step * log(d), for step = clock
        log, lowest = math.log, -math.inf
        for key in keys:
            m = meta.get(key)
            if m is None:
                self.require(key)
            age = clock - m.step
            value = m.importance * d ** age if age else m.importance
            if m.last_touch != clock:
                m.prior, m.last_touch = value, clock
            m.importance = imp = value + add
            m.step = clock
            m.rank = (log(imp) - now if imp > 0 else lowest, clock, m.order)

    def rank_for(self, importance: float, step: int, order: int) -> Tuple[float, int, int]:
        """The eviction order key of a chunk with this importance, last used at `step`.

        The value at clock c is importance * d ** (c - step) (d = decay): for every chunk the same
        factor d ** c times importance * d ** -step, so the order of values is the order of
        log(importance) - step * log(d), which stays fixed until the chunk is used again. Kept with the
        chunk, eviction ranks thousands of chunks without computing a power for each at every step.
        """
        key = math.log(importance) - step * math.log(self.decay) if importance > 0 else -math.inf
        return (key, step, order)

    def _stamp(self, m: ChunkRecord) -> ChunkRecord:
        m.rank = self.rank_for(m.importance, m.step, m.order)
        return m

    def rank(self, key: ChunkKey) -> Tuple[float, int, int]:
        """Eviction order, lowest first: decayed importance, then last use, then age."""
        return self._records[key].rank

    # --- victim heaps ----------------------------------------------------------------------------
    def entered(self, tier: Tier, key: ChunkKey) -> None:
        """A chunk now in `tier` joins its victim heap (rebuilt when stale entries pile up)."""
        h = self._heaps[tier.name]
        if len(h) > self.tuning.heap_slack * len(tier) + self.tuning.heap_floor:
            # the tier's chunks (this one among them) afresh
            h[:] = [(self._records[k].rank, next(self._heap_n), k) for k in tier.keys() if k in self._records]
            heapq.heapify(h)
            return
        heapq.heappush(h, (self._records[key].rank, next(self._heap_n), key))

    def lowest(self, tier: Tier, skip: Collection[ChunkKey], held: List[ChunkKey]) -> Optional[ChunkKey]:
        """Pop the chunk of `tier` lowest in the eviction order (rank) that is not in `skip`; None when
        there is none. Chunks passed over for being in `skip` are appended to `held`: the caller gives
        them and any popped chunk it keeps back with give_back."""
        h = self._heaps[tier.name]
        meta = self._records
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

    def give_back(self, tier: Tier, keys: Iterable[ChunkKey]) -> None:
        """Chunks popped by lowest and not evicted go back into the heap."""
        h = self._heaps[tier.name]
        for key in keys:
            if key in tier and key in self._records:
                heapq.heappush(h, (self._records[key].rank, next(self._heap_n), key))

    def evict_for(self, tier: Tier, nbytes: int, protect: Collection[ChunkKey],
                  evict: Callable[[ChunkKey], int]) -> None:
        """victims for nbytes: evict(key) the tier's chunks outside `protect`, shadowed cpu copies first
        and then lowest rank first, until at least nbytes (and 1/min_reclaim of the budget) are freed
        or nothing is left to evict. evict(key) drops the copy and returns the bytes it freed."""
        want = max(nbytes, tier.budget // self.tuning.min_reclaim)
        freed, held = 0, []
        try:
            while freed < want:
                victim = self.shadow_victim(protect) if tier is self._cpu else None
                if victim is None:
                    victim = self.lowest(tier, protect, held)
                if victim is None:
                    break
                freed += evict(victim)
        finally:
            self.give_back(tier, held)

    # --- shadowed cpu copies -----------------------------------------------------------------------
    @property
    def shadowed(self):
        """The cpu copies noted as shadowed by a gpu copy, oldest first (a read-only view)."""
        return self._shadowed.keys()

    def shadow(self, key: ChunkKey) -> None:
        """Note that `key` now has a gpu copy above its cpu copy. Only with a disk tier (without one a cpu
        copy is a chunk's record and never shadowed); entries no longer shadowed are dropped when they
        pile up."""
        if self._disk is None:
            return
        sh = self._shadowed
        sh[key] = None
        if len(sh) > self.tuning.shadow_slack * len(self._gpu) + self.tuning.shadow_floor:
            gpu, cpu = self._gpu, self._cpu
            for k in [k for k in sh if k not in gpu or k not in cpu]:
                del sh[k]

    def shadow_victim(self, skip: Collection[ChunkKey]) -> Optional[ChunkKey]:
        """The oldest cpu copy still shadowed by a gpu copy, with a disk copy below and not in `skip`
        (taken out of the notes), or None. Entries no longer shadowed are dropped as they come up."""
        sh, gpu, cpu, disk = self._shadowed, self._gpu, self._cpu, self._disk
        if disk is None or not sh:
            return None
        passed = []
        found = None
        while sh:
            key, _ = sh.popitem(last=False)
            if key not in gpu or key not in cpu or key not in self._records or key not in disk:
                continue
            if key in skip:
                passed.append(key)
                continue
            found = key
            break
        for key in reversed(passed):  # still shadowed: kept, first in line, for a later call
            self.unshadow_victim(key)
        return found

    def unshadow_victim(self, key: ChunkKey) -> None:
        """A chunk shadow_victim handed out and the caller did not evict: first in line again."""
        self._shadowed[key] = None
        self._shadowed.move_to_end(key, last=False)
