"""Writer process for the kill test (tests/test_disk_faults.py): writes chunks through DiskTier.put and
prints one line per acknowledgment, until its parent SIGKILLs it.

    python tests/disk_kill_writer.py STORE SEED RUN [trace]

Prints "ready" once the store is open, "ack S L I" for each on_durable(key), "done" at the end. With
`trace`, it also prints "phase fsync|rename|renamed" around those system calls (and pauses a moment
after each) so that the parent can kill it inside a given step of the durability protocol.
The chunks a run writes, and their bytes, follow from (SEED, RUN) alone: see `plan` and `content`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (1, 513, 4096, 20011, 65536, 131072 + 7)
POOL = [("s", layer, index) for layer in range(3) for index in range(40)]  # shared by all runs
PER_RUN = 400  # more than any run gets through before it is killed


def plan(seed: int, run: int):
    """The (stream, layer, index) keys run `run` writes, in order (some repeat across runs)."""
    rng = np.random.default_rng([seed, run, 1])
    return [POOL[i] for i in rng.integers(0, len(POOL), PER_RUN)]


def content(seed: int, run: int, key) -> bytes:
    """The bytes run `run` writes for `key`: size and data fixed by (seed, run, key); half compressible."""
    stream, layer, index = key
    rng = np.random.default_rng([seed, run, layer, index, 7])
    n = int(SIZES[rng.integers(0, len(SIZES))])
    data = rng.integers(0, 256, n, dtype=np.uint8)
    data[: n // 2] = data[: n // 2] & 7  # few distinct bytes: lz4 finds matches here
    return data.tobytes()


def _import_disk():
    # Load tierkv.tiers.disk without running the __init__.py of tierkv and tierkv.tiers: those import
    # the model side and the memory tiers and with them torch (3 s per start; this process is started
    # 20+ times by one test). The disk package itself needs only config, errors and keys, none of them
    # torch.
    for name, rel in (("tierkv", "tierkv"), ("tierkv.tiers", os.path.join("tierkv", "tiers"))):
        pkg_dir = os.path.join(ROOT, rel)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir]
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)
    from tierkv.keys import ChunkKey
    from tierkv.tiers.disk import DiskTier

    return DiskTier, ChunkKey


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: a kill never leaves half a line


def _trace_syscalls() -> None:
    real_writev, real_fsync, real_rename = os.writev, os.fsync, os.rename

    def writev(fd, bufs):
        # a short write, as a slow or busy disk may do: half the bytes, then a pause in which a kill
        # leaves a half-written file behind
        total = sum(len(memoryview(b).cast("B")) for b in bufs)
        if total < 2:
            return real_writev(fd, bufs)
        joined = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
        n = real_writev(fd, [joined[: total // 2]])
        _say("phase write")
        time.sleep(0.001)
        return n

    def fsync(fd):
        _say("phase fsync")
        real_fsync(fd)
        time.sleep(0.001)

    def rename(src, dst):
        _say("phase rename")
        real_rename(src, dst)
        _say("phase renamed")
        time.sleep(0.001)

    os.writev, os.fsync, os.rename = writev, fsync, rename


def main(argv) -> None:
    path, seed, run = argv[0], int(argv[1]), int(argv[2])
    DiskTier, ChunkKey = _import_disk()
    if len(argv) > 3 and argv[3] == "trace":
        _trace_syscalls()
    tier = DiskTier(path, queue_depth=8)
    _say("ready")

    def ack(key):
        _say(f"ack {key.stream} {key.layer} {key.index}")

    for key in plan(seed, run):
        tier.put(ChunkKey(*key), content(seed, run, key), on_durable=ack)
    tier.close()
    _say("done")
    # stay up until the test kills us: a run that finished its writes before the kill still ends on
    # SIGKILL (its chunks are then all acknowledged), so every run is a kill the test can count
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1:])
