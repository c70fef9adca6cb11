"""DiskTier: the cold tier, a crash-safe byte store of chunks keyed by ChunkKey (a ColdTier).

It knows nothing of models: a chunk is a 1-D block of bytes. The files are a zarr v3 hierarchy of
lz4-compressed, crc32c-checked chunks (layout.py), so zarr-python can open and read every chunk; the
hot path reads the same files directly because zarr-python's per-chunk cost (an asyncio round trip per
read) is far above the cost of the read itself (bench/bench_store.py measures both).

The tier is a front over three parts: the index (index.py: opening and reopening, where each chunk's
file is, the budget), the write-behind worker (writer.py: a chunk is durable before on_durable(key) is
called; a chunk still queued is served from its queued copy) and the reader (reader.py, files.py: the
C reader or the Python reader). torch is imported only when a tensor is built, so that a process that
only writes bytes starts quickly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from ...config import Size, parse_size
from ...errors import ChunkNotFoundError, ConfigError, TierKVError
from ...keys import ChunkKey
from . import native as _native
from .files import FileReader
from .index import DiskIndex
from .layout import FlushTimeoutError, WriteBehindError
from .reader import ChunkReader
from .writer import StoredErrors, WriteBehind


class TierClosedError(TierKVError):
    """The tier was closed; open it again to use it."""


@dataclass(frozen=True)
class DiskStats:
    """Counters of one DiskTier since it was opened (raw = chunk bytes, disk = file bytes)."""

    chunks: int
    used_bytes: int
    reserved_bytes: int
    queued: int
    chunks_written: int
    bytes_written_raw: int
    bytes_written_disk: int
    chunks_read: int
    bytes_read_raw: int
    bytes_read_disk: int
    reads_from_queue: int
    corrupt_chunks: int
    write_errors: int


@dataclass(frozen=True)
class DiskTuning:
    """How the tier's threads batch and share their work; none of these changes the bytes written or read.

    write_batch:    most chunks the writer writes between two rounds of directory fsyncs (each directory
                    is fsynced once per batch).
    poll_s:         how often a caller blocked on the writer (a full queue, a synchronous write) checks
                    that the writer thread is still alive.
    min_per_thread: fewest chunks a batch read gives each reader thread: a thread's share costs Python
                    time, and a decode step's batch of ~30 chunks read fastest on 8 threads of the H200
                    machine's disk, not on 16.
    """

    write_batch: int = 64
    poll_s: float = 0.2
    min_per_thread: int = 4


Data = Union[bytes, bytearray, memoryview, np.ndarray, "torch.Tensor"]  # noqa: F821


def io_threads() -> int:
    """Threads for chunk reads: 2 to 16 by core count, or TIERKV_IO_THREADS. Reads mostly wait on the
    disk, and the C reader holds no GIL, so up to one per core helps: on the H200 machine (16 cores) raw
    O_DIRECT reads of 72 KiB files peaked at 16 threads."""
    env = os.environ.get("TIERKV_IO_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"TIERKV_IO_THREADS: expected an integer >= 1, got {env!r}")
        return n
    return max(2, min(16, os.cpu_count() or 1))


class DiskTier:
    """The disk tier at `path`: created if absent or empty, reopened if it holds a tierkv store.

    budget:       most bytes of chunk files (compressed) the tier may hold; None: the disk's own limit.
    queue_depth:  most writes queued behind `put` before it blocks.
    read_threads: threads `read_many` reads with (default: io_threads(), 2 to 16 by core count).
    direct_reads: read chunk files with O_DIRECT, past the page cache (default: where the filesystem
                  allows it; False: buffered reads). A chunk's bytes are kept by the tiers above, so the
                  page cache would only hold a second copy, and cold buffered reads are slower (readahead,
                  page insertion, one more copy): on the H200 machine the store read 0.42x a raw O_DIRECT
                  read of the same files with buffered reads.
    native_reads: read with the C reader (native.py: open, read, crc32c and lz4 of a list of chunks in one
                  call without the GIL), built with the system C compiler on first use. None (default):
                  where it can be built, else the Python reader; True: required (ConfigError if it cannot
                  be built); False: the Python reader. Both give the same bytes and errors.
    tuning:       DiskTuning (batching of the writer and the readers).
    """

    def __init__(self, path, budget: Optional[Size] = None, queue_depth: int = 64,
                 read_threads: Optional[int] = None, direct_reads: bool = True,
                 native_reads: Optional[bool] = None, tuning: DiskTuning = DiskTuning()) -> None:
        if isinstance(queue_depth, bool) or not isinstance(queue_depth, int) or queue_depth < 1:
            raise ConfigError(f"queue_depth: expected an integer >= 1, got {queue_depth!r}")
        if read_threads is not None and (isinstance(read_threads, bool) or not isinstance(read_threads, int)
                                         or read_threads < 1):
            raise ConfigError(f"read_threads: expected an integer >= 1, got {read_threads!r}")
        budget = None if budget is None else parse_size(budget, "disk_budget")
        root = os.path.abspath(os.fspath(path))
        lib = _native.library() if native_reads is not False else None
        if native_reads is True and lib is None:
            raise ConfigError(f"native_reads=True: the C reader cannot be used here ({_native.missing()})")
        self._index = DiskIndex(root, budget)
        self._errors = StoredErrors()
        files = FileReader(self._index, lib, bool(direct_reads) and hasattr(os, "O_DIRECT"))
        self._reader = ChunkReader(self._index, self._errors, files, read_threads or io_threads(),
                                   tuning.min_per_thread, files.read_files)
        self._files = files
        self._writer = WriteBehind(self._index, self._errors, queue_depth, tuning.write_batch, tuning.poll_s)

    # --- properties ----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._index.root

    @property
    def budget(self) -> Optional[int]:
        return self._index.budget

    @property
    def used_bytes(self) -> int:
        """Bytes of durable chunk files (compressed, with their 8 bytes of header and crc)."""
        return self._index.used_bytes

    @property
    def reserved_bytes(self) -> int:
        """Worst-case file bytes of writes still queued (counted against the budget until they land)."""
        return self._index.reserved_bytes

    @property
    def free_bytes(self) -> Optional[int]:
        return self._index.free_bytes()

    @property
    def read_threads(self) -> int:
        """Threads a batch read is shared over."""
        return self._reader.read_threads

    @property
    def native_reads(self) -> bool:
        """Whether the C reader reads the chunk files (else the Python reader)."""
        return self._files.lib is not None

    @property
    def direct_reads(self) -> bool:
        """Whether chunk files are read with O_DIRECT (off for good once the filesystem refused it)."""
        return self._files.direct

    @property
    def reader_pool_started(self) -> bool:
        """Whether a Python reader thread was ever started (the C reader's batches need none)."""
        return self._reader.pool_started

    @property
    def native_batches_pending(self) -> int:
        """Batches started on the C reader's threads and not yet waited for."""
        return self._reader.native_batches_pending

    def chunk_path(self, key: ChunkKey) -> str:
        """The file of a durable chunk (ChunkNotFoundError for one not on disk yet, or not in the tier)."""
        loc = self._index.locate([key])[0]
        if loc is None:
            raise ChunkNotFoundError(f"chunk {key}: no durable file in the disk tier at {self.path!r}")
        return loc.path

    def __contains__(self, key) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> List[ChunkKey]:
        """Every chunk the tier holds, durable or queued."""
        return self._index.keys()

    def nbytes(self, key: ChunkKey) -> int:
        """Raw (uncompressed) size of a chunk."""
        return self._index.nbytes(key)

    def stats(self) -> DiskStats:
        return DiskStats(**self._index.snapshot())

    # --- writing -------------------------------------------------------------------------------
    def put(self, key: ChunkKey, data: Data, on_durable: Optional[Callable[[ChunkKey], None]] = None,
            copy: bool = True) -> None:
        """Queue `data` (1-D uint8 CPU tensor, or bytes-like) to be written as chunk `key`.

        Blocks while the queue is full. `on_durable(key)` runs on the writer thread once the chunk is
        on disk for good; it is not called for a write that failed or was cancelled by `delete`. It
        must be quick and must not wait on anything a thread blocked in `put` holds (that thread
        waits on the writer); calling put/write/flush/close from it raises WriteBehindError.
        With copy=False the caller promises not to change the buffer until then (bytes never need it).
        Raises CapacityError if the chunk would not fit in the budget, or the error of an earlier
        write-behind that failed.
        """
        self._check_open()
        self._errors.raise_first()
        self._writer.submit(key, data, on_durable, copy, sync=False)

    def write(self, key: ChunkKey, data: Data) -> None:
        """Write chunk `key` and return once it is durable (in order with the queued writes)."""
        self._check_open()
        self._errors.raise_first()
        self._writer.wait(self._writer.submit(key, data, None, False, sync=True))

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued write is durable (or failed); raise the first failure."""
        self._check_open()
        ok, left = self._index.wait_idle(timeout, lambda: self._writer.alive)
        if not ok:
            raise FlushTimeoutError(f"disk tier at {self.path!r}: {left} writes still queued after {timeout} s")
        self._writer.check_worker()
        self._errors.raise_first()

    def delete(self, key: ChunkKey) -> bool:
        """Remove a chunk (and cancel its queued writes); True if the tier held it."""
        return self._index.delete(key)

    # --- reading -------------------------------------------------------------------------------
    def read(self, key: ChunkKey, out=None):
        """Chunk `key` as a 1-D uint8 CPU tensor; into out[:nbytes] when `out` (a contiguous uint8 CPU
        tensor, pinned for instance) is given. Raises ChunkNotFoundError, or CorruptChunkError when the
        file fails its checksum or does not decode."""
        return self._reader.read(key, out)

    def read_many(self, keys: Sequence[ChunkKey], outs: Optional[Sequence] = None) -> list:
        """read() of several chunks on a small thread pool (file reads and lz4 run without the GIL)."""
        return self._reader.read_many_async(keys, outs, inline=True)()

    def read_many_async(self, keys: Sequence[ChunkKey], outs: Optional[Sequence] = None,
                        inline: bool = False) -> Callable[[], list]:
        """read_many() started on the reader threads; returns a function that waits for the reads and
        returns what read_many() would (raising its error). Meanwhile the caller may do other work:
        the reads hold no GIL. `inline`: a batch too small to share out is read before returning."""
        return self._reader.read_many_async(keys, outs, inline)

    def read_batch(self, keys: Sequence[ChunkKey], outs: Sequence) -> list:
        """read() of several chunks in the calling thread, the files in one call of the C reader (no GIL
        held while it reads): for callers that are reader threads themselves (the prefetch workers)."""
        return self._reader.read_batch(keys, outs)

    def read_into_async(self, keys: Sequence[ChunkKey], buffer, stride: int) -> Callable[[], None]:
        """read_many_async() into one buffer: chunk keys[j] into buffer[j * stride :][: its nbytes]
        (buffer: a contiguous uint8 CPU tensor of at least len(keys) * stride bytes). The buffer is
        checked once, not a tensor per chunk (a decode step reads dozens of chunks a layer into one
        pinned buffer, and per-chunk checks were most of the set-up). Returns the function that waits
        for the reads (raising their error); the chunks are then in the buffer."""
        return self._reader.read_into_async(keys, buffer, stride)

    def verify(self, keys: Optional[Sequence[ChunkKey]] = None) -> List[ChunkKey]:
        """Read every durable chunk (or those given) and return the ones that fail their checks."""
        return self._reader.verify(keys)

    # --- closing -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._writer.closed:
            raise TierClosedError(f"disk tier at {self.path!r} is closed")
        if self._writer.on_worker:
            # the queue drains only on this thread: blocking here would wait on ourselves forever
            raise WriteBehindError("put/write/flush/close of the disk tier cannot be called from on_durable")

    def close(self, timeout: float = 60.0) -> None:
        """Flush, stop the writer thread (waiting at most `timeout` s for each) and release the store."""
        if self._writer.closed:
            return
        self._check_open()
        err: Optional[BaseException] = None
        try:
            self.flush(timeout)
        except TierKVError as exc:
            err = exc
        stopped = self._writer.stop(timeout)
        self._reader.close()
        self._index.close()
        if err is None and not stopped:
            err = WriteBehindError(f"disk tier at {self.path!r}: the writer thread did not stop within {timeout} s")
        if err is not None:
            raise err

    def __enter__(self) -> "DiskTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DiskTier({self.path!r}, chunks={self._index.durable_count()}, used={self.used_bytes}, "
                f"budget={self.budget})")
