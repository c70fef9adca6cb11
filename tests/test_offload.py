"""tierkv.offload against transformers' DynamicCache on small randomly initialised models."""

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import tierkv
from tierkv import TierConfig
from tierkv.errors import ConfigError, TierKVError, UnsupportedModelError

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)


def build(family, seed=0, layers=None):
    """A small random model of `family` (COMMON's shape; `layers` decoder layers if given)."""
    torch.manual_seed(seed)
    common = COMMON if layers is None else {**COMMON, "num_hidden_layers": layers}
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        raise ValueError(family)
    return m.to(torch.bfloat16).eval()


EXACT = TierConfig(budget=None, format="bf16", sink=4, window=32, chunk_length=16, gpu_budget="64KiB", cpu_budget="16MiB")


def gen(model, ids, cache, **kw):
    with torch.no_grad():
        return model.generate(ids, **tierkv.cache_kwargs(cache), do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_greedy_identical_to_dynamic_cache(family):
    model = build(family)
    ids = torch.randint(1, 512, (1, 200))
    ref = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=64, output_logits=True, return_dict_in_generate=True)
    with tierkv.offload(model, EXACT) as cache:
        out = gen(model, ids, cache, max_new_tokens=64, output_logits=True, return_dict_in_generate=True)
        assert cache.get_seq_length() == 200 + 63  # the last token is generated, never fed back
        assert all(layer.n_chunks >= 10 for layer in cache.layers)  # most of the KV really was offloaded
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def left_padded_batch():
    """Three prompts of 150, 110 and 73 tokens, left-padded to 150 (pad id 0), and their attention mask."""
    ids = torch.randint(1, 512, (3, 150))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    mask[2, :77] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_left_padded_batch_identical():
    model = build("llama", seed=1)
    ids, mask = left_padded_batch()
    ref = gen(model, ids, DynamicCache(config=model.config), attention_mask=mask, max_new_tokens=40)
    with tierkv.offload(model, EXACT) as cache:
        out = gen(model, ids, cache, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(out, ref)


def test_sampled_generation_identical():
    model = build("qwen2", seed=2)
    ids = torch.randint(1, 512, (2, 120))
    torch.manual_seed(123)
    with torch.no_grad():
        ref = model.generate(ids, **tierkv.cache_kwargs(DynamicCache(config=model.config)), do_sample=True, top_k=50, max_new_tokens=30)
    with tierkv.offload(model, EXACT) as cache:
        torch.manual_seed(123)
        with torch.no_grad():
            out = model.generate(ids, **tierkv.cache_kwargs(cache), do_sample=True, top_k=50, max_new_tokens=30)
    assert torch.equal(out, ref)


def test_second_generate_continues_the_cache():
    model = build("qwen3", seed=3)
    ids = torch.randint(1, 512, (1, 100))
    more = torch.randint(1, 512, (1, 37))
    dyn = DynamicCache(config=model.config)
    r1 = gen(model, ids, dyn, max_new_tokens=20)
    r2 = gen(model, torch.cat([r1, more], dim=1), dyn, max_new_tokens=20)
    with tierkv.offload(model, EXACT) as cache:
        o1 = gen(model, ids, cache, max_new_tokens=20)
        o2 = gen(model, torch.cat([o1, more], dim=1), cache, max_new_tokens=20)
    assert torch.equal(o1, r1) and torch.equal(o2, r2)


def test_chunks_on_disk_still_exact(tmp_path):
    model = build("llama", seed=4)
    ids = torch.randint(1, 512, (1, 300))
    ref = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=24)
    cfg = EXACT.replace(cpu_budget="8KiB", gpu_budget="4KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg) as cache:
        out = gen(model, ids, cache, max_new_tokens=24)
        stats = cache.stats()
    assert torch.equal(out, ref)
    # every step reads the chunks it does not hold from disk (exact attention touches no chunk: reading
    # all of them says nothing about which matter, so none is preferred for the cpu tier)
    assert stats.resident_chunks["disk"] > 0 and stats.hits["disk"] > 0


def test_sparse_decode_attends_within_budget():
    model = build("llama", seed=5)
    ids = torch.randint(1, 512, (2, 400))
    cfg = TierConfig(budget=64, format="int4", sink=4, window=32, chunk_length=16, gpu_budget="32KiB", cpu_budget="16MiB")
    seen = []
    with tierkv.offload(model, cfg) as cache:
        cache.promote_every = 2
        cache.add_choice_listener(lambda layer, q, idx: layer.layer_idx == 0 and seen.append(tuple(idx.shape)))
        out = gen(model, ids, cache, max_new_tokens=16)
        stats = cache.stats()
        entries_seen = cache.passes.counts.entries
    assert out.shape == (2, 416)
    entries = 15 * 2 * 2 * 2 * 4  # decode steps x layers x batch x KV heads x chunks
    assert entries_seen == entries and stats.hits["gpu"] > 0 and stats.hits["cpu"] > 0
    assert seen and all(s == (2, 2, 4) for s in seen)  # 64 tokens / 16 per chunk, per KV head
    assert stats.resident_chunks["gpu"] > 0  # hot chunks were promoted into the gpu tier
    assert stats.used_bytes["gpu"] <= 32 * 1024


def test_sparse_with_budget_covering_everything_matches_dense():
    model = build("mistral", seed=6)
    ids = torch.randint(1, 512, (1, 200))
    ref = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=32)
    with tierkv.offload(model, EXACT.replace(budget=100000)) as cache:
        out = gen(model, ids, cache, max_new_tokens=32)
    assert torch.equal(out, ref)


