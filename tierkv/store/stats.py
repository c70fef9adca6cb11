"""The store's counters, and the snapshot of them it hands out (StoreStats)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Optional


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


class Counters:
    """Running counts of one store, added to by its parts under the store's lock."""

    def __init__(self) -> None:
        self.moved = defaultdict(int)  # bytes, by 'src->dst'
        self.hits = defaultdict(int)  # by tier
        self.misses = defaultdict(int)
        self.evictions = defaultdict(int)
        self.stall = 0.0  # seconds

    def snapshot(self, tiers, chunks: int) -> StoreStats:
        """StoreStats of these counts and of `tiers` ([(name, tier)]) now."""
        return StoreStats(
            bytes_moved=dict(self.moved),
            hits=dict(self.hits),
            misses=dict(self.misses),
            evictions=dict(self.evictions),
            resident_chunks={n: len(list(t.keys())) for n, t in tiers},
            used_bytes={n: t.used_bytes for n, t in tiers},
            budget_bytes={n: t.budget for n, t in tiers},
            stall_seconds=self.stall,
            chunks=chunks,
        )
