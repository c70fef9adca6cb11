"""DiskTier: the cold tier, a crash-safe byte store of chunks keyed by ChunkKey.

It knows nothing of models: a chunk is a 1-D block of bytes. The files are a zarr v3 hierarchy of
lz4-compressed, crc32c-checked chunks (layout in _diskio), so zarr-python can open and read every
chunk; the hot path reads the same files directly because zarr-python's per-chunk cost (an asyncio
round trip per read) is far above the cost of the read itself (bench/bench_store.py measures both).

Writes go through one worker thread behind a bounded queue (write-behind): a chunk is compressed,
written under a temporary name, fsynced, renamed onto its final name, and its directory fsynced;
only then is `on_durable(key)` called. Several queued chunks are written as a batch so that each
directory is fsynced once per batch. A chunk still queued is served from its queued copy.

Reopening a store rebuilds the index by listing the directories (no per-chunk manifest to keep in
step), deletes leftover temporary files, and so lists only complete chunks. torch is imported only
when a tensor is built, so that a process that only writes bytes starts quickly.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..config import Size, parse_size
from ..errors import (
    CapacityError,
    ChunkNotFoundError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    FormatVersionError,
    TierKVError,
)
from ..keys import ChunkKey, check_name
from . import _diskio as io
from . import _native
from ._diskio import FlushTimeoutError, WriteBehindError

__all__ = ["DiskTier", "DiskStats", "WriteBehindError", "FlushTimeoutError", "TierClosedError"]

_STOP = object()
_BATCH = 64  # most chunks written between two rounds of directory fsyncs
_POLL_S = 0.2  # how often a blocked caller checks that the worker is still alive


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


class _Loc:
    """Where a durable chunk lives: its file, array directory, raw size and file size."""

    __slots__ = ("path", "adir", "nbytes", "size", "bpath", "pptr")

    def __init__(self, path: str, adir: str, nbytes: int, size: int) -> None:
        self.path, self.adir, self.nbytes, self.size = path, adir, nbytes, size
        self.bpath = os.fsencode(path)  # for the C reader: the bytes, and the address of their buffer
        self.pptr = ctypes.cast(ctypes.c_char_p(self.bpath), ctypes.c_void_p).value  # valid while bpath lives


class _Entry:
    """One queued write."""

    __slots__ = ("key", "data", "nbytes", "reserve", "on_durable", "cancelled", "finished", "done", "error")

    def __init__(self, key, data, reserve, on_durable, sync):
        self.key, self.data, self.nbytes = key, data, data.shape[0]
        self.reserve, self.on_durable, self.cancelled, self.finished = reserve, on_durable, False, False
        self.done = threading.Event() if sync else None
        self.error: Optional[TierKVError] = None


Data = Union[bytes, bytearray, memoryview, np.ndarray, "torch.Tensor"]  # noqa: F821


MIN_PER_THREAD = 4  # read_many gives each reader thread at least this many chunks


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
    native_reads: read with the C reader (tiers/_native.py: open, read, crc32c and lz4 of a list of chunks
                  in one call without the GIL), built with the system C compiler on first use. None
                  (default): where it can be built, else the Python reader; True: required (ConfigError
                  if it cannot be built); False: the Python reader. Both give the same bytes and errors.
    """

    def __init__(self, path, budget: Optional[Size] = None, queue_depth: int = 64,
                 read_threads: Optional[int] = None, direct_reads: bool = True,
                 native_reads: Optional[bool] = None) -> None:
        if isinstance(queue_depth, bool) or not isinstance(queue_depth, int) or queue_depth < 1:
            raise ConfigError(f"queue_depth: expected an integer >= 1, got {queue_depth!r}")
        if read_threads is not None and (isinstance(read_threads, bool) or not isinstance(read_threads, int)
                                         or read_threads < 1):
            raise ConfigError(f"read_threads: expected an integer >= 1, got {read_threads!r}")
        self._budget = None if budget is None else parse_size(budget, "disk_budget")
        self._root = os.path.abspath(os.fspath(path))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._index: Dict[ChunkKey, _Loc] = {}
        self._pending: Dict[ChunkKey, List[_Entry]] = {}
        self._arrays: Dict[tuple, str] = {}
        self._streams: set = set()
        self._errors: List[TierKVError] = []
        self._outstanding = 0
        self._used = 0
        self._reserved = 0
        self._counts = dict.fromkeys(
            ("chunks_written", "bytes_written_raw", "bytes_written_disk", "chunks_read", "bytes_read_raw",
             "bytes_read_disk", "reads_from_queue", "corrupt_chunks", "write_errors"), 0)
        self._tls = threading.local()  # per-thread scratch buffer for file bytes
        self._read_threads = read_threads or io_threads()
        self._direct = bool(direct_reads) and hasattr(os, "O_DIRECT")
        self._native = _native.library() if native_reads is not False else None
        if native_reads is True and self._native is None:
            raise ConfigError(f"native_reads=True: the C reader cannot be used here ({_native.missing()})")
        self._pool: Optional[ThreadPoolExecutor] = None
        self._native_reads: dict = {}  # batches the C reader reads on its own threads, not yet waited for
        self._closed = False
        self._lock_fd = -1
        self._open_or_create()
        try:
            self._scan()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_depth)
        self._worker = threading.Thread(target=self._run, name=f"tierkv-disk-writer:{self._root}", daemon=True)
        self._worker.start()

    # --- opening -------------------------------------------------------------------------------
    def _open_or_create(self) -> None:
        root = self._root
        if os.path.exists(root) and not os.path.isdir(root):
            raise ConfigError(f"disk store: {root!r} is a file; expected a directory (empty, or a tierkv store)")
        os.makedirs(root, exist_ok=True)
        self._root_real = os.path.realpath(root)
        mpath = os.path.join(root, io.MANIFEST)
        names = os.listdir(root)
        if io.MANIFEST in names:
            self._check_manifest(io.load_manifest(mpath), mpath)
        else:
            # a creation cut short leaves only zarr.json and temporary files: finish it
            other = sorted(n for n in names if n != io.ZARR_JSON and not n.startswith(io.TMP_PREFIX))
            if other:
                raise ConfigError(
                    f"disk store: {root!r} is a non-empty directory without a {io.MANIFEST} (it holds "
                    f"{', '.join(repr(n) for n in other[:3])}{', ...' if len(other) > 3 else ''}); "
                    "expected an empty directory or a tierkv store"
                )
            for n in names:
                if n.startswith(io.TMP_PREFIX):
                    io.remove_quietly(os.path.join(root, n))
            io.write_durable(root, io.ZARR_JSON, io.json_bytes(io.group_metadata()), "disk store root group")
            # the manifest goes last: its presence is what makes the directory a store
            io.write_durable(root, io.MANIFEST, io.json_bytes(io.manifest()), "disk store manifest")
            io.fsync_dir(os.path.dirname(root) or "/")
        self._lock_fd = os.open(mpath, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(f"disk store: {root!r} is already open (in this or another process); close it first")

    @staticmethod
    def _check_manifest(m: dict, mpath: str) -> None:
        if m.get("format") != io.FORMAT_NAME:
            raise ConfigError(f"disk store: manifest {mpath!r} has format {m.get('format')!r}; expected {io.FORMAT_NAME!r}")
        version = m.get("version")
        if version != io.FORMAT_VERSION:
            raise FormatVersionError(
                f"disk store: manifest {mpath!r} has format version {version!r}; this build reads version "
                f"{io.FORMAT_VERSION} only"
            )

    def _scan(self) -> None:
        """Rebuild the index from the directories; drop temporary files left by a crash."""
        for se in os.scandir(self._root):
            if se.name.startswith(io.TMP_PREFIX):
                io.remove_quietly(se.path)
                continue
            if se.name in io.RESERVED_NAMES or not se.is_dir(follow_symlinks=False) or not _valid_stream(se.name):
                continue
            self._streams.add(se.name)
            for ae in os.scandir(se.path):
                if ae.name.startswith(io.TMP_PREFIX):
                    io.remove_quietly(ae.path)
                    continue
                m = io.ARRAY_RE.match(ae.name)
                if not m or not ae.is_dir(follow_symlinks=False):
                    continue
                layer, nbytes = int(m[1]), int(m[2])
                if not 0 < nbytes <= io.LZ4_MAX_INPUT:
                    continue
                if not os.path.exists(os.path.join(ae.path, io.ZARR_JSON)):
                    # only possible if a crash cut the array's creation short, before any chunk
                    io.write_durable(ae.path, io.ZARR_JSON, io.json_bytes(io.array_metadata(se.name, layer, nbytes)),
                                     f"array metadata {ae.path!r}")
                self._arrays[(se.name, layer, nbytes)] = ae.path
                for ce in os.scandir(ae.path):
                    if ce.name.startswith(io.TMP_PREFIX):
                        io.remove_quietly(ce.path)
                        continue
                    cm = io.CHUNK_RE.match(ce.name)
                    if not cm or not ce.is_file(follow_symlinks=False) or int(cm[1]) >= io.ROWS:
                        continue
                    key = ChunkKey(se.name, layer, int(cm[1]))
                    loc = _Loc(ce.path, ae.path, nbytes, ce.stat(follow_symlinks=False).st_size)
                    prev = self._index.get(key)
                    if prev is not None:
                        loc = self._resolve_duplicate(key, prev, loc)
                    self._index[key] = loc
        self._used = sum(loc.size for loc in self._index.values())

    @staticmethod
    def _resolve_duplicate(key: ChunkKey, a: _Loc, b: _Loc) -> _Loc:
        """A chunk rewritten with a new size was cut short between writing the new file and removing
        the old: both are complete; the later write wins (rename keeps the temp file's mtime)."""
        newer, older = (a, b) if os.stat(a.path).st_mtime_ns >= os.stat(b.path).st_mtime_ns else (b, a)
        io.remove_quietly(older.path)
        return newer

    # --- properties ----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._root

    @property
    def budget(self) -> Optional[int]:
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes of durable chunk files (compressed, with their 8 bytes of header and crc)."""
        return self._used

    @property
    def reserved_bytes(self) -> int:
        """Worst-case file bytes of writes still queued (counted against the budget until they land)."""
        return self._reserved

    @property
    def free_bytes(self) -> Optional[int]:
        if self._budget is None:
            return None
        with self._lock:
            return max(0, self._budget - self._used - self._reserved)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._pending or key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index.keys() | self._pending.keys())

    def keys(self) -> List[ChunkKey]:
        """Every chunk the tier holds, durable or queued."""
        with self._lock:
            return list(self._index.keys() | self._pending.keys())

    def nbytes(self, key: ChunkKey) -> int:
        """Raw (uncompressed) size of a chunk."""
        with self._lock:
            pend = self._pending.get(key)
            if pend:
                return pend[-1].nbytes
            loc = self._index.get(key)
        if loc is None:
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self._root!r}")
        return loc.nbytes

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(chunks=len(self._index.keys() | self._pending.keys()), used_bytes=self._used,
                             reserved_bytes=self._reserved, queued=self._outstanding, **self._counts)

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
        self._submit(key, data, on_durable, copy, sync=False)

    def write(self, key: ChunkKey, data: Data) -> None:
        """Write chunk `key` and return once it is durable (in order with the queued writes)."""
        entry = self._submit(key, data, None, False, sync=True)
        while not entry.done.wait(_POLL_S):
            self._check_worker()
        if entry.error is not None:
            raise entry.error

    def _submit(self, key, data, on_durable, copy, sync) -> _Entry:
        self._check_open()
        self._raise_stored_error()
        _check_key(key)
        arr = _as_bytes_array(data, copy and not sync, key)
        reserve = io.max_file_size(arr.shape[0])
        entry = _Entry(key, arr, reserve, on_durable, sync)
        with self._lock:
            if self._budget is not None and self._used + self._reserved + reserve > self._budget:
                raise CapacityError(
                    f"chunk {key}: {arr.shape[0]} bytes (up to {reserve} on disk) do not fit in the disk budget "
                    f"of {self._budget} bytes ({self._used} used, {self._reserved} queued)"
                )
            self._reserved += reserve
            self._outstanding += 1
            self._pending.setdefault(key, []).append(entry)
        try:
            while True:
                try:
                    self._queue.put(entry, timeout=_POLL_S)
                    break
                except queue.Full:
                    self._check_worker()
        except BaseException:
            with self._lock:
                self._drop_pending(entry)
                self._reserved -= reserve
                self._outstanding -= 1
                self._idle.notify_all()
            raise
        return entry

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued write is durable (or failed); raise the first failure."""
        self._check_open()
        with self._lock:
            ok = self._idle.wait_for(lambda: self._outstanding == 0 or not self._worker.is_alive(), timeout)
            left = self._outstanding
        if not ok:
            raise FlushTimeoutError(f"disk tier at {self._root!r}: {left} writes still queued after {timeout} s")
        self._check_worker()
        self._raise_stored_error()

    def delete(self, key: ChunkKey) -> bool:
        """Remove a chunk (and cancel its queued writes); True if the tier held it."""
        with self._lock:
            entries = self._pending.pop(key, [])
            for e in entries:
                e.cancelled = True
            loc = self._index.pop(key, None)
            if loc is not None:
                io.remove_quietly(loc.path)
                self._used -= loc.size
        return bool(entries) or loc is not None

    # --- reading -------------------------------------------------------------------------------
    def read(self, key: ChunkKey, out=None):
        """Chunk `key` as a 1-D uint8 CPU tensor; into out[:nbytes] when `out` (a contiguous uint8 CPU
        tensor, pinned for instance) is given. Raises ChunkNotFoundError, or CorruptChunkError when the
        file fails its checksum or does not decode."""
        if self._errors:
            self._raise_stored_error()
        with self._lock:
            pend = self._pending.get(key)
            src = pend[-1].data if pend else None
            loc = None if pend else self._index.get(key)
        if src is not None:
            t = _out_tensor(out, src.shape[0], key)
            np.copyto(t.numpy(), src)
            with self._lock:
                self._counts["reads_from_queue"] += 1
            return t
        if loc is None:
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self._root!r}")
        t, n = self._read_into(key, loc, out)
        self._tally(1, loc.nbytes, n)
        return t

    def read_many(self, keys: Sequence[ChunkKey], outs: Optional[Sequence] = None) -> list:
        """read() of several chunks on a small thread pool (file reads and lz4 run without the GIL)."""
        return self.read_many_async(keys, outs, inline=True)()

    def read_many_async(self, keys: Sequence[ChunkKey], outs: Optional[Sequence] = None,
                        inline: bool = False) -> Callable[[], list]:
        """read_many() started on the reader threads; returns a function that waits for the reads and
        returns what read_many() would (raising its error). Meanwhile the caller may do other work:
        the reads hold no GIL. `inline`: a batch too small to share out is read before returning."""
        keys = list(keys)
        if outs is not None and len(outs) != len(keys):
            raise ConfigError(f"read_many: {len(outs)} output tensors for {len(keys)} keys; expected one per key")
        outs = list(outs) if outs is not None else [None] * len(keys)
        n = len(keys)
        if n == 0:
            return list
        if n == 1 and inline:
            got = [self.read(keys[0], outs[0])]
            return lambda: got
        # one task per thread over an interleaved share of the keys: a future per chunk costs more
        # than the thread hand-off saves at these sizes; and at least MIN_PER_THREAD chunks a thread:
        # a decode step's batch of ~30 chunks read fastest on 8 threads on the H200 machine's disk, not
        # on 16 (bench/results/disk_depth_h200_a3261bf.json), and each thread's share costs Python time
        step = min(self._read_threads, -(-n // MIN_PER_THREAD))
        locs = self._locate(keys)
        if self._native is not None and not inline and step > 1:
            # the C reader reads the batch on threads of its own, started by one foreign call that returns
            # at once: no Python thread takes part (one would take the GIL to pick up the work and to hand
            # back the result, and the decode thread would queue behind it); the set-up is done here
            started = self._start_native(keys, locs, step, lambda j: outs[j],
                                         lambda j: _out_tensor(outs[j], locs[j].nbytes, keys[j]))
            if started is not None:
                return started
        if self._native is not None or step == 1:
            # one foreign call reads the batch on `step` threads (no GIL held), in this thread or one
            # reader thread of Python's
            if inline:
                got = self._read_located(keys, outs, locs, step)
                return lambda: got
            future = self._executor().submit(self._read_located, keys, outs, locs, step)
            return future.result
        got: list = [None] * n

        def share(first: int) -> None:
            idx = range(first, n, step)
            for i, t in zip(idx, self._read_located([keys[i] for i in idx], [outs[i] for i in idx],
                                                   [locs[i] for i in idx])):
                got[i] = t

        futures = [self._executor().submit(share, j) for j in range(step)]

        def wait() -> list:
            errors = [e for e in (f.exception() for f in futures) if e is not None]  # all done before we return
            if errors:
                raise errors[0]
            return got

        return wait

    def read_batch(self, keys: Sequence[ChunkKey], outs: Sequence) -> list:
        """read() of several chunks in the calling thread, the files in one call of the C reader (no GIL
        held while it reads): for callers that are reader threads themselves (the prefetch workers)."""
        keys, outs = list(keys), list(outs)
        if len(outs) != len(keys):
            raise ConfigError(f"read_batch: {len(outs)} output tensors for {len(keys)} keys; expected one per key")
        return self._read_located(keys, outs, self._locate(keys))

    def _locate(self, keys: Sequence[ChunkKey]) -> list:
        """Each key's file (None: queued for writing, or gone), all under one look-up of the lock."""
        if self._errors:
            self._raise_stored_error()
        with self._lock:
            return [None if k in self._pending else self._index.get(k) for k in keys]

    def _read_located(self, keys, outs, locs, threads: int = 1) -> list:
        """The chunks keys[j] read into outs[j] (None: a new tensor); locs[j] None: through read().
        `threads`: the C reader's threads for the batch (the Python reader reads in this thread)."""
        got, mine = self._serve_queued(keys, locs, lambda j: outs[j])
        if not mine:
            return got
        ts = [_out_tensor(outs[j], locs[j].nbytes, keys[j]) for j in mine]
        sizes = []
        try:
            sizes = self._read_files([keys[j] for j in mine], [locs[j] for j in mine], ts, threads)
        finally:
            self._tally(len(sizes), sum(locs[j].nbytes for j in mine[: len(sizes)]), sum(sizes))
        for j, t in zip(mine, ts):
            got[j] = t
        return got

    def _serve_queued(self, keys, locs, out_of) -> tuple:
        """read() of the chunks _locate found no file for (queued for writing, which read() serves, or
        gone, which it explains) into out_of(j); returns (results, None for the rest; the rest's indices)."""
        got: list = [None] * len(keys)
        mine = []
        for j, loc in enumerate(locs):
            if loc is None:
                got[j] = self.read(keys[j], out_of(j))
            else:
                mine.append(j)
        return got, mine

    def verify(self, keys: Optional[Sequence[ChunkKey]] = None) -> List[ChunkKey]:
        """Read every durable chunk (or those given) and return the ones that fail their checks."""
        with self._lock:
            items = [(k, self._index[k]) for k in (self._index if keys is None else keys) if k in self._index]
        bad = []
        for k, loc in items:
            try:
                self._read_file(k, loc, np.empty(loc.nbytes, np.uint8))
            except CorruptChunkError:
                bad.append(k)
        return bad

    def _read_into(self, key: ChunkKey, loc: _Loc, out):
        """(the chunk as a tensor, in `out` when given; its file's size), uncounted."""
        t = _out_tensor(out, loc.nbytes, key)
        return t, self._read_files([key], [loc], [t])[0]

    @staticmethod
    def _scratch_size(nbytes: int) -> int:
        """Bytes of a scratch buffer for the file of a chunk of up to nbytes (at least 64 KiB)."""
        return max(io.direct_read_size(nbytes), 1 << 16)

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's buffer for the file bytes of a chunk of up to nbytes (O_DIRECT-aligned)."""
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.shape[0] < io.direct_read_size(nbytes):
            buf = self._tls.buf = io.direct_buffer(self._scratch_size(nbytes))
        return buf

    def read_into_async(self, keys: Sequence[ChunkKey], buffer, stride: int) -> Callable[[], None]:
        """read_many_async() into one buffer: chunk keys[j] into buffer[j * stride :][: its nbytes]
        (buffer: a contiguous uint8 CPU tensor of at least len(keys) * stride bytes). The buffer is
        checked once, not a tensor per chunk (a decode step reads dozens of chunks a layer into one
        pinned buffer, and per-chunk checks were most of the set-up). Returns the function that waits
        for the reads (raising their error); the chunks are then in the buffer."""
        import torch

        keys = list(keys)
        n = len(keys)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ConfigError(f"read_into_async: stride must be a positive int, got {stride!r}")
        if (not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or not buffer.is_cpu
                or not buffer.is_contiguous() or buffer.numel() < n * stride):
            desc = f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}" if isinstance(buffer, torch.Tensor) else type(buffer).__name__
            raise FormatError(f"read_into_async: buffer must be a contiguous uint8 CPU tensor of at least "
                              f"{n} x {stride} bytes, got {desc}")
        if n == 0:
            return lambda: None
        rows = buffer.view(-1)[: n * stride].view(n, stride)
        locs = self._locate(keys)
        for key, loc in zip(keys, locs):
            if loc is not None and loc.nbytes > stride:
                raise FormatError(f"chunk {key}: {loc.nbytes} bytes do not fit a stride of {stride} bytes")
        step = min(self._read_threads, -(-n // MIN_PER_THREAD))
        started = None
        if self._native is not None and step > 1:
            base = buffer.data_ptr()
            started = self._start_native(keys, locs, step, lambda j: rows[j],
                                         lambda j: rows[j, : locs[j].nbytes], lambda j: base + j * stride, buffer)
        if started is not None:
            wait = started
        else:
            wait = self.read_many_async(keys, rows.unbind(0))

        def done() -> None:
            wait()

        return done

    def _start_native(self, keys, locs, threads: int, out_of, tensor_of, ptr_of=None,
                      keep=None) -> Optional[Callable[[], list]]:
        """Start the C reader on a batch (tkv_read_start) and return the function that waits for it and
        returns what read_many() would; None when its thread could not be started. out_of(j): where
        keys[j] goes as read() takes it; tensor_of(j): that place checked, as a tensor of the chunk's
        size (built only where needed); ptr_of(j): its address (default: tensor_of(j)'s). `keep`: what
        must stay alive while the threads write. Chunks queued for writing are served from the queue
        here, before the start."""
        got, mine = self._serve_queued(keys, locs, out_of)
        if not mine:
            return lambda: got
        mkeys, mlocs = [keys[j] for j in mine], [locs[j] for j in mine]
        ts = None
        if ptr_of is None:
            ts = [tensor_of(j) for j in mine]
            ptrs = [t.data_ptr() for t in ts]
        else:
            ptrs = [ptr_of(j) for j in mine]

        def tensors():
            return ts if ts is not None else [tensor_of(j) for j in mine]

        args, status, info, hold = self._native_args(mlocs, ptrs)
        largest = max(loc.nbytes for loc in mlocs)
        handle = self._native.tkv_read_start(*args, self._scratch_size(largest), status.ctypes.data,
                                             info.ctypes.data, threads)
        if not handle:
            return None
        # until the reads are waited for, the C threads write into the outputs: they and the arrays stay
        # referenced by the tier (not only by the returned function), and close() waits for any left
        entry = [handle, None, (ts, keep, hold, status, info)]  # [handle not yet waited for, its result, kept]
        with self._lock:
            self._native_reads[id(entry)] = entry
        done: list = []

        def wait() -> list:
            if done:
                if isinstance(done[0], BaseException):
                    raise done[0]
                return done[0]
            with self._lock:
                h, entry[0] = entry[0], None
                self._native_reads.pop(id(entry), None)
            failed = self._native.tkv_read_wait(h) if h is not None else entry[1]  # else close() waited
            sizes = []
            try:
                if failed < 0:  # no thread got its scratch buffer: read them here, one thread
                    sizes = self._read_files(mkeys, mlocs, tensors())
                else:
                    sizes = self._native_outcome(failed, mkeys, mlocs, tensors, status, info, threads)
            except BaseException as exc:
                done.append(exc)
                raise
            finally:
                self._tally(len(sizes), sum(loc.nbytes for loc in mlocs[: len(sizes)]), sum(sizes))
            if ts is not None:
                for j, t in zip(mine, ts):
                    got[j] = t
            done.append(got)
            return got

        return wait

    def _native_args(self, locs: Sequence[_Loc], ptrs: Sequence[int]) -> tuple:
        """The C reader's leading arguments for reading chunk files `locs` to addresses `ptrs` (each with
        room for its chunk): (count, path, size, file size and output address arrays, O_DIRECT); the
        status and info arrays it fills (numpy); and what must stay alive until it is done. The arrays
        are rows of one numpy array (ctypes arrays, built element by element, cost more than the call)."""
        m = len(locs)
        a = np.empty((4, m), np.int64)
        a[0] = [loc.pptr for loc in locs]
        a[1] = [loc.nbytes for loc in locs]
        a[2] = [loc.size for loc in locs]
        a[3] = ptrs
        status, info = np.full(m, _native.NOT_READ, np.int32), np.zeros(3 * m, np.int64)
        d = a.ctypes.data
        return (m, d, d + 8 * m, d + 16 * m, d + 24 * m, int(self._direct)), status, info, (a, list(locs))

    def _read_files(self, keys: Sequence[ChunkKey], locs: Sequence[_Loc], ts: Sequence, threads: int = 1) -> List[int]:
        """Read and check chunks into the uint8 tensors `ts` (uncounted); returns their file sizes.
        Raises as _read_file does, for the first chunk that fails (with one thread the ones after it
        are not read; with several, all are tried). `threads` > 1: the C reader's threads."""
        lib = self._native
        if lib is None:
            return [self._read_file(k, loc, t.numpy()) for k, loc, t in zip(keys, locs, ts)]
        args, status, info, hold = self._native_args(locs, [t.data_ptr() for t in ts])
        largest = max(loc.nbytes for loc in locs)
        failed = -1
        sp, ip = status.ctypes.data, info.ctypes.data
        if threads > 1 and len(keys) > 1:  # scratch buffers of the C reader's own, sized as _scratch sizes them
            failed = lib.tkv_read_chunks_mt(*args, self._scratch_size(largest), sp, ip, threads)
        if failed < 0:  # one thread (or the threads could not get their buffers): this thread's scratch
            buf = self._scratch(largest)
            failed = lib.tkv_read_chunks(*args, buf.ctypes.data, buf.shape[0], sp, ip, 1)
        del hold  # the argument arrays, kept alive through the calls above (args holds their addresses)
        return self._native_outcome(failed, keys, locs, lambda: ts, status, info, threads)

    def _native_outcome(self, failed: int, keys, locs, tensors, status, info, threads: int) -> List[int]:
        """The file sizes of a batch the C reader read, or the error of its first failed chunk
        (tensors(): the batch's outputs, for reading its rest again without O_DIRECT)."""
        if not failed:
            return info[0::3].tolist()
        direct = self._direct
        i = int(np.flatnonzero(status != _native.OK)[0])
        sizes = info[0 : 3 * i : 3].tolist()
        code, (a, b, c) = int(status[i]), info[3 * i : 3 * i + 3].tolist()
        if direct and code in (_native.OPEN_FAILED, _native.READ_FAILED) and a == errno.EINVAL:
            # the filesystem (tmpfs, some FUSE mounts) refuses O_DIRECT: buffered reads from now on
            self._direct = False
            return sizes + self._read_files(keys[i:], locs[i:], tensors()[i:], threads)
        key, loc = keys[i], locs[i]
        if code == _native.OPEN_FAILED and a == errno.ENOENT:
            self._missing_file(key, loc)
        if code in (_native.OPEN_FAILED, _native.READ_FAILED):
            err = OSError(a, os.strerror(a), loc.path)
            self._count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key}: reading {loc.path!r} failed: {err}") from err
        self._count("corrupt_chunks")
        raise CorruptChunkError(f"chunk {key} ({loc.path}): {io.native_problem(code, (a, b, c), loc.nbytes)}")

    def _missing_file(self, key: ChunkKey, loc: _Loc) -> None:
        """Raise for a chunk file that is not there: deleted or rewritten under us, or lost."""
        with self._lock:
            gone = self._index.get(key) is not loc
        if gone:
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self._root!r}") from None
        self._count("corrupt_chunks")
        raise CorruptChunkError(f"chunk {key}: its file {loc.path!r} is missing") from None

    def _read_file(self, key: ChunkKey, loc: _Loc, out: np.ndarray) -> int:
        """Read and check chunk `key`'s file into `out`; returns the file's size (the caller counts it)."""
        cap = io.max_file_size(loc.nbytes) + 1  # one byte more than any valid file, to see overlong ones
        want = io.direct_read_size(loc.nbytes)
        buf = self._scratch(loc.nbytes)
        path = loc.path
        try:
            direct = self._direct
            try:
                n = io.read_file(path, buf[:want] if direct else buf[:cap], loc.size, direct=direct)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                # the filesystem (tmpfs, some FUSE mounts) refuses O_DIRECT: buffered reads from now on
                self._direct = False
                n = io.read_file(path, buf[:cap], loc.size)
            if n >= cap:
                raise CorruptChunkError(f"file is longer than any valid chunk file of {loc.nbytes} bytes")
            io.decode_into(buf[:n], loc.nbytes, out)
        except FileNotFoundError:
            self._missing_file(key, loc)
        except CorruptChunkError as exc:
            self._count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key} ({path}): {exc}") from None
        except OSError as exc:  # EIO and the like: the chunk cannot be served
            self._count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key}: reading {path!r} failed: {exc}") from exc
        return n

    def _tally(self, chunks: int, raw: int, disk: int) -> None:
        if chunks:
            with self._lock:
                c = self._counts
                c["chunks_read"] += chunks
                c["bytes_read_raw"] += raw
                c["bytes_read_disk"] += disk

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._read_threads, thread_name_prefix="tierkv-disk-reader")
            return self._pool

    # --- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._write_batch(batch)
            except BaseException as exc:  # a bug here must surface, not kill the worker silently
                for e in batch:
                    if not e.finished:
                        self._fail(e, exc)
                        self._finish(e)

    def _write_batch(self, batch: List[_Entry]) -> None:
        staged = []
        for e in batch:
            if e.cancelled:
                self._finish(e)
                continue
            what = f"chunk {e.key}"
            try:
                adir = self._array_dir(e.key.stream, e.key.layer, e.nbytes, what)
                comp, crc = io.encode(e.data)
                tmp = io.write_tmp(adir, io.chunk_name(e.key.index), [comp, crc], what)
                staged.append((e, adir, tmp, len(comp) + len(crc)))
            except BaseException as exc:
                self._fail(e, exc)
                self._finish(e)
        dirs, renamed = set(), []
        with self._lock:
            for e, adir, tmp, size in staged:
                if e.cancelled:  # deleted while being written
                    io.remove_quietly(tmp)
                    continue
                final = os.path.join(adir, io.chunk_name(e.key.index))
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    io.remove_quietly(tmp)
                    e.error = io.os_error(exc, f"chunk {e.key}")
                    continue
                old = self._index.get(e.key)
                if old is not None:
                    self._used -= old.size
                    if old.adir != adir:  # rewritten with another size: the old file goes
                        io.remove_quietly(old.path)
                        dirs.add(old.adir)
                self._index[e.key] = _Loc(final, adir, e.nbytes, size)
                self._used += size
                self._drop_pending(e)
                dirs.add(adir)
                renamed.append((e, size))
        try:
            io.fsync_dirs(dirs)
            synced = None
        except OSError as exc:
            synced = exc
        for e, adir, tmp, size in staged:
            if e.error is None and synced is not None and any(e is r for r, _ in renamed):
                e.error = io.os_error(synced, f"chunk {e.key}")
            if e.error is not None:
                self._fail(e, e.error)
        for e, size in renamed:
            if e.error is None:
                with self._lock:
                    c = self._counts
                    c["chunks_written"] += 1
                    c["bytes_written_raw"] += e.nbytes
                    c["bytes_written_disk"] += size
                if e.on_durable is not None:
                    try:
                        e.on_durable(e.key)
                    except BaseException as exc:
                        self._fail(e, WriteBehindError(f"on_durable callback for chunk {e.key} raised {exc!r}"), exc)
        for e, *_ in staged:
            self._finish(e)

    def _array_dir(self, stream: str, layer: int, nbytes: int, what: str) -> str:
        """Directory of the array for (stream, layer, nbytes), created (durably) on first use by `what`."""
        adir = self._arrays.get((stream, layer, nbytes))
        if adir is not None:
            return adir
        sdir = os.path.join(self._root, stream)
        if stream not in self._streams:
            os.makedirs(sdir, exist_ok=True)
            io.under_root(self._root_real, sdir, what)
            if not os.path.exists(os.path.join(sdir, io.ZARR_JSON)):
                io.write_durable(sdir, io.ZARR_JSON, io.json_bytes(io.group_metadata()), f"{what}: stream group")
            io.fsync_dir(self._root)
            self._streams.add(stream)
        adir = os.path.join(sdir, io.array_name(layer, nbytes))
        os.makedirs(adir, exist_ok=True)
        io.under_root(self._root_real, adir, what)
        io.write_durable(adir, io.ZARR_JSON, io.json_bytes(io.array_metadata(stream, layer, nbytes)),
                         f"{what}: array metadata {adir!r}")
        io.fsync_dir(sdir)
        self._arrays[(stream, layer, nbytes)] = adir
        return adir

    def _fail(self, e: _Entry, exc: BaseException, cause: Optional[BaseException] = None) -> None:
        if isinstance(exc, TierKVError):
            err = exc
        else:
            err = WriteBehindError(f"write of chunk {e.key} failed: {exc!r}")
            cause = exc
        if cause is not None and err.__cause__ is None:
            err.__cause__ = cause
        with self._lock:
            self._counts["write_errors"] += 1
            self._drop_pending(e)
            if e.done is not None:
                e.error = err  # a synchronous write raises it in its caller
            else:
                self._errors.append(err)

    def _finish(self, e: _Entry) -> None:
        with self._lock:
            if e.finished:
                return
            e.finished = True
            self._drop_pending(e)
            self._reserved -= e.reserve
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()
        e.data = None
        if e.done is not None:
            e.done.set()

    def _drop_pending(self, e: _Entry) -> None:
        """Forget a queued entry (caller holds the lock)."""
        lst = self._pending.get(e.key)
        if lst is not None:
            for i, x in enumerate(lst):
                if x is e:
                    del lst[i]
                    break
            if not lst:
                del self._pending[e.key]

    # --- errors and shutdown -------------------------------------------------------------------
    def _raise_stored_error(self) -> None:
        if not self._errors:
            return
        with self._lock:
            errs, self._errors = self._errors, []
        if not errs:
            return
        err = errs[0]
        if len(errs) > 1:
            err.add_note(f"{len(errs) - 1} more write-behind failures followed")
        raise err

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError(f"disk tier at {self._root!r} is closed")
        if threading.get_ident() == self._worker.ident:
            # the queue drains only on this thread: blocking here would wait on ourselves forever
            raise WriteBehindError("put/write/flush/close of the disk tier cannot be called from on_durable")

    def _check_worker(self) -> None:
        if not self._worker.is_alive() and not self._closed:
            raise WriteBehindError(f"disk tier at {self._root!r}: the writer thread has stopped")

    def close(self, timeout: float = 60.0) -> None:
        """Flush, stop the writer thread (waiting at most `timeout` s for each) and release the store."""
        if self._closed:
            return
        self._check_open()
        err: Optional[BaseException] = None
        try:
            self.flush(timeout)
        except TierKVError as exc:
            err = exc
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._worker.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:  # reads started and not waited for: their threads write into buffers they hold
            for entry in self._native_reads.values():
                entry[0], entry[1] = None, self._native.tkv_read_wait(entry[0])
            self._native_reads = {}
        os.close(self._lock_fd)
        if err is None and self._worker.is_alive():
            err = WriteBehindError(f"disk tier at {self._root!r}: the writer thread did not stop within {timeout} s")
        if err is not None:
            raise err

    def __enter__(self) -> "DiskTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiskTier({self._root!r}, chunks={len(self._index)}, used={self._used}, budget={self._budget})"


