"""`tierkv batch`: answer every request of a JSONL file once, into a JSONL of results, resumably.

    tierkv batch --example results.jsonl                 # the bundled example, shipped model, CPU
    tierkv batch prompts.jsonl results.jsonl --model /models/llama-3-8b --cpu-budget 64GiB \\
        --disk-path /nvme/tierkv --format int4 --summary summary.json
    tierkv batch prompts.jsonl results.jsonl --resume    # after a crash: skip what is done

Input lines: {"id": ..., "prompt": "text" or [token ids], "max_new_tokens": N, "temperature": 0 (greedy),
"top_p", "top_k", "seed", "meta": {...copied to the result}}. Result lines: {"id", "status": "ok" or
"error", "tokens", "text", "finish_reason", "prompt_tokens", "output_tokens", "timings", "batch", "key"}.

Exit status: 0 every request has a result; 1 some requests failed (their results say why; rerun with
--resume --retry-errors); 2 bad input (lines reported and skipped, or fatal with --strict), bad
arguments, or a results file that cannot be used; 130 interrupted (what was written stays: --resume).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from rich.console import Console

from ..config import FORMATS, SCORINGS, SELECTIONS, TierConfig

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_UNSET = object()  # --budget not given (None means "none": every chunk)


def register(sub) -> None:
    p = sub.add_parser("batch", help="generate for every request of a JSONL file, resumably (offline batch)",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1],
                       usage="tierkv batch [options] IN.jsonl OUT.jsonl\n       tierkv batch --example [options] OUT.jsonl")
    p.add_argument("paths", nargs="+", metavar="PATH", help="IN.jsonl (the requests) and OUT.jsonl (the results)")
    p.add_argument("--example", action="store_true", help="read the bundled example input (give only OUT.jsonl)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="DIR", help="local model directory (default: the shipped model)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weights dtype (default bf16)")
    g = p.add_argument_group("cache (TierConfig)")
    g.add_argument("--gpu-budget", default=None, metavar="SIZE", help="gpu tier, e.g. 8GiB (default 1GiB)")
    g.add_argument("--cpu-budget", default=None, metavar="SIZE", help="cpu tier, e.g. 64GiB (default 8GiB)")
    g.add_argument("--disk-path", default=None, metavar="DIR", help="cold tier directory (default: none)")
    g.add_argument("--disk-budget", default=None, metavar="SIZE", help="cold tier budget (default: no limit)")
    g.add_argument("--format", default=None, choices=FORMATS, help="chunk format (default bf16)")
    g.add_argument("--budget", default=_UNSET, type=_budget, metavar="TOKENS|none",
                   help="tokens attended per decode step beyond the hot set; none: every chunk, exact (default 2048)")
    g.add_argument("--sink", type=_nonneg, default=None, metavar="N", help="first tokens kept on the GPU (default 4)")
    g.add_argument("--window", type=_nonneg, default=None, metavar="N", help="last tokens kept on the GPU (default 128)")
    g.add_argument("--chunk-length", type=_positive, default=None, metavar="N", help="fixed chunk length (default: planned)")
    g.add_argument("--scoring", choices=SCORINGS, default=None)
    g.add_argument("--selection", choices=SELECTIONS, default=None)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue OUT: skip ids already done there")
    g.add_argument("--retry-errors", action="store_true", help="with --resume: run failed ids again")
    g.add_argument("--overwrite", action="store_true", help="start OUT over (its results are lost)")
    g.add_argument("--strict", action="store_true", help="any bad input line stops the run before it starts")
    g.add_argument("--stream", action="store_true", help="check and run the input a window at a time")
    g.add_argument("--stream-window", type=_positive, default=1024, metavar="N", help="requests per window (default 1024)")
    g.add_argument("--max-new-tokens", type=_positive, default=None, metavar="N", help="default for requests without one")
    g.add_argument("--batch-size", type=_positive, default=None, metavar="N", help="at most this many sequences a batch")
    g.add_argument("--prefill-chunk", type=_positive, default=None, metavar="TOKENS",
                   help="prompt tokens per row per forward pass (default: 4096 on a GPU, whole prompts on a CPU)")
    g.add_argument("--pad-waste", type=float, default=None, metavar="SHARE", help="padding allowed in a batch, a share (default 0.25)")
    g.add_argument("--summary", default=None, metavar="FILE", help="also write the summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _budget(text: str):
    return None if text.strip().lower() in ("none", "dense", "all") else _nonneg(text)


def _tier(args) -> TierConfig:
    fields = {"gpu_budget": args.gpu_budget, "cpu_budget": args.cpu_budget, "disk_path": args.disk_path,
              "disk_budget": args.disk_budget, "format": args.format, "sink": args.sink, "window": args.window,
              "chunk_length": args.chunk_length, "scoring": args.scoring, "selection": args.selection}
    given = {k: v for k, v in fields.items() if v is not None}
    if args.budget is not _UNSET:
        given["budget"] = args.budget
    return TierConfig(**given)


def run(args) -> int:
    from ..batch import BatchInputError, BatchOptions, example_path, run_batch
    from ..batch.progress import ConsoleReporter, summary_table
    from ..errors import TierKVError

    err = Console(stderr=True, highlight=False, soft_wrap=True)  # a message is one line, however long
    out = Console(highlight=False)
    fail = _failer(err)
    paths = list(args.paths)
    if args.example:
        if len(paths) != 1:
            return fail("with --example give only the results file: tierkv batch --example OUT.jsonl")
        paths.insert(0, str(example_path()))
        err.print(f"input: the bundled example {paths[0]}")
    if len(paths) != 2:
        return fail(f"expected IN.jsonl and OUT.jsonl, got {len(paths)} path(s)")
    src, dst = paths
    if not os.path.isfile(src):
        return fail(f"{src}: no such input file")
    if os.path.abspath(src) == os.path.abspath(dst):
        return fail("the input and the results file are the same file")
    if args.retry_errors and not args.resume:
        return fail("--retry-errors works on a results file being resumed: add --resume")
    try:
        opts = BatchOptions(model=args.model, device=args.device, dtype=args.dtype, tier=_tier(args),
                            resume=args.resume, overwrite=args.overwrite, retry_errors=args.retry_errors,
                            strict=args.strict, stream=args.stream, stream_window=args.stream_window,
                            max_new_tokens=args.max_new_tokens, max_batch=args.batch_size,
                            prefill_chunk=args.prefill_chunk, summary_path=args.summary,
                            **({} if args.pad_waste is None else {"pad_waste": args.pad_waste}))
        opts.check()
        _check_device(args.device)
    except (TierKVError, ValueError) as e:
        return fail(str(e))
    reporter = ConsoleReporter(err, src, bar=not args.quiet)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would interleave with ours
    try:
        summary = run_batch(src, dst, opts, reporter=reporter)
    except BatchInputError as e:
        n = len(e.problems)
        why = "--strict: nothing was generated" if args.strict else "no valid request in it"
        return fail(f"{src}: {n} bad input line{'s' if n != 1 else ''} ({why})")
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted; the results written so far are in {dst}: rerun with --resume to "
                  "continue[/yellow]")
        return EXIT_INTERRUPTED
    except TierKVError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    if not args.quiet:
        out.print(summary_table(summary))
        if args.summary:
            out.print(f"summary written to {args.summary}")
    if summary.bad_lines:
        err.print(f"[red]{summary.bad_lines} bad input line(s) skipped (listed above); exit status 2[/red]")
        return EXIT_BAD_INPUT
    failed = summary.errors + summary.failed_earlier
    if failed:
        err.print(f"[red]{failed} request(s) have failed results ({summary.errors} in this run); their results "
                  "say why (rerun with --resume --retry-errors)[/red]")
        return EXIT_FAILED
    return EXIT_OK


def _failer(err: Console):
    def fail(message: str) -> int:
        err.print(f"[red]tierkv batch: error: {message}[/red]")
        return EXIT_BAD_INPUT

    return fail


def _check_device(arg: Optional[str]) -> None:
    if arg is None:
        return
    import torch

    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {arg!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {arg!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {arg!r}: CUDA is not available on this machine; use --device cpu")
