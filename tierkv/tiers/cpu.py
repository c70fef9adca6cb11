"""The cpu tier: the warm copy of every chunk not on disk, in pinned host memory (plain without CUDA).

Pinned memory is what lets the gather kernel read a chunk straight over PCIe through unified addressing,
and lets copies to the GPU run asynchronously; without CUDA it would only cost, so it is skipped.
"""

from __future__ import annotations

import torch

from .arena import MemoryTier


class CpuTier(MemoryTier):
    name = "cpu"

    def __init__(self, budget: int, pinned=None, segment_bytes: int = 256 << 20) -> None:
        if pinned is None:
            pinned = torch.cuda.is_available()
        super().__init__(budget, "cpu", pinned=pinned, segment_bytes=segment_bytes)