def test_sparse_left_padded_batch_masks_the_padding():
    """Sparse decode lays keys out as [sink | tail | chosen chunks]; the padding mask must follow that
    order. With a budget covering every chunk, left-padded sparse decode equals DynamicCache's; a mask
    built in the wrong order lets rows attend to padding (or hides real keys) and changes the tokens."""
    model = build("llama", seed=1)
    ids, mask = left_padded_batch()
    ref = gen(model, ids, DynamicCache(config=model.config), attention_mask=mask, max_new_tokens=24)
    with tierkv.offload(model, EXACT.replace(budget=100000)) as cache:
        out = gen(model, ids, cache, attention_mask=mask, max_new_tokens=24)
        assert cache.passes.counts.entries > 0  # the sparse path ran (chunks were gathered by selection)
    assert torch.equal(out, ref)


def test_restores_attention_implementation_even_on_error():
    model = build("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with tierkv.offload(model, EXACT):
            assert model.config._attn_implementation.startswith("tierkv")
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    from transformers.modeling_utils import AttentionInterface

    assert not any(k.startswith("tierkv") for k in AttentionInterface())
    # and the model still generates normally afterwards
    gen(model, torch.randint(1, 512, (1, 10)), DynamicCache(config=model.config), max_new_tokens=2)


def test_foreign_cache_inside_context_is_untouched():
    model = build("llama", seed=7)
    ids = torch.randint(1, 512, (1, 80))
    ref = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=10)
    with tierkv.offload(model, EXACT):
        out = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=10)
    assert torch.equal(out, ref)


def test_unsupported_models_and_bad_config():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        with tierkv.offload(gpt2, EXACT):
            pass
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=64))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        with tierkv.offload(mistral, EXACT):
            pass
    with pytest.raises(ConfigError, match="TierConfig"):
        with tierkv.offload(build("llama"), {"budget": 3}):
            pass


def test_beam_search_refused_clearly():
    model = build("llama")
    with tierkv.offload(model, EXACT) as cache:
        with pytest.raises(TierKVError, match="beam|batch"):
            gen(model, torch.randint(1, 512, (1, 50)), cache, max_new_tokens=4, num_beams=2)


def test_planner_gives_layers_different_lengths():
    """A layer with sharply peaked attention gets short chunks, a layer with flat attention long ones."""
    model = build("llama", seed=8).float()
    with torch.no_grad():
        attn0 = model.model.layers[0].self_attn
        attn0.q_proj.weight.mul_(60.0)  # logits scaled way up: each query locks onto few keys
        attn0.k_proj.weight.mul_(10.0)
        model.model.layers[1].self_attn.q_proj.weight.zero_()  # all logits 0: perfectly flat
    cfg = TierConfig(budget=None, format="bf16", sink=4, window=32, chunk_lengths=(16, 32, 64, 128))
    ids = torch.randint(1, 512, (1, 600))
    with tierkv.offload(model, cfg) as cache:
        with torch.no_grad():
            model(ids, **tierkv.cache_kwargs(cache))
        lengths = [layer.chunk_len for layer in cache.layers]
        rates = [layer.rate for layer in cache.layers]
    assert rates[0] > rates[1]
    assert lengths[0] < lengths[1] == 128, (lengths, rates)


