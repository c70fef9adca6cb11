"""DiskTier under faults: corrupt and truncated files, a full disk, names that try to leave the store,
and SIGKILL of a writing process at random instants."""

import errno
import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tierkv.errors import CapacityError, ChunkNotFoundError, ConfigError, CorruptChunkError
from tierkv.keys import ChunkKey
from tierkv.tiers.disk import layout
from tierkv.tiers.disk import DiskTier

HERE = os.path.dirname(os.path.abspath(__file__))


def K(i, layer=0, stream="s"):
    return ChunkKey(stream, layer, i)


def rand_bytes(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    t[: n // 2] = 3
    return t


def chunk_path(root, k, n):
    return os.path.join(root, k.stream, f"L{k.layer}.n{n}", f"c.{k.index}.0")


def all_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.fixture
def store(tmp_path, rng_seed):
    root = str(tmp_path / "st")
    want = {K(i): rand_bytes(5000 + i, rng_seed + i) for i in range(4)}
    with DiskTier(root) as t:
        for k, v in want.items():
            t.put(k, v)
    return root, want


def test_flipped_byte_anywhere_is_caught(store, rng_seed, reader):
    root, want = store
    rng = random.Random(rng_seed)
    k = K(2)
    p = chunk_path(root, k, want[k].numel())
    size = os.path.getsize(p)
    for pos in [0, 3, 4, size // 2, size - 5, size - 4, size - 1] + [rng.randrange(size) for _ in range(5)]:
        orig = open(p, "rb").read()
        b = bytearray(orig)
        b[pos] ^= 1 << rng.randrange(8)
        open(p, "wb").write(b)
        with DiskTier(root) as t:
            with pytest.raises(CorruptChunkError, match="s/L0/2") as ei:
                t.read(k)
            assert p in str(ei.value)
            out = torch.zeros(want[k].numel(), dtype=torch.uint8)
            with pytest.raises(CorruptChunkError):
                t.read_many([K(0), k], outs=[None, out])
            assert t.stats().corrupt_chunks == 2 and t.verify() == [k]
            assert torch.equal(t.read(K(1)), want[K(1)])  # the others are fine
        open(p, "wb").write(orig)
    with DiskTier(root) as t:
        assert t.verify() == [] and torch.equal(t.read(k), want[k])


def test_truncated_or_overlong_file_is_caught(store, reader):
    root, want = store
    k = K(1)
    p = chunk_path(root, k, want[k].numel())
    orig = open(p, "rb").read()
    for cut in (0, 1, 4, 7, 8, len(orig) // 2, len(orig) - 1):
        open(p, "wb").write(orig[:cut])
        with DiskTier(root) as t:
            with pytest.raises(CorruptChunkError, match="s/L0/1"):
                t.read(k)
    open(p, "wb").write(orig + b"\0" * (layout.max_file_size(want[k].numel()) + 1 - len(orig)))
    with DiskTier(root) as t:
        with pytest.raises(CorruptChunkError, match="longer than any valid"):
            t.read(k)
    os.unlink(p)
    with DiskTier(root) as t:
        assert k not in t
        with pytest.raises(ChunkNotFoundError):
            t.read(k)


def test_header_lies_about_size(store, reader):
    """A file that passes its crc but whose size header disagrees with its array (a misplaced file)."""
    root, want = store
    with DiskTier(root) as t:
        t.write(K(9), bytes(100))
    os.rename(chunk_path(root, K(9), 100), chunk_path(root, K(9), want[K(0)].numel()))
    with DiskTier(root) as t:
        assert t.nbytes(K(9)) == want[K(0)].numel()
        with pytest.raises(CorruptChunkError, match="header says 100 raw bytes"):
            t.read(K(9))


def _enospc_after(real, nbytes_ok):
    """os.writev that writes `nbytes_ok` bytes of a file and then fails as a full disk does."""

    def writev(fd, bufs):
        if sum(len(b) for b in bufs) <= 2000:  # small metadata files still fit
            return real(fd, bufs)
        real(fd, [bytes(memoryview(bufs[0])[:nbytes_ok])])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return writev


@pytest.mark.parametrize("where", ["write", "fsync", "quota"])
def test_full_disk_raises_capacity_and_leaves_store_readable(store, monkeypatch, where):
    root, want = store
    with DiskTier(root) as t:
        used = t.used_bytes
        if where == "write":
            monkeypatch.setattr(os, "writev", _enospc_after(os.writev, 1000))
        else:
            real_fsync = os.fsync
            code = errno.ENOSPC if where == "fsync" else errno.EDQUOT

            def fsync(fd):
                if os.fstat(fd).st_size > 2000:
                    raise OSError(code, os.strerror(code))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        acks = []
        t.put(K(10), rand_bytes(6000, 10), on_durable=acks.append)
        t.put(K(11), rand_bytes(7000, 11), on_durable=acks.append)
        with pytest.raises(CapacityError, match="disk is full") as ei:
            t.flush()
        assert "s/L0/1" in str(ei.value) and acks == []
        with pytest.raises(CapacityError):
            t.write(K(12), rand_bytes(6000, 12))
        monkeypatch.undo()
        assert not [f for f in all_files(root) if ".tmp." in f]  # temp files removed
        assert sorted(t.keys()) == sorted(want) and t.used_bytes == used and t.reserved_bytes == 0
        for k, v in want.items():
            assert torch.equal(t.read(k), v)
        t.put(K(10), rand_bytes(6000, 10))  # space is back: writing works again
        t.flush()
    with DiskTier(root) as t:
        assert sorted(t.keys()) == sorted(list(want) + [K(10)]) and t.verify() == []


def test_full_disk_while_creating_an_array(tmp_path, monkeypatch):
    root = str(tmp_path / "st")
    with DiskTier(root) as t:
        real = os.writev

        def writev(fd, bufs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", writev)
        t.put(K(0, stream="new"), b"x" * 50)
        with pytest.raises(CapacityError):
            t.flush()
        monkeypatch.setattr(os, "writev", real)
        t.put(K(0, stream="new"), b"x" * 50)
        t.flush()
    with DiskTier(root) as t:
        assert t.keys() == [K(0, stream="new")] and not [f for f in all_files(root) if ".tmp." in f]


def test_names_cannot_leave_the_store(tmp_path):
    for bad in ("..", "../x", "a/b", "/etc", ".hidden", "x" * 200, "", "a\0b"):
        with pytest.raises(ConfigError):
            ChunkKey(bad, 0, 0)
    root = tmp_path / "st"
    outside = tmp_path / "outside"
    outside.mkdir()
    with DiskTier(root) as t:
        pass
    os.symlink(outside, root / "evil")  # planted by someone else
    with DiskTier(root) as t:
        assert t.keys() == []  # a symlinked stream is not listed
        t.put(K(0, stream="evil"), b"payload")
        with pytest.raises(ConfigError, match="outside the store"):
            t.flush()
        assert K(0, stream="evil") not in t
    assert os.listdir(outside) == []


# --- SIGKILL of a writer ----------------------------------------------------------------------
def _load_writer():
    spec = importlib.util.spec_from_file_location("disk_kill_writer", os.path.join(HERE, "disk_kill_writer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Child:
    """The writer subprocess with a thread collecting its output lines as they come."""

    def __init__(self, path, seed, run, trace):
        cmd = [sys.executable, os.path.join(HERE, "disk_kill_writer.py"), path, str(seed), str(run)]
        self.proc = subprocess.Popen(cmd + (["trace"] if trace else []), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines, self.cv = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):
                with self.cv:
                    self.lines.append(raw.decode().strip())
                    self.cv.notify_all()
        with self.cv:
            self.lines.append("<eof>")
            self.cv.notify_all()

    def wait_for(self, pred, timeout=10.0):
        with self.cv:
            # "done": the writer finished its writes and waits to be killed
            assert self.cv.wait_for(lambda: pred(self.lines) or "<eof>" in self.lines or "done" in self.lines,
                                    timeout), "writer hung"
            return "<eof>" not in self.lines

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)
        err = self.proc.stderr.read().decode()
        return self.proc.returncode, err


@pytest.mark.slow
def test_acknowledged_chunks_survive_sigkill(tmp_path, rng_seed):
    w = _load_writer()
    rng = random.Random(rng_seed)
    path = str(tmp_path / "st")
    attempted = {}  # key -> runs that tried to write it (their bytes are all valid answers)
    acked_in = {}  # key -> last run whose write of it was acknowledged
    kills = 0
    seen_kinds = set()
    t0 = time.monotonic()
    kinds = ["delay", "ack", "write", "fsync", "rename", "renamed", "startup"]
    for run in range(28):
        kind = kinds[run % len(kinds)]
        trace = kind in ("write", "fsync", "rename", "renamed")
        child = _Child(path, rng_seed, run, trace)
        if kind == "startup":  # while opening (run 5: maybe while scanning what earlier runs left)
            time.sleep(rng.uniform(0.0, 0.5))
        elif kind == "delay":
            child.wait_for(lambda ls: "ready" in ls)
            time.sleep(rng.uniform(0.0, 0.05))
        elif kind == "ack":
            n = rng.randint(1, 25)
            child.wait_for(lambda ls: sum(x.startswith("ack") for x in ls) >= n)
            time.sleep(rng.uniform(0.0, 0.003))
        else:  # kill right inside that step of the protocol (the writer pauses 1 ms after each)
            n = rng.randint(1, 30)
            child.wait_for(lambda ls: sum(x == f"phase {kind}" for x in ls) >= n)
        plan = w.plan(rng_seed, run)
        rc, err = child.kill()
        assert rc == -signal.SIGKILL, f"run {run} ({kind}) ended on its own: rc {rc}\n{err}"
        kills += 1
        seen_kinds.add(kind)
        lines = [x for x in child.lines if x.startswith("ack ")]
        for key in plan:
            attempted.setdefault(key, set()).add(run)
        for x in lines:
            _, s, layer, index = x.split()
            acked_in[(s, int(layer), int(index))] = run

        # reopen: no temp file survives, every acknowledged chunk is there, everything listed verifies
        with DiskTier(path) as t:
            assert not [f for f in all_files(path) if os.path.basename(f).startswith(".tmp.")]
            listed = {(k.stream, k.layer, k.index) for k in t.keys()}
            missing = set(acked_in) - listed
            assert not missing, f"run {run} ({kind}): acknowledged chunks lost: {sorted(missing)[:5]}"
            for key in listed:
                got = t.read(ChunkKey(*key)).numpy().tobytes()  # CorruptChunkError would fail the test
                ok = [r for r in attempted[key] if r >= acked_in.get(key, -1)]
                assert any(got == w.content(rng_seed, r, key) for r in ok), (
                    f"run {run} ({kind}): chunk {key} holds bytes no acknowledged-or-later write produced"
                )
            assert t.verify() == []
    assert kills >= 20 and seen_kinds == set(kinds)
    assert len(acked_in) > 20  # the kills did not all land before any write
    assert time.monotonic() - t0 < 60
