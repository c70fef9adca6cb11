"""`tierkv profile`: measure this machine's links (host <-> device, the gather kernel per format and
backend, disk raw and through the store), print them, derive the chunk length and prefetch depth the
runtime should use, and save it all as JSON that TierConfig(profile=...) reads (tierkv.profiling).

    tierkv profile                                   # cuda:0 if there is one, else the CPU
    tierkv profile --quick --json prof.json --plot prof.png
    tierkv profile --device cuda:0 --disk-dir /mnt/nvme --sizes 1MiB 64MiB --chunk-lengths 32 128
    tierkv profile --show prof.json --plot prof.png    # print / draw a saved profile, measuring nothing

Bad arguments exit with status 2 and a message naming the argument (argparse's convention).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import FORMATS, format_size, parse_size
from ..errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure host<->device, kernel and disk bandwidth; recommend chunk length and prefetch depth",
        description="Measure this machine's KV paths and save what the runtime should default to.",
    )
    p.add_argument("--device", type=_device, default="auto",
                   help="cpu, cuda or cuda:N (default: cuda:0 if torch sees a CUDA device, else cpu)")
    p.add_argument("--disk-dir", type=_writable_dir, default=None,
                   help="existing writable directory on the disk to measure (default: the temp directory)")
    p.add_argument("--sizes", type=_sizes, nargs="+", default=None, metavar="SIZE",
                   help="host<->device transfer sizes, e.g. 64KiB 1MiB 16MiB (default 64KiB..256MiB; --quick: 3)")
    p.add_argument("--chunk-lengths", type=_positive_ints, nargs="+", default=None, metavar="TOKENS",
                   help="chunk lengths in tokens for the kernel and disk rows (default 16..1024; --quick: 16 64 256)")
    p.add_argument("--formats", type=_formats, nargs="+", default=None, metavar="FMT",
                   help=f"chunk formats to measure (default all: {' '.join(FORMATS)})")
    p.add_argument("--tokens", type=_positive_int, default=None,
                   help="tokens gathered per kernel measurement (default 32768 on a GPU, 8192 on the CPU; less with --quick)")
    p.add_argument("--heads", type=_positive_int, default=8, help="KV heads per chunk (default 8)")
    p.add_argument("--head-dim", type=_head_dim, default=128, help="head dimension (default 128)")
    p.add_argument("--json", type=_new_file, default=None, metavar="FILE", help="save every measurement as JSON")
    p.add_argument("--plot", type=_new_file, default=None, metavar="FILE",
                   help="draw bandwidth against size per path as a PNG (needs matplotlib: pip install 'tierkv[plot]')")
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (under a minute on a CPU)")
    p.add_argument("--show", type=_existing_file, default=None, metavar="FILE",
                   help="print (and with --plot draw) a profile saved with --json instead of measuring")
    p.set_defaults(func=run)


# --- argument types: argparse turns ArgumentTypeError into "argument --NAME: message", exit 2 -----------
def _device(text: str) -> str:
    import torch

    t = text.strip().lower()
    if t == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if t == "cpu":
        return "cpu"
    if t == "cuda" or t.startswith("cuda:"):
        idx = t[5:] or "0"
        if not idx.isdigit():
            raise argparse.ArgumentTypeError(f"cannot read {text!r} as a device; expected cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA device (use --device cpu)")
        n = torch.cuda.device_count()
        if int(idx) >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: there are {n} CUDA devices (cuda:0..cuda:{n - 1})")
        return f"cuda:{int(idx)}"
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N")


def _writable_dir(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; expected an existing directory")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return path


def _new_file(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file name")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory of {text!r} ({parent}) does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the directory of {text!r} ({parent}) is not writable")
    return path


def _existing_file(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return path


def _sizes(text: str) -> list:
    out = []
    for part in filter(None, text.replace(",", " ").split()):
        try:
            n = parse_size(part, "size")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"expected positive sizes, got {part!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError(f"expected sizes such as 1MiB, got {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _positive_ints(text: str) -> list:
    parts = list(filter(None, text.replace(",", " ").split()))
    if not parts:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return [_positive_int(p) for p in parts]


def _head_dim(text: str) -> int:
    n = _positive_int(text)
    if n % 8 or n > 1024:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 up to 1024, got {text!r}")
    return n


def _formats(text: str) -> list:
    parts = list(filter(None, text.replace(",", " ").split()))
    for p in parts:
        if p not in FORMATS:
            raise argparse.ArgumentTypeError(f"unknown format {p!r}; expected one of {', '.join(FORMATS)}")
    if not parts:
        raise argparse.ArgumentTypeError(f"expected formats, got {text!r}")
    return parts


def _flat(lists):
    return None if lists is None else [x for xs in lists for x in xs]


# --- the command -------------------------------------------------------------------------------------
def run(args) -> int:
    from .. import profiling
    from ..errors import TierKVError

    console = Console()
    err = Console(stderr=True)
    if args.plot is not None and _matplotlib_missing() is not None:
        err.print(f"tierkv profile: error: argument --plot: {_matplotlib_missing()}; "
                  "install it with pip install 'tierkv[plot]' (or matplotlib)", markup=False, highlight=False)
        return 2
    if args.show is not None:
        return _show(args, console, err)
    formats = _flat(args.formats) or list(FORMATS)
    if any(f.startswith("int") for f in formats) and args.head_dim > 32 and args.head_dim % 32:
        err.print(f"tierkv profile: error: argument --head-dim: {args.head_dim} is not a multiple of the integer "
                  "formats' value group of 32 channels", markup=False, highlight=False)
        return 2
    settings = profiling.build_settings(
        args.device, disk_dir=args.disk_dir, quick=args.quick, sizes=_flat(args.sizes),
        chunk_lengths=_flat(args.chunk_lengths), formats=_flat(args.formats), tokens=args.tokens,
        heads=args.heads, head_dim=args.head_dim,
    )
    try:
        profiling.backend_in_use(settings.device)  # raises when TIERKV_BACKEND names one that cannot run
    except TierKVError as e:  # TIERKV_BACKEND names a backend that cannot run here
        err.print(f"tierkv profile: error: {e}", markup=False, highlight=False)
        return 2
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=profiling.total_steps(settings))

        def tick(label: str) -> None:
            progress.update(task, advance=1, description=label)

        result = profiling.run_profile(settings, tick, command=_command(args))
    print_report(console, result)
    if args.json is not None:
        profiling.save(result, args.json)
        console.print(f"saved the profile to {args.json}  (use it with TierConfig(profile={args.json!r}))",
                      markup=False, highlight=False)
    if args.plot is not None:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False)
    return 0


def _show(args, console: Console, err: Console) -> int:
    from .. import profiles

    try:
        result = profiles.load(args.show)
    except ConfigError as e:
        err.print(f"tierkv profile: error: argument --show: {e}", markup=False, highlight=False)
        return 2
    missing = [k for k in profiles.SECTIONS if k not in result]
    if missing:
        err.print(f"tierkv profile: error: argument --show: {args.show!r} lacks {', '.join(missing)}",
                  markup=False, highlight=False)
        return 2
    print_report(console, result)
    if args.plot is not None:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False)
    return 0


def _command(args) -> list:
    """The command line that repeats this run, rebuilt from the parsed arguments (so it is the same
    whether the command came from a shell or from main([...]))."""
    cmd = ["tierkv", "profile", "--device", args.device]
    for flag, value in (("--disk-dir", args.disk_dir), ("--tokens", args.tokens), ("--json", args.json),
                        ("--plot", args.plot)):
        if value is not None:
            cmd += [flag, str(value)]
    for flag, value in (("--sizes", _flat(args.sizes)), ("--chunk-lengths", _flat(args.chunk_lengths)),
                        ("--formats", _flat(args.formats))):
        if value:
            cmd += [flag, *map(str, value)]
    if args.heads != 8:
        cmd += ["--heads", str(args.heads)]
    if args.head_dim != 128:
        cmd += ["--head-dim", str(args.head_dim)]
    if args.quick:
        cmd.append("--quick")
    return cmd


def _matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed ({e})"
    return None


# --- tables ------------------------------------------------------------------------------------------
def _g(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def print_report(console: Console, r: dict) -> None:
    dev = r["device"]
    name = f"{dev['name']} ({dev['gpu_name']})" if dev["cuda"] else "cpu (no CUDA device)"
    avail = [b for b, why in r["backends"].items() if why is None]
    forced = os.environ.get("TIERKV_BACKEND")
    console.print(f"device: {name}   kernel backend in use: [bold]{r['backend']}[/bold]   available: "
                  f"{', '.join(avail)}" + (f"   (TIERKV_BACKEND={forced})" if forced else ""))
    for b, why in r["backends"].items():
        if why is not None:
            console.print(f"  {b}: unavailable - {why}", markup=False, highlight=False, style="dim")
    console.print(transfers_table(r))
    console.print(gather_table(r))
    console.print(disk_table(r))
    console.print(effective_table(r))
    console.print(recommendations_table(r))


def transfers_table(r: dict) -> Table:
    t = Table(title="host <-> device copies (GB/s)")
    t.add_column("size", justify="right")
    cases = [("h2d", "pinned"), ("h2d", "pageable"), ("d2h", "pinned"), ("d2h", "pageable")]
    for d, m in cases:
        t.add_column(f"{d.upper()} {m}", justify="right")
    tr = r["transfers"]
    if not tr["available"]:
        t.add_row("-", *([f"{tr['reason']}"] * len(cases)))
        return t
    by = {(x["bytes"], x["direction"], x["memory"]): x["gbps"] for x in tr["rows"]}
    for size in sorted({x["bytes"] for x in tr["rows"]}):
        t.add_row(format_size(size), *(_g(by.get((size, d, m))) for d, m in cases))
    return t


def gather_table(r: dict) -> Table:
    s = r["settings"]
    t = Table(title="gather + dequantize, bytes read + written (GB/s) by chunk length (tokens); * = in use")
    for col in ("format", "backend", "source"):
        t.add_column(col, no_wrap=True)
    for L in s["chunk_lengths"]:
        t.add_column(str(L), justify="right")
    rows = r["gather"]["rows"]
    keys = list(dict.fromkeys((x["format"], x["backend"], x["source"]) for x in rows))
    by = {(x["format"], x["backend"], x["source"], x["chunk_tokens"]): x["gbps"] for x in rows}
    for fmt, b, src in keys:
        mark = "*" if b == r["backend"] else ""
        t.add_row(fmt, b + mark, src, *(_g(by.get((fmt, b, src, L))) for L in s["chunk_lengths"]))
    if not r["device"]["cuda"]:
        t.add_row("all", "ext/cupy", "device", *(["no CUDA device"] + [""] * (len(s["chunk_lengths"]) - 1)))
    for sk in r["gather"]["skipped"]:
        if sk["reason"] != "no CUDA device":
            t.add_row("", sk["backend"], sk["source"], f"failed: {sk['reason']}")
    return t


DISK_COLS = (("raw", "write"), ("store", "write"), ("raw", "read_warm"), ("store", "read_warm"), ("raw", "read_cold"),
             ("store", "read_cold"), ("raw", "read_direct"), ("store", "read_cold_parallel"))
DISK_LABELS = {"write": "write (fsync)", "read_direct": "read O_DIRECT", "read_cold_parallel": "read cold, read_many"}


def disk_table(r: dict) -> Table:
    d = r["disk"]
    t = Table(title=f"disk at {d['path']}, GB/s of chunk bytes by chunk size (store = DiskTier: lz4 + crc32c)")
    t.add_column("path", no_wrap=True)
    t.add_column("operation", no_wrap=True)
    sizes = sorted({x["chunk_bytes"] for x in d["rows"]})
    for size in sizes:
        t.add_column(format_size(size), justify="right")
    by = {(x["chunk_bytes"], x["path"], x["op"]): x for x in d["rows"]}
    for path, op in DISK_COLS:
        if any((size, path, op) in by for size in sizes):
            t.add_row(path, DISK_LABELS.get(op, op.replace("_", " ")),
                      *(_g(by[(size, path, op)]["gbps"]) if (size, path, op) in by else "-" for size in sizes))
    if any((size, "store", "read_cold") in by for size in sizes):
        t.add_row("store", "cold latency / chunk",
                  *(f"{by[(z, 'store', 'read_cold')]['latency_s'] * 1e6:.0f} us" if (z, "store", "read_cold") in by
                    else "-" for z in sizes))
    notes = [f"O_DIRECT: {d['o_direct']}" if d.get("o_direct") else "", d.get("reason") or ""]
    if any(notes):
        t.caption = "; ".join(n for n in notes if n)
    return t


def effective_table(r: dict) -> Table:
    s = r["settings"]
    t = Table(title="effective chunk fetch per tier (GB/s of packed chunk bytes) by chunk length")
    t.add_column("format", no_wrap=True)
    t.add_column("tier", no_wrap=True)
    for L in s["chunk_lengths"]:
        t.add_column(str(L), justify="right")
    t.add_column("via")
    by = {(x["format"], x["tier"], x["chunk_tokens"]): x for x in r["effective"]}
    for fmt in s["formats"]:
        for tier in ("gpu", "cpu", "disk"):
            cells = [by.get((fmt, tier, L)) for L in s["chunk_lengths"]]
            via = next((c["via"] for c in cells if c), "")
            t.add_row(fmt, tier, *(_g(c["gbps"]) if c else "-" for c in cells), via)
    return t


def recommendations_table(r: dict) -> Table:
    rec = r["recommendations"]
    t = Table(title=f"recommendations (chunk length: smallest reaching {rec['plateau_fraction']:.0%} of the cpu-tier "
                    f"gather plateau; prefetch depth: ceil(min(R_cpu, R_disk) * W)); * = default format")
    for col in ("format", "chunk length", "plateau GB/s", "prefetch depth", "W (cold read)", "R_cpu chunks/s",
                "R_disk chunks/s"):
        t.add_column(col, justify="right" if col != "format" else "left", no_wrap=col == "format")
    for fmt, L in rec["chunk_length"].items():
        b = rec["basis"][fmt]
        t.add_row(fmt + ("*" if fmt == rec["default_format"] else ""), str(L), _g(b["plateau_gbps"]),
                  str(rec["prefetch_depth"][fmt]),
                  f"{b['latency_s'] * 1e6:.0f} us" if b["latency_s"] is not None else "-",
                  f"{b['consume_chunks_per_s']:.0f}" if b["consume_chunks_per_s"] is not None else "-",
                  f"{b['disk_chunks_per_s']:.0f}" if b["disk_chunks_per_s"] is not None else "-")
    return t


# --- plot --------------------------------------------------------------------------------------------
def plot(r: dict, path: str) -> None:
    """A PNG of bandwidth against size for every path: copies, gather (in-use backend), disk, tiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"tierkv profile: {r['device']['gpu_name'] or 'CPU only'} - backend {r['backend']} - {r['date']}")
    _plot_transfers(axes[0][0], r)
    _plot_gather(axes[0][1], r)
    _plot_disk(axes[1][0], r)
    _plot_effective(axes[1][1], r)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _plot_transfers(ax, r: dict) -> None:
    tr = r["transfers"]
    if tr["available"]:
        for d in ("h2d", "d2h"):
            for m in ("pinned", "pageable"):
                pts = sorted((x["bytes"], x["gbps"]) for x in tr["rows"] if x["direction"] == d and x["memory"] == m)
                ax.plot(*zip(*pts), marker="o", label=f"{d.upper()} {m}")
        ax.legend()
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, tr["reason"], ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set(title="host <-> device copies", xlabel="transfer size (bytes)", ylabel="GB/s")


