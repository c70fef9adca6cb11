"""Running one batch through tierkv.offload: a left-padded prefill in pieces, then decode steps until
every row has its max_new_tokens or its end-of-sequence token.

Rows keep their place to the end of the batch (a tierkv cache's batch is fixed once it is filled); a
finished row is fed padding, and its result is handed out the moment it finishes, so that it becomes
durable without waiting for the slowest row. Positions count each row's own tokens (the padding takes
none), and the attention mask hides the padding, so a row's tokens do not depend on how much padding
its batch needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from ..compat import cache_kwargs
from ..config import TierConfig
from .model import LoadedModel
from .requests import Request
from .sampling import RowSampler
from .schedule import Capacity

BATCH_DIR_PREFIX = "tierkv-batch-"
CPU_TIER_SLACK = 1.25  # over Capacity.chunk_bytes (which has its own): the tier must never be the one short
CPU_TIER_MIN = 16 << 20


@dataclass
class RowResult:
    request: Request
    tokens: List[int]
    finish_reason: str  # length | eos
    setup_s: float  # of its batch: making the cache and its tiers
    prefill_s: float  # of its batch
    decode_s: float  # from its batch's first decode step to its own last token


@dataclass
class BatchRun:
    """What one batch took: seconds of setup (the cache and its tiers), prefill and decode, decode
    steps, and the store's statistics (bytes moved per tier pair) at its end."""

    setup_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    stats: Optional[object] = None
    finished: List[str] = field(default_factory=list)  # keys of the rows handed out


class Runner:
    def __init__(self, lm: LoadedModel, tier: TierConfig, capacity: Capacity,
                 status: Optional[Callable[[str], None]] = None) -> None:
        self.lm = lm
        self.tier = tier
        self.capacity = capacity
        self.status = status or (lambda text: None)

    def run(self, members: Sequence[Request], emit: Callable[[RowResult], None]) -> BatchRun:
        """Generate for `members` (in this row order); emit(row) as each row finishes."""
        run = BatchRun()
        t0 = time.perf_counter()
        ids, mask, pos = self._inputs(members)
        cfg, disk_dir = self._tier_config(members)
        model = self.lm.model
        try:
            with self._fast(), _offload(model, cfg) as cache, torch.inference_mode():
                run.setup_s = time.perf_counter() - t0
                logits = self._prefill(cache, ids, mask, pos)
                _sync(self.lm.device)
                run.prefill_s = time.perf_counter() - t0 - run.setup_s
                self._decode(cache, members, logits, mask, run, emit)
                run.stats = cache.stats()
        finally:
            if disk_dir is not None:
                shutil.rmtree(disk_dir, ignore_errors=True)
        return run

    def _inputs(self, members: Sequence[Request]):
        B = len(members)
        L = max(r.prompt_len for r in members)
        M = max(r.max_new_tokens for r in members)
        dev = self.lm.device
        ids = torch.full((B, L), self.lm.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L + M), dtype=torch.long)
        for i, r in enumerate(members):
            ids[i, L - r.prompt_len:] = torch.from_numpy(r.tokens).long()
            mask[i, L - r.prompt_len:] = 1
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        return ids.to(dev), mask.to(dev), pos.to(dev)

    def _prefill(self, cache, ids, mask, pos) -> torch.Tensor:
        L = ids.shape[1]
        piece = self.capacity.prefill_piece(L)
        out = None
        for s in range(0, L, piece):
            e = min(L, s + piece)
            self.status(f"prefill {e}/{L} tokens x {ids.shape[0]}")
            out = self.lm.model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e],
                                use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        return out.logits[:, -1]

    def _decode(self, cache, members, logits, mask, run: BatchRun, emit) -> None:
        B, L = len(members), max(r.prompt_len for r in members)
        lengths = torch.tensor([r.prompt_len for r in members], device=mask.device).unsqueeze(1)
        sampler = RowSampler(members)
        tokens: List[List[int]] = [[] for _ in members]
        done = [False] * B
        t0 = time.perf_counter()
        nxt = sampler(logits)
        step = 0
        while True:
            for i, r in enumerate(members):
                if done[i]:
                    continue
                if nxt[i] in self.lm.eos_ids:
                    reason = "eos"
                else:
                    tokens[i].append(nxt[i])
                    reason = "length" if len(tokens[i]) >= r.max_new_tokens else None
                if reason:
                    done[i] = True
                    run.finished.append(r.key)
                    emit(RowResult(r, tokens[i], reason, run.setup_s, run.prefill_s, time.perf_counter() - t0))
            if all(done):
                break
            feed = torch.tensor([[self.lm.pad_id if done[i] else nxt[i]] for i in range(B)], device=mask.device)
            out = self.lm.model(input_ids=feed, attention_mask=mask[:, : L + step + 1], position_ids=lengths + step,
                                use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            nxt = sampler(out.logits[:, -1])
            step += 1
            if step % 16 == 0:
                self.status(f"decode step {step}, {B - sum(done)}/{B} rows running")
        run.steps = step
        run.decode_s = time.perf_counter() - t0

    def _tier_config(self, members: Sequence[Request]):
        """The batch's TierConfig: the cpu tier no larger than the batch's chunks need (on CUDA it is
        page-locked whole when the cache is made, seconds for tens of GiB, once per batch; a batch
        smaller than the budget loses nothing by a tier its size), and with a disk tier a fresh
        directory under disk_path for this batch."""
        seq = max(r.prompt_len + r.max_new_tokens for r in members)
        need = int(CPU_TIER_SLACK * len(members) * self.capacity.chunk_bytes(seq)) + CPU_TIER_MIN
        cfg = self.tier
        if need < cfg.cpu_budget:
            cfg = cfg.replace(cpu_budget=need)
        if cfg.disk_path is None:
            return cfg, None
        os.makedirs(cfg.disk_path, exist_ok=True)
        d = tempfile.mkdtemp(prefix=f"{BATCH_DIR_PREFIX}{os.getpid()}-", dir=cfg.disk_path)
        return cfg.replace(disk_path=d), d

    def _fast(self):
        """On a CPU, bf16/fp16 linears as float32 matmuls (several times faster there; see quality.py)."""
        if self.lm.device.type == "cpu" and self.lm.dtype in (torch.bfloat16, torch.float16):
            from ..quality import float32_linears

            return float32_linears(self.lm.model)
        return nullcontext()


def _offload(model, cfg: TierConfig):
    import tierkv

    return tierkv.offload(model, cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def remove_stale_dirs(disk_path: Optional[str]) -> List[str]:
    """Batch directories under disk_path left by processes that are gone (killed mid-batch)."""
    removed: List[str] = []
    if disk_path is None or not os.path.isdir(disk_path):
        return removed
    for name in sorted(os.listdir(disk_path)):
        if not name.startswith(BATCH_DIR_PREFIX):
            continue
        pid = name[len(BATCH_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(disk_path, name), ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
