"""The prefetch pipeline: exact in 'wait' mode, errors surface, nothing leaks, stale requests drop."""

import os
import threading
import time

import pytest
import torch

import tierkv
from tierkv import TierConfig
from tierkv.errors import TierKVError
from tierkv.keys import ChunkKey
from tierkv.pipeline import (GuessSampler, HitCounter, PipelineTuning, PrefetchError, Prefetcher, PrefetchGate,
                             Predictor, PromotionCadence, StepWindow)
from tierkv.tiers.disk import DiskTier

from test_offload import build


def gen(model, ids, cache, n=12):
    with torch.no_grad():
        return model.generate(ids, **tierkv.cache_kwargs(cache), do_sample=False, pad_token_id=0, max_new_tokens=n)


def sparse_cfg(**kw):
    base = dict(budget=48, format="int8", sink=4, window=32, chunk_length=16, gpu_budget="16KiB", cpu_budget="64MiB")
    base.update(kw)
    return TierConfig(**base)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tierkv-prefetch")]


def patch_worker_reads(monkeypatch, before, cls=DiskTier):
    """Run before(keys) ahead of every read the prefetch workers make (cls.read and read_batch)."""
    for name in ("read", "read_batch"):
        original = getattr(cls, name)

        def patched(self, keys, *a, _original=original, _name=name, **kw):
            if threading.current_thread().name.startswith("tierkv-prefetch"):
                before([keys] if _name == "read" else list(keys))
            return _original(self, keys, *a, **kw)

        monkeypatch.setattr(cls, name, patched)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seed", range(6))
def test_wait_mode_identical_to_all_in_cpu(tmp_path, seed, device):
    """With most chunks on disk, 'wait' decodes exactly what the all-in-cpu run decodes (same bytes read).
    On CUDA the chunks reach the cpu tier by device-to-host copies on a side stream, and the kernels read
    cpu slots and staging slots through unified addressing while the host reuses slots around them."""
    model = build("llama" if seed % 2 else "qwen3", seed=seed).to(device)
    torch.manual_seed(seed)
    ids = torch.randint(1, 512, (2, 320)).to(device)
    with tierkv.offload(model, sparse_cfg()) as cache:
        ref = gen(model, ids, cache)
    cfg = sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg) as cache:
        cache.next_layer_prefetch = True  # guesses read ahead until the gate's first look (step 8)
        out = gen(model, ids, cache)
        stats = cache.stats()
    assert torch.equal(out, ref)
    assert stats.resident_chunks["disk"] > stats.resident_chunks["cpu"]  # most of the KV really is on disk
    assert stats.hits["disk"] > 0 and stats.prefetch["completed"] > 0
    for name in ("predict_next_layer_hit_rate", "predict_next_step_hit_rate"):
        assert stats.prefetch[name] is None or 0.0 <= stats.prefetch[name] <= 1.0
    # the parts of the disk path's host time, the device waits taken out of the parts they happen in
    host = stats.prefetch["host_seconds"]
    assert set(host) == {"predict", "issue_prefetch", "stage_from_disk", "install", "promote", "wait_gpu", "write_back", "refresh"}
    assert all(v >= 0 for v in host.values()) and host["stage_from_disk"] > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gpu_budget", ["6KiB", "256KiB"])
def test_wait_mode_identical_with_gpu_installs(tmp_path, seed, device, gpu_budget):
    """gpu_installs: chunks read from disk are uploaded into gpu slots too (on CUDA a batch per layer on
    the promotion stream, while the layer's own gather is still to come): with a gpu tier that churns
    (6 KiB) or keeps them, 'wait' still decodes exactly what the all-in-cpu run decodes."""
    model = build("llama" if seed % 2 else "qwen3", seed=seed + 40).to(device)
    torch.manual_seed(seed)
    ids = torch.randint(1, 512, (2, 320)).to(device)
    with tierkv.offload(model, sparse_cfg()) as cache:
        ref = gen(model, ids, cache)
    cfg = sparse_cfg(cpu_budget="12KiB", gpu_budget=gpu_budget, disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg) as cache:
        cache.next_layer_prefetch = True  # guesses read ahead from the start (the gate starts shut)
        cache.gpu_installs = True
        out = gen(model, ids, cache)
        stats = cache.stats()
    assert torch.equal(out, ref)
    assert stats.bytes_moved.get("disk->gpu", 0) > 0 and stats.hits["disk"] > 0


