"""What a batch writes: one result record per request, and the run's summary.

A result carries the key it was made under: the model's digest (config, dtype and weights), the tierkv
version, a digest of the cache settings that can change tokens, and a digest of the request (prompt
token ids and generation parameters). `--resume` reuses a result only when all four match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .._version import __version__
from ..config import TierConfig
from .journal import fsync_dir
from .requests import Request
from .runner import BatchRun, RowResult

# the TierConfig fields that can change which tokens come out (budgets only move chunks around; with
# miss_policy 'skip' a chunk late from disk is left out, so the policy itself counts)
TOKEN_FIELDS = ("format", "budget", "sink", "window", "group_size", "chunk_length", "chunk_lengths", "scoring",
                "selection", "miss_policy")
KEY_PARTS = {"model": "another model (weights, config or dtype)", "tierkv": "another tierkv version",
             "cache": "other cache settings (format, budget, sink, window, chunk lengths, scoring, selection)",
             "request": "another prompt or other generation parameters"}


def cache_digest(tier: TierConfig) -> str:
    values = {name: getattr(tier, name) for name in TOKEN_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()[:16]


def result_key(model_digest: str, cache: str, req: Request) -> Dict[str, str]:
    return {"model": model_digest, "tierkv": __version__, "cache": cache, "request": req.digest()}


def key_difference(found: Dict[str, str], expected: Dict[str, str]) -> str:
    """Which part of a result's key differs, in words."""
    parts = [p for p in KEY_PARTS if found.get(p) != expected.get(p)]
    return ", ".join(KEY_PARTS[p] for p in parts) or "another key"


def ok_record(row: RowResult, key: Dict[str, str], text: Optional[str], queue_s: float, batch: Dict[str, int]) -> dict:
    r = row.request
    rec: Dict[str, Any] = {
        "id": r.id, "status": "ok", "tokens": row.tokens, "text": text, "finish_reason": row.finish_reason,
        "prompt_tokens": r.prompt_len, "output_tokens": len(row.tokens),
        "timings": {"queue_s": round(queue_s, 4), "setup_s": round(row.setup_s, 4),
                    "prefill_s": round(row.prefill_s, 4), "decode_s": round(row.decode_s, 4)},
        "batch": batch, "key": key,
    }
    if r.meta is not None:
        rec["meta"] = r.meta
    return rec


def error_record(req: Request, key: Dict[str, str], error: str, queue_s: float, batch: Dict[str, int]) -> dict:
    rec: Dict[str, Any] = {"id": req.id, "status": "error", "error": error, "prompt_tokens": req.prompt_len,
                           "timings": {"queue_s": round(queue_s, 4)}, "batch": batch, "key": key}
    if req.meta is not None:
        rec["meta"] = req.meta
    return rec


@dataclass
class BatchSummary:
    """Counts, rates and tier traffic of one `tierkv batch` run (rates over `generate_s`, the time from
    the first batch's start to the last one's end; `elapsed_s` also counts loading and checking)."""

    input: str = ""
    output: str = ""
    model: str = ""
    model_digest: str = ""
    device: str = ""
    dtype: str = ""
    requests: int = 0  # valid requests in the input
    bad_lines: int = 0
    already_done: int = 0  # found in the output file (--resume)
    ok: int = 0  # written by this run
    errors: int = 0
    failed_earlier: int = 0  # of already_done: failed results kept (no --retry-errors)
    recomputed: int = 0  # rows run again only to keep a resumed batch as it was (not written again)
    retried: int = 0  # failed results dropped for --retry-errors
    batches: int = 0
    batch_sizes: List[int] = field(default_factory=list)
    prompt_tokens: int = 0  # of the rows run (written or recomputed), padding excluded
    output_tokens: int = 0
    load_s: float = 0.0
    setup_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generate_s: float = 0.0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    peak_gpu_bytes: Optional[int] = None
    bytes_moved: Dict[str, int] = field(default_factory=dict)
    tier_hits: Dict[str, int] = field(default_factory=dict)
    tier_misses: Dict[str, int] = field(default_factory=dict)
    stall_s: float = 0.0
    notes: List[str] = field(default_factory=list)
    interrupted: bool = False
    versions: Dict[str, str] = field(default_factory=dict)

    def add_batch(self, run: BatchRun) -> None:
        self.batches += 1
        self.setup_s += run.setup_s
        self.prefill_s += run.prefill_s
        self.decode_s += run.decode_s
        s = run.stats
        if s is None:
            return
        for mine, theirs in ((self.bytes_moved, s.bytes_moved), (self.tier_hits, s.hits), (self.tier_misses, s.misses)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + int(v)
        self.stall_s += float(s.stall_seconds)

    def finish(self, generate_s: float, elapsed_s: float) -> None:
        self.generate_s, self.elapsed_s = generate_s, elapsed_s
        if generate_s > 0:
            self.requests_per_s = (self.ok + self.errors) / generate_s
            self.total_tokens_per_s = (self.prompt_tokens + self.output_tokens) / generate_s
            self.output_tokens_per_s = self.output_tokens / generate_s

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str) -> None:
        """As JSON, atomically (a new file renamed over the old), created 0600."""
        path = os.path.abspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (json.dumps(self.to_dict(), indent=1, default=str) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))


def versions() -> Dict[str, str]:
    import torch
    import transformers

    return {"tierkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
