"""What a batch run shows while it works: problems and notes as lines, and a progress bar of records
(done of total, output tokens/s, elapsed, ETA) with what the current batch is doing beside it."""

from __future__ import annotations

import time
from typing import List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..config import format_size
from .requests import Problem
from .results import BatchSummary


class Reporter:
    """Collects notes and problems and shows nothing (the Python API's default)."""

    def __init__(self, input_name: str = "") -> None:
        self.input_name = input_name
        self.notes: List[str] = []
        self.problems: List[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def problem(self, p: Problem) -> None:
        self.problems.append(f"{self.input_name}: {p}" if self.input_name else str(p))

    def start(self, total: Optional[int], done: int) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def skipped(self, n: int) -> None:
        """n more requests found done already (a streamed window's share of a resumed file)."""

    def row(self, output_tokens: int) -> None:
        pass

    def stop(self) -> None:
        pass


class ConsoleReporter(Reporter):
    """Prints to a (stderr) console: each note and problem as it comes, and a live progress bar."""

    def __init__(self, console: Console, input_name: str = "", bar: bool = True) -> None:
        super().__init__(input_name)
        self.console = console
        self.bar = bar
        self._progress: Optional[Progress] = None
        self._task = None
        self._t0 = 0.0
        self._tokens = 0

    def note(self, text: str) -> None:
        super().note(text)
        self.console.print(f"[yellow]{text}[/yellow]", highlight=False)

    def problem(self, p: Problem) -> None:
        super().problem(p)
        self.console.print(f"[red]{self.problems[-1]}[/red]", highlight=False)

    def start(self, total: Optional[int], done: int) -> None:
        self._t0 = time.perf_counter()
        if not self.bar:
            return
        self._progress = Progress(
            TextColumn("[bold]records"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[what]}"),
            console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("records", total=total, completed=done, tps="", what="")

    def status(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, what=text)

    def skipped(self, n: int) -> None:
        if self._progress is not None and n:
            self._progress.update(self._task, advance=n)

    def row(self, output_tokens: int) -> None:
        self._tokens += output_tokens
        if self._progress is not None:
            rate = self._tokens / max(1e-9, time.perf_counter() - self._t0)
            self._progress.update(self._task, advance=1, tps=f"{rate:,.1f} out tok/s")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, what="")
            self._progress.stop()
            self._progress = None


def summary_table(s: BatchSummary) -> Table:
    t = Table(title="tierkv batch", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("requests in input", f"{s.requests}" + (f" (+{s.bad_lines} bad lines skipped)" if s.bad_lines else "")),
        ("already done (resumed)", str(s.already_done) + (f" ({s.failed_earlier} failed)" if s.failed_earlier else "")),
        ("written now: ok / error", f"{s.ok} / {s.errors}"),
        ("batches run (sizes)", f"{s.batches} ({_sizes(s.batch_sizes)})"),
        ("time: load / generate / total", f"{s.load_s:.1f} s / {s.generate_s:.1f} s / {s.elapsed_s:.1f} s"),
        ("time in batches: setup / prefill / decode", f"{s.setup_s:.1f} s / {s.prefill_s:.1f} s / {s.decode_s:.1f} s"),
        ("requests/s", f"{s.requests_per_s:.3f}"),
        ("tokens/s: total / output", f"{s.total_tokens_per_s:,.1f} / {s.output_tokens_per_s:,.1f}"),
        ("tokens: prompt / output", f"{s.prompt_tokens:,} / {s.output_tokens:,}"),
    ]
    if s.recomputed:
        rows.append(("rows recomputed to keep a resumed batch whole", str(s.recomputed)))
    if s.peak_gpu_bytes is not None:
        rows.append(("peak GPU memory", format_size(s.peak_gpu_bytes)))
    for pair, n in sorted(s.bytes_moved.items()):
        rows.append((f"bytes moved {pair}", format_size(n)))
    for what, value in rows:
        t.add_row(what, value)
    return t


def _sizes(sizes: List[int]) -> str:
    if not sizes:
        return "-"
    if len(sizes) <= 8:
        return " ".join(map(str, sizes))
    return f"{min(sizes)}-{max(sizes)}, mean {sum(sizes) / len(sizes):.1f}"