def test_layer_scores_equal_reference_bounds():
    """The decode path's scores (stored abstracts, one matmul) equal the bound computed from the chunks'
    own keys: relu(q) . max + min(q, 0) . min, max over the KV head's query heads."""
    from tierkv.abstracts import as_rows, chunk_abstract

    model = build("qwen2", seed=9)
    ids = torch.randint(1, 512, (2, 300))
    with tierkv.offload(model, EXACT.replace(scoring="bound")) as cache, torch.no_grad():
        model(ids, **tierkv.cache_kwargs(cache))
        layer = cache.layers[1]
        assert layer.table.codes is None and cache.device_bytes()["key_codes"] == 0
        k, _ = layer.gather_all()  # [B, H, C*L, D], exact in bf16
        B, H, _, D = k.shape
        C, L = layer.n_chunks, layer.chunk_len
        ref_ab = chunk_abstract(k.reshape(B, H, C, L, D).permute(0, 2, 1, 3, 4))  # [B, C, H, 2, D]
        assert torch.equal(layer.table.abstracts[..., :C], as_rows(ref_ab))
        q = torch.randn(B, 4, 1, D, dtype=torch.bfloat16)
        got = layer.score(q)
    lo, hi = ref_ab[:, :, :, 0].float(), ref_ab[:, :, :, 1].float()  # [B, C, H, D]
    qg = q.float().reshape(B, H, -1, D)
    want = (torch.einsum("bhgd,bchd->bhgc", qg.clamp(min=0), hi) + torch.einsum("bhgd,bchd->bhgc", qg.clamp(max=0), lo)).amax(2)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_layer_mass_scores_equal_reference():
    """scoring='mass': the decode path's scores equal the reference mass arithmetic (abstracts.chunk_log_mass,
    mass_shares) over the chunks' keys (codes made from the exact keys), with the sink and tail as the exact
    hot set; codes are counted on the GPU."""
    from tierkv.abstracts import chunk_log_mass, key_codes, mass_shares

    model = build("llama", seed=10)
    ids = torch.randint(1, 512, (2, 300))
    with tierkv.offload(model, EXACT) as cache, torch.no_grad():
        model(ids, **tierkv.cache_kwargs(cache))
        layer = cache.layers[0]
        k, _ = layer.gather_all()
        B, H, _, D = k.shape
        C, L = layer.n_chunks, layer.chunk_len
        kc = k.reshape(B, H, C, L, D)
        lo, hi = kc.amin(-2), kc.amax(-2)
        codes = key_codes(kc, lo, hi)
        assert torch.equal(layer.table.codes[:, :, :C], codes)
        assert cache.device_bytes()["key_codes"] == len(cache.layers) * B * H * C * L * D // 4
        q = torch.randn(B, 4, 1, D, dtype=torch.bfloat16)
        layer.scaling = 0.25
        got = layer.score(q)
        hot = torch.cat([layer.sink_k, layer.tail_k], dim=-2)
        qg = q.float().reshape(B, H, -1, D)
        want = mass_shares(chunk_log_mass(qg, lo, hi, codes, 0.25), qg * 0.25, hot)
    assert got.shape == (B, H, C)
    torch.testing.assert_close(got, want)


def test_deferred_selection_counts_equal_stepwise():
    """note_selection defers its counting (flushed when the counts are read or the arrays grow); the result
    must be what stepping gives: importance = importance * d + count at every step, chosen += count."""
    model = build("llama", seed=6)
    ids = torch.randint(1, 512, (2, 300))
    cfg = TierConfig(budget=48, format="bf16", sink=4, window=32, chunk_length=16, gpu_budget="32KiB",
                     cpu_budget="16MiB", importance_decay=0.8)
    seen = []
    with tierkv.offload(model, cfg) as cache:
        cache.promote_every = 10**6  # no promotion (which zeroes chosen) during the run
        layer = cache.layers[1]
        cache.add_choice_listener(lambda l, q, idx: l is layer and seen.append(idx.clone()))
        gen(model, ids, cache, max_new_tokens=20)
        table = layer.table
        assert table.pending_selections  # some steps still deferred (a chunk was cut in between, which flushed the rest)
        table.flush_selection()
        assert not table.pending_selections
        C, B = layer.n_chunks, layer.batch_size
        imp, chosen = torch.zeros(B, C), torch.zeros(B, C)  # no choice is counted at prefill
        for idx in seen:
            count = torch.zeros(B, C).scatter_add_(1, idx.reshape(B, -1), torch.ones(B, idx[0].numel()))
            imp = imp * 0.8 + count
            chosen += count
        assert len(seen) == 19 and chosen.sum() == 19 * B * 2 * 3  # decode steps x B x KV heads x chunks
        torch.testing.assert_close(table.importance[:, :C], imp, rtol=1e-5, atol=1e-5)
        assert torch.equal(table.chosen[:, :C], chosen)


def test_gather_table_static_parts_built_once():
    """The gather table's constant columns are cached per (chunks per head, first row): sparse decode must
    keep that key fixed from step to step (the chunks sit at the front of the work buffer), or every layer
    rebuilds them at every step, a dozen extra launches on a host-bound decode."""
    model = build("llama", seed=7)
    ids = torch.randint(1, 512, (1, 300))
    cfg = TierConfig(budget=48, format="bf16", sink=4, window=32, chunk_length=16, gpu_budget="32KiB", cpu_budget="16MiB")
    with tierkv.offload(model, cfg) as cache:
        layer = cache.layers[0]
        steps = []
        cache.add_choice_listener(lambda l, q, idx: l is layer and steps.append(layer.gatherer.builds))
        gen(model, ids, cache, max_new_tokens=12)
    assert steps == [1] * 11  # built at the first sparse step only
