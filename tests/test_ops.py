"""tierkv.ops: every backend against the torch reference, bit for bit, on fresh random data.

CPU tests hold the reference itself to formats.decode / formats.encode / chunk_abstract entry by
entry, and check dispatch, tables and validation. GPU tests (marked `gpu`) run each kernel backend
(ext, cupy) against the reference on the same device: every format, odd chunk lengths, head dims
that are not powers of two, value groups that split a thread's channels, batch and grouped-query
shapes, device / pinned-host / mixed sources, misaligned sources, strided outputs, more sources than
fit in the kernel arguments. Outputs are poisoned with NaN first and compared as raw bits, so a
missed or stray write fails.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch

from tierkv import ops
from tierkv._cupy_backend import GATHER_DTYPE, INGEST_DTYPE, MASS_DTYPE, header_path
from tierkv.abstracts import chunk_abstract
from tierkv.errors import BackendError, FormatError
from tierkv.formats import ChunkLayout, decode, encode

FORMATS = ("bf16", "fp16", "int8", "int4", "int2")
HAS_CUDA = torch.cuda.is_available()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of a tensor, so NaN poison and signed zeros compare exactly."""
    view = {2: torch.int16, 4: torch.int32, 1: torch.uint8}[t.element_size()]
    return t.contiguous().view(view)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))


@pytest.fixture
def seed(rng_seed):
    """Python's random too draws from the per-run seed (printed on failure)."""
    random.seed(rng_seed)
    return rng_seed


# --- a random scene: packed chunks placed in several sources, a random selection of them ---------
class Scene:
    """Chunks of random lengths encoded by formats.encode, laid out in `places` ("cuda" or "host"
    sources) at offsets with gaps, and a table selecting a random subset per (sequence, KV head)."""

    def __init__(self, fmt, head_dim, group_size, n_kv_heads, batch, lengths, places, device, *, align=16,
                 src_dtype=torch.float32, scale=1.0, n_select=None, extra_tokens=5):
        self.fmt, self.D, self.G, self.H, self.B = fmt, head_dim, group_size, n_kv_heads, batch
        self.chunks = []  # (k, v, layout, source index, offset)
        bufs = [bytearray() for _ in places]
        for i, n in enumerate(lengths):
            k = (torch.randn(n_kv_heads, n, head_dim) * scale).to(src_dtype)
            v = (torch.randn(n_kv_heads, n, head_dim) * scale).to(src_dtype)
            lay = ChunkLayout(fmt, n, n_kv_heads, head_dim, group_size)
            packed = encode(k, v, lay)
            s = random.randrange(len(places))
            gap = random.randrange(0, 4) * 16 + (random.randrange(1, 16) if align == 1 else 0)
            bufs[s].extend(bytes(gap))
            self.chunks.append((k, v, lay, s, len(bufs[s])))
            bufs[s].extend(packed.numpy().tobytes())
        self.sources = []
        for place, buf in zip(places, bufs):
            t = torch.frombuffer(buf + bytearray(32), dtype=torch.uint8).clone()
            self.sources.append(t.to(device) if place == "cuda" else t.pin_memory() if HAS_CUDA else t)
        rows = []  # (source, chunk offset, n, b, h, chunk id)
        for b in range(batch):
            for h in range(n_kv_heads):
                k_sel = n_select if n_select is not None else random.randrange(1, len(lengths) + 1)
                for c in random.sample(range(len(lengths)), k_sel):
                    _, _, lay, s, off = self.chunks[c]
                    rows.append((s, off, lay.n_tokens, b, h, c))
        cols = torch.tensor(rows, dtype=torch.int64).T
        self.chunk_ids = cols[5]
        n0 = ops.dest_offsets(cols[2], cols[3] * n_kv_heads + cols[4])
        self.n_out = int((n0 + cols[2]).max()) + extra_tokens
        self.table = ops.make_table(cols[0], cols[1], cols[2], cols[3], cols[4], n0, n_kv_heads=n_kv_heads, fmt=fmt,
                                    head_dim=head_dim, group_size=group_size, device=device)

    def outputs(self, dtype, device, strided=None):
        """NaN-poisoned K and V outputs; with `strided`, views into a larger buffer starting that
        many elements in (8: 16-byte aligned rows; anything else not a multiple of 8: misaligned)."""
        shape = (self.B, self.H, self.n_out, self.D)
        if strided is None:
            return (torch.full(shape, float("nan"), dtype=dtype, device=device),
                    torch.full(shape, float("nan"), dtype=dtype, device=device))
        n_pad = self.n_out + 2
        stride = (self.H * n_pad * self.D, n_pad * self.D, self.D, 1)
        out = []
        for _ in range(2):
            buf = torch.full((self.B * stride[0] + strided + 16,), float("nan"), dtype=dtype, device=device)
            out.append(buf.as_strided(shape, stride, strided))
        return tuple(out)

    def expected(self, dtype):
        """Entry by entry with formats.decode: the definition the reference and kernels must meet."""
        k_out, v_out = self.outputs(dtype, "cpu")
        for (s, off, n, row, n0), c in zip(self.table.cpu().tolist(), self.chunk_ids.tolist()):
            lay1 = ChunkLayout(self.fmt, n, 1, self.D, self.G)
            src = self.sources[s].cpu()
            k, v = decode(src[off:off + lay1.head_bytes], lay1, dtype)
            b, h = divmod(row, self.H)
            k_out[b, h, n0:n0 + n] = k[0]
            v_out[b, h, n0:n0 + n] = v[0]
        return k_out, v_out


