"""The three tiers; each keeps chunks within a byte budget and knows nothing of models."""

from .cold import ColdTier
from .cpu import CpuTier
from .gpu import GpuTier

TIER_NAMES = ("gpu", "cpu", "disk")

__all__ = ["ColdTier", "CpuTier", "GpuTier", "TIER_NAMES"]
