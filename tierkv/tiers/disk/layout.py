"""The disk tier's bytes on disk: zarr v3 metadata, the chunk file encoding, durable file writes.

Layout of a store directory (a zarr v3 hierarchy that zarr-python opens as it is):

    zarr.json                       root group
    tierkv.json                     manifest: format name and version (written last at creation)
    <stream>/zarr.json              one group per stream
    <stream>/L<layer>.n<nbytes>/    one uint8 array of shape [2**40, nbytes], chunk shape [1, nbytes]
        zarr.json                   codecs: bytes -> numcodecs.lz4 -> crc32c
        c.<index>.0                 chunk <index> of that layer (zarr "default" key encoding, sep ".")

A chunk of n bytes is row <index> of the array for its (stream, layer, n). Variable-length zarr types
are an unstable extension in zarr 3.1, so each chunk size gets its own fixed-shape array instead.

A chunk file is exactly what zarr-python writes for those codecs:

    [u32 LE n][lz4 block of the n raw bytes][u32 LE crc32c of all bytes before it]

The crc covers the compressed bytes, so corruption is caught before lz4 ever sees them. Files are
written under a temporary name starting with TMP_PREFIX (never a valid zarr key), fsynced, then
renamed into place, so a final name always holds a complete file.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
import uuid
from typing import Iterable, Sequence

import numcodecs.lz4
import numpy as np

# computes without the GIL on large buffers, so reader threads check chunks side by side
from crc32c import crc32c as crc32c_value

from ...errors import CapacityError, ConfigError, CorruptChunkError, TierKVError

FORMAT_NAME = "tierkv-disk"
FORMAT_VERSION = 1
MANIFEST = "tierkv.json"
ZARR_JSON = "zarr.json"
TMP_PREFIX = ".tmp."
RESERVED_NAMES = frozenset({MANIFEST, ZARR_JSON})
ROWS = 2**40  # chunk indices per array; a ChunkKey index must stay below it
LZ4_MAX_INPUT = 0x7E000000  # LZ4_MAX_INPUT_SIZE: the largest block lz4 compresses
LZ4_ACCELERATION = 1
HEADER = 4  # numcodecs' u32 size prefix
CRC = 4
ARRAY_RE = re.compile(r"^L(\d+)\.n(\d+)$")
CHUNK_RE = re.compile(r"^c\.(\d+)\.0$")
# ENOSPC and EDQUOT both mean "no room": the caller must free space, not retry.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteBehindError(TierKVError):
    """A disk write failed for a reason other than space (an I/O error, a callback that raised)."""


class FlushTimeoutError(TierKVError, TimeoutError):
    """Queued writes did not become durable within the time asked for."""


def array_name(layer: int, nbytes: int) -> str:
    return f"L{layer}.n{nbytes}"


def chunk_name(index: int) -> str:
    return f"c.{index}.0"


def max_file_size(nbytes: int) -> int:
    """Largest valid chunk file for n raw bytes: LZ4_COMPRESSBOUND(n) + size header + crc."""
    return nbytes + nbytes // 255 + 16 + HEADER + CRC


def group_metadata() -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": {}}


def array_metadata(stream: str, layer: int, nbytes: int) -> dict:
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [ROWS, nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, nbytes]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [
            {"name": "bytes"},
            {"name": "numcodecs.lz4", "configuration": {"acceleration": LZ4_ACCELERATION}},
            {"name": "crc32c"},
        ],
        "attributes": {"tierkv": {"stream": stream, "layer": layer, "nbytes": nbytes}},
        "storage_transformers": [],
    }


def manifest() -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": {
            "array": "<stream>/L<layer>.n<nbytes>",
            "chunk": "c.<index>.0",
            "codecs": ["bytes", "numcodecs.lz4", "crc32c"],
        },
    }


def json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# --- chunk encoding ----------------------------------------------------------------------------
def encode(raw) -> tuple:
    """Raw chunk bytes (any buffer) -> (lz4 block with size header, crc32c as 4 LE bytes)."""
    comp = numcodecs.lz4.compress(raw, LZ4_ACCELERATION)
    return comp, struct.pack("<I", crc32c_value(comp))


def decode_into(buf: np.ndarray, nbytes: int, out: np.ndarray) -> None:
    """Check and decompress one chunk file's bytes `buf` into `out` (uint8, exactly nbytes).

    Raises CorruptChunkError (the caller adds which chunk) when the crc, the size header or the lz4
    block is wrong; `out` may then hold garbage and must not be used.
    """
    n = buf.shape[0]
    if n < HEADER + CRC:
        raise CorruptChunkError(f"file is {n} bytes; a valid chunk file has at least {HEADER + CRC}")
    body = buf[: n - CRC]
    stored = int.from_bytes(buf[n - CRC :].tobytes(), "little")
    computed = crc32c_value(body)
    if stored != computed:
        raise CorruptChunkError(
            f"crc32c mismatch (stored {stored:#010x}, computed {computed:#010x}); "
            f"the file ({n} bytes) is truncated or corrupt"
        )
    size = int.from_bytes(body[:HEADER].tobytes(), "little")
    if size != nbytes:
        raise CorruptChunkError(f"header says {size} raw bytes, expected {nbytes}")
    try:
        numcodecs.lz4.decompress(body, out)
    except (RuntimeError, ValueError) as exc:  # crc matched yet lz4 refuses: written corrupt
        raise CorruptChunkError(f"lz4 block does not decode: {exc}") from exc


DIRECT_ALIGN = 4096  # buffer address and request length for O_DIRECT reads (any logical block size up to 4K)


def direct_read_size(nbytes: int) -> int:
    """Bytes to ask for when reading the file of a chunk of nbytes: one more than any valid file (to see
    overlong ones), rounded up to whole DIRECT_ALIGN blocks."""
    return -(-(max_file_size(nbytes) + 1) // DIRECT_ALIGN) * DIRECT_ALIGN


def native_problem(code: int, info, nbytes: int) -> str:
    """What a failed check of the C reader (native.py) means, in decode_into's words."""
    from . import native as nat

    if code == nat.TOO_LONG:
        return f"file is longer than any valid chunk file of {nbytes} bytes"
    if code == nat.TOO_SHORT:
        return f"file is {info[0]} bytes; a valid chunk file has at least {HEADER + CRC}"
    if code == nat.BAD_CRC:
        return (f"crc32c mismatch (stored {info[1]:#010x}, computed {info[2]:#010x}); "
                f"the file ({info[0]} bytes) is truncated or corrupt")
    if code == nat.BAD_HEADER:
        return f"header says {info[0]} raw bytes, expected {nbytes}"
    if code == nat.BAD_BLOCK:
        return "lz4 block does not decode"
    return f"the C reader failed with status {code}"


