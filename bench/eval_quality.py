"""What sparse selection and quantized chunks cost in answers: accuracy and attention-mass recall.

For each context length and task of a retrieval model (the shipped 4-layer one, or the long-context one,
tierkv.models), on the same prompts:
  full     transformers' DynamicCache (full attention, the baseline every cell is compared with)
  cells    tierkv.offload with format in {bf16, int8, int4, int2} x budget in {dense (None), ctx/4, ctx/8,
           ctx/16, ctx/32, and fixed token counts (--fixed-budgets)} tokens per query per layer beyond the hot
           set (sink + window), at the first of --scorings x --selections; the other (scoring, selection)
           pairs for --cross-formats (default int4) at every sparse budget; formats kept on disk below the
           cpu tier's (--disk-formats, once TierConfig has disk_format)
Per cell: exact-match accuracy, agreement with the full-attention answers, and attention-mass recall
(tierkv.quality: the share of full softmax attention mass, over the exact keys, of each decode query of
each layer and query head, that sink + the chunks tierkv chose + the tail cover; also the chosen
chunks' share of the mass outside the hot set, the best share any selection under the same budget could
reach (oracle), how often the chunks holding the answer's needle were chosen, and per layer the share of
a step's choice that was chosen again at the next step).

How it runs on a CPU in minutes (all exact, see tierkv/quality.py):
- each prompt batch is prefilled once (bf16 model, DynamicCache) and its K/V replayed into every cell's
  cache the way tierkv's attention function ingests a prefill; prefill through tierkv is exact and
  does not depend on format or budget, so only the decode steps differ between cells;
- on the CPU the model's bf16 linear layers run as float32 matmuls rounded back to bf16
  (quality.float32_linears): bf16 matmuls are ~7x slower on CPUs without bf16 units;
- chunk_length is fixed (--chunk-length, or CONTEXT:LENGTH pairs): the planner needs the prefill's
  queries, so only the sweep's "planner" variant (chunk_length None) prefills through tierkv for real.
The selection tierkv made is read off its real decode path (quality.SelectionProbe listens to one
cache's choices); nothing of the runtime is re-implemented here. On a GPU (--device cuda) the same cells
run on the model's device. A cell's replay is host work per chunk (the store's put: about 0.1 ms a chunk
on the CPU machine), so a prompt costs each cell about (context / chunk length) x layers x 0.1 ms: 0.4 s
at 32K in 64-token chunks on the 8-layer model. bench/gpu_eval_long.sh sizes its calls by that.

    python bench/eval_quality.py                       # the committed run: ~15-20 min on 2 CPU cores
    python bench/eval_quality.py --contexts 4096 --tasks kv --prompts 100 --formats int4 --fractions 16 \\
        --sweep --json bench/results/quality_cpu_sweep.json --plot ''   # variants of the target cell
    python bench/eval_quality.py --quick               # seconds: one small context, few prompts
    python bench/eval_quality.py --model long --device cuda --contexts 32768 --tasks passkey kv near multi \\
        --fixed-budgets 2048 --scorings mass bound --selections head shared --chunk-length 32 \\
        --json bench/results/quality_long_32k_h100.json --plot ''
    python bench/eval_quality.py --merge a.json b.json --json all.json --plot all.png   # one report of several runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tierkv  # noqa: E402
from tierkv import TierConfig  # noqa: E402
from tierkv.formats import BITS, raw_bytes_per_token  # noqa: E402
from tierkv.models import MODEL_NAMES, load_retrieval_model  # noqa: E402
from tierkv.models.tasks import ALL_TASKS, make_prompts  # noqa: E402
from tierkv.quality import (RecallStats, SelectionProbe, continue_greedy, exact_match,  # noqa: E402
                            float32_linears, prefill, replay_prefill)
from quality_report import merge, write_report  # noqa: E402

FORMATS = ("bf16", "int8", "int4", "int2")
FRACTIONS = (4, 8, 16, 32)
SWEEPS = ("chunk", "planner", "window", "scoring")
SCORINGS = ("mass", "bound")
SELECTIONS = ("head", "shared")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass(frozen=True)
class CellSpec:
    """One tierkv configuration under test. chunk_length 0: the run's; None: the planner chooses."""

    fmt: str
    budget: str  # "dense", "1/16", or a fixed token count "2048"
    budget_tokens: Optional[int]
    scoring: str = "mass"
    selection: str = "head"
    disk_format: Optional[str] = None
    variant: Optional[str] = None  # a sweep's variant: "chunk_length=8", "planner=16-256", ...
    chunk_length: Optional[int] = 0
    window: Optional[int] = None
    rescore: bool = False

    @property
    def label(self) -> str:
        fmt = self.fmt if self.disk_format is None else f"{self.fmt}/{self.disk_format}"
        extra = "" if self.variant is None else f" {self.variant}"
        return f"{fmt} {self.budget} {self.scoring}/{self.selection}{extra}"


