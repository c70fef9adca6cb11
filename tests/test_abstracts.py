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