def test_skip_mode_leaves_missing_chunks_out(tmp_path):
    model = build("llama", seed=11)
    ids = torch.randint(1, 512, (1, 400))
    cfg = sparse_cfg(cpu_budget="8KiB", disk_path=str(tmp_path / "cold"), miss_policy="skip")
    with tierkv.offload(model, cfg) as cache:
        cache.next_layer_prefetch = True  # guesses read ahead from the start (the gate starts shut)
        out = gen(model, ids, cache, n=10)
        stats = cache.stats()
    assert out.shape == (1, 410)
    assert stats.prefetch["skipped_entries"] > 0
    assert stats.prefetch["requested"] > 0


def test_worker_error_surfaces_in_decode_not_a_hang(tmp_path, monkeypatch):
    model = build("llama", seed=12)
    ids = torch.randint(1, 512, (1, 400))
    cfg = sparse_cfg(cpu_budget="8KiB", disk_path=str(tmp_path / "cold"))
    # injected where the prefetch workers call the disk tier (read, read_batch), not in the file reader:
    # a chunk still queued for writing is served from memory and never reaches the file reader
    for name in ("read", "read_batch"):
        original = getattr(DiskTier, name)

        def broken(self, *a, _original=original, **kw):
            if threading.current_thread().name.startswith("tierkv-prefetch"):
                raise OSError(5, "injected I/O error")
            return _original(self, *a, **kw)

        monkeypatch.setattr(DiskTier, name, broken)
    t0 = time.perf_counter()
    with pytest.raises(TierKVError, match="injected I/O error"):
        with tierkv.offload(model, cfg) as cache:
            cache.next_layer_prefetch = True  # guesses read ahead from the start (the gate starts shut)
            gen(model, ids, cache, n=10)
    assert time.perf_counter() - t0 < 60
    assert not prefetch_threads()


