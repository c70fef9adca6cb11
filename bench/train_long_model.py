"""Train the long-context retrieval model (8 layers, towards 128K tokens) in resumable device calls.

Why: tierkv's speed claims are at 32K-128K tokens, and the shipped 4-layer model answers only to 4K.
This model learns the same retrieval tasks (tierkv/models/tasks.py: passkey, kv, and near, whose keys
have neighbours that differ in one name) through a context curriculum from 512 tokens to 131072, in
calls of about 9 minutes, each resuming from the checkpoint the last one wrote.

Model: Llama, 8 layers, hidden 256, 4 query heads and 2 KV heads of 64 (grouped-query), MLP 384,
vocabulary 640, untied embeddings: 4,264,192 parameters, 8.5 MB of bf16 weights; 4 KiB of KV per token
(8 layers x 2 heads x 64 x 2 x 2 bytes), 512 MiB per sequence at 128K. RoPE theta 1e7 from the first
step: its slowest rotation has a period of about 3.8e7 positions, far beyond 128K, so no scaling is
needed for lengths the curriculum reaches (--rope-yarn FACTOR:ORIGINAL extends a trained model further,
YaRN-style). Why this size, not larger: a checkpoint must travel into the next call inside the
working tree's 64 MiB (the repository takes 21 MiB), and it holds fp32 weights plus the optimizer's
moments in bf16 (train_long_lib.AdamWBf16): 8 bytes a parameter, 32.5 MiB here, 3 files of 15 MiB at
most (a call brings back at most 8 files of 16 MiB). docs/decisions.md has the numbers.

Training: loss on answer tokens only (filler and values are random); every step holds about
--tokens-per-step tokens (65536: 128 rows of 512 tokens, one row of 131K); half the steps at the
stage's full length, half shorter; a stage ends when every task's teacher-forced exact match over its
last --gate-window full-length rows reaches --gate (or after its max steps); then a cooldown of the
learning rate. Everything a step does depends on (seed, step, the checkpoint's state): a resumed run
continues exactly as the uninterrupted one (tests/test_train_long.py checks it on the CPU).
--deterministic makes GPU kernels repeat too (the shipped 4-layer model's training was sensitive to
their nondeterminism).

Plan on one H100 (python bench/train_long_model.py --plan): FLOPs per step from the shapes the curriculum
draws (dense: 6 per weight and token; attention: 7 * length * 256 channels per token and layer, flash
attention's backward costing 2.5 forwards). Rates assumed: A = 25 TFLOP/s for the dense layers (the
shipped 4-layer model's deterministic training sustained about 50 at hidden 512 on an H200; these
matrices are half as wide), 120 TFLOP/s for attention forward + backward at head_dim 64 (15% of the
790 TFLOP/s the H100 gives on large bf16 products), 15 ms per step; B = half of each and 30 ms, about
what --deterministic costs (it halved the shipped model's speed). 480 s of training per call:

                          full-length step    mean step                    seconds            calls so far
    stage   length           A        B        A       B      steps         A         B          A          B
      0        512        0.08     0.16     0.08    0.16    300-3000    24-242    48-485   0.05-0.50  0.10-1.01
      1       1024        0.09     0.17     0.08    0.17    100-1000     8-84     17-168   0.07-0.68  0.14-1.36
      2       2048        0.09     0.19     0.09    0.18    100-800      9-71     18-142   0.09-0.83  0.17-1.66
      3       4096        0.11     0.23     0.10    0.20    100-800     10-81     20-161   0.11-1.00  0.21-1.99
      4       8192        0.14     0.29     0.12    0.24    100-600     12-73     23-145   0.13-1.15  0.26-2.29
      5      16384        0.21     0.41     0.16    0.33     80-500     13-81     26-163   0.16-1.32  0.32-2.63
      6      32768        0.34     0.67     0.24    0.48     60-400     14-96     28-192   0.19-1.52  0.38-3.03
      7      65536        0.59     1.18     0.40    0.80     40-300     19-120    38-240   0.23-1.77  0.45-3.53
      8     131072        2.19     4.39     1.28    2.56     60-400     85-511   170-1022  0.40-2.83  0.81-5.66
      cooldown (200 steps at the last stage)                           233       465      +0.49      +0.97

A full-length step at 128K is one row of 131200 tokens; tokens/s at the full length of each stage is
65536 / (step seconds) up to 32K (2 rows of 32K: 190K tokens/s at A, 98K at B) and 131200 / 2.19 = 60K
(A) or 30K (B) at 128K. The stage's min-max steps bound each row: the gates decide where in between a
run lands. The shipped 4-layer model needed about 1000 steps at 512 tokens before kv was learnt, so
stage 0 alone is likely 0.3-0.6 of a call. Expected under B: 32K is reached within the first 2-3 calls,
128K within 4-6, and the cooldown ends in the 5th-7th call. The first call's --profile prints the real
forward + backward times per length; rerun --plan with --assume-* set from them to redo this table.

    # one call (bench/gpu_train_long.sh wraps it: resume if a checkpoint is carried, write the next)
    python bench/train_long_model.py --deterministic --time-budget 480 --resume .gpu/ckpt29 --out $OUT/ckpt
    python bench/train_long_model.py --export .gpu/ckpt29 --out tierkv/models/retrieval_long   # CPU
    python bench/train_long_model.py --plan                                                     # the table
    python bench/train_long_model.py --quick --out /tmp/q --stop-after 8                        # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from tierkv.models.checkpoint import load_sharded, save_sharded  # noqa: E402
from tierkv.models.tasks import TRAIN_TASKS, VOCAB, evaluate, make_prompts  # noqa: E402
from train_long_lib import (MARGIN, BatchSpec, Curriculum, Throughput, answer_loss, build_batch,  # noqa: E402
                            exact_by_task, make_optimizer, parse_mix, parse_stages, plan, rows_exact_mean,
                            step_flops, step_seconds)

STAGES = ("512:300:3000,1024:100:1000,2048:100:800,4096:100:800,8192:100:600,16384:80:500,32768:60:400,"
          "65536:40:300,131072:60:400")
# arguments that define the training: a resumed run takes them from its checkpoint
TRAIN_ARGS = ("seed", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "rope_theta", "stages",
              "mix", "kv_dense", "tokens_per_step", "lr", "warmup", "cooldown", "min_lr_ratio", "weight_decay",
              "gate", "gate_window", "switch_delay", "grad_clip")
CHECKPOINT_FORMAT = "tierkv-long-train-1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="checkpoint directory to write (replaced whole); with --export, the model directory")
    p.add_argument("--resume", help="checkpoint directory to continue from (absent or empty: a fresh start)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="a fresh run (own curriculum, optimizer, step 0) starting from CKPT's weights: more training "
                        "after a finished curriculum, e.g. --stages 131072:200:800 (ignored when resuming)")
    p.add_argument("--export", metavar="CKPT", help="write the bf16 model of checkpoint CKPT to --out and exit")
    p.add_argument("--plan", action="store_true", help="print the training plan (seconds and calls per stage) and exit")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds of training in this call")
    p.add_argument("--stop-after", type=int, default=None, help="stop once this many steps (in all calls) are done")
    p.add_argument("--save-every", type=float, default=240.0, help="seconds between checkpoints within a call")
    p.add_argument("--workers", type=int, default=6, help="processes building batches ahead (0: in this one)")
    p.add_argument("--device", default=None)
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels (about half the speed)")
    p.add_argument("--sdpa", default="flash", choices=["flash", "auto"],
                   help="flash: force flash attention on CUDA (checked at start; falls back to auto if unsupported)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer (less memory)")
    p.add_argument("--profile", action="store_true", help="time forward + backward at a few lengths first (a copy)")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts per task at the end of the call")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--rope-yarn", default=None, metavar="FACTOR:ORIGINAL",
                   help="YaRN scaling of RoPE by FACTOR over ORIGINAL trained positions (may be set when resuming)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--quick", action="store_true", help="tiny model, short contexts, CPU: checks the code path")
    for name, default in (("assume-linear-tflops", 25.0), ("assume-attention-tflops", 120.0),
                          ("assume-step-overhead", 0.015)):
        p.add_argument(f"--{name}", type=float, default=default, help="--plan: assumed device rate")
    t = p.add_argument_group("training (fixed at the first call; a resumed run keeps its checkpoint's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=8)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--intermediate", type=int, default=384)
    t.add_argument("--rope-theta", type=float, default=1e7)
    t.add_argument("--stages", default=STAGES, help="LENGTH:MIN_STEPS:MAX_STEPS,...")
    t.add_argument("--mix", default="passkey:0.2,kv:0.5,near:0.3", help="task weights of the training rows")
    t.add_argument("--kv-dense", type=int, default=32, help="densest kv / near rows: one pair per this many tokens")
    t.add_argument("--tokens-per-step", type=int, default=65536)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--cooldown", type=int, default=200)
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--gate", type=float, default=0.9, help="exact match every task must reach to end a stage")
    t.add_argument("--gate-window", type=int, default=16, help="full-length rows per task the gate looks at")
    t.add_argument("--switch-delay", type=int, default=16, help="steps between deciding a switch and its start")
    t.add_argument("--grad-clip", type=float, default=1.0)
    return p


QUICK = dict(layers=2, hidden=64, heads=1, kv_heads=1, intermediate=128, stages="256:2:3,384:2:3",
             tokens_per_step=1024, warmup=2, cooldown=3, gate=0.0, gate_window=2, switch_delay=2, workers=0,
             log_every=1, eval_prompts=2, eval_batch=2, device="cpu")


def parse_args(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == parser.get_default(k):
                setattr(a, k, v)
    try:
        a.stage_list, a.mix_weights = parse_stages(a.stages), parse_mix(a.mix)
    except ValueError as e:
        parser.error(str(e))
    if not (a.plan or a.export or a.out):
        parser.error("--out is required (the checkpoint directory to write)")
    if a.export and not a.out:
        parser.error("--export needs --out (the model directory to write)")
    if a.heads % a.kv_heads or (a.head_dim not in (64, 128, 256) and not a.quick):
        parser.error(f"heads {a.heads} must be a multiple of kv-heads {a.kv_heads}, head-dim 64, 128 or 256")
    if a.workers + 1 >= a.switch_delay and a.workers:
        parser.error(f"--workers {a.workers}: batches are built at most switch-delay - 1 = {a.switch_delay - 1} "
                     "steps ahead; use fewer workers or a longer --switch-delay")
    if a.rope_yarn is not None and not _valid_yarn(a.rope_yarn):
        parser.error(f"--rope-yarn {a.rope_yarn!r}: expected FACTOR:ORIGINAL, e.g. 4:32768")
    return parser, a


def _valid_yarn(text: str) -> bool:
    try:
        factor, original = text.split(":")
        return float(factor) > 1 and int(original) > 0
    except ValueError:
        return False


def model_config(a):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(a.rope_theta)}
    longest = parse_stages(a.stages)[-1].length + MARGIN
    if a.rope_yarn:
        factor, original = a.rope_yarn.split(":")
        rope = {"rope_type": "yarn", "rope_theta": float(a.rope_theta), "factor": float(factor),
                "original_max_position_embeddings": int(original)}
        longest = max(longest, int(float(factor) * int(original)))
    return LlamaConfig(
        vocab_size=VOCAB.SIZE, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
        max_position_embeddings=longest, rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=VOCAB.BOS, eos_token_id=VOCAB.EOS, pad_token_id=VOCAB.PAD, use_cache=True,
        attn_implementation="sdpa")


def make_curriculum(a) -> Curriculum:
    return Curriculum(a.stage_list, list(a.mix_weights), a.seed, a.tokens_per_step, a.lr, a.warmup, a.cooldown,
                      a.min_lr_ratio, a.gate, a.gate_window, a.switch_delay)


# --- batches built ahead ----------------------------------------------------------------------------------

class BatchStream:
    """Builds step batches in worker processes, up to `ahead` steps before they are needed. A step's shape
    comes from the curriculum, which fixes it switch_delay steps in advance, so `ahead` < switch_delay."""

    def __init__(self, a, curriculum: Curriculum) -> None:
        self.a, self.curriculum = a, curriculum
        self.ahead = a.workers + 1 if a.workers else 0
        self.pending: dict = {}
        self.pool = None
        if a.workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # forked workers build numpy arrays only; they never touch CUDA
            self.pool = ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("fork"))

    def spec(self, step: int) -> BatchSpec:
        length, rows = self.curriculum.shape(step)
        return BatchSpec(self.a.seed, step, length, rows, tuple(self.a.mix_weights.items()), self.a.kv_dense)

    def get(self, step: int):
        if self.pool is None:
            return build_batch(self.spec(step))
        for s in range(step, step + self.ahead + 1):
            if s not in self.pending and (self.a.stop_after is None or s < self.a.stop_after):
                self.pending[s] = self.pool.submit(build_batch, self.spec(s))
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


# --- checkpoints -----------------------------------------------------------------------------------------

def checkpoint_state(model, opt) -> dict:
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            state[f"opt.m.{name}"], state[f"opt.v.{name}"] = st["m"].cpu(), st["v"].cpu()
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(path, model, opt, curriculum, run) -> None:
    meta = {"format": CHECKPOINT_FORMAT, "step": run["step"], "opt_steps": run["opt_steps"],
            "curriculum": curriculum.state_dict(), "train_args": run["train_args"], "rope_yarn": run["rope_yarn"],
            "init_from": run.get("init_from"),
            "config": run["config"], "history": run["history"], "calls": run["calls"], "evals": run["evals"]}
    summary = {k: meta[k] for k in ("step", "calls", "evals")}
    summary["events"] = meta["curriculum"]["events"]
    save_sharded(checkpoint_state(model, opt), path, meta, extra_files={"summary.json": json.dumps(summary, indent=1)})


def load_checkpoint(path):
    state, meta = load_sharded(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path}: not a checkpoint of this script (format {meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    return state, meta


def restore(model, opt, curriculum, state, meta, device) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    for name, p in model.named_parameters():
        if f"opt.m.{name}" in state:
            opt.state[p] = {"step": torch.tensor(float(meta["opt_steps"])),
                            "m": state[f"opt.m.{name}"].to(device), "v": state[f"opt.v.{name}"].to(device)}
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng.cuda"])
    curriculum.load_state_dict(meta["curriculum"])


def resolve_resume(parser, a):
    """The checkpoint to continue from, with the training arguments taken from it (None: a fresh start).
    A training argument given on the command line that differs from the checkpoint's is an error."""
    if not a.resume or not (Path(a.resume) / "index.json").is_file():
        return None
    state, meta = load_checkpoint(a.resume)
    for k in TRAIN_ARGS:
        saved, given = meta["train_args"][k], getattr(a, k)
        if given != saved and given != parser.get_default(k):
            parser.error(f"--{k.replace('_', '-')} {given!r} differs from the checkpoint's {saved!r}; a resumed run "
                         "keeps its training arguments")
        setattr(a, k, saved)
    a.stage_list, a.mix_weights = parse_stages(a.stages), parse_mix(a.mix)
    if a.rope_yarn is None:
        a.rope_yarn = meta.get("rope_yarn")
    return state, meta


