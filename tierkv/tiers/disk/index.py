"""The disk tier's index: where each chunk's file is, which writes are queued, and the byte budget.

Opening a store creates it (an empty directory) or checks its manifest, takes an exclusive lock on it,
and rebuilds the index by listing the directories (no per-chunk manifest to keep in step), deleting
leftover temporary files, so it lists only complete chunks. The index is the one owner of locations,
queued entries, budget accounting and the tier's counters; the writer and the reader change them only
through its methods, each under its lock.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ...errors import CapacityError, ChunkNotFoundError, ConfigError, FormatVersionError, TierKVError
from ...keys import ChunkKey, check_name
from . import layout as io

COUNTERS = ("chunks_written", "bytes_written_raw", "bytes_written_disk", "chunks_read", "bytes_read_raw",
            "bytes_read_disk", "reads_from_queue", "corrupt_chunks", "write_errors")


class ChunkFile:
    """Where a durable chunk lives: its file, array directory, raw size and file size."""

    __slots__ = ("path", "adir", "nbytes", "size", "bpath", "pptr")

    def __init__(self, path: str, adir: str, nbytes: int, size: int) -> None:
        self.path, self.adir, self.nbytes, self.size = path, adir, nbytes, size
        self.bpath = os.fsencode(path)  # for the C reader: the bytes, and the address of their buffer
        self.pptr = ctypes.cast(ctypes.c_char_p(self.bpath), ctypes.c_void_p).value  # valid while bpath lives


class QueuedWrite:
    """One queued write. NOTE: `finished` is set by DiskIndex.finish only, under the index's lock."""

    __slots__ = ("key", "data", "nbytes", "reserve", "on_durable", "cancelled", "finished", "done", "error")

    def __init__(self, key, data, reserve, on_durable, sync):
        self.key, self.data, self.nbytes = key, data, data.shape[0]
        self.reserve, self.on_durable, self.cancelled, self.finished = reserve, on_durable, False, False
        self.done = threading.Event() if sync else None
        self.error: Optional[TierKVError] = None


