"""ColdTier: the byte-store interface below the memory tiers, as the store and the fetcher use it.

A cold tier holds chunks as opaque 1-D uint8 blocks keyed by ChunkKey, within a byte budget, and
survives the process; it knows nothing of models. DiskTier implements it; a remote tier (Redis,
Valkey) would too. Writes may be queued (put) or synchronous (write); reads return CPU tensors or fill
the caller's buffers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

from ..keys import ChunkKey


@runtime_checkable
class ColdTier(Protocol):
    @property
    def budget(self) -> Optional[int]:
        """Most bytes the tier may hold (None: no limit of its own)."""

    @property
    def used_bytes(self) -> int:
        """Bytes the tier holds now."""

    def put(self, key: ChunkKey, data, on_durable: Optional[Callable[[ChunkKey], None]] = None,
            copy: bool = True) -> None:
        """Queue `data` (1-D uint8 CPU tensor, or bytes-like) to be stored as chunk `key`; readable at
        once. Raises CapacityError if it would not fit in the budget."""

    def write(self, key: ChunkKey, data) -> None:
        """Store chunk `key` and return once it is durable."""

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued write is durable; raise the first failure."""

    def delete(self, key: ChunkKey) -> bool:
        """Remove a chunk; True if the tier held it."""

    def read(self, key: ChunkKey, out=None):
        """Chunk `key` as a 1-D uint8 CPU tensor, into out[:nbytes] when `out` is given."""

    def read_batch(self, keys: Sequence[ChunkKey], outs: Sequence) -> list:
        """read() of several chunks into outs[j], in the calling thread."""

    def read_into_async(self, keys: Sequence[ChunkKey], buffer, stride: int) -> Callable[[], None]:
        """Start reading chunk keys[j] into buffer[j * stride :]; returns the function that waits for the
        reads (raising their error)."""

    def keys(self) -> Iterable[ChunkKey]:
        """Every chunk the tier holds."""

    def __contains__(self, key) -> bool: ...

    def __len__(self) -> int: ...

    def nbytes(self, key: ChunkKey) -> int:
        """Raw size of a chunk."""

    def stats(self):
        """The tier's counters (a dataclass)."""

    def close(self) -> None:
        """Flush and release the tier."""


__all__ = ["ColdTier"]