def disk_format_supported() -> bool:
    """Whether TierConfig can keep chunks on disk in another format than the cpu tier's (issue #28)."""
    return "disk_format" in {f.name for f in dataclasses.fields(TierConfig)}


def chunk_length_for(args, ctx: int) -> int:
    return args.chunk_by_context.get(ctx, args.chunk_length)


def cell_config(args, spec: CellSpec, batch: int, ctx: int, disk_dir: Optional[str] = None) -> TierConfig:
    # without a disk format the cpu tier holds every chunk of the batch, with room to spare (where chunks
    # live changes speed, not answers; the demo and tests/test_offload.py cover the disk path); with one,
    # the cpu tier holds --disk-cpu-share of them, so most chosen chunks are read in the disk's format
    need = 2 * batch * (ctx + 64) * args.kv_token_bytes
    chunk = chunk_length_for(args, ctx) if spec.chunk_length == 0 else spec.chunk_length
    kw = dict(budget=spec.budget_tokens, format=spec.fmt, sink=args.sink,
              window=args.window if spec.window is None else spec.window, chunk_length=chunk,
              group_size=args.group_size, gpu_budget="1MiB", cpu_budget=need + (16 << 20),
              scoring=spec.scoring, selection=spec.selection)
    if spec.disk_format is not None:
        kw.update(disk_format=spec.disk_format, disk_path=disk_dir,
                  cpu_budget=int(need / 2 * args.disk_cpu_share) + (1 << 20))
    return TierConfig(**kw)


def bits(fmt: str) -> int:
    return BITS.get(fmt, 16)  # bf16, fp16: raw 16-bit