class DiskIndex:
    """The index of the store at `root` (absolute), opened (or created) and scanned; budget in bytes of
    chunk files, or None. close() releases the store's lock."""

    def __init__(self, root: str, budget: Optional[int]) -> None:
        self.root = root
        self.budget = budget
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._locs: Dict[ChunkKey, ChunkFile] = {}
        self._pending: Dict[ChunkKey, List[QueuedWrite]] = {}
        self._arrays: Dict[tuple, str] = {}  # (stream, layer, nbytes) -> array directory (writer thread only)
        self._streams: set = set()  # stream directories made (writer thread only)
        self._outstanding = 0
        self._used = 0
        self._reserved = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self.root_real, self._lock_fd = open_store(root)
        try:
            self._scan()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        os.close(self._lock_fd)

    # --- reopening -----------------------------------------------------------------------------
    def _scan(self) -> None:
        """Rebuild the index from the directories; drop temporary files left by a crash."""
        for se in os.scandir(self.root):
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
                if 0 < nbytes <= io.LZ4_MAX_INPUT:
                    self._scan_array(se.name, layer, nbytes, ae.path)
        self._used = sum(loc.size for loc in self._locs.values())

    def _scan_array(self, stream: str, layer: int, nbytes: int, adir: str) -> None:
        if not os.path.exists(os.path.join(adir, io.ZARR_JSON)):
            # only possible if a crash cut the array's creation short, before any chunk
            io.write_durable(adir, io.ZARR_JSON, io.json_bytes(io.array_metadata(stream, layer, nbytes)),
                             f"array metadata {adir!r}")
        self._arrays[(stream, layer, nbytes)] = adir
        for ce in os.scandir(adir):
            if ce.name.startswith(io.TMP_PREFIX):
                io.remove_quietly(ce.path)
                continue
            cm = io.CHUNK_RE.match(ce.name)
            if not cm or not ce.is_file(follow_symlinks=False) or int(cm[1]) >= io.ROWS:
                continue
            key = ChunkKey(stream, layer, int(cm[1]))
            loc = ChunkFile(ce.path, adir, nbytes, ce.stat(follow_symlinks=False).st_size)
            prev = self._locs.get(key)
            if prev is not None:
                loc = _resolve_duplicate(prev, loc)
            self._locs[key] = loc

    # --- reading the index ---------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def free_bytes(self) -> Optional[int]:
        if self.budget is None:
            return None
        with self._lock:
            return max(0, self.budget - self._used - self._reserved)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._pending or key in self._locs

    def __len__(self) -> int:
        with self._lock:
            return len(self._locs.keys() | self._pending.keys())

    def __getitem__(self, key: ChunkKey) -> ChunkFile:
        """The file of a durable chunk (KeyError if it has none)."""
        with self._lock:
            return self._locs[key]

    def durable_count(self) -> int:
        return len(self._locs)

    def keys(self) -> List[ChunkKey]:
        with self._lock:
            return list(self._locs.keys() | self._pending.keys())

    def nbytes(self, key: ChunkKey) -> int:
        with self._lock:
            pend = self._pending.get(key)
            if pend:
                return pend[-1].nbytes
            loc = self._locs.get(key)
        if loc is None:
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self.root!r}")
        return loc.nbytes

    def lookup(self, key: ChunkKey):
        """(the bytes of its last queued write, None) for a queued chunk; else (None, its file or None)."""
        with self._lock:
            pend = self._pending.get(key)
            src = pend[-1].data if pend else None
            loc = None if pend else self._locs.get(key)
        return src, loc

    def locate(self, keys: Sequence[ChunkKey]) -> List[Optional[ChunkFile]]:
        """Each key's file (None: queued for writing, or gone), all under one look-up of the lock."""
        with self._lock:
            return [None if k in self._pending else self._locs.get(k) for k in keys]

    def durable(self, keys: Optional[Sequence[ChunkKey]] = None) -> List[Tuple[ChunkKey, ChunkFile]]:
        """(key, file) of every durable chunk, or of those of `keys` that are durable."""
        with self._lock:
            return [(k, self._locs[k]) for k in (self._locs if keys is None else keys) if k in self._locs]

    def is_current(self, key: ChunkKey, loc: ChunkFile) -> bool:
        """Whether `loc` is still the chunk's file (not deleted or rewritten since it was located)."""
        with self._lock:
            return self._locs.get(key) is loc

    # --- counters ------------------------------------------------------------------------------
    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def tally_read(self, chunks: int, raw: int, disk: int) -> None:
        if chunks:
            with self._lock:
                c = self._counts
                c["chunks_read"] += chunks
                c["bytes_read_raw"] += raw
                c["bytes_read_disk"] += disk

    def tally_written(self, raw: int, disk: int) -> None:
        with self._lock:
            c = self._counts
            c["chunks_written"] += 1
            c["bytes_written_raw"] += raw
            c["bytes_written_disk"] += disk

    def snapshot(self) -> dict:
        """The counters and accounting, for DiskStats."""
        with self._lock:
            return dict(chunks=len(self._locs.keys() | self._pending.keys()), used_bytes=self._used,
                        reserved_bytes=self._reserved, queued=self._outstanding, **self._counts)

    # --- queued writes -------------------------------------------------------------------------
    def enqueue(self, e: QueuedWrite) -> None:
        """Count a write against the budget (CapacityError if it would not fit) and serve reads of its
        chunk from its bytes until it lands."""
        with self._lock:
            if self.budget is not None and self._used + self._reserved + e.reserve > self.budget:
                raise CapacityError(
                    f"chunk {e.key}: {e.nbytes} bytes (up to {e.reserve} on disk) do not fit in the disk budget "
                    f"of {self.budget} bytes ({self._used} used, {self._reserved} queued)"
                )
            self._reserved += e.reserve
            self._outstanding += 1
            self._pending.setdefault(e.key, []).append(e)

    def withdraw(self, e: QueuedWrite) -> None:
        """Undo enqueue for a write that never reached the queue."""
        with self._lock:
            self._drop_pending(e)
            self._reserved -= e.reserve
            self._outstanding -= 1
            self._idle.notify_all()

    def finish(self, e: QueuedWrite) -> bool:
        """A queued write is done (landed, failed or cancelled); False if it was finished already."""
        with self._lock:
            if e.finished:
                return False
            e.finished = True
            self._drop_pending(e)
            self._reserved -= e.reserve
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()
        return True

    def failed(self, e: QueuedWrite) -> None:
        """A queued write failed: counted, and its chunk no longer served from its bytes."""
        with self._lock:
            self._counts["write_errors"] += 1
            self._drop_pending(e)

    def wait_idle(self, timeout: Optional[float], alive: Callable[[], bool]) -> Tuple[bool, int]:
        """Wait until no write is queued or alive() turns false; (whether it did, writes still queued)."""
        with self._lock:
            ok = self._idle.wait_for(lambda: self._outstanding == 0 or not alive(), timeout)
            return ok, self._outstanding

    def _drop_pending(self, e: QueuedWrite) -> None:
        """Forget a queued entry (caller holds the lock)."""
        lst = self._pending.get(e.key)
        if lst is not None:
            for i, x in enumerate(lst):
                if x is e:
                    del lst[i]
                    break
            if not lst:
                del self._pending[e.key]

    # --- files landing and leaving -------------------------------------------------------------
    def commit(self, staged) -> Tuple[set, list]:
        """Rename staged files, staged = [(entry, array dir, temporary file, file size)], onto their final
        names and make them the chunks' locations; a write cancelled meanwhile is dropped, a failed
        rename is noted in its entry's error. Returns (directories to fsync, [(entry, size)] renamed)."""
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
                old = self._locs.get(e.key)
                if old is not None:
                    self._used -= old.size
                    if old.adir != adir:  # rewritten with another size: the old file goes
                        io.remove_quietly(old.path)
                        dirs.add(old.adir)
                self._locs[e.key] = ChunkFile(final, adir, e.nbytes, size)
                self._used += size
                self._drop_pending(e)
                dirs.add(adir)
                renamed.append((e, size))
        return dirs, renamed

    def delete(self, key: ChunkKey) -> bool:
        """Remove a chunk (and cancel its queued writes); True if the tier held it."""
        with self._lock:
            entries = self._pending.pop(key, [])
            for e in entries:
                e.cancelled = True
            loc = self._locs.pop(key, None)
            if loc is not None:
                io.remove_quietly(loc.path)
                self._used -= loc.size
        return bool(entries) or loc is not None

    def array_dir(self, stream: str, layer: int, nbytes: int, what: str) -> str:
        """Directory of the array for (stream, layer, nbytes), created (durably) on first use by `what`.
        Called by the writer thread alone."""
        adir = self._arrays.get((stream, layer, nbytes))
        if adir is not None:
            return adir
        sdir = os.path.join(self.root, stream)
        if stream not in self._streams:
            os.makedirs(sdir, exist_ok=True)
            io.under_root(self.root_real, sdir, what)
            if not os.path.exists(os.path.join(sdir, io.ZARR_JSON)):
                io.write_durable(sdir, io.ZARR_JSON, io.json_bytes(io.group_metadata()), f"{what}: stream group")
            io.fsync_dir(self.root)
            self._streams.add(stream)
        adir = os.path.join(sdir, io.array_name(layer, nbytes))
        os.makedirs(adir, exist_ok=True)
        io.under_root(self.root_real, adir, what)
        io.write_durable(adir, io.ZARR_JSON, io.json_bytes(io.array_metadata(stream, layer, nbytes)),
                         f"{what}: array metadata {adir!r}")
        io.fsync_dir(sdir)
        self._arrays[(stream, layer, nbytes)] = adir
        return adir


