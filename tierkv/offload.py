"""`tierkv.offload`: run a transformers model with its KV cache in tierkv's tiers.

    with tierkv.offload(model, TierConfig(...)) as cache:
        out = model.generate(input_ids, **tierkv.cache_kwargs(cache), max_new_tokens=64)

On enter the model's attention implementation is swapped for tierkv's (registered with transformers'
AttentionInterface and AttentionMaskInterface under a name of this context's own); on exit, also on an
exception, the model gets its own implementation back and the registrations are removed.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .config import TierConfig
from .errors import ConfigError, UnsupportedModelError
from .pipeline.policies import PipelineTuning
from .store import ChunkStore

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_names = itertools.count()


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by tierkv.offload; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if getattr(cfg, "sliding_window", None) is not None and (
        model_type == "mistral" or getattr(cfg, "use_sliding_window", False)
    ):
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={cfg.sliding_window}) is not supported by tierkv.offload; "
            "set config.sliding_window=None (full attention)"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 8:
        raise UnsupportedModelError(f"head_dim {head_dim} is not a multiple of 8, which tierkv's chunk formats need")


def _original_attention(model, impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl]
    # "eager" is each modeling file's own function
    module = sys.modules[type(model).__module__]
    fn = getattr(module, "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(f"cannot find the attention function {impl!r} of {type(model).__name__}")
    return fn


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def offload(model, config: Optional[TierConfig] = None, *, store: Optional[ChunkStore] = None,
            tuning: Optional[PipelineTuning] = None) -> Iterator:
    """Yield a TierKVCache for `model`; pass it to generate()/forward() with **tierkv.cache_kwargs(cache) (`cache=` on current transformers, `past_key_values=` on 5.17).

    store: a ChunkStore to use (kept open on exit); tuning: the decode pipeline's cadences and thresholds
    (tierkv.pipeline.PipelineTuning; None: the defaults)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from .hf.attention import make_attention_function, make_mask_function
    from .hf.cache import TierKVCache

    if config is None:
        config = TierConfig()
    if not isinstance(config, TierConfig):
        raise ConfigError(f"config: expected a TierConfig, got {type(config).__name__}")
    if tuning is not None and not isinstance(tuning, PipelineTuning):
        raise ConfigError(f"tuning: expected a tierkv.pipeline.PipelineTuning, got {type(tuning).__name__}")
    _check_model(model)
    original_impl = model.config._attn_implementation or "eager"
    if original_impl.startswith("tierkv"):
        raise ConfigError("this model is already inside a tierkv.offload context; nesting is not supported")
    original_fn = _original_attention(model, original_impl)
    original_mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[original_impl] if original_impl in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask

    own_store = store is None
    if own_store:
        store = ChunkStore(config, device=_model_device(model))
        if store.cpu.arena.pinned:  # page-locking is slow: a setup cost, not one of the first request
            store.preallocate()
    cache = TierKVCache(config, model.config.num_hidden_layers, store, tuning=tuning)
    name = f"tierkv_{next(_names)}"
    AttentionInterface.register(name, make_attention_function(lambda: cache, original_fn))
    AttentionMaskInterface.register(name, make_mask_function(original_mask_fn))
    try:
        model.set_attn_implementation(name)
        if config.prediction == "lookahead" and config.disk_path is not None:
            from .hf.lookahead import Lookahead

            cache.lookahead = Lookahead.attach(model)
        yield cache
    finally:
        try:
            model.set_attn_implementation(original_impl)
        finally:
            # transformers has no way to unregister a function but its class-wide mapping
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
            cache.close()
            if own_store:
                store.close()
