"""tierkv: tiered GPU / CPU / disk KV-cache offloading for LLM inference.

Kept light on import: the disk tier (zarr, lz4) and the transformers integration load on first use.
"""

from ._version import __version__
from .compat import cache_kwarg, cache_kwargs, output_cache
from .config import TierConfig
from .errors import (
    BackendError,
    CapacityError,
    ChunkNotFoundError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    FormatVersionError,
    TierKVError,
    UnsupportedModelError,
)

from .offload import offload  # noqa: E402  (binds the function over the submodule's name)


__all__ = [
    "offload",
    "cache_kwargs",
    "cache_kwarg",
    "output_cache",
    "__version__",
    "TierConfig",
    "TierKVError",
    "ConfigError",
    "FormatError",
    "CorruptChunkError",
    "CapacityError",
    "FormatVersionError",
    "ChunkNotFoundError",
    "UnsupportedModelError",
    "BackendError",
]
