"""The parts of bench/train_long_model.py that hold state or numbers: the context curriculum, the
optimizer whose whole state a checkpoint can carry, the training batches, the loss, and the FLOP model
behind the training plan. Each is deterministic: what a step does depends on (seed, step, the state
saved in the checkpoint), never on timing, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tierkv.models.tasks import (MAX_KEYS, PASSKEY_DIGITS, TRAIN_TASKS, VALUE_DIGITS, default_pairs,
                                 make_training_sequence, training_rng)

MIN_TRAIN_LENGTH = 256
# training rows run this far past a stage's length, so that answers generated after a prompt of the
# stage's full length still sit at trained positions
MARGIN = 128
ROUND = 64


@dataclass(frozen=True)
class Stage:
    """One step of the context curriculum: prompts up to `length` tokens, for min..max steps."""

    length: int
    min_steps: int
    max_steps: int


def parse_stages(text: str) -> List[Stage]:
    """'512:300:3000,1024:100:1000,...' -> stages; lengths must grow, min <= max."""
    stages = []
    for part in text.split(","):
        try:
            length, lo, hi = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"stage {part!r}: expected LENGTH:MIN_STEPS:MAX_STEPS") from None
        if length < MIN_TRAIN_LENGTH or length % ROUND or not 1 <= lo <= hi:
            raise ValueError(f"stage {part!r}: expected a length >= {MIN_TRAIN_LENGTH}, a multiple of {ROUND}, "
                             "and 1 <= MIN_STEPS <= MAX_STEPS")
        if stages and length <= stages[-1].length:
            raise ValueError(f"stage {part!r}: lengths must grow from stage to stage")
        stages.append(Stage(length, lo, hi))
    return stages


def parse_mix(text: str) -> Dict[str, float]:
    """'passkey:0.2,kv:0.5,near:0.3' -> task weights summing to 1."""
    mix = {}
    for part in text.split(","):
        task, _, w = part.partition(":")
        if task not in TRAIN_TASKS or not w:
            raise ValueError(f"mix entry {part!r}: expected TASK:WEIGHT with TASK in {TRAIN_TASKS}")
        mix[task] = float(w)
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError(f"mix {text!r}: weights must be >= 0 and not all 0")
    return {t: w / total for t, w in mix.items() if w > 0}


class Curriculum:
    """Which contexts each step trains on, when the next stage starts, and the learning rate.

    Half the steps of a stage train at its full length (+ MARGIN), the rest at lengths drawn
    log-uniformly below it, so shorter contexts keep working. A stage ends once every task's exact-match
    over its last `window` full-length rows reaches `gate` (and min_steps are done), or after max_steps
    regardless. The end of the last stage starts the cooldown: `cooldown` steps over which the learning
    rate falls linearly to lr * min_lr_ratio (warmup, then constant, then cooldown: a schedule that needs
    no total step count, since the gates decide how long the run is). A switch decided after step s
    takes effect at step s + delay, so batches built ahead (up to delay - 1 steps) never depend on it.
    """

    def __init__(self, stages: Sequence[Stage], tasks: Sequence[str], seed: int, tokens_per_step: int,
                 lr: float, warmup: int, cooldown: int, min_lr_ratio: float, gate: float, window: int,
                 delay: int) -> None:
        self.stages, self.tasks, self.seed = list(stages), list(tasks), seed
        self.tokens_per_step, self.lr_peak, self.warmup = tokens_per_step, lr, warmup
        self.cooldown, self.min_lr_ratio = cooldown, min_lr_ratio
        self.gate, self.window, self.delay = gate, window, delay
        self.starts: List[int] = [0]  # the step each entered (or scheduled) stage starts at
        self.cooldown_start: Optional[int] = None
        self.recent: Dict[str, List[float]] = {t: [] for t in self.tasks}
        self.events: List[dict] = []

    # --- what a step trains on ---------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        return max(i for i, s in enumerate(self.starts) if s <= step)

    def top_length(self, step: int) -> int:
        return self.stages[self.stage_at(step)].length + MARGIN

    def shape(self, step: int) -> Tuple[int, int]:
        """(length, rows) of a step: half the steps at the stage's top length, the rest log-uniform below."""
        top = self.top_length(step)
        rng = np.random.default_rng([self.seed, 99, step])
        length = top
        if rng.random() >= 0.5 and top > MIN_TRAIN_LENGTH:
            length = int(math.exp(rng.uniform(math.log(MIN_TRAIN_LENGTH), math.log(top)))) // ROUND * ROUND
            length = max(MIN_TRAIN_LENGTH, length)
        return length, max(1, round(self.tokens_per_step / length))

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.lr_peak * (step + 1) / self.warmup
        if self.cooldown_start is None or step < self.cooldown_start:
            return self.lr_peak
        f = min(1.0, (step - self.cooldown_start + 1) / max(1, self.cooldown))
        return self.lr_peak * (1 - f * (1 - self.min_lr_ratio))

    def done(self, step: int) -> bool:
        """True once the cooldown's last step is behind `step` (the steps done so far)."""
        return self.cooldown_start is not None and step >= self.cooldown_start + self.cooldown

    # --- moving on ---------------------------------------------------------------------------------
    def observe(self, step: int, length: int, exact: Dict[str, List[float]]) -> Optional[dict]:
        """After step `step`: its rows' exact-match per task; returns the event when a switch is decided."""
        i = self.stage_at(step)
        if len(self.starts) > i + 1 or self.cooldown_start is not None:
            return None  # a switch is already on its way
        if length == self.top_length(step):
            for t in self.tasks:
                self.recent[t] = (self.recent[t] + list(exact.get(t, [])))[-self.window:]
        done_steps = step - self.starts[i] + 1
        stage = self.stages[i]
        scores = {t: float(np.mean(v)) if v else 0.0 for t, v in self.recent.items()}
        passed = all(len(v) >= self.window for v in self.recent.values()) and min(scores.values()) >= self.gate
        if not ((passed and done_steps >= stage.min_steps) or done_steps >= stage.max_steps):
            return None
        event = {"decided_at": step, "starts_at": step + self.delay, "stage": i, "length": stage.length,
                 "forced": not passed, "exact": {t: round(s, 3) for t, s in scores.items()}}
        if i + 1 < len(self.stages):
            self.starts.append(step + self.delay)
            event["next_length"] = self.stages[i + 1].length
        else:
            self.cooldown_start = step + self.delay
            event["cooldown"] = self.cooldown
        self.recent = {t: [] for t in self.tasks}
        self.events.append(event)
        return event

    def state_dict(self) -> dict:
        return {"starts": list(self.starts), "cooldown_start": self.cooldown_start,
                "recent": {t: list(v) for t, v in self.recent.items()}, "events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        self.starts = [int(s) for s in state["starts"]]
        self.cooldown_start = state["cooldown_start"]
        self.recent = {t: [float(x) for x in state["recent"].get(t, [])] for t in self.tasks}
        self.events = list(state["events"])


class AdamWBf16(torch.optim.Optimizer):
    """AdamW whose two moments are stored in bf16 and updated in fp32 (rounded once per step).

    Why: a checkpoint must cross into the next device call within the working tree's 64 MiB, so the
    state it carries is fp32 weights plus bf16 moments, 8 bytes a parameter instead of 12. Keeping the
    moments in bf16 during training too (not only in the file) is what makes a resumed run continue
    exactly. With beta2 = 0.95 a step changes the second moment by 5%, well above bf16's 0.4% spacing,
    so the moments do not stall. Elementwise only: deterministic on any device.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["m"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["v"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["m"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["v"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["m"].copy_(m)
                st["v"].copy_(v)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m / (1 - b1 ** t), denom, value=-group["lr"])
        return None


def make_optimizer(model, lr: float, weight_decay: float) -> AdamWBf16:
    """Weight decay on matrices only (not on norms or embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return AdamWBf16([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr)


# --- batches -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchSpec:
    """Everything a worker process needs to build one step's batch (picklable, no torch)."""

    seed: int
    step: int
    length: int
    rows: int
    mix: Tuple[Tuple[str, float], ...]
    kv_dense: int


def queries_for(length: int) -> int:
    """Questions per kv / near row: 8 up to 32K, then one per 4K tokens (32 at 128K), more signal per long row."""
    return int(min(32, max(8, length // 4096)))


def _row_pairs(task: str, length: int, kv_dense: int, rng: np.random.Generator, nq: int) -> int:
    """Pairs of a kv / near row: half the rows between the evaluation's density (one per 64 tokens) and one
    per kv_dense tokens (practice at telling many keys apart), half log-uniform below it down to a few
    (needles far apart, the multi task's shape)."""
    block = (4 if task == "near" else 3) + VALUE_DIGITS  # a question and answer; a pair in the context too
    room = (length - nq * block) // block - 1
    lo = 3 if task == "near" else 2
    hi = max(lo, min(MAX_KEYS, length // kv_dense, room))
    mid = min(hi, max(lo, default_pairs(length)))
    if rng.random() < 0.5:
        return int(rng.integers(mid, hi + 1))
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(mid)))))


def build_batch(spec: BatchSpec) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [rows, length] int32, answer mask [rows, length] bool, task index [rows] int8 of one step."""
    tasks = [t for t, _ in spec.mix]
    weights = np.array([w for _, w in spec.mix])
    ids = np.zeros((spec.rows, spec.length), dtype=np.int32)
    mask = np.zeros((spec.rows, spec.length), dtype=bool)
    kind = np.zeros(spec.rows, dtype=np.int8)
    for r in range(spec.rows):
        pick = np.random.default_rng([spec.seed, 96, spec.step, r])
        task = tasks[int(pick.choice(len(tasks), p=weights))]
        nq = queries_for(spec.length)
        n_pairs = None if task == "passkey" else _row_pairs(task, spec.length, spec.kv_dense, pick, nq)
        i, m = make_training_sequence(task, spec.length, training_rng(spec.seed, spec.step, r), nq, n_pairs)
        ids[r], mask[r], kind[r] = i, m, TRAIN_TASKS.index(task)
    return ids, mask, kind


# --- loss ----------------------------------------------------------------------------------------------

def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, amp: bool):
    """Mean cross-entropy over answer tokens; the LM head runs on those positions alone.

    Returns the loss and, per answer token in row-major order, its loss and whether argmax was right
    (teacher-forced all-correct answers equal greedy exact match)."""
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=amp):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        tgt = mask[:, 1:]
        logits = model.lm_head(hidden[:, :-1][tgt]).float()
    labels = ids[:, 1:][tgt].long()
    # log_softmax + gather rather than F.cross_entropy: nll_loss on CUDA has no deterministic
    # implementation, gather's backward (scatter_add) has one under use_deterministic_algorithms
    per_token = -logits.log_softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return per_token.mean(), per_token.detach(), (logits.detach().argmax(-1) == labels)


def answer_groups(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For the answer tokens of mask[:, 1:] in row-major order: each token's answer (group) id, and each
    group's row. An answer is a run of consecutive answer tokens."""
    tgt = mask[:, 1:]
    starts = tgt & ~np.concatenate([np.zeros((tgt.shape[0], 1), dtype=bool), tgt[:, :-1]], axis=1)
    group_of = np.cumsum(starts.reshape(-1))[tgt.reshape(-1)] - 1
    rows = np.nonzero(starts)[0]
    return group_of, rows


def exact_by_task(mask: np.ndarray, kind: np.ndarray, right: np.ndarray, per_token: np.ndarray) -> Tuple[dict, dict]:
    """Per task: each row's share of exactly right answers, and the mean loss of its answer tokens."""
    group_of, rows = answer_groups(mask)
    n = len(rows)
    wrong = np.zeros(n, dtype=np.int64)
    np.add.at(wrong, group_of, (~right).astype(np.int64))
    row_exact = np.zeros(mask.shape[0])
    row_groups = np.zeros(mask.shape[0])
    np.add.at(row_exact, rows, (wrong == 0).astype(np.float64))
    np.add.at(row_groups, rows, 1)
    token_row = rows[group_of]
    exact, loss = {}, {}
    for ti, task in enumerate(TRAIN_TASKS):
        sel = np.nonzero((kind == ti) & (row_groups > 0))[0]
        if len(sel):
            exact[task] = (row_exact[sel] / row_groups[sel]).tolist()
            loss[task] = float(per_token[np.isin(token_row, sel)].mean())
    return exact, loss


# --- FLOPs and the training plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    """Assumed sustained rates on the device: dense layers, attention (fwd + bwd), per-step overhead."""

    linear_tflops: float = 25.0
    attention_tflops: float = 120.0
    step_overhead_s: float = 0.015


def step_flops(config, length: int, rows: int) -> Tuple[float, float]:
    """(dense, attention) training FLOPs of one step of `rows` rows of `length` tokens.

    Dense: 6 FLOPs per weight per token (2 forward, 4 backward). Attention, causal: a token attends to
    length / 2 keys on average, 4 FLOPs per key and attention channel forward (q.k and p.v), and the
    backward pass costs 2.5 forwards (flash attention recomputes the scores): 7 * length * channels."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = h * q_dim * 2 + h * kv_dim * 2 + 3 * h * config.intermediate_size
    tokens = length * rows
    return 6.0 * per_layer * layers * tokens, 7.0 * length * q_dim * layers * tokens


def step_seconds(config, length: int, rows: int, rate: Throughput) -> float:
    dense, attention = step_flops(config, length, rows)
    return dense / (rate.linear_tflops * 1e12) + attention / (rate.attention_tflops * 1e12) + rate.step_overhead_s


def plan(config, curriculum: Curriculum, rate: Throughput, call_seconds: float) -> List[dict]:
    """Per stage, the seconds its min and max steps take at `rate` (the step shapes the curriculum
    draws), and where the cumulative total lands in calls of `call_seconds` of training each."""
    rows, step, total_lo, total_hi = [], 0, 0.0, 0.0
    for i, stage in enumerate(curriculum.stages):
        probe = Curriculum(curriculum.stages, curriculum.tasks, curriculum.seed, curriculum.tokens_per_step,
                           1.0, 1, 1, 1.0, 1.0, 1, 1)
        probe.starts = [0] * i + [step]
        times = [step_seconds(config, *probe.shape(s), rate) for s in range(step, step + stage.max_steps)]
        top = step_seconds(config, *_top_shape(probe, step), rate)
        lo, hi = sum(times[: stage.min_steps]), sum(times)
        total_lo, total_hi = total_lo + lo, total_hi + hi
        rows.append({"stage": i, "length": stage.length, "top_step_s": round(top, 3),
                     "mean_step_s": round(hi / stage.max_steps, 3), "steps": [stage.min_steps, stage.max_steps],
                     "seconds": [round(lo), round(hi)],
                     "calls_cumulative": [round(total_lo / call_seconds, 2), round(total_hi / call_seconds, 2)]})
        step += stage.min_steps
    return rows


def _top_shape(curriculum: Curriculum, step: int) -> Tuple[int, int]:
    top = curriculum.top_length(step)
    return top, max(1, round(curriculum.tokens_per_step / top))


# --- small helpers shared by the script and its tests ---------------------------------------------------

def rows_exact_mean(exact: Dict[str, List[float]]) -> Dict[str, float]:
    return {t: round(float(np.mean(v)), 3) for t, v in exact.items() if v}


def answer_digits(task: str) -> int:
    return PASSKEY_DIGITS if task == "passkey" else VALUE_DIGITS
