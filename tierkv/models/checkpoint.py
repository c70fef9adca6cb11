"""Tensors saved as safetensors shards of bounded size, with an index that checks them on load.

What a training checkpoint that must cross a size limit per file needs (a device call brings back files
of at most 16 MiB): every shard at most `max_bytes`, a tensor larger than that split into pieces along
its flattened elements, the shards' SHA-256 in the index, and the directory replaced whole or not at all
(written under a temporary name, fsynced, renamed), so a kill at any instant leaves the old checkpoint
or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from tierkv.errors import ConfigError

__all__ = ["save_sharded", "load_sharded", "read_index", "MAX_SHARD_BYTES", "INDEX_NAME"]

MAX_SHARD_BYTES = 15 << 20
INDEX_NAME = "index.json"
FORMAT_VERSION = 1
# safetensors' JSON header takes some bytes per tensor beyond the data; kept out of the data budget
HEADER_ROOM = 64 << 10


def _pieces(name: str, t: torch.Tensor, limit: int) -> List[Tuple[str, torch.Tensor]]:
    flat = t.detach().contiguous().reshape(-1)
    per = max(1, limit // max(1, flat.element_size()))
    if flat.numel() <= per:
        return [(name, t.detach().contiguous())]
    return [(f"{name}@{i}", flat[s : s + per].clone()) for i, s in enumerate(range(0, flat.numel(), per))]


def _plan(state: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """Greedy packing, in the state's order, of the tensors (or their pieces) into shards."""
    limit = max_bytes - HEADER_ROOM
    if limit <= 0:
        raise ConfigError(f"max_bytes {max_bytes} is too small for a shard; expected more than {HEADER_ROOM}")
    shards: List[Dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in state.items():
        if "@" in name:
            raise ConfigError(f"tensor name {name!r} contains '@', which marks the pieces of a split tensor")
        for key, piece in _pieces(name, t, limit):
            n = piece.numel() * piece.element_size()
            if used + n > limit and shards[-1]:
                shards.append({})
                used = 0
            shards[-1][key] = piece
            used += n
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(state: Dict[str, torch.Tensor], directory, meta: dict | None = None,
                 max_bytes: int = MAX_SHARD_BYTES, extra_files: Dict[str, str] | None = None) -> List[str]:
    """Write `state` (name -> CPU tensor) and `meta` (JSON) into `directory`, replacing it whole.

    `extra_files`: name -> text, written beside (a config, a log). Returns the files written."""
    from safetensors.torch import save_file

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards, tensors = [], {}
    for i, shard in enumerate(_plan(state, max_bytes)):
        fname = f"shard-{i:05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(tmp / fname))
        shards.append({"file": fname, "bytes": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)})
        for key in shard:
            tensors[key] = i
    shapes = {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for n, t in state.items()}
    index = {"format_version": FORMAT_VERSION, "shards": shards, "tensors": tensors, "shapes": shapes,
             "meta": meta or {}}
    files = {INDEX_NAME: json.dumps(index, indent=1), **(extra_files or {})}
    for name, text in files.items():
        (tmp / name).write_text(text)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return sorted(p.name for p in final.iterdir())


def read_index(directory) -> dict:
    """The checkpoint's index (format version checked); a missing or unknown one is a ConfigError."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} holds no checkpoint: {INDEX_NAME} is missing")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {index.get('format_version')!r}; this tierkv reads {FORMAT_VERSION}")
    return index


def load_sharded(directory, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The tensors and meta that save_sharded wrote; each shard's SHA-256 is checked first (`verify`)."""
    from safetensors.torch import load_file

    d = Path(directory)
    index = read_index(d)
    flat: Dict[str, torch.Tensor] = {}
    for shard in index["shards"]:
        path = d / shard["file"]
        if not path.is_file():
            raise ConfigError(f"checkpoint shard {path} is missing (listed in {d / INDEX_NAME})")
        if verify and _sha256(path) != shard["sha256"]:
            raise ConfigError(f"checkpoint shard {path} does not match its SHA-256 in {INDEX_NAME}: damaged or "
                              "from another checkpoint")
        flat.update(load_file(str(path)))
    state: Dict[str, torch.Tensor] = {}
    for name, info in index["shapes"].items():
        if name in flat:
            state[name] = flat[name]
            continue
        parts = sorted((k for k in flat if k.startswith(name + "@")), key=lambda k: int(k.rsplit("@", 1)[1]))
        if not parts:
            raise ConfigError(f"checkpoint {d} lacks tensor {name!r}")
        state[name] = torch.cat([flat[k] for k in parts]).reshape(info["shape"])
    return state, index["meta"]
