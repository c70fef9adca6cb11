"""What sparse selection and quantized chunks cost in answers: accuracy and attention-mass recall.

For each context length and task (passkey, kv) of the shipped retrieval model, on the same prompts:
  full     transformers' DynamicCache (full attention, the baseline every cell is compared with)
  cells    tierkv.offload with format in {bf16, int8, int4, int2} x budget in {dense (None), ctx/4, ctx/8,
           ctx/16, ctx/32} tokens per query per layer beyond the hot set (sink + window)
Per cell: exact-match accuracy, agreement with the full-attention answers, and attention-mass recall
(tierkv.quality: the share of full softmax attention mass, over the exact keys, of each decode query of
each layer and query head, that sink + the chunks tierkv chose + the tail cover; also the chosen
chunks' share of the mass outside the hot set, the best share any selection under the same budget could
reach (oracle), and how often the chunks holding the answer's needle were chosen).

How it runs on a CPU in minutes (all exact, see tierkv/quality.py):
- each prompt batch is prefilled once (bf16 model, DynamicCache) and its K/V replayed into every cell's
  cache the way tierkv's attention function ingests a prefill; prefill through tierkv is exact and
  does not depend on format or budget, so only the decode steps differ between cells;
- the model's bf16 linear layers run as float32 matmuls rounded back to bf16 (quality.float32_linears):
  bf16 matmuls are ~7x slower on CPUs without bf16 units, and the results differ only by summation order;
- chunk_length is fixed (--chunk-length): the planner needs the prefill's queries, so only the sweep's
  "planner" variant (chunk_length None, lengths 16..256) prefills through tierkv for real.
The selection tierkv made is read off its real decode path (quality.SelectionProbe listens to one
cache's choices); nothing of the runtime is re-implemented here.

    python bench/eval_quality.py                       # the committed run: ~15-20 min on 2 CPU cores
    python bench/eval_quality.py --contexts 4096 --tasks kv --prompts 100 --formats int4 --fractions 16 \
        --sweep --json bench/results/quality_cpu_sweep.json --plot ''   # variants of the target cell
    python bench/eval_quality.py --quick               # seconds: one small context, few prompts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tierkv  # noqa: E402
from tierkv import TierConfig  # noqa: E402
from tierkv.formats import raw_bytes_per_token  # noqa: E402
from tierkv.models import load_retrieval_model  # noqa: E402
from tierkv.models.tasks import make_prompts  # noqa: E402
from tierkv.quality import (RecallStats, SelectionProbe, continue_greedy, exact_match,  # noqa: E402
                            float32_linears, prefill, replay_prefill)

FORMATS = ("bf16", "int8", "int4", "int2")
FRACTIONS = (4, 8, 16, 32)
SWEEPS = ("chunk", "planner", "window", "scoring")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cell_config(args, fmt, budget, batch, ctx, chunk_length=0, window=None) -> TierConfig:
    # the cpu tier holds every chunk of the batch, with room to spare (no disk tier: where chunks live
    # changes speed, not answers; the demo and tests/test_offload.py cover the disk path)
    need = 2 * batch * (ctx + 64) * args.kv_token_bytes
    return TierConfig(budget=budget, format=fmt, sink=args.sink, window=args.window if window is None else window,
                      chunk_length=args.chunk_length if chunk_length == 0 else chunk_length,
                      group_size=args.group_size, gpu_budget="1MiB", cpu_budget=need + (16 << 20),
                      selection=args.selection)


def run_cell(model, cfg, kv, first, n_new, needles, scaling, ids, probe_kw):
    with tierkv.offload(model, cfg) as cache:
        with SelectionProbe(cache, scaling, needles, **probe_kw) as probe:
            if cfg.chunk_length is None:  # the planner needs the prefill's queries: a real prefill
                with torch.inference_mode():
                    out = model(input_ids=ids, **tierkv.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                first = out.logits[:, -1].argmax(-1, keepdim=True)
            else:
                replay_prefill(cache, kv)
            pred = continue_greedy(model, cache, first, n_new)
            plan = [layer.chunk_len for layer in cache.layers]
    return pred, probe.stats, plan


class Cell:
    def __init__(self, n_layers):
        self.correct = self.agree = self.total = 0
        self.recall = RecallStats(n_layers)
        self.seconds = 0.0
        self.plans = []  # chunk length per layer, per batch


def evaluate_context(model, args, ctx, task, variants, log):
    """Baseline and every variant on `args.prompts` prompts of one (context, task); returns dicts."""
    prompts = make_prompts(task, ctx, args.prompts, seed=args.seed)
    n_layers = model.config.num_hidden_layers
    scaling = model.model.layers[0].self_attn.scaling
    base = Cell(n_layers)
    cells = {key: Cell(n_layers) for key in variants}
    prefill_s = 0.0
    for b0 in range(0, len(prompts), args.batch):
        batch = prompts[b0 : b0 + args.batch]
        ids = torch.tensor([p.input_ids for p in batch])
        answers = [p.answer_ids for p in batch]
        needles = [p.needle for p in batch]
        n_new = max(len(a) for a in answers)
        t0 = time.perf_counter()
        kv, first = prefill(model, ids)
        prefill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        dyn = DynamicCache(config=model.config)
        replay_prefill(dyn, kv)
        ref = continue_greedy(model, dyn, first, n_new)
        del dyn
        ref_hits = exact_match(ref, answers)
        base.correct += sum(ref_hits)
        base.total += len(batch)
        base.agree += len(batch)
        base.seconds += time.perf_counter() - t0
        for key, cfg in variants.items():
            t0 = time.perf_counter()
            probe_kw = {"lowbit": args.lowbit, "rescore": key[2:4] == ("scoring", "int2-mass")}
            pred, stats, plan = run_cell(model, cfg(len(batch)), kv, first, n_new, needles, scaling, ids, probe_kw)
            cells[key].plans.append(plan)
            c = cells[key]
            c.correct += sum(exact_match(pred, answers))
            c.agree += sum(torch.equal(a, b) for a, b in zip(pred, ref))
            c.total += len(batch)
            c.recall.add(stats)
            c.seconds += time.perf_counter() - t0
        del kv
        log(f"  {task} ctx {ctx}: {b0 + len(batch)}/{len(prompts)} prompts, full attention {base.correct}/{base.total}")
    return base, cells, prefill_s


def budget_label(frac):
    return "dense" if frac is None else f"1/{frac}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--tasks", nargs="+", default=["passkey", "kv"], choices=["passkey", "kv"])
    ap.add_argument("--prompts", type=int, default=50, help="prompts per (context, task); every cell sees the same ones")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--fractions", type=int, nargs="+", default=list(FRACTIONS),
                    help="budgets as ctx/F tokens beyond the hot set (dense is always run too)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--chunk-length", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--selection", default="head", choices=["head", "shared"], help="TierConfig.selection of every cell")
    ap.add_argument("--seed", type=int, default=1234, help="prompt seed (held out: training used other RNG streams)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 threads made small decode "
                         "matmuls ~100x slower under load, and even prefill was no faster)")
    ap.add_argument("--sweep", nargs="*", choices=SWEEPS, default=None,
                    help="variants of the target cell (int4, ctx/16) at --sweep-context: chunk (lengths 8/16/32/64 "
                         "but --chunk-length), planner (chunk_length None: lengths 16..256 chosen per layer), "
                         "window (16, 256), scoring (selection by int2-key mass, chunk lengths 8 and 16); "
                         "--sweep alone: all")
    ap.add_argument("--no-lowbit", dest="lowbit", action="store_false",
                    help="skip the recall of ranking chunks by attention mass from int2 keys (RecallStats.lowbit), "
                         "which --sweep scoring runs for real")
    ap.add_argument("--sweep-context", type=int, nargs="+", default=None, help="contexts of the sweep (default: the largest)")
    ap.add_argument("--quick", action="store_true", help="512 tokens, 8 prompts, int4 and bf16 only")
    ap.add_argument("--json", default=str(ROOT / "bench/results/quality_cpu.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench/results/quality_cpu.png"))
    args = ap.parse_args(argv)
    sweeps = set(SWEEPS if args.sweep == [] else args.sweep or ())
    if "scoring" in sweeps and not args.lowbit:
        ap.error("--sweep scoring needs the int2-key ranking: drop --no-lowbit")
    if args.quick:
        args.contexts, args.prompts, args.batch, args.formats, args.fractions = [512], 8, 8, ["bf16", "int4"], [16]
    for name in ("prompts", "batch", "chunk_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: expected >= 1")
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    commit = git_commit()  # the code evaluated is the code at the start (a run takes tens of minutes)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    model, _ = load_retrieval_model(device="cpu", dtype=torch.bfloat16)
    mc = model.config
    args.kv_token_bytes = raw_bytes_per_token(mc.num_key_value_heads, mc.head_dim) * mc.num_hidden_layers
    results, baselines, sweep = [], [], []
    with float32_linears(model):
        for ctx in args.contexts:
            for task in args.tasks:
                variants = {}
                for fmt in args.formats:
                    for frac in [None] + list(args.fractions):
                        budget = None if frac is None else ctx // frac
                        variants[(fmt, frac)] = (lambda n, fmt=fmt, budget=budget, ctx=ctx: cell_config(args, fmt, budget, n, ctx))
                if sweeps and ctx in (args.sweep_context or [max(args.contexts)]):
                    target = lambda n, ctx=ctx, **kw: cell_config(args, "int4", ctx // 16, n, ctx, **kw)  # noqa: E731
                    if "chunk" in sweeps:
                        for cl in (8, 16, 32, 64):
                            if cl != args.chunk_length:
                                variants[("int4", 16, "chunk_length", cl)] = lambda n, cl=cl, t=target: t(n, chunk_length=cl)
                    if "planner" in sweeps:  # chunk_length None: the planner's choice, after a real prefill
                        variants[("int4", 16, "planner", "16-256")] = lambda n, t=target: t(n, chunk_length=None)
                    if "scoring" in sweeps:  # selection by int2-key mass (SelectionProbe rescore: an experiment)
                        for cl in (8, 16):
                            variants[("int4", 16, "scoring", "int2-mass", cl)] = lambda n, cl=cl, t=target: t(n, chunk_length=cl)
                    if "window" in sweeps:
                        for w in (16, 256):
                            if w != args.window:
                                variants[("int4", 16, "window", w)] = lambda n, w=w, t=target: t(n, window=w)
                log(f"context {ctx}, task {task}: {args.prompts} prompts x {len(variants)} tierkv cells")
                base, cells, prefill_s = evaluate_context(model, args, ctx, task, variants, log)
                baselines.append({"context": ctx, "task": task, "prompts": base.total, "correct": base.correct,
                                  "accuracy": base.correct / base.total, "prefill_s": round(prefill_s, 2),
                                  "decode_s": round(base.seconds, 2)})
                for key, c in cells.items():
                    fmt, frac = key[0], key[1]
                    row = {"context": ctx, "task": task, "format": fmt, "budget": budget_label(frac),
                           "budget_tokens": None if frac is None else ctx // frac,
                           "chunk_length": args.chunk_length, "sink": args.sink, "window": args.window,
                           "prompts": c.total, "correct": c.correct, "accuracy": c.correct / c.total,
                           "full_accuracy": base.correct / base.total,
                           "delta_points": 100 * (c.correct - base.correct) / c.total,
                           "agree_with_full": c.agree / c.total, "seconds": round(c.seconds, 2),
                           "plans": c.plans if key[2:3] == ("planner",) else None,
                           "recall": c.recall.as_dict() if frac is not None else None}
                    if len(key) > 2:
                        row[key[2]] = key[3]
                        row["variant"] = f"{key[2]}={key[3]}" + (f",chunk_length={key[4]}" if len(key) > 4 else "")
                        if len(key) > 4:
                            row["chunk_length"] = key[4]
                        if key[2] == "planner":
                            row["chunk_length"] = None
                        sweep.append(row)
                    else:
                        results.append(row)
                    rec = row["recall"]["total"] if row["recall"] else 1.0
                    log(f"    {fmt:5s} {budget_label(frac):6s} {row.get('variant', ''):16s} "
                        f"acc {c.correct}/{c.total} (full {base.correct}) agree {c.agree}/{c.total} "
                        f"recall {'n/a (no chunk fits the budget)' if rec is None else f'{rec:.3f}'}")

    out = {
        "benchmark": "eval_quality",
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "bench/eval_quality.py"] + sys.argv[1:]),
        "git_commit": commit,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "tierkv": tierkv.__version__},
        "model": "tierkv/models/retrieval (shipped), bf16 weights, linear layers as float32 matmuls rounded to bf16",
        "method": {
            "prompts": "tierkv.models.tasks.make_prompts(task, context, prompts, seed); every cell sees the same prompts",
            "baseline": "transformers DynamicCache, full attention, same prefill K/V",
            "accuracy": "exact match of every answer token, greedy",
            "prefill": "once per batch with a DynamicCache, replayed into each tierkv cache (tierkv.quality.replay_prefill)",
            "recall": ("tierkv.quality.SelectionProbe: per decode step, layer and query head, full softmax of the query "
                       "tierkv scored with over the exact keys; total = mass on sink + chosen chunks + tail (hot set "
                       "included); middle = chosen chunks' share of the mass on all chunks (hot set excluded); "
                       "oracle = total of the best chunks under the same budget per KV head; needle_chosen = share "
                       "of (sequence, step, layer, KV head) with the answer's needle in chunks whose needle chunks "
                       "were all chosen. Means over all queries."),
            "budget": "tokens per query per layer beyond the hot set (TierConfig.budget); the hot set is sink + window",
        },
        "config": {"sink": args.sink, "window": args.window, "chunk_length": args.chunk_length,
                   "group_size": args.group_size, "prompts": args.prompts, "batch": args.batch, "seed": args.seed},
        "baselines": baselines,
        "results": results,
        "sweep": sweep,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        log(f"wrote {args.json}")
    print_tables(out)
    if args.plot:
        try:
            plot(out, args.plot)
            log(f"wrote {args.plot}")
        except ImportError:
            log("matplotlib is not installed (pip install matplotlib): no plot")
    return 0


def print_tables(out) -> None:
    """Markdown tables: accuracy per task (format x budget by context), recall (budget by context)."""
    rows, sweep = out["results"], out["sweep"]
    base = {(b["context"], b["task"]): b for b in out["baselines"]}
    ctxs = list(dict.fromkeys(r["context"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\n{task}: exact match % (correct / prompts); full = DynamicCache on the same prompts")
        print("| format | budget | " + " | ".join(f"{c} tokens" for c in ctxs) + " |")
        print("|---|---|" + "---:|" * len(ctxs))
        print("| full | - | " + " | ".join(
            f"{100 * base[(c, task)]['accuracy']:.0f} ({base[(c, task)]['correct']}/{base[(c, task)]['prompts']})"
            for c in ctxs) + " |")
        for fmt in dict.fromkeys(r["format"] for r in rows):
            for bud in budgets:
                cells = {r["context"]: r for r in rows if r["task"] == task and r["format"] == fmt and r["budget"] == bud}
                print(f"| {fmt} | {bud} | " + " | ".join(
                    f"{100 * cells[c]['accuracy']:.0f} ({cells[c]['correct']}/{cells[c]['prompts']})" if c in cells else "-"
                    for c in ctxs) + " |")
    for what in ("total", "middle", "oracle", "maxkey", "lowbit", "needle_chosen"):
        print(f"\nattention-mass recall '{what}' (mean over decode queries, layers, query heads), by format")
        print("| task | format | budget | " + " | ".join(f"{c}" for c in ctxs) + " |")
        print("|---|---|---|" + "---:|" * len(ctxs))
        for task in dict.fromkeys(r["task"] for r in rows):
            for fmt in dict.fromkeys(r["format"] for r in rows):
                for bud in budgets:
                    cells = {r["context"]: r for r in rows if r["task"] == task and r["format"] == fmt
                             and r["budget"] == bud and r["recall"]}
                    if cells:
                        print(f"| {task} | {fmt} | {bud} | " + " | ".join(
                            f"{cells[c]['recall'][what]:.3f}" if c in cells and cells[c]["recall"][what] is not None
                            else "-" for c in ctxs) + " |")
    print("\nrecall 'total' of other rankings from the same abstracts (int4): centre + alpha * width; alpha 1 = tierkv's bound")
    for r in rows:
        if r["format"] == "int4" and r["recall"] and r["recall"].get("alpha"):
            print(f"| {r['task']} | {r['context']} | {r['budget']} | " + " | ".join(
                f"alpha {a}: {v:.3f}" for a, v in r["recall"]["alpha"].items() if v is not None) + " |")
    if sweep:
        print("\nsweep (int4, ctx/16): variant, accuracy vs full, recall total / middle / oracle / maxkey, per-layer total")
        for r in sweep:
            rec = r["recall"]
            f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"| {r['context']} | {r['task']} | {r['variant']} | {r['correct']}/{r['prompts']} "
                  f"(full {base[(r['context'], r['task'])]['correct']}) | {f(rec['total'])} | {f(rec['middle'])} | "
                  f"{f(rec['oracle'])} | {f(rec['maxkey'])} | " + " ".join(f(x) for x in rec["per_layer_total"])
                  + (f" | plan {r['plans'][0]}" if r.get("plans") else "") + " |")


def plot(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["results"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ctxs = list(dict.fromkeys(r["context"] for r in rows))
    fmts = list(dict.fromkeys(r["format"] for r in rows))
    base = {(b["context"], b["task"]): b["accuracy"] for b in out["baselines"]}
    fig, axes = plt.subplots(len(tasks) + 1, len(ctxs), figsize=(4.2 * len(ctxs), 3.2 * (len(tasks) + 1)), squeeze=False)
    labels = None
    for j, ctx in enumerate(ctxs):
        for i, task in enumerate(tasks):
            ax = axes[i][j]
            for fmt in fmts:
                cells = [r for r in rows if r["task"] == task and r["context"] == ctx and r["format"] == fmt]
                labels = [r["budget"] for r in cells]
                ax.plot(range(len(cells)), [100 * r["accuracy"] for r in cells], marker="o", label=fmt)
            ax.axhline(100 * base[(ctx, task)], color="k", ls="--", lw=1, label="full attention")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_title(f"{task}, {ctx} tokens ({out['config']['prompts']} prompts)")
            ax.set_ylabel("exact match %")
            ax.set_ylim(0, 102)
        ax = axes[len(tasks)][j]
        for task, ls in zip(tasks, ("-", ":")):
            cells = [r for r in rows if r["task"] == task and r["context"] == ctx and r["format"] == "int4" and r["recall"]]
            if not cells:
                cells = [r for r in rows if r["task"] == task and r["context"] == ctx and r["recall"] and r["format"] == fmts[0]]
            x = range(1, len(cells) + 1)
            ax.plot(x, [r["recall"]["total"] for r in cells], ls=ls, marker="o", color="C0", label=f"{task}: attended (incl. hot set)")
            ax.plot(x, [r["recall"]["oracle"] for r in cells], ls=ls, marker="^", color="C2", label=f"{task}: oracle, same budget")
            ax.plot(x, [r["recall"]["maxkey"] for r in cells], ls=ls, marker="v", color="C3", label=f"{task}: ranked by exact max q.k")
            if all(r["recall"].get("lowbit") is not None for r in cells):
                ax.plot(x, [r["recall"]["lowbit"] for r in cells], ls=ls, marker="D", color="C4",
                        label=f"{task}: ranked by int2-key mass")
            ax.plot(x, [r["recall"]["middle"] for r in cells], ls=ls, marker="s", color="C1", label=f"{task}: chunks only")
            ax.set_xticks(list(x), [r["budget"] for r in cells])
        ax.axhline(0.9, color="k", ls="--", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"attention-mass recall, {ctx} tokens (int4)")
        ax.set_xlabel("budget (tokens beyond the hot set / context)")
    axes[0][0].legend(fontsize=7)
    axes[len(tasks)][0].legend(fontsize=6)
    fig.suptitle(f"tierkv quality on the retrieval model: sink {out['config']['sink']}, window {out['config']['window']}, "
                 f"chunk {out['config']['chunk_length']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
