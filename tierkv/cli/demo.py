"""`tierkv demo`: the main job. A long passkey prompt answered by the shipped retrieval model with its KV
cache in tierkv's tiers: a GPU budget far below the KV size, a CPU tier too small for it, the rest on disk.

The model (tierkv/models/retrieval) was trained to find a 5-digit passkey hidden among filler words; an
answer is right only if the decode steps found the one chunk that holds the passkey among the hundreds
that tierkv keeps off the GPU, read it from whichever tier holds it, and decoded it from its format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import torch
from rich.console import Console
from rich.table import Table

from ..config import FORMATS, TierConfig, format_size

DEFAULT_CONTEXT = 4096
CHUNK_LENGTH = 16  # short chunks: the passkey sentence is 7 tokens, and the budget buys more places to look
SINK, WINDOW = 4, 64
BUDGET_FRACTION = 16  # decode steps attend to context/16 tokens of chunks beyond the hot set
MIN_CONTEXT = 256  # below that the hot set (sink + window) is most of the prompt: nothing to offload


def register(sub) -> None:
    p = sub.add_parser("demo", help="answer a long passkey prompt with the shipped model, KV offloaded to cpu and disk",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help=f"prompt length in tokens (default {DEFAULT_CONTEXT})")
    p.add_argument("--seed", type=int, default=0, help="which prompt: the passkey and its depth follow from it (default 0)")
    p.add_argument("--disk-dir", default=None, help="directory of the disk tier, new or empty (default: a temporary one)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--format", choices=FORMATS, default="int4", help="chunk format (default int4)")
    p.set_defaults(func=run)


def _fail(console: Console, message: str) -> int:
    console.print(f"[red]tierkv demo: error: {message}[/red]")
    return 2


def _device(arg, console):
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


def run(args) -> int:
    console = Console(stderr=False)
    err = Console(stderr=True)
    max_ctx = 8448  # the shipped model's max_position_embeddings (checked against its config below)
    if not MIN_CONTEXT <= args.context <= max_ctx:
        return _fail(err, f"--context {args.context}: expected an integer from {MIN_CONTEXT} to {max_ctx} tokens")
    if args.seed < 0:
        return _fail(err, f"--seed {args.seed}: expected a non-negative integer")
    device, msg = _device(args.device, err)
    if msg:
        return _fail(err, msg)
    if args.disk_dir is not None:
        if os.path.exists(args.disk_dir) and not os.path.isdir(args.disk_dir):
            return _fail(err, f"--disk-dir {args.disk_dir!r} is a file; expected a new or empty directory")
        if os.path.isdir(args.disk_dir) and os.listdir(args.disk_dir):
            return _fail(err, f"--disk-dir {args.disk_dir!r} is not empty; expected a new or empty directory")

    import tierkv

    from ..formats import ChunkLayout, raw_bytes_per_token
    from ..models import load_retrieval_model
    from ..models.tasks import make_prompt
    from ..quality import continue_greedy, float32_linears
    from .report import moved_table, stats_table

    t0 = time.perf_counter()
    model, vocab = load_retrieval_model(device=device, dtype=torch.bfloat16)
    mc = model.config
    if args.context > mc.max_position_embeddings:
        return _fail(err, f"--context {args.context}: the model has {mc.max_position_embeddings} positions")
    prompt = make_prompt("passkey", args.context, args.seed)
    n_kv, head_dim, n_layers = mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers

    # the sizes that make the point: KV as a plain 16-bit cache would hold it, and the budgets around it
    kv_bytes = args.context * raw_bytes_per_token(n_kv, head_dim) * n_layers
    chunk_bytes = ChunkLayout(args.format, CHUNK_LENGTH, n_kv, head_dim).nbytes
    n_chunks = max(1, (args.context - SINK - WINDOW) // CHUNK_LENGTH) * n_layers
    stored = n_chunks * chunk_bytes
    gpu_budget = max(chunk_bytes, stored // 32)  # room for a few hot chunks
    cpu_budget = max(chunk_bytes, stored // 3)  # two thirds of the chunks must go to disk
    budget = max(CHUNK_LENGTH, args.context // BUDGET_FRACTION)

    tmp = None
    disk_dir = args.disk_dir
    if disk_dir is None:
        tmp = tempfile.mkdtemp(prefix="tierkv-demo-")
        disk_dir = os.path.join(tmp, "cold")
    cfg = TierConfig(gpu_budget=gpu_budget, cpu_budget=cpu_budget, disk_path=disk_dir, sink=SINK, window=WINDOW,
                     budget=budget, format=args.format, chunk_length=CHUNK_LENGTH)
    a, e = prompt.needle
    console.print(f"[bold]tierkv demo[/bold]: passkey retrieval with the shipped model ({n_layers} layers, "
                  f"{n_kv} KV heads x {head_dim}) on [bold]{device}[/bold]")
    console.print(f"prompt: {len(prompt)} tokens (seed {args.seed}); the passkey sentence "
                  f"[cyan]{vocab.decode(prompt.input_ids[a:e])}[/cyan] sits at tokens {a}..{e - 1} "
                  f"(depth {100 * a / len(prompt):.0f}%), the prompt ends "
                  f"[cyan]... {vocab.decode(prompt.input_ids[-6:])}[/cyan]")
    console.print(f"KV cache: {format_size(kv_bytes)} at 16 bits, about {format_size(stored)} as {args.format} chunks "
                  f"of {CHUNK_LENGTH} tokens. Tier budgets: gpu {format_size(gpu_budget)}, cpu {format_size(cpu_budget)}, "
                  f"disk in {disk_dir}")
    console.print(f"each decode step attends per layer and KV head to the first {SINK} + last {WINDOW} tokens "
                  f"(on the {device.type}) and the {budget // CHUNK_LENGTH} best-scoring chunks ({budget} tokens, "
                  f"1/{args.context // budget} of the context)")

    ids = torch.tensor([prompt.input_ids], device=device)
    n_new = len(prompt.answer_ids)
    fast = float32_linears(model) if device.type == "cpu" else nullcontext()
    try:
        with fast, tierkv.offload(model, cfg) as cache, torch.inference_mode():
            t1 = time.perf_counter()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            t2 = time.perf_counter()
            n_stored = sum(layer.n_chunks for layer in cache.layers)
            refresh = cache.promote_every
            answer = continue_greedy(model, cache, first, n_new)[0].tolist()
            _sync(device)
            t3 = time.perf_counter()
            cache.store.flush()
            stats = cache.stats()
            on_device = cache.device_bytes()
            plan = [layer.chunk_len for layer in cache.layers]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    right = tuple(answer) == tuple(prompt.answer_ids)
    console.print(stats_table(stats, title="tierkv tiers (hits/misses: chunk-head reads of the decode steps)"))
    console.print(moved_table(stats))
    t = Table(title="device memory")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    for k, v in on_device.items():
        t.add_row(k.replace("_", " "), format_size(v))
    console.print(t)
    console.print(f"{n_stored} chunks after prefill (chunk length per layer {plan}); load {t1 - t0:.1f} s, "
                  f"prefill {t2 - t1:.1f} s, {n_new} answer tokens {t3 - t2:.2f} s")
    if stats.hits.get("gpu", 0) == 0:
        console.print(f"(the gpu tier takes in the most-chosen chunks every {refresh} decode steps; a {n_new}-token "
                      "answer ends before the first refresh, so its reads came from the cpu tier and disk)")
    verdict = "[bold green]correct[/bold green]" if right else "[bold red]WRONG[/bold red]"
    console.print(f"answer: [bold]{vocab.decode(answer)}[/bold]   expected: {vocab.decode(prompt.answer_ids)}   {verdict}")
    return 0 if right else 1


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
