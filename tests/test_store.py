import random
import threading
import time

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.errors import CapacityError, ChunkNotFoundError, ConfigError
from tierkv.keys import ChunkKey
from tierkv.store import ChunkStore, EvictionPolicy, StoreStats
from tierkv.store.copies import CopyEngine
from tierkv.tiers.arena import Arena


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def K(i, layer=0, stream="s"):
    return ChunkKey(stream, layer, i)


def test_arena_first_fit_coalesces():
    a = Arena(4096, "cpu", segment_bytes=4096)
    e1, e2, e3 = a.alloc(1000), a.alloc(1000), a.alloc(1000)
    assert a.used == 3 * 1024 and a.alloc(2000) is None
    a.free(e2)
    a.free(e1)
    e4 = a.alloc(2000)  # fits only because the two freed neighbours merged
    assert e4 is not None and e4.offset == 0
    a.free(e3)
    a.free(e4)
    assert a.used == 0 and a.largest_free(0) == 4096
    with pytest.raises(CapacityError):
        a.alloc(5000)


def test_put_read_roundtrip_and_stats():
    st = ChunkStore(TierConfig(gpu_budget=8192, cpu_budget=16384))
    st.put(K(0), data(1000, 0))
    st.put(K(1), data(3000, 1), tier="gpu")
    assert st.residency(K(0)) == ("cpu",)
    assert st.residency(K(1)) == ("gpu", "cpu")
    assert torch.equal(st.read(K(0)), data(1000, 0))
    assert torch.equal(st.read(K(1)), data(3000, 1))
    s = st.stats()
    assert isinstance(s, StoreStats)
    assert s.hits == {"cpu": 1, "gpu": 1} and s.misses == {"gpu": 1}
    assert s.bytes_moved == {"ingest->cpu": 1000, "ingest->gpu": 3000, "gpu->cpu": 3000}
    assert s.resident_chunks == {"gpu": 1, "cpu": 2} and s.chunks == 2


def test_put_replaces():
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=4096))
    st.put(K(0), data(1000, 0), tier="gpu")
    st.put(K(0), data(500, 5))
    assert st.residency(K(0)) == ("cpu",) and torch.equal(st.read(K(0)), data(500, 5))
    assert st.cpu.used_bytes == 512 and st.gpu.used_bytes == 0


def test_eviction_by_decayed_importance_then_lru():
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=1 << 20, importance_decay=0.5))
    for i in range(4):
        st.put(K(i), data(1024, i), tier="gpu")
    st.touch([K(0)], 10.0)  # valuable
    st.tick()
    st.touch([K(1)], 1.0)  # a little value, recent
    # K(2), K(3): no value; K(2) is older (put first) -> evicted first
    st.put(K(9), data(1024, 9), tier="gpu")
    assert K(2) not in st.gpu and all(K(i) in st.gpu for i in (0, 1, 3, 9))
    # decay: after many ticks K(0)'s 10 decays below K(1)'s fresh touch
    st.tick(10)
    st.touch([K(1)], 1.0)
    st.touch([K(3)], 2.0)
    st.touch([K(9)], 2.0)
    st.put(K(10), data(1024, 10), tier="gpu")
    assert K(0) not in st.gpu
    for i in (0, 1, 2, 3, 9, 10):  # nothing lost: evicted gpu copies live on in the cpu tier
        assert torch.equal(st.read(K(i)), data(1024, i))


def test_promote_demote_evict_delete():
    st = ChunkStore(TierConfig(gpu_budget=8192, cpu_budget=8192))
    st.put(K(0), data(2048, 0))
    st.promote(K(0), "gpu")
    assert st.residency(K(0)) == ("gpu", "cpu")
    st.demote(K(0), "cpu")
    assert st.residency(K(0)) == ("cpu",)
    with pytest.raises(ConfigError, match="disk"):
        st.demote(K(0), "disk")
    st.promote(K(0), "gpu")
    st.evict(K(0), "gpu")
    assert st.residency(K(0)) == ("cpu",)
    with pytest.raises(ChunkNotFoundError):
        st.evict(K(0), "gpu")
    st.delete(K(0))
    assert K(0) not in st and st.cpu.used_bytes == 0
    with pytest.raises(ChunkNotFoundError, match="s/L0/0"):
        st.read(K(0))


