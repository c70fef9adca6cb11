"""Look-ahead queries (hf/lookahead.py): the math is the layer's own, and they predict the next layer's
chunks better than the current layer's query does."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tierkv
from tierkv import TierConfig
from tierkv.errors import ConfigError
from tierkv.hf.lookahead import decoder_layers
from tierkv.pipeline import AdmissionGate, HitCounter, PipelineTuning, Predictor

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
    original = Predictor.after_choice

    def record(self, layer, nxt, q, idx, *args):
        guess = self.lookahead.query(layer.layer_idx, layer.layer_idx)
        seen.append((q.clone(), None if guess is None else guess.clone()))
        return original(self, layer, nxt, q, idx, *args)

    monkeypatch.setattr(Predictor, "after_choice", record)
    ids = torch.randint(1, 512, (2, 300))
    with tierkv.offload(model, cfg(tmp_path)) as cache:
        lookahead = cache.lookahead
        assert lookahead is not None
        gen(model, ids, cache, n=6)
    assert len(seen) >= 5 * model.config.num_hidden_layers
    for q, guess in seen:
        assert guess is not None and guess.shape == q.shape
        torch.testing.assert_close(guess, q, rtol=0, atol=0)
    with torch.no_grad():
        model(ids[:, :1])  # a one-token pass: the hooks, were they still there, would keep its hidden states
    assert all(h is None for h in lookahead.hidden) and lookahead.rope is None  # hooks gone on exit


def test_lookahead_predicts_the_next_layer_better(tmp_path):
    """On a random-weight model the current layer's query says nothing about the next layer's choice
    (different projections); the look-ahead guess, from the residual stream, hits far more often.
    (Guesses made and scored every step: the gate held open.)"""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                         max_position_embeddings=4096)).to(torch.bfloat16).eval()
    ids = torch.randint(1, 512, (1, 1024))
    rates = {}
    for mode in ("query", "lookahead"):
        tuning = PipelineTuning(gate_every=10**9, next_layer_prefetch_at_start=True)
        with tierkv.offload(model, cfg(tmp_path / mode, prediction=mode, budget=64, selection="shared"), tuning=tuning) as cache:
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
    only when chosen again within a few steps while they do not (PipelineTuning.admit_all_at); the gate
    reads the next-step hit rate of the last window."""
    tuning = PipelineTuning()
    gate, hits = AdmissionGate(tuning.admit_prior, tuning.admit_all_at), HitCounter()
    assert gate.min_prior == 0.0  # nothing measured yet: every chunk
    gate.update(hits.window_rate())
    assert gate.min_prior == 0.0  # no rate: nothing changes
    hits.add(torch.tensor(5), 100)
    gate.update(hits.window_rate())
    assert gate.min_prior == tuning.admit_prior  # 5% persist
    hits.add(torch.tensor(60), 100)
    gate.update(hits.window_rate())
    assert gate.min_prior == 0.0  # 60% of the last window persisted
    assert hits.rate() == 65 / 200
    model = build("llama", seed=2)
    with tierkv.offload(model, cfg(tmp_path)) as cache:  # the cache's fetcher admits by such a gate
        assert isinstance(cache.fetcher.installs.admission, AdmissionGate) and cache.fetcher.installs.admission.min_prior == 0.0