# --- one call of training ---------------------------------------------------------------------------------

def sdpa_context(a, device):
    """Flash attention forced on CUDA if it runs here (checked on a small causal GQA case), else auto."""
    import contextlib

    if device.type != "cuda" or a.sdpa != "flash":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:  # the call transformers makes without a mask: grouped-query heads through enable_gqa, causal
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            q = torch.randn(1, a.heads, 256, a.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            kv = torch.randn(1, a.kv_heads, 256, a.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                                                   enable_gqa=a.heads != a.kv_heads)
            out.sum().backward()
    except RuntimeError as e:
        print(f"flash attention unavailable here ({str(e).splitlines()[0]}); sdpa chooses, and long steps may "
              "not fit in memory", flush=True)
        return contextlib.nullcontext
    return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def train_step(model, opt, batch, lr, a, device, attention):
    ids, mask, kind = batch
    for g in opt.param_groups:
        g["lr"] = lr
    ids_t = torch.from_numpy(ids).to(device, non_blocking=True)
    mask_t = torch.from_numpy(mask).to(device, non_blocking=True)
    with attention():
        loss, per_token, right = answer_loss(model, ids_t, mask_t, device.type == "cuda")
        opt.zero_grad(set_to_none=True)
        loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
    opt.step()
    exact, task_loss = exact_by_task(mask, kind, right.cpu().numpy(), per_token.cpu().numpy())
    return loss.item(), gnorm.item(), exact, task_loss


def param_sum(model) -> float:
    """The sum of all weights, 12 digits: two runs that log the same sums at the same steps trained alike."""
    return float(f"{sum(float(p.detach().double().sum()) for p in model.parameters()):.12g}")


def log_record(step, curriculum, batch, loss, gnorm, exact, task_loss, model, elapsed) -> dict:
    return {"step": step, "stage": curriculum.stage_at(step), "length": int(batch[0].shape[1]),
            "rows": int(batch[0].shape[0]), "loss": round(loss, 5),
            **{f"loss_{t}": round(v, 4) for t, v in task_loss.items()},
            **{f"exact_{t}": v for t, v in rows_exact_mean(exact).items()},
            "lr": round(curriculum.lr(step), 7), "grad_norm": round(gnorm, 4), "elapsed_s": round(elapsed, 1),
            "param_sum": param_sum(model)}


def train_call(a, model, opt, curriculum, run, device, log) -> dict:
    """Steps until the time budget, --stop-after or the curriculum's end; checkpoints every --save-every s."""
    stream, attention = BatchStream(a, curriculum), sdpa_context(a, device)
    t0 = last_save = time.perf_counter()
    first, step, times = run["step"], run["step"], deque(maxlen=16)
    try:
        while not curriculum.done(step) and (a.stop_after is None or step < a.stop_after):
            now = time.perf_counter()
            if now - t0 + (max(times) if times else 0.0) > a.time_budget:
                break
            batch = stream.get(step)
            loss, gnorm, exact, task_loss = train_step(model, opt, batch, curriculum.lr(step), a, device, attention)
            event = curriculum.observe(step, int(batch[0].shape[1]), exact)
            if event:
                log(json.dumps({"event": event}))
            if step % a.log_every == 0 or event:
                run["history"].append(log_record(step, curriculum, batch, loss, gnorm, exact, task_loss, model,
                                                 time.perf_counter() - t0))
                log(json.dumps(run["history"][-1]))
            step += 1
            run["step"] = run["opt_steps"] = step
            times.append(time.perf_counter() - now)
            if a.save_every and time.perf_counter() - last_save > a.save_every:
                save_checkpoint(a.out, model, opt, curriculum, run)
                last_save = time.perf_counter()
    finally:
        stream.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps": [first, step], "seconds": round(time.perf_counter() - t0, 1),
            "done": curriculum.done(step), "stage": curriculum.stage_at(max(step - 1, 0))}


