import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.abstracts import chunk_abstract, score, select


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 4), g=st.integers(1, 4), T=st.integers(1, 3),
    C=st.integers(1, 6), L=st.integers(1, 40), D=st.sampled_from([1, 3, 8, 64]),
    scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**31 - 1),
)
def test_bound_holds(B, Hkv, g, T, C, L, D, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, C, Hkv, L, D, generator=gen, dtype=torch.float64) * scale
    keys += torch.randn(B, C, Hkv, 1, D, generator=gen, dtype=torch.float64) * scale  # offsets per chunk
    q = torch.randn(B, Hkv * g, T, D, generator=gen, dtype=torch.float64)
    ab = chunk_abstract(keys)  # [B, C, Hkv, 2, D]
    bound = score(q.float(), ab.float())  # [B, Hkv, C], float32 as used at run time
    # true max of q.k over keys of the chunk, over the group's query heads and tokens
    qg = q.reshape(B, Hkv, g * T, D)
    dots = torch.einsum("bhqd,bchld->bhcql", qg, keys)
    true = dots.amax(dim=(-1, -2))
    slack = 1e-4 * (qg.abs().sum(-1).amax(-1, keepdim=True) * keys.abs().amax() + 1)
    assert (bound.double() >= true - slack).all()


def test_bound_tight_for_single_key():
    k = torch.randn(1, 1, 2, 1, 16)
    q = torch.randn(1, 2, 16)
    b = score(q, chunk_abstract(k))
    assert torch.allclose(b[0, :, 0], (q[0] * k[0, 0, :, 0]).sum(-1), atol=1e-5)


def test_select_respects_budget_and_order():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0]]])
    lengths = torch.tensor([16, 16, 16, 16, 7])
    chosen = select(scores, lengths, budget=48)
    assert chosen[0, 0].tolist() == [True, False, True, True, False]
    chosen = select(scores, lengths, budget=47)
    assert chosen[0, 0].tolist() == [True, False, True, False, False]
    assert not select(scores, lengths, budget=0).any()
    eligible = torch.tensor([[False, True, True, True, True]])
    assert select(scores, lengths, 32, eligible)[0, 0].tolist() == [False, False, True, True, False]


def test_select_random_properties():
    for _ in range(20):
        B, H, C = 2, 3, 50
        s = torch.randn(B, H, C)
        lens = torch.randint(1, 65, (B, C))
        budget = int(torch.randint(0, 2000, ()))
        ch = select(s, lens, budget)
        used = (ch * lens.unsqueeze(1)).sum(-1)
        assert (used <= budget).all()
        # every chosen chunk outranks every unchosen one
        for b in range(B):
            for h in range(H):
                if ch[b, h].any() and (~ch[b, h]).any():
                    assert s[b, h][ch[b, h]].min() >= s[b, h][~ch[b, h]].max()


# --- mass scoring from 2-bit key codes ---------------------------------------------------------------------
import pytest  # noqa: E402

from tierkv.abstracts import chunk_log_mass, key_codes, mass_score, unpack_codes  # noqa: E402
from tierkv.errors import FormatError  # noqa: E402


def _grid_keys(gen, B, H, C, L, D):
    """Keys that lie exactly on their chunk's 2-bit grid (lo + code * (hi - lo) / 3, both ends present)."""
    lo = torch.randn(B, H, C, 1, D, generator=gen)
    width = torch.rand(B, H, C, 1, D, generator=gen) * 3 + 0.1
    codes = torch.randint(0, 4, (B, H, C, L, D), generator=gen)
    codes[:, :, :, 0], codes[:, :, :, 1] = 0, 3
    return lo + codes.float() * width / 3, codes


def test_key_codes_roundtrip_on_grid():
    gen = torch.Generator().manual_seed(3)
    k, codes = _grid_keys(gen, 2, 3, 5, 7, 16)
    packed = key_codes(k, k.amin(-2), k.amax(-2))
    assert packed.shape == (2, 3, 5, 7, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed), codes.to(torch.uint8))


def test_key_codes_nearest_level_and_flat_channels():
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 3, 9, 8, generator=gen)
    k[..., 5] = 0.7  # a channel with no spread codes to 0
    lo, hi = k.amin(-2), k.amax(-2)
    got = unpack_codes(key_codes(k, lo, hi)).float()
    recon = lo.unsqueeze(-2) + got * ((hi - lo) / 3).unsqueeze(-2)
    assert (recon - k).abs().le(((hi - lo) / 6).unsqueeze(-2) + 1e-5).all()  # within half a step
    assert got[..., 5].eq(0).all()


def test_chunk_log_mass_exact_on_grid_and_blocking():
    gen = torch.Generator().manual_seed(5)
    B, H, G, C, L, D = 2, 2, 3, 6, 5, 32
    k, _ = _grid_keys(gen, B, H, C, L, D)
    lo, hi = k.amin(-2), k.amax(-2)
    packed = key_codes(k, lo, hi)
    q = torch.randn(B, H, G, D, generator=gen)
    exact = (torch.einsum("bhgd,bhcld->bhgcl", q, k) * 0.3).logsumexp(-1)
    got = chunk_log_mass(q, lo, hi, packed, 0.3)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunk_log_mass(q, lo, hi, packed, 0.3, block_elems=1), got)


def test_mass_score_is_softmax_share_summed_over_group():
    gen = torch.Generator().manual_seed(6)
    B, H, g, C, L, D, S = 1, 2, 2, 4, 3, 8, 5
    k, _ = _grid_keys(gen, B, H, C, L, D)
    hot = torch.randn(B, H, S, D, generator=gen)
    q = torch.randn(B, H * g, 1, D, generator=gen)
    got = mass_score(q, k.amin(-2), k.amax(-2), key_codes(k, k.amin(-2), k.amax(-2)), 0.5, hot)
    allk = torch.cat([hot, k.reshape(B, H, C * L, D)], dim=2)  # [B, H, S + C*L, D]
    p = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q.reshape(B, H, g, D), allk) * 0.5, dim=-1)
    want = p[..., S:].reshape(B, H, g, C, L).sum(-1).sum(2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.sum(-1).le(g + 1e-5).all()


def test_mass_ranks_a_heavy_chunk_the_bound_misses():
    """Sixteen keys that all match the query moderately hold more mass than one chunk whose single key
    matches best with fifteen that do not; the bound ranks the latter first, mass the former."""
    D, L = 16, 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    spread = torch.full((L, D), 0.0)
    spread[:, 0] = 2.0  # every key scores 2
    spike = torch.full((L, D), 0.0)
    spike[0, 0], spike[1:, 0] = 3.0, -8.0  # one key scores 3, the rest -8
    k = torch.stack([spread, spike]).view(1, 1, 2, L, D)
    lo, hi = k.amin(-2), k.amax(-2)
    m = mass_score(q, lo, hi, key_codes(k, lo, hi), 1.0)
    ab = torch.stack([lo, hi], dim=-2).permute(0, 2, 1, 3, 4)  # [B, C, H, 2, D]
    assert m[0, 0, 0] > m[0, 0, 1]
    assert score(q, ab)[0, 0, 1] > score(q, ab)[0, 0, 0]


def test_key_codes_need_head_dim_multiple_of_4():
    k = torch.randn(1, 1, 1, 4, 6)
    with pytest.raises(FormatError, match="head dim 6"):
        key_codes(k, k.amin(-2), k.amax(-2))