# --- CPU: layout helpers, tables, references, dispatch ----------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_head_bytes_matches_layout(fmt):
    for D, G in ((8, 8), (64, 32), (72, 12), (128, 32), (128, 128), (256, 64), (24, 3)):
        ns = list(range(1, 41)) + [63, 64, 100, 255, 256, 1000]
        want = [ChunkLayout(fmt, n, 1, D, G).head_bytes for n in ns]
        assert [ops.head_bytes(n, fmt, D, G) for n in ns] == want
        assert ops.head_bytes(torch.tensor(ns), fmt, D, G).tolist() == want


def test_make_table_and_dest_offsets(seed):
    H, D, fmt, G = 4, 64, "int4", 32
    n = torch.randint(1, 50, (30,))
    b = torch.randint(0, 3, (30,))
    h = torch.randint(0, H, (30,))
    order = torch.argsort(b * H + h, stable=True)
    n, b, h = n[order], b[order], h[order]
    src = torch.randint(0, 3, (30,))
    off = torch.randint(0, 1000, (30,)) * 16
    n0 = ops.dest_offsets(n, b * H + h)
    table = ops.make_table(src, off, n, b, h, n0, n_kv_heads=H, fmt=fmt, head_dim=D, group_size=G)
    run = {}
    for i in range(30):
        row = int(b[i] * H + h[i])
        start = run.get(row, 0)
        run[row] = start + int(n[i])
        hb = ChunkLayout(fmt, int(n[i]), 1, D, G).head_bytes
        assert table[i].tolist() == [int(src[i]), int(off[i]) + int(h[i]) * hb, int(n[i]), row, start]
    # scalars broadcast
    t = ops.make_table(0, off[:3], 16, 0, 1, 0, n_kv_heads=H, fmt="bf16", head_dim=D)
    assert t.shape == (3, 5) and t[:, 0].tolist() == [0] * 3 and t[:, 1].tolist() == (off[:3] + 16 * D * 4).tolist()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16))