def bf16_copy(model):
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def eval_call(a, model, curriculum, step, log) -> dict:
    """Greedy exact match on held-out prompts at the current stage's length (bf16 copy, DynamicCache)."""
    if a.eval_prompts < 1:
        return {}
    length = curriculum.stages[curriculum.stage_at(max(step - 1, 0))].length
    m = bf16_copy(model)
    out = {"step": step, "length": length}
    for task in TRAIN_TASKS:
        res = evaluate(m, make_prompts(task, length, a.eval_prompts, seed=a.eval_seed), batch_size=a.eval_batch)
        out[task] = round(res.accuracy, 4)
    log(json.dumps({"eval": out}))
    del m
    return out


def profile(a, model, device, log) -> list:
    """ms of forward + backward of one step at a few lengths, on a copy (the run's state is untouched)."""
    m, rows_out = copy.deepcopy(model), []
    attention = sdpa_context(a, device)
    longest = a.stage_list[-1].length + MARGIN
    for length in [n for n in (2048, 8192, 32768, 131072 + MARGIN) if n <= longest]:
        rows = max(1, a.tokens_per_step // length)
        ids, mask, _ = build_batch(BatchSpec(a.seed + 1, 0, length, rows, tuple(a.mix_weights.items()), a.kv_dense))
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            with attention():
                answer_loss(m, ids_t, mask_t, device.type == "cuda")[0].backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        dense, attn = step_flops(m.config, length, rows)
        ms = 1000 * float(np.median(times[1:]))
        rows_out.append({"length": length, "rows": rows, "fwd_bwd_ms": round(ms, 1),
                         "tflops": round((dense + attn) / ms / 1e9, 1)})
        log(json.dumps({"profile": rows_out[-1]}))
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows_out


# --- export, plan, main -----------------------------------------------------------------------------------

def export(a) -> dict:
    """The bf16 model of a checkpoint, as tierkv.models.load_retrieval_model(path=...) reads it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    state, meta = load_checkpoint(a.export)
    config = LlamaConfig.from_dict(meta["config"])
    model = LlamaForCausalLM(config)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.to(torch.bfloat16).state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt", "tierkv": "retrieval-long-model"})
    config.save_pretrained(str(out))
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    report = {"what": "the long-context retrieval model, exported from a bench/train_long_model.py checkpoint",
              "params": sum(v.numel() for v in weights.values()), "weights_sha256": digest,
              "weights_bytes": (out / "model.safetensors").stat().st_size, **{k: meta[k] for k in
              ("step", "train_args", "rope_yarn", "calls", "evals", "history")},
              "curriculum": meta["curriculum"]}
    (out / "train_long.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"exported step {meta['step']} to {out} ({report['weights_bytes']} bytes of weights, sha256 {digest[:16]})")
    return report


def print_plan(a) -> list:
    rate = Throughput(a.assume_linear_tflops, a.assume_attention_tflops, a.assume_step_overhead)
    config = model_config(a)
    rows = plan(config, make_curriculum(a), rate, a.time_budget)
    params = sum(step_flops(config, 1, 1)) / 6  # dense parameters (attention adds no weights)
    print(f"plan: {a.layers} layers, hidden {a.hidden}, about {params / 1e6:.2f}M dense parameters; "
          f"{a.time_budget:.0f} s of training per call; rates {rate}")
    for r in rows:
        print(json.dumps(r))
    last = make_curriculum(a)
    last.starts = [0] * len(a.stage_list)
    cool = sum(step_seconds(config, *last.shape(s), rate) for s in range(a.cooldown))
    print(json.dumps({"cooldown_steps": a.cooldown, "seconds": round(cool)}))
    return rows


def setup(a, device, log):
    from transformers import LlamaForCausalLM

    if a.deterministic:
        # before the first cuBLAS call; without it cuBLAS may split reductions differently run to run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = model_config(a)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(config).to(device)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    log(f"device {device} params {sum(p.numel() for p in model.parameters())} config "
        f"{json.dumps(config.to_diff_dict())}")
    return config, model, make_optimizer(model, a.lr, a.weight_decay), make_curriculum(a)


def main(argv=None) -> dict:
    parser, a = parse_args(argv)
    if a.plan:
        return {"plan": print_plan(a)}
    if a.export:
        return export(a)
    resumed = resolve_resume(parser, a)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    config, model, opt, curriculum = setup(a, device, log)
    run = {"step": 0, "opt_steps": 0, "train_args": {k: getattr(a, k) for k in TRAIN_ARGS}, "rope_yarn": a.rope_yarn,
           "config": config.to_dict(), "history": [], "calls": [], "evals": []}
    if resumed is not None:
        state, meta = resumed
        restore(model, opt, curriculum, state, meta, device)
        run.update({k: meta.get(k) for k in ("step", "opt_steps", "history", "calls", "evals", "init_from")})
        log(f"resumed {a.resume} at step {run['step']} (stage {curriculum.stage_at(run['step'])})")
    elif a.init_from:
        state, meta = load_checkpoint(a.init_from)
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
        run["init_from"] = {"checkpoint": a.init_from, "step": meta["step"], "train_args": meta["train_args"]}
        log(f"weights from {a.init_from} (step {meta['step']}); a fresh curriculum and optimizer")
    prof = profile(a, model, device, log) if a.profile else None
    call = train_call(a, model, opt, curriculum, run, device, log)
    call.update({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                 "torch": torch.__version__, "deterministic": a.deterministic, "git_commit": a.git_commit,
                 "profile": prof})
    run["calls"].append(call)
    save_checkpoint(a.out, model, opt, curriculum, run)
    evals = eval_call(a, model, curriculum, run["step"], log)
    if evals:
        run["evals"].append(evals)
        save_checkpoint(a.out, model, opt, curriculum, run)
    last = run["history"][-1] if run["history"] else {}
    summary = {"step": run["step"], "stage": call["stage"], "length": a.stage_list[call["stage"]].length,
               "steps_this_call": call["steps"][1] - call["steps"][0], "seconds": call["seconds"],
               "done": call["done"], "loss": last.get("loss"), "eval": evals, "checkpoint": a.out}
    log("TRAIN_LONG " + json.dumps(summary))
    return {"summary": summary, "history": run["history"], "curriculum": curriculum.state_dict()}


if __name__ == "__main__":
    main()