def test_cpu_full_without_disk_is_capacity_error():
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=4096))
    for i in range(4):
        st.put(K(i), data(1024, i))
    with pytest.raises(CapacityError, match="no disk tier"):
        st.put(K(5), data(1024, 5))
    # the failed put left no trace, and everything else reads back
    assert K(5) not in st
    for i in range(4):
        assert torch.equal(st.read(K(i)), data(1024, i))
    with pytest.raises(CapacityError, match="larger than the whole tier"):
        st.put(K(6), data(8192, 6))


def test_bad_arguments():
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=4096))
    with pytest.raises(ConfigError, match="ChunkKey"):
        st.put(("s", 0, 0), data(10, 0))
    with pytest.raises(ConfigError, match="uint8"):
        st.put(K(0), torch.zeros(10))
    with pytest.raises(ConfigError, match="tier"):
        st.put(K(0), data(10, 0), tier="tape")
    with pytest.raises(ConfigError, match="TierConfig"):
        ChunkStore({"gpu_budget": 1})
    with pytest.raises(ConfigError, match="stream"):
        K(0, stream="../etc")


def randomized_ops(st, n_ops, seed, max_chunk=3000, n_keys=40, use_disk=False):
    rnd = random.Random(seed)
    truth = {}
    version = 0
    ops = ["put", "put", "read", "promote", "demote", "evict", "delete", "touch", "tick"]
    for step in range(n_ops):
        op = rnd.choice(ops)
        key = K(rnd.randrange(n_keys), layer=rnd.randrange(2))
        try:
            if op == "put":
                version += 1
                d = data(rnd.randrange(1, max_chunk), version)
                tier = rnd.choice(["gpu", "cpu"] + (["disk"] if use_disk else []))
                st.put(key, d, tier=tier, importance=rnd.random())
                truth[key] = d
            elif key not in truth:
                continue
            elif op == "read":
                assert torch.equal(st.read(key), truth[key])
            elif op == "promote":
                st.promote(key, rnd.choice(["gpu", "cpu"]))
            elif op == "demote":
                st.demote(key, rnd.choice(["cpu"] + (["disk"] if use_disk else [])))
            elif op == "evict":
                t = rnd.choice(["gpu", "cpu"])
                if t in st.residency(key):
                    st.evict(key, t)
            elif op == "delete":
                st.delete(key)
                del truth[key]
            elif op == "touch":
                st.touch([key], rnd.random() * 3)
            else:
                st.tick()
        except CapacityError:
            assert op in ("put", "promote", "demote", "evict")
            if op == "put":  # a failed put leaves nothing behind
                truth.pop(key, None)
                assert key not in st
        # after every operation: budgets hold and every chunk reads back as written
        for tier in (st.gpu, st.cpu):
            assert tier.used_bytes <= tier.budget and tier.arena.reserved <= tier.budget
        if use_disk and st.disk.budget is not None:
            assert st.disk.used_bytes <= st.disk.budget
        assert set(st.keys()) == set(truth)
        for k, d in truth.items():
            assert torch.equal(st.read(k), d), (step, op, k)
            assert st.residency(k)[-1] in ("cpu", "disk")


def test_randomized_memory_tiers():
    st = ChunkStore(TierConfig(gpu_budget=12 * 1024, cpu_budget=64 * 1024, importance_decay=0.8))
    randomized_ops(st, 3000, seed=1234, max_chunk=3000, n_keys=24)


