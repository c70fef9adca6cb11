"""Look-ahead queries: a layer's decode query guessed from the hidden state entering the layer before it.

The residual stream changes little from one decoder layer to the next (each layer adds its attention
and MLP output to it), so layer l+1's own input norm and query projection applied to the hidden state
that entered layer l give a query close to the one layer l+1 will compute, one layer early. Scoring
that guess against layer l+1's abstracts predicts its chunk choice far better than scoring layer l's
own query there (different projections: on random weights that guess is no better than chance), and
it is known while layer l still computes, which is when the disk has to start reading.

Forward pre-hooks on the decoder layers keep the hidden state and the rotary embedding of the current
decode token; nothing is kept for prefill passes. Models whose layers do not have the Llama shape
(input_layernorm, self_attn.q_proj, rotary position_embeddings) get no look-ahead: the cache falls
back to scoring the current layer's query.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from transformers.models.llama.modeling_llama import rotate_half


def decoder_layers(model) -> Optional[List[torch.nn.Module]]:
    """The model's decoder layers when they have the shape the look-ahead needs, else None."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        return None
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if getattr(layer, "input_layernorm", None) is None or getattr(attn, "q_proj", None) is None:
            return None
        if not isinstance(getattr(attn, "head_dim", None), int):
            return None
    return list(layers)


class Lookahead:
    """Holds what the decoder layers were handed in this decode pass and makes look-ahead queries."""

    def __init__(self, layers: List[torch.nn.Module]) -> None:
        self.layers = layers
        self.hidden: List[Optional[torch.Tensor]] = [None] * len(layers)
        self.rope = None  # (cos, sin) of the current pass
        self._handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]

    @classmethod
    def attach(cls, model) -> Optional["Lookahead"]:
        layers = decoder_layers(model)
        return cls(layers) if layers is not None else None

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            pe = kwargs.get("position_embeddings")
            if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[1] != 1 or pe is None:
                self.hidden[i] = None  # prefill, or a call this does not understand: no guess
                return None
            self.hidden[i] = h
            self.rope = pe
            return None

        return hook

    def query(self, target: int, source: int) -> Optional[torch.Tensor]:
        """Layer `target`'s query [B, Hq, 1, D] guessed from the hidden state that entered layer `source`
        in this pass (None when there is none)."""
        if not 0 <= source < len(self.hidden) or not 0 <= target < len(self.layers):
            return None
        h = self.hidden[source]
        if h is None or self.rope is None:
            return None
        layer = self.layers[target]
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.input_layernorm(h)
            B, T, _ = x.shape
            q = attn.q_proj(x).view(B, T, -1, attn.head_dim)
            q_norm = getattr(attn, "q_norm", None)
            if q_norm is not None:
                q = q_norm(q)
            q = q.transpose(1, 2)
            cos, sin = self.rope
            cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
            return q * cos + rotate_half(q) * sin

    def end_pass(self) -> None:
        for i in range(len(self.hidden)):
            self.hidden[i] = None
        self.rope = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.end_pass()