def _plot_gather(ax, r: dict) -> None:
    for x_src, style in (("device", "-"), ("host", "--")):
        for fmt in r["settings"]["formats"]:
            pts = sorted((x["chunk_bytes"], x["gbps"]) for x in r["gather"]["rows"]
                         if x["format"] == fmt and x["source"] == x_src and x["backend"] == r["backend"])
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{fmt} {x_src}")
    ax.set(title=f"gather + dequantize ({r['backend']}), read + written", xlabel="chunk size (bytes)", ylabel="GB/s",
           xscale="log", yscale="log")
    ax.legend(fontsize=7, ncol=2)


def _plot_disk(ax, r: dict) -> None:
    for p, o in DISK_COLS:
        pts = sorted((x["chunk_bytes"], x["gbps"]) for x in r["disk"]["rows"] if x["path"] == p and x["op"] == o)
        if pts:
            ax.plot(*zip(*pts), "-" if p == "store" else ":", marker="o", label=f"{p} {o.replace('_', ' ')}")
    ax.set(title="disk (store = lz4 + crc32c)", xlabel="chunk size (bytes)", ylabel="GB/s", xscale="log", yscale="log")
    ax.legend(fontsize=7)


def _plot_effective(ax, r: dict) -> None:
    fmt = r["recommendations"]["default_format"]
    for f in dict.fromkeys([fmt, "int4"]):
        for tier, style in (("gpu", "-"), ("cpu", "--"), ("disk", ":")):
            pts = sorted((x["chunk_tokens"], x["gbps"]) for x in r["effective"]
                         if x["format"] == f and x["tier"] == tier and x["gbps"])
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{f} {tier}")
    rec = r["recommendations"]["chunk_length"].get(fmt)
    if rec:
        ax.axvline(rec, color="grey", lw=0.8)
        ax.text(rec, ax.get_ylim()[1] if ax.has_data() else 1, f" {fmt}: {rec}", va="top", fontsize=8)
    ax.set(title="effective chunk fetch per tier (packed bytes)", xlabel="chunk length (tokens)", ylabel="GB/s",
           yscale="log")
    ax.set_xscale("log", base=2)
    lengths = r["settings"]["chunk_lengths"]
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    if ax.has_data():
        ax.legend(fontsize=7, loc="center right")
