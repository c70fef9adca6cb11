"""Abstracts and key codes (tierkv.abstracts) and the scoring and choosing made from them (tierkv.selection)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv import selection
from tierkv.abstracts import as_rows, chunk_abstract, chunk_log_mass, key_codes, unpack_codes
from tierkv.errors import FormatError


def rows_of(lo, hi):
    """Per-chunk min and max [B, H, C, D] -> the layout a layer keeps [B, H, 2D, C]."""
    return as_rows(torch.stack([lo, hi], dim=-2).transpose(1, 2))


# --- the bound ---------------------------------------------------------------------------------------------

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
    ab = as_rows(chunk_abstract(keys).float())  # [B, Hkv, 2D, C], float32 as the runtime's arithmetic
    bound = selection.score(q.float(), ab, None, C, scoring="bound")  # [B, Hkv, C]
    # true max of q.k over keys of the chunk, over the group's query heads and tokens
    qg = q.reshape(B, Hkv, g * T, D)
    dots = torch.einsum("bhqd,bchld->bhcql", qg, keys)
    true = dots.amax(dim=(-1, -2))
    slack = 1e-4 * (qg.abs().sum(-1).amax(-1, keepdim=True) * keys.abs().amax() + 1)
    assert bound.shape == (B, Hkv, C)
    assert (bound.double() >= true - slack).all()


def test_bound_tight_for_single_key():
    k = torch.randn(1, 1, 2, 1, 16)
    q = torch.randn(1, 2, 1, 16)
    b = selection.bound_scores(q, as_rows(chunk_abstract(k)), 1)
    assert torch.allclose(b[0, :, 0], (q[0, :, 0] * k[0, 0, :, 0]).sum(-1), atol=1e-5)


def test_bound_reads_only_the_chunks_held():
    """A layer's abstracts have room beyond its chunks: scores cover the first n_chunks columns only."""
    ab = as_rows(chunk_abstract(torch.randn(2, 5, 2, 4, 8)))
    q = torch.randn(2, 4, 1, 8)
    full = selection.bound_scores(q, ab, 5)
    assert torch.equal(selection.bound_scores(q, ab, 3), full[..., :3])


def test_score_checks_its_shapes_and_falls_back_to_the_bound():
    ab = as_rows(chunk_abstract(torch.randn(1, 3, 2, 4, 8)))
    q = torch.randn(1, 4, 1, 8)
    # 'mass' without key codes (a layer made under scoring 'bound') ranks by the bound
    assert torch.equal(selection.score(q, ab, None, 3, scoring="mass"), selection.bound_scores(q, ab, 3))
    with pytest.raises(FormatError, match="abstracts"):
        selection.score(torch.randn(1, 3, 1, 8), ab, None, 3)  # 3 query heads over 2 KV heads
    with pytest.raises(FormatError, match="abstracts"):
        selection.score(torch.randn(1, 4, 1, 16), ab, None, 3)  # head dim 16 against abstracts of 8


# --- choosing ----------------------------------------------------------------------------------------------

def test_chunks_in_budget():
    assert selection.chunks_in_budget(48, 16, 5) == 3
    assert selection.chunks_in_budget(47, 16, 5) == 2  # a chunk that would overflow is not taken
    assert selection.chunks_in_budget(0, 16, 5) == 0
    assert selection.chunks_in_budget(10**6, 16, 5) == 5


def test_choose_per_head_takes_each_heads_best():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 1.0, 8.0, 7.0]]])
    idx = selection.choose(scores, 3, "head")
    assert idx.shape == (1, 2, 3)
    assert sorted(idx[0, 0].tolist()) == [0, 2, 3] and sorted(idx[0, 1].tolist()) == [1, 3, 4]


def test_choose_shared_takes_the_best_of_the_summed_scores_for_every_head():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 1.0, 8.0, 7.0]]])  # sums 5 10 5 11 9
    idx = selection.choose(scores, 3, "shared")
    assert idx.shape == (1, 2, 3) and idx.is_contiguous()
    assert sorted(idx[0, 0].tolist()) == [1, 3, 4] and torch.equal(idx[0, 0], idx[0, 1])


def test_choose_random_properties():
    for _ in range(20):
        B, H, C = 2, 3, 50
        s = torch.randn(B, H, C)
        k = int(torch.randint(0, C + 1, ()))
        for how, ranked in (("head", s), ("shared", s.sum(1, keepdim=True).expand(B, H, C))):
            idx = selection.choose(s, k, how)
            assert idx.shape == (B, H, k)
            chosen = torch.zeros(B, H, C, dtype=torch.bool).scatter_(2, idx, True)
            assert (chosen.sum(-1) == k).all()  # k distinct chunks
            # every chosen chunk outranks every unchosen one
            for b in range(B):
                for h in range(H):
                    if 0 < k < C:
                        assert ranked[b, h][chosen[b, h]].min() >= ranked[b, h][~chosen[b, h]].max()


def test_overlap_counts_the_shared_choices():
    a = torch.tensor([[[0, 1, 2], [3, 4, 5]]])
    b = torch.tensor([[[2, 1, 7], [5, 6, 0]]])
    assert int(selection.overlap(a, b, 8)) == 3  # head 0: 1 and 2; head 1: 5


# --- mass scoring from 2-bit key codes ---------------------------------------------------------------------

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
    lo, hi = k.amin(-2), k.amax(-2)
    got = selection.score(q, rows_of(lo, hi), key_codes(k, lo, hi), C, scoring="mass", scaling=0.5, hot_keys=hot)
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
    ab, codes = rows_of(lo, hi), key_codes(k, lo, hi)
    m = selection.score(q, ab, codes, 2, scoring="mass", scaling=1.0)
    bound = selection.score(q, ab, codes, 2, scoring="bound")
    assert m[0, 0, 0] > m[0, 0, 1]
    assert bound[0, 0, 1] > bound[0, 0, 0]
    assert selection.choose(m, 1).item() == 0 and selection.choose(bound, 1).item() == 1


def test_key_codes_need_head_dim_multiple_of_4():
    k = torch.randn(1, 1, 1, 4, 6)
    with pytest.raises(FormatError, match="head dim 6"):
        key_codes(k, k.amin(-2), k.amax(-2))
