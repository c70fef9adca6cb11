"""Prefetcher: worker threads staging chunks from disk into pinned slots, ahead of the step that needs them.

Worker threads read chunks that live only on disk into slots of a pinned staging arena of their own,
ahead of the decode step that will need them. They never touch the store: the decode thread is the
only one that changes residency, at points where it knows what the GPU may still be reading. A staged
chunk is used by the gather kernel straight from its staging slot (the arena's segments are extra
sources of the gather), and at the end of the forward pass it is installed into the cpu tier so the
following steps find it there, and its slot is recycled.

Requests are bounded (at most `depth` chunks staged or in flight) and carry the step that asked for
them; when a newer step begins, requests of older steps that no worker has started are dropped
(stale prefetches). A worker's exception is kept and raised in the decode thread at its next call;
waiting for a chunk is bounded and checks the workers, so a dead worker is an error, never a hang.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import TierKVError
from ..keys import ChunkKey
from ..tiers.arena import Arena, Extent, round_up

_STOP = object()


class PrefetchError(TierKVError):
    """A prefetch worker failed; the message names the chunk and the cause."""


@dataclass
class _Slot:
    key: ChunkKey
    nbytes: int
    step: int
    ext: Optional[Extent] = None
    state: str = "queued"  # queued -> reading -> ready | failed | cancelled
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


@dataclass
class PrefetchStats:
    requested: int = 0
    dropped_full: int = 0  # requests refused because `depth` chunks were already staged or queued
    cancelled: int = 0  # stale requests dropped before a worker started them
    completed: int = 0
    used: int = 0  # staged chunks a gather actually read
    waited: int = 0  # gathers that had to wait for a chunk still in flight
    sync_reads: int = 0  # chunks a step needed that nobody had asked for (read while it waited)
    bytes_read: int = 0
    wait_seconds: float = 0.0


class Prefetcher:
    """Worker threads staging chunks from `disk` into slots of `slot_bytes`, at most `depth` at a time.

    `groups`: a request's chunks are queued in at most this many groups (PipelineTuning.request_groups).
    """

    def __init__(self, disk, slot_bytes: int, depth: int = 64, workers: int = 4, pinned: Optional[bool] = None,
                 wait_timeout: float = 60.0, groups: int = 4) -> None:
        if pinned is None:
            pinned = torch.cuda.is_available()
        self.disk = disk
        self.depth = depth
        self.groups = groups
        self.wait_timeout = wait_timeout
        self.arena = Arena(depth * round_up(slot_bytes), "cpu", pinned=pinned, segment_bytes=depth * round_up(slot_bytes))
        self.stats = PrefetchStats()
        self._slots: Dict[ChunkKey, _Slot] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue" = queue.Queue()
        self._step = 0
        self._error: Optional[BaseException] = None
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"tierkv-prefetch-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- worker side ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            group = self._queue.get()
            if group is _STOP:
                return
            todo = []
            with self._lock:
                for slot in group:
                    if slot.state != "queued":
                        continue
                    if slot.step < self._step - 1:  # asked for by a step that is over: stale
                        slot.state = "cancelled"
                        self._release(slot)
                        self.stats.cancelled += 1
                        slot.done.set()
                        continue
                    slot.state = "reading"
                    todo.append((slot, self.arena.view(slot.ext, slot.nbytes)))
            if todo:
                self._read(todo)

    def _read(self, todo: List[Tuple[_Slot, torch.Tensor]]) -> None:
        try:
            if len(todo) == 1:
                self.disk.read(todo[0][0].key, out=todo[0][1])
            else:
                self.disk.read_batch([s.key for s, _ in todo], [v for _, v in todo])
        except BaseException:
            if len(todo) == 1:
                self._finish(todo[0][0], sys.exc_info()[1])
                return
            for slot, view in todo:  # which one failed: each on its own, so the others are served
                self._read([(slot, view)])
            return
        for slot, _ in todo:
            self._finish(slot, None)

    def _finish(self, slot: _Slot, error: Optional[BaseException]) -> None:
        with self._lock:
            if error is not None:  # kept for the decode thread; the worker goes on
                slot.state, slot.error = "failed", error
                if self._error is None:
                    self._error = PrefetchError(f"chunk {slot.key}: reading it from disk failed: {error}")
                    self._error.__cause__ = error
            else:
                slot.state = "ready"
                self.stats.completed += 1
                self.stats.bytes_read += slot.nbytes
        slot.done.set()

    def _release(self, slot: _Slot) -> None:
        if slot.ext is not None:
            self.arena.free(slot.ext)
            slot.ext = None
        self._slots.pop(slot.key, None)

    # --- decode side -----------------------------------------------------------------------------------
    def check(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise PrefetchError(f"a prefetch worker failed: {e}") from e

    @property
    def sources(self) -> List[torch.Tensor]:
        return self.arena.segments

    def begin_step(self, step: int) -> None:
        with self._lock:
            self._step = step

    def request(self, keys: Sequence[Tuple[ChunkKey, int]]) -> int:
        """Ask for chunks (key, nbytes) to be staged; returns how many were newly queued.

        A request of many chunks is queued in at most `groups` groups, each read by one worker
        in one call: the Python work per chunk, which competes with the decode thread for the GIL,
        shrinks with the group, and a few groups still keep several reads in flight on the disk.
        """
        self.check()
        new = []
        with self._lock:
            for key, nbytes in keys:
                if key in self._slots:
                    continue
                self.stats.requested += 1
                ext = self.arena.alloc(nbytes)
                if ext is None:
                    self.stats.dropped_full += 1
                    continue
                slot = _Slot(key, nbytes, self._step, ext)
                self._slots[key] = slot
                new.append(slot)
        size = -(-len(new) // self.groups) if new else 1
        for i in range(0, len(new), size):
            self._queue.put(new[i : i + size])
        return len(new)

    def staged(self, keys: Sequence[ChunkKey]) -> List[bool]:
        """Whether each chunk has been asked for (staged, in flight or queued), without waiting."""
        with self._lock:
            return [k in self._slots for k in keys]

    def fetch(self, key: ChunkKey, nbytes: int, wait: bool) -> Optional[Tuple[int, int]]:
        """(segment, offset) of the staged chunk, for the gather; None if not staged and `wait` is False.

        With `wait`, a chunk nobody asked for is queued now and waited for like one in flight (None if
        staging is full: the caller reads it itself).
        """
        if wait:
            self.check()
            with self._lock:
                unknown = key not in self._slots
            if unknown:
                self.request([(key, nbytes)])
                with self._lock:
                    self.stats.sync_reads += 1
        return self.fetch_many([key], nbytes, wait)[0]

    def fetch_many(self, keys: Sequence[ChunkKey], nbytes: int, wait: bool) -> List[Optional[Tuple[int, int]]]:
        """fetch() of a step's chunks at once: (segment, offset) of each one staged (waited for while in
        flight when `wait`), None for the rest. With `wait` the caller reads those itself (nobody asked
        for them, or their request was dropped); without, they are queued for the next step."""
        self.check()
        with self._lock:
            slots = [self._slots.get(k) for k in keys]
        if not wait:
            self.request([(k, nbytes) for k, s in zip(keys, slots) if s is None])
        out: List[Optional[Tuple[int, int]]] = []
        for slot in slots:
            if slot is None or (not wait and not slot.done.is_set()):
                out.append(None)
                continue
            if not slot.done.is_set():
                self._wait(slot)
            out.append(self._served(slot))
        with self._lock:
            self.stats.used += sum(1 for o in out if o is not None)
        return out

    def _wait(self, slot: _Slot) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self.stats.waited += 1
        deadline = t0 + self.wait_timeout
        while not slot.done.wait(0.05):
            if not any(t.is_alive() for t in self._threads):
                raise PrefetchError(f"chunk {slot.key}: every prefetch worker has stopped")
            if time.perf_counter() > deadline:
                raise PrefetchError(f"chunk {slot.key}: not read from disk within {self.wait_timeout} s")
        with self._lock:
            self.stats.wait_seconds += time.perf_counter() - t0

    def _served(self, slot: _Slot) -> Optional[Tuple[int, int]]:
        if slot.state == "failed":
            with self._lock:  # raised here: not again at the next call
                if self._error is not None and self._error.__cause__ is slot.error:
                    self._error = None
            raise PrefetchError(f"chunk {slot.key}: reading it from disk failed: {slot.error}") from slot.error
        if slot.state != "ready":
            return None
        return slot.ext.segment, slot.ext.offset

    def take_ready(self) -> List[Tuple[ChunkKey, torch.Tensor]]:
        """Staged chunks as (key, view of the staging slot): the caller installs them, then release()."""
        with self._lock:
            return [(k, self.arena.view(s.ext, s.nbytes)) for k, s in self._slots.items() if s.state == "ready"]

    def release(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                slot = self._slots.get(key)
                if slot is not None and slot.state in ("ready", "failed", "cancelled"):
                    self._release(slot)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no request is queued or being read (the workers are idle); raises PrefetchError
        after `timeout` seconds."""
        deadline = time.perf_counter() + timeout
        while True:
            with self._lock:
                busy = next((s for s in self._slots.values() if s.state in ("queued", "reading")), None)
            if busy is None:
                return
            if time.perf_counter() > deadline:
                raise PrefetchError(f"prefetch requests still in flight after {timeout} s (chunk {busy.key})")
            busy.done.wait(0.05)

    def drop_stale(self) -> None:
        """Free the slots of finished requests from steps that are over and were never used."""
        with self._lock:
            for slot in list(self._slots.values()):
                if slot.step < self._step - 1 and slot.state in ("failed", "cancelled"):
                    self._release(slot)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (within `timeout` seconds) and drop everything staged."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for slot in self._slots.values():
                if slot.state == "queued":
                    slot.state = "cancelled"
                    slot.done.set()
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.perf_counter() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        alive = [t.name for t in self._threads if t.is_alive()]
        with self._lock:
            self._slots.clear()
        self.arena = None  # its pinned segments are unpinned and freed with it
        if alive:
            raise PrefetchError(f"prefetch workers did not stop within {timeout} s: {', '.join(alive)}")