def direct_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer of at least nbytes, rounded up to DIRECT_ALIGN, as O_DIRECT reads need."""
    size = -(-max(nbytes, 1) // DIRECT_ALIGN) * DIRECT_ALIGN
    return np.frombuffer(mmap.mmap(-1, size), np.uint8)


def read_file(path: str, buf: np.ndarray, expect: int, direct: bool = False) -> int:
    """Read the whole file at `path` into `buf`; return its length, or len(buf) if it may be longer.

    `buf` must be longer than `expect` (the size the file should have): one read that returns
    exactly `expect` bytes of the more asked for has met the end of the file, so the usual case
    costs a single system call; anything else is read on to the end and left to the checks.
    direct: read with O_DIRECT (past the page cache: one DMA into `buf`, no copy, no readahead, no
    cache pages to reclaim). `buf` must then come from direct_buffer and be a whole number of
    DIRECT_ALIGN blocks. Raises OSError (EINVAL) where the filesystem refuses O_DIRECT.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        cap = buf.shape[0]
        got = os.readv(fd, [buf])
        if got == expect:
            return got
        # on with the rest; with O_DIRECT only from a block boundary (a short count that is not a whole
        # number of blocks is the end of the file)
        while 0 < got < cap and not (direct and got % DIRECT_ALIGN):
            n = os.readv(fd, [buf[got:]])
            if n == 0:
                break
            got += n
        return got
    finally:
        os.close(fd)


# --- durable writes ----------------------------------------------------------------------------
def tmp_name(final: str) -> str:
    return f"{TMP_PREFIX}{final}.{uuid.uuid4().hex[:12]}"


def write_tmp(dirpath: str, final: str, bufs: Sequence, what: str) -> str:
    """Write `bufs` to a fresh temporary file beside `final` in `dirpath` and fsync it; return its path.

    On any failure the temporary file is removed and a TierKVError is raised (CapacityError when the
    disk is full).
    """
    tmp = os.path.join(dirpath, tmp_name(final))
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        _write_all(fd, bufs)
        os.fsync(fd)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
            fd = -1
        remove_quietly(tmp)
        raise os_error(exc, what) from exc
    finally:
        if fd >= 0:
            os.close(fd)
    return tmp


def _write_all(fd: int, bufs: Sequence) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):  # drop what went out whole, keep the rest of a short write
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def write_durable(dirpath: str, final: str, data: bytes, what: str) -> None:
    """Small files (metadata): temp write + fsync + rename + fsync of the directory."""
    tmp = write_tmp(dirpath, final, [data], what)
    try:
        os.rename(tmp, os.path.join(dirpath, final))
        fsync_dir(dirpath)
    except OSError as exc:
        remove_quietly(tmp)
        raise os_error(exc, what) from exc


def fsync_dir(dirpath: str) -> None:
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(dirs: Iterable[str]) -> None:
    for d in dirs:
        fsync_dir(d)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def os_error(exc: OSError, what: str) -> TierKVError:
    if exc.errno in _NO_SPACE:
        return CapacityError(f"{what}: the disk is full ({os.strerror(exc.errno)}); free space or lower the budget")
    return WriteBehindError(f"{what}: {exc}")


def under_root(root_real: str, path: str, what: str) -> str:
    """`path` resolved, refusing anything (a symlink, say) that leads outside the store root."""
    real = os.path.realpath(path)
    if real != root_real and not real.startswith(root_real + os.sep):
        raise ConfigError(f"{what}: path {path!r} resolves to {real!r}, outside the store at {root_real!r}")
    return real


def load_manifest(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"disk store: cannot read the manifest {path!r}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"disk store: manifest {path!r} is not a JSON object")
    return obj