def test_exit_with_work_in_flight_joins_and_leaks_nothing(tmp_path, monkeypatch):
    model = build("llama", seed=13)
    ids = torch.randint(1, 512, (1, 400))
    fds_before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    patch_worker_reads(monkeypatch, lambda keys: time.sleep(0.02))  # keeps the workers busy when the context exits
    cfg = sparse_cfg(cpu_budget="8KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg) as cache:
        gen(model, ids, cache, n=4)
        pf = cache.fetcher.prefetcher
        assert pf is not None  # chunks were read from disk
        pf.request([(ChunkKey(cache.key(0, 0, 0).stream, 0, c), 64) for c in range(5)])  # left in flight
    t0 = time.perf_counter()
    assert not prefetch_threads()
    assert time.perf_counter() - t0 < 10
    assert pf.arena is None  # the staging memory was let go
    if fds_before:
        assert set(os.listdir("/proc/self/fd")) <= fds_before  # no file left open


def test_prefetcher_unit(tmp_path):
    disk = DiskTier(str(tmp_path / "d"))
    keys = [ChunkKey("s", 0, i) for i in range(6)]
    for i, k in enumerate(keys):
        disk.write(k, torch.full((1000,), i, dtype=torch.uint8))
    pf = Prefetcher(disk, slot_bytes=1000, depth=4, workers=2, pinned=False)
    try:
        assert pf.request([(k, 1000) for k in keys]) == 4  # bounded: two are refused
        assert pf.stats.dropped_full == 2
        for i, k in enumerate(keys[:4]):
            seg, off = pf.fetch(k, 1000, wait=True)
            assert torch.equal(pf.sources[seg][off : off + 1000], torch.full((1000,), i, dtype=torch.uint8))
        ready = pf.take_ready()
        assert sorted(k for k, _ in ready) == keys[:4]
        pf.release([k for k, _ in ready])
        assert pf.request([(keys[4], 1000)]) == 1
        # a request from a step that is over, not yet started by a worker, is dropped
        pf.begin_step(10)
        assert pf.fetch(ChunkKey("s", 0, 99), 1000, wait=False) is None  # unknown: queued for later
        with pytest.raises(PrefetchError, match="s/L0/99"):
            pf.fetch(ChunkKey("s", 0, 99), 1000, wait=True)  # and it does not exist on disk
    finally:
        pf.close()
        disk.close()
    assert not prefetch_threads()


def test_prefetcher_wait_idle(tmp_path, monkeypatch):
    """wait_idle returns once no request is queued or being read (every one staged), and raises after
    its timeout while a read is held up."""
    disk = DiskTier(str(tmp_path / "d"))
    keys = [ChunkKey("s", 0, i) for i in range(8)]
    for i, k in enumerate(keys):
        disk.write(k, torch.full((1000,), i, dtype=torch.uint8))
    gate = threading.Event()
    patch_worker_reads(monkeypatch, lambda keys: gate.wait(10))
    pf = Prefetcher(disk, slot_bytes=1000, depth=16, workers=2, pinned=False)
    try:
        pf.request([(k, 1000) for k in keys])
        with pytest.raises(PrefetchError, match="in flight"):
            pf.wait_idle(timeout=0.2)
        gate.set()
        pf.wait_idle(timeout=10)
        assert sorted(k for k, _ in pf.take_ready()) == keys
    finally:
        gate.set()
        pf.close()
        disk.close()


def test_prefetcher_batched_reads_isolate_a_failure(tmp_path, monkeypatch):
    """A worker that takes several queued chunks reads them in one call; when one of them fails, that
    one is reported (and raised where it is fetched) and the others are still served, byte for byte."""
    disk = DiskTier(str(tmp_path / "d"))
    keys = [ChunkKey("s", 0, i) for i in range(10)]
    for i, k in enumerate(keys):
        disk.write(k, torch.full((1000,), i, dtype=torch.uint8))
    disk.flush()
    gate, batches = threading.Event(), []

    def before(ks):
        batches.append(ks)
        if ks[0] == keys[0]:
            gate.wait(10)  # holds the only worker while the rest are queued
        if keys[5] in ks:
            raise OSError(5, "injected I/O error")

    patch_worker_reads(monkeypatch, before)
    pf = Prefetcher(disk, slot_bytes=1000, depth=16, workers=1, pinned=False)
    try:
        pf.request([(keys[0], 1000)])
        while not batches:
            time.sleep(0.001)
        pf.request([(k, 1000) for k in keys[1:]])
        gate.set()
        with pytest.raises(PrefetchError, match="s/L0/5"):
            pf.fetch_many(keys, 1000, wait=True)
        assert any(len(b) > 1 for b in batches), batches  # the queued nine went as a batch
        for i, k in enumerate(keys):
            if i == 5:
                continue
            seg, off = pf.fetch(k, 1000, wait=True)
            assert torch.equal(pf.sources[seg][off : off + 1000], torch.full((1000,), i, dtype=torch.uint8))
    finally:
        pf.close()
        disk.close()
    assert not prefetch_threads()


def test_disk_read_batch_matches_read(tmp_path):
    disk = DiskTier(str(tmp_path / "d"))
    try:
        keys = [ChunkKey("s", 1, i) for i in range(5)]
        data = [torch.randint(0, 256, (777 + 64 * i,), dtype=torch.uint8) for i in range(5)]
        for k, d in zip(keys, data):
            disk.write(k, d)
        disk.flush()
        outs = [torch.empty(d.numel(), dtype=torch.uint8) for d in data]
        got = disk.read_batch(keys[::-1], outs[::-1])
        for k, d, o, g in zip(keys[::-1], data[::-1], outs[::-1], got):
            assert torch.equal(g, d) and torch.equal(o, d) and torch.equal(disk.read(k), d)
        with pytest.raises(TierKVError, match="one per key"):
            disk.read_batch(keys, outs[:2])
    finally:
        disk.close()


def test_next_layer_prefetch_gated_by_its_hit_rate(tmp_path):
    """Guesses of the next layer's choice are read from disk only while enough of them hit: with the gate
    shut, nothing is asked for ahead (a step reads what it chose and did not have itself: sync reads);
    open, the guesses are requested. The gate follows the hit rate of the last window of guesses."""
    model = build("llama", seed=4)
    torch.manual_seed(4)
    ids = torch.randint(1, 512, (2, 400))
    seen = {}
    for gate in (True, False):
        cfg = sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / f"cold{gate}"))
        # no automatic looks: the gate stays as it starts
        tuning = PipelineTuning(gate_every=10**9, next_layer_prefetch_at_start=gate)
        with tierkv.offload(model, cfg, tuning=tuning) as cache:
            gen(model, ids, cache, n=10)
            seen[gate] = cache.stats().prefetch
    assert seen[False]["requested"] == 0 and seen[False]["sync_reads"] > 0
    assert seen[True]["requested"] > 0

    p = Predictor()  # the gate as the cache's predictor runs it: shut at the start, min_hit 0.5
    assert p.prefetching is False
    p.next_layer.add(torch.tensor(10), 100)
    p.end_window(0.0, 0)
    assert p.prefetching is False  # 10% of guesses right
    p.next_layer.add(torch.tensor(60), 100)
    p.end_window(0.0, 0)
    assert p.prefetching is True  # 60 of the last 100 right
    assert p.stats()["predict_next_layer_hit_rate"] == 70 / 200
    with tierkv.offload(model, sparse_cfg()) as cache:
        cache.next_layer_prefetch = True
        assert cache.predictor.prefetching and cache.stats().prefetch["next_layer_prefetch_on"] is True


