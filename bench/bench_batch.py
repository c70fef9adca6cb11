"""Offline batch throughput: `tierkv batch` (run_batch) against transformers on the same prompts.

A Llama-3-8B-shaped model with random bf16 weights (end-of-sequence off, so every sequence generates
exactly --new-tokens tokens) and --prompts random prompts of --context tokens. Modes:
  tierkv          run_batch through tierkv.offload, one row per --variants entry (FORMAT:BUDGET, budget
                  'none' for exact attention); batches sized from the tier budgets (or --batch-size).
                  'none' gathers every chunk at every decode step: at 32K that is the whole KV over PCIe
                  a token, minutes a batch, so the default rows are sparse; use it for small runs
  hf              model.generate with a DynamicCache on the GPU, at the largest batch that fits: tried
                  from an estimate downwards (x3/4 on each out-of-memory); failed tries are timed apart
  generate_batch  transformers' continuous batching (paged cache), if it runs here
Each row: sequences/hour, output and total tokens/s, peak GPU memory, batch sizes; and how many
sequences' tokens equal the hf row's (random weights make greedy decoding fragile: a difference in
the last bit of a logit can change the rest of a sequence, so this is a check, not a target).

    python bench/bench_batch.py --json bench/results/batch_h100.json             # 64 x 32K, 512 new
    python bench/bench_batch.py --modes hf --json b.json --tokens-dir toks       # one mode a call,
    python bench/bench_batch.py --modes tierkv --json b.json --tokens-dir toks   # into one file
    python bench/bench_batch.py --quick                     # CPU smoke run (tierkv and hf), ~1 min

Each call's JSON holds the commit, device, versions and arguments. Modes can be run in separate calls
(one mode of the full size takes minutes): a call keeps the rows of the other modes already in its
--json (same workload), and with --tokens-dir each mode's tokens are saved there and every mode found
there is compared with hf's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tierkv  # noqa: E402
from tierkv import TierConfig  # noqa: E402
from tierkv.batch import BatchOptions, run_batch, wrap_model  # noqa: E402
from tierkv.profiling import git_commit, versions  # noqa: E402
from tierkv.quality import float32_linears  # noqa: E402

OOM = (torch.OutOfMemoryError, MemoryError)


def model_config(quick: bool):
    from transformers import LlamaConfig

    shape = (dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64) if quick else
             dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    # no end-of-sequence token: every sequence runs its full length in every mode
    return LlamaConfig(**shape, max_position_embeddings=1 << 18, rope_theta=500000.0, eos_token_id=None,
                       bos_token_id=None, pad_token_id=0, attn_implementation="sdpa")


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
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_prompts(n: int, context: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (context,), generator=g).tolist() for _ in range(n)]


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def row(mode, variant, seconds, prompts, new_tokens, **kw):
    n = kw.pop("sequences", len(prompts))
    out_tokens = n * new_tokens
    r = dict(mode=mode, variant=variant, sequences=n, seconds=seconds,
             sequences_per_hour=3600 * n / seconds if seconds else None,
             output_tokens_per_s=out_tokens / seconds if seconds else None,
             total_tokens_per_s=(out_tokens + sum(len(p) for p in prompts[:n])) / seconds if seconds else None,
             peak_gpu_bytes=peak(), **kw)
    sph = r["sequences_per_hour"]
    print(f"  {mode:15s} {variant or '':12s} seq/h={sph and round(sph, 1)} out tok/s="
          f"{r['output_tokens_per_s'] and round(r['output_tokens_per_s'], 1)} peak="
          f"{(r['peak_gpu_bytes'] or 0) / 2**30:.1f} GiB {kw.get('note', '')}", flush=True)
    return r


# --- tierkv -------------------------------------------------------------------------------------------
def tier_config(args, variant: str, workdir: str) -> TierConfig:
    fmt, _, budget = variant.partition(":")
    budget = None if budget.lower() in ("", "none") else int(budget)
    disk = os.path.join(args.disk_path, "bench-batch") if args.disk_path else None
    return TierConfig(gpu_budget=args.gpu_budget, cpu_budget=args.cpu_budget, disk_path=disk, format=fmt,
                      budget=budget, sink=args.sink, window=args.window, chunk_length=args.chunk_length)


def run_tierkv(lm, prompts, args, variant, workdir):
    src, dst = os.path.join(workdir, "in.jsonl"), os.path.join(workdir, f"out-{variant.replace(':', '_')}.jsonl")
    with open(src, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p, "max_new_tokens": args.new_tokens}) + "\n")
    cleanup()
    opts = BatchOptions(tier=tier_config(args, variant, workdir), overwrite=True, max_batch=args.batch_size,
                        prefill_chunk=args.prefill_chunk)
    s = run_batch(src, dst, opts, model=lm)
    with open(dst) as f:
        results = [json.loads(line) for line in f]
    tokens = {r["id"]: r.get("tokens") for r in results}
    failed = [r for r in results if r["status"] != "ok"]
    r = row("tierkv", variant, s.generate_s, prompts, args.new_tokens, sequences=s.ok,
            batch_sizes=s.batch_sizes, setup_s=s.setup_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
            bytes_moved=s.bytes_moved, failed=len(failed), notes=s.notes,
            note=f"batches {s.batch_sizes}" + (f", {len(failed)} failed: {failed[0]['error']}" if failed else ""))
    r["peak_gpu_bytes"] = s.peak_gpu_bytes
    return r, tokens


# --- transformers -------------------------------------------------------------------------------------
def hf_generate(model, batch, new_tokens, device):
    from transformers import DynamicCache

    ids = torch.tensor(batch, device=device)
    # on a CPU tierkv's runner computes bf16 linears in float32 (several times faster there): so here
    fast = float32_linears(model) if device == "cpu" else contextlib.nullcontext()
    with fast, torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             **tierkv.cache_kwargs(DynamicCache(config=model.config)))
    if device == "cuda":
        torch.cuda.synchronize()
    return out[:, ids.shape[1]:].tolist()


def hf_start_batch(model, prompts, args, device):
    """A first guess at the largest batch: the free memory over a sequence's KV and prefill activations,
    a quarter over (the search comes down from it)."""
    if args.hf_batch:
        return args.hf_batch
    if device != "cuda":
        return len(prompts)
    cfg = model.config
    seq = len(prompts[0]) + args.new_tokens
    kv = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * seq
    act = len(prompts[0]) * (6 * cfg.hidden_size + 4 * cfg.intermediate_size) * 2
    free = torch.cuda.mem_get_info()[0]
    return max(1, min(len(prompts), int(1.25 * free / (kv + act))))


def run_hf(model, prompts, args, device):
    cleanup()
    B = hf_start_batch(model, prompts, args, device)
    tokens, tried, search_s, seconds, i = {}, [], 0.0, 0.0, 0
    while i < len(prompts):
        chunk = prompts[i:i + B]
        t0 = time.perf_counter()
        try:
            out = hf_generate(model, chunk, args.new_tokens, device)
        except OOM:
            search_s += time.perf_counter() - t0
            tried.append(B)
            cleanup()
            if B == 1:
                return row("hf", None, None, prompts, args.new_tokens, sequences=0, tried=tried,
                           note="out of memory at batch 1"), tokens
            B = max(1, B * 3 // 4)
            continue
        seconds += time.perf_counter() - t0
        for j, toks in enumerate(out):
            tokens[f"p{i + j}"] = toks
        i += len(chunk)
    return row("hf", "DynamicCache", seconds, prompts, args.new_tokens, batch=B, tried_oom=tried,
               search_s=search_s, note=f"batch {B}" + (f" (out of memory at {tried})" if tried else "")), tokens


def run_generate_batch(model, prompts, args, device):
    from transformers import GenerationConfig

    cleanup()
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    except Exception as e:  # noqa: BLE001  (whatever stops it is the result)
        return row("generate_batch", None, None, prompts, args.new_tokens, sequences=0,
                   note=f"did not run: {type(e).__name__}: {e}"[:300]), {}
    seconds = time.perf_counter() - t0
    results = list(out.values())
    good = [r for r in results if r.error is None and len(r.generated_tokens) == args.new_tokens]
    tokens = {f"p{i}": list(r.generated_tokens) for i, r in enumerate(results)} if len(results) == len(prompts) else {}
    note = "" if len(good) == len(prompts) else f"{len(prompts) - len(good)} of {len(prompts)} failed or short"
    return row("generate_batch", None, seconds if good else None, prompts, args.new_tokens, sequences=len(good),
               note=note), tokens


# --- comparing and recording --------------------------------------------------------------------------
def agreement(ref, other):
    """Sequences whose tokens equal the reference's, and the mean share of each sequence's tokens that
    match before the first difference."""
    common = [k for k in ref if k in other and other[k] is not None]
    if not common:
        return None
    same = sum(ref[k] == other[k] for k in common)
    prefix = []
    for k in common:
        a, b = ref[k], other[k]
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(1, len(a)))
    return dict(sequences=len(common), identical=same, mean_matching_prefix=sum(prefix) / len(prefix))


def dump(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--context", type=int, default=32768, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--modes", nargs="+", default=["tierkv", "hf", "generate_batch"],
                   choices=["tierkv", "hf", "generate_batch"])
    p.add_argument("--variants", nargs="+", default=["int4:2048", "bf16:2048"],
                   help="tierkv rows, FORMAT:BUDGET (budget 'none': every chunk, exact; see the docstring)")
    p.add_argument("--gpu-budget", default="16GiB")
    p.add_argument("--cpu-budget", default=None, help="default: 60%% of this machine's memory")
    p.add_argument("--disk-path", default=None, help="cold tier directory (a subdirectory is made and removed)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--chunk-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None, help="cap on tierkv's batches (default: from budgets)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tierkv prompt tokens per row per pass")
    p.add_argument("--hf-batch", type=int, default=None, help="start hf's search here (default: an estimate)")
    p.add_argument("--tokens-dir", default=None, help="save each mode's tokens here; compare with hf's")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="small model, 8 x 512 tokens, 16 new: a CPU smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.context, args.new_tokens = 8, 512, 16
        args.variants = ["bf16:none", "int4:64"] if args.variants == p.get_default("variants") else args.variants
        # generate_batch takes minutes on a CPU (a paged cache sized for a GPU): only when asked for
        args.modes = ["tierkv", "hf"] if args.modes == p.get_default("modes") else args.modes
        args.gpu_budget, args.chunk_length, args.window = "4MiB", 16, 32
        args.cpu_budget = args.cpu_budget or "256MiB"
    if args.cpu_budget is None:
        args.cpu_budget = int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return args


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = model_config(args.quick)
    model = build_model(cfg, device)
    prompts = make_prompts(args.prompts, args.context, cfg.vocab_size)
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    results = dict(bench="batch", git_commit=git_commit(), command=" ".join(sys.argv),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), device=name,
                   versions={**versions(), "transformers": transformers.__version__},
                   model="Llama-3-8B-shaped, random bf16 weights" if not args.quick else "small Llama (quick)",
                   args=vars(args), rows=earlier_rows(args))
    print(f"{args.prompts} prompts x {args.context} tokens, {args.new_tokens} new tokens each, on {results['device']}")
    all_tokens = {}
    lm = wrap_model(model, digest="bench-random-weights", name="random Llama")
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as work:
        for mode in args.modes:
            runs = ([(v, lambda v=v: run_tierkv(lm, prompts, args, v, work)) for v in args.variants] if mode == "tierkv"
                    else [(None, lambda: run_hf(model, prompts, args, device))] if mode == "hf"
                    else [(None, lambda: run_generate_batch(model, prompts, args, device))])
            for variant, fn in runs:
                r, toks = fn()
                name = mode + (f"-{variant.replace(':', '_')}" if variant else "")
                all_tokens[name] = toks
                if args.tokens_dir and toks:
                    dump(toks, os.path.join(args.tokens_dir, f"{name}.json"))
                results["rows"].append(r)
                if args.json:
                    dump(results, args.json)
    compare(results, all_tokens, args)
    if args.json:
        dump(results, args.json)


def earlier_rows(args):
    """The rows of other modes that an earlier call wrote to the same --json for the same workload, so
    that one file gathers a run split over several calls."""
    if not args.json or not os.path.exists(args.json):
        return []
    with open(args.json) as f:
        old = json.load(f)
    keys = ("prompts", "context", "new_tokens", "quick")
    if any(old.get("args", {}).get(k) != getattr(args, k) for k in keys):
        print(f"{args.json} holds another workload ({', '.join(keys)} differ): starting it over")
        return []
    return [r for r in old.get("rows", []) if r["mode"] not in args.modes]


def compare(results, all_tokens, args):
    tokens = {}
    if args.tokens_dir and os.path.isdir(args.tokens_dir):  # modes run in earlier calls
        for name in sorted(os.listdir(args.tokens_dir)):
            if name.endswith(".json"):
                with open(os.path.join(args.tokens_dir, name)) as f:
                    tokens[name[:-5]] = json.load(f)
    tokens.update(all_tokens)
    ref = tokens.get("hf")
    results["same_outputs_as_hf"] = {name: agreement(ref, toks) for name, toks in tokens.items()
                                     if name != "hf" and ref}
    hf = next((r for r in results["rows"] if r["mode"] == "hf" and r["sequences_per_hour"]), None)
    results["sequences_per_hour_over_hf"] = {
        r["mode"] + (f"-{r['variant']}" if r["variant"] else ""): r["sequences_per_hour"] / hf["sequences_per_hour"]
        for r in results["rows"] if hf and r is not hf and r["sequences_per_hour"]}
    print(json.dumps({k: results[k] for k in ("same_outputs_as_hf", "sequences_per_hour_over_hf")}, indent=1))


if __name__ == "__main__":
    main()
