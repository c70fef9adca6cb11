"""The disk tier: a front (tier.py) over an index (index.py), a write-behind worker (writer.py) and a
reader (reader.py, files.py), with the file layout in layout.py and the C reader's loader in native.py."""

from .layout import FlushTimeoutError, WriteBehindError
from .tier import DiskStats, DiskTier, DiskTuning, TierClosedError, io_threads

__all__ = ["DiskTier", "DiskStats", "DiskTuning", "WriteBehindError", "FlushTimeoutError", "TierClosedError",
           "io_threads"]