def test_guesses_sampled_less_often_while_too_few_are_right(tmp_path):
    """While the gate is shut for too few right guesses, the guesses made only to be scored (a scoring
    pass per layer) come one step in twice as many after each window that finds them too few right
    again, up to guess_every_max; windows without a sample keep the gate shut on the last one; a sample
    with enough right brings the sampling back to every window."""
    # every window too few right
    tuning = PipelineTuning(gate_every=2, guess_every_max=8, next_layer_min_hit=1.01)
    model = build("llama", seed=4)
    ids = torch.randint(1, 512, (1, 400))
    with tierkv.offload(model, sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold")), tuning=tuning) as cache:
        on, requested, totals = [], [], []
        end = cache.end_forward

        def rec():
            step, total = cache.passes.steps, cache.predictor.next_layer.total
            end()
            on.append(cache.next_layer_prefetch)
            totals.append((step, total))
            pf = cache.fetcher.prefetcher
            requested.append(pf.stats.requested if pf is not None else 0)

        cache.end_forward = rec
        gen(model, ids, cache, n=41)
        guessed = [s2 for (s, t), (s2, t2) in zip(totals, totals[1:]) if t2 > t]  # passes that scored guesses
    # pass 0 is the prefill; the gate starts shut, and decode pass 2 is the first sampled (one step in
    # gate_every = 2); its window finds too few right: one step in 4 (pass 4), then one in 8
    assert guessed == [2, 4, 8, 16, 24, 32, 40], guessed
    assert not any(on), on  # shut all along, sampled or not
    assert not any(requested)  # nothing read ahead
    assert cache.predictor.sampler.every == 8

    p = Predictor(PipelineTuning(gate_every=2, guess_every_max=8, next_layer_min_hit=1.01))
    g = p.gate
    g.step_seconds = {True: 0.1, False: 1.0}  # were the times alone to decide, the gate would open
    p.sampler.every, g.rate = 8, 0.2
    p.end_window(1.0, 2)  # no sample in this window: the last one (too few right) holds
    assert p.prefetching is False and p.sampler.every == 8
    g.min_hit = 0.5
    p.next_layer.add(torch.tensor(90), 100)
    p.end_window(0.0, 0)  # a sample with enough right: every window again
    assert p.sampler.every == 2 and g.rate == 0.9


def test_guess_sampler_doubles_up_to_its_maximum():
    s = GuessSampler(base=8, max_every=64)
    assert s.due(8, False) and not s.due(4, False) and s.due(4, True)  # always while read ahead
    for want in (16, 32, 64, 64):
        s.update(0.1, 0.5)
        assert s.every == want
    s.update(None, 0.5)  # no sample: nothing changes
    assert s.every == 64
    s.update(0.5, 0.5)
    assert s.every == 8


def test_hit_counter_window_rates():
    c = HitCounter()
    assert c.rate() is None and c.window_rate() is None
    c.add(torch.tensor(3), 10)
    c.add(torch.tensor(2), 10)
    assert c.window_rate() == 0.25 and c.window_rate() is None  # nothing new since
    c.add(torch.tensor(9), 10)
    assert c.window_rate() == 0.9 and c.rate() == 14 / 30


def test_promotion_cadence_fills_then_follows_the_hit_rate():
    """The gpu tier's refresh: every every_min steps while it fills (whatever the hit rate); the usual
    pace once a refresh finds no room; then half as often (skipping the refresh) while choices churn,
    down to every_max, and twice as often while they persist, up to every_min."""
    c = PromotionCadence(every=16, every_min=4, every_max=64, churn_rate=0.05, persist_rate=0.3)
    assert c.every == 4 and c.filling and c.due(8) and not c.due(6)
    assert c.worth_promoting(gpu_hits=0, entries=100, room=True) and c.every == 4  # filling, room left
    assert c.worth_promoting(gpu_hits=0, entries=200, room=False)  # no room: the fill is over
    assert not c.filling and c.every == 16
    c.promoted = True
    hits, entries = 0, 200
    for want in (32, 64, 64):  # 1% of the entries since the last look were gpu hits: churn
        hits, entries = hits + 1, entries + 100
        assert not c.worth_promoting(hits, entries) and c.every == want
    for want in (32, 16, 8, 4, 4):  # half of them: choices persist
        hits, entries = hits + 50, entries + 100
        assert c.worth_promoting(hits, entries) and c.every == want
    c.end_fill()  # (again: never slower than the usual pace after it)
    assert c.every == 16


def test_pipeline_tuning_defaults_and_checks():
    t = PipelineTuning()
    assert (t.gate_every, t.next_layer_min_hit, t.next_layer_prefetch_at_start, t.promote_every) == (8, 0.5, False, 16)
    assert t.replace(gate_every=2).gate_every == 2 and t.gate_every == 8
    with pytest.raises(TierKVError, match="gate_every"):
        PipelineTuning(gate_every=0)
    with pytest.raises(TierKVError, match="admit_prior"):
        PipelineTuning(admit_prior=-1.0)
    with pytest.raises(TierKVError, match="gpu_installs"):
        PipelineTuning(gpu_installs=1)
    with pytest.raises(TierKVError, match="promote_every_min"):
        PipelineTuning(promote_every_min=32)
    with pytest.raises(TierKVError, match="tuning"):
        with tierkv.offload(build("llama"), sparse_cfg(), tuning={"gate_every": 2}):
            pass


def test_step_window_takes_and_restarts():
    w = StepWindow()
    w.add(0.5)
    w.add(0.25)
    assert w.take() == (0.75, 2) and w.take() == (0.0, 0)


def test_prefetch_gate_keeps_the_faster_state_and_probes():
    from tierkv.pipeline import PrefetchGate

    g = PrefetchGate(min_hit=0.25, probe_every=4)
    assert g.on is True
    assert g.update(0.6, 1.0) is False  # the other state was never measured: measure it
    assert g.update(0.6, 0.5) is False  # off was faster
    assert g.update(0.6, 0.5) is False
    assert g.update(0.6, 0.5) is True  # every 4th window: probe the other state again
    assert g.update(0.6, 0.4) is True  # on got faster than off's last window: keep it
    assert g.update(0.1, 0.4) is False  # too few right guesses: off whatever the times
    assert g.update(None, 0.5) is False  # no guess scored: the last rate (too few right) holds
    assert g.update(0.6, None) is True  # enough right again: the faster state as last measured
    assert g.update(None, None) is True


def test_prefetch_gate_opens_only_on_a_measured_hit_rate():
    """A gate that starts shut (tierkv's caches: NEXT_LAYER_PREFETCH_AT_START) stays shut until a window
    scores enough right guesses; then it measures the open state."""
    from tierkv.pipeline import PrefetchGate

    g = PrefetchGate(min_hit=0.5, on=False)
    assert g.update(None, 1.0) is False  # nothing scored yet: no probe of prefetching
    assert g.update(0.3, 1.0) is False and g.update(None, 1.0) is False
    assert g.update(0.7, 1.0) is True  # enough right: the open state is measured
    assert g.update(0.7, 3.0) is False  # and found slower


def test_prefetch_gate_probes_less_often_while_probes_find_the_other_state_slower():
    """Each probe that finds prefetching slower again doubles the windows to the next probe (up to the
    maximum); a probe that finds it faster brings the gate back to probing every `probe_every`."""
    from tierkv.pipeline import PrefetchGate

    g = PrefetchGate(min_hit=0.25, probe_every=2, max_probe_every=8)
    state, on_windows = g.update(0.6, 2.0), []  # on (2.0 s a step) is measured first, then off
    for w in range(40):
        if state:
            on_windows.append(w)
        state = g.update(0.6, 2.0 if state else 1.0)
    gaps = [b - a for a, b in zip(on_windows, on_windows[1:])]
    assert gaps[:3] == [4, 8, 8] and set(gaps) <= {4, 8}
    assert g.interval == 8
    g.update(0.6, 1.0)  # the windows until the next probe, in the faster state (off)
    while g.on is False:
        g.update(0.6, 1.0)
    assert g.update(0.6, 0.5) is True and g.interval == 2  # the probe found prefetching faster now


def test_next_layer_prefetch_turned_off_when_it_slows_steps(tmp_path, monkeypatch):
    """Prefetch reads that make steps slower (here: every prefetch read takes 30 ms, and a step waits for
    the guesses it uses) are turned off by the measured step times, though enough guesses hit."""
    patch_worker_reads(monkeypatch, lambda keys: time.sleep(0.03))
    decisions = []
    update = PrefetchGate.update

    def rec(self, rate, seconds):
        decisions.append(update(self, rate, seconds))
        return decisions[-1]

    monkeypatch.setattr(PrefetchGate, "update", rec)
    model = build("llama", seed=4)
    ids = torch.randint(1, 512, (1, 400))
    tuning = PipelineTuning(gate_every=2, next_layer_min_hit=0.0)
    with tierkv.offload(model, sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold")), tuning=tuning) as cache:
        gen(model, ids, cache, n=24)
        times = dict(cache.predictor.gate.step_seconds)
    assert times[True] is not None and times[False] is not None and times[True] > times[False]
    assert decisions.count(False) > decisions.count(True)


def test_gate_step_times_leave_out_pauses_between_passes(tmp_path, monkeypatch):
    """A pause between forward passes (the caller's own work, or another model timed in between) is not
    a step's time: the gate's windows count a step from its first layer to the end of its pass."""
    seen = []
    monkeypatch.setattr(PrefetchGate, "update", lambda self, rate, seconds: seen.append(seconds) or True)
    model = build("llama", seed=5)
    ids = torch.randint(1, 512, (1, 400))
    cfg = sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg, tuning=PipelineTuning(gate_every=4)) as cache:
        step = gen(model, ids, cache, n=3)
        for _ in range(6):
            # a pause before each pass (a pass of this model takes milliseconds; a tenth of a second or two
            # on a loaded 2-core machine)
            time.sleep(1.0)
            step = gen(model, step, cache, n=1)
    timed = [s for s in seen if s is not None]
    assert timed, "the gate never looked at a window"
    assert max(timed) < 0.5, timed


def test_gate_times_only_sparse_decode_steps(tmp_path):
    """The gate's windows count decode steps that attended sparsely, not a later prefill pass (a new
    turn's prompt appended to a cache that has decoded before)."""
    model = build("llama", seed=5)
    ids = torch.randint(1, 512, (1, 400))
    cfg = sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold"))
    with tierkv.offload(model, cfg, tuning=PipelineTuning(gate_every=10**9)) as cache:  # no looks: the window only accumulates
        out = gen(model, ids, cache, n=4)  # a prefill pass, then 3 decode passes
        assert cache.passes.window.steps == 3
        gen(model, torch.cat([out, torch.randint(1, 512, (1, 200))], dim=1), cache, n=1)  # a prefill pass only
        assert cache.passes.window.steps == 3


def _record_selections(cache):
    """The chunk ids [B, H, k] each layer's sparse steps chose, as they are made."""
    seen = []
    cache.add_choice_listener(lambda layer, q, idx: seen.append(idx.clone()))
    return seen


def test_shared_selection_reads_fewer_disk_bytes_and_stays_exact_over_its_choice(tmp_path):
    """selection='shared': every KV head of a layer reads the same chunks; with most chunks on disk the
    step reads fewer chunk files than per-head selection, and 'wait' still decodes what all-in-cpu does."""
    model = build("llama", seed=5)
    assert model.config.num_key_value_heads > 1
    torch.manual_seed(5)
    ids = torch.randint(1, 512, (2, 320))
    with tierkv.offload(model, sparse_cfg(selection="shared")) as cache:
        seen = _record_selections(cache)
        ref = gen(model, ids, cache)
    sparse = [i for i in seen if i.shape[-1] * 16 <= 48]  # k = budget // L
    assert len(sparse) == len(seen) and sparse and all(torch.equal(i, i[:, :1].expand_as(i)) for i in sparse)
    read = {}
    for selection in ("head", "shared"):
        cfg = sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / selection), selection=selection)
        with tierkv.offload(model, cfg) as cache:
            cache.next_layer_prefetch = True  # guesses read ahead from the start (the gate starts shut)
            out = gen(model, ids, cache)
            read[selection] = cache.stats().prefetch["bytes_read"]
        if selection == "shared":
            assert torch.equal(out, ref)
    assert 0 < read["shared"] < read["head"]


