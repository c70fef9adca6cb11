"""Decoding a layer's chosen chunks into K/V rows: the gather table and the kernel launch.

The gather table has one row per (b, KV head, chosen chunk): (source, byte offset, tokens, output row
of the head, first output token). Only the first two columns change from step to step (they come from
the layer's address table); the rest are built once per shape and kept.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from .. import ops
from ..formats import ChunkLayout


class ChunkGather:
    """One layer's gather: the cached constant columns of its table and its launch plans.

    `store` fences the launch on CUDA (the copies into the slots it reads are done first; the cpu slots
    it reads are not rewritten before it is done); `fast_ext`: launch the compiled extension's op
    straight, without ops.gather's argument checks. `builds`: how often the constant columns were built.
    """

    def __init__(self, store, fast_ext: bool) -> None:
        self.store = store
        self.fast_ext = fast_ext
        self.builds = 0
        self._static = None  # ((k, first row), the table's constant columns, per-head byte offsets)
        self._launch_plans: dict = {}

    def table(self, addresses: torch.Tensor, layout: ChunkLayout, batch: int, kk: int, n0: int, device) -> torch.Tensor:
        """The gather table [B*H*k, 5] for chunk addresses [B, H*k, 2] (source, offset of the chunk), the
        chunks decoded into rows n0 + j*L of each head's output. Rewritten in place: the previous launch
        that read it is earlier on the same stream."""
        table, hoff = self._parts(layout, batch, kk, n0, device)
        torch.add(addresses.reshape(-1, 2), hoff, out=table[:, :2])
        return table

    def _parts(self, layout: ChunkLayout, B: int, kk: int, n0: int, dev) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (kk, n0)
        if self._static is None or self._static[0] != key:
            H, L = layout.n_heads, layout.n_tokens
            b = torch.arange(B, device=dev).view(B, 1, 1).expand(B, H, kk)
            h = torch.arange(H, device=dev).view(1, H, 1).expand(B, H, kk)
            j = torch.arange(kk, device=dev).view(1, 1, kk).expand(B, H, kk)
            base = torch.stack([torch.zeros_like(j), torch.zeros_like(j), torch.full_like(j, L), b * H + h, n0 + j * L], dim=-1)
            hoff = torch.stack([torch.zeros_like(h), h * layout.head_bytes], dim=-1)
            self._static = (key, base.reshape(-1, 5).contiguous(), hoff.reshape(-1, 2).contiguous())
            self.builds += 1
        return self._static[1], self._static[2]

    def launch(self, sources: List[torch.Tensor], table: torch.Tensor, layout: ChunkLayout, k_out: torch.Tensor,
               v_out: torch.Tensor) -> None:
        dev = k_out.device
        if dev.type == "cuda":  # after the copies into cpu slots (ingest) and gpu slots (promotions)
            self.store.wait_inflight(torch.cuda.current_stream(dev))
        if dev.type != "cuda" or not self.fast_ext:
            ops.gather(sources, table, layout.format, layout.head_dim, layout.group_size, k_out, v_out,
                       chunk_tokens=layout.n_tokens)
        else:
            self._launch_ext(sources, table, layout, k_out, v_out)
        if dev.type == "cuda":  # cpu slots it reads are not freed (and rewritten) before it is done
            self.store.note_readers(torch.cuda.current_stream(dev))

    def _launch_ext(self, sources, table, layout: ChunkLayout, k_out, v_out) -> None:
        # the extension op straight: the arguments are ours and known good, and the per-call checks
        # (is every source pinned?) cost more host time than the launch itself
        E, N, D = table.shape[0], k_out.shape[2], layout.head_dim
        plan = self._launch_plans.get((E, N))
        if plan is None:
            g = ops.value_group(layout.format, D, layout.group_size)
            dev = k_out.device
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            plan = (g, tuple(ops.launch_plan(layout.format, E, D, g, N, index, chunk_tokens=layout.n_tokens)))
            self._launch_plans[(E, N)] = plan
        g, shape = plan
        torch.ops.tierkv.gather(sources, table, ops.FMT_CODES[layout.format], D, g, k_out, v_out, *shape)
