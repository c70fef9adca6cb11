"""Which requests run together: batches of similar length, as large as the tier budgets allow.

The plan is a pure function of the input (every valid request, done or not), the cache settings and
the device's total memory, never of what is free at the moment or of what a previous run finished.
So a run resumed after a crash cuts the same batches, and recomputes a half-finished one with the same
members in the same rows: its greedy tokens are those the uninterrupted run would have written.

Requests are sorted by (prompt length, max_new_tokens, input line), and a batch takes the next one
while two bounds hold:
  - capacity: the number of sequences of the batch's length that fit (Capacity.limit);
  - padding: every row of a batch is as long as its longest prompt plus its largest max_new_tokens
    (shorter prompts are left-padded, rows that finish early keep their place until the batch ends),
    and those slots may exceed the tokens the rows really need by at most `pad_waste` (a share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..config import TierConfig
from ..formats import ChunkLayout, raw_bytes_per_token
from .requests import Request

DEFAULT_PAD_WASTE = 0.25
CPU_MAX_BATCH = 8  # on a CPU a batch buys little beyond this: the matmuls are already wide enough
GPU_MAX_BATCH = 256
GPU_PREFILL_CHUNK = 4096  # prompt tokens per row per forward pass on a GPU (see Capacity)
DEVICE_RESERVE = 1 << 30  # bytes of device memory kept out of the plan (allocator slack, kernels' workspaces)
UNBOUNDED = 1 << 62
STORE_SLACK = 1.1  # slots are rounded up in the arenas; the planner keeps this much room over the chunks


@dataclass(frozen=True)
class Batch:
    index: int
    members: Tuple[Request, ...]

    @property
    def prompt_len(self) -> int:
        return max(r.prompt_len for r in self.members)

    @property
    def max_new_tokens(self) -> int:
        return max(r.max_new_tokens for r in self.members)

    def __len__(self) -> int:
        return len(self.members)


def plan(requests: Sequence[Request], limit: Callable[[int, int], int],
         pad_waste: float = DEFAULT_PAD_WASTE) -> List[Batch]:
    """Batches over `requests`; limit(prompt_len, max_new_tokens) -> sequences a batch may hold."""
    order = sorted(requests, key=lambda r: (r.prompt_len, r.max_new_tokens, r.line))
    batches: List[Batch] = []
    cur: List[Request] = []
    for r in order:
        if cur and not _fits(cur, r, limit, pad_waste):
            batches.append(Batch(len(batches), tuple(cur)))
            cur = []
        cur.append(r)
    if cur:
        batches.append(Batch(len(batches), tuple(cur)))
    return batches


def _fits(cur: List[Request], r: Request, limit, pad_waste: float) -> bool:
    n = len(cur) + 1
    length = max(r.prompt_len, max(m.prompt_len for m in cur))
    new = max(r.max_new_tokens, max(m.max_new_tokens for m in cur))
    if n > limit(length, new):
        return False
    need = sum(m.prompt_len + m.max_new_tokens for m in cur) + r.prompt_len + r.max_new_tokens
    return n * (length + new) <= (1.0 + pad_waste) * need


@dataclass(frozen=True)
class Capacity:
    """How many sequences a batch may hold, from the budgets and the model's shape.

    Chunk storage: with a disk tier every chunk has its disk copy (the cpu and gpu tiers cache them),
    so the disk budget bounds the batch; without one, the cpu tier must hold every chunk.
    Device memory (CUDA only): the model's weights, the gpu tier's budget, and per sequence its hot set
    (sink + window + a growing tail, 16-bit), chunk abstracts and key codes, plus what one prefill piece
    needs while it runs: a layer's whole K/V gathered for exact attention, the piece's activations and
    its attention mask. On a CPU the batch is capped at CPU_MAX_BATCH instead.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    dtype_bytes: int
    tier: TierConfig
    device_type: str = "cpu"
    device_total: int = 0  # bytes of device memory (CUDA)
    weights: int = 0  # bytes of the model's parameters on the device
    max_batch: Optional[int] = None  # a cap given by the user
    prefill_chunk: Optional[int] = None  # prompt tokens per row per forward pass (None: the whole prompt)

    @classmethod
    def for_model(cls, model, tier: TierConfig, max_batch: Optional[int] = None,
                  prefill_chunk: Optional[int] = None) -> "Capacity":
        import torch

        cfg = model.config
        p = next(model.parameters())
        dev = p.device
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 0
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, n_kv, head_dim, cfg.hidden_size,
                   getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), p.element_size(), tier,
                   dev.type, total, weights, max_batch, prefill_chunk)

    def limit(self, prompt_len: int, max_new: int) -> int:
        cap = self.max_batch or (GPU_MAX_BATCH if self.device_type == "cuda" else CPU_MAX_BATCH)
        seq = prompt_len + max_new
        n = min(cap, self.storage_room() // max(1, self.chunk_bytes(seq)))
        if self.device_type == "cuda":
            n = min(n, self.device_room() // max(1, self.device_bytes(prompt_len, seq)))
        return max(1, int(n))

    def chunk_bytes(self, seq: int) -> int:
        """Bytes of one sequence's chunks in the store (the worst chunk length the planner may pick)."""
        t = self.tier
        lengths = (t.chunk_length,) if t.chunk_length else t.chunk_lengths
        per_token = max(ChunkLayout(t.format, n, self.n_kv_heads, self.head_dim, t.group_size).nbytes / n
                        for n in lengths)
        return int(self.n_layers * seq * per_token * STORE_SLACK)

    def storage_room(self) -> int:
        """Bytes of chunk storage. A disk tier without a budget does not bound the plan: the free
        space changes from run to run, and the plan must not (a full disk fails the batch instead)."""
        t = self.tier
        if t.disk_path is None:
            return t.cpu_budget
        return t.disk_budget if t.disk_budget is not None else UNBOUNDED

    def prefill_piece(self, prompt_len: int) -> int:
        chunk = self.prefill_chunk or (GPU_PREFILL_CHUNK if self.device_type == "cuda" else 0)
        return prompt_len if not chunk else min(chunk, prompt_len)

    def device_bytes(self, prompt_len: int, seq: int) -> int:
        """Device bytes one more sequence takes: what it keeps, and its share of a prefill piece."""
        t = self.tier
        raw = raw_bytes_per_token(self.n_kv_heads, self.head_dim)
        longest = t.chunk_length or max(t.chunk_lengths)
        shortest = t.chunk_length or min(t.chunk_lengths)
        hot = (t.sink + t.window + 2 * longest + 128) * raw
        abstracts = -(-seq // shortest) * self.n_kv_heads * 2 * self.head_dim * self.dtype_bytes
        codes = seq * self.n_kv_heads * self.head_dim // 4 if t.scoring == "mass" else 0
        keep = self.n_layers * (hot + abstracts + codes)
        piece = self.prefill_piece(prompt_len)
        activations = piece * self.dtype_bytes * (6 * self.hidden + 4 * self.intermediate)
        gathered = 3 * seq * raw  # one layer's K/V, decoded and joined to the piece's own
        mask = 2 * piece * seq
        return keep + activations + gathered + mask

    def device_room(self) -> int:
        """Device bytes for the sequences: of the device's total (not what is free now: the plan must
        come out the same in every run), less the weights, the gpu tier and a reserve."""
        return max(0, int(0.9 * self.device_total) - self.weights - self.tier.gpu_budget - DEVICE_RESERVE)