# --- opening -----------------------------------------------------------------------------------
def open_store(root: str) -> Tuple[str, int]:
    """Create the store at `root` (an empty or absent directory) or check the one there; take its lock.
    Returns (the root's real path, the locked manifest's file descriptor)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"disk store: {root!r} is a file; expected a directory (empty, or a tierkv store)")
    os.makedirs(root, exist_ok=True)
    root_real = os.path.realpath(root)
    mpath = os.path.join(root, io.MANIFEST)
    names = os.listdir(root)
    if io.MANIFEST in names:
        _check_manifest(io.load_manifest(mpath), mpath)
    else:
        _create(root, names)
    fd = os.open(mpath, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"disk store: {root!r} is already open (in this or another process); close it first")
    return root_real, fd


def _create(root: str, names: List[str]) -> None:
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


def _check_manifest(m: dict, mpath: str) -> None:
    if m.get("format") != io.FORMAT_NAME:
        raise ConfigError(f"disk store: manifest {mpath!r} has format {m.get('format')!r}; expected {io.FORMAT_NAME!r}")
    version = m.get("version")
    if version != io.FORMAT_VERSION:
        raise FormatVersionError(
            f"disk store: manifest {mpath!r} has format version {version!r}; this build reads version "
            f"{io.FORMAT_VERSION} only"
        )


def _resolve_duplicate(a: ChunkFile, b: ChunkFile) -> ChunkFile:
    """A chunk rewritten with a new size was cut short between writing the new file and removing the
    old: both are complete; the later write wins (rename keeps the temp file's mtime)."""
    newer, older = (a, b) if os.stat(a.path).st_mtime_ns >= os.stat(b.path).st_mtime_ns else (b, a)
    io.remove_quietly(older.path)
    return newer


def _valid_stream(name: str) -> bool:
    try:
        check_name(name)
        return True
    except ConfigError:
        return False