def test_gather_reference_matches_decode(fmt, out_dtype, seed):
    D, G = random.choice([(64, 32), (72, 12), (128, 32)])
    lengths = [random.choice([1, 3, 7, 16, 17, 33, 64]) for _ in range(7)]
    sc = Scene(fmt, D, G, n_kv_heads=2, batch=2, lengths=lengths, places=["cpu", "cpu"], device="cpu",
               src_dtype=random.choice([torch.bfloat16, torch.float16, torch.float32]))
    k_out, v_out = sc.outputs(out_dtype, "cpu")
    ops.gather(sc.sources, sc.table, fmt, D, G, k_out, v_out, check=True)
    k_exp, v_exp = sc.expected(out_dtype)
    assert same_bits(k_out, k_exp) and same_bits(v_out, v_exp), f"seed {seed}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_ingest_reference_matches_encode(fmt, dtype, seed):
    B, H, D, G = 2, 3, random.choice([64, 72]), 8
    L = random.choice([1, 5, 16, 17])
    T = L * random.randint(1, 4)
    k = torch.randn(B, H, T, D).to(dtype)
    v = torch.randn(B, H, T, D).to(dtype)
    packed, abstracts = ops.ingest(k, v, L, fmt, G)
    C = T // L
    assert packed.shape == (B, C, ChunkLayout(fmt, L, H, D, G).nbytes) and abstracts.shape == (B, C, H, 2, D)
    assert abstracts.dtype == dtype
    for b in range(B):
        for c in range(C):
            kc, vc = k[b, :, c * L:(c + 1) * L], v[b, :, c * L:(c + 1) * L]
            assert same_bits(packed[b, c], encode(kc, vc, ChunkLayout(fmt, L, H, D, G)))
            assert same_bits(abstracts[b, c], chunk_abstract(kc))


