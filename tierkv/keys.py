"""ChunkKey: the name of one chunk everywhere in tierkv (residency map, tiers, files on disk)."""

from __future__ import annotations

import re
from operator import itemgetter

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


class ChunkKey(tuple):
    """Chunk `index` of layer `layer` of the KV of `stream` (a sequence or conversation id).

    A tuple (stream, layer, index), checked when made: keys are hashed and compared in every residency
    look-up, thousands a decode step, and a tuple's hash and equality run in C (a Python __hash__ or
    __eq__ cost more than the look-up itself). Keys order as their tuples do.
    """

    __slots__ = ()

    def __new__(cls, stream: str, layer: int, index: int) -> "ChunkKey":
        check_name(stream)
        for name, v in (("layer", layer), ("index", index)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"ChunkKey.{name}: expected a non-negative integer, got {v!r}")
        return tuple.__new__(cls, (stream, layer, index))

    stream = property(itemgetter(0), doc="the sequence or conversation id")
    layer = property(itemgetter(1), doc="the model layer")
    index = property(itemgetter(2), doc="the chunk's position in the layer")

    def __getnewargs__(self):
        return tuple(self)

    def __repr__(self) -> str:
        return f"ChunkKey(stream={self[0]!r}, layer={self[1]!r}, index={self[2]!r})"

    def __str__(self) -> str:
        return f"{self[0]}/L{self[1]}/{self[2]}"
