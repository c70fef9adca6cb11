"""Train the small long-context retrieval model that tierkv ships (tierkv/models/retrieval/).

Why a model of our own: no pretrained model can be downloaded here, and a random model's attention says
nothing about whether chunk selection or 2-bit keys keep the answer. This one is trained on passkey and
multi-key associative recall (tierkv/models/tasks.py) up to 4K+ tokens, so a lost chunk is a wrong answer.

Loss is on answer tokens only: filler and values are uniformly random, so a language-modelling loss on
them would be pure noise. A curriculum grows the context from 256 tokens to the training length (plus a
margin so that answers generated after a full-length prompt sit at trained positions), always mixing in
shorter contexts so the model keeps working at the small contexts the CPU tests use. Each step holds
about the same number of tokens, so short steps carry many sequences and long steps few.

Data depend on (seed, step, row) only. GPU kernels are not deterministic by default (flash-attention
backward sums in a varying order), and this training is sensitive to that: a step-for-step replay of an
earlier shipped run reached 65.5% kv instead of 98.5% (tierkv/models/retrieval/README.md).
--deterministic makes runs repeat, at about half the speed; the shipped weights come from such a run.
A rerun of the shipped command matched it at every log line's param_sum (12 significant digits) and in
every eval cell, but its weights file's bytes differed (docs/decisions.md): runs repeat to within
rounding, not bit for bit. tensor_sha256 in the JSON says which tensors
differ. --time-budget stops the loop early as a guard; the JSON then records the steps actually done, and
`--stop-after <that>` with the same --steps replays the same data and schedule.

    # the shipped weights (H200, deterministic: 4600 steps in about 8.5 minutes)
    python bench/train_retrieval_model.py --seed 0 --deterministic --lr 5e-4 --steps 8000 --stop-after 4600 \
        --time-budget 540 --eval-prompts 200 --eval-batch 50 --workers 6 --hidden 512 --heads 8 --kv-heads 4 \
        --intermediate 1024 --kv-dense 32 --kv-share 0.65 --out /tmp/retrieval
    python bench/train_retrieval_model.py --quick --out /tmp/q                # CPU smoke run, ~30 s

The defaults are the first shipped model's settings (hidden 384, 2 KV heads, kv rows at the evaluation's
density, --lr 1e-3), which plateaued at 79% kv at 4096; the arguments above are the current model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tierkv.models.tasks import (  # noqa: E402
    MAX_KEYS, TASKS, VALUE_DIGITS, VOCAB, default_pairs, evaluate, make_prompts, make_training_sequence, training_rng,
)

MIN_TRAIN_LENGTH = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for model.safetensors, config.json and the run's JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--time-budget", type=float, default=500.0, help="seconds of training before stopping early")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, keeping the schedule (lr, curriculum) of --steps: replays a run "
                        "that the time budget stopped early, step for step")
    p.add_argument("--train-length", type=int, default=4096, help="longest evaluated prompt; training goes a bit beyond")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--hold", type=float, default=0.15, help="fraction of steps kept at <= 512 tokens, where retrieval is learnt cheaply")
    p.add_argument("--ramp", type=float, default=0.55, help="fraction of steps by which the longest context reaches full length")
    p.add_argument("--hold-until", type=float, default=None,
                   help="adaptive hold: stay at <= 512 tokens past --hold until the kv rows' exact match over the "
                        "last 20 steps reaches this (then ramp over the same span of steps); the run stays "
                        "deterministic (the switch takes effect HOLD_DELAY steps after it is decided)")
    p.add_argument("--hold-max", type=float, default=0.45, help="adaptive hold: fraction of steps after which the ramp starts regardless")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--kv-queries", type=int, default=8)
    p.add_argument("--kv-share", type=float, default=0.5, help="fraction of rows that are kv (the rest passkey)")
    p.add_argument("--kv-dense", type=int, default=0,
                   help="if set, kv rows hold a random number of pairs between the evaluation's (one per 64 "
                        "tokens) and one per this many tokens: practice at telling many keys apart")
    p.add_argument("--kv-hard", type=float, default=0.0,
                   help="fraction of kv rows whose values use only 2-3 digits: the digits already answered then "
                        "do not tell the next one, only the place after the key does (the circuit that holds at "
                        "every length); 0 (off) replays earlier runs' data exactly")
    p.add_argument("--eval-lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-seed", type=int, default=1234, help="held-out prompts; training rows come from another RNG stream")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--profile-shapes", action="store_true", help="first time a few steps per context length on a throwaway model")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS workspace config; "
                        "flash attention's deterministic backward): the same arguments give the same training to "
                        "within rounding (the weights' bytes were seen to differ between two runs)")
    p.add_argument("--quick", action="store_true", help="tiny model, short contexts, a few CPU steps: checks the code path")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate = 30, 2, 128, 2, 1, 256
        a.train_length, a.tokens_per_step, a.warmup, a.log_every = 384, 4096, 5, 10
        a.eval_lengths, a.eval_prompts, a.eval_batch, a.workers = "256,384", 8, 8, 0
        a.device = a.device or "cpu"
    if a.hidden % a.heads or a.hidden // a.heads not in (64, 128, 256) and not a.quick:
        p.error(f"hidden {a.hidden} / heads {a.heads} must give head_dim 64, 128 or 256 (what the kernels support)")
    if a.stop_after is not None and not 1 <= a.stop_after <= a.steps:
        p.error(f"stop-after {a.stop_after} must be in 1..steps ({a.steps})")
    if not 0 < a.kv_share < 1:
        p.error(f"kv-share {a.kv_share} must be in (0, 1)")
    if not 0 <= a.kv_hard <= 1:
        p.error(f"kv-hard {a.kv_hard} must be in [0, 1]")
    if a.kv_dense and not 10 <= a.kv_dense <= 64:
        p.error(f"kv-dense {a.kv_dense} must be 0 (off) or 10..64 tokens per pair")
    if a.hold_until is not None and not (0 < a.hold_until <= 1 and a.hold <= a.hold_max < 1):
        p.error("hold-until must be in (0, 1] and hold <= hold-max < 1")
    if a.hold_until is not None and a.workers * 4 >= HOLD_DELAY:
        p.error(f"adaptive hold: workers x 4 batches ahead must stay below {HOLD_DELAY}")
    if a.heads % a.kv_heads:
        p.error(f"heads {a.heads} must be a multiple of kv-heads {a.kv_heads}")
    return a


# The adaptive hold's end, shared with the data workers (forked, so they see the parent's shared memory):
# -1 while holding, else the first step of the ramp. A switch decided after step s starts the ramp at
# s + HOLD_DELAY; every batch from there on is asked of a worker only after the main process has passed
# step s (the loader keeps workers * prefetch_factor < HOLD_DELAY batches ahead), so which batches are
# held never depends on timing.
HOLD_DELAY = 64
_HOLD_END = None


def _hold_end():
    global _HOLD_END
    if _HOLD_END is None:
        import multiprocessing

        _HOLD_END = multiprocessing.Value("q", -1)
    return _HOLD_END


def top_length(args, step: int) -> int:
    """Longest context at this step: 512 while held, then geometric growth to the full length by the ramp's end."""
    full = args.train_length + 128
    start = min(full, 2 * MIN_TRAIN_LENGTH)
    hold, ramp = args.hold * args.steps, max(args.hold * args.steps + 1, args.ramp * args.steps)
    if args.hold_until is not None:
        end = _hold_end().value
        hold = min(end if end >= 0 else math.inf, args.hold_max * args.steps)
        hold = max(hold, args.hold * args.steps)
        ramp = hold + max(1.0, (args.ramp - args.hold) * args.steps)
    if step < hold:
        return start
    f = min(1.0, (step - hold) / (ramp - hold))
    length = math.exp(math.log(start) + f * (math.log(full) - math.log(start)))
    return max(start, int(length) // 64 * 64) if f < 1 else full


def step_shape(args, step: int) -> tuple[int, int]:
    """(length, rows) of a step: half the steps at the current top length, the rest log-uniform below it."""
    rng = np.random.default_rng([args.seed, 99, step])
    top = top_length(args, step)
    if rng.random() < 0.5 or top <= MIN_TRAIN_LENGTH:
        length = top
    else:
        length = int(math.exp(rng.uniform(math.log(MIN_TRAIN_LENGTH), math.log(top)))) // 64 * 64
        length = max(MIN_TRAIN_LENGTH, length)
    return length, max(1, args.tokens_per_step // length)


class StepData(torch.utils.data.Dataset):
    """Item i is the whole batch of step i, so worker processes build batches ahead of the GPU."""

    def __init__(self, args):
        self.args = args

    def __len__(self):
        return self.args.stop_after or self.args.steps

    def __getitem__(self, step):
        a = self.args
        length, rows = step_shape(a, step)
        ids, mask, kind = [], [], []
        for r in range(rows):
            # rows alternate evenly at the kv share (0.5: passkey, kv, passkey, ...)
            is_kv = math.floor((r + 1) * a.kv_share + 1e-9) > math.floor(r * a.kv_share + 1e-9)
            task = "kv" if is_kv else "passkey"
            n_pairs = None
            if is_kv and a.kv_dense:
                lo = default_pairs(length)
                room = (length - a.kv_queries * (3 + VALUE_DIGITS)) // (2 + VALUE_DIGITS + 1) - 1
                hi = max(lo, min(MAX_KEYS, length // a.kv_dense, room))
                n_pairs = int(np.random.default_rng([a.seed, 98, step, r]).integers(lo, hi + 1))
            pool = None
            if is_kv and a.kv_hard:
                hard = np.random.default_rng([a.seed, 97, step, r])
                if hard.random() < a.kv_hard:
                    pool = hard.choice(10, size=int(hard.integers(2, 4)), replace=False).tolist()
            i, m = make_training_sequence(task, length, training_rng(a.seed, step, r), a.kv_queries, n_pairs, pool)
            ids.append(i)
            mask.append(m)
            kind.append(TASKS.index(task))
        return torch.tensor(ids), torch.tensor(mask, dtype=torch.bool), torch.tensor(kind)


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB.SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=2 * (args.train_length + 128),
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=VOCAB.BOS,
        eos_token_id=VOCAB.EOS,
        pad_token_id=VOCAB.PAD,
        use_cache=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    return config, model


def answer_loss(model, ids, mask, kind, amp):
    """Cross-entropy on answer tokens only; the LM head runs on those positions alone (a few per row)."""
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=amp):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        tgt = mask[:, 1:]
        logits = model.lm_head(hidden[:, :-1][tgt]).float()
    labels = ids[:, 1:][tgt]
    # log_softmax + gather rather than F.cross_entropy: nll_loss on CUDA has no deterministic
    # implementation, gather's backward (scatter_add) has one under --deterministic
    per_token = -logits.log_softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)
    loss = per_token.mean()
    with torch.no_grad():
        row_of = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(tgt)[tgt]
        task_loss = [per_token[kind[row_of] == t].mean() for t in range(len(TASKS))]
        right = torch.zeros_like(tgt)
        right[tgt] = logits.argmax(-1) == labels
        # a row's first answer is exactly an evaluation prompt's answer, and teacher-forced all-correct
        # equals greedy exact match, so this is a free held-out accuracy estimate on fresh data
        # counted on the CPU: cumsum on CUDA has no deterministic implementation (--deterministic)
        first = tgt.cpu().to(torch.int32).cumsum(1).to(tgt.device)
        n_first = torch.where(kind == 0, 5, 4).unsqueeze(1)  # passkey has 5 digits, kv values 4
        in_first = tgt & (first <= n_first)
        exact = ((right | ~in_first).all(1)).float()
    return loss, exact, torch.stack(task_loss)


def profile_shapes(args, device, log):
    """ms per training step at a few context lengths, on a throwaway model: sizes the step count of a run."""
    _, model = build_model(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = StepData(args)
    rows = []
    for length in (256, 512, 1024, 2048, args.train_length + 128):
        n = max(1, args.tokens_per_step // length)
        batch = [make_training_sequence(TASKS[r % 2], length, training_rng(999, length, r), args.kv_queries) for r in range(n)]
        ids = torch.tensor([b[0] for b in batch], device=device)
        mask = torch.tensor([b[1] for b in batch], dtype=torch.bool, device=device)
        kind = torch.tensor([r % 2 for r in range(n)], device=device)
        times = []
        for i in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss, _, _ = answer_loss(model, ids, mask, kind, device.type == "cuda")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        for r in range(n):
            make_training_sequence(TASKS[r % 2], length, training_rng(998, length, r), args.kv_queries)
        gen = time.perf_counter() - t0
        rows.append({"length": length, "rows": n, "ms_per_step": round(1000 * float(np.median(times[2:])), 2),
                     "data_ms_per_step_one_worker": round(1000 * gen, 1)})
        log(json.dumps({"profile": rows[-1]}))
    del model, opt, data
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def lr_at(args, step):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    f = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, f))))


