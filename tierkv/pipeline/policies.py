"""The decode pipeline's policies: plain state machines fed numbers, and the one dataclass of their tuning.

Each policy decides one thing from measurements the cache hands it, and knows nothing of tensors,
tiers or layers, so that a test drives it with numbers alone:

- PrefetchGate: whether the next layer's guessed chunks are read ahead from disk.
- GuessSampler: how often guesses are made (only to be scored) while the gate is shut.
- PromotionCadence: how often the gpu tier's contents are refreshed from the chosen chunks.
- AdmissionGate: which chunks read from disk get a copy in the memory tiers.
- StepWindow: the decode time and steps between two looks of the gates.

The numbers behind PipelineTuning's defaults are in docs/decisions.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple

from ..errors import ConfigError


@dataclass(frozen=True)
class PipelineTuning:
    """Cadences, thresholds and sizes of the decode pipeline; the defaults are what tierkv runs with.

    Pass one to `tierkv.offload(model, config, tuning=...)` to change them (tests and experiments do);
    a TierConfig says what to store where, this says how eagerly the pipeline moves it.
    """

    # --- the chunk plan ------------------------------------------------------------------------------
    # the planner gives no layer chunks longer than budget / min_chunks_in_budget: a layer whose chunks are
    # as long as its budget would choose one or none and see little beyond the sink and the window
    min_chunks_in_budget: int = 4
    # --- importance accounting -----------------------------------------------------------------------
    # decode steps a layer's choices may wait before they are folded into importance: the fold costs
    # three launches per layer, on a decode step bound by host time; anything that reads importance
    # folds first, so the wait changes no number
    selection_flush_max: int = 32
    # --- the gpu tier's refresh ----------------------------------------------------------------------
    # decode steps between refreshes of the gpu tier from the chosen chunks (each costs a host sync)
    promote_every: int = 16
    # the most often it is refreshed: while it fills, and while its chunks are hit
    promote_every_min: int = 4
    # the least often it is refreshed, while choices churn
    promote_every_max: int = 256
    # a refresh finding fewer gpu hits per gathered entry than this (since the last one) is skipped and
    # the next one comes twice as late: copies up would cost host time and PCIe traffic for nothing
    promote_churn_rate: float = 0.05
    # above this share of gpu hits, refreshes come twice as often (down to promote_every_min)
    promote_persist_rate: float = 0.3
    # a chunk goes up only when chosen by at least this many heads per step on average (decayed)
    promote_min_value: float = 1.0
    # --- the next-layer prefetch gate ----------------------------------------------------------------
    # decode steps between the gates' looks at the predictions' hit rates (and at the step times)
    gate_every: int = 8
    # the next-step prediction is scored one step in this many: counting costs a few launches per
    # layer on a host-bound step, and the admission gate needs a rate, not every sample
    next_step_every: int = 4
    # while the gate is shut, guesses are still made and scored one step in gate_every, and one step in
    # twice as many after each window that finds them below next_layer_min_hit again, up to one in
    # guess_every_max: a guess costs a scoring pass per layer on a host-bound step
    guess_every_max: int = 64
    # below this share of right guesses, next-layer guesses are not read ahead: wrong guesses' reads take
    # the disk from the reads a step waits for (above 1: never read ahead)
    next_layer_min_hit: float = 0.5
    # whether next-layer guesses are read ahead from the first decode step, before any was scored: a
    # window of prefetching guesses that turn out wrong costs far more than reading on demand, so the
    # gate opens only once a window's guesses were scored right often enough
    next_layer_prefetch_at_start: bool = False
    # the gate runs the faster of its two states and spends one window in the other every
    # gate_probe_every windows, doubling up to gate_max_probe_every while probes find it slower
    gate_probe_every: int = 8
    gate_max_probe_every: int = 64
    # --- admission of chunks read from disk ----------------------------------------------------------
    # while choices do not persist from step to step (next-step hit rate below admit_all_at), a chunk
    # read from disk gets a cpu copy only when it was chosen again within a few steps (its decayed
    # importance before this step at least admit_prior); while they do, at once
    admit_prior: float = 0.5
    admit_all_at: float = 0.2
    # whether chunks read from disk are offered to the gpu tier too: it cuts per-head selection's disk
    # bytes, but costs shared selection (which reads few chunks from disk) more host time in uploads
    # than it saves
    gpu_installs: bool = False
    # --- staging --------------------------------------------------------------------------------------
    # a prefetch request's chunks are queued in at most this many groups, each read by one worker in
    # one call: fewer groups, less Python work per chunk competing with the decode thread for the GIL;
    # a few keep several reads in flight on the disk
    request_groups: int = 4
    # staged chunks keep their slots until the end of the pass, so staging holds a pass of guesses:
    # at least staging_min_chunks slots, at most staging_cpu_share of the cpu budget
    staging_min_chunks: int = 64
    staging_cpu_share: float = 0.25
    # chunks per head a layer is assumed to read when the budget is None (exact attention)
    staging_chunks_unbudgeted: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"PipelineTuning.{f.name}: expected True or False, got {value!r}")
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"PipelineTuning.{f.name}: expected an integer >= 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"PipelineTuning.{f.name}: expected a number >= 0, got {value!r}")
        if self.promote_every_min > self.promote_every or self.promote_every > self.promote_every_max:
            raise ConfigError(f"PipelineTuning: expected promote_every_min <= promote_every <= promote_every_max, got "
                              f"{self.promote_every_min}, {self.promote_every}, {self.promote_every_max}")
        if self.staging_cpu_share > 1:
            raise ConfigError(f"PipelineTuning.staging_cpu_share: expected a share of at most 1, got {self.staging_cpu_share}")

    def replace(self, **changes) -> "PipelineTuning":
        return replace(self, **changes)


class PrefetchGate:
    """Whether the next layer's guesses are read ahead from disk: only while enough of them are right,
    and only while reading them ahead makes decode steps faster than not reading them.

    Guesses that miss cost disk reads that compete with the reads a step waits for, so a hit rate
    alone does not say whether prefetching pays. So the gate measures: it keeps the mean step time of
    the last window spent in each state, runs the faster one, and now and then spends one window in
    the other state to measure it again (conditions change: the context grows, the page cache warms,
    another process takes the disk). A probe costs a window in the slower state, so each probe that
    finds the other state slower again doubles the windows to the next one (from `probe_every` up to
    `max_probe_every`); one that finds it faster starts over at `probe_every`.

    The hit rate is the gate's first test: the last one measured holds until another is (a window in
    which no guess was scored says nothing new), and below `min_hit` the gate is shut whatever the
    times. With no rate measured yet it stays as it is (`on`: its state at the start).
    """

    def __init__(self, min_hit: float = 0.25, probe_every: int = 8, max_probe_every: int = 64, on: bool = True) -> None:
        self.min_hit = min_hit
        self.probe_every = probe_every
        self.max_probe_every = max(probe_every, max_probe_every)
        self.interval = probe_every  # windows from one probe to the next
        self.on = bool(on)
        self.rate: Optional[float] = None  # the last hit rate measured
        self.step_seconds = {True: None, False: None}  # mean step time of the last window in each state
        self._windows = 0
        self._last_probe = 0
        self._probing = False  # the window under way measures the state the gate does not prefer

    def update(self, hit_rate: Optional[float], step_seconds: Optional[float]) -> bool:
        """After a window of steps spent in state `on`: its guesses' hit rate (None: none scored) and
        mean step time (None: not measured). Returns the state for the next window."""
        if step_seconds is not None:
            self.step_seconds[self.on] = step_seconds
            if self._probing:
                other = self.step_seconds[not self.on]
                slower = other is not None and step_seconds > other
                self.interval = min(self.max_probe_every, 2 * self.interval) if slower else self.probe_every
                self._probing = False
        if hit_rate is not None:
            self.rate = hit_rate
        if self.rate is None:
            return self.on
        if self.rate < self.min_hit:
            self.on = False
            return self.on
        self._windows += 1
        other = not self.on
        if self.step_seconds[other] is None or self._windows - self._last_probe >= self.interval:
            if self.step_seconds[other] is not None:
                self._last_probe = self._windows
            self.on, self._probing = other, True
        else:
            self.on = self.step_seconds[True] <= self.step_seconds[False]
        return self.on


class GuessSampler:
    """How often next-layer guesses are made while the gate does not read them ahead.

    Such a guess is made only to be scored (the gate needs a hit rate to open again), and costs a
    scoring pass per layer: one step in `every` makes one. A window whose guesses are too few right
    doubles `every` (up to `max_every`); one with enough right brings it back to `base`. Keep `base` a
    divisor of the gates' window, so that a sampled step is a window's first.
    """

    def __init__(self, base: int = 8, max_every: int = 64) -> None:
        self.base = base
        self.max_every = max(base, max_every)
        self.every = base

    def due(self, step: int, prefetching: bool) -> bool:
        """Whether decode step `step` makes guesses (always while they are read ahead)."""
        return prefetching or step % self.every == 0

    def update(self, hit_rate: Optional[float], min_hit: float) -> None:
        """After a window: the hit rate of its guesses (None: none scored, nothing changes)."""
        if hit_rate is None:
            return
        if hit_rate >= min_hit:
            self.every = self.base
        elif 2 * self.every <= self.max_every:
            self.every *= 2


class PromotionCadence:
    """How often the gpu tier is refreshed from the chosen chunks, adapted to how often it serves them.

    At first the tier fills: refreshes come every `every_min` steps whatever the hit rate (a refresh
    into free room evicts nothing, and the rate of a filling tier says little), until one finds the
    tier without room, or finds nothing worth a copy (end_fill). From then on, when choices churn (few
    gpu hits since the last refresh), copying chunks up costs host time and PCIe traffic for nothing:
    refresh half as often (down to every `every_max` steps) and skip this one; when they persist,
    refresh more often again (up to every `every_min` steps).
    """

    def __init__(self, every: int = 16, every_min: int = 4, every_max: int = 256, churn_rate: float = 0.05,
                 persist_rate: float = 0.3) -> None:
        self.usual, self.every_min, self.every_max = every, every_min, every_max
        self.churn_rate, self.persist_rate = churn_rate, persist_rate
        self.every = every_min  # steps between refreshes; every_min while the tier fills
        self.filling = True
        self.promoted = False  # a refresh has copied chunks up
        self._marks = (0.0, 0)  # (gpu hits, gathered entries) at the last refresh

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def worth_promoting(self, gpu_hits: float, entries: int, room: bool = False) -> bool:
        """At a due step: gpu hits and gathered entries so far (running totals) and whether the tier has
        free room. Returns whether to refresh now; adapts `every`."""
        d_entries = entries - self._marks[1]
        rate = (gpu_hits - self._marks[0]) / d_entries if d_entries else 0.0
        self._marks = (gpu_hits, entries)
        if self.filling:
            if room:
                return True
            self.end_fill()
        if self.promoted and rate < self.churn_rate:
            self.every = min(self.every_max, self.every * 2)
            return False
        if rate > self.persist_rate:
            self.every = max(self.every_min, self.every // 2)
        return True

    def end_fill(self) -> None:
        """The gpu tier has filled: refresh at the usual pace from now on."""
        self.filling = False
        self.every = max(self.every, self.usual)


class AdmissionGate:
    """Which chunks read from disk get a copy in the memory tiers: while a layer's choices persist into
    the next step (the next-step hit rate), every one, where the next steps find it; while they do not,
    only chunks chosen again within a few steps (a one-off choice would cost a host copy and evict a
    chunk that is used again). `min_prior` is the store's admission threshold (add_copies)."""

    def __init__(self, prior: float = 0.5, all_at: float = 0.2) -> None:
        self.prior, self.all_at = prior, all_at
        self.min_prior = 0.0  # nothing measured yet: admit every chunk

    def update(self, next_step_rate: Optional[float]) -> None:
        if next_step_rate is not None:
            self.min_prior = 0.0 if next_step_rate >= self.all_at else self.prior


class StepWindow:
    """Seconds and count of the sparse decode steps since the gates last looked."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def take(self) -> Tuple[float, int]:
        """The window so far, and a new one started."""
        out = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return out


def gate_for(tuning: PipelineTuning) -> PrefetchGate:
    return PrefetchGate(tuning.next_layer_min_hit, tuning.gate_probe_every, tuning.gate_max_probe_every,
                        on=tuning.next_layer_prefetch_at_start)


def sampler_for(tuning: PipelineTuning) -> GuessSampler:
    return GuessSampler(tuning.gate_every, tuning.guess_every_max)


def cadence_for(tuning: PipelineTuning) -> PromotionCadence:
    return PromotionCadence(tuning.promote_every, tuning.promote_every_min, tuning.promote_every_max,
                            tuning.promote_churn_rate, tuning.promote_persist_rate)


def admission_for(tuning: PipelineTuning) -> AdmissionGate:
    return AdmissionGate(tuning.admit_prior, tuning.admit_all_at)
