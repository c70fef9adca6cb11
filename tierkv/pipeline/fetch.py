"""The fetcher: where each chunk a layer chose is read from this step, and getting it there.

A layer hands the fetcher its chunk table and its choice and gets back a Placement: the sources the
gather reads and the address rows to write before it. A chosen chunk is read from a memory tier where
the store holds it; a chunk that lives on disk only is read from its staging slot (the prefetcher
staged it), from a pinned buffer of this step (read now, while the step waits: miss policy 'wait'), or
it is left out of this step (policy 'skip': a zero chunk stands in, and it is queued for the next).

The fetcher owns everything between the layer and the disk tier: the Prefetcher and its staging
arena, this step's direct reads and their buffers, the installs of what was read into the memory
tiers (ranked by value, store.add_copies, behind the admission gate), and the reads of the next
layer's guessed chunks. The HF layer never sees the disk tier or the prefetcher.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..formats import ChunkLayout
from ..tiers.arena import round_up
from .installs import Installs
from .policies import PipelineTuning
from .prefetcher import Prefetcher
from .timers import HostTimers

Row = Tuple[int, int, int]  # (index into the sources, byte offset, 1 if that copy is in the gpu tier)


@dataclass
class Placement:
    """Where one layer's chosen chunks are read from this step.

    sources: the tensors the gather reads: the store's tier segments, then (when a chosen chunk lives
        on disk only) the staging arena's segments, the zero chunk and this step's read buffers.
    rows: address rows {b * capacity + c: Row} to write into the layer's table before the gather: the
        chunks the store moved since the table last looked, and those placed for this step only.
    skip_source: the zero chunk's index in sources when chunks were left out ('skip'), else None.
    """

    sources: List[torch.Tensor]
    rows: Dict[int, Row] = field(default_factory=dict)
    skip_source: Optional[int] = None


class _DirectReads:
    """This step's reads of chunks nobody staged: each batch into one pinned buffer, on the disk tier's
    reader threads (the C reader holds no GIL), started before anything else is done."""

    def __init__(self, disk, nbytes: int, pinned: bool) -> None:
        self.disk, self.nbytes, self.pinned = disk, nbytes, pinned
        self.stride = round_up(nbytes)
        self.batches = []  # (chunks, buffer, its views, keys, wait for the reads)

    def start(self, pairs, keys) -> None:
        buf = torch.empty(self.stride * len(pairs), dtype=torch.uint8, pin_memory=self.pinned)
        bkeys = [keys[b][c] for b, c in pairs]
        wait_reads = self.disk.read_into_async(bkeys, buf, self.stride)
        views = buf.view(len(pairs), self.stride).narrow(1, 0, self.nbytes).unbind(0)  # one C++ loop, not one slice each
        self.batches.append((pairs, buf, views, bkeys, wait_reads))

    def place(self, placement: Placement, cap: int, keep_alive) -> None:
        """Point the chunks at where they will be once read (their buffers kept until the pass ends)."""
        for pairs, buf, *_ in self.batches:
            keep_alive(buf)
            placement.sources.append(buf)
            src = len(placement.sources) - 1
            for i, (b, c) in enumerate(pairs):
                placement.rows[b * cap + c] = (src, i * self.stride, 0)

    def wait(self) -> None:
        for *_, wait_reads in self.batches:
            wait_reads()


class Fetcher:
    """Places the layers' chosen chunks (see the module docstring). One per cache; `n_layers` sizes the
    staging arena for a pass of guesses. `installs`: what was read, on its way into the memory tiers.
    `disk_entries` / `skipped_entries`: gather entries (one per KV head per chunk) read from disk / left
    out, counted on the host."""

    def __init__(self, store, config, n_layers: int, timers: Optional[HostTimers] = None,
                 tuning: Optional[PipelineTuning] = None) -> None:
        self.store, self.config, self.n_layers = store, config, n_layers
        self.tuning = tuning or PipelineTuning()
        self.timers = timers or HostTimers()
        self.installs = Installs(store, self.timers, self.tuning)
        self.disk_entries = 0
        self.skipped_entries = 0
        self._prefetcher: Optional[Prefetcher] = None
        self._guess = None  # (table, its guessed chunks on disk, event): set by expect, read by issue_prefetch
        self._alive: list = []  # host buffers a kernel may read until the end of the pass
        self._zero: Optional[torch.Tensor] = None
        self._sources: Optional[List[torch.Tensor]] = None

    @property
    def prefetcher(self) -> Optional[Prefetcher]:
        """The staging workers, once a chunk was read from disk (None before)."""
        return self._prefetcher

    # --- placing a layer's choice ---------------------------------------------------------------------
    def place(self, table, idx: torch.Tensor, wait: bool, every: bool = False) -> Placement:
        """Where each chunk idx [B, H, k] of `table`'s layer is read from this step.

        `wait` (miss policy 'wait', and always for exact attention): chunks on disk only are read now
        if not staged; without it they are left out of this step. `every`: idx is every chunk for every
        head (exact attention), which says nothing about which chunks matter.
        """
        self.installs.install(layer=table.layer_idx)  # chunks this layer read before: offered first
        rows = {}
        if table.dirty:
            with self.timers.part("refresh"):
                rows = table.refresh_rows()
        placement = Placement(self.sources(), rows)
        if table.disk_only:
            with self.timers.part("stage_from_disk"):
                self._stage(table, idx, placement, wait, every)
        return placement

    def sources(self) -> List[torch.Tensor]:
        """The store's sources, cached until a tier adds a segment (a fresh list each call: callers append)."""
        n = self.store.n_sources()
        if self._sources is None or len(self._sources) != n:
            self._sources = self.store.sources()
        return list(self._sources)

    def _chosen_on_disk(self, table, idx: torch.Tensor, every: bool):
        """({(b, c): gather entries} of the chosen chunks on disk only, per row the chosen chunks or None).

        Which chunks are on disk only is known on the host (table.disk_only), so the one host sync here
        is the copy of a sparse choice; with `every` there is none.
        """
        B, H, kk = idx.shape
        if every:
            return dict.fromkeys(sorted(table.disk_only), H), None  # one gather entry per head
        with self.timers.device_wait():
            chosen = idx.reshape(B, H * kk).tolist()  # waits for the device to have chosen
        per_row = [Counter(row) for row in chosen]  # per chunk chosen, the heads that chose it
        disk_only = table.disk_only
        return {(b, c): n for b in range(B) for c, n in per_row[b].items() if (b, c) in disk_only}, per_row

    def _stage(self, table, idx: torch.Tensor, placement: Placement, wait: bool, every: bool) -> None:
        """Place the chosen chunks that live on disk only: staged, read now into a pinned buffer (with
        `wait`, the time waited counted as stall), or left out (zero chunk). Their places hold for this
        step only: they are marked dirty, so the next refresh points them back at wherever the store
        then holds them. While this step's reads are in flight, the host installs the chunks earlier
        layers read from disk, never evicting one this layer chose: that work and the disk overlap.
        The chosen chunks are touched (their value rises), so installs keep them."""
        counts, per_row = self._chosen_on_disk(table, idx, every)
        keys = table.keys
        want = sorted(counts)
        if not want:
            self._touch_chosen(keys, per_row)
            return
        nb = table.layout.nbytes
        pf = self._prefetcher_for(table)
        reads = _DirectReads(self.store.disk, nb, pinned=table.device.type == "cuda")
        staged = pf.staged([keys[b][c] for b, c in want])
        if wait and not all(staged):  # the chunks nobody staged are read first
            reads.start([bc for bc, st in zip(want, staged) if not st], keys)
        protect = self._touch_chosen(keys, per_row)
        late = self._from_staging(table, pf, placement, want, staged, counts, wait)
        if late:  # staged, but their request was dropped or cancelled: read here after all (rare)
            reads.start(late, keys)
        reads.place(placement, table.capacity, self._alive.append)
        table.mark_dirty(want)
        self.disk_entries += sum(counts.values())
        if reads.batches:
            self._finish_reads(reads, protect, every, pf)

    def _touch_chosen(self, keys, per_row):
        """What is chosen now is likely chosen next step: its value in the store rises, so that installing
        chunks read from disk evicts the memory tiers' unchosen chunks first. Returns the chosen keys."""
        if per_row is None:
            return ()
        protect = {keys[b][c] for b, row in enumerate(per_row) for c in row}
        if protect:
            self.store.touch(protect, 1.0)
        return protect

    def _from_staging(self, table, pf: Prefetcher, placement: Placement, want, staged, counts, wait: bool):
        """Point the staged chunks at their slots (waited for while in flight, with `wait`); without
        `wait` the others are left out, pointed at the zero chunk. Returns the chunks to read now."""
        keys, nb, cap = table.keys, table.layout.nbytes, table.capacity
        ask = [bc for bc, st in zip(want, staged) if st] if wait else want
        t0 = time.perf_counter()
        locs = pf.fetch_many([keys[b][c] for b, c in ask], nb, wait)
        if wait:
            self.store.add_stall(time.perf_counter() - t0)
        sources, rows = placement.sources, placement.rows
        base = len(sources)
        sources.extend(pf.sources)  # the staging arena (its segments exist once something was staged)
        zero_src = len(sources)
        sources.append(self.zero_chunk(nb))
        late, skipped = [], 0
        for (b, c), loc in zip(ask, locs):
            if loc is not None:
                rows[b * cap + c] = (base + loc[0], loc[1], 0)
            elif wait:
                late.append((b, c))
            else:
                rows[b * cap + c] = (zero_src, 0, 0)
                skipped += counts[(b, c)]
        self.skipped_entries += skipped
        if not wait:
            placement.skip_source = zero_src
        return late

    def _finish_reads(self, reads: _DirectReads, protect, every: bool, pf: Prefetcher) -> None:
        # the host's share of the work while the disk reads: earlier layers' chunks into the cpu tier
        # (not with `every`: all of this layer's chunks are about to be read, and none is protected)
        if not every:
            self.installs.install(protect)
        t0 = time.perf_counter()
        reads.wait()
        self.store.add_stall(time.perf_counter() - t0)
        for pairs, _, views, bkeys, _ in reads.batches:
            pf.stats.sync_reads += len(pairs)
            pf.stats.bytes_read += reads.nbytes * len(pairs)  # counted with the staged reads: disk bytes per step
            self.installs.add(zip(bkeys, views))  # offered to the memory tiers

    def zero_chunk(self, nbytes: int) -> torch.Tensor:
        """An all-zero source (decodes to zeros in every format) for entries left out of a step."""
        if self._zero is None or self._zero.numel() < nbytes:
            self._zero = torch.zeros(nbytes, dtype=torch.uint8, device=self.store.gpu.device)
        return self._zero

    def _prefetcher_for(self, table) -> Prefetcher:
        if self._prefetcher is None:
            from ..tiers.disk import io_threads

            cfg, t = self.config, self.tuning
            longest = cfg.chunk_length or max(cfg.chunk_lengths)
            shortest = cfg.chunk_length or min(cfg.chunk_lengths)
            slot = ChunkLayout(cfg.format, longest, table.n_heads, table.head_dim, cfg.group_size).nbytes
            # staged chunks keep their slots until the end of the pass (they are installed then), so
            # staging holds a whole pass of guesses: every layer's distinct chunks (one set per layer
            # with 'shared' selection, up to one per head with 'head'), within a share of the cpu budget
            heads = 1 if cfg.selection == "shared" else table.n_heads
            per_head = cfg.budget // shortest if cfg.budget else t.staging_chunks_unbudgeted
            per_layer = per_head * heads * table.batch_size
            cap = max(t.staging_min_chunks, int(cfg.cpu_budget * t.staging_cpu_share) // round_up(slot))
            depth = max(t.staging_min_chunks, min(cap, per_layer * self.n_layers + per_layer))
            self._prefetcher = Prefetcher(self.store.disk, slot, depth=depth, workers=io_threads(),
                                          pinned=table.device.type == "cuda", groups=t.request_groups)
        return self._prefetcher

    # --- the next layer's guess -----------------------------------------------------------------------
    def expect(self, table, guess: Optional[torch.Tensor], prefetching: bool) -> None:
        """The predictor's guess [B, H, k] at `table`'s layer's choice of this step (None: no guess).
        With `prefetching`, its chunks on disk go to the host without a sync: issue_prefetch() queues
        their reads after this layer's own, so that they do not compete with the reads this layer
        waits for, and run while it computes."""
        self._guess = None  # a guess is for the layer right after this one, never a later one
        if guess is None:
            return
        table.refresh()
        if not table.disk_only or self.store.disk is None or not prefetching:
            return
        on_disk = table.disk_only_of(guess.reshape(guess.shape[0], -1))  # [B, H*k], -1 where not
        if on_disk.device.type == "cuda":
            host = torch.empty(on_disk.shape, dtype=on_disk.dtype, pin_memory=True)
            host.copy_(on_disk, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = on_disk, None
        self._guess = (table, host, done)

    def issue_prefetch(self) -> None:
        """Queue the disk reads of the guess expect() kept (if any)."""
        pending, self._guess = self._guess, None
        if pending is None:
            return
        table, host, done = pending
        if done is not None:
            with self.timers.device_wait():
                done.synchronize()  # waits for the guess only (the layer's later kernels are behind it)
        want = sorted({(b, c) for b, row in enumerate(host.tolist()) for c in row if c >= 0})
        if want:
            nb, keys = table.layout.nbytes, table.keys
            self._prefetcher_for(table).request([(keys[b][c], nb) for b, c in want])

    # --- the end of a pass ----------------------------------------------------------------------------
    def end_pass(self, step: int) -> None:
        """After a forward pass (decode step `step`): staged chunks into the cpu tier, their slots recycled,
        and the pass's read buffers let go, once no kernel of the pass reads them."""
        with self.timers.part("install"):
            waited = self._install_prefetched(step)
        if self._alive:
            if not waited:
                self._wait_for_kernels()
            self._alive.clear()

    def _install_prefetched(self, step: int) -> bool:
        """Move staged chunks into the cpu tier (the next steps find them there) and recycle the slots.
        Returns whether it waited for this pass's kernels."""
        pf = self._prefetcher
        if pf is None:
            return False
        pf.check()
        ready = pf.take_ready()
        if ready:
            self._wait_for_kernels()  # kernels of this pass may still read the staging slots
            self.installs.offer(ready)
            if self.installs.gpu:
                self.store.settle_uploads()  # uploads into gpu slots read the staging slots, recycled now
            pf.release([k for k, _ in ready])
        pf.begin_step(step)
        pf.drop_stale()
        return bool(ready)

    def _wait_for_kernels(self) -> None:
        """Block until this pass's kernels are done (no-op on the CPU): after it, host buffers they read
        may be reused. Pinned buffers come from torch's caching host allocator, which knows nothing of
        reads made by our kernels through unified addressing, so freeing one hands it out again at once."""
        dev = self.store.gpu.device
        if dev.type == "cuda":
            with self.timers.device_wait():
                torch.cuda.current_stream(dev).synchronize()

    def stats(self) -> dict:
        out = {"skipped_entries": self.skipped_entries}
        if self._prefetcher is not None:
            out.update(self._prefetcher.stats.__dict__)
        return out

    def wait_idle(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.wait_idle()

    def close(self) -> None:
        self.installs.clear()
        if self._alive:
            self._wait_for_kernels()
            self._alive.clear()
        if self._prefetcher is not None:
            pf, self._prefetcher = self._prefetcher, None
            pf.close()
