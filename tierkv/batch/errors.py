"""Errors of `tierkv batch`; each is a TierKVError, so callers can catch tierkv's own errors alone."""

from __future__ import annotations

from typing import List, Sequence

from ..errors import TierKVError


class BatchInputError(TierKVError, ValueError):
    """The input JSONL has lines that cannot be run; `problems` holds one message per bad line."""

    def __init__(self, problems: Sequence[str], path: str = "") -> None:
        self.problems: List[str] = list(problems)
        self.path = path
        head = self.problems[0] if self.problems else "bad input"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"{path + ': ' if path else ''}{head}{more}")


class ResultsConflictError(TierKVError):
    """The output file holds results made with another model, tierkv version, cache settings or request
    than the current run would use: resuming into it would mix them."""


class ResultsFileError(TierKVError):
    """The output file cannot be used: it exists without --resume, is damaged before its last line, is
    being written by another process, or a write to it failed."""