def test_staging_full_reads_the_rest_directly(tmp_path, monkeypatch):
    """A staging arena too small for the guesses: what a step needs and does not have staged is read on
    the disk tier's threads into a pinned buffer of the step, offered to the cpu tier like staged
    chunks, and the output is still exactly the all-in-cpu one."""
    model = build("qwen3", seed=3)
    torch.manual_seed(3)
    ids = torch.randint(1, 512, (2, 320))
    with tierkv.offload(model, sparse_cfg()) as cache:
        ref = gen(model, ids, cache)
    # two staging slots, and guesses read ahead from the start (the gate starts shut)
    tuning = PipelineTuning(staging_min_chunks=2, staging_cpu_share=0.0, next_layer_prefetch_at_start=True)
    with tierkv.offload(model, sparse_cfg(cpu_budget="12KiB", disk_path=str(tmp_path / "cold")), tuning=tuning) as cache:
        read_directly, offered = set(), set()
        read_into, add_copies = cache.store.disk.read_into_async, cache.store.add_copies

        def rec_read(keys, buffer, stride):
            read_directly.update(keys)
            return read_into(keys, buffer, stride)

        def rec_add(items, tier="cpu", **kw):
            offered.update(k for k, _ in items)
            return add_copies(items, tier, **kw)

        cache.store.disk.read_into_async, cache.store.add_copies = rec_read, rec_add
        out = gen(model, ids, cache)
        stats = cache.stats()
        pending = set(cache.fetcher.installs.pending())  # read in the last pass: offered when their layer places next
        assert cache.fetcher.prefetcher.depth == 2
    assert torch.equal(out, ref)
    assert stats.prefetch["sync_reads"] > stats.prefetch["completed"]
    # chunks read outside staging are offered to the cpu tier (while a later layer's reads are in
    # flight, or before their own layer gathers again), like staged ones
    assert read_directly and read_directly <= offered | pending
    assert read_directly - pending


