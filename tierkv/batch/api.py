"""`run_batch`: generate for every request of an input JSONL into a results JSONL, resumably.

    from tierkv.batch import BatchOptions, run_batch
    summary = run_batch("prompts.jsonl", "results.jsonl", BatchOptions(resume=True))

The steps: open (and lock) the results file, recovering a torn last line; load the model; read and
check the whole input (or, with `stream`, a window of it at a time); refuse results made under another
key; plan the batches over every valid request (done or not: see schedule.py); run the batches that
still have pending requests, writing each result the moment its row finishes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Union

import torch

from ..config import TierConfig
from ..errors import CapacityError, ConfigError, UnsupportedModelError
from .errors import BatchInputError, ResultsConflictError, ResultsFileError
from .journal import ResultsJournal
from .model import LoadedModel, load_model, wrap_model
from .progress import Reporter
from .requests import InputReader, InputSpec, Problem, Request
from .results import BatchSummary, cache_digest, error_record, key_difference, ok_record, result_key, versions
from .runner import Runner, RowResult, remove_stale_dirs
from .schedule import DEFAULT_PAD_WASTE, Capacity, plan

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError, CapacityError)
FATAL = (ResultsFileError, UnsupportedModelError, ConfigError)  # they would fail every batch alike


@dataclass
class BatchOptions:
    """How to run. `model`: a local directory (None: the shipped retrieval model); `tier`: the cache's
    TierConfig (None: TierConfig()); `strict`: any bad input line stops the run before anything is
    generated (otherwise bad lines are reported and skipped); `stream`: check and run the input
    `stream_window` requests at a time instead of checking all of it first; `max_new_tokens`: the
    default for requests without one; `max_batch`, `prefill_chunk`, `pad_waste`: see schedule.py."""

    model: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "bf16"
    tier: Optional[TierConfig] = None
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    strict: bool = False
    stream: bool = False
    stream_window: int = 1024
    max_new_tokens: Optional[int] = None
    max_batch: Optional[int] = None
    prefill_chunk: Optional[int] = None
    pad_waste: float = DEFAULT_PAD_WASTE
    summary_path: Optional[str] = None

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite: choose one (continue the results file, or start it over)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        for name in ("stream_window", "max_new_tokens", "max_batch", "prefill_chunk"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.pad_waste, (int, float)) or self.pad_waste < 0:
            raise ConfigError(f"pad_waste: expected a number >= 0, got {self.pad_waste!r}")

    @property
    def mode(self) -> str:
        return "resume" if self.resume or self.retry_errors else "overwrite" if self.overwrite else "new"


def run_batch(input_path: str, output_path: str, options: Optional[BatchOptions] = None, *,
              model: Union[None, LoadedModel, torch.nn.Module] = None, tokenizer=None,
              model_digest: Optional[str] = None, reporter: Optional[Reporter] = None) -> BatchSummary:
    """Run a batch (see the module's docstring). `model` overrides options.model with a loaded model
    object (with `tokenizer` for text prompts and `model_digest` to skip hashing its weights).
    Raises BatchInputError (strict, or nothing valid), ResultsConflictError, ResultsFileError."""
    opts = options or BatchOptions()
    opts.check()
    reporter = reporter or Reporter(input_path)
    t0 = time.perf_counter()
    with open(input_path, "rb"):  # a missing input is an error before the results file is touched
        pass
    with ResultsJournal.open(output_path, opts.mode) as journal:
        for note in journal.notes:
            reporter.note(note)
        lm = _model(opts, model, tokenizer, model_digest)
        session = _Session(lm, opts, journal, reporter, input_path)
        session.summary.load_s = time.perf_counter() - t0
        try:
            session.run(InputReader(input_path, session.spec()))
        except KeyboardInterrupt:
            session.summary.interrupted = True
            raise
        finally:
            session.finish(t0)
            reporter.stop()
            if opts.summary_path:
                session.summary.write(opts.summary_path)
    return session.summary


def _model(opts: BatchOptions, model, tokenizer, digest) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if model is not None:
        return wrap_model(model, tokenizer, digest)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(opts.model, device=device, dtype=DTYPES[opts.dtype])


class _Session:
    """One run: the model, the results file, the plan and the counters."""

    def __init__(self, lm: LoadedModel, opts: BatchOptions, journal: ResultsJournal, reporter: Reporter,
                 input_path: str) -> None:
        self.lm, self.opts, self.journal, self.reporter = lm, opts, journal, reporter
        self.tier = opts.tier or TierConfig()
        self.cache_fp = cache_digest(self.tier)
        self.capacity = Capacity.for_model(lm.model, self.tier, opts.max_batch, opts.prefill_chunk)
        self.runner = Runner(lm, self.tier, self.capacity, status=self._status)
        self.label = ""
        self.summary = BatchSummary(input=input_path, output=journal.path, model=lm.name, model_digest=lm.digest,
                                    device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""),
                                    versions=versions())
        self.problems: List[Problem] = []
        self.batch_offset = 0
        self.t_gen: Optional[float] = None
        for name in remove_stale_dirs(self.tier.disk_path):
            reporter.note(f"removed {name} under {self.tier.disk_path}: left by a batch process that is gone")

    def spec(self) -> InputSpec:
        lm = self.lm
        return InputSpec(lm.encode, lm.vocab_size, lm.max_positions, self.opts.max_new_tokens, lm.no_tokenizer_hint())

    def key(self, r: Request) -> Dict[str, str]:
        return result_key(self.lm.digest, self.cache_fp, r)

    # --- input ----------------------------------------------------------------------------------------
    def run(self, reader: InputReader) -> None:
        if not self.opts.stream:
            requests = [item for item in reader if self._accept(item)]
            if self.problems and (self.opts.strict or not requests):
                raise BatchInputError([str(p) for p in self.problems], self.summary.input)
            self._start(len(requests), requests)
            self.run_window(requests)
            return
        window: List[Request] = []
        for item in reader:
            if self._accept(item):
                window.append(item)
            elif self.opts.strict:  # streamed: the windows before it have run
                raise BatchInputError([str(self.problems[-1])], self.summary.input)
            if len(window) == self.opts.stream_window:
                self._start(None, window)
                self.run_window(window)
                window = []
        if self.problems and not self.summary.requests:
            raise BatchInputError([str(p) for p in self.problems], self.summary.input)
        self._start(None, window)
        self.run_window(window)

    def _accept(self, item) -> bool:
        if isinstance(item, Request):
            self.summary.requests += 1
            return True
        self.problems.append(item)
        self.summary.bad_lines += 1
        self.reporter.problem(item)
        return False

    def _start(self, total: Optional[int], requests: Sequence[Request]) -> None:
        """Reconcile with the results file before the first generation (and each streamed window)."""
        before = self.summary.already_done
        self._reconcile(requests)
        if self.t_gen is None:
            self.t_gen = time.perf_counter()
            if self.lm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.lm.device)
            self.reporter.start(total, self.summary.already_done)
        else:
            self.reporter.skipped(self.summary.already_done - before)

    def _reconcile(self, requests: Sequence[Request]) -> None:
        existing = self.journal.existing
        conflicts, retry = [], []
        for r in requests:
            e = existing.get(r.key)
            if e is None:
                continue
            if e.key != self.key(r):
                conflicts.append((r, e))
            elif e.status == "error" and self.opts.retry_errors:
                retry.append(r.key)
        if conflicts:
            r, e = conflicts[0]
            raise ResultsConflictError(
                f"{self.journal.path}: {len(conflicts)} of the input's ids already have results made with "
                f"{key_difference(e.key, self.key(r))} (first: id {r.key}, line {e.line} of the results, line "
                f"{r.line} of the input); pass --overwrite to start the results over, or write to another file")
        if retry:
            self.summary.retried += self.journal.drop(retry)
            self.reporter.note(f"retrying {len(retry)} failed request(s)")
        done = [self.journal.existing[r.key] for r in requests if r.key in self.journal.existing]
        self.summary.already_done += len(done)
        self.summary.failed_earlier += sum(1 for e in done if e.status == "error")

    # --- batches --------------------------------------------------------------------------------------
    def run_window(self, requests: Sequence[Request]) -> None:
        batches = plan(requests, self.capacity.limit, self.opts.pad_waste)
        for b in batches:
            pending = {m.key for m in b.members if m.key not in self.journal.existing}
            if pending:
                self.label = f"batch {b.index + 1}/{len(batches)} ({len(b)} rows)"
                self._status("")
                self._attempt(self.batch_offset + b.index, list(b.members), pending)
        self.batch_offset += len(batches)

    def _attempt(self, index: int, members: List[Request], pending: Set[str]) -> None:
        """Run the batch; when it does not fit after all, run its unfinished rows in two halves."""
        queue_s = time.perf_counter() - (self.t_gen or time.perf_counter())
        meta = {"index": index, "size": len(members)}
        emitted: Set[str] = set()
        try:
            run = self.runner.run(members, lambda row: self._emit(row, pending, emitted, queue_s, meta))
        except FATAL:
            raise
        except OUT_OF_MEMORY as e:
            left = [m for m in members if m.key in pending and m.key not in emitted]
            _free_memory()
            if len(left) > 1:
                self.reporter.note(f"batch {index}: {type(e).__name__} with {len(members)} rows; running its "
                                   f"{len(left)} unfinished rows in two halves")
                half = len(left) // 2
                self._attempt(index, left[:half], pending)
                self._attempt(index, left[half:], pending)
            else:
                self._fail(left, e, queue_s, meta)
            return
        except Exception as e:  # noqa: BLE001  (a failed batch fails its requests, not the run)
            self._fail([m for m in members if m.key in pending and m.key not in emitted], e, queue_s, meta)
            return
        self.summary.add_batch(run)
        self.summary.batch_sizes.append(len(members))

    def _emit(self, row: RowResult, pending: Set[str], emitted: Set[str], queue_s: float, meta: Dict) -> None:
        r = row.request
        emitted.add(r.key)
        self.summary.prompt_tokens += r.prompt_len
        self.summary.output_tokens += len(row.tokens)
        if r.key not in pending:
            self.summary.recomputed += 1  # already durable: its batch ran again only to stay the same
            return
        self.journal.append(ok_record(row, self.key(r), self._text(row.tokens), queue_s, meta))
        self.summary.ok += 1
        self.reporter.row(len(row.tokens))

    def _fail(self, requests: Sequence[Request], e: BaseException, queue_s: float, meta: Dict) -> None:
        message = f"{type(e).__name__}: {e}".strip()
        if requests:
            self.reporter.note(f"batch {meta['index']}: {len(requests)} request(s) failed: {message}")
        for r in requests:
            self.journal.append(error_record(r, self.key(r), message, queue_s, meta))
            self.summary.errors += 1
            self.reporter.row(0)

    def _status(self, text: str) -> None:
        self.reporter.status(f"{self.label}: {text}" if text else self.label)

    def _text(self, tokens: List[int]) -> Optional[str]:
        if self.lm.decode is None:
            return None
        try:
            return self.lm.decode(tokens)
        except Exception:  # noqa: BLE001  (the tokens are the result; text is a convenience)
            return None

    def finish(self, t0: float) -> None:
        s = self.summary
        s.notes = list(self.reporter.notes)
        if self.lm.device.type == "cuda" and self.t_gen is not None:
            s.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(self.lm.device))
        now = time.perf_counter()
        s.finish(now - self.t_gen if self.t_gen is not None else 0.0, now - t0)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