# --- argument checks ---------------------------------------------------------------------------
def _valid_stream(name: str) -> bool:
    try:
        check_name(name)
        return True
    except ConfigError:
        return False


def _check_key(key) -> None:
    if not isinstance(key, ChunkKey):
        raise ConfigError(f"key: expected a ChunkKey, got {type(key).__name__} {key!r}")
    if key.stream in io.RESERVED_NAMES:
        raise ConfigError(f"key {key}: stream name {key.stream!r} is reserved by the disk store layout")
    if key.index >= io.ROWS:
        raise ConfigError(f"key {key}: chunk index {key.index} is too large; the disk tier holds indices < 2**40")


def _as_bytes_array(data, copy: bool, key) -> np.ndarray:
    """A 1-D uint8 numpy view (or copy) of a chunk's bytes."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported already
    if torch is not None and isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1 or data.device.type != "cpu" or not data.is_contiguous():
            raise FormatError(
                f"chunk {key}: expected a contiguous 1-D uint8 CPU tensor, got {tuple(data.shape)} {data.dtype} "
                f"on {data.device}"
            )
        arr = data.numpy()
    elif isinstance(data, bytes):
        arr, copy = np.frombuffer(data, np.uint8), False  # immutable: nothing to protect
    elif isinstance(data, (bytearray, memoryview, np.ndarray)):
        arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise FormatError(f"chunk {key}: expected contiguous 1-D uint8 bytes, got {arr.dtype} of shape {arr.shape}")
    else:
        raise FormatError(f"chunk {key}: expected a uint8 CPU tensor or a bytes-like object, got {type(data).__name__}")
    n = arr.shape[0]
    if not 0 < n <= io.LZ4_MAX_INPUT:
        raise FormatError(f"chunk {key}: {n} bytes; the disk tier stores chunks of 1 to {io.LZ4_MAX_INPUT} bytes")
    return arr.copy() if copy else arr


def _out_tensor(out, nbytes: int, key):
    import torch

    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or not out.is_cpu
            or not out.is_contiguous() or out.numel() < nbytes):
        desc = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise FormatError(f"chunk {key}: out must be a contiguous uint8 CPU tensor of at least {nbytes} bytes, got {desc}")
    if out.dim() == 1 and out.shape[0] == nbytes:  # the common case: skip two tensor ops (µs each)
        return out
    return out.view(-1)[:nbytes]