def test_bench_pipeline_runs_both_selections(tmp_path):
    """bench/bench_pipeline.py end to end on the CPU at a small size: every (selection, mode) row, ratios
    per selection, and shared selection reading fewer disk bytes per token than per-head selection."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_pipeline

    out = tmp_path / "pipe.json"
    bench_pipeline.main(["--model", "retrieval", "--context", "768", "--budget", "64", "--chunk-length", "16",
                         "--window", "32", "--piece", "768", "--steps", "3", "--warmup", "1",
                         "--disk-dir", str(tmp_path / "disk"), "--selection", "head", "shared", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {(r["selection"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {(s, m) for s in ("head", "shared") for m in ("all-cpu", "sync", "pipeline")}
    assert len(res["rows"]) == 6  # the process warm-up run is not a row
    assert set(res["ratios"]) == {"head", "shared"} and all(v > 0 for r in res["ratios"].values() for v in r.values())
    assert rows["head", "all-cpu"]["disk_bytes_per_token"] == 0
    assert 0 < rows["shared", "sync"]["disk_bytes_per_token"] < rows["head", "sync"]["disk_bytes_per_token"]
    assert rows["head", "sync"]["prefetch"]["skipped_entries"] == 0  # 'wait': nothing left out
    for r in rows.values():  # three timed windows by default; tokens/s is the median one's
        assert len(r["tokens_per_s_windows"]) == 3
        assert r["tokens_per_s"] == sorted(r["tokens_per_s_windows"])[1]
        # disk modes: what each window moved, summing to the row's figure
        assert len(r["windows_trace"]) == (0 if r["mode"] == "all-cpu" else 3)
        if r["windows_trace"]:
            mean = sum(w["disk_bytes_per_token"] for w in r["windows_trace"]) / 3
            assert mean == pytest.approx(r["disk_bytes_per_token"])
            assert all(0 <= w["gpu_served"] <= 1 and w["gpu_chunks"] >= 0 for w in r["windows_trace"])
    with pytest.raises(SystemExit):  # argparse's error exit, before any model is built
        bench_pipeline.main(["--repeats", "0", "--disk-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_bench_pipeline_skip_mode(tmp_path):
    """--modes ... skip: the pipeline under the 'skip' miss policy, with its ratio; it leaves chunks out
    (which 'wait' never does) and never waits for the disk."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_pipeline

    out = tmp_path / "pipe.json"
    bench_pipeline.main(["--model", "retrieval", "--context", "768", "--budget", "64", "--chunk-length", "16",
                         "--window", "32", "--piece", "768", "--steps", "3", "--warmup", "1", "--modes", "all-cpu",
                         "skip", "--disk-dir", str(tmp_path / "disk"), "--selection", "head", "--json", str(out)])
    res = json.loads(out.read_text())
    skip = next(r for r in res["rows"] if r["mode"] == "skip")
    assert skip["prefetch"]["skipped_entries"] > 0 and skip["stall_s_per_step"] == 0
    assert res["ratios"]["head"]["skip_over_all_cpu"] > 0


