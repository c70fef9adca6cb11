"""A saved `tierkv profile`: its schema, how it is read and checked, and the defaults it gives TierConfig.

This module imports no torch and nothing that does: TierConfig reads a profile through it, and config
must stay importable on its own (the measurements live in tierkv.profiling).

JSON schema (schema "tierkv-profile", schema_version 1); sizes in bytes, times in seconds, rates in GB/s
(1e9 bytes/s):
  schema, schema_version, date (ISO 8601, local time with offset), command (argv),
  versions: {tierkv, python, torch, cuda (torch.version.cuda or null), cupy (or null), numpy, platform}
  git_commit: HEAD of the source tree, or null
  device: {name ("cpu" | "cuda:N"), cuda (bool), gpu_name, gpu_memory_bytes, host_cpus}
  backend: kernel backend in use for CUDA tensors ("ext" | "cupy" | "torch"), or "torch" on the CPU
  backends: {ext, cupy, torch: null if available, else why not}
  settings: {sizes, chunk_lengths, formats, heads, head_dim, group_size, tokens, torch_tokens, disk_dir,
             disk_bytes, min_time_s, max_reps, quick}
  transfers: {available, reason, rows: [{direction ("h2d"|"d2h"), memory ("pinned"|"pageable"), bytes,
             seconds, gbps}]}
  gather: {rows: [{format, backend, source ("device"|"host"), device, chunk_tokens, chunk_bytes, chunks,
           bytes_read, bytes_written, seconds, gbps, read_gbps, tokens_per_s}],
           skipped: [{backend, source, reason}]}
  disk: {available, reason, path, o_direct (null if usable, else why not), rows: [{path ("raw"|"store"),
         op ("write"|"read_warm"|"read_cold"|"read_direct"|"read_cold_parallel"), chunk_bytes, chunks,
         bytes, seconds, gbps, latency_s}]}
  effective: [{format, chunk_tokens, chunk_bytes, tier ("gpu"|"cpu"|"disk"), gbps (null if not
              measured), tokens_per_s, via}]
  recommendations: {default_format, chunk_length: {fmt: int}, prefetch_depth: {fmt: int},
                    chunk_length_default, prefetch_depth_default, plateau_fraction, depth_max,
                    basis: {fmt: {plateau_gbps, chunk_bytes, latency_s, consume_chunks_per_s,
                    disk_chunks_per_s, note}}}

TierConfig(profile=path) reads only `recommendations` (profile_defaults()).
"""

from __future__ import annotations

import json
from typing import Tuple

from .errors import ConfigError

SCHEMA = "tierkv-profile"
SCHEMA_VERSION = 1
SECTIONS = ("device", "backend", "backends", "settings", "transfers", "gather", "disk", "effective", "recommendations")

# What TierConfig uses when no profile says otherwise (and what a profile falls back to for a format it
# did not measure). The planner picks each layer's chunk length among DEFAULT_CHUNK_LENGTHS.
DEFAULT_CHUNK_LENGTHS = (16, 32, 64, 128, 256)
DEFAULT_CHUNK_LENGTH = 64
DEFAULT_PREFETCH_DEPTH = 2
DEFAULT_FORMAT = "bf16"
# planner.BLOCK: the planner measures skew over blocks of this many tokens, so it never plans shorter chunks
MIN_PLANNER_LENGTH = 16


def load(path: str) -> dict:
    """A saved profile, checked to be one; ConfigError naming `profile` otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"profile: {path!r} is not valid JSON ({e}); expected a file saved by `tierkv profile --json`") from None
    except OSError as e:
        raise ConfigError(f"profile: cannot read {path!r}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ConfigError(f"profile: {path!r} is not a tierkv profile (expected \"schema\": \"{SCHEMA}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"profile: {path!r} has schema_version {data.get('schema_version')!r}; this build reads version {SCHEMA_VERSION}"
        )
    validate_recommendations(data.get("recommendations"), path)
    return data


def validate_recommendations(recs, path: str) -> None:
    """ConfigError unless `recs` holds the integers TierConfig reads from a profile."""
    if not isinstance(recs, dict):
        raise ConfigError(f"profile: {path!r} lacks the \"recommendations\" object")
    for name in ("chunk_length_default", "prefetch_depth_default"):
        _check_int(recs.get(name), f"recommendations.{name}", path, 1 if name.startswith("chunk") else 0)
    for name in ("chunk_length", "prefetch_depth"):
        per = recs.get(name)
        if not isinstance(per, dict):
            raise ConfigError(f"profile: {path!r} lacks recommendations.{name} (an object of format -> integer)")
        for fmt, v in per.items():
            _check_int(v, f"recommendations.{name}.{fmt}", path, 1 if name == "chunk_length" else 0)


def _check_int(v, what: str, path: str, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"profile: {path!r} has {what} = {v!r}; expected an integer >= {lo}")


def profile_defaults(path: str, fmt: str) -> Tuple[int, int]:
    """(recommended chunk length, prefetch depth) of the saved profile at `path` for chunk format `fmt`
    (the profile's defaults where it did not measure that format)."""
    recs = load(path)["recommendations"]
    return (recs["chunk_length"].get(fmt, recs["chunk_length_default"]),
            recs["prefetch_depth"].get(fmt, recs["prefetch_depth_default"]))


def lengths_around(length: int) -> Tuple[int, ...]:
    """Planner chunk lengths around a recommended one: length/4 .. 4*length by doubling, none below
    MIN_PLANNER_LENGTH unless the recommendation itself is (64 gives DEFAULT_CHUNK_LENGTHS)."""
    lo = min(length, MIN_PLANNER_LENGTH)
    return tuple(sorted(x for x in {length >> 2, length >> 1, length, length << 1, length << 2} if x >= lo))
