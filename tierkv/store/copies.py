"""The copy engine: the one owner of the store's CUDA streams, events and copies in flight.

Copies into and out of memory-tier slots run asynchronously on two side streams: ingest's
device-to-host copies into cpu slots (the copy stream) and host-to-device copies into gpu slots (the
promotion stream). Until one is known to be done, the host must not read, free or rewrite the slots it
touches, and a kernel that reads those tiers must be ordered after it. The engine keeps the list of
copies in flight, waits for them (settle), orders a reader's stream after them (wait_inflight), and
fences the kernels that read cpu slots through unified addressing before a cpu slot is freed.

Without CUDA (a gpu tier in host memory) every copy is done where it is asked for, nothing is ever in
flight, and every wait returns at once.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

Placed = Sequence[Tuple[object, torch.Tensor, torch.Tensor]]  # [(key, host bytes, slot view)]


def host_copy(view: torch.Tensor, data: torch.Tensor) -> None:
    """Host bytes into a host slot view: one memcpy in this thread (torch's copy_ splits even a few KiB
    over its intra-op threads, which wait for cores the disk readers hold: measured at 0.1-0.5 ms per
    75 KiB chunk)."""
    np.copyto(view.numpy(), (data if data.dim() == 1 else data.reshape(-1)).numpy())


class CopyEngine:
    """Streams, events and the reader fence of one store.

    lock: the store's lock (wait_inflight, called from the attention path, takes it); gpu_device: the
    gpu tier's device; pinned_cpu: whether the cpu tier is pinned (host-to-device copies from it can
    then run asynchronously). Every other method expects the caller to hold the lock.
    """

    def __init__(self, lock, gpu_device: torch.device, pinned_cpu: bool) -> None:
        self._lock = lock
        self._device = gpu_device
        self._pinned = pinned_cpu
        # asynchronous copies not known to be done: (CUDA event, what it keeps alive until then). Ingest's
        # device-to-host copies into cpu slots (on _copy_stream) and promotions' host-to-device copies
        # from cpu slots into gpu slots (on _promote_stream): host code waits for them before it reads
        # or reuses cpu slots (settle_cpu), device readers order their stream after them (wait_inflight)
        self._inflight: List[tuple] = []
        # copies of host bytes that are no cpu slot (a step's disk reads) into gpu slots: device readers
        # wait for them like the others (wait_inflight), and the host before it reads or frees a gpu
        # slot (settle), but freeing or reusing a cpu slot need not wait for them
        self._uploads: List[tuple] = []
        self._copy_stream = None
        self._promote_stream = None
        self._ingest_pending = None  # (data, [(row, cpu slot)]): a put_many's copies not yet queued
        # the last kernel queued that may read cpu slots through unified addressing (note_readers): a
        # freed cpu slot is rewritten by the host at once (a disk read, a promotion's staging), so the
        # host waits for that kernel before it frees one
        self._readers = None
        self._readers_done = True  # the host has waited for _readers since it was last recorded

    @property
    def idle(self) -> bool:
        """No copy in flight nor waiting to be queued (read without the lock: a hint for a fast path)."""
        pending = self._ingest_pending
        return not self._inflight and not self._uploads and not (pending is not None and pending[1])

    @property
    def cpu_slots_busy(self) -> bool:
        """Some copy that reads or writes cpu slots is in flight."""
        return bool(self._inflight)

    @property
    def uploads_busy(self) -> bool:
        """Some copy of host bytes (no cpu slot) into gpu slots is in flight."""
        return bool(self._uploads)

    # --- ingest: device bytes into cpu slots ---------------------------------------------------
    def begin_ingest(self, data: torch.Tensor) -> None:
        """Start a batch of device-to-host copies of data's rows; the copy stream starts after what the
        producing (current) stream has queued so far."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=data.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(data.device))
        self._ingest_pending = (data, [])

    def stage_ingest(self, row: int, view: torch.Tensor) -> None:
        """data[row] goes into the cpu slot `view` (queued by issue_ingest, or by any settle before)."""
        self._ingest_pending[1].append((row, view))

    def end_ingest(self) -> None:
        self._ingest_pending = None

    def issue_ingest(self) -> None:
        """Queue the device-to-host copies staged so far on the copy stream, coalescing adjacent slots."""
        pending = self._ingest_pending
        if pending is None or not pending[1]:
            return
        data, items = pending
        self._ingest_pending = (data, [])
        n = data.shape[1]
        with torch.cuda.stream(self._copy_stream):
            i = 0
            while i < len(items):
                row0, base = items[i]
                store = base.untyped_storage().data_ptr()
                j = i + 1
                while j < len(items) and items[j][0] == items[j - 1][0] + 1 \
                        and items[j][1].data_ptr() == items[j - 1][1].data_ptr() + n \
                        and items[j][1].untyped_storage().data_ptr() == store:
                    j += 1
                dst = torch.empty(0, dtype=torch.uint8).set_(base.untyped_storage(), base.storage_offset(), ((j - i) * n,))
                dst.copy_(data[row0 : row0 + j - i].reshape(-1), non_blocking=True)
                i = j
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._inflight.append((ev, data))

    # --- waiting -------------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait for the asynchronous copies (into cpu slots, or out of them into gpu slots) before the
        host reads or frees those bytes; copies of a put_many still being reserved are queued first."""
        self.settle_cpu()
        self.settle_uploads()

    def settle_cpu(self) -> None:
        """settle for freeing or reusing cpu slots: the copies that read or write them, not the uploads."""
        self.issue_ingest()
        while self._inflight:
            ev, _ = self._inflight.pop()
            ev.synchronize()

    def settle_uploads(self) -> None:
        while self._uploads:
            ev, _ = self._uploads.pop()
            ev.synchronize()

    def note_readers(self, stream) -> None:
        """Record that kernels queued on `stream` so far may read cpu slots (a gather through unified
        addressing): no cpu slot is freed, and so rewritten by the host, before they are done."""
        if self._readers is None:
            self._readers = torch.cuda.Event()
        self._readers.record(stream)
        self._readers_done = False

    def fence_readers(self) -> None:
        """Wait for the kernels note_readers recorded; once waited for, no wait again until the next one
        (a batch of evictions waits once, not once per victim)."""
        if not self._readers_done:
            self._readers.synchronize()
            self._readers_done = True

    def wait_inflight(self, stream) -> None:
        """Order `stream` (a CUDA stream about to read the cpu or gpu tier) after the copies in flight."""
        if not self._inflight and not self._uploads:
            return
        with self._lock:
            self._inflight = [(ev, ref) for ev, ref in self._inflight if not ev.query()]
            self._uploads = [(ev, ref) for ev, ref in self._uploads if not ev.query()]
            for ev, _ in self._inflight + self._uploads:
                stream.wait_event(ev)

    # --- copies into slots ---------------------------------------------------------------------
    def upload(self, placed: Placed, from_cpu_slots: bool = False) -> None:
        """Copy host bytes into their gpu slots: on CUDA the whole batch under one event (copy_up); a gpu
        tier in host memory (no CUDA) gets its copies here, in this thread."""
        if self._device.type != "cuda":
            for _, d, view in placed:
                host_copy(view, d)
        else:
            self.copy_up(placed, from_cpu_slots)

    def write(self, view: torch.Tensor, data: torch.Tensor, into_gpu: bool) -> None:
        """One chunk's bytes into a slot of the gpu tier (into_gpu) or the cpu tier, by the cheapest way
        that is safe for where the bytes and the slot live."""
        if not into_gpu and not data.is_cuda:  # the common case first (the branches below, in short)
            host_copy(view, data)
        elif view.device.type == "cuda" and into_gpu and self._pinned and data.device.type == "cpu":
            self.copy_up([(None, data, view)], from_cpu_slots=True)
        elif view.device.type == "cuda":
            self.wait_inflight(torch.cuda.current_stream(view.device))  # a promotion may still write the slot
            view.copy_(data.reshape(-1))
        elif view.device.type == "cpu" and data.device.type == "cpu":  # a gpu tier in host memory (no CUDA)
            host_copy(view, data)
        else:
            view.copy_(data.reshape(-1))

    def copy_up(self, placed: Placed, from_cpu_slots: bool) -> None:
        """Queue host-to-device copies into gpu slots on the promotion stream under one event, so that
        they overlap the compute stream's work instead of queueing in it (a per-chunk event and stream
        wait cost more host time than the copy). They start after what the compute stream has queued so
        far (a kernel may still read a slot's previous chunk); gathers wait for them (wait_inflight).
        from_cpu_slots: the bytes are cpu slots (or may be), so the host waits for the copies before it
        frees or rewrites one (settle_cpu); else before it lets the bytes go (settle_uploads). The
        sources stay referenced until then."""
        stream = self._upload_stream(self._device)
        with torch.cuda.stream(stream):
            for _, d, view in placed:
                view.copy_(d if d.dim() == 1 else d.reshape(-1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        (self._inflight if from_cpu_slots else self._uploads).append((ev, [d for _, d, _ in placed]))

    def _upload_stream(self, dev):
        """The promotion stream, ordered after what the compute stream has queued so far."""
        if self._promote_stream is None:
            self._promote_stream = torch.cuda.Stream(device=dev)
        self._promote_stream.wait_stream(torch.cuda.current_stream(dev))
        return self._promote_stream
