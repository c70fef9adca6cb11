"""The gather kernel's sources: every memory segment of the gpu and cpu tiers, in one stable order."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..keys import ChunkKey


class SourceMap:
    """Numbers the segments of the memory tiers as they appear. The list only ever grows (segments are
    never freed), so an index handed out stays valid. Not thread-safe: the store calls it under its lock."""

    def __init__(self, gpu, cpu) -> None:
        self._tiers = (("gpu", gpu), ("cpu", cpu))
        self._sources: List[torch.Tensor] = []
        self._index: Dict[Tuple[str, int], int] = {}

    def _sync(self) -> None:
        for name, tier in self._tiers:
            for i, seg in enumerate(tier.sources):
                if (name, i) not in self._index:
                    self._index[(name, i)] = len(self._sources)
                    self._sources.append(seg)

    def sources(self) -> List[torch.Tensor]:
        self._sync()
        return list(self._sources)

    def __len__(self) -> int:
        return sum(len(t.sources) for _, t in self._tiers)

    def best_locations(self, keys: Sequence[ChunkKey]) -> List[Tuple[Optional[Tuple[int, int]], Optional[str]]]:
        """Per key, ((source index, byte offset), tier) of its copy in the fastest memory tier holding one
        (gpu, then cpu), or (None, None)."""
        self._sync()
        index, out = self._index, []
        for key in keys:
            for name, t in self._tiers:
                if key in t:
                    seg, off = t.location(key)
                    out.append(((index[(name, seg)], off), name))
                    break
            else:
                out.append((None, None))
        return out

    def source_location(self, key: ChunkKey, name: str, tier) -> Optional[Tuple[int, int]]:
        """(source index, byte offset) of the chunk's copy in memory tier `tier` (named `name`), or None."""
        if key not in tier:
            return None
        self._sync()
        seg, off = tier.location(key)
        return self._index[(name, seg)], off