def budgets(args, ctx: int) -> list:
    """(label, tokens) of the sparse budgets at one context: fractions, then fixed counts below ctx."""
    out = [(f"1/{f}", ctx // f) for f in args.fractions]
    out += [(str(n), n) for n in args.fixed_budgets if n < ctx]
    return out


def grid(args, ctx: int) -> list:
    """The cells of one context: formats x (dense + budgets) at the first (scoring, selection); the other
    pairs at --cross-formats; disk formats below each cpu format; the sweep's variants."""
    first = (args.scorings[0], args.selections[0])
    specs = []
    for fmt in args.formats:
        specs.append(CellSpec(fmt, "dense", None, *first))
        specs += [CellSpec(fmt, lab, n, *first) for lab, n in budgets(args, ctx)]
    for scoring in args.scorings:
        for selection in args.selections:
            if (scoring, selection) != first:
                specs += [CellSpec(fmt, lab, n, scoring, selection) for fmt in args.cross_formats
                          for lab, n in budgets(args, ctx)]
    for fmt in args.formats:
        for disk in args.disk_formats:
            if bits(disk) < bits(fmt):
                specs += [CellSpec(fmt, lab, n, *first, disk_format=disk) for lab, n in budgets(args, ctx)]
    if args.sweeps and ctx in (args.sweep_context or [max(args.contexts)]):
        specs += sweep_cells(args, ctx)
    return specs


def sweep_cells(args, ctx: int) -> list:
    """Variants of the target cell (int4, ctx/16)."""
    def target(**kw):
        return CellSpec("int4", "1/16", ctx // 16, **kw)

    specs = []
    if "chunk" in args.sweeps:
        specs += [target(variant=f"chunk_length={cl}", chunk_length=cl) for cl in (8, 16, 32, 64)
                  if cl != chunk_length_for(args, ctx)]
    if "planner" in args.sweeps:  # the planner's choice, after a real prefill
        specs.append(target(variant="planner=16-256", chunk_length=None))
    if "scoring" in args.sweeps:  # selection by int2-key mass (SelectionProbe rescore: an experiment)
        specs += [target(variant=f"scoring=int2-mass,chunk_length={cl}", chunk_length=cl, rescore=True)
                  for cl in (8, 16)]
    if "window" in args.sweeps:
        specs += [target(variant=f"window={w}", window=w) for w in (16, 256) if w != args.window]
    return specs


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


def run_spec(model, args, spec, batch_data, cell, ctx, tmp_root) -> None:
    kv, first, n_new, needles, scaling, ids, answers, ref = batch_data
    t0 = time.perf_counter()
    disk_dir = tempfile.mkdtemp(dir=tmp_root) if spec.disk_format else None
    try:
        cfg = cell_config(args, spec, ids.shape[0], ctx, disk_dir)
        probe_kw = {"lowbit": args.lowbit, "rescore": spec.rescore}
        pred, stats, plan = run_cell(model, cfg, kv, first, n_new, needles, scaling, ids, probe_kw)
    finally:
        if disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)
    cell.plans.append(plan)
    cell.correct += sum(exact_match(pred, answers))
    cell.agree += sum(torch.equal(a, b) for a, b in zip(pred.cpu(), ref.cpu()))
    cell.total += ids.shape[0]
    cell.recall.add(stats)
    cell.seconds += time.perf_counter() - t0


def evaluate_context(model, args, ctx, task, depth, specs, log, tmp_root, deadline=None):
    """Baseline and every cell on `args.prompts` prompts of one (context, task, depth); past `deadline`
    (a perf_counter time) no further batch is started, and the rows count the prompts done."""
    kw = {} if depth is None else {"depth": depth}
    prompts = make_prompts(task, ctx, args.prompts, seed=args.seed, **kw)
    n_layers = model.config.num_hidden_layers
    scaling = model.model.layers[0].self_attn.scaling
    device = next(model.parameters()).device
    base, cells, prefill_s = Cell(n_layers), {s: Cell(n_layers) for s in specs}, 0.0
    for b0 in range(0, len(prompts), args.batch):
        if deadline is not None and b0 and time.perf_counter() > deadline:
            log(f"  --max-seconds reached: {b0} of {len(prompts)} prompts done")
            break
        batch = prompts[b0 : b0 + args.batch]
        ids = torch.tensor([p.input_ids for p in batch], device=device)
        answers = [p.answer_ids for p in batch]
        n_new = max(len(a) for a in answers)
        t0 = time.perf_counter()
        kv, first = prefill(model, ids)
        prefill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        dyn = DynamicCache(config=model.config)
        replay_prefill(dyn, kv)
        ref = continue_greedy(model, dyn, first, n_new)
        del dyn
        base.correct += sum(exact_match(ref, answers))
        base.total += len(batch)
        base.agree += len(batch)
        base.seconds += time.perf_counter() - t0
        data = (kv, first, n_new, [p.needle for p in batch], scaling, ids, answers, ref)
        for spec in specs:
            run_spec(model, args, spec, data, cells[spec], ctx, tmp_root)
        del kv
        log(f"  {task}{'' if depth is None else f'@{depth:g}'} ctx {ctx}: {b0 + len(batch)}/{len(prompts)} prompts, "
            f"full attention {base.correct}/{base.total}")
    return base, cells, prefill_s


def make_row(args, ctx, task, depth, spec, c, base) -> dict:
    row = {"context": ctx, "task": task, "format": spec.fmt, "budget": spec.budget,
           "budget_tokens": spec.budget_tokens, "chunk_length": chunk_length_for(args, ctx), "sink": args.sink,
           "window": args.window, "prompts": c.total, "correct": c.correct, "accuracy": c.correct / c.total,
           "full_accuracy": base.correct / base.total, "delta_points": 100 * (c.correct - base.correct) / c.total,
           "agree_with_full": c.agree / c.total, "seconds": round(c.seconds, 2),
           "plans": c.plans if spec.chunk_length is None else None,
           "recall": c.recall.as_dict() if spec.budget_tokens is not None else None,
           "scoring": spec.scoring, "selection": spec.selection, "disk_format": spec.disk_format, "depth": depth}
    if spec.variant is not None:
        name, _, value = spec.variant.partition("=")
        row[name] = value.split(",")[0] if name != "chunk_length" else int(value)
        row["variant"] = spec.variant
        if spec.chunk_length != 0:
            row["chunk_length"] = spec.chunk_length
        if name == "window":
            row["window"] = int(value)
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="retrieval",
                    help=f"a packaged model ({', '.join(MODEL_NAMES)}) or a directory written by --export / training")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--tasks", nargs="+", default=["passkey", "kv"], choices=ALL_TASKS)
    ap.add_argument("--depths", type=float, nargs="*", default=None,
                    help="needle depths (0..1) to evaluate passkey, kv and near at, each its own rows (default: random)")
    ap.add_argument("--prompts", type=int, default=50, help="prompts per (context, task); every cell sees the same ones")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--fractions", type=int, nargs="+", default=list(FRACTIONS),
                    help="budgets as ctx/F tokens beyond the hot set (dense is always run too)")
    ap.add_argument("--fixed-budgets", type=int, nargs="*", default=[], help="budgets in tokens, e.g. 2048")
    ap.add_argument("--scorings", nargs="+", default=["mass"], choices=SCORINGS)
    ap.add_argument("--selections", nargs="+", default=None, choices=SELECTIONS)
    ap.add_argument("--selection", default="head", choices=SELECTIONS,
                    help="the selection of every cell when --selections is not given")
    ap.add_argument("--cross-formats", nargs="+", default=["int4"], choices=FORMATS,
                    help="formats that every (scoring, selection) pair beyond the first is run at")
    ap.add_argument("--disk-formats", nargs="*", default=[], choices=FORMATS,
                    help="chunks on disk in this format, below each cpu format of more bits (needs "
                         "TierConfig.disk_format; cells are skipped and listed until then)")
    ap.add_argument("--disk-cpu-share", type=float, default=0.25, help="with a disk format: cpu tier share of the KV")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--chunk-length", default="16", help="LENGTH, or CONTEXT:LENGTH,... (others take 16)")
    ap.add_argument("--group-size", type=int, default=32)
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
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new batch of prompts after this many seconds: rows count the prompts done, "
                         "and the JSON lists the (context, task) left (not_run)")
    ap.add_argument("--quick", action="store_true", help="512 tokens, 8 prompts, int4 and bf16 only")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge these runs' JSONs into --json / --plot")
    ap.add_argument("--json", default=str(ROOT / "bench/results/quality_cpu.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench/results/quality_cpu.png"))
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def check_args(ap, args) -> None:
    args.sweeps = set(SWEEPS if args.sweep == [] else args.sweep or ())
    args.selections = args.selections or [args.selection]
    if "scoring" in args.sweeps and not args.lowbit:
        ap.error("--sweep scoring needs the int2-key ranking: drop --no-lowbit")
    if args.quick:
        args.contexts, args.prompts, args.batch, args.formats, args.fractions = [512], 8, 8, ["bf16", "int4"], [16]
    for name in ("prompts", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    try:
        pairs = [p.split(":") for p in args.chunk_length.split(",")]
        args.chunk_length = int(pairs[0][0]) if len(pairs[0]) == 1 else 16
        args.chunk_by_context = {int(c): int(n) for c, n in (p for p in pairs if len(p) == 2)}
    except ValueError:
        ap.error(f"--chunk-length {args.chunk_length!r}: expected LENGTH or CONTEXT:LENGTH,...")
    if args.chunk_length < 1 or any(n < 1 for n in args.chunk_by_context.values()):
        ap.error("--chunk-length: expected lengths >= 1")
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: expected >= 1")
    if any(not 0 <= d <= 1 for d in args.depths or ()):
        ap.error(f"--depths {args.depths}: expected values in [0, 1]")
    if any(n < 1 for n in args.fixed_budgets):
        ap.error(f"--fixed-budgets {args.fixed_budgets}: expected token counts >= 1")
    if not 0 < args.disk_cpu_share <= 1:
        ap.error(f"--disk-cpu-share {args.disk_cpu_share}: expected a share in (0, 1]")
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")


def load_model(args):
    kw = {"name": args.model} if args.model in MODEL_NAMES else {"path": args.model}
    model, _ = load_retrieval_model(device=args.device, dtype=torch.bfloat16, **kw)
    mc = model.config
    args.kv_token_bytes = raw_bytes_per_token(mc.num_key_value_heads, mc.head_dim) * mc.num_hidden_layers
    return model


def split_specs(specs: list) -> tuple:
    """(runnable, skipped): disk-format cells wait for TierConfig.disk_format."""
    if disk_format_supported():
        return specs, []
    return [s for s in specs if s.disk_format is None], [s.label for s in specs if s.disk_format is not None]


def run_all(model, args, log) -> dict:
    results, baselines, sweep, skipped, left = [], [], [], [], []
    t_start = time.perf_counter()
    deadline = None if args.max_seconds is None else t_start + args.max_seconds
    tmp_root = tempfile.mkdtemp(prefix="tierkv-quality-")
    depths = args.depths or [None]
    try:
        for ctx in args.contexts:
            specs, skip = split_specs(grid(args, ctx))
            skipped += [{"context": ctx, "cell": s, "why": "TierConfig has no disk_format yet (issue #28)"} for s in skip]
            for task in args.tasks:
                for depth in (depths if task != "multi" else [None]):
                    if deadline is not None and time.perf_counter() > deadline:
                        left.append({"context": ctx, "task": task, "depth": depth})
                        continue
                    log(f"context {ctx}, task {task}{'' if depth is None else f' at depth {depth:g}'}: "
                        f"{args.prompts} prompts x {len(specs)} tierkv cells")
                    base, cells, prefill_s = evaluate_context(model, args, ctx, task, depth, specs, log, tmp_root,
                                                              deadline)
                    baselines.append({"context": ctx, "task": task, "depth": depth, "prompts": base.total,
                                      "correct": base.correct, "accuracy": base.correct / base.total,
                                      "prefill_s": round(prefill_s, 2), "decode_s": round(base.seconds, 2)})
                    for spec, c in cells.items():
                        row = make_row(args, ctx, task, depth, spec, c, base)
                        (sweep if spec.variant else results).append(row)
                        rec = row["recall"]["total"] if row["recall"] else 1.0
                        log(f"    {spec.label:32s} acc {c.correct}/{c.total} (full {base.correct}) agree "
                            f"{c.agree}/{c.total} recall {'n/a (no chunk fits the budget)' if rec is None else f'{rec:.3f}'}")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return {"baselines": baselines, "results": results, "sweep": sweep, "skipped": skipped, "not_run": left}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        out = merge(args.merge)
        write_report(out, args.json, args.plot, print)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    commit = git_commit()  # the code evaluated is the code at the start (a run takes tens of minutes)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    model = load_model(args)
    on_cpu = args.device == "cpu"
    with float32_linears(model) if on_cpu else _nothing():
        parts = run_all(model, args, log)
    out = {
        "benchmark": "eval_quality",
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "bench/eval_quality.py"] + sys.argv[1:]),
        "git_commit": commit,
        "device": "cpu" if on_cpu else torch.cuda.get_device_name(torch.device(args.device)),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "tierkv": tierkv.__version__},
        "model": model_description(args, on_cpu),
        "method": METHOD,
        "config": {"sink": args.sink, "window": args.window, "chunk_length": args.chunk_length,
                   "chunk_length_by_context": {str(k): v for k, v in args.chunk_by_context.items()},
                   "group_size": args.group_size, "prompts": args.prompts, "batch": args.batch, "seed": args.seed,
                   "scorings": args.scorings, "selections": args.selections, "cross_formats": args.cross_formats,
                   "fixed_budgets": args.fixed_budgets, "disk_formats": args.disk_formats},
        **parts,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_report(out, args.json, args.plot, log)
    return 0


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def model_description(args, on_cpu: bool) -> str:
    name = f"tierkv/models/{MODEL_NAMES[args.model]} (packaged)" if args.model in MODEL_NAMES else args.model
    return name + (", bf16 weights, linear layers as float32 matmuls rounded to bf16" if on_cpu else ", bf16")


METHOD = {
    "prompts": "tierkv.models.tasks.make_prompts(task, context, prompts, seed[, depth]); every cell sees the same prompts",
    "baseline": "transformers DynamicCache, full attention, same prefill K/V",
    "accuracy": "exact match of every answer token, greedy",
    "prefill": "once per batch with a DynamicCache, replayed into each tierkv cache (tierkv.quality.replay_prefill)",
    "recall": ("tierkv.quality.SelectionProbe: per decode step, layer and query head, full softmax of the query "
               "tierkv scored with over the exact keys; total = mass on sink + chosen chunks + tail (hot set "
               "included); middle = chosen chunks' share of the mass on all chunks (hot set excluded); "
               "oracle = total of the best chunks under the same budget per KV head; needle_chosen = share "
               "of (sequence, step, layer, KV head) with the answer's needle in chunks whose needle chunks "
               "were all chosen; kept = share of a step's chosen chunks (per sequence, layer, KV head) chosen "
               "at the step before too. Means over all queries."),
    "budget": "tokens per query per layer beyond the hot set (TierConfig.budget); the hot set is sink + window",
}


if __name__ == "__main__":
    sys.exit(main())