def test_add_copies_makes_room_once_among_the_old_contents(tmp_path):
    """Prefetched chunks go into the cpu tier together: the victims are the least valuable chunks the
    tier held before (never one of the newcomers, as one-by-one installs would pick the oldest newcomer),
    chunks already present or deleted are skipped, and everything still reads back."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=8 * 1024, importance_decay=0.5,
                               disk_path=str(tmp_path)))
    for i in range(8):  # fills the cpu tier; chunk 3 and 5 are valuable
        st.put(K(i), data(1024, i), tier="cpu")
    st.touch([K(3)], 5.0)
    st.touch([K(5)], 5.0)
    for i in (10, 11, 12):  # live on disk only
        st.put(K(i), data(1024, i), tier="disk")
    st.put(K(13), data(1024, 13), tier="disk")
    st.delete(K(13))
    items = [(K(i), data(1024, i)) for i in (10, 11, 12, 13)] + [(K(3), data(1024, 3))]
    assert st.add_copies(items, "cpu") == 3
    assert all(K(i) in st.cpu for i in (10, 11, 12, 3, 5))
    assert sum(K(i) in st.cpu for i in range(8)) == 5  # three old, valueless chunks made way
    for i in list(range(8)) + [10, 11, 12]:
        assert torch.equal(st.read(K(i)), data(1024, i))
    assert st.add_copies([], "cpu") == 0


def test_add_copies_min_prior_admits_chunks_used_again_soon(tmp_path):
    """With min_prior a chunk read from disk gets a cpu copy only when its value before the step it was
    last touched in reached min_prior: used again within a few steps. Touches within one step count
    once; a chunk used long ago (its importance decayed away) counts as new."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=2 * 1024, importance_decay=0.5,
                               disk_path=str(tmp_path)))
    for i in range(4):
        st.put(K(i), data(1024, i), tier="disk")
    assert st.add_copies([(K(0), data(1024, 0))], "cpu") == 1  # the default admits anything
    st.touch([K(0)], 1.0)
    st.touch([K(1), K(2), K(3)], 1.0)
    st.touch([K(1)], 1.0)  # the same step: its prior is still 0
    items = [(K(i), data(1024, i)) for i in (1, 2, 3)]
    assert st.add_copies(items, "cpu", min_prior=0.4) == 0
    assert {i for i in range(4) if K(i) in st.cpu} == {0}  # nothing evicted for nobody
    st.tick()
    st.touch([K(2)], 1.0)  # the next step: prior 0.5
    for _ in range(4):
        st.tick()
    st.touch([K(3)], 1.0)  # five steps on: prior 1 * 0.5**5
    assert st.add_copies(items, "cpu", min_prior=0.4) == 1
    assert {i for i in range(4) if K(i) in st.cpu} == {0, 2}
    for i in range(4):
        assert torch.equal(st.read(K(i)), data(1024, i))


def test_add_copies_admits_by_value_when_the_batch_does_not_fit(tmp_path):
    """More newcomers than the tier holds: residents and newcomers are ranked together by the eviction
    order and the best that fit stay; the rest of the newcomers are not copied in (only to be evicted)."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=4 * 1024, importance_decay=0.5,
                               disk_path=str(tmp_path)))
    for i in range(8):
        st.put(K(i), data(1024, i), tier="disk")
    assert st.add_copies([(K(i), data(1024, i)) for i in (0, 1)], "cpu") == 2
    st.tick()
    st.touch([K(0), K(5)], 1.0)  # resident K(0) was chosen again, and newcomer K(5)
    st.touch([K(0)], 1.0)
    st.touch([K(6)], 0.5)
    n = st.add_copies([(K(i), data(1024, i)) for i in (2, 3, 4, 5, 6, 7)], "cpu")
    # ranked: K0 (2.0), K5 (1.0), K6 (0.5), then valueless by recency and age: K7 beats K2, K3, K4 and K1
    assert n == 3 and {i for i in range(8) if K(i) in st.cpu} == {0, 5, 6, 7}
    assert st.cpu.used_bytes <= 4 * 1024
    for i in range(8):
        assert torch.equal(st.read(K(i)), data(1024, i))


def test_add_copies_hands_slots_over_and_moves_last_copies_down(tmp_path):
    """Newcomers take the slots of victims of their size that have a disk copy (no allocator work); a
    victim whose cpu copy is its only one is moved down to disk first, and a newcomer of another size
    is put the usual way. Every chunk reads back its own bytes, and listeners hear of every move."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=8 * 1024, importance_decay=0.5,
                               disk_path=str(tmp_path)))
    for i in range(4):  # 4 KiB of chunks with a disk copy
        st.put(K(i), data(1024, i), tier="cpu")
    assert st.write_back() == 4
    st.flush()
    for i in (4, 5):  # 4 KiB of chunks only in the cpu tier
        st.put(K(i), data(2048, i), tier="cpu")
    # (write_back not called for them: evicting them must write them)
    sizes = {10: 1024, 11: 1024, 12: 1024, 13: 2048, 14: 1536}
    for i, n in sizes.items():
        st.put(K(i), data(n, i), tier="disk")
    st.tick()
    st.touch([K(i) for i in sizes], 1.0)  # the newcomers outrank every resident
    events = []
    st.add_listener(lambda k, t: events.append((k.index, t)))
    evictions = st.stats().evictions.get("cpu", 0)
    allocs = []
    alloc = st.cpu.arena.alloc
    st.cpu.arena.alloc = lambda n: allocs.append(n) or alloc(n)
    got = st.add_copies([(K(i), data(n, i)) for i, n in sizes.items()], "cpu")
    assert sorted(allocs) == [1536, 2048]  # the three of 1024 bytes took their victims' slots
    assert got == 5 and all(K(i) in st.cpu for i in sizes)
    assert st.cpu.used_bytes <= 8 * 1024
    gone = [i for i in range(6) if K(i) not in st.cpu]
    assert set(gone) >= {4, 5} and all(K(i) in st.disk for i in range(6))  # the last copies went down
    assert st.stats().evictions["cpu"] - evictions == len(gone)
    assert {(i, "cpu") for i in gone} <= set(events) and {(i, "cpu") for i in sizes} <= set(events)
    assert {(4, "disk"), (5, "disk")} <= set(events)
    for i in range(6):
        assert torch.equal(st.read(K(i)), data(2048 if i in (4, 5) else 1024, i))
    for i, n in sizes.items():
        assert torch.equal(st.read(K(i), "cpu"), data(n, i))
    st.close()


