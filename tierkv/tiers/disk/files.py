"""Reading located chunk files into memory and checking them: the C reader or the Python reader.

The C reader (native.py) opens, reads, checks the crc32c of and decompresses a list of chunk files in
one foreign call that holds no GIL, on one thread or several of its own. The Python reader
(layout.read_file + layout.decode_into) does one file at a time in this thread. Both give the same
bytes and raise the same errors; both read with O_DIRECT where the filesystem allows it, and fall back
to buffered reads for good on the first refusal.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import List, Sequence

import numpy as np

from ...errors import ChunkNotFoundError, CorruptChunkError
from ...keys import ChunkKey
from . import layout as io
from . import native as _native
from .index import ChunkFile, DiskIndex


class FileReader:
    """Reads files the index located. lib: the loaded C reader, or None for the Python reader; direct:
    try O_DIRECT first. Counts corrupt chunks in the index; the caller counts what was read."""

    def __init__(self, index: DiskIndex, lib, direct: bool) -> None:
        self._index = index
        self.lib = lib  # the C reader (native.library()), or None
        self._direct = direct
        self._tls = threading.local()  # per-thread scratch buffer for file bytes

    @property
    def direct(self) -> bool:
        """Whether files are read with O_DIRECT (turned off for good where the filesystem refuses it)."""
        return self._direct

    @staticmethod
    def scratch_size(nbytes: int) -> int:
        """Bytes of a scratch buffer for the file of a chunk of up to nbytes (at least 64 KiB)."""
        return max(io.direct_read_size(nbytes), 1 << 16)

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's buffer for the file bytes of a chunk of up to nbytes (O_DIRECT-aligned)."""
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.shape[0] < io.direct_read_size(nbytes):
            buf = self._tls.buf = io.direct_buffer(self.scratch_size(nbytes))
        return buf

    def native_args(self, locs: Sequence[ChunkFile], ptrs: Sequence[int]) -> tuple:
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

    def read_files(self, keys: Sequence[ChunkKey], locs: Sequence[ChunkFile], ts: Sequence, threads: int = 1) -> List[int]:
        """Read and check chunks into the uint8 tensors `ts` (uncounted); returns their file sizes.
        Raises as read_file does, for the first chunk that fails (with one thread the ones after it
        are not read; with several, all are tried). `threads` > 1: the C reader's threads."""
        lib = self.lib
        if lib is None:
            return [self.read_file(k, loc, t.numpy()) for k, loc, t in zip(keys, locs, ts)]
        args, status, info, hold = self.native_args(locs, [t.data_ptr() for t in ts])
        largest = max(loc.nbytes for loc in locs)
        failed = -1
        sp, ip = status.ctypes.data, info.ctypes.data
        if threads > 1 and len(keys) > 1:  # scratch buffers of the C reader's own, sized as _scratch's
            failed = lib.tkv_read_chunks_mt(*args, self.scratch_size(largest), sp, ip, threads)
        if failed < 0:  # one thread (or the threads could not get their buffers): this thread's scratch
            buf = self._scratch(largest)
            failed = lib.tkv_read_chunks(*args, buf.ctypes.data, buf.shape[0], sp, ip, 1)
        del hold  # the argument arrays, kept alive through the calls above (args holds their addresses)
        return self.native_outcome(failed, keys, locs, lambda: ts, status, info, threads)

    def native_outcome(self, failed: int, keys, locs, tensors, status, info, threads: int) -> List[int]:
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
            return sizes + self.read_files(keys[i:], locs[i:], tensors()[i:], threads)
        key, loc = keys[i], locs[i]
        if code == _native.OPEN_FAILED and a == errno.ENOENT:
            self._missing_file(key, loc)
        if code in (_native.OPEN_FAILED, _native.READ_FAILED):
            err = OSError(a, os.strerror(a), loc.path)
            self._index.count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key}: reading {loc.path!r} failed: {err}") from err
        self._index.count("corrupt_chunks")
        raise CorruptChunkError(f"chunk {key} ({loc.path}): {io.native_problem(code, (a, b, c), loc.nbytes)}")

    def _missing_file(self, key: ChunkKey, loc: ChunkFile) -> None:
        """Raise for a chunk file that is not there: deleted or rewritten under us, or lost."""
        if not self._index.is_current(key, loc):
            raise ChunkNotFoundError(f"chunk {key}: not in the disk tier at {self._index.root!r}") from None
        self._index.count("corrupt_chunks")
        raise CorruptChunkError(f"chunk {key}: its file {loc.path!r} is missing") from None

    def read_file(self, key: ChunkKey, loc: ChunkFile, out: np.ndarray) -> int:
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
            self._index.count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key} ({path}): {exc}") from None
        except OSError as exc:  # EIO and the like: the chunk cannot be served
            self._index.count("corrupt_chunks")
            raise CorruptChunkError(f"chunk {key}: reading {path!r} failed: {exc}") from exc
        return n
