"""Every error tierkv raises on purpose derives from TierKVError, so callers can catch ours alone."""


class TierKVError(Exception):
    """Base of all tierkv errors."""


class ConfigError(TierKVError, ValueError):
    """A configuration value is out of range or of the wrong kind; the message names the field."""


class FormatError(TierKVError, ValueError):
    """A tensor does not fit the chunk format it is being encoded to or decoded from."""


class CorruptChunkError(TierKVError):
    """A persisted chunk failed its checksum, was truncated, or does not decode to what its metadata says."""


class CapacityError(TierKVError):
    """A tier (or the disk under it) has no room for what was asked, even after eviction."""


class FormatVersionError(TierKVError):
    """A persisted store was written by a format version this build does not understand."""


class ChunkNotFoundError(TierKVError, KeyError):
    """No tier holds the requested chunk."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "chunk not found"


class UnsupportedModelError(TierKVError):
    """The model's architecture or attention is not one tierkv can drive."""


class BackendError(TierKVError):
    """A forced kernel backend is not available here."""
