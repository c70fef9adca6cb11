"""ChunkKey: the name of one chunk everywhere in tierkv (residency map, tiers, files on disk)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_STREAM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "stream") -> str:
    """A name that is safe as one path component: letters, digits, '_', '.', '-', not starting with '.'."""
    if not isinstance(name, str) or not _STREAM_RE.match(name) or ".." in name:
        raise ConfigError(
            f"{what}: {name!r} is not a valid name; expected 1-128 of letters, digits, '_', '.', '-', "
            "not starting with '.' and without '..'"
        )
    return name


@dataclass(frozen=True, order=True)
class ChunkKey:
    """Chunk `index` of layer `layer` of the KV of `stream` (a sequence or conversation id)."""

    stream: str
    layer: int
    index: int

    def __post_init__(self) -> None:
        check_name(self.stream)
        for f in ("layer", "index"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"ChunkKey.{f}: expected a non-negative integer, got {v!r}")
        # keys are hashed in every residency look-up, thousands per decode step: hash once
        object.__setattr__(self, "_hash", hash((self.stream, self.layer, self.index)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        # rebuilt (and re-hashed) on unpickling: string hashes differ between processes
        return (ChunkKey, (self.stream, self.layer, self.index))

    def __str__(self) -> str:
        return f"{self.stream}/L{self.layer}/{self.index}"
