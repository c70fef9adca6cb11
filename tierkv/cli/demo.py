"""`tierkv demo`: the main job. A long passkey prompt answered by the shipped retrieval model with its KV
cache in tierkv's tiers: a GPU budget far below the KV size, a CPU tier too small for it, the rest on disk.

The model (tierkv/models/retrieval) was trained to find a 5-digit passkey hidden among filler words; an
answer is right only if the decode steps found the one chunk that holds the passkey among the hundreds
that tierkv keeps off the GPU, read it from whichever tier holds it, and decoded it from its format.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from ..compat import cache_kwargs
from ..config import FORMATS, TierConfig, format_size


@dataclass(frozen=True)
class DemoShape:
    """How the demo sizes its cache against the prompt; the defaults make most of the KV live off the GPU.

    context:         default prompt length in tokens.
    min_context:     shortest prompt accepted: below it the hot set (sink + window) is most of the prompt.
    chunk_length:    tokens per chunk: short, because the passkey sentence is 7 tokens and a fixed budget
                     then buys more places to look.
    sink, window:    the hot set: first and last tokens that stay on the device.
    budget_fraction: decode steps attend to context / budget_fraction tokens of chunks beyond the hot set.
    gpu_fraction:    the gpu tier holds 1 / gpu_fraction of the chunk bytes (room for a few hot chunks).
    cpu_fraction:    the cpu tier holds 1 / cpu_fraction of them; the rest must go to disk.
    """

    context: int = 4096
    min_context: int = 256
    chunk_length: int = 16
    sink: int = 4
    window: int = 64
    budget_fraction: int = 16
    gpu_fraction: int = 32
    cpu_fraction: int = 3


SHAPE = DemoShape()


def register(sub) -> None:
    p = sub.add_parser("demo", help="answer a long passkey prompt with the shipped model, KV offloaded to cpu and disk",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=SHAPE.context, help=f"prompt length in tokens (default {SHAPE.context})")
    p.add_argument("--seed", type=int, default=0, help="which prompt: the passkey and its depth follow from it (default 0)")
    p.add_argument("--disk-dir", default=None, help="directory of the disk tier, new or empty (default: a temporary one)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--format", choices=FORMATS, default="int4", help="chunk format (default int4)")
    p.set_defaults(func=run)


def _fail(console: Console, message: str) -> int:
    console.print(f"[red]tierkv demo: error: {message}[/red]")
    return 2


def _device(arg):
    """The torch device for --device, or an error message."""
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        return None, f"--device {arg!r}: expected cpu, cuda or cuda:N"
    if dev.type not in ("cpu", "cuda"):
        return None, f"--device {arg!r}: expected cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None, f"--device {arg!r}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return None, f"--device {arg!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return dev, None


def _check_args(args, max_context: int):
    """(device, None) for good arguments, else (None, a message naming the bad one)."""
    if not SHAPE.min_context <= args.context <= max_context:
        return None, f"--context {args.context}: expected an integer from {SHAPE.min_context} to {max_context} tokens"
    if args.seed < 0:
        return None, f"--seed {args.seed}: expected a non-negative integer"
    device, msg = _device(args.device)
    if msg:
        return None, msg
    if args.disk_dir is not None:
        if os.path.exists(args.disk_dir) and not os.path.isdir(args.disk_dir):
            return None, f"--disk-dir {args.disk_dir!r} is a file; expected a new or empty directory"
        if os.path.isdir(args.disk_dir) and os.listdir(args.disk_dir):
            return None, f"--disk-dir {args.disk_dir!r} is not empty; expected a new or empty directory"
    return device, None


@dataclass(frozen=True)
class Sizes:
    """The sizes that make the point: KV as a plain 16-bit cache would hold it, and the budgets around it."""

    kv_bytes: int
    stored: int
    gpu_budget: int
    cpu_budget: int
    budget: int


def _sizes(context: int, fmt: str, n_kv: int, head_dim: int, n_layers: int) -> Sizes:
    from ..formats import ChunkLayout, raw_bytes_per_token

    L = SHAPE.chunk_length
    chunk_bytes = ChunkLayout(fmt, L, n_kv, head_dim).nbytes
    n_chunks = max(1, (context - SHAPE.sink - SHAPE.window) // L) * n_layers
    stored = n_chunks * chunk_bytes
    return Sizes(kv_bytes=context * raw_bytes_per_token(n_kv, head_dim) * n_layers, stored=stored,
                 gpu_budget=max(chunk_bytes, stored // SHAPE.gpu_fraction),
                 cpu_budget=max(chunk_bytes, stored // SHAPE.cpu_fraction),
                 budget=max(L, context // SHAPE.budget_fraction))


def _print_setup(console, args, device, mc, prompt, vocab, sizes: Sizes, disk_dir: str) -> None:
    n_kv, head_dim, n_layers = mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers
    a, e = prompt.needle
    console.print(f"[bold]tierkv demo[/bold]: passkey retrieval with the shipped model ({n_layers} layers, "
                  f"{n_kv} KV heads x {head_dim}) on [bold]{device}[/bold]")
    console.print(f"prompt: {len(prompt)} tokens (seed {args.seed}); the passkey sentence "
                  f"[cyan]{vocab.decode(prompt.input_ids[a:e])}[/cyan] sits at tokens {a}..{e - 1} "
                  f"(depth {100 * a / len(prompt):.0f}%), the prompt ends "
                  f"[cyan]... {vocab.decode(prompt.input_ids[-6:])}[/cyan]")
    console.print(f"KV cache: {format_size(sizes.kv_bytes)} at 16 bits, about {format_size(sizes.stored)} as "
                  f"{args.format} chunks of {SHAPE.chunk_length} tokens. Tier budgets: gpu "
                  f"{format_size(sizes.gpu_budget)}, cpu {format_size(sizes.cpu_budget)}, disk in {disk_dir}")
    console.print(f"each decode step attends per layer and KV head to the first {SHAPE.sink} + last {SHAPE.window} "
                  f"tokens (on the {device.type}) and the {sizes.budget // SHAPE.chunk_length} best-scoring chunks "
                  f"({sizes.budget} tokens, 1/{args.context // sizes.budget} of the context)")


@dataclass
class Outcome:
    answer: list
    stats: object
    on_device: dict
    plan: list
    n_stored: int
    refresh: int
    prefill_start: float  # time.perf_counter() when the prefill began
    prefill_s: float
    decode_s: float


def _answer(model, cfg: TierConfig, prompt, device) -> Outcome:
    """Prefill the prompt through tierkv's cache, then decode the answer greedily."""
    import tierkv

    from ..quality import continue_greedy, float32_linears

    ids = torch.tensor([prompt.input_ids], device=device)
    n_new = len(prompt.answer_ids)
    fast = float32_linears(model) if device.type == "cpu" else nullcontext()
    with fast, tierkv.offload(model, cfg) as cache, torch.inference_mode():
        t1 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        n_stored = sum(layer.n_chunks for layer in cache.layers)
        answer = continue_greedy(model, cache, first, n_new)[0].tolist()
        _sync(device)
        t3 = time.perf_counter()
        cache.store.flush()
        return Outcome(answer=answer, stats=cache.stats(), on_device=cache.device_bytes(),
                       plan=[layer.chunk_len for layer in cache.layers], n_stored=n_stored,
                       refresh=cache.promote_every, prefill_start=t1, prefill_s=t2 - t1, decode_s=t3 - t2)