def test_cpu_copies_shadowed_by_gpu_copies_go_first(tmp_path):
    """A chunk in the gpu tier is read there, so its cpu copy serves nothing: with a disk copy below it,
    the cpu tier gives that copy up before any other, however valuable the chunk (the two tiers then
    cache different chunks). One with no disk copy is ranked as usual (its cpu copy is its record)."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=4 * 1024, importance_decay=0.5,
                               disk_path=str(tmp_path)))
    for i in (0, 2, 3):
        st.put(K(i), data(1024, i), tier="cpu")
    assert st.write_back() == 3
    st.put(K(1), data(1024, 1), tier="gpu")  # in the gpu and cpu tiers, not yet on disk (no write_back)
    st.promote(K(0), "gpu")
    for i in (10, 11):
        st.put(K(i), data(1024, i), tier="disk")
    st.tick()
    st.touch([K(i) for i in range(4)], 5.0)  # every resident outranks the newcomers
    st.touch([K(10), K(11)], 1.0)
    got = st.add_copies([(K(i), data(1024, i)) for i in (10, 11)], "cpu")
    assert got == 1 and K(0) not in st.cpu and K(0) in st.gpu  # K0's cpu copy made way
    assert sum(K(i) in st.cpu for i in (10, 11)) == 1
    assert all(K(i) in st.cpu for i in (1, 2, 3))  # K1's cpu copy is its record: ranked as usual
    for i in (0, 1, 2, 3, 10, 11):
        assert torch.equal(st.read(K(i)), data(1024, i))
    st.close()


def test_shadowed_copies_are_bounded_and_only_noted_with_a_disk_tier(tmp_path):
    """Without a disk tier a cpu copy is a chunk's record, never shadowed: nothing is noted. With one,
    the notes of chunks that left the gpu tier do not pile up beyond a bound of the gpu tier's size."""
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=64 * 1024))
    for i in range(8):
        st.put(K(i), data(1024, i), tier="cpu")
        st.promote(K(i), "gpu")
    assert len(st.eviction.shadowed) == 0
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=400 * 1024, disk_path=str(tmp_path)))
    for i in range(300):  # the gpu tier holds 4 of them at a time
        st.put(K(i), data(1024, i % 7), tier="cpu")
        st.promote(K(i), "gpu")
        assert len(st.eviction.shadowed) <= 2 * len(st.gpu) + 64 + 1
    assert all(K(i) in st.gpu for i in range(296, 300)) and K(299) in st.eviction.shadowed
    st.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_promote_many_matches_promote_one_by_one(tmp_path, device):
    """promote_many does what promote(key, "gpu") does for each key, best first: into free room (one
    batch of copies on CUDA) and past it (the gpu tier's lowest chunks evicted), skipping chunks not in
    the cpu tier and counting those already up as hits; it never evicts a chunk of its own batch, so
    it stops where no more room can be made. The gpu copies hold their chunk's bytes even when the cpu
    slots they were copied from are rewritten at once (the host waits for the batch's copies)."""
    def fresh(name):
        cfg = TierConfig(gpu_budget=6 * 1024, cpu_budget=16 * 1024, importance_decay=0.5,
                         disk_path=str(tmp_path / name))
        st = ChunkStore(cfg, device=device)
        for i in range(12):
            st.put(K(i), data(1024, i), tier="cpu")
        st.write_back()
        for i in (20, 21):
            st.put(K(i), data(1024, i), tier="disk")
        for i in (0, 10, 11):
            st.promote(K(i), "gpu")
        st.tick()
        return st

    keys = [K(i) for i in (1, 0, 3, 20, 4, 5)]  # K0 already up, K20 only on disk
    vals = [1.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    one, many = fresh("one"), fresh("many")
    for k, v in sorted(zip(keys, vals), key=lambda e: -e[1]):
        one.touch([k], v)
        if k in one.cpu:  # one already up counts as a gpu hit
            one.promote(k, "gpu")
    with pytest.raises(ConfigError, match="2 importance values"):
        many.promote_many(keys, vals[:2])
    assert many.promote_many(keys, vals) == 4
    for st in (one, many):
        st.settle()
    for k in [K(i) for i in range(12)] + [K(20), K(21)]:
        assert one.residency(k) == many.residency(k), k
    assert sorted(many.gpu.keys()) == [K(i) for i in (0, 1, 3, 4, 5, 11)]  # K10 made room (lowest)
    for name in ("hits", "misses", "bytes_moved"):
        assert getattr(many.stats(), name) == getattr(one.stats(), name), name
    # a batch of the tier's chunks but one, and two more: room for one, made by evicting the outsider
    batch = [k for k in many.gpu.keys() if k != K(11)] + [K(6), K(7)]
    assert many.promote_many(batch, [9.0] * 5 + [1.0, 8.0]) == 1
    assert K(7) in many.gpu and K(6) not in many.gpu and K(11) not in many.gpu  # the best newcomer went up
    assert all(k in many.gpu for k in batch[:5])
    assert many.promote_many([k for k in many.gpu.keys()] + [K(8)]) == 0  # nothing outside the batch
    # rewrite every cpu slot: evict the cpu copies (all on disk) and fill the tier with other chunks
    up = list(many.gpu.keys())
    for k in up:
        if k in many.cpu:
            many.evict(k, "cpu")
    for i in range(100, 116):
        many.put(K(i), torch.full((1024,), 255 - i, dtype=torch.uint8), tier="cpu")
    for k in up:
        assert torch.equal(many.read(k, "gpu").cpu(), data(1024, k.index)), k
    one.close()
    many.close()


@pytest.mark.parametrize("seed", range(6))
def test_add_copies_keeps_what_a_full_ranking_keeps(tmp_path, seed):
    """Victims come from a heap kept across calls (entries go stale as chunks are touched, evicted and
    put back): after every batch the tier holds exactly the best chunks by a full ranking of its old
    contents and the newcomers, with the protected ones kept whatever their rank; and every chunk
    still reads back its own bytes."""
    rng = random.Random(seed)
    n, cap = 40, 10
    st = ChunkStore(TierConfig(gpu_budget=4 * 1024, cpu_budget=cap * 1024, importance_decay=0.8,
                               disk_path=str(tmp_path)))
    for i in range(n):
        st.put(K(i), data(1024, i), tier="disk")
    for step in range(60):
        st.tick()
        st.touch(rng.sample([K(i) for i in range(n)], rng.randint(0, 12)), rng.choice([0.5, 1.0, 3.0]))
        if rng.random() < 0.2 and len(st.cpu):  # now and then one goes by hand
            st.evict(rng.choice(list(st.cpu.keys())), "cpu")
        before = set(st.cpu.keys())
        new = [K(i) for i in rng.sample(range(n), rng.randint(1, 14)) if K(i) not in before]
        protect = set(rng.sample(sorted(before), min(len(before), rng.randint(0, 4))))
        want_new = {k for k in new}
        ranked = sorted((before - protect) | want_new, key=st.eviction.rank, reverse=True)
        expect = protect | set(ranked[: cap - len(protect)])
        got = st.add_copies([(k, data(1024, k.index)) for k in new], "cpu", protect=protect)
        assert set(st.cpu.keys()) == expect, step
        assert got == len(expect & want_new)
        for m in st.eviction.records.values():  # touch's ranks, written out there, are rank_for's to the bit
            assert st.eviction.rank_for(m.importance, m.step, m.order) == m.rank
    for i in range(n):
        assert torch.equal(st.read(K(i)), data(1024, i))
    st.close()


@pytest.mark.gpu
@pytest.mark.parametrize("share", [0.25, 1.5])
def test_put_many_from_the_gpu_keeps_every_chunks_bytes(tmp_path, share):
    """put_many of device data into pinned cpu slots (copies on a side stream): with a batch larger
    than the cpu tier, its first chunks are moved down to disk to make room for its last ones, and each
    must take its own bytes there; the slots start out holding other data, so stale bytes would show."""
    n, count = 1000, 48
    cfg = TierConfig(gpu_budget=4096, cpu_budget=int(count * 1024 * share), disk_path=str(tmp_path / "d"))
    st = ChunkStore(cfg, device="cuda")
    old = torch.full((count, n), 7, dtype=torch.uint8, device="cuda")
    st.put_many([K(i, stream="old") for i in range(count)], old)  # fills (and churns) the cpu slots first
    g = torch.Generator(device="cuda").manual_seed(int(share * 100))
    new = torch.randint(0, 256, (count, n), dtype=torch.uint8, device="cuda", generator=g)
    keys = [K(i) for i in range(count)]
    st.put_many(keys, new)
    assert st.stats().resident_chunks["disk"] > 0
    for i, key in enumerate(keys):
        assert torch.equal(st.read(key).cpu(), new[i].cpu()), (i, st.residency(key))
    for i in range(count):
        assert torch.equal(st.read(K(i, stream="old")).cpu(), old[i].cpu())
    st.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_write_back_gives_cpu_chunks_a_disk_copy_and_eviction_then_writes_nothing(tmp_path, device):
    """write_back queues a disk copy of each chunk put into the cpu tier that has none (those already
    moved down are not written twice): after it, evicting them from the cpu tier writes nothing, and
    every chunk reads back its own bytes from disk (on CUDA from slots that put_many filled by
    asynchronous device-to-host copies, which write_back waits for)."""
    n = 1000
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=8 * 1024, disk_path=str(tmp_path / "d")), device=device)
    g = torch.Generator().manual_seed(3)
    chunks = torch.randint(0, 256, (12, n), dtype=torch.uint8, generator=g)
    keys = [K(i) for i in range(12)]
    st.put_many(keys, chunks.to(device))  # 12 into a tier of 8: the first ones move down on the way
    st.flush()
    written = st.disk.stats().chunks_written
    on_disk = {k for k in keys if "disk" in st.residency(k)}
    assert 0 < written == len(on_disk) < 12
    assert st.write_back() == 12 - written
    assert st.write_back() == 0  # nothing new since
    st.flush()
    assert st.disk.stats().chunks_written == 12
    for k in keys:
        if k in st.cpu:
            st.evict(k, "cpu")
    st.flush()
    assert st.disk.stats().chunks_written == 12  # evicting chunks with a disk copy wrote nothing
    for i, k in enumerate(keys):
        assert st.residency(k) == ("disk",)
        assert torch.equal(st.read(k), chunks[i])
    st.close()


