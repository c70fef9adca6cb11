"""DiskTier: round trips, write-behind, reopening, zarr interop, argument checks."""

import json
import os
import random
import threading

import numpy as np
import pytest
import torch

from tierkv.errors import (
    CapacityError,
    ChunkNotFoundError,
    ConfigError,
    FormatError,
    FormatVersionError,
    TierKVError,
)
from tierkv.keys import ChunkKey
from tierkv.tiers import ColdTier
from tierkv.tiers.disk import DiskTier, FlushTimeoutError, TierClosedError, WriteBehindError, layout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # zarr: numcodecs codecs are not in the v3 spec


def K(i, layer=0, stream="s"):
    return ChunkKey(stream, layer, i)


def rand_bytes(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    t[: n // 3] = 7  # a compressible run, so lz4 actually shrinks something
    return t


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def gate(monkeypatch):
    """Hold the writer thread before it writes anything, until gate.set()."""
    ev = threading.Event()
    real = layout.write_tmp

    def held(*a, **kw):
        if threading.current_thread().name.startswith("tierkv-disk-writer"):
            assert ev.wait(10), "test gate never opened"
        return real(*a, **kw)

    monkeypatch.setattr(layout, "write_tmp", held)
    yield ev
    ev.set()


def test_roundtrip_sizes_and_out(tmp_path, rng_seed, reader):
    sizes = [1, 2, 255, 4096, 65537, 256 * 1024, 1 << 20]
    with DiskTier(tmp_path / "st") as t:
        want = {}
        for i, n in enumerate(sizes):
            want[K(i, layer=i % 2)] = rand_bytes(n, rng_seed + i)
            t.put(K(i, layer=i % 2), want[K(i, layer=i % 2)])
        t.flush()
        for k, v in want.items():
            got = t.read(k)
            assert got.dtype == torch.uint8 and got.shape == v.shape and torch.equal(got, v)
            assert t.nbytes(k) == v.numel() and k in t
        # out= larger than the chunk (a slot of a pool): filled in place, the view returned
        k = K(4, layer=0)
        out = torch.full((want[k].numel() + 100,), 0xAB, dtype=torch.uint8)
        got = t.read(k, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want[k])
        assert torch.all(out[want[k].numel():] == 0xAB)
        s = t.stats()
        assert s.chunks == len(sizes) and s.chunks_written == len(sizes) and s.write_errors == 0
        assert s.bytes_written_raw == sum(sizes) and s.used_bytes == t.used_bytes == s.bytes_written_disk
        assert s.chunks_read == len(sizes) + 1 and s.bytes_read_raw == sum(sizes) + want[k].numel()
        assert t.used_bytes < sum(sizes)  # the compressible thirds paid off


def test_inputs_bytes_numpy_and_copy(tmp_path):
    with DiskTier(tmp_path / "st") as t:
        ba = bytearray(b"abc" * 1000)
        arr = np.arange(5000, dtype=np.uint8)
        ten = torch.arange(3000, dtype=torch.int32).to(torch.uint8)
        t.put(K(0), bytes(ba))
        t.put(K(1), ba)
        t.put(K(2), arr)
        t.put(K(3), memoryview(arr))
        t.put(K(4), ten)
        want = [bytes(ba), bytes(ba), arr.tobytes(), arr.tobytes(), ten.numpy().tobytes()]
        ba[:] = b"x" * len(ba)  # the caller reuses its buffers at once: put copied them
        arr[:] = 0
        ten.zero_()
        t.flush()
        for i, w in enumerate(want):
            assert t.read(K(i)).numpy().tobytes() == w


def test_read_your_writes_and_on_durable(tmp_path, gate):
    acks = []
    with DiskTier(tmp_path / "st", queue_depth=4) as t:
        v = rand_bytes(10000, 1)
        t.put(K(0), v, on_durable=acks.append)
        t.put(K(1), rand_bytes(500, 2), on_durable=acks.append)
        assert K(0) in t and t.nbytes(K(0)) == 10000 and sorted(t.keys()) == [K(0), K(1)]
        assert torch.equal(t.read(K(0)), v)  # served from the queue
        assert t.stats().reads_from_queue == 1 and t.stats().queued == 2
        assert acks == [] and t.used_bytes == 0 and t.reserved_bytes > 10000
        with pytest.raises(FlushTimeoutError):
            t.flush(timeout=0.05)
        gate.set()
        t.flush()
        assert acks == [K(0), K(1)] and t.reserved_bytes == 0 and t.stats().queued == 0
        assert torch.equal(t.read(K(0)), v) and t.stats().chunks_read == 1


def test_put_blocks_when_queue_full(tmp_path, gate):
    with DiskTier(tmp_path / "st", queue_depth=2) as t:
        done = threading.Event()

        def writer():
            for i in range(6):
                t.put(K(i), rand_bytes(100, i))
            done.set()

        th = threading.Thread(target=writer)
        th.start()
        assert not done.wait(0.3)  # 1 in the writer's hands + 2 queued, then put blocks
        gate.set()
        assert done.wait(10)
        th.join()
        t.flush()
        assert len(t) == 6


def test_sync_write_is_durable_on_return(tmp_path):
    t = DiskTier(tmp_path / "st")
    t.write(K(0), b"hello" * 10)
    adir = os.path.join(tmp_path, "st", "s", "L0.n50")
    assert os.path.isfile(os.path.join(adir, "c.0.0")) and t.stats().queued == 0
    t.close()


def test_reopen_rebuilds_index_and_drops_temp_files(tmp_path, rng_seed):
    root = tmp_path / "st"
    want = {}
    with DiskTier(root) as t:
        for i in range(30):
            k = K(i % 10, layer=i // 10, stream=f"conv{i % 3}")
            want[k] = rand_bytes(100 + 37 * i, rng_seed + i)
            t.put(k, want[k])
        t.flush()
        used = t.used_bytes
    # leftovers of a crash: temp files at every level, and none may be listed
    adir = os.path.join(root, "conv0", "L0.n100")
    for d in (root, os.path.join(root, "conv0"), adir):
        with open(os.path.join(d, ".tmp.c.99.0.deadbeef"), "wb") as f:
            f.write(b"partial")
    with DiskTier(root) as t:
        assert sorted(t.keys()) == sorted(want) and t.used_bytes == used
        for k, v in want.items():
            assert torch.equal(t.read(k), v) and t.nbytes(k) == v.numel()
        assert not [f for f in files_under(root) if ".tmp." in f]


def test_store_is_a_zarr_v3_hierarchy(tmp_path, rng_seed, reader):
    zarr = pytest.importorskip("zarr")
    root = tmp_path / "st"
    want = {}
    with DiskTier(root) as t:
        for i in range(12):
            k = K(i, layer=i % 3, stream="a" if i < 6 else "b")
            # one chunk above the size where the crc32c package computes without the GIL
            want[k] = rand_bytes(70001 if i == 11 else 4096 if i % 2 else 777, rng_seed + i)
            t.put(k, want[k])
    g = zarr.open_group(root, mode="r")
    assert json.load(open(root / "zarr.json"))["node_type"] == "group"
    for k, v in want.items():
        arr = g[f"{k.stream}/L{k.layer}.n{v.numel()}"]
        assert arr.dtype == np.uint8 and arr.shape == (2**40, v.numel())
        assert np.array_equal(arr[k.index], v.numpy())  # zarr-python decodes our files: crc and lz4 agree
    # and the other way round: a chunk zarr-python writes is one DiskTier reads
    arr = zarr.open_array(root / "a" / "L0.n777", mode="r+")
    new = np.random.default_rng(rng_seed).integers(0, 256, 777, dtype=np.uint8)
    arr[31] = new
    with DiskTier(root) as t:
        assert np.array_equal(t.read(K(31, layer=0, stream="a")).numpy(), new)


def test_manifest_and_path_checks(tmp_path):
    f = tmp_path / "afile"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        DiskTier(f)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="without a tierkv.json"):
        DiskTier(other)
    assert os.listdir(other) == ["notes.txt"]  # left alone
    # a creation cut short (only zarr.json and a temp file) is finished, not refused
    half = tmp_path / "half"
    half.mkdir()
    (half / "zarr.json").write_text(json.dumps(layout.group_metadata()))
    (half / ".tmp.tierkv.json.0123").write_text("{")
    DiskTier(half).close()
    assert sorted(os.listdir(half)) == ["tierkv.json", "zarr.json"]

    root = tmp_path / "st"
    DiskTier(root).close()
    m = json.load(open(root / "tierkv.json"))
    assert m["format"] == "tierkv-disk" and m["version"] == 1
    for bad, err in ((dict(m, version=2), FormatVersionError), (dict(m, version="1"), FormatVersionError),
                     (dict(m, format="other"), ConfigError)):
        (root / "tierkv.json").write_text(json.dumps(bad))
        with pytest.raises(err, match="tierkv.json"):
            DiskTier(root)
    (root / "tierkv.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot read the manifest"):
        DiskTier(root)


def test_one_open_at_a_time(tmp_path):
    t = DiskTier(tmp_path / "st")
    with pytest.raises(ConfigError, match="already open"):
        DiskTier(tmp_path / "st")
    t.close()
    t.close()  # idempotent
    DiskTier(tmp_path / "st").close()
    with pytest.raises(TierClosedError):
        t.put(K(0), b"x")
    with pytest.raises(TierClosedError):
        t.flush()


def test_budget_refuses_before_writing(tmp_path):
    n = 10000
    bound = layout.max_file_size(n)
    with DiskTier(tmp_path / "st", budget=2 * bound + 10) as t:
        assert t.budget == 2 * bound + 10 and t.free_bytes == 2 * bound + 10
        t.put(K(0), rand_bytes(n, 0))
        t.put(K(1), rand_bytes(n, 1))
        with pytest.raises(CapacityError, match="disk budget"):
            t.put(K(2), rand_bytes(n, 2))
        t.flush()
        assert sorted(t.keys()) == [K(0), K(1)] and not os.path.exists(tmp_path / "st" / "s" / "L0.n10000" / "c.2.0")
        t.delete(K(0))
        t.put(K(2), rand_bytes(n, 2))  # room again
        t.flush()
        assert sorted(t.keys()) == [K(1), K(2)] and t.used_bytes <= t.budget
    with DiskTier(tmp_path / "b2", budget="1KiB") as t:
        assert t.budget == 1024
        with pytest.raises(CapacityError):
            t.write(K(0), bytes(2000))


def test_delete_and_cancel(tmp_path, gate):
    acks = []
    with DiskTier(tmp_path / "st") as t:
        t.put(K(0), b"a" * 100, on_durable=acks.append)
        t.put(K(1), b"b" * 100, on_durable=acks.append)
        assert t.delete(K(0)) is True  # still queued: cancelled
        assert K(0) not in t and t.delete(K(0)) is False
        gate.set()
        t.flush()
        assert acks == [K(1)] and t.keys() == [K(1)]
        assert not os.path.exists(tmp_path / "st" / "s" / "L0.n100" / "c.0.0")
        assert t.used_bytes == os.path.getsize(tmp_path / "st" / "s" / "L0.n100" / "c.1.0")
        assert t.delete(K(1)) and t.used_bytes == 0 and len(t) == 0
        with pytest.raises(ChunkNotFoundError):
            t.read(K(1))
        with pytest.raises(ChunkNotFoundError):
            t.nbytes(K(1))
    with DiskTier(tmp_path / "st") as t:
        assert len(t) == 0


def test_overwrite_same_and_other_size(tmp_path):
    root = tmp_path / "st"
    with DiskTier(root) as t:
        t.put(K(5), b"1" * 100)
        t.put(K(5), b"2" * 100)
        assert t.read(K(5)).numpy().tobytes() == b"2" * 100  # newest queued copy wins
        t.flush()
        assert t.read(K(5)).numpy().tobytes() == b"2" * 100
        t.put(K(5), b"3" * 300)
        t.flush()
        assert t.nbytes(K(5)) == 300 and len(t) == 1
        used = t.used_bytes
    chunk_files = [f for f in files_under(root) if f.endswith("c.5.0")]
    assert chunk_files == [os.path.join("s", "L0.n300", "c.5.0")]
    with DiskTier(root) as t:
        assert t.read(K(5)).numpy().tobytes() == b"3" * 300 and t.used_bytes == used


def test_duplicate_sizes_after_crash_keep_newest(tmp_path):
    root = tmp_path / "st"
    with DiskTier(root) as t:
        t.write(K(1), b"old" * 10)
        t.write(K(2), b"x" * 40)  # creates array L0.n40
    # what a crash between renaming the new-size file and unlinking the old one leaves behind
    with DiskTier(root) as t:
        t.write(K(9), b"y" * 40)
    os.link(root / "s" / "L0.n40" / "c.9.0", root / "s" / "L0.n40" / "c.1.0")
    old = root / "s" / "L0.n30" / "c.1.0"
    os.utime(old, ns=(1, 1))
    with DiskTier(root) as t:
        assert t.read(K(1)).numpy().tobytes() == b"y" * 40 and not old.exists()


def test_bad_arguments(tmp_path):
    with DiskTier(tmp_path / "st") as t:
        for bad in (torch.zeros(4, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.uint8),
                    torch.zeros(8, dtype=torch.uint8)[::2], b"", np.zeros(3, np.int16), "text", 5):
            with pytest.raises(FormatError):
                t.put(K(0), bad)
        with pytest.raises(ConfigError, match="ChunkKey"):
            t.put(("s", 0, 0), b"x")
        with pytest.raises(ConfigError, match="reserved"):
            t.put(ChunkKey("zarr.json", 0, 0), b"x")
        with pytest.raises(ConfigError, match="2\\*\\*40"):
            t.put(K(2**40), b"x")
        t.write(K(0), b"abcd")
        for out in (torch.zeros(3, dtype=torch.uint8), torch.zeros(8, dtype=torch.int8),
                    torch.zeros(16, dtype=torch.uint8)[::2], np.zeros(8, np.uint8)):
            with pytest.raises(FormatError, match="out must be"):
                t.read(K(0), out=out)
        with pytest.raises(ConfigError, match="one per key"):
            t.read_many([K(0)], outs=[])
    for kw in (dict(queue_depth=0), dict(queue_depth=True), dict(read_threads=0), dict(budget=-1),
               dict(budget="5 parsecs")):
        with pytest.raises(ConfigError):
            DiskTier(tmp_path / "st2", **kw)


def test_read_many_keeps_order(tmp_path, rng_seed, reader):
    with DiskTier(tmp_path / "st", read_threads=3) as t:
        want = [rand_bytes(1000 + 13 * i, rng_seed + i) for i in range(20)]
        for i, v in enumerate(want):
            t.put(K(i), v)
        t.flush()
        order = list(range(20))
        random.Random(rng_seed).shuffle(order)
        got = t.read_many([K(i) for i in order])
        assert all(torch.equal(g, want[i]) for g, i in zip(got, order))
        outs = [torch.empty(2000, dtype=torch.uint8) for _ in order]
        got = t.read_many([K(i) for i in order], outs=outs)
        assert all(g.data_ptr() == o.data_ptr() and torch.equal(g, want[i]) for g, o, i in zip(got, outs, order))
        with pytest.raises(ChunkNotFoundError):
            t.read_many([K(0), K(99)])


def test_worker_failure_is_raised_once_then_cleared(tmp_path, monkeypatch):
    real = layout.encode

    def flaky(raw):
        if raw.shape[0] == 13:
            raise RuntimeError("simulated bug")
        return real(raw)

    monkeypatch.setattr(layout, "encode", flaky)
    with DiskTier(tmp_path / "st") as t:
        t.put(K(0), b"a" * 100)
        t.put(K(1), b"b" * 13)
        t.put(K(2), b"c" * 100)
        with pytest.raises(WriteBehindError, match="s/L0/1") as ei:
            t.flush()
        assert isinstance(ei.value, TierKVError) and isinstance(ei.value.__cause__, RuntimeError)
        t.flush()  # raised once, then cleared
        assert sorted(t.keys()) == [K(0), K(2)] and t.stats().write_errors == 1
        with pytest.raises(WriteBehindError):
            t.write(K(3), b"d" * 13)  # a synchronous write raises its own failure at once
        t.flush()


def test_on_durable_errors_surface(tmp_path):
    with DiskTier(tmp_path / "st") as t:
        def boom(key):
            raise ValueError("callback bug")

        t.put(K(0), b"a" * 10, on_durable=boom)
        with pytest.raises(WriteBehindError, match="on_durable"):
            t.flush()
        assert K(0) in t  # the chunk itself is durable

        def reenter(key):
            t.put(K(7), b"z")  # would deadlock on a full queue: refused

        t.put(K(1), b"b" * 10, on_durable=reenter)
        with pytest.raises(WriteBehindError, match="cannot be called from on_durable"):
            t.flush()
        t.put(K(2), b"c", on_durable=boom)
        while t.stats().queued:
            threading.Event().wait(0.01)
        with pytest.raises(WriteBehindError, match="on_durable"):  # a read reports it too
            t.read(K(0))
        assert t.read(K(0)).numpy().tobytes() == b"a" * 10


def test_randomized_against_a_dict(tmp_path, rng_seed, reader):
    rng = random.Random(rng_seed)
    model = {}
    root = tmp_path / "st"
    t = DiskTier(root, queue_depth=rng.choice([1, 4, 64]))
    try:
        for step in range(400):
            op = rng.random()
            k = K(rng.randrange(12), layer=rng.randrange(2), stream=rng.choice(["a", "b"]))
            if op < 0.45:
                v = rand_bytes(rng.choice([1, 50, 700, 5000]), rng.randrange(1 << 30))
                (t.put if rng.random() < 0.8 else t.write)(k, v)
                model[k] = v
            elif op < 0.6:
                assert t.delete(k) == (k in model)
                model.pop(k, None)
            elif op < 0.95:
                if k in model:
                    assert torch.equal(t.read(k), model[k]), (step, k)
                else:
                    with pytest.raises(ChunkNotFoundError):
                        t.read(k)
            elif op < 0.98:
                t.flush()
                assert t.used_bytes == sum(os.path.getsize(os.path.join(root, f)) for f in files_under(root)
                                           if f.rsplit(os.sep, 1)[-1].startswith("c."))
            else:
                t.close()
                t = DiskTier(root, queue_depth=rng.choice([1, 4, 64]))
            assert set(t.keys()) == set(model)
    finally:
        t.close()
    with DiskTier(root) as t:
        assert set(t.keys()) == set(model)
        assert all(torch.equal(t.read(k), v) for k, v in model.items())


def test_disk_tier_is_a_cold_tier_and_says_where_its_files_are(tmp_path):
    with DiskTier(tmp_path / "st") as t:
        assert isinstance(t, ColdTier)
        t.put(K(0), rand_bytes(1000, 0))
        t.flush()
        path = t.chunk_path(K(0))
        assert os.path.isfile(path) and path.startswith(t.path)
        with pytest.raises(ChunkNotFoundError):
            t.chunk_path(K(1))
        assert t.read_threads >= 1 and t.native_batches_pending == 0
