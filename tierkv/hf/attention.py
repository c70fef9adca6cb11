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

from .cache import _cat

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
        out = attend(layer, module, query, original_mask, padding, scaling, dropout, original_fn, kwargs)
        layer.compact()
        if layer.layer_idx == len(cache.layers) - 1:
            cache.end_forward()
        return out

    return tierkv_attention


def attend(layer, module, q, original_mask, padding, scaling, dropout, original_fn, kwargs):
    cfg = layer.cache.config
    q_len = q.shape[2]
    if layer.n_chunks == 0 or cfg.budget is None or q_len > 1:
        # exact: the full sequence, in order, through the model's own attention and mask
        if layer.n_chunks:
            ck, cv = layer.gather_all()
        else:
            ck = cv = None
        k = _cat([layer.sink_k, ck, layer.tail_k])
        v = _cat([layer.sink_v, cv, layer.tail_v])
        if layer.length == q_len:
            layer.observe_prefill(q, k, scaling if scaling is not None else module.scaling)
        return original_fn(module, q, k, v, original_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sparse_attend(layer, q, padding, scaling if scaling is not None else q.shape[-1] ** -0.5)


def sparse_attend(layer, q, padding, scaling):
    """One query token: sink + the top-scoring chunks per KV head under the budget + the tail.

    The three parts are laid out in one work buffer [selected chunks | sink | tail]: the kernel decodes
    the chunks straight into the front (a fixed offset, so the gather table's static columns are built
    once), and the hot set sits behind them in one piece, which scoring reads as one slice (no
    concatenation). The order of keys does not matter to attention; positions only matter to the
    padding mask, which is built in the same order.
    """
    cfg = layer.cache.config
    B, Hq, _, D = q.shape
    H, C, L = layer.n_heads, layer.n_chunks, layer.chunk_len
    k_sel = min(cfg.budget // L, C)
    S, T = layer.sink_len, layer.tail_len
    N = S + k_sel * L + T
    w = layer.cache.work_buffer(layer, N)
    kw, vw = w[0], w[1]
    K = k_sel * L  # the chunks' rows, then the sink's, then the tail's
    if S:
        w[:, :, :, K : K + S] = layer.sink
    if layer.tail_in_buffer():
        w[:, :, :, K + S : N] = layer._tbuf[:, :, :, :T]
    else:
        kw[:, :, K + S : N] = layer.tail_k
        vw[:, :, K + S : N] = layer.tail_v
    idx = skipped = None
    if k_sel > 0:
        layer.scaling = scaling
        idx = layer.choose(layer.score(q, hot_keys=kw[:, :, K:N]), k_sel)  # [B, H, k]
        cache = layer.cache
        disk = cache.store.disk is not None
        if disk:
            with cache.host_part("predict"):
                cache.predict_next(layer, q, idx)
        skipped = layer.gather_into(idx, kw, vw, n0=0, wait=cfg.miss_policy == "wait")
        if disk:
            with cache.host_part("issue_prefetch"):
                cache.issue_prefetch()  # the next layer's guesses: read while this layer computes
        layer.note_selection(idx)
        cache.selected_layers.add(layer.layer_idx)
        cache._sparse_pass = True
    attn_mask = None
    if skipped is not None:  # chunks left on disk this step (miss policy 'skip'): their rows are zeros
        keep = torch.ones(B, H, 1, N, dtype=torch.bool, device=q.device)
        drop = skipped.unsqueeze(-1).expand(B, H, k_sel, L).reshape(B, H, 1, k_sel * L)
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
    # The g query heads of a KV head attend over that head's own chosen keys: as g query rows of one
    # head, which needs no grouped-query support and lets flash attention run; and a fixed backend
    # list keeps away from one (cuDNN) that re-plans at every new key length, at milliseconds a call.
    g = Hq // H
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(q.reshape(B, H, g, D), kw[:, :, :N], vw[:, :, :N], attn_mask=attn_mask,
                                             scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None
