"""Models that ship inside tierkv: small Llamas trained on long-context retrieval.

The retrieval models exist so that quality can be measured without downloading anything: their attention
is learned, and their tasks (tierkv.models.tasks) fail when the one chunk holding the answer is lost.
- "retrieval": 4 layers, trained to 4K tokens (bench/train_retrieval_model.py);
  tierkv/models/retrieval/{config.json, model.safetensors, README.md}.
- "long": 8 layers, trained by a context curriculum towards 128K (bench/train_long_model.py, resumable
  across device calls); tierkv/models/retrieval_long/, present once trained and exported.
Loading never touches the network: the model is built from the config and the safetensors state dict
(one file, or Hugging Face's shards with model.safetensors.index.json) is loaded into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tierkv.errors import ConfigError, UnsupportedModelError
from tierkv.models.tasks import VOCAB, Vocab

__all__ = ["load_retrieval_model", "retrieval_model_dir", "MODEL_NAMES", "VOCAB", "Vocab"]

# name -> directory under tierkv/models
MODEL_NAMES = {"retrieval": "retrieval", "long": "retrieval_long"}


def retrieval_model_dir(name: str = "retrieval") -> Path:
    """Where a packaged model lives (a plain directory both in a checkout and after `pip install`)."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"model name {name!r} is unknown; expected one of {tuple(MODEL_NAMES)}")
    return Path(__file__).resolve().parent / MODEL_NAMES[name]


def _weight_files(d: Path) -> list:
    """model.safetensors, or the shards a model.safetensors.index.json lists (Hugging Face's layout)."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [f for f in files if not (d / f).is_file()]
        if not files or missing:
            raise ConfigError(f"{index} lists missing or no shards: {missing or files}")
        return [d / f for f in files]
    raise ConfigError(f"retrieval model weights are missing in {d}: expected model.safetensors or "
                      "model.safetensors.index.json (written by bench/train_retrieval_model.py or "
                      "bench/train_long_model.py --export)")


def load_retrieval_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                         attn_implementation: str = "sdpa", path: str | Path | None = None, name: str = "retrieval"):
    """A shipped retrieval model in eval mode, and its vocabulary: `(model, VOCAB)`.

    `attn_implementation` is passed to transformers ("sdpa", or "eager" to get attention probabilities).
    `name` picks a packaged model (MODEL_NAMES); `path` loads another directory written by
    bench/train_retrieval_model.py or bench/train_long_model.py --export instead.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(path) if path is not None else retrieval_model_dir(name)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"retrieval model file {cfg_file} is missing; expected config.json and model.safetensors "
                          "(written by bench/train_retrieval_model.py or bench/train_long_model.py --export)")
    weights = _weight_files(d)
    with open(cfg_file) as f:
        config = LlamaConfig.from_dict(json.load(f), attn_implementation=attn_implementation)
    if config.vocab_size != VOCAB.SIZE:
        raise UnsupportedModelError(f"retrieval model vocab_size {config.vocab_size} does not match the "
                                    f"vocabulary in tierkv.models.tasks ({VOCAB.SIZE})")
    # built on the CPU with a throwaway random init (a few million parameters: milliseconds), then
    # overwritten; the rotary inv_freq buffer is not persistent, so it comes from the config, not the file
    model = LlamaForCausalLM(config)
    state = {}
    for f in weights:
        state.update(load_file(str(f)))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise UnsupportedModelError(f"retrieval weights in {d} do not match config.json: missing "
                                    f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), VOCAB