def test_next_layer_guesses_are_queued_after_the_layers_own_disk_reads(tmp_path, monkeypatch):
    """A layer's demand reads go first; the next layer's guesses are queued after them (to be read while
    this layer computes), never just before them, where they would compete for the disk."""
    events = []
    read_into, request = DiskTier.read_into_async, Prefetcher.request

    def demand(self, keys, buffer, stride):
        if threading.current_thread() is threading.main_thread() and keys:
            events.append(("demand", keys[0].layer))
        return read_into(self, keys, buffer, stride)

    def asked(self, keys):
        if keys:
            events.append(("request", keys[0][0].layer))
        return request(self, keys)

    monkeypatch.setattr(DiskTier, "read_into_async", demand)
    monkeypatch.setattr(Prefetcher, "request", asked)
    model = build("llama", seed=14, layers=4)
    ids = torch.randint(1, 512, (1, 400))
    with tierkv.offload(model, sparse_cfg(cpu_budget="8KiB", disk_path=str(tmp_path / "cold"))) as cache:
        cache.next_layer_prefetch = True
        gen(model, ids, cache, n=8)
    pairs = list(zip(events, events[1:]))
    # layer m's guesses right after layer m-1's reads; never right before them (m >= 2: within a step)
    assert [1 for a, b in pairs if b[0] == "request" and a == ("demand", b[1] - 1)]
    assert not [(a, b) for a, b in pairs if a[0] == "request" and a[1] >= 2 and b == ("demand", a[1] - 1)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_promotions_into_the_gpu_tier_change_nothing_decoded(tmp_path, monkeypatch, device):
    """The gpu tier is a cache: with chunks promoted into it every other step (on CUDA, copied on a stream
    of their own), into a tier too small to keep them (slots evicted and reused at once) or one that
    keeps them, 'wait' decodes exactly what the same run without a gpu tier decodes."""
    monkeypatch.setattr(PromotionCadence, "worth_promoting", lambda self, hits, entries, room=False: True)  # refresh at every chance
    model = build("llama", seed=21, layers=3).to(device)
    ids = torch.randint(1, 512, (2, 640), device=device)
    outs, promoted = [], []
    for gpu_budget in ("1KiB", "4KiB", "96KiB"):
        cfg = sparse_cfg(gpu_budget=gpu_budget, cpu_budget="16KiB", disk_path=str(tmp_path / gpu_budget))
        with tierkv.offload(model, cfg) as cache:
            cache.next_layer_prefetch = True  # guesses read ahead from the start (the gate starts shut)
            cache.promote_every = 2
            outs.append(gen(model, ids, cache, n=24))
            stats = cache.stats()
        promoted.append(stats.bytes_moved.get("cpu->gpu", 0) + stats.bytes_moved.get("disk->gpu", 0))
    assert promoted[0] == 0 and promoted[1] > 4 * 1024 and promoted[2] > 0  # the small tier churns
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_gpu_tier_fills_while_it_has_room(tmp_path):
    """While the gpu tier has free room, a refresh promotes every layer's share of that room (not only
    prefetch_depth chunks per head) and refreshes come every PROMOTE_EVERY_MIN steps, however few
    chunks the tier has served; with no room they fall back to every PROMOTE_EVERY steps at once.
    Decoding stays exact, and the filled tier serves entries that would have been read from disk."""
    PROMOTE_EVERY, PROMOTE_EVERY_MIN = PipelineTuning().promote_every, PipelineTuning().promote_every_min
    model = build("llama", seed=31, layers=3)
    ids = torch.randint(1, 512, (1, 1200))
    outs, rows = [], []
    for gpu_budget in ("1MiB", 0):
        cfg = sparse_cfg(gpu_budget=gpu_budget, cpu_budget="24KiB", disk_path=str(tmp_path / str(gpu_budget)))
        with tierkv.offload(model, cfg) as cache:
            marks = []
            promote = cache.passes.promote

            def spy():
                before = len(cache.store.gpu)
                promote()
                marks.append((cache.passes.steps, len(cache.store.gpu) - before))

            cache.passes.promote = spy
            outs.append(gen(model, ids, cache, n=40))
            rows.append((marks, cache.stats()))
            depth, heads, layers = cache.config.prefetch_depth, cache.layers[0].n_heads, len(cache.layers)
    (fill, s_fill), (none, s_none) = rows
    assert torch.equal(outs[0], outs[1])
    assert [m[0] for m in fill] == list(range(PROMOTE_EVERY_MIN, 41, PROMOTE_EVERY_MIN))
    assert fill[0][1] > depth * heads * layers and all(m[1] > 0 for m in fill)
    assert s_fill.resident_chunks["gpu"] > 4 * depth * heads * layers
    assert [m[0] for m in none] == [PROMOTE_EVERY_MIN] + list(range(PROMOTE_EVERY, 41, PROMOTE_EVERY))
    assert s_none.resident_chunks["gpu"] == 0
    assert s_fill.hits["gpu"] > 0 and s_fill.hits["disk"] < s_none.hits["disk"]
