"""Look-ahead queries (hf/lookahead.py): the math is the layer's own, and they predict the next layer's
chunks better than the current layer's query does."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tierkv
from tierkv import TierConfig
from tierkv.errors import ConfigError
from tierkv.hf.cache import TierKVCache
from tierkv.hf.lookahead import decoder_layers

from test_offload import build
from test_pipeline import gen, prefetch_threads


def cfg(tmp_path, **kw):
    base = dict(budget=48, format="int8", sink=4, window=32, chunk_length=16, gpu_budget="16KiB",
                cpu_budget="12KiB", disk_path=str(tmp_path / "cold"))
    base.update(kw)
    return TierConfig(**base)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_lookahead_query_is_the_layers_own_query(tmp_path, family, monkeypatch):
    """Guessing layer l's query from the hidden state entering layer l itself must give exactly the query
    the attention receives (input norm, projection, q_norm where the model has one, rotary embedding)."""
    model = build(family, seed=5)
    seen = []
    original = TierKVCache.predict_next

    def record(self, layer, q, idx):
        guess = self.lookahead.query(layer.layer_idx, layer.layer_idx)
        seen.append((q.clone(), None if guess is None else guess.clone()))
        return original(self, layer, q, idx)

    monkeypatch.setattr(TierKVCache, "predict_next", record)
    ids = torch.randint(1, 512, (2, 300))
    with tierkv.offload(model, cfg(tmp_path)) as cache:
        assert cache.lookahead is not None
        gen(model, ids, cache, n=6)
    assert len(seen) >= 5 * model.config.num_hidden_layers
    for q, guess in seen:
        assert guess is not None and guess.shape == q.shape
        torch.testing.assert_close(guess, q, rtol=0, atol=0)
    assert all(len(h._forward_pre_hooks) == 0 for h in decoder_layers(model))  # hooks gone on exit


def test_lookahead_predicts_the_next_layer_better(tmp_path, monkeypatch):
    """On a random-weight model the current layer's query says nothing about the next layer's choice
    (different projections); the look-ahead guess, from the residual stream, hits far more often.
    (Guesses made and scored every step: the gate held open.)"""
    import tierkv.hf.cache as cache_mod

    monkeypatch.setattr(cache_mod, "GATE_EVERY", 10**9)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                         max_position_embeddings=4096)).to(torch.bfloat16).eval()
    ids = torch.randint(1, 512, (1, 1024))
    rates = {}
    for mode in ("query", "lookahead"):
        with tierkv.offload(model, cfg(tmp_path / mode, prediction=mode, budget=64, selection="shared")) as cache:
            cache.next_layer_prefetch = True
            gen(model, ids, cache, n=10)
            rates[mode] = cache.stats().prefetch["predict_next_layer_hit_rate"]
    chance = 64 / 1024
    assert rates["query"] < 3 * chance
    assert rates["lookahead"] > rates["query"] + 0.15, rates


def test_lookahead_off_and_unsupported(tmp_path):
    model = build("llama", seed=1)
    with tierkv.offload(model, cfg(tmp_path / "q", prediction="query")) as cache:
        assert cache.lookahead is None
    with tierkv.offload(model, cfg(tmp_path / "nodisk", disk_path=None, cpu_budget="16MiB")) as cache:
        assert cache.lookahead is None  # nothing to prefetch: no hooks
    assert decoder_layers(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ConfigError, match="prediction"):
        TierConfig(prediction="psychic")
    assert not prefetch_threads()


def test_admission_follows_the_next_step_hit_rate(tmp_path):
    """Chunks read from disk go into the cpu tier at once while choices persist from step to step, and
    only when chosen again within a few steps while they do not (hf.cache ADMIT_ALL_AT)."""
    from tierkv.hf import cache as hc

    model = build("llama", seed=2)
    with tierkv.offload(model, cfg(tmp_path)) as cache:
        assert cache.admit_min_prior == 0.0  # nothing measured yet: as before
        cache._pred["next_step_hits"], cache._pred["next_step_total"] = torch.tensor(5), 100
        cache._gate_admission()
        assert cache.admit_min_prior == hc.ADMIT_PRIOR  # 5% persist
        cache._pred["next_step_hits"], cache._pred["next_step_total"] = torch.tensor(5 + 60), 200
        cache._gate_admission()
        assert cache.admit_min_prior == 0.0  # 60% of the last window persisted
