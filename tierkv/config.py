"""TierConfig: the one configuration object passed down through tierkv.

Budgets take ints (bytes) or strings such as "512MiB" or "4GiB"; everything is validated here, once,
so the rest of the code can trust the values it is handed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from .errors import ConfigError
from .profiles import DEFAULT_CHUNK_LENGTHS, DEFAULT_PREFETCH_DEPTH, lengths_around, profile_defaults

__all__ = ["TierConfig", "parse_size", "format_size", "FORMATS", "MISS_POLICIES", "SCORINGS", "SELECTIONS",
           "PREDICTIONS", "DEFAULT_CHUNK_LENGTHS", "DEFAULT_PREFETCH_DEPTH"]

# the values each field accepts
FORMATS = ("bf16", "fp16", "int8", "int4", "int2")
MISS_POLICIES = ("wait", "skip")
SCORINGS = ("mass", "bound")
SELECTIONS = ("head", "shared")
PREDICTIONS = ("lookahead", "query")
# fields that None leaves to a saved profile, else to the defaults
AUTO_FIELDS = ("chunk_lengths", "prefetch_depth")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

Size = Union[int, str]


def parse_size(value: Size, field_name: str = "size") -> int:
    """Bytes from an int or a string like "512MiB", "4GiB", "1.5GB" (KiB/MiB/... are binary, KB/MB/... decimal)."""
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a byte count or a size string like '4GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field_name}: expected a non-negative byte count, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{field_name}: expected a byte count or a size string like '4GiB', got {value!r}")
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"{field_name}: cannot read {value!r} as a size; expected e.g. '512MiB', '4GiB' or 1048576")
    number, unit = m.groups()
    mult = _UNITS.get(unit.lower())
    if mult is None:
        raise ConfigError(
            f"{field_name}: unknown unit {unit!r} in {value!r}; expected one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
        )
    n = float(number) * mult
    if not n.is_integer():
        n = int(n)  # fractional bytes round down
    return int(n)


def format_size(n: int) -> str:
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class TierConfig:
    """Budgets, hot set and formats for one offloaded model.

    gpu_budget:   bytes of device memory for the cache of selected chunks (the hot set is extra).
    cpu_budget:   bytes of pinned host memory for the warm tier.
    disk_budget:  bytes on disk for the cold tier (None: no limit but the disk's own).
    disk_path:    directory of the cold tier (None: no disk tier; the cpu tier must hold everything).
    sink:         first tokens of every sequence that always stay on the GPU.
    window:       last tokens of every sequence that always stay on the GPU.
    budget:       tokens attended per query per layer beyond the hot set (None: every chunk, exact).
    format:       chunk encoding: bf16, fp16 (raw), int8, int4, int2 (KIVI).
    group_size:   channels per value quantization group in the integer formats.
    chunk_lengths: the chunk lengths the planner may give a layer (None: auto, see below).
    chunk_length: a fixed chunk length for every layer (None: the planner chooses).
    importance_decay: per-step decay of a chunk's importance for eviction (1.0: never forget).
    miss_policy:  when a selected chunk is not on the GPU or CPU in time: 'wait' or 'skip'.
    scoring:      how chunks are ranked for selection. 'mass': by the attention mass each query head
                  would give the chunk, estimated from 2-bit copies of its keys (KIVI int2 codes over the
                  abstract's per-channel min/max, kept on the GPU: 1/16 of the bf16 KV); 'bound': by the
                  abstract's upper bound of q . k alone (min/max only, no codes). 'mass' covers far more of
                  the attention mass (docs/decisions.md), 'bound' holds less on the GPU.
    selection:    'head': each KV head picks its own top chunks (the most attention mass per head);
                  'shared': the heads of a layer pick one set together, ranked by their summed scores
                  (the same tokens per head). A chunk on disk is one file holding every head, so with
                  'head' a step reads whole files for one head's share of them; 'shared' reads a file
                  for all heads at once (bench/bench_pipeline.py: disk bytes per token fall by up to the
                  number of KV heads), at some cost in the mass covered (bench/eval_quality.py).
    prediction:   how the prefetch pipeline guesses the next layer's chunks while a layer computes.
                  'lookahead': the next layer's own input norm, query projection and rotary embedding
                  applied to the hidden state entering this layer (the residual stream changes little
                  between layers; Llama-shaped models, others fall back to 'query'); 'query': this
                  layer's query scored against the next layer's abstracts.
    write_queue:  depth of the bounded write-behind queue to disk.
    prefetch_depth: chunks per head prefetched ahead of need (None: auto, see below).
    profile:      path of a saved `tierkv profile` JSON whose measurements set defaults.

    Auto fields (left None) are resolved here, so the rest of the code always sees concrete values:
    without a profile, chunk_lengths = DEFAULT_CHUNK_LENGTHS and prefetch_depth = DEFAULT_PREFETCH_DEPTH;
    with one, the profile's recommended prefetch depth for this format and planner lengths around its
    recommended chunk length (profiles.lengths_around). Values set explicitly always win, and stay
    auto / explicit through replace().
    """

    gpu_budget: Size = "1GiB"
    cpu_budget: Size = "8GiB"
    disk_budget: Optional[Size] = None
    disk_path: Optional[str] = None
    sink: int = 4
    window: int = 128
    budget: Optional[int] = 2048
    format: str = "bf16"
    group_size: int = 32
    chunk_lengths: Optional[tuple] = None
    chunk_length: Optional[int] = None
    importance_decay: float = 0.9
    miss_policy: str = "wait"
    scoring: str = "mass"
    selection: str = "head"
    prediction: str = "lookahead"
    write_queue: int = 64
    prefetch_depth: Optional[int] = None
    profile: Optional[str] = None
    # which fields were auto (None) when given: replace() keeps them auto so that a new profile or format
    # resolves them afresh instead of inheriting values resolved from the old ones
    _auto: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("gpu_budget", parse_size(self.gpu_budget, "gpu_budget"))
        set_("cpu_budget", parse_size(self.cpu_budget, "cpu_budget"))
        if self.disk_budget is not None:
            set_("disk_budget", parse_size(self.disk_budget, "disk_budget"))
        _int_at_least("sink", self.sink, 0)
        _int_at_least("window", self.window, 0)
        if self.budget is not None:
            _int_at_least("budget", self.budget, 0)
        _one_of("format", self.format, FORMATS)
        _int_at_least("group_size", self.group_size, 8)
        if self.group_size & (self.group_size - 1) or self.group_size % 8:
            raise ConfigError(f"group_size: expected a power of two >= 8, got {self.group_size}")
        self._resolve_auto(set_)
        if self.chunk_length is not None:
            _int_at_least("chunk_length", self.chunk_length, 1)
        if not isinstance(self.importance_decay, (int, float)) or not 0.0 < self.importance_decay <= 1.0:
            raise ConfigError(f"importance_decay: expected a number in (0, 1], got {self.importance_decay!r}")
        _one_of("miss_policy", self.miss_policy, MISS_POLICIES)
        _one_of("scoring", self.scoring, SCORINGS)
        _one_of("selection", self.selection, SELECTIONS)
        _one_of("prediction", self.prediction, PREDICTIONS)
        _int_at_least("write_queue", self.write_queue, 1)
        _int_at_least("prefetch_depth", self.prefetch_depth, 0)
        if self.disk_path is not None:
            path = os.fspath(self.disk_path)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"disk_path: expected a directory, but {path!r} is a file")
            set_("disk_path", path)

    def _resolve_auto(self, set_) -> None:
        """Fill the auto fields from the profile (or the defaults) and check chunk_lengths."""
        if self.profile is not None and not os.path.isfile(self.profile):
            raise ConfigError(f"profile: no saved profile at {self.profile!r}")
        auto = frozenset(n for n in AUTO_FIELDS if getattr(self, n) is None)
        set_("_auto", auto)
        lengths, depth = DEFAULT_CHUNK_LENGTHS, DEFAULT_PREFETCH_DEPTH
        if self.profile is not None:  # read even when nothing is auto: a broken profile is an error
            length, depth = profile_defaults(self.profile, self.format)
            lengths = lengths_around(length)
        if "chunk_lengths" in auto:
            set_("chunk_lengths", lengths)
        if "prefetch_depth" in auto:
            set_("prefetch_depth", depth)
        if isinstance(self.chunk_lengths, (str, bytes)) or not hasattr(self.chunk_lengths, "__iter__"):
            raise ConfigError(f"chunk_lengths: expected a sequence of positive integers, got {self.chunk_lengths!r}")
        lengths = tuple(self.chunk_lengths)
        if not lengths:
            raise ConfigError("chunk_lengths: expected at least one chunk length")
        for n in lengths:
            _int_at_least("chunk_lengths", n, 1)
        set_("chunk_lengths", tuple(sorted(set(lengths))))

    def replace(self, **changes) -> "TierConfig":
        for name in self._auto:
            changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _int_at_least(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ConfigError(f"{name}: expected an integer >= {lo}, got {value}")
