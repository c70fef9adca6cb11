"""The report of bench/eval_quality.py: its JSON, markdown tables, a plot, and the merge of several runs
(one run per context fits a device call; the report covers them all)."""

from __future__ import annotations

import json
from pathlib import Path

RECALL_MEASURES = ("total", "middle", "oracle", "maxkey", "lowbit", "needle_chosen", "kept")


def pair(row: dict) -> tuple:
    return row.get("scoring", "mass"), row.get("selection", "head")


def main_pair(out: dict) -> tuple:
    cfg = out.get("config", {})
    return (cfg.get("scorings") or ["mass"])[0], (cfg.get("selections") or ["head"])[0]


def main_rows(out: dict) -> list:
    """Rows at the run's first (scoring, selection), cpu-tier format only, needles at random depths."""
    first = main_pair(out)
    return [r for r in out["results"] if pair(r) == first and r.get("disk_format") is None and r.get("depth") is None]


def task_label(row: dict) -> str:
    return row["task"] if row.get("depth") is None else f"{row['task']}@{row['depth']:g}"


def write_report(out: dict, json_path, plot_path, log) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
        log(f"wrote {json_path}")
    print_tables(out)
    if plot_path:
        try:
            plot(out, plot_path)
            log(f"wrote {plot_path}")
        except ImportError:
            log("matplotlib is not installed (pip install 'tierkv[plot]'): no plot")


