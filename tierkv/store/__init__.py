"""The store: one residency map of every chunk across the gpu, cpu and disk tiers (see store.py)."""

from .eviction import ChunkRecord, EvictionPolicy, EvictionTuning
from .stats import StoreStats
from .store import ChunkStore

__all__ = ["ChunkStore", "StoreStats", "EvictionPolicy", "EvictionTuning", "ChunkRecord"]
