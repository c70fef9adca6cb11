"""The model a batch runs on: the shipped retrieval model by default, or a local directory.

Besides the model, a batch needs a way to turn text into token ids and back, the model's limits
(positions, end-of-sequence ids, a padding id), and a digest that names the exact weights: results
are keyed on it, so a resume never mixes answers of two models. The digest hashes the weight files'
bytes (config, dtype and every weights file), not their names or dates.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, FrozenSet, List, Optional, Sequence

import torch

from ..errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SHIPPED = "the shipped retrieval model"


@dataclass
class LoadedModel:
    model: Any
    name: str
    digest: str  # 16 hex digits; part of every result's key
    encode: Optional[Callable[[str], List[int]]]  # None: no tokenizer, prompts must be token ids
    decode: Optional[Callable[[Sequence[int]], str]]
    vocab_size: int
    max_positions: Optional[int]
    eos_ids: FrozenSet[int]
    pad_id: int

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.model.parameters()).dtype
        except StopIteration:
            return torch.float32

    def no_tokenizer_hint(self) -> str:
        return f"{self.name} has no tokenizer"


def load_model(path: Optional[str] = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """The shipped model (path None), a directory written by bench/train_retrieval_model.py, or a
    transformers model directory (config, weights and, for text prompts, a tokenizer). Nothing is
    downloaded: a path that is not a local directory is an error."""
    if path is None:
        from ..models import load_retrieval_model, retrieval_model_dir

        model, vocab = load_retrieval_model(device=device, dtype=dtype)
        return _retrieval(model, vocab, SHIPPED, retrieval_model_dir(), dtype)
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ConfigError(f"model {path!r}: not a directory; expected a local model directory (nothing is downloaded)")
    if not (d / "config.json").is_file():
        raise ConfigError(f"model {path!r}: no config.json in it")
    if _is_retrieval_dir(d):
        from ..models import load_retrieval_model

        model, vocab = load_retrieval_model(device=device, dtype=dtype, path=d)
        return _retrieval(model, vocab, str(d), d, dtype)
    return _transformers(d, device, dtype)


def wrap_model(model, tokenizer=None, digest: Optional[str] = None, name: str = "the model") -> LoadedModel:
    """A model object (and optionally a transformers tokenizer) for the Python API. Without `digest`,
    one is computed from the config and every weight's bytes (a copy of the weights to the host)."""
    cfg = model.config
    return LoadedModel(
        model=model, name=name, digest=digest or state_digest(model),
        encode=_encoder(tokenizer), decode=_decoder(tokenizer),
        vocab_size=int(cfg.vocab_size), max_positions=getattr(cfg, "max_position_embeddings", None),
        eos_ids=eos_ids(model), pad_id=pad_id(model, tokenizer))


def _retrieval(model, vocab, name: str, folder: Path, dtype: torch.dtype) -> LoadedModel:
    digest = file_digest([folder / "config.json", folder / "model.safetensors"], dtype)
    return LoadedModel(model=model, name=name, digest=digest, encode=vocab.encode, decode=vocab.decode,
                       vocab_size=len(vocab), max_positions=model.config.max_position_embeddings,
                       eos_ids=eos_ids(model), pad_id=vocab.PAD)


def _is_retrieval_dir(d: Path) -> bool:
    from ..models import VOCAB

    if any((d / f).exists() for f in TOKENIZER_FILES) or not (d / "model.safetensors").is_file():
        return False
    try:
        return json.loads((d / "config.json").read_text()).get("vocab_size") == VOCAB.SIZE
    except (OSError, ValueError):
        return False


def _transformers(d: Path, device, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ConfigError(f"model {str(d)!r}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) in it")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model {str(d)!r}: transformers cannot load it: {e}") from None
    tokenizer = None
    if any((d / f).exists() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model {str(d)!r}: transformers cannot load its tokenizer: {e}") from None
    model = model.to(device).eval()
    extra = [p for p in (d / "generation_config.json",) if p.is_file()]
    digest = file_digest([d / "config.json", *extra, *weights], dtype)
    lm = wrap_model(model, tokenizer, digest=digest, name=str(d))
    return lm


def _encoder(tokenizer) -> Optional[Callable[[str], List[int]]]:
    if tokenizer is None:
        return None
    return lambda text: list(tokenizer.encode(text))


def _decoder(tokenizer) -> Optional[Callable[[Sequence[int]], str]]:
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def eos_ids(model) -> FrozenSet[int]:
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def pad_id(model, tokenizer=None) -> int:
    """A padding id (what the padded positions hold does not matter: the attention mask hides them)."""
    for value in (getattr(model.config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                  min(eos_ids(model), default=None)):
        if isinstance(value, int) and 0 <= value < model.config.vocab_size:
            return value
    return 0


def file_digest(files: Sequence[Path], dtype: torch.dtype) -> str:
    """SHA-256 over the dtype the weights are run in and each file's name and bytes."""
    h = hashlib.sha256(f"dtype={dtype}".encode())
    for f in files:
        h.update(b"\0" + os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@torch.no_grad()
def state_digest(model) -> str:
    """SHA-256 over the config and every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.detach().reshape(-1)
        step = max(1, (64 << 20) // max(1, t.element_size()))
        for s in range(0, flat.numel(), step):
            h.update(flat[s : s + step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