def merge(paths) -> dict:
    """One report of several eval_quality runs (e.g. one per context): rows concatenated, the first run's
    metadata, every run's command and config kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0])
    for key in ("baselines", "results", "sweep", "skipped", "not_run"):
        out[key] = [row for run in runs for row in run.get(key, [])]
    out["merged_from"] = [{"file": str(p), "command": r.get("command"), "git_commit": r.get("git_commit"),
                           "device": r.get("device"), "config": r.get("config"), "wall_s": r.get("wall_s")}
                          for p, r in zip(paths, runs)]
    out["wall_s"] = sum(r.get("wall_s", 0) for r in runs)
    return out


def _cell(r: dict) -> str:
    return f"{100 * r['accuracy']:.0f} ({r['correct']}/{r['prompts']})"


def print_accuracy(out: dict, rows: list, ctxs: list) -> None:
    base = {(b["context"], task_label(b)): b for b in out["baselines"]}
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for task in dict.fromkeys(task_label(r) for r in rows):
        print(f"\n{task}: exact match % (correct / prompts); full = DynamicCache on the same prompts")
        print("| format | budget | " + " | ".join(f"{c} tokens" for c in ctxs) + " |")
        print("|---|---|" + "---:|" * len(ctxs))
        print("| full | - | " + " | ".join(_cell(base[(c, task)]) if (c, task) in base else "-" for c in ctxs) + " |")
        for fmt in dict.fromkeys(r["format"] for r in rows):
            for bud in budgets:
                cells = {r["context"]: r for r in rows if task_label(r) == task and r["format"] == fmt and r["budget"] == bud}
                if cells:
                    print(f"| {fmt} | {bud} | " + " | ".join(_cell(cells[c]) if c in cells else "-" for c in ctxs) + " |")


def print_recall(rows: list, ctxs: list) -> None:
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for what in RECALL_MEASURES:
        print(f"\nattention-mass recall '{what}' (mean over decode queries, layers, query heads), by format")
        print("| task | format | budget | " + " | ".join(f"{c}" for c in ctxs) + " |")
        print("|---|---|---|" + "---:|" * len(ctxs))
        for task in dict.fromkeys(task_label(r) for r in rows):
            for fmt in dict.fromkeys(r["format"] for r in rows):
                for bud in budgets:
                    cells = {r["context"]: r for r in rows if task_label(r) == task and r["format"] == fmt
                             and r["budget"] == bud and r["recall"]}
                    if cells:
                        print(f"| {task} | {fmt} | {bud} | " + " | ".join(
                            f"{cells[c]['recall'].get(what):.3f}" if c in cells and cells[c]["recall"].get(what) is not None
                            else "-" for c in ctxs) + " |")


def print_variants(out: dict) -> None:
    """Every (scoring, selection, disk format) beyond the main one: accuracy, recall and kept share."""
    first = main_pair(out)
    rows = [r for r in out["results"] if (pair(r) != first or r.get("disk_format")) and r["recall"]]
    if not rows:
        return
    print("\nscoring / selection / disk format variants: accuracy (full), recall total, needle chosen, kept")
    print("| context | task | format | budget | scoring | selection | accuracy | total | needle | kept |")
    print("|---:|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        rec, fmt = r["recall"], r["format"] + (f"/{r['disk_format']}" if r.get("disk_format") else "")
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {r['context']} | {task_label(r)} | {fmt} | {r['budget']} | {pair(r)[0]} | {pair(r)[1]} | "
              f"{_cell(r)} ({100 * r['full_accuracy']:.0f}) | {f(rec['total'])} | {f(rec['needle_chosen'])} | "
              f"{f(rec.get('kept'))} |")


def print_kept(rows: list) -> None:
    rows = [r for r in rows if r["recall"] and r["recall"].get("per_layer_kept")]
    if not rows:
        return
    print("\nshare of a step's choice chosen again at the next step, per layer")
    for r in rows:
        layers = " ".join("-" if x is None else f"{x:.2f}" for x in r["recall"]["per_layer_kept"])
        print(f"| {r['context']} | {task_label(r)} | {r['format']} | {r['budget']} | {layers} |")


def print_tables(out: dict) -> None:
    """Markdown tables: accuracy per task (format x budget by context), recall (budget by context), the
    variants, depth rows, per-layer persistence, the sweep."""
    rows = main_rows(out)
    ctxs = list(dict.fromkeys(r["context"] for r in out["results"]))
    print_accuracy(out, rows, ctxs)
    print_recall(rows, ctxs)
    depth_rows = [r for r in out["results"] if r.get("depth") is not None]
    if depth_rows:
        print("\nby needle depth")
        print_accuracy(out, depth_rows, ctxs)
    print_variants(out)
    print_kept(rows)
    print_sweep(out)
    for s in out.get("skipped", []):
        print(f"skipped: {s['context']} {s['cell']}: {s['why']}")
    for s in out.get("not_run", []):
        print(f"not run (--max-seconds): {s}")


def print_sweep(out: dict) -> None:
    if not out.get("sweep"):
        return
    base = {(b["context"], task_label(b)): b for b in out["baselines"]}
    print("\nsweep (int4, ctx/16): variant, accuracy vs full, recall total / middle / oracle / maxkey, per-layer total")
    for r in out["sweep"]:
        rec = r["recall"]
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {r['context']} | {r['task']} | {r['variant']} | {r['correct']}/{r['prompts']} "
              f"(full {base[(r['context'], task_label(r))]['correct']}) | {f(rec['total'])} | {f(rec['middle'])} | "
              f"{f(rec['oracle'])} | {f(rec['maxkey'])} | " + " ".join(f(x) for x in rec["per_layer_total"])
              + (f" | plan {r['plans'][0]}" if r.get("plans") else "") + " |")


# --- the plot ------------------------------------------------------------------------------------------

def _accuracy_panel(ax, out, rows, task, ctx) -> None:
    base = {(b["context"], task_label(b)): b["accuracy"] for b in out["baselines"]}
    labels = []
    for fmt in dict.fromkeys(r["format"] for r in rows):
        cells = [r for r in rows if task_label(r) == task and r["context"] == ctx and r["format"] == fmt]
        labels = [r["budget"] for r in cells] or labels
        ax.plot(range(len(cells)), [100 * r["accuracy"] for r in cells], marker="o", label=fmt)
    if (ctx, task) in base:
        ax.axhline(100 * base[(ctx, task)], color="k", ls="--", lw=1, label="full attention")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(f"{task}, {ctx} tokens")
    ax.set_ylabel("exact match %")
    ax.set_ylim(0, 102)


def _recall_panel(ax, rows, tasks, ctx) -> None:
    fmts = list(dict.fromkeys(r["format"] for r in rows))
    for task, ls in zip(tasks, ("-", ":", "--", "-.")):
        cells = [r for r in rows if task_label(r) == task and r["context"] == ctx and r["recall"]
                 and r["format"] == ("int4" if "int4" in fmts else fmts[0])]
        x = range(1, len(cells) + 1)
        for what, marker, color in (("total", "o", "C0"), ("oracle", "^", "C2"), ("maxkey", "v", "C3"),
                                    ("lowbit", "D", "C4"), ("middle", "s", "C1"), ("kept", "x", "C5")):
            if cells and all(r["recall"].get(what) is not None for r in cells):
                ax.plot(x, [r["recall"][what] for r in cells], ls=ls, marker=marker, color=color, label=f"{task}: {what}")
        ax.set_xticks(list(x), [r["budget"] for r in cells])
    ax.axhline(0.9, color="k", ls="--", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"attention-mass recall and kept share, {ctx} tokens (int4)")
    ax.set_xlabel("budget (tokens beyond the hot set)")


def _variants_panel(ax, out, ctx) -> None:
    rows = [r for r in out["results"] if r["context"] == ctx and r["recall"] and r.get("depth") is None
            and r.get("disk_format") is None and r["format"] == "int4"]
    for (scoring, selection), color in zip(dict.fromkeys(pair(r) for r in rows), ("C0", "C1", "C2", "C3")):
        for task, ls in zip(dict.fromkeys(task_label(r) for r in rows), ("-", ":", "--", "-.")):
            cells = [r for r in rows if pair(r) == (scoring, selection) and task_label(r) == task]
            ax.plot(range(len(cells)), [100 * r["accuracy"] for r in cells], ls=ls, marker="o", color=color,
                    label=f"{scoring}/{selection} {task}")
            ax.set_xticks(range(len(cells)), [r["budget"] for r in cells])
    ax.set_ylim(0, 102)
    ax.set_title(f"int4 by scoring / selection, {ctx} tokens")
    ax.set_ylabel("exact match %")


def plot(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = main_rows(out)
    tasks = list(dict.fromkeys(task_label(r) for r in rows))
    ctxs = list(dict.fromkeys(r["context"] for r in rows))
    n_rows = len(tasks) + 2
    fig, axes = plt.subplots(n_rows, len(ctxs), figsize=(4.6 * len(ctxs), 3.2 * n_rows), squeeze=False)
    for j, ctx in enumerate(ctxs):
        for i, task in enumerate(tasks):
            _accuracy_panel(axes[i][j], out, rows, task, ctx)
        _recall_panel(axes[len(tasks)][j], rows, tasks, ctx)
        _variants_panel(axes[len(tasks) + 1][j], out, ctx)
    axes[0][0].legend(fontsize=7)
    axes[len(tasks)][0].legend(fontsize=5)
    axes[len(tasks) + 1][0].legend(fontsize=5)
    cfg = out["config"]
    fig.suptitle(f"tierkv quality, {out.get('model', 'retrieval model')}: sink {cfg['sink']}, window {cfg['window']}, "
                 f"chunk {cfg['chunk_length']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
