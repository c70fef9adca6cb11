"""Value-ranked admission of chunks read from below into a memory tier (ChunkStore.add_copies).

When the newcomers do not all fit, the tier's chunks and the newcomers are ranked together by the
eviction order and the best are kept: residents below them are evicted, newcomers below them are not
copied in. A newcomer then takes the slot of a victim of its slot size whose copy in the tier is not its
last (slot handover): an eviction and a put without the allocator or the general paths.
"""

from __future__ import annotations

from typing import Collection, Dict, List, Sequence, Tuple

import torch

from ..errors import CapacityError
from ..keys import ChunkKey
from ..tiers.arena import round_up
from .copies import CopyEngine, host_copy
from .eviction import EvictionPolicy
from .residency import Residency
from .stats import Counters

Items = List[Tuple[ChunkKey, torch.Tensor]]


class Admission:
    """add_copies and its parts. Not thread-safe: the store calls it under its lock."""

    def __init__(self, residency: Residency, policy: EvictionPolicy, copies: CopyEngine, counters: Counters) -> None:
        self._res = residency
        self._policy = policy
        self._copies = copies
        self._counts = counters

    def add_copies(self, items: Sequence[Tuple[ChunkKey, torch.Tensor]], tier: str, min_prior: float,
                   protect: Collection[ChunkKey]) -> int:
        """See ChunkStore.add_copies."""
        t = self._res.tier(tier)
        meta = self._policy.records
        todo = [(k, d) for k, d in items if k in meta and k not in t and meta[k].prior >= min_prior]
        if not todo:
            return 0
        need = sum(round_up(d.numel()) for _, d in todo) - (t.budget - t.used_bytes)  # in allocation units
        n = 0  # newcomers put
        if need > 0:
            protect = protect if isinstance(protect, (set, frozenset, dict)) else set(protect)
            todo, victims = self._choose(t, todo, need, protect)
            n, todo = self._make_way(t, todo, victims)
        if t is self._res.gpu and t.device.type == "cuda" and all(not d.is_cuda for _, d in todo):
            return n + self._put_gpu_batch(todo, protect)
        for k, d in todo:
            try:
                self._res.put_memory(t, k, d, protect)
            except CapacityError:
                break
            self._counts.moved[f"disk->{tier}"] += d.numel()
            n += 1
        return n

    def _choose(self, t, todo: Items, need: int, protect) -> Tuple[Items, List[ChunkKey]]:
        """The tier's chunks and the newcomers in one eviction order: while room is short, the lowest of
        the tier's lowest chunk (a victim) and the lowest newcomer (not copied in) goes. Returns (the
        newcomers kept, best first; the victims, to evict). The tier's chunks come from its victim heap
        lowest first, so a batch costs in proportion to what it moves, not to the size of the tier."""
        policy, rank, size = self._policy, self._policy.rank, round_up
        meta = policy.records
        todo.sort(key=lambda e: rank(e[0]), reverse=True)  # best first: the lowest at the end
        held, resident, victims, taken, free = [], None, [], set(), False
        try:
            while need > 0 and todo:
                if resident is None:
                    # a cpu copy shadowed by a gpu copy goes first, whatever its rank: it serves no read
                    # while the gpu copy is there
                    resident = policy.shadow_victim(protect) if t is self._res.cpu else None
                    free = resident is not None
                    if not free:
                        resident = policy.lowest(t, protect, held)
                    if resident is not None and resident in taken:  # a second heap entry of one
                        resident = None
                        continue
                k, d = todo[-1]
                if resident is not None and (free or rank(resident) < rank(k)):
                    victims.append(resident)  # evicted later, once the newcomers are known
                    taken.add(resident)
                    need -= size(meta[resident].nbytes)
                    resident = None
                else:
                    todo.pop()
                    need -= size(d.numel())
        finally:
            if resident is not None and free:  # taken from the shadowed notes, not the heap: put back
                policy.unshadow_victim(resident)
                resident = None
            policy.give_back(t, held + ([resident] if resident is not None else []))
        return todo, victims

    def _make_way(self, t, todo: Items, victims: List[ChunkKey]) -> Tuple[int, Items]:
        """Evict the victims, newcomers taking their slots where they can; returns (how many newcomers
        were put, the newcomers left to put)."""
        n = 0
        try:
            if (t is self._res.cpu and self._res.disk is not None) or (t is self._res.gpu and t.device.type == "cuda"):
                n, todo, victims = self._hand_over(t, todo, victims)
            while victims:
                self._res.evict_from(victims[-1], t.name)
                victims.pop()
        finally:
            self._policy.give_back(t, victims)  # victims left in the tier by an error part way
        return n, todo

    def _hand_over(self, t, todo: Items, victims: List[ChunkKey]) -> Tuple[int, Items, List[ChunkKey]]:
        """Newcomers (host bytes) into the slots of victims of the same slot size whose copy in tier `t`
        is not their last (a disk copy below a cpu copy; a cpu or disk copy below a gpu copy): each pair
        is an eviction and a put without the allocator or the general paths (a decode step installs
        dozens of chunks a layer, each evicting one). Returns (how many were put, the newcomers left to
        put, the victims left to evict)."""
        on_gpu = t is self._res.gpu
        pools, rest_victims = self._slot_pools(victims, on_gpu)
        if not pools:
            return 0, todo, victims
        if not on_gpu:  # the host rewrites the slots: copies in flight may read or write them, and gathers
            self._copies.settle_cpu()
            self._copies.fence_readers()
        rest, placed = [], []
        for k, d in todo:
            pool = None if d.is_cuda else pools.get(round_up(d.numel()))
            if not pool:
                rest.append((k, d))
                continue
            v = pool.pop()
            view = t.handover(v, k, d.numel())
            self._counts.evictions[t.name] += 1
            self._res.notify(v, t.name)
            self._policy.entered(t, k)
            if not on_gpu:
                host_copy(view, d)
                self._res.notify(k, t.name)
            placed.append((k, d, view))
        if on_gpu:
            self._res.upload(placed)
        self._counts.moved[f"disk->{t.name}"] += sum(d.numel() for _, d, _ in placed)
        for pool in pools.values():
            rest_victims.extend(pool)
        return len(placed), rest, rest_victims

    def _slot_pools(self, victims: List[ChunkKey], on_gpu: bool) -> Tuple[Dict[int, list], List[ChunkKey]]:
        """The victims whose copy is not their last, by slot size; and the others (moved down on eviction)."""
        meta, cpu, disk = self._policy.records, self._res.cpu, self._res.disk
        pools: Dict[int, list] = {}
        rest = []
        for v in victims:
            if (disk is not None and v in disk) or (on_gpu and v in cpu):
                pools.setdefault(round_up(meta[v].nbytes), []).append(v)
            else:
                rest.append(v)
        return pools, rest

    def _put_gpu_batch(self, items: Items, protect) -> int:
        """Host bytes into gpu slots, as put_memory would, but the host-to-device copies of the whole
        batch go on the promotion stream under one wait and one event (Residency.upload)."""
        t, placed = self._res.gpu, []
        for k, d in items:
            try:
                placed.append((k, d, self._res.reserve_memory(t, k, d.numel(), protect)))
            except CapacityError:
                break
        self._res.upload(placed)
        self._counts.moved["disk->gpu"] += sum(d.numel() for _, d, _ in placed)
        return len(placed)
