"""The disk tier's C reader (csrc/tierkv_diskio.c): built on first use, called through ctypes.

The Python reader (layout.read_file + decode_into) queues for the GIL around every step of a chunk:
open, read, close, crc, lz4. With several reader threads (and a decode thread) that queue is what
limits the store, not the disk. The C reader does all of a list of chunks in one foreign call, and
ctypes lets go of the GIL for the whole of it.

The library is compiled from the packaged source with the system C compiler (`cc`, or $CC) into a
per-user cache ($TIERKV_CACHE_DIR, else $XDG_CACHE_HOME/tierkv, else ~/.cache/tierkv), named by the
hash of the source and the compiler, and written under a temporary name then renamed, so processes
that build at the same time never load a half-written file. Where there is no compiler (or the build
fails) the Python reader is used and `missing()` says why. TIERKV_NATIVE_IO=0 turns the C reader off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

SOURCE = "tierkv_diskio.c"
ABI = 3
CFLAGS = ("-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-pthread")

# status codes of tkv_read_chunks (enum in the C source)
OK, OPEN_FAILED, READ_FAILED, TOO_LONG, TOO_SHORT, BAD_CRC, BAD_HEADER, BAD_BLOCK, SCRATCH_SMALL = range(9)
NOT_READ = -1

_lock = threading.Lock()
_state: Optional[tuple] = None  # (library or None, why not)


def source_path() -> str:
    """The C source: packaged beside the package (installed), or <repo>/csrc (source tree)."""
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tierkv/
    for candidate in (os.path.join(pkg, "csrc", SOURCE), os.path.join(os.path.dirname(pkg), "csrc", SOURCE)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"cannot find {SOURCE} in {pkg}/csrc or {os.path.dirname(pkg)}/csrc")


def cache_dir() -> str:
    d = os.environ.get("TIERKV_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "tierkv")
    return d


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build(src: str) -> str:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    with open(src, "rb") as f:
        text = f.read()
    ident = hashlib.sha256(text + repr((cc, CFLAGS, sys.platform)).encode()).hexdigest()[:16]
    d = cache_dir()
    lib = os.path.join(d, f"tierkv_diskio-{ident}.so")
    if os.path.isfile(lib):
        return lib
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".so", dir=d)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, src], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cc)} failed on {src}: {(r.stderr or r.stdout).strip()[-1500:]}")
        os.replace(tmp, lib)  # atomic: another process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load():
    lib = ctypes.CDLL(_build(source_path()))  # CDLL: every call releases the GIL
    lib.tkv_abi.restype = ctypes.c_int
    if lib.tkv_abi() != ABI:
        raise RuntimeError(f"{SOURCE}: ABI {lib.tkv_abi()}, expected {ABI}")
    lib.tkv_init.restype = None
    lib.tkv_init()
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tkv_read_chunks.argtypes = [i32, p, p, p, p, i32, p, i64, p, p, i32]
    lib.tkv_read_chunks.restype = i32
    lib.tkv_read_chunks_mt.argtypes = [i32, p, p, p, p, i32, i64, p, p, i32]
    lib.tkv_read_chunks_mt.restype = i32
    lib.tkv_read_start.argtypes = [i32, p, p, p, p, i32, i64, p, p, i32]
    lib.tkv_read_start.restype = p
    lib.tkv_read_wait.argtypes = [p]
    lib.tkv_read_wait.restype = i32
    lib.tkv_crc32c.argtypes = [p, ctypes.c_size_t, i32]
    lib.tkv_crc32c.restype = ctypes.c_uint32
    lib.tkv_lz4_decode.argtypes = [p, ctypes.c_size_t, p, ctypes.c_size_t]
    lib.tkv_lz4_decode.restype = i32
    lib.tkv_crc_hardware.restype = i32
    return lib


def library():
    """The loaded C reader, or None (then `missing()` says why). Built, or found built, once per process."""
    global _state
    if os.environ.get("TIERKV_NATIVE_IO", "").lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if _state is None:
            try:
                _state = (_load(), None)
            except Exception as e:  # noqa: BLE001 - any failure means: use the Python reader
                _state = (None, f"{type(e).__name__}: {e}")
        return _state[0]


def reset() -> None:
    """Forget the library loaded (or the failure met): the next library() builds or finds it again."""
    global _state
    with _lock:
        _state = None


def missing() -> Optional[str]:
    """Why the C reader is not in use here, or None."""
    if os.environ.get("TIERKV_NATIVE_IO", "").lower() in ("0", "false", "no", "off"):
        return f"TIERKV_NATIVE_IO={os.environ['TIERKV_NATIVE_IO']}"
    return None if library() is not None else _state[1]
