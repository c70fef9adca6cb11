"""tierkv.offload on the GPU: exactness with the kernels in the loop, and the device-memory bound."""

import pytest
import torch
from transformers import DynamicCache

import tierkv
from tierkv import TierConfig, ops

from test_offload import build, gen

pytestmark = pytest.mark.gpu

EXACT = TierConfig(budget=None, format="bf16", sink=4, window=64, chunk_length=32, gpu_budget="1MiB", cpu_budget="256MiB")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_greedy_identical_on_gpu(family):
    model = build(family).cuda()
    ids = torch.randint(1, 512, (2, 700), device="cuda")
    ref = gen(model, ids, DynamicCache(config=model.config), max_new_tokens=64)
    with tierkv.offload(model, EXACT) as cache:
        out = gen(model, ids, cache, max_new_tokens=64)
        assert all(layer.n_chunks >= 15 for layer in cache.layers)
    assert torch.equal(out, ref), ops.backend()


def test_sparse_runs_and_promotes_on_gpu(tmp_path):
    model = build("llama", seed=3).cuda()
    ids = torch.randint(1, 512, (2, 2000), device="cuda")
    cfg = TierConfig(budget=256, format="int4", sink=4, window=64, chunk_length=32, gpu_budget="256KiB",
                     cpu_budget="64KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg) as cache:
        out = gen(model, ids, cache, max_new_tokens=32)
        stats = cache.stats()  # the cache's view: gather entries served per tier counted as hits
    assert out.shape == (2, 2032)
    assert stats.resident_chunks["disk"] > 0 and stats.hits.get("disk", 0) > 0
    assert stats.used_bytes["gpu"] <= 256 * 1024


def test_device_kv_within_gpu_budget_plus_hot_set():
    """Peak device memory while decoding grows with the gpu budget and hot set, not with the context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 16)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    gpu_budget = 2 << 20
    tcfg = TierConfig(budget=512, format="bf16", sink=4, window=128, chunk_length=64, gpu_budget=gpu_budget, cpu_budget="1GiB")
    kv_per_token = 4 * 2 * 64 * 2 * 2  # layers * kv heads * dim * (k, v) * bytes

    def decode_peak(ctx):
        ids = torch.randint(0, 1024, (1, ctx), device="cuda")
        torch.cuda.synchronize()
        m0 = torch.cuda.memory_allocated()  # the weights
        with tierkv.offload(model, tcfg) as cache, torch.no_grad():
            tok = model(ids, **tierkv.cache_kwargs(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
            del ids
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(8):
                tok = model(tok, **tierkv.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated() - m0
            return resident, torch.cuda.max_memory_allocated() - m0, cache.device_bytes()

    short_res, short_peak, _ = decode_peak(2048)
    long_res, long_peak, held = decode_peak(16384)
    kv = 16384 * kv_per_token
    # what stays on the device between steps: the gpu tier, the hot set and the abstracts, not the KV
    assert held["gpu_tier"] <= gpu_budget
    assert long_res <= gpu_budget + held["hot_set"] + held["abstracts"] + held["key_codes"] + (1 << 20), (long_res, held)
    assert long_res < 0.25 * kv, (long_res, kv)
    # and a decode step's transient does not grow with the context (beyond scoring the abstracts)
    assert long_peak - long_res <= short_peak - short_res + 8 * held["abstracts"] + (1 << 20), (long_peak, short_peak)


def test_pinned_ring_tables_survive_wrapping_around():
    """Small host tables go to the device through one pinned ring (hf.passes.PinnedRing): each arrives
    as it was written, also when the ring wraps around while earlier copies may still be queued behind
    a long kernel (the host waits for the stream before it overwrites the ring)."""
    from tierkv.hf.passes import PinnedRing

    ring = PinnedRing(torch.device("cuda"), elements=64)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4096, 4096, device="cuda")
    sent, got = [], []
    for i in range(200):
        if i % 50 == 0:
            big = big @ big  # keeps the stream busy while tables are queued behind it
        rows = torch.randint(-(2**40), 2**40, (int(torch.randint(1, 9, (1,), generator=g)), 4), generator=g).tolist()
        sent.append(rows)
        got.append(ring.to_device(rows))
    torch.cuda.synchronize()
    for rows, t in zip(sent, got):
        assert t.device.type == "cuda" and t.tolist() == rows
    too_big = [[i, i] for i in range(100)]  # larger than the ring: copied on its own
    assert ring.to_device(too_big).tolist() == too_big