def _optimizer(args, model, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )


def _loader(args):
    return torch.utils.data.DataLoader(
        StepData(args), batch_size=None, shuffle=False, num_workers=args.workers,
        prefetch_factor=4 if args.workers else None, persistent_workers=False,
        # forked workers share the adaptive hold's switch with this process
        multiprocessing_context="fork" if args.workers else None,
    )


def _hold_reached(args, step, exact, kind, kv_recent, log) -> bool:
    """True at the step where kv rows have been exact often enough to end the adaptive hold."""
    sel = exact[kind == TASKS.index("kv")]
    if sel.numel():
        kv_recent.append(sel.mean().item())
    if len(kv_recent) >= 20 and float(np.mean(kv_recent[-20:])) >= args.hold_until:
        _hold_end().value = step + HOLD_DELAY
        log(json.dumps({"hold_ends": step, "ramp_starts": step + HOLD_DELAY,
                        "kv_exact_last_20": round(float(np.mean(kv_recent[-20:])), 3)}))
        return True
    return False


def _log_record(args, model, step, ids, loss, task_loss, gnorm, exact, window, t0) -> dict:
    rec = {
        "step": step, "length": ids.shape[1], "rows": ids.shape[0], "loss": round(loss.item(), 4),
        **{f"loss_{t}": round(x, 4) for t, x in zip(TASKS, task_loss.tolist())},
        "grad_norm": round(gnorm.item(), 3), "lr": round(lr_at(args, step), 6),
        "batch_exact": round(exact.mean().item(), 3), "elapsed_s": round(time.perf_counter() - t0, 1),
        # sum of all weights: two runs that log the same sums at the same steps trained identically
        "param_sum": float(f"{sum(float(p.detach().double().sum()) for p in model.parameters()):.12g}"),
    }
    for t in TASKS:  # exact match over the recent full-length steps, per task
        if window[t]:
            rec[f"full_len_exact_{t}"] = round(float(np.mean(window[t][-20:])), 3)
    return rec