def test_write_back_without_a_disk_tier_or_after_delete_does_nothing(tmp_path):
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=8 * 1024))
    st.put(K(0), data(1000, 0))
    assert st.write_back() == 0
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=8 * 1024, disk_path=str(tmp_path / "d")))
    st.put(K(0), data(1000, 0))
    st.put(K(1), data(1000, 1))
    st.delete(K(0))
    assert st.write_back() == 1
    st.flush()
    assert st.residency(K(1)) == ("cpu", "disk") and K(0) not in st
    st.close()


class Keys(set):
    """A stand-in tier for the eviction policy: a set of keys with a name and a byte budget."""

    def __init__(self, name, budget=6400):
        super().__init__()
        self.name, self.budget = name, budget


def _policy(decay=0.5, disk=True):
    gpu, cpu = Keys("gpu"), Keys("cpu")
    disk = Keys("disk") if disk else None
    return EvictionPolicy(decay, gpu, cpu, disk), gpu, cpu, disk


def _enter(pol, tier, *keys):
    for k in keys:
        if k not in pol:
            pol.admit(k, 100, 0.0)
        tier.add(k)
        pol.entered(tier, k)


def test_eviction_policy_alone_evicts_lowest_decayed_value_first():
    """With no store: value is importance decayed per tick; victims for n bytes come lowest value first,
    then least recently used, then oldest, never a protected one, until n bytes (and at least a 64th of
    the budget) are freed; what was passed over stays a victim for later."""
    pol, gpu, cpu, _ = _policy()
    _enter(pol, cpu, *[K(i) for i in range(5)])
    pol.tick()
    pol.touch([K(2)], 1.0)
    pol.touch([K(0)], 4.0)
    pol.tick(2)
    assert pol.value(K(0)) == 1.0 and pol.value(K(2)) == 0.25 and pol.value(K(1)) == 0.0
    assert pol.records[K(0)].prior == 0.0  # its value just before the step it was touched in
    evicted = []

    def evict(k):
        cpu.discard(k)
        evicted.append(k)
        return 100

    pol.evict_for(cpu, 250, protect={K(1)}, evict=evict)
    assert evicted == [K(3), K(4), K(2)]  # never touched (oldest first), then the lowest value
    assert pol.lowest(cpu, (), []) == K(1)  # the protected one is still in line
    with pytest.raises(ChunkNotFoundError):
        pol.touch([K(9)])


