"""Rich tables of store statistics, shared by the commands that print them."""

from __future__ import annotations

from rich.table import Table

from ..config import format_size
from ..store import StoreStats


def stats_table(stats: StoreStats, title: str = "tierkv tiers") -> Table:
    t = Table(title=title)
    for col in ("tier", "chunks", "used", "budget", "hits", "misses", "hit rate", "evictions"):
        t.add_column(col, justify="right" if col != "tier" else "left")
    for tier in ("gpu", "cpu", "disk"):
        if tier not in stats.used_bytes:
            continue
        budget = stats.budget_bytes.get(tier)
        t.add_row(
            tier,
            str(stats.resident_chunks.get(tier, 0)),
            format_size(stats.used_bytes[tier]),
            format_size(budget) if budget is not None else "unlimited",
            str(stats.hits.get(tier, 0)),
            str(stats.misses.get(tier, 0)),
            f"{stats.hit_rate(tier):.1%}",
            str(stats.evictions.get(tier, 0)),
        )
    return t


def moved_table(stats: StoreStats) -> Table:
    t = Table(title="bytes moved")
    t.add_column("from -> to")
    t.add_column("bytes", justify="right")
    for pair, n in sorted(stats.bytes_moved.items()):
        t.add_row(pair, format_size(n))
    return t
