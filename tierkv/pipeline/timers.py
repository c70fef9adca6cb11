"""Host seconds spent in the parts of the disk path of decode steps, without a profiler's overhead.

The stall (waiting for disk reads) is counted apart, in the store. Parts:
  predict         guessing the next layer's choice (and scoring the predictions)
  issue_prefetch  queuing the reads of the guessed chunks (a guess read back from the device)
  stage_from_disk placing a layer's chosen chunks that live on disk only (staged, read, or skipped)
  install         chunks read from disk into the memory tiers
  promote         the gpu tier's refresh from the chosen chunks
  wait_gpu        the host waiting for the device (a layer's choice read back, a guess read back, the
                  end of a pass waiting for its kernels): the device's backlog, not host work, and not
                  counted in the part where it happens
  write_back      disk copies of chunks cut in a pass (store.write_back)
  refresh         bringing a layer's address table up to date with the store
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict

PARTS = ("predict", "issue_prefetch", "stage_from_disk", "install", "promote", "wait_gpu", "write_back", "refresh")


class HostTimers:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._nested = 0.0  # seconds of the parts that have ended

    @contextlib.contextmanager
    def part(self, name: str):
        """Adds the block's host seconds to seconds[name], less those of the parts nested in it: each
        second is counted in one part."""
        t0, n0 = time.perf_counter(), self._nested
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.seconds[name] += elapsed - (self._nested - n0)
            self._nested = n0 + elapsed

    def device_wait(self):
        """A block in which the host waits for the device."""
        return self.part("wait_gpu")
