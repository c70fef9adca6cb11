import pytest
import torch

from tierkv.config import FORMATS
from tierkv.errors import FormatError
from tierkv.formats import (
    BITS,
    ChunkLayout,
    decode,
    encode,
    pack_codes,
    unpack_codes,
)


def kv(shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype), (torch.randn(shape) * scale * 2).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("L,H,D", [(1, 1, 64), (7, 2, 128), (33, 8, 256), (16, 3, 8), (5, 2, 24)])
def test_layout_alignment(fmt, L, H, D):
    lay = ChunkLayout(fmt, L, H, D, group_size=8)
    prev_end = 0
    for name, off, size in lay.sections():
        assert off % 16 == 0 and off >= prev_end and size > 0
        prev_end = off + size
    assert lay.head_bytes % 16 == 0 and lay.head_bytes >= prev_end
    assert lay.nbytes == H * lay.head_bytes


def test_layout_sizes_int4():
    lay = ChunkLayout("int4", 64, 8, 128, group_size=32)
    # per head: K codes 64*64, K scale+zero 2*128*2, V codes 64*64, V scale+zero 2*64*4*2
    assert dict((n, s) for n, _, s in lay.sections()) == {
        "k_codes": 4096, "k_scale": 256, "k_zero": 256, "v_codes": 4096, "v_scale": 512, "v_zero": 512,
    }
    assert lay.head_bytes == 4096 * 2 + 256 * 2 + 512 * 2


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_raw_roundtrip_exact(fmt, rng_seed):
    dt = torch.bfloat16 if fmt == "bf16" else torch.float16
    k, v = kv((3, 4, 17, 64), dt)
    lay = ChunkLayout(fmt, 17, 4, 64)
    buf = encode(k, v, lay)
    assert buf.shape == (3, lay.nbytes) and buf.dtype == torch.uint8
    k2, v2 = decode(buf, lay, dt)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # the K block of head 1 of chunk 0 is literally the bytes of k[0, 1]
    blk = buf[0, lay.head_bytes : lay.head_bytes + 17 * 64 * 2]
    assert torch.equal(blk, k[0, 1].contiguous().view(torch.uint8).reshape(-1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_bit_positions(bits):
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (5, 32), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 32 * bits // 8)
    for d in range(32):
        got = (packed[:, d // per] >> ((d % per) * bits)) & ((1 << bits) - 1)
        assert torch.equal(got, codes[:, d])
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
@pytest.mark.parametrize("group", [8, 32, 128])
def test_quantized_error_within_half_step(fmt, group, rng_seed):
    H, L, D = 2, 29, 128
    k, v = kv((2, H, L, D), torch.float32)
    k[..., 5] *= 20  # an outlier channel, as real keys have
    lay = ChunkLayout(fmt, L, H, D, group_size=group)
    k2, v2 = decode(encode(k, v, lay), lay, torch.float16)
    q = (1 << BITS[fmt]) - 1
    k_step = (k.amax(-2, keepdim=True) - k.amin(-2, keepdim=True)) / q
    vg = v.reshape(2, H, L, D // group, group)
    v_step = ((vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / q).expand_as(vg).reshape(v.shape)
    # half a step, plus fp16 rounding of scale/zero/result
    tol_k = k_step * 0.5 * 1.01 + k.abs().amax() * 2e-3
    tol_v = v_step * 0.5 * 1.01 + v.abs().amax() * 2e-3
    assert ((k2.float() - k).abs() <= tol_k).all()
    assert ((v2.float() - v).abs() <= tol_v).all()


def test_constant_channel_and_token():
    k = torch.full((1, 1, 9, 16), 0.75)
    v = torch.full((1, 1, 9, 16), -2.5)
    for fmt in ["int8", "int4", "int2"]:
        lay = ChunkLayout(fmt, 9, 1, 16, group_size=8)
        k2, v2 = decode(encode(k, v, lay), lay, torch.bfloat16)
        assert torch.equal(k2.float(), k) and torch.equal(v2.float(), v)


def test_out_of_fp16_range_saturates_not_nan():
    k = torch.randn(1, 1, 8, 16) * 1e6
    lay = ChunkLayout("int8", 8, 1, 16, group_size=16)
    k2, v2 = decode(encode(k, k, lay), lay, torch.bfloat16)
    assert torch.isfinite(k2.float()).all() and torch.isfinite(v2.float()).all()


def test_encode_decode_reject_bad_input():
    lay = ChunkLayout("int4", 8, 2, 64)
    with pytest.raises(FormatError, match="shape"):
        encode(torch.randn(2, 8, 64), torch.randn(2, 8, 32), lay)
    with pytest.raises(FormatError, match="H=2, L=8, D=64"):
        encode(torch.randn(3, 8, 64), torch.randn(3, 8, 64), lay)
    with pytest.raises(FormatError, match="bytes"):
        decode(torch.zeros(lay.nbytes + 1, dtype=torch.uint8), lay)
    with pytest.raises(FormatError, match="uint8"):
        decode(torch.zeros(lay.nbytes), lay)
    with pytest.raises(FormatError, match="out_dtype"):
        decode(torch.zeros(lay.nbytes, dtype=torch.uint8), lay, torch.float32)
    with pytest.raises(FormatError, match="format"):
        ChunkLayout("int3", 8, 2, 64)
    with pytest.raises(FormatError, match="head_dim"):
        ChunkLayout("bf16", 8, 2, 60)
    with pytest.raises(FormatError, match="n_tokens"):
        ChunkLayout("bf16", 0, 2, 64)
