"""The gpu tier: a cache of selected chunks in device memory (plain memory when there is no CUDA)."""

from __future__ import annotations

import torch

from .arena import MemoryTier


class GpuTier(MemoryTier):
    name = "gpu"

    def __init__(self, budget: int, device=None, segment_bytes: int = 256 << 20) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(budget, device, pinned=False, segment_bytes=segment_bytes)