def test_backend_choice_and_forcing(monkeypatch):
    monkeypatch.delenv("TIERKV_BACKEND", raising=False)
    got = ops.backend()
    assert got in ops.BACKENDS
    assert ops.available_backends()[-1] == "torch" and ops.available_backends()[0] == got
    monkeypatch.setenv("TIERKV_BACKEND", "torch")
    assert ops.backend() == "torch"
    monkeypatch.setenv("TIERKV_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        ops.backend()
    for name in ("ext", "cupy"):
        monkeypatch.setenv("TIERKV_BACKEND", name)
        if name in ops.available_backends():
            assert ops.backend() == name
        else:
            with pytest.raises(BackendError, match=f"TIERKV_BACKEND={name}"):
                ops.backend()


def test_no_cuda_is_quiet(capsys):
    if HAS_CUDA:
        pytest.skip("checks the CPU-only machine")
    assert ops.backend() == "torch"
    assert ops.available_backends() == ["torch"]
    with pytest.raises(BackendError, match="CUDA"):
        ops.gather([torch.zeros(64, dtype=torch.uint8)], torch.zeros(0, 5, dtype=torch.int64), "bf16", 8, 8,
                   torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16),
                   backend="ext")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_gather_validation():
    D = 64
    src = [torch.zeros(4096, dtype=torch.uint8)]
    k = torch.zeros(1, 2, 32, D, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    table = ops.make_table(0, 0, 16, 0, 1, 0, n_kv_heads=2, fmt="bf16", head_dim=D)
    with pytest.raises(FormatError, match="fmt"):
        ops.gather(src, table, "int3", D, 32, k, v)
    with pytest.raises(FormatError, match="head_dim"):
        ops.gather(src, table, "bf16", 60, 32, k, v)
    with pytest.raises(FormatError, match="k_out"):
        ops.gather(src, table, "bf16", D, 32, k.float(), v)
    with pytest.raises(FormatError, match="table"):
        ops.gather(src, table.int(), "bf16", D, 32, k, v)
    with pytest.raises(FormatError, match="sources"):
        ops.gather([src[0].float()], table, "bf16", D, 32, k, v)
    with pytest.raises(FormatError, match="group_size"):
        ops.gather(src, table, "int4", D, 48, k, v)
    # head 1 of a 16-token bf16 chunk at offset 0 ends at 8192 bytes: past the 4096-byte source
    with pytest.raises(FormatError, match="row 0"):
        ops.gather(src, table, "bf16", D, 32, k, v, check=True)
    bad_n0 = table.clone()
    bad_n0[0, 1], bad_n0[0, 4] = 0, 20
    with pytest.raises(FormatError, match="row 0"):
        ops.gather(src, bad_n0, "bf16", D, 32, k, v, check=True)


def test_ingest_validation():
    k = torch.zeros(1, 2, 30, 64)
    with pytest.raises(FormatError, match="chunk_len"):
        ops.ingest(k, k, 16, "int4")
    with pytest.raises(FormatError, match="one shape"):
        ops.ingest(k, k[:, :, :16], 15, "int4")
    with pytest.raises(FormatError, match="dtype"):
        ops.ingest(k.to(torch.int32), k.to(torch.int32), 15, "int4")
    with pytest.raises(FormatError, match="head_dim"):
        ops.ingest(k[..., :60], k[..., :60], 15, "bf16")


def _struct_fields(name: str):
    src = open(header_path()).read()
    body = re.search(r"struct %s \{(.*?)\n\};" % name, src, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        typ, names = decl.split(None, 1)
        assert typ in ("u64", "i64"), f"{name}: field type {typ} would need padding rules mirrored in Python"
        for n in names.split(","):
            n = n.strip()
            fields.append(re.sub(r"\[.*\]", "", n))
    return fields


def test_cupy_structs_mirror_header():
    """The cupy backend builds the kernels' argument structs byte for byte; their field order must be the header's."""
    assert list(GATHER_DTYPE.names) == _struct_fields("GatherArgs")
    assert list(INGEST_DTYPE.names) == _struct_fields("IngestArgs")
    assert list(MASS_DTYPE.names) == _struct_fields("MassArgs")
    assert GATHER_DTYPE.itemsize == 8 * (2 * ops.MAX_SOURCES + len(GATHER_DTYPE.names) - 2)
    src = open(header_path()).read()
    assert f"#define TIERKV_MAX_SOURCES {ops.MAX_SOURCES}" in src
    assert f"#define TIERKV_THREADS {ops.THREADS}" in src
    assert f"#define TIERKV_MAX_HEAD_DIM {ops.MAX_HEAD_DIM}" in src
    assert os.path.dirname(header_path()).endswith("csrc")


# --- GPU: each kernel backend against the reference ---------------------------------------------------
def _need(backend):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} unavailable: {ops.missing(backend)}")


def _check_gather(sc, backend, out_dtype, strided=None, **kw):
    k_out, v_out = sc.outputs(out_dtype, "cuda", strided)
    ops.gather(sc.sources, sc.table, sc.fmt, sc.D, sc.G, k_out, v_out, backend=backend, **kw)
    k_ref, v_ref = sc.outputs(out_dtype, "cuda", strided)
    ops.gather(sc.sources, sc.table, sc.fmt, sc.D, sc.G, k_ref, v_ref, backend="torch")
    torch.cuda.synchronize()
    assert same_bits(k_out, k_ref), "K differs from the reference"
    assert same_bits(v_out, v_ref), "V differs from the reference"
    # and every selected row was written (the poison is gone exactly there)
    written = torch.zeros(sc.B * sc.H, sc.n_out, dtype=torch.bool)
    for s, off, n, row, n0 in sc.table.cpu().tolist():
        written[row, n0:n0 + n] = True
    written = written.reshape(sc.B, sc.H, sc.n_out)
    assert not torch.isnan(k_out.float().cpu()[written]).any() and torch.isnan(k_out.float().cpu()[~written]).all()
    return k_out, v_out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("places", [("cuda",), ("host",), ("cuda", "host", "cuda")])
def test_gather_matches_reference(backend, fmt, places, seed):
    _need(backend)
    for D, G in ((64, 32), (128, 32), (256, 64), (72, 12)):
        lengths = [random.choice([1, 3, 7, 8, 16, 17, 31, 64, 100, 256]) for _ in range(6)]
        sc = Scene(fmt, D, G, n_kv_heads=random.choice([1, 2, 8]), batch=random.choice([1, 3]), lengths=lengths,
                   places=list(places), device="cuda", src_dtype=random.choice([torch.bfloat16, torch.float32]))
        for out_dtype in (torch.bfloat16, torch.float16):
            _check_gather(sc, backend, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_odd_layouts(backend, fmt, seed):
    """Misaligned sources (byte path), strided and misaligned outputs, forced launch shapes (parts, tiles,
    blocks: how the kernels share items among blocks and warps)."""
    _need(backend)
    lengths = [random.choice([1, 5, 16, 23, 40]) for _ in range(5)]
    sc = Scene(fmt, 64, 16, n_kv_heads=2, batch=2, lengths=lengths, places=["cuda", "host"], device="cuda", align=1)
    _check_gather(sc, backend, torch.bfloat16)
    sc = Scene(fmt, 128, 32, n_kv_heads=3, batch=2, lengths=lengths, places=["cuda"], device="cuda")
    _check_gather(sc, backend, torch.float16, strided=8)  # 16-byte aligned view with padded rows
    _check_gather(sc, backend, torch.float16, strided=3)  # misaligned: 2-byte stores
    # blocks: one block claiming every item; a few; more blocks than items (empty shares)
    for parts, tile, blocks in ((1, 8, None), (5, 8, 1), (64, 16, 7), (3, 32, 1000), (1, 16, 1)):
        _check_gather(sc, backend, torch.bfloat16, parts=parts, tile_tokens=tile, blocks=blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
def test_gather_many_sources_and_gqa_sizes(backend, seed):
    _need(backend)
    lengths = [random.choice([2, 16, 33]) for _ in range(70)]
    places = ["cuda" if i % 2 else "host" for i in range(70)]
    sc = Scene("int4", 128, 32, n_kv_heads=8, batch=2, lengths=lengths, places=places, device="cuda", n_select=12)
    assert len(sc.sources) > ops.MAX_SOURCES
    _check_gather(sc, backend, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
def test_gather_skips_bad_rows_and_check_raises(backend, seed):
    _need(backend)
    sc = Scene("int8", 64, 32, n_kv_heads=2, batch=1, lengths=[16, 16], places=["cuda"], device="cuda", n_select=2)
    bad = sc.table.clone()
    bad[0, 1] = sc.sources[0].numel()  # past the end of the source
    bad[1, 0] = 7  # no such source
    k_out, v_out = sc.outputs(torch.bfloat16, "cuda")
    ops.gather(sc.sources, bad, "int8", 64, 32, k_out, v_out, backend=backend)
    torch.cuda.synchronize()
    rows = bad[:2].cpu().tolist()
    for s, off, n, row, n0 in rows:
        b, h = divmod(row, sc.H)
        assert torch.isnan(k_out[b, h, n0:n0 + n].float()).all()
    with pytest.raises(FormatError, match="row 0"):
        ops.gather(sc.sources, bad, "int8", 64, 32, k_out, v_out, backend=backend, check=True)
    with pytest.raises(FormatError, match="pinned"):
        ops.gather([sc.sources[0].cpu()], sc.table, "int8", 64, 32, k_out, v_out, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_ingest_matches_reference(backend, fmt, dtype, seed):
    _need(backend)
    for D, G in ((64, 32), (128, 32), (256, 64), (72, 12)):
        B, H = random.choice([(1, 8), (2, 3)])
        L = random.choice([1, 3, 16, 17, 64, 256])
        T = L * random.randint(1, 3)
        scale = random.choice([1.0, 1e-3, 300.0])
        k = (torch.randn(B, H, T, D, device="cuda") * scale).to(dtype)
        v = (torch.randn(B, H, T, D, device="cuda") * scale).to(dtype)
        layout = random.choice(["contiguous", "bthd", "misaligned"])
        if layout == "bthd":  # [B, T, H, D] storage, as attention layers often hold it
            k = k.transpose(1, 2).contiguous().transpose(1, 2)
            v = v.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "misaligned":  # rows one element off 16 bytes: the scalar-load path
            k = torch.cat([k, k[..., :1]], -1)[..., 1:]
            v = torch.cat([v, v[..., :1]], -1)[..., 1:]
        packed, abstracts = ops.ingest(k, v, L, fmt, G, backend=backend)
        # the reference on the CPU: CUDA torch divides by the python scalar q as a multiply by 1/q
        # (one bit off at times), the CPU as formats.py specifies, correctly rounded
        p_ref, a_ref = ops.ingest(k.cpu(), v.cpu(), L, fmt, G, backend="torch")
        assert same_bits(packed, p_ref), f"packed chunks differ (D={D}, L={L}, {dtype})"
        assert same_bits(abstracts, a_ref), f"abstracts differ (D={D}, L={L}, {dtype})"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ingest_then_gather_roundtrip(backend, fmt, seed):
    """What ingest writes, gather reads back as formats.roundtrip of each chunk."""
    _need(backend)
    B, H, L, C, D = 2, 4, 32, 5, 128
    k = torch.randn(B, H, L * C, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    packed, _ = ops.ingest(k, v, L, fmt, 32, backend=backend)
    host = packed.reshape(-1).cpu().pin_memory()
    nb = packed.shape[-1]
    b = torch.arange(B).repeat_interleave(H * C)
    h = torch.arange(H).repeat_interleave(C).repeat(B)
    c = torch.arange(C).repeat(B * H)
    table = ops.make_table(0, (b * C + c) * nb, L, b, h, c * L, n_kv_heads=H, fmt=fmt, head_dim=D, device="cuda")
    k_out = torch.full_like(k, float("nan"))
    v_out = torch.full_like(v, float("nan"))
    ops.gather([host], table, fmt, D, 32, k_out, v_out, backend=backend)
    lay = ChunkLayout(fmt, L, H, D, 32)
    kc = k.reshape(B, H, C, L, D).permute(0, 2, 1, 3, 4)
    vc = v.reshape(B, H, C, L, D).permute(0, 2, 1, 3, 4)
    k_exp, v_exp = decode(encode(kc.cpu(), vc.cpu(), lay), lay, torch.bfloat16)  # encode on the CPU: see above
    assert same_bits(k_out, k_exp.permute(0, 2, 1, 3, 4).reshape(B, H, C * L, D))
    assert same_bits(v_out, v_exp.permute(0, 2, 1, 3, 4).reshape(B, H, C * L, D))


# --- mass scoring ---------------------------------------------------------------------------------------
def _mass_scene(B, H, G, D, L, cap, C, dtype, device, gen):
    from tierkv.abstracts import key_codes

    k = torch.randn(B, H, cap, L, D, generator=gen) * 2
    lo, hi = k.amin(3), k.amax(3)
    codes = key_codes(k, lo, hi).to(device)
    ab = torch.cat([lo.transpose(-1, -2), hi.transpose(-1, -2)], dim=2).to(dtype).to(device).contiguous()  # [B,H,2D,cap]
    q = (torch.randn(B, H, G, D, generator=gen) * 0.2).to(device)
    return q, ab, codes


def test_mass_logits_reference_and_validation():
    gen = torch.Generator().manual_seed(11)
    q, ab, codes = _mass_scene(2, 2, 3, 16, 5, 7, 6, torch.bfloat16, "cpu", gen)
    from tierkv.abstracts import chunk_log_mass

    got = ops.mass_logits(q, ab, codes, 6)
    lo, hi = ab[:, :, :16, :6].float().transpose(-1, -2), ab[:, :, 16:, :6].float().transpose(-1, -2)
    torch.testing.assert_close(got, chunk_log_mass(q, lo, hi, codes[:, :, :6], 1.0))
    with pytest.raises(FormatError, match="n_chunks"):
        ops.mass_logits(q, ab, codes, 8)
    with pytest.raises(FormatError, match="do not fit"):
        ops.mass_logits(q, ab, codes[..., :2], 6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "cupy"])
@pytest.mark.parametrize("shape", [(1, 8, 4, 128, 64, 40, 37), (2, 2, 8, 256, 16, 9, 9), (3, 4, 1, 64, 5, 7, 6),
                                   (1, 2, 7, 8, 33, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mass_logits_kernel_matches_reference(backend, shape, dtype, seed):
    """The kernel's log-masses equal the float32 torch reference (summation order differs: close, not equal)."""
    _need(backend)
    from tierkv.abstracts import chunk_log_mass

    B, H, G, D, L, cap, C = shape
    gen = torch.Generator().manual_seed(seed)
    q, ab, codes = _mass_scene(B, H, G, D, L, cap, C, dtype, "cuda", gen)
    got = ops.mass_logits(q, ab, codes, C, backend=backend)
    lo, hi = ab[:, :, :D, :C].float().transpose(-1, -2), ab[:, :, D:, :C].float().transpose(-1, -2)
    want = chunk_log_mass(q.double(), lo.double(), hi.double(), codes[:, :, :C], 1.0).float()
    torch.cuda.synchronize()
    assert got.shape == (B, H, G, C) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_launch_plan_splits_chunks_into_at_most_their_tiles(monkeypatch):
    """Parts aim at ITEMS_PER_WARP items per resident warp, but never cut a chunk into items of fewer
    than MIN_TILES_PER_ITEM tiles unless warps would idle; the output length bounds chunks when the
    caller gives no chunk length."""
    monkeypatch.setattr(ops, "_device_limits", lambda index: (132, 227 * 1024, 228 * 1024))
    ops.launch_plan.cache_clear()  # plans are cached per argument tuple; these must see the H200 above
    warps = 3 * 132 * 8
    # int2, head_dim 128: 16-token tiles
    parts, tile, blocks = ops.launch_plan("int2", 512, 128, 32, 4096, 0, chunk_tokens=256)
    assert (parts, tile, blocks) == (16 // ops.MIN_TILES_PER_ITEM, 16, 396)
    parts, _, _ = ops.launch_plan("int2", 512, 128, 32, 4096, 0)
    assert parts == -(-ops.ITEMS_PER_WARP * warps // 512)
    # a decode step's gather: 512 entries of 2 tiles leave warps idle, so one-tile items are allowed
    parts, _, _ = ops.launch_plan("int2", 512, 128, 32, 2048, 0, chunk_tokens=32)
    assert parts == 2
    # enough entries to fill the warps: items keep MIN_TILES_PER_ITEM tiles
    parts, _, _ = ops.launch_plan("int4", 8192, 128, 32, 4096, 0, chunk_tokens=16)  # 2 tiles of 8
    assert parts == 1
    parts, _, _ = ops.launch_plan("int2", 8192, 128, 32, 16384, 0, chunk_tokens=64)
    assert parts == -(-ops.ITEMS_PER_WARP * warps // 8192) == 2
    # 2048 entries of 16 tiles aim at 7 parts; 8 divides the tiles, so items are equal (2 tiles each)
    assert ops.launch_plan("int2", 2048, 128, 32, 16384, 0, chunk_tokens=256)[0] == 8
    assert ops.launch_plan("int2", 2048, 128, 32, 16384, 0, chunk_tokens=208)[0] == 6  # 13 tiles: no divisor <= 6
    parts, _, _ = ops.launch_plan("bf16", 100000, 128, 128, 16384, 0, chunk_tokens=16)
    assert parts == 1
    assert ops.launch_plan("int4", 64, 128, 32, 4096, 0, parts=7, chunk_tokens=16)[0] == 7  # forced stays
    ops.launch_plan.cache_clear()