def _print_outcome(console, o: Outcome, prompt, vocab, load_s: float) -> bool:
    from .report import moved_table, stats_table

    console.print(stats_table(o.stats, title="tierkv tiers (hits/misses: chunk-head reads of the decode steps)"))
    console.print(moved_table(o.stats))
    t = Table(title="device memory")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    for k, v in o.on_device.items():
        t.add_row(k.replace("_", " "), format_size(v))
    console.print(t)
    n_new = len(prompt.answer_ids)
    console.print(f"{o.n_stored} chunks after prefill (chunk length per layer {o.plan}); load {load_s:.1f} s, "
                  f"prefill {o.prefill_s:.1f} s, {n_new} answer tokens {o.decode_s:.2f} s")
    if o.stats.hits.get("gpu", 0) == 0:
        console.print(f"(the gpu tier takes in the most-chosen chunks every {o.refresh} decode steps; a {n_new}-token "
                      "answer ends before the first refresh, so its reads came from the cpu tier and disk)")
    right = tuple(o.answer) == tuple(prompt.answer_ids)
    verdict = "[bold green]correct[/bold green]" if right else "[bold red]WRONG[/bold red]"
    console.print(f"answer: [bold]{vocab.decode(o.answer)}[/bold]   expected: {vocab.decode(prompt.answer_ids)}   {verdict}")
    return right


def run(args) -> int:
    console = Console(stderr=False)
    err = Console(stderr=True)
    max_ctx = 8448  # the shipped model's max_position_embeddings (checked against its config below)
    device, msg = _check_args(args, max_ctx)
    if msg:
        return _fail(err, msg)

    from ..models import load_retrieval_model
    from ..models.tasks import make_prompt

    t0 = time.perf_counter()
    model, vocab = load_retrieval_model(device=device, dtype=torch.bfloat16)
    mc = model.config
    if args.context > mc.max_position_embeddings:
        return _fail(err, f"--context {args.context}: the model has {mc.max_position_embeddings} positions")
    prompt = make_prompt("passkey", args.context, args.seed)
    sizes = _sizes(args.context, args.format, mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers)
    with tempfile.TemporaryDirectory(prefix="tierkv-demo-") as tmp:
        disk_dir = args.disk_dir if args.disk_dir is not None else os.path.join(tmp, "cold")
        cfg = TierConfig(gpu_budget=sizes.gpu_budget, cpu_budget=sizes.cpu_budget, disk_path=disk_dir,
                         sink=SHAPE.sink, window=SHAPE.window, budget=sizes.budget, format=args.format,
                         chunk_length=SHAPE.chunk_length)
        _print_setup(console, args, device, mc, prompt, vocab, sizes, disk_dir)
        outcome = _answer(model, cfg, prompt, device)
    right = _print_outcome(console, outcome, prompt, vocab, load_s=outcome.prefill_start - t0)
    return 0 if right else 1


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
