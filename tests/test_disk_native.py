"""The C chunk-file reader (csrc/tierkv_diskio.c through tiers/disk/native.py) against the Python reader and
the libraries it stands in for: its crc32c against the crc32c package, its LZ4 block decoder against
numcodecs' LZ4 on every kind of content and on damaged blocks (never a write outside the output), and
DiskTier with each reader: the same bytes and the same errors."""

import ctypes
import os
import random
import struct

import numcodecs.lz4
import numpy as np
import pytest
import torch

from tierkv.errors import ConfigError, CorruptChunkError, FormatError
from tierkv.keys import ChunkKey
from tierkv.tiers.disk import layout
from tierkv.tiers.disk import native as c_reader
from tierkv.tiers.disk import DiskTier

lib = c_reader.library()
needs_c = pytest.mark.skipif(lib is None, reason=f"the C reader cannot be built here: {c_reader.missing()}")
crc32c = pytest.importorskip("crc32c").crc32c


def K(i, layer=0):
    return ChunkKey("s", layer, i)


def contents(rng: np.random.Generator, n: int):
    """Chunks of n bytes that LZ4 treats differently: incompressible, constant, short and long periods,
    bf16 noise, sparse."""
    yield "random", rng.integers(0, 256, n, dtype=np.uint8)
    yield "zeros", np.zeros(n, np.uint8)
    for period in (1, 2, 3, 7, 16, 61):
        yield f"period{period}", np.resize(rng.integers(0, 256, period, dtype=np.uint8), n)
    yield "bf16", torch.randn(n // 2 + 1).to(torch.bfloat16).view(torch.uint8).numpy()[:n].copy()
    sparse = np.zeros(n, np.uint8)
    sparse[rng.integers(0, n, max(1, n // 50))] = rng.integers(1, 256, max(1, n // 50), dtype=np.uint8)
    yield "sparse", sparse


def c_decode(block: np.ndarray, n: int, pad: int = 64):
    """Decode with the C decoder into a buffer with poisoned guard bytes on both sides; check the guards."""
    buf = np.full(n + 2 * pad, 0xA5, np.uint8)
    rc = lib.tkv_lz4_decode(block.ctypes.data, block.shape[0], buf[pad:].ctypes.data, n)
    assert (buf[:pad] == 0xA5).all() and (buf[pad + n :] == 0xA5).all(), "wrote outside its output"
    return rc, buf[pad : pad + n]


@needs_c
def test_crc_matches_the_crc32c_package(rng_seed):
    rng = np.random.default_rng(rng_seed)
    big = rng.integers(0, 256, 3 * 4096 * 5 + 123, dtype=np.uint8)
    lengths = [0, 1, 7, 8, 9, 4095, 3 * 4096 - 1, 3 * 4096, 3 * 4096 + 1, 40000, 73728 + 300, big.shape[0] - 8]
    for n in lengths:
        for start in (0, 1, 3, 8):
            view = big[start : start + n]
            want = crc32c(view)
            assert lib.tkv_crc32c(view.ctypes.data, view.shape[0], 0) == want, (n, start)
            assert lib.tkv_crc32c(view.ctypes.data, view.shape[0], 1) == want, (n, start, "table")


@needs_c
@pytest.mark.parametrize("n", [1, 15, 100, 4096, 73728, 300001])
def test_lz4_decode_matches_numcodecs(rng_seed, n):
    rng = np.random.default_rng(rng_seed + n)
    for name, raw in contents(rng, n):
        block = np.frombuffer(numcodecs.lz4.compress(raw), np.uint8)[layout.HEADER :]
        rc, out = c_decode(block, n)
        assert rc == 0 and np.array_equal(out, raw), name
        # a wrong output size is refused, never half-filled and accepted
        assert c_decode(block, n + 1)[0] != 0, name
        if n > 1:
            assert c_decode(block, n - 1)[0] != 0, name


@needs_c
def test_damaged_blocks_never_write_outside_and_agree_with_numcodecs(rng_seed):
    rng = np.random.default_rng(rng_seed)
    pyrng = random.Random(rng_seed)
    n = 2000
    agree = 0
    for name, raw in contents(rng, n):
        block = np.frombuffer(numcodecs.lz4.compress(raw), np.uint8)[layout.HEADER :].copy()
        for _ in range(60):
            bad = block.copy()
            how = pyrng.randrange(3)
            if how == 0:  # flipped bits
                for _ in range(pyrng.randint(1, 4)):
                    bad[pyrng.randrange(bad.shape[0])] ^= 1 << pyrng.randrange(8)
            elif how == 1:  # cut short
                bad = bad[: pyrng.randrange(bad.shape[0])].copy()
            else:  # trailing bytes
                bad = np.concatenate([bad, rng.integers(0, 256, pyrng.randint(1, 9), dtype=np.uint8)])
            rc, out = c_decode(bad, n)
            ref = np.zeros(n, np.uint8)
            try:
                numcodecs.lz4.decompress(np.concatenate([np.frombuffer(struct.pack("<I", n), np.uint8), bad]), ref)
                ok = True
            except (RuntimeError, ValueError):
                ok = False
            if rc == 0 and ok:
                assert np.array_equal(out, ref), name  # both accept: the same bytes
            agree += (rc == 0) == ok
    # LZ4's own decoder and ours may differ on blocks that break the format's end-of-block rules;
    # damage that both see is the rule
    total = 60 * len(list(contents(rng, 8)))
    assert agree >= 0.95 * total


def _store(root, n_chunks, rng_seed, sizes=(5000, 73728)):
    want = {}
    with DiskTier(root) as t:
        for i in range(n_chunks):
            k = K(i, layer=i % 2)
            g = torch.Generator().manual_seed(rng_seed + i)
            v = torch.randint(0, 256, (sizes[i % len(sizes)],), dtype=torch.uint8, generator=g)
            v[: v.numel() // 3] = 7  # partly compressible
            want[k] = v
            t.put(k, v)
    return want


@needs_c
def test_both_readers_give_the_same_bytes(tmp_path, rng_seed):
    root = tmp_path / "st"
    want = _store(root, 40, rng_seed)
    keys = sorted(want)
    got = {}
    for native in (True, False):
        with DiskTier(root, native_reads=native) as t:
            assert (t.native_reads) == native
            outs = [torch.full((want[k].numel() + 5,), 0xEE, dtype=torch.uint8) for k in keys]
            res = t.read_many(keys, outs)
            for k, r, o in zip(keys, res, outs):
                assert torch.equal(r, want[k]) and (o[want[k].numel():] == 0xEE).all()
            got[native] = [t.read(k).clone() for k in keys]
            s = t.stats()
            assert s.chunks_read == 2 * len(keys) and s.bytes_read_raw == 2 * sum(v.numel() for v in want.values())
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


def _rewrite(path, body: bytes):
    """A chunk file with this body and a matching crc: passes the checksum, whatever the body says."""
    with open(path, "wb") as f:
        f.write(body + struct.pack("<I", crc32c(body)))


@needs_c
def test_both_readers_raise_the_same_errors(tmp_path, rng_seed):
    root = tmp_path / "st"
    want = _store(root, 4, rng_seed, sizes=(5000,))
    k0, k1, k, k3 = K(0), K(1, layer=1), K(2), K(3, layer=1)
    with DiskTier(root) as t:
        p = t.chunk_path(k)
    orig = open(p, "rb").read()
    cases = {
        "flipped": orig[:100] + bytes([orig[100] ^ 4]) + orig[101:],
        "short": orig[:6],
        "truncated": orig[: len(orig) // 2],
        "overlong": orig + b"\0" * (layout.max_file_size(5000) + 1 - len(orig)),
        "header": None,
        "block": None,
    }
    for name, data in cases.items():
        if name == "header":
            _rewrite(p, struct.pack("<I", 4999) + orig[4:-4])
        elif name == "block":
            _rewrite(p, orig[:4] + bytes(len(orig) - 8))  # valid crc, header right, lz4 garbage
        else:
            open(p, "wb").write(data)
        msgs = []
        for native in (True, False):
            with DiskTier(root, native_reads=native) as t:
                with pytest.raises(CorruptChunkError) as ei:
                    t.read(k)
                with pytest.raises(CorruptChunkError):
                    t.read_many([k0, k, k1])
                assert t.stats().corrupt_chunks == 2
                assert torch.equal(t.read(k3), want[k3])
            # "chunk <key> (<path>): <what failed>"; lz4's own error code is the Python reader's extra
            msgs.append(str(ei.value).split(": lz4 block does not decode")[0])
        assert msgs[0] == msgs[1], (name, msgs)
    open(p, "wb").write(orig)
    os.chmod(p, 0)
    try:
        if os.geteuid() != 0:  # root reads it anyway
            for native in (True, False):
                with DiskTier(root, native_reads=native) as t:
                    with pytest.raises(CorruptChunkError, match="Permission denied"):
                        t.read(k)
    finally:
        os.chmod(p, 0o644)


@needs_c
@pytest.mark.parametrize("threads", [2, 8])
def test_one_call_on_many_threads_reads_and_fails_like_one_thread(tmp_path, rng_seed, threads):
    """The C reader's threads (one foreign call for a batch, tkv_read_chunks_mt): every chunk lands in
    its own output, whatever thread took it; a corrupt chunk in the middle fails the batch with that
    chunk named (read_many, and read_many_async's wait), the others still read back; and the status of
    every entry is set, the corrupt one's alone not OK."""
    root = tmp_path / "st"
    want = _store(root, 48, rng_seed, sizes=(5000, 73728, 12345))
    keys = sorted(want)
    with DiskTier(root, read_threads=threads) as t:
        outs = [torch.full((want[k].numel() + 3,), 0xEE, dtype=torch.uint8) for k in keys]
        res = t.read_many_async(keys, outs)()
        for k, r, o in zip(keys, res, outs):
            assert torch.equal(r, want[k]) and (o[want[k].numel():] == 0xEE).all()
        bad = keys[29]
        path = t.chunk_path(bad)
        files = [(os.fsencode(t.chunk_path(k)), t.nbytes(k), os.path.getsize(t.chunk_path(k))) for k in keys]
    body = bytearray(open(path, "rb").read())
    body[50] ^= 1
    open(path, "wb").write(bytes(body))
    with DiskTier(root, read_threads=threads) as t:
        with pytest.raises(CorruptChunkError, match=f"chunk {bad}"):
            t.read_many(keys)
        with pytest.raises(CorruptChunkError, match=f"chunk {bad}"):
            t.read_many_async(keys)()
        for k in keys[:29] + keys[30:]:
            assert torch.equal(t.read(k), want[k])
    m = len(keys)
    i64 = ctypes.c_int64 * m
    outs = [np.zeros(nbytes, np.uint8) for _, nbytes, _ in files]
    status, info = (ctypes.c_int32 * m)(), (ctypes.c_int64 * (3 * m))()
    failed = lib.tkv_read_chunks_mt(m, (ctypes.c_char_p * m)(*[f[0] for f in files]),
                                    i64(*[f[1] for f in files]), i64(*[f[2] for f in files]),
                                    (ctypes.c_void_p * m)(*[o.ctypes.data for o in outs]), 0,
                                    layout.direct_read_size(73728), status, info, threads)
    assert failed == 1 and [i for i in range(m) if status[i] != c_reader.OK] == [29]
    assert status[29] == c_reader.BAD_CRC
    for i, k in enumerate(keys):
        if i != 29:
            assert np.array_equal(outs[i], want[k].numpy())


@needs_c
def test_async_reads_run_on_c_threads_and_outlive_close(tmp_path, rng_seed):
    """read_many_async on the C reader starts the batch on threads of the C library (tkv_read_start):
    no Python reader thread is started; its wait returns the same chunks however often it is called,
    and a corrupt chunk raises from every call; close() waits for a batch nobody waited for (its
    threads write into buffers the tier still holds), and the batch's wait still returns it after."""
    root = tmp_path / "st"
    want = _store(root, 40, rng_seed, sizes=(5000, 73728))
    keys = sorted(want)
    with DiskTier(root, read_threads=4) as t:
        wait = t.read_many_async(keys)
        assert not t.reader_pool_started  # no Python thread read anything
        first = wait()
        assert all(torch.equal(r, want[k]) for k, r in zip(keys, first))
        assert wait() is first
        bad = keys[7]
        path = t.chunk_path(bad)
    body = bytearray(open(path, "rb").read())
    body[60] ^= 1
    open(path, "wb").write(bytes(body))
    t = DiskTier(root, read_threads=4)
    try:
        wait = t.read_many_async(keys)
        for _ in range(2):
            with pytest.raises(CorruptChunkError, match=f"chunk {bad}"):
                wait()
        good = keys[:7] + keys[8:]
        outs = [torch.zeros(want[k].numel(), dtype=torch.uint8) for k in good]
        wait = t.read_many_async(good, outs)
    finally:
        t.close()  # with the last batch not waited for
    assert t.native_batches_pending == 0
    res = wait()
    assert all(torch.equal(r, want[k]) and r.data_ptr() == o.data_ptr() for k, r, o in zip(good, res, outs))


@pytest.mark.parametrize("native", [True, False])
def test_read_into_one_buffer(tmp_path, rng_seed, native):
    """read_into_async puts chunk j at j * stride of one buffer (the bytes between chunks untouched), the
    same bytes as read(), a chunk still queued for writing included; a corrupt chunk raises from the
    wait; a buffer too small, of the wrong type, or a stride a chunk does not fit in is refused."""
    if native and c_reader.library() is None:
        pytest.skip("no C reader here")
    root = tmp_path / "st"
    want = _store(root, 24, rng_seed, sizes=(5000, 12345))
    keys = sorted(want)
    stride = 12800
    with DiskTier(root, read_threads=4, native_reads=native) as t:
        late = ChunkKey("late", 0, 0)
        want[late] = torch.arange(3000, dtype=torch.int64).to(torch.uint8)
        t.put(late, want[late])  # the writer may or may not have written it yet: both must read back
        keys = keys + [late]
        buf = torch.full((len(keys) * stride + 5,), 0xEE, dtype=torch.uint8)
        assert t.read_into_async(keys, buf, stride)() is None
        for j, k in enumerate(keys):
            n = want[k].numel()
            assert torch.equal(buf[j * stride : j * stride + n], want[k])
            assert (buf[j * stride + n : (j + 1) * stride] == 0xEE).all()
        with pytest.raises(FormatError, match="at least"):
            t.read_into_async(keys, buf[: stride], stride)
        with pytest.raises(FormatError, match="contiguous uint8"):
            t.read_into_async(keys, buf.to(torch.int32), stride)
        with pytest.raises(FormatError, match="do not fit a stride"):
            t.read_into_async(keys[:4], buf, 4096)
        with pytest.raises(ConfigError, match="stride"):
            t.read_into_async(keys, buf, 0)
        t.flush()
        bad = keys[5]
        path = t.chunk_path(bad)
    body = bytearray(open(path, "rb").read())
    body[40] ^= 1
    open(path, "wb").write(bytes(body))
    with DiskTier(root, read_threads=4, native_reads=native) as t:
        wait = t.read_into_async(keys, buf, stride)
        with pytest.raises(CorruptChunkError, match=f"chunk {bad}"):
            wait()


@needs_c
def test_o_direct_refused_falls_back_to_buffered(tmp_path, rng_seed):
    import mmap
    import tempfile

    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    with tempfile.NamedTemporaryFile(dir=shm) as f:
        f.write(b"x" * 4096)
        f.flush()
        try:
            fd = os.open(f.name, os.O_RDONLY | os.O_DIRECT)
            os.readv(fd, [mmap.mmap(-1, 4096)])
            os.close(fd)
            pytest.skip("this kernel's tmpfs allows O_DIRECT (Linux 6.6 on): nothing refuses it here")
        except OSError:
            pass
    with tempfile.TemporaryDirectory(dir=shm) as d:
        want = _store(os.path.join(d, "st"), 6, rng_seed)
        with DiskTier(os.path.join(d, "st"), native_reads=True) as t:
            keys = sorted(want)
            res = t.read_many(keys)
            assert all(torch.equal(r, want[k]) for k, r in zip(keys, res))
            assert t.direct_reads is False  # tmpfs refuses O_DIRECT: buffered from then on


def test_native_reads_true_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKV_NATIVE_IO", "0")
    with pytest.raises(ConfigError, match="native_reads=True"):
        DiskTier(tmp_path / "st", native_reads=True)
    assert c_reader.missing() == "TIERKV_NATIVE_IO=0"


def test_build_failure_falls_back(tmp_path, monkeypatch):
    """A compiler that fails leaves the Python reader in place, and says why."""
    c_reader.reset()
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a 'compiler' that always fails
    monkeypatch.setattr(c_reader.shutil, "which", lambda c: "/bin/false" if c == "false" else None)
    assert c_reader.library() is None
    assert "failed" in c_reader.missing()
    with DiskTier(tmp_path / "st") as t:
        assert not t.native_reads
        t.write(K(0), b"x" * 100)
        assert bytes(t.read(K(0)).numpy()) == b"x" * 100
    c_reader.reset()  # the next test builds (or finds) the real one again


@needs_c
def test_library_is_cached_by_source_hash(tmp_path, monkeypatch):
    c_reader.reset()
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path / "cache"))
    assert c_reader.library() is not None
    built = os.listdir(tmp_path / "cache")
    assert len(built) == 1 and built[0].startswith("tierkv_diskio-") and built[0].endswith(".so")
    c_reader.reset()
    assert c_reader.library() is not None and os.listdir(tmp_path / "cache") == built  # found, not rebuilt
    c_reader.reset()
