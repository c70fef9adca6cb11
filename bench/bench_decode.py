"""Decode throughput of tierkv against Hugging Face's caches, side by side in one run (GPU).

A Llama-3-8B-shaped model with random bf16 weights; for each context length and batch size:
  dynamic      DynamicCache on the GPU (skipped, and said so, where its KV does not fit)
  offloaded    DynamicCache(offloading=True): every layer's KV copied to the GPU each step
  tierkv-dense tierkv with budget=None (exact; every chunk gathered every step)
  tierkv-sparse tierkv with budget = min(context / 16, 2048) tokens, hot set = sink + window, chunks
               ranked by scoring 'mass' (2-bit key codes on the GPU; --scoring bound to change)
  tierkv-sparse-bound  the same cache decoding with scoring 'bound' (abstracts' min/max only)
Reported: prefill seconds, decode tokens/s after warm-up (all sequences of the batch), peak GPU memory,
and the ratios the targets are stated in. The two tierkv rows share one prefill (same chunks, same
format): the budget only changes how decode reads them.

    python bench/bench_decode.py --json bench/results/decode_h100.json
    python bench/bench_decode.py --quick          # small model and contexts, for a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tierkv  # noqa: E402
from tierkv import TierConfig  # noqa: E402


def llama8b_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 18,
                           rope_theta=500000.0)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 18,
                       rope_theta=500000.0)


def build_model(cfg, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.set_attn_implementation("sdpa")
    return model.eval()


def kv_bytes(cfg, ctx, batch):
    return cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2 * ctx * batch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids, cache, piece):
    """Feed the prompt in pieces (chunked prefill): the activations of a whole 128K prompt do not fit."""
    t0 = time.perf_counter()
    out = None
    for s in range(0, ids.shape[1], piece):
        out = model(ids[:, s : s + piece], **tierkv.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - t0, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def decode(model, cache, tok, warmup, steps):
    for _ in range(warmup):
        tok = model(tok, **tierkv.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, **tierkv.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    sync()
    return steps * tok.shape[0] / (time.perf_counter() - t0)


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=acts)


def _write_tables(prof, args, name):
    """The profile as text tables: by self CPU time, by total CPU time, and (with CUDA) by self CUDA time."""
    os.makedirs(args.profile_dir, exist_ok=True)
    sorts = ["self_cpu_time_total", "cpu_time_total"] + (["self_cuda_time_total"] if torch.cuda.is_available() else [])
    with open(os.path.join(args.profile_dir, name + ".txt"), "w") as f:
        f.write("\n\n".join(prof.key_averages().table(sort_by=key, row_limit=40) for key in sorts))


def _profile_steps(model, cache, tok, args, name):
    """Where a sparse decode step spends host and device time (torch.profiler), as text tables."""
    with torch.no_grad(), _profiler() as prof:
        for _ in range(4):
            tok = model(tok, **tierkv.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
    _write_tables(prof, args, name)
    # and where the host's time goes by Python function (the decode is host-bound): cProfile, cumulative
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    with torch.no_grad():
        pr.enable()
        for _ in range(4):
            tok = model(tok, **tierkv.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("cumulative").print_stats(70)
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(40)
    with open(os.path.join(args.profile_dir, name + "_python.txt"), "w") as f:
        f.write(text.getvalue())


def _profile_prefill(model, ids, tcfg, piece, args, name):
    """Where a tierkv prefill spends host and device time (torch.profiler), as text tables."""
    cleanup()
    with tierkv.offload(model, tcfg) as cache, _profiler() as prof:
        prefill(model, ids, cache, piece)
    _write_tables(prof, args, name)
    cleanup()


def _warm_up(model, cfg, device):
    """One small prefill and a few steps first, so library initialisation is in no measured row."""
    from transformers import DynamicCache

    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device=device)
    _, tok = prefill(model, ids, DynamicCache(config=cfg), 1024)
    cache = DynamicCache(config=cfg)
    prefill(model, ids, cache, 2048)
    decode(model, cache, tok, 2, 2)
    with tierkv.offload(model, TierConfig(cpu_budget="1GiB", chunk_length=64)) as c:
        _, tok = prefill(model, ids, c, 1024)
        decode(model, c, tok, 2, 2)
    cleanup()


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case(model, cfg, ctx, batch, args, device):
    rows = []
    torch.manual_seed(ctx + batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, ctx), device=device)
    # a prompt piece attends over everything before it through a [B, 1, piece, context] mask, which
    # sdpa expands to 2 bytes an entry: big batches of long contexts need smaller pieces
    piece = args.piece if ctx * batch <= 131072 else args.piece_large
    weights = torch.cuda.memory_allocated() if device == "cuda" else 0

    def record(mode, pre, tps, note=""):
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        rows.append(dict(mode=mode, context=ctx, batch=batch, prefill_s=pre, tokens_per_s=tps,
                         peak_gpu_bytes=peak, peak_gpu_minus_weights=peak - weights, note=note))
        print(f"  {mode:14s} ctx={ctx:>6} b={batch} prefill={pre if pre is None else round(pre, 2)} s "
              f"tok/s={tps if tps is None else round(tps, 2)} peak={peak / 2**30:.1f} GiB {note}", flush=True)

    _hf_rows(model, cfg, ids, piece, args, device, record)
    if "tierkv" in args.modes:
        _tierkv_rows(model, cfg, ids, piece, args, device, record, rows)
    cleanup()
    return rows


def _hf_rows(model, cfg, ids, piece, args, device, record):
    """transformers' own caches: DynamicCache on the device where its KV fits beside the weights (with
    room for activations), and DynamicCache(offloading=True) where it is not too slow."""
    from transformers import DynamicCache

    batch, ctx = ids.shape
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
    need = kv_bytes(cfg, ctx + args.warmup + args.steps, batch)
    cleanup()
    if "dynamic" not in args.modes:
        pass
    elif device != "cuda" or need < free - args.headroom * 2**30:
        cache = DynamicCache(config=cfg)
        pre, tok = prefill(model, ids, cache, piece)
        record("dynamic", pre, decode(model, cache, tok, args.warmup, args.steps))
        del cache
    else:
        record("dynamic", None, None, f"does not fit: KV {need / 2**30:.1f} GiB, free {free / 2**30:.1f} GiB")
    cleanup()
    if "offloaded" not in args.modes:
        pass
    elif device == "cuda" and not args.skip_offloaded and (ctx * batch <= args.offloaded_max_tokens):
        cache = DynamicCache(config=cfg, offloading=True)
        pre, tok = prefill(model, ids, cache, piece)
        record("offloaded", pre, decode(model, cache, tok, 1, max(2, args.steps // 4)))
        del cache
    else:
        record("offloaded", None, None, "skipped: too slow at this size")
    cleanup()


def _tierkv_rows(model, cfg, ids, piece, args, device, record, rows):
    """tierkv dense, then sparse on the same cache (and with the bound scoring, on request)."""
    batch, ctx = ids.shape
    budget_tokens = min(ctx // 16, 2048)
    kv = kv_bytes(cfg, ctx, batch)
    # the gpu chunk cache: 1% of the KV (with random weights the choice churns and it serves next to
    # nothing; the key codes of mass scoring take 6.25% and abstracts + hot set ~2.5% of the 10%)
    tcfg = TierConfig(gpu_budget=int(args.gpu_share * kv), cpu_budget=int(kv * 1.1) + (256 << 20),
                      budget=None, format=args.format, sink=args.sink, window=args.window,
                      chunk_length=args.chunk_length, scoring=args.scoring)
    reset_peak = torch.cuda.reset_peak_memory_stats if device == "cuda" else (lambda: None)
    with tierkv.offload(model, tcfg) as cache:
        pre, tok = prefill(model, ids, cache, piece)
        reset_peak()
        record("tierkv-dense", pre, decode(model, cache, tok, 1, max(2, args.steps // 4)))
        cache.config = tcfg.replace(budget=budget_tokens)
        reset_peak()
        tps = decode(model, cache, tok, args.warmup, args.steps)
        if args.profile_dir and "decode" in args.profile:
            _profile_steps(model, cache, tok, args, f"sparse_ctx{ctx}_b{batch}")
        stats = cache.stats()
        held = cache.device_bytes()
        record("tierkv-sparse", pre, tps, f"budget {budget_tokens} tok, hot set sink {args.sink} + window {args.window}; "
               f"gpu hit rate {stats.hit_rate('gpu'):.2f}")
        rows[-1].update(store_stats=dict(stats.__dict__), device_kv_bytes=held, kv_bytes=kv,
                        device_kv_share=sum(held.values()) / kv)
        if "bound" in args.scorings and tcfg.scoring == "mass":
            # the same chunks ranked by the abstracts' bound alone (a cache made with scoring='bound'
            # would hold no key codes on the GPU: they are left out of its share)
            cache.config = tcfg.replace(budget=budget_tokens, scoring="bound")
            reset_peak()
            tps = decode(model, cache, tok, args.warmup, args.steps)
            record("tierkv-sparse-bound", pre, tps, f"budget {budget_tokens} tok, scoring 'bound'")
            if args.profile_dir and "decode" in args.profile:
                _profile_steps(model, cache, tok, args, f"sparse_bound_ctx{ctx}_b{batch}")
            bound_held = {k: v for k, v in held.items() if k != "key_codes"}
            rows[-1].update(device_kv_bytes=bound_held, device_kv_share=sum(bound_held.values()) / kv)
    if args.profile_dir and "prefill" in args.profile and device == "cuda" and ctx * batch <= 32768:
        _profile_prefill(model, ids, tcfg, piece, args, f"prefill_ctx{ctx}_b{batch}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--gpu-share", type=float, default=0.01, help="gpu tier budget as a share of the KV bytes")
    p.add_argument("--cases", nargs="*", default=None, help="CONTEXTxBATCH pairs, instead of contexts x batches")
    p.add_argument("--piece", type=int, default=32768, help="prefill piece length (tokens)")
    p.add_argument("--piece-large", type=int, default=8192, help="prefill piece when context x batch > 128K")
    p.add_argument("--format", default="bf16")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--chunk-length", type=int, default=64)
    p.add_argument("--headroom", type=float, default=12.0, help="GiB kept free for activations")
    p.add_argument("--offloaded-max-tokens", type=int, default=1 << 17)
    p.add_argument("--skip-offloaded", action="store_true")
    p.add_argument("--modes", nargs="+", default=["dynamic", "offloaded", "tierkv"],
                   help="which of dynamic, offloaded, tierkv (dense + sparse) to run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile-dir", default=None, help="write torch.profiler tables of sparse decode steps here")
    p.add_argument("--profile", nargs="*", default=["decode"], choices=["decode", "prefill"],
                   help="what --profile-dir profiles: decode steps, an extra tierkv prefill per case")
    p.add_argument("--scoring", default="mass", choices=["mass", "bound"], help="TierConfig.scoring of the tierkv rows")
    p.add_argument("--scorings", nargs="*", default=["bound"], choices=["bound"],
                   help="also decode the same cache with these scorings (rows tierkv-sparse-<scoring>)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.contexts, args.batches, args.steps, args.piece = [1024, 4096], [1, 2], 8, 2048
    cfg = llama8b_config(args.quick)
    model = build_model(cfg, device)
    _warm_up(model, cfg, device)
    from tierkv import ops

    results = dict(
        bench="decode", device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        torch=torch.__version__, transformers=__import__("transformers").__version__, tierkv=tierkv.__version__,
        backend=ops.backend(), git_commit=_git(), command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S"),
        model="Llama-3-8B-shaped, random bf16 weights" if not args.quick else "small Llama (quick)",
        args=vars(args), rows=[],
    )
    cases = [(c, b) for c in args.contexts for b in args.batches]
    if args.cases:
        try:
            cases = [tuple(int(x) for x in c.lower().split("x")) for c in args.cases]
        except ValueError:
            p.error(f"--cases: expected CONTEXTxBATCH like 32768x4, got {args.cases}")
    for ctx, b in cases:
        print(f"context {ctx} batch {b}", flush=True)
        results["rows"].extend(run_case(model, cfg, ctx, b, args, device))
        if args.json:
            _dump(results, args.json)
    results["ratios"] = ratios(results["rows"])
    print(json.dumps(results["ratios"], indent=1))
    if args.json:
        _dump(results, args.json)


def ratios(rows):
    out = []
    by = {(r["mode"], r["context"], r["batch"]): r for r in rows}
    for (mode, ctx, b), r in by.items():
        if mode != "tierkv-sparse":
            continue
        d, o, dense = by.get(("dynamic", ctx, b)), by.get(("offloaded", ctx, b)), by.get(("tierkv-dense", ctx, b))

        def ratio(x, y, key):
            return (x[key] / y[key]) if x and y and x.get(key) and y.get(key) else None

        bound = by.get(("tierkv-sparse-bound", ctx, b))
        out.append(dict(context=ctx, batch=b,
                        sparse_over_dynamic_tps=ratio(r, d, "tokens_per_s"),
                        sparse_bound_over_dynamic_tps=ratio(bound, d, "tokens_per_s"),
                        sparse_bound_device_kv_share=bound.get("device_kv_share") if bound else None,
                        sparse_over_offloaded_tps=ratio(r, o, "tokens_per_s"),
                        tierkv_prefill_over_dynamic=ratio(dense, d, "prefill_s"),
                        sparse_device_kv_share=r.get("device_kv_share")))
    return out


def _git():
    """The commit the benchmark ran at, with "-dirty" when tracked files differ from it."""
    here = os.path.dirname(__file__)
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, text=True)
    except Exception:
        return None
    return head + ("-dirty" if dirty.strip() else "")


def _dump(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
