"""Offline batch generation: every request of a JSONL file answered once, resumably, into a JSONL of
results (`tierkv batch IN.jsonl OUT.jsonl`, or run_batch here).

Modules: requests (reading and checking the input), journal (the durable results file), schedule (which
requests run together), runner (one batch through tierkv.offload), sampling, results (records, keys,
summary), progress (what the command shows), api (run_batch, which ties them together).
"""

from __future__ import annotations

from pathlib import Path

from .api import BatchOptions, run_batch
from .errors import BatchInputError, ResultsConflictError, ResultsFileError
from .model import LoadedModel, load_model, wrap_model
from .requests import Request
from .results import BatchSummary

__all__ = ["run_batch", "BatchOptions", "BatchSummary", "BatchInputError", "ResultsConflictError",
           "ResultsFileError", "LoadedModel", "load_model", "wrap_model", "Request", "example_path"]


def example_path() -> Path:
    """The bundled example input: prompts of the shipped model's retrieval tasks (runs on a CPU)."""
    return Path(__file__).resolve().parent / "example.jsonl"
