"""The disk tier's write-behind worker: one thread behind a bounded queue.

A chunk is compressed, written under a temporary name, fsynced, renamed onto its final name, and its
directory fsynced; only then is `on_durable(key)` called. Several queued chunks are written as a batch
so that each directory is fsynced once per batch. A write that fails is kept and raised by the tier's
next call (put, flush, read); a synchronous write raises in its own caller.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import List, Optional

import numpy as np

from ...errors import ConfigError, FormatError, TierKVError
from ...keys import ChunkKey
from . import layout as io
from .index import DiskIndex, QueuedWrite
from .layout import WriteBehindError

_STOP = object()  # the sentinel that ends the worker's loop


class StoredErrors:
    """Failures of writes nobody waits for, raised (the first, with a count of the rest) by the next
    call that checks them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: List[TierKVError] = []

    def add(self, err: TierKVError) -> None:
        with self._lock:
            self._errors.append(err)

    def raise_first(self) -> None:
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


class WriteBehind:
    """The worker thread and its queue for the store indexed by `index`. queue_depth: most writes queued
    before submit blocks; batch: most chunks written between two rounds of directory fsyncs; poll_s: how
    often a caller blocked on the worker checks that it is still alive."""

    def __init__(self, index: DiskIndex, errors: StoredErrors, queue_depth: int, batch: int, poll_s: float) -> None:
        self._index = index
        self._errors = errors
        self._batch = batch
        self._poll_s = poll_s
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_depth)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"tierkv-disk-writer:{index.root}", daemon=True)
        self._worker.start()

    @property
    def on_worker(self) -> bool:
        """Whether the calling thread is the worker (where blocking on the queue would wait forever)."""
        return threading.get_ident() == self._worker.ident

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def closed(self) -> bool:
        """Whether stop was called: the tier is closed."""
        return self._closed

    # --- callers' side -------------------------------------------------------------------------
    def submit(self, key: ChunkKey, data, on_durable, copy: bool, sync: bool) -> QueuedWrite:
        """Queue a write (blocking while the queue is full); see DiskTier.put and DiskTier.write."""
        _check_key(key)
        arr = _as_bytes_array(data, copy and not sync, key)
        entry = QueuedWrite(key, arr, io.max_file_size(arr.shape[0]), on_durable, sync)
        self._index.enqueue(entry)
        try:
            while True:
                try:
                    self._queue.put(entry, timeout=self._poll_s)
                    break
                except queue.Full:
                    self.check_worker()
        except BaseException:
            self._index.withdraw(entry)
            raise
        return entry

    def wait(self, entry: QueuedWrite) -> None:
        """Wait until a synchronous write is durable; raise its error."""
        while not entry.done.wait(self._poll_s):
            self.check_worker()
        if entry.error is not None:
            raise entry.error

    def check_worker(self) -> None:
        """Raise if the worker has stopped while the tier is open."""
        if not self._worker.is_alive() and not self._closed:
            raise WriteBehindError(f"disk tier at {self._index.root!r}: the writer thread has stopped")

    def stop(self, timeout: float) -> bool:
        """Ask the worker to stop after the writes queued so far; False if it is still running after
        `timeout` s."""
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # --- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self._batch:
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

    def _write_batch(self, batch: List[QueuedWrite]) -> None:
        staged = self._stage(batch)
        dirs, renamed = self._index.commit(staged)
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
                self._index.tally_written(e.nbytes, size)
                if e.on_durable is not None:
                    try:
                        e.on_durable(e.key)
                    except BaseException as exc:
                        self._fail(e, WriteBehindError(f"on_durable callback for chunk {e.key} raised {exc!r}"), exc)
        for e, *_ in staged:
            self._finish(e)

    def _stage(self, batch: List[QueuedWrite]) -> list:
        """Each write's file under a temporary name, fsynced: [(entry, array dir, temp file, file size)]."""
        staged = []
        for e in batch:
            if e.cancelled:
                self._finish(e)
                continue
            what = f"chunk {e.key}"
            try:
                adir = self._index.array_dir(e.key.stream, e.key.layer, e.nbytes, what)
                comp, crc = io.encode(e.data)
                tmp = io.write_tmp(adir, io.chunk_name(e.key.index), [comp, crc], what)
                staged.append((e, adir, tmp, len(comp) + len(crc)))
            except BaseException as exc:
                self._fail(e, exc)
                self._finish(e)
        return staged

    def _fail(self, e: QueuedWrite, exc: BaseException, cause: Optional[BaseException] = None) -> None:
        if isinstance(exc, TierKVError):
            err = exc
        else:
            err = WriteBehindError(f"write of chunk {e.key} failed: {exc!r}")
            cause = exc
        if cause is not None and err.__cause__ is None:
            err.__cause__ = cause
        self._index.failed(e)
        if e.done is not None:
            e.error = err  # a synchronous write raises it in its caller
        else:
            self._errors.add(err)

    def _finish(self, e: QueuedWrite) -> None:
        if not self._index.finish(e):
            return
        e.data = None
        if e.done is not None:
            e.done.set()


# --- argument checks ---------------------------------------------------------------------------
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