def train(args, model, device, log):
    opt = _optimizer(args, model, device)
    loader = _loader(args)
    amp = device.type == "cuda"
    model.train()
    history = []
    window = {t: [] for t in TASKS}
    t0 = time.perf_counter()
    steps_done = 0
    stopped_early = False
    hold_at, kv_recent = None, []
    if args.hold_until is not None:
        _hold_end().value = -1
    for step, (ids, mask, kind) in enumerate(loader):
        if args.stop_after is not None and step >= args.stop_after:
            break
        if time.perf_counter() - t0 > args.time_budget:
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step)
        ids, mask, kind = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), kind.to(device)
        loss, exact, task_loss = answer_loss(model, ids, mask, kind, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if args.hold_until is not None and hold_at is None and _hold_reached(args, step, exact, kind, kv_recent, log):
            hold_at = step
        if ids.shape[1] >= args.train_length:
            for ti, t in enumerate(TASKS):
                sel = exact[kind == ti]
                if sel.numel():
                    window[t].append(sel.mean().item())
        if step % args.log_every == 0 or step == args.steps - 1:
            history.append(_log_record(args, model, step, ids, loss, task_loss, gnorm, exact, window, t0))
            log(json.dumps(history[-1]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps_done": steps_done, "stopped_early": stopped_early, "hold_ended_at": hold_at,
            "train_seconds": round(time.perf_counter() - t0, 1), "history": history}


def run_eval(args, model, log):
    table = []
    for length in [int(x) for x in args.eval_lengths.split(",") if x]:
        for task in TASKS:
            prompts = make_prompts(task, length, args.eval_prompts, seed=args.eval_seed)
            t = time.perf_counter()
            res = evaluate(model, prompts, batch_size=args.eval_batch)
            row = {"task": task, "length": length, "prompts": res.total, "correct": res.correct,
                   "accuracy": round(res.accuracy, 4), "seconds": round(time.perf_counter() - t, 2)}
            table.append(row)
            log(json.dumps(row))
    return table


def tensor_digests(state: dict) -> dict:
    """The first 16 hex digits of each tensor's sha256 (its raw bytes): two runs' JSONs then say which
    tensors differ without the weights files at hand."""
    return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(state.items())}


def git_commit(args):
    if args.git_commit:
        return args.git_commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    if args.deterministic:
        # before the first cuBLAS call; without it cuBLAS may split reductions differently run to run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config, model = build_model(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} params {n_params} config {config.to_json_string(use_diff=False)}")

    shapes = profile_shapes(args, device, log) if args.profile_shapes else None
    result = train(args, model, device, log)
    log(f"trained {result['steps_done']} steps in {result['train_seconds']} s (stopped early: {result['stopped_early']})")

    from safetensors.torch import save_file

    # saved before evaluating, so a run cut short still leaves its weights behind
    model = model.to(torch.bfloat16).eval()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "tierkv": "retrieval-model"})
    config.save_pretrained(str(out))

    # evaluate exactly what ships: the bf16 weights, sdpa attention, a fresh DynamicCache per batch
    t = time.perf_counter()
    table = run_eval(args, model, log)
    eval_seconds = round(time.perf_counter() - t, 1)
    import transformers

    report = {
        "what": "train the shipped retrieval model; greedy exact-match accuracy on held-out prompts, full attention (DynamicCache, sdpa, bf16 weights)",
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")",
        "git_commit": git_commit(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "args": vars(args),
        "params": n_params,
        "weights_bytes": os.path.getsize(out / "model.safetensors"),
        # compare against the shipped file (tierkv/models/retrieval), whole and tensor by tensor
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "tensor_sha256": tensor_digests(state),
        "config": config.to_dict(),
        "profile_shapes": shapes,
        "eval_seconds": eval_seconds,
        "eval": table,
        **result,
    }
    with open(out / "train_retrieval.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"saved to {out} ({report['weights_bytes']} bytes of weights)")
    log_file.close()
    return report


if __name__ == "__main__":
    main()
