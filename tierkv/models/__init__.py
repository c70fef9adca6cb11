"""Models that ship inside tierkv. For now one: a small Llama trained on long-context retrieval.

The retrieval model exists so that quality can be measured without downloading anything: its attention
is learned, and its tasks (tierkv.models.tasks) fail when the one chunk holding the answer is lost.
Files: tierkv/models/retrieval/{config.json, model.safetensors, README.md}; they are trained and written by
bench/train_retrieval_model.py. Loading never touches the network: the model is built from the config
and the safetensors state dict is loaded into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tierkv.errors import ConfigError, UnsupportedModelError
from tierkv.models.tasks import VOCAB, Vocab

__all__ = ["load_retrieval_model", "retrieval_model_dir", "VOCAB", "Vocab"]


def retrieval_model_dir() -> Path:
    """Where the packaged weights live (a plain directory both in a checkout and after `pip install`)."""
    return Path(__file__).resolve().parent / "retrieval"


def load_retrieval_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                         attn_implementation: str = "sdpa", path: str | Path | None = None):
    """The shipped retrieval model in eval mode, and its vocabulary: `(model, VOCAB)`.

    `attn_implementation` is passed to transformers ("sdpa", or "eager" to get attention probabilities).
    `path` loads another directory written by bench/train_retrieval_model.py instead of the packaged one.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(path) if path is not None else retrieval_model_dir()
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ConfigError(f"retrieval model file {f} is missing; expected config.json and model.safetensors "
                              "(written by bench/train_retrieval_model.py)")
    with open(cfg_file) as f:
        config = LlamaConfig.from_dict(json.load(f), attn_implementation=attn_implementation)
    if config.vocab_size != VOCAB.SIZE:
        raise UnsupportedModelError(f"retrieval model vocab_size {config.vocab_size} does not match the "
                                    f"vocabulary in tierkv.models.tasks ({VOCAB.SIZE})")
    # built on the CPU with a throwaway random init (a few million parameters: milliseconds), then
    # overwritten; the rotary inv_freq buffer is not persistent, so it comes from the config, not the file
    model = LlamaForCausalLM(config)
    state = load_file(str(weights))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise UnsupportedModelError(f"retrieval weights in {weights} do not match config.json: missing "
                                    f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), VOCAB