def test_eviction_policy_alone_gives_up_shadowed_cpu_copies_first():
    """A cpu copy shadowed by a gpu copy, with a disk copy below, is the cpu tier's first victim however
    valuable its chunk; without a disk tier nothing is ever noted as shadowed."""
    pol, gpu, cpu, disk = _policy()
    _enter(pol, cpu, K(0), K(1))
    pol.touch([K(0)], 9.0)
    gpu.add(K(0))
    disk.update({K(0), K(1)})
    pol.shadow(K(0))
    assert K(0) in pol.shadowed
    evicted = []
    pol.evict_for(cpu, 1, protect=(), evict=lambda k: evicted.append(k) or cpu.discard(k) or 100)
    assert evicted == [K(0)]
    pol, gpu, cpu, _ = _policy(disk=False)
    _enter(pol, cpu, K(0))
    gpu.add(K(0))
    pol.shadow(K(0))
    assert len(pol.shadowed) == 0 and pol.shadow_victim(()) is None


def test_copy_engine_without_cuda_copies_at_once_and_waits_for_nothing():
    eng = CopyEngine(threading.RLock(), torch.device("cpu"), pinned_cpu=False)
    assert eng.idle
    src = torch.arange(16, dtype=torch.uint8)
    into_cpu, into_gpu, uploaded = (torch.zeros(16, dtype=torch.uint8) for _ in range(3))
    eng.write(into_cpu, src, into_gpu=False)
    eng.write(into_gpu, src, into_gpu=True)
    eng.upload([(K(0), src, uploaded)])
    assert all(torch.equal(v, src) for v in (into_cpu, into_gpu, uploaded))
    eng.settle()
    eng.fence_readers()
    eng.wait_inflight(None)  # nothing in flight: no stream is looked at
    assert eng.idle


def test_settle_and_write_back_return_at_once_with_nothing_to_do(tmp_path):
    """The end of a pass calls both unconditionally: with nothing in flight or unwritten they return
    without waiting for the store's lock (held here by a put parked in a listener)."""
    st = ChunkStore(TierConfig(gpu_budget=4096, cpu_budget=8192, disk_path=str(tmp_path / "d")))
    entered, go = threading.Event(), threading.Event()
    st.add_listener(lambda k, t: entered.set() or go.wait(10))
    put = threading.Thread(target=st.put, args=(K(0), data(100, 0)))
    put.start()
    try:
        assert entered.wait(10)
        t0 = time.perf_counter()
        st.settle()
        assert st.write_back() == 0
        assert time.perf_counter() - t0 < 1
    finally:
        go.set()
        put.join()
    assert st.write_back() == 1  # the put, done now, left one chunk to write
    st.close()
