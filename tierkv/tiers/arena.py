"""Arena: byte-budgeted memory made of a few large flat uint8 tensors, and a first-fit allocator over it.

Both memory tiers are arenas: the gpu tier's segments are device memory, the cpu tier's pinned host
memory (plain host memory without CUDA). Chunks live at (segment, offset); the kernels get the segments
as their sources and offsets in their chunk table, so an allocation never moves once made. Segments
are allocated lazily, so a large budget costs nothing until it is used, and together never exceed the
budget: the arena cannot hold more than its budget however fragmented it gets.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..errors import CapacityError

ALIGN = 256  # keeps every chunk (and so every 16-byte section inside it) aligned for vector loads


def round_up(n: int, a: int = ALIGN) -> int:
    """n rounded up to a multiple of a (by default the arena's allocation unit)."""
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Extent:
    segment: int
    offset: int
    nbytes: int  # bytes reserved (aligned)


def _pin(size: int, registered: List[int]) -> torch.Tensor:
    """Page-locked host memory of exactly `size` bytes, readable by the GPU through unified addressing.

    Registered rather than taken from torch's pinned allocator, which rounds every request up to a
    power of two: segments of a few GiB would pin up to twice the budget.
    """
    seg = torch.empty(size, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(seg.data_ptr(), size, 0)
    if int(err) != 0:
        raise CapacityError(f"could not pin a {size}-byte segment of host memory for the cpu tier (CUDA error {int(err)}); "
                            "lower cpu_budget")
    registered.append(seg.data_ptr())
    return seg


def _unpin(registered: List[int]) -> None:
    for ptr in registered:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: the process is going away anyway
            pass
    registered.clear()


class _FreeList:
    """Free byte ranges of one segment, sorted by offset, coalesced on free."""

    def __init__(self, size: int) -> None:
        self.starts: List[int] = [0]
        self.sizes: List[int] = [size]

    def alloc(self, n: int) -> Optional[int]:
        for i, size in enumerate(self.sizes):
            if size >= n:
                off = self.starts[i]
                if size == n:
                    del self.starts[i], self.sizes[i]
                else:
                    self.starts[i] += n
                    self.sizes[i] -= n
                return off
        return None

    def free(self, off: int, n: int) -> None:
        i = bisect.bisect_left(self.starts, off)
        if (i < len(self.starts) and self.starts[i] < off + n) or (i > 0 and self.starts[i - 1] + self.sizes[i - 1] > off):
            raise RuntimeError(f"double free or overlap at offset {off} (+{n})")
        self.starts.insert(i, off)
        self.sizes.insert(i, n)
        if i + 1 < len(self.starts) and off + n == self.starts[i + 1]:  # merge right
            self.sizes[i] += self.sizes[i + 1]
            del self.starts[i + 1], self.sizes[i + 1]
        if i > 0 and self.starts[i - 1] + self.sizes[i - 1] == off:  # merge left
            self.sizes[i - 1] += self.sizes[i]
            del self.starts[i], self.sizes[i]

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)


class Arena:
    def __init__(self, budget: int, device: torch.device, pinned: bool = False, segment_bytes: int = 256 << 20) -> None:
        self.budget = int(budget)
        self.device = torch.device(device)
        self.pinned = pinned
        self.segment_bytes = max(ALIGN, round_up(segment_bytes))
        self.segments: List[torch.Tensor] = []
        self._free: List[_FreeList] = []
        self.used = 0
        self._registered: List[int] = []  # host pointers pinned with cudaHostRegister
        weakref.finalize(self, _unpin, self._registered)

    @property
    def reserved(self) -> int:
        """Bytes of memory actually allocated for segments (never more than the budget)."""
        return sum(s.numel() for s in self.segments)

    def _new_segment(self, need: int) -> Optional[int]:
        room = (self.budget - self.reserved) // ALIGN * ALIGN
        size = min(max(self.segment_bytes, need), room)
        if size < need:
            return None
        if self.device.type == "cuda":
            seg = torch.empty(size, dtype=torch.uint8, device=self.device)
        elif self.pinned:
            seg = _pin(size, self._registered)
        else:
            seg = torch.empty(size, dtype=torch.uint8)
        self.segments.append(seg)
        self._free.append(_FreeList(size))
        return len(self.segments) - 1

    def reserve_all(self) -> None:
        """Allocate every segment of the budget now (a setup cost, paid once) rather than on first use."""
        while self.budget - self.reserved >= ALIGN:
            self._new_segment(ALIGN)

    def alloc(self, nbytes: int) -> Optional[Extent]:
        """An extent of at least `nbytes`, or None if none fits now (the caller evicts and retries)."""
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected a positive size, got {nbytes}")
        n = round_up(nbytes)
        if n > self.budget:
            raise CapacityError(f"a chunk of {nbytes} bytes is larger than the whole tier budget of {self.budget} bytes")
        for i, fl in enumerate(self._free):
            off = fl.alloc(n)
            if off is not None:
                self.used += n
                return Extent(i, off, n)
        i = self._new_segment(n)
        if i is None:
            return None
        off = self._free[i].alloc(n)
        self.used += n
        return Extent(i, off, n)

    def free(self, ext: Extent) -> None:
        self._free[ext.segment].free(ext.offset, ext.nbytes)
        self.used -= ext.nbytes

    def largest_free(self, segment: int) -> int:
        """Bytes of the largest free range of a segment (the largest extent it could still give)."""
        return self._free[segment].largest

    def view(self, ext: Extent, nbytes: int) -> torch.Tensor:
        return self.segments[ext.segment][ext.offset : ext.offset + nbytes]

    def address(self, ext: Extent) -> Tuple[int, int]:
        """(segment index, byte offset): the chunk-table coordinates of an extent."""
        return ext.segment, ext.offset


class MemoryTier:
    """A tier held in an arena: put / read / evict chunks by key within a byte budget.

    The tier does no eviction policy of its own: `put` returns False when the chunk does not fit, and
    the store, which owns residency and importance, decides what to evict and retries.
    """

    name = "memory"

    def __init__(self, budget: int, device, pinned: bool = False, segment_bytes: int = 256 << 20) -> None:
        self.arena = Arena(budget, device, pinned=pinned, segment_bytes=segment_bytes)
        self._where = {}  # key -> (Extent, nbytes)

    @property
    def budget(self) -> int:
        return self.arena.budget

    @property
    def used_bytes(self) -> int:
        return self.arena.used

    @property
    def device(self) -> torch.device:
        return self.arena.device

    @property
    def sources(self) -> List[torch.Tensor]:
        return self.arena.segments

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self):
        return self._where.keys()

    def reserve(self, key, nbytes: int) -> Optional[torch.Tensor]:
        """Claim room for a chunk and return the view to fill, or None if it does not fit now."""
        if key in self._where:
            raise KeyError(f"{key} is already in the {self.name} tier")
        ext = self.arena.alloc(nbytes)
        if ext is None:
            return None
        self._where[key] = (ext, nbytes)
        return self.arena.view(ext, nbytes)

    def handover(self, old, new, nbytes: int) -> torch.Tensor:
        """Give chunk `new` (nbytes) the slot chunk `old` holds, which leaves the tier: an evict and a
        reserve in one, with no allocator work. The slot must be large enough. Returns the view to fill."""
        if new in self._where:
            raise KeyError(f"{new} is already in the {self.name} tier")
        ext, _ = self._where[old]
        if round_up(nbytes) > ext.nbytes:
            raise ValueError(f"a slot of {ext.nbytes} bytes cannot take a chunk of {nbytes} bytes")
        del self._where[old]
        self._where[new] = (ext, nbytes)
        return self.arena.view(ext, nbytes)

    def put(self, key, data: torch.Tensor) -> bool:
        view = self.reserve(key, data.numel())
        if view is None:
            return False
        view.copy_(data.reshape(-1))
        return True

    def read(self, key) -> torch.Tensor:
        ext, n = self._where[key]
        return self.arena.view(ext, n)

    def location(self, key) -> Tuple[int, int]:
        ext, _ = self._where[key]
        return ext.segment, ext.offset

    def evict(self, key) -> int:
        ext, n = self._where.pop(key)
        self.arena.free(ext)
        return n
