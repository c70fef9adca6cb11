"""The attention and mask functions tierkv registers with transformers.

The mask function wraps what the model's own attention implementation would have been given (so the
exact paths can hand it on unchanged) together with the 2-D padding mask (which the sparse path needs
for the positions it picked). The attention function serves layers whose cache is a TierKVCache; for
anything else (no cache, another cache) it is the model's own attention, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import selection
from .layer import cat_tokens

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TierMask:
    original: object  # the model's own mask for its own attention implementation
    padding: Optional[torch.Tensor]  # [B, kv_length] bool, True for real tokens; None: no padding


def make_mask_function(original_mask_fn: Callable) -> Callable:
    def tierkv_mask(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        original = original_mask_fn(*args, attention_mask=attention_mask, **kwargs)
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            padding = attention_mask.to(torch.bool)
        return TierMask(original, padding)

    return tierkv_mask


def make_attention_function(get_cache: Callable, original_fn: Callable) -> Callable:
    def tierkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        original_mask = attention_mask.original if isinstance(attention_mask, TierMask) else attention_mask
        cache = get_cache()
        layer_idx = getattr(module, "layer_idx", None)
        layer = cache.layers[layer_idx] if cache is not None and layer_idx is not None and layer_idx < len(cache.layers) else None
        if layer is None or layer.pending is not key:
            return original_fn(module, query, key, value, original_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.pending = None
        padding = attention_mask.padding if isinstance(attention_mask, TierMask) else None
        out = attend(cache, layer, module, query, original_mask, padding, scaling, dropout, original_fn, kwargs)
        layer.compact()
        if layer.layer_idx == len(cache.layers) - 1:
            cache.end_forward()
        return out

    return tierkv_attention


def attend(cache, layer, module, q, original_mask, padding, scaling, dropout, original_fn, kwargs):
    q_len = q.shape[2]
    if layer.n_chunks == 0 or cache.config.budget is None or q_len > 1:
        # exact: the full sequence, in order, through the model's own attention and mask
        ck, cv = layer.gather_all() if layer.n_chunks else (None, None)
        k = cat_tokens([layer.sink_k, ck, layer.tail_k])
        v = cat_tokens([layer.sink_v, cv, layer.tail_v])
        if layer.length == q_len:
            layer.observe_prefill(q, k, scaling if scaling is not None else module.scaling)
        return original_fn(module, q, k, v, original_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sparse_attend(cache, layer, q, padding, scaling if scaling is not None else q.shape[-1] ** -0.5)


def sparse_attend(cache, layer, q, padding, scaling):
    """One query token: sink + the top-scoring chunks per KV head under the budget + the tail.

    The three parts are laid out in one work buffer [selected chunks | sink | tail]: the kernel decodes
    the chunks straight into the front (a fixed offset, so the gather table's static columns are built
    once), and the hot set sits behind them in one piece, which scoring reads as one slice (no
    concatenation). The order of keys does not matter to attention; positions only matter to the
    padding mask, which is built in the same order.
    """
    k_sel = selection.chunks_in_budget(cache.config.budget, layer.chunk_len, layer.n_chunks)
    K = k_sel * layer.chunk_len  # the chunks' rows, then the sink's, then the tail's
    kw, vw, N = hot_set_behind(cache, layer, K)  # [B, H, >= N, D]
    idx = skipped = None
    if k_sel > 0:
        layer.scaling = scaling
        idx = layer.choose(q, k_sel, hot_keys=kw[:, :, K:N])  # choose: [B, H, k]
        placement = cache.place(layer, q, idx)  # place: where each chosen chunk is read from
        skipped = layer.gather(idx, placement, kw, vw)  # gather: decoded into rows :K
        cache.note_choice(layer, q, idx)
    mask = step_mask(layer, q, idx, skipped, padding, K, N)
    return attend_rows(q, kw[:, :, :N], vw[:, :, :N], mask, scaling)  # attend


def hot_set_behind(cache, layer, K: int):
    """The shared work buffer's K and V [B, H, >= N, D] with the sink and the tail copied to rows K:N
    (N = K + sink + tail), and N."""
    S, T = layer.sink_len, layer.tail_len
    N = K + S + T
    w = cache.passes.work_buffer(layer.batch_size, layer.n_heads, N, layer.head_dim, layer.dtype, layer.device)
    kw, vw = w[0], w[1]
    if S:
        w[:, :, :, K : K + S] = layer.sink
    if layer.tail_in_buffer():
        w[:, :, :, K + S : N] = layer.tail_buffer[:, :, :, :T]
    else:
        kw[:, :, K + S : N] = layer.tail_k
        vw[:, :, K + S : N] = layer.tail_v
    return kw, vw, N


def step_mask(layer, q, idx, skipped, padding, K: int, N: int) -> Optional[torch.Tensor]:
    """The sparse step's attention mask [B, H, 1, N] (None: attend to everything): chunks left out this
    step (miss policy 'skip': their rows are zeros) and padding, in the work buffer's order."""
    B, H = q.shape[0], layer.n_heads
    S, T, L = layer.sink_len, layer.tail_len, layer.chunk_len
    attn_mask = None
    if skipped is not None:
        keep = torch.ones(B, H, 1, N, dtype=torch.bool, device=q.device)
        drop = skipped.unsqueeze(-1).expand(B, H, skipped.shape[-1], L).reshape(B, H, 1, K)
        keep[..., :K] = ~drop
        attn_mask = keep
    if padding is not None:
        pos = []
        if idx is not None:
            within = torch.arange(L, device=q.device)
            pos.append((S + idx.unsqueeze(-1) * L + within).reshape(B, H, K))
        pos.append(torch.arange(S, device=q.device).view(1, 1, S).expand(B, H, S))
        pos.append(torch.arange(layer.length - T, layer.length, device=q.device).view(1, 1, T).expand(B, H, T))
        pos = torch.cat(pos, dim=-1)  # [B, H, N]
        pad = padding.to(q.device).gather(1, pos.reshape(B, -1)).reshape(B, H, 1, -1)
        attn_mask = pad if attn_mask is None else attn_mask & pad
    return attn_mask


def attend_rows(q, k, v, mask, scaling):
    """Attention of q [B, Hq, 1, D] over each KV head's own rows k, v [B, H, N, D]; output [B, 1, Hq, D].

    The g query heads of a KV head attend over that head's own chosen keys: as g query rows of one
    head, which needs no grouped-query support and lets flash attention run; and a fixed backend
    list keeps away from one (cuDNN) that re-plans at every new key length, at milliseconds a call.
    """
    B, Hq, _, D = q.shape
    H = k.shape[1]
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(q.reshape(B, H, Hq // H, D), k, v, attn_mask=mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None
