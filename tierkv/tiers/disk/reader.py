"""The disk tier's read entry points: one chunk, a batch now or started in the background, a batch into
one buffer, and which reader does the work.

A chunk still queued for writing is served from its queued bytes. A batch large enough to share out is
read on several threads: the C reader's own where it is loaded (one foreign call starts them and
returns at once, so no Python thread takes the GIL to pick up or hand back the work), else a small
pool of Python threads (file reads and lz4 run without the GIL).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

import numpy as np

from ...errors import ChunkNotFoundError, ConfigError, CorruptChunkError, FormatError
from ...keys import ChunkKey
from .files import FileReader
from .index import DiskIndex
from .writer import StoredErrors


class ChunkReader:
    """Reads for one disk tier. read_threads: threads a batch is shared over; min_per_thread: fewest
    chunks a thread is given (each thread's share costs Python time); read_files: the door every read of
    located files goes through, as FileReader.read_files (default: files.read_files)."""

    def __init__(self, index: DiskIndex, errors: StoredErrors, files: FileReader, read_threads: int,
                 min_per_thread: int, read_files: Optional[Callable[..., List[int]]] = None) -> None:
        self._index = index
        self._errors = errors
        self._files = files
        self._read_files = read_files or files.read_files
        self.read_threads = read_threads
        self._min_per_thread = min_per_thread
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._batches: dict = {}  # batches the C reader reads on its own threads, not yet waited for

    @property
    def pool_started(self) -> bool:
        """Whether a Python reader thread was ever started."""
        return self._pool is not None

    @property
    def native_batches_pending(self) -> int:
        """Batches started on the C reader's threads and not yet waited for."""
        with self._lock:
            return len(self._batches)

    def read(self, key: ChunkKey, out=None):
        """See DiskTier.read."""
        self._errors.raise_first()
        src, loc = self._index.lookup(key)
        if src is not None:
            t = out_tensor(out, src.shape[0], key)
            np.copyto(t.numpy(), src)
            self._index.count("reads_from_queue")
            return t
        if loc is None:
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self._index.root!r}")
        t = out_tensor(out, loc.nbytes, key)
        n = self._read_files([key], [loc], [t])[0]
        self._index.tally_read(1, loc.nbytes, n)
        return t

    def read_many_async(self, keys: Sequence[ChunkKey], outs: Optional[Sequence] = None,
                        inline: bool = False) -> Callable[[], list]:
        """See DiskTier.read_many_async."""
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
        step = self._threads_for(n)
        locs = self.locate(keys)
        lib = self._files.lib
        if lib is not None and not inline and step > 1:
            # the C reader reads the batch on threads of its own, started by one foreign call that returns
            # at once: no Python thread takes part (one would take the GIL to pick up the work and to hand
            # back the result, and the decode thread would queue behind it); the set-up is done here
            started = self._start_native(keys, locs, step, lambda j: outs[j],
                                         lambda j: out_tensor(outs[j], locs[j].nbytes, keys[j]))
            if started is not None:
                return started
        if lib is not None or step == 1:
            # one foreign call reads the batch on `step` threads (no GIL held), in this thread or one
            # reader thread of Python's
            if inline:
                got = self._read_located(keys, outs, locs, step)
                return lambda: got
            future = self._executor().submit(self._read_located, keys, outs, locs, step)
            return future.result
        return self._read_shared(keys, outs, locs, step)

    def _threads_for(self, n: int) -> int:
        # one task per thread over an interleaved share of the keys: a future per chunk costs more
        # than the thread hand-off saves at these sizes; and at least min_per_thread chunks a thread:
        # a decode step's batch of ~30 chunks read fastest on 8 threads on the H200 machine's disk, not
        # on 16, and each thread's share costs Python time
        return min(self.read_threads, -(-n // self._min_per_thread))

    def _read_shared(self, keys, outs, locs, step: int) -> Callable[[], list]:
        """The Python reader on `step` pool threads, each over an interleaved share of the keys."""
        n = len(keys)
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
        """See DiskTier.read_batch."""
        keys, outs = list(keys), list(outs)
        if len(outs) != len(keys):
            raise ConfigError(f"read_batch: {len(outs)} output tensors for {len(keys)} keys; expected one per key")
        return self._read_located(keys, outs, self.locate(keys))

    def read_into_async(self, keys: Sequence[ChunkKey], buffer, stride: int) -> Callable[[], None]:
        """See DiskTier.read_into_async."""
        keys = list(keys)
        n = len(keys)
        _check_buffer(buffer, n, stride)
        if n == 0:
            return lambda: None
        rows = buffer.view(-1)[: n * stride].view(n, stride)
        locs = self.locate(keys)
        for key, loc in zip(keys, locs):
            if loc is not None and loc.nbytes > stride:
                raise FormatError(f"chunk {key}: {loc.nbytes} bytes do not fit a stride of {stride} bytes")
        step = self._threads_for(n)
        started = None
        if self._files.lib is not None and step > 1:
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

    def verify(self, keys: Optional[Sequence[ChunkKey]] = None) -> List[ChunkKey]:
        """See DiskTier.verify."""
        bad = []
        for k, loc in self._index.durable(keys):
            try:
                self._files.read_file(k, loc, np.empty(loc.nbytes, np.uint8))
            except CorruptChunkError:
                bad.append(k)
        return bad

    def locate(self, keys: Sequence[ChunkKey]) -> list:
        """Each key's file (None: queued for writing, or gone); raises a stored write failure first."""
        self._errors.raise_first()
        return self._index.locate(keys)

    def _read_located(self, keys, outs, locs, threads: int = 1) -> list:
        """The chunks keys[j] read into outs[j] (None: a new tensor); locs[j] None: through read().
        `threads`: the C reader's threads for the batch (the Python reader reads in this thread)."""
        got, mine = self._serve_queued(keys, locs, lambda j: outs[j])
        if not mine:
            return got
        ts = [out_tensor(outs[j], locs[j].nbytes, keys[j]) for j in mine]
        sizes = []
        try:
            sizes = self._read_files([keys[j] for j in mine], [locs[j] for j in mine], ts, threads)
        finally:
            self._index.tally_read(len(sizes), sum(locs[j].nbytes for j in mine[: len(sizes)]), sum(sizes))
        for j, t in zip(mine, ts):
            got[j] = t
        return got

    def _serve_queued(self, keys, locs, out_of) -> tuple:
        """read() of the chunks locate found no file for (queued for writing, which read() serves, or
        gone, which it explains) into out_of(j); returns (results, None for the rest; the rest's indices)."""
        got: list = [None] * len(keys)
        mine = []
        for j, loc in enumerate(locs):
            if loc is None:
                got[j] = self.read(keys[j], out_of(j))
            else:
                mine.append(j)
        return got, mine

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
        mlocs = [locs[j] for j in mine]
        ts = None
        if ptr_of is None:
            ts = [tensor_of(j) for j in mine]
            ptrs = [t.data_ptr() for t in ts]
        else:
            ptrs = [ptr_of(j) for j in mine]
        args, status, info, hold = self._files.native_args(mlocs, ptrs)
        largest = max(loc.nbytes for loc in mlocs)
        handle = self._files.lib.tkv_read_start(*args, self._files.scratch_size(largest), status.ctypes.data,
                                                info.ctypes.data, threads)
        if not handle:
            return None
        # until the reads are waited for, the C threads write into the outputs: they and the arrays stay
        # referenced by the reader (not only by the returned function), and close() waits for any left
        batch = NativeBatch(self.take, self._files, self._read_files, self._index, handle, threads,
                            [keys[j] for j in mine], mlocs, mine, got, ts, tensor_of, (ts, keep, hold, status, info))
        with self._lock:
            self._batches[id(batch)] = batch
        return batch.wait

    def take(self, batch: "NativeBatch"):
        """The handle of a started batch, for its one wait (None: close() waited for it already)."""
        with self._lock:
            self._batches.pop(id(batch), None)
            return batch.take_handle()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="tierkv-disk-reader")
            return self._pool

    def close(self) -> None:
        """Stop the reader threads; wait for batches started and not waited for (their threads write
        into buffers they hold)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            for batch in self._batches.values():
                batch.join()
            self._batches = {}


class NativeBatch:
    """A batch the C reader reads on threads of its own; wait() returns what read_many() would (the
    same list however often it is called, or the same error)."""

    def __init__(self, take: Callable[["NativeBatch"], object], files: FileReader, read_files, index: DiskIndex,
                 handle, threads: int, keys, locs, mine, got, ts, tensor_of, kept) -> None:
        self._take = take  # the reader's: forgets the batch, hands over its handle
        self._files, self._read_files, self._index = files, read_files, index
        self._handle = handle  # not yet waited for; None once taken
        self._failed = None  # tkv_read_wait's result when close() waited for it
        self._keys, self._locs, self._mine, self._got, self._ts = keys, locs, mine, got, ts
        self._tensor_of = tensor_of
        self._kept = kept  # what the C threads read or write until they are done
        self._threads = threads
        self._done: list = []

    def take_handle(self):
        """(Under the reader's lock.) The handle for the one wait on it, or None after close()."""
        h, self._handle = self._handle, None
        return h

    def join(self) -> None:
        """(Under the reader's lock, at close.) Wait for the C threads; keep their result for wait()."""
        h, self._handle = self._handle, None
        self._failed = self._files.lib.tkv_read_wait(h)

    def _tensors(self) -> list:
        return self._ts if self._ts is not None else [self._tensor_of(j) for j in self._mine]

    def wait(self) -> list:
        if self._done:
            if isinstance(self._done[0], BaseException):
                raise self._done[0]
            return self._done[0]
        files, index = self._files, self._index
        h = self._take(self)
        failed = files.lib.tkv_read_wait(h) if h is not None else self._failed
        status, info = self._kept[3], self._kept[4]
        keys, locs = self._keys, self._locs
        sizes = []
        try:
            if failed < 0:  # no thread got its scratch buffer: read them here, one thread
                sizes = self._read_files(keys, locs, self._tensors())
            else:
                sizes = files.native_outcome(failed, keys, locs, self._tensors, status, info, self._threads)
        except BaseException as exc:
            self._done.append(exc)
            raise
        finally:
            index.tally_read(len(sizes), sum(loc.nbytes for loc in locs[: len(sizes)]), sum(sizes))
        got = self._got
        if self._ts is not None:
            for j, t in zip(self._mine, self._ts):
                got[j] = t
        self._done.append(got)
        return got


def _check_buffer(buffer, n: int, stride: int) -> None:
    import torch

    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"read_into_async: stride must be a positive int, got {stride!r}")
    if (not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or not buffer.is_cpu
            or not buffer.is_contiguous() or buffer.numel() < n * stride):
        desc = f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}" if isinstance(buffer, torch.Tensor) else type(buffer).__name__
        raise FormatError(f"read_into_async: buffer must be a contiguous uint8 CPU tensor of at least "
                          f"{n} x {stride} bytes, got {desc}")


def out_tensor(out, nbytes: int, key):
    """`out` checked as the place for a chunk of nbytes (its first nbytes), or a new tensor if None."""
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
