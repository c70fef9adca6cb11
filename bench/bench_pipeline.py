"""The three-tier pipeline with most of the KV on disk, side by side in one run (GPU).

A Llama-3-8B-shaped model with random weights, one long context (128K by default), tierkv sparse
decode with the cpu tier at 10% of the KV so that about 90% of the chunks live on disk, in these modes:
  pipeline   prefetch workers stage chunks ahead of need (next-layer prediction), 'wait' miss policy
  sync       the same, but nothing is predicted: every missing chunk is read when a step asks for it
  skip       the pipeline with the 'skip' miss policy: a chunk not staged in time is left out of that
             step (not exact; its tokens/s bound what waiting costs), on request (--modes ... skip)
  all-cpu    a cpu tier that holds all of the KV (the ceiling the pipeline is held against)
The modes of a selection are opened side by side (each in a copy of the model) and timed in turns, window
r of every mode before window r + 1 of any, so that the machine's drift falls on all of them alike.
Reported: tokens/s (the median of --repeats timed windows), the ratio to all-cpu of those medians and the
median of the window-by-window ratios (paired), stall seconds per step, prefetch hit rates
(next-layer and next-step predictions), disk bytes read per token; and the store's disk read throughput
against a raw O_DIRECT read of the same files (cold page cache), in the same run.

    python bench/bench_pipeline.py --disk-dir /tmp/tierkv-cold --json bench/results/pipeline_h100.json
    python bench/bench_pipeline.py --quick        # small model and context, CPU smoke test
    python bench/bench_pipeline.py --model retrieval --context 4096 --budget 256 --chunk-length 16 \
        --window 64 --piece 4096 --json bench/results/pipeline_cpu_retrieval.json   # learned attention
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import mmap
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tierkv  # noqa: E402
from tierkv import TierConfig  # noqa: E402

from bench_decode import _dump, _git, build_model, decode, kv_bytes, llama8b_config, prefill  # noqa: E402


WARMUP_CONTEXT = 8192  # tokens of the untimed run that warms the process up before the modes are measured


def encoded_kv_bytes(cfg, ctx, batch, fmt, chunk_length):
    """Bytes of the KV as the cpu and disk tiers hold it: chunks in `fmt` (int4 is ~0.3 of bf16)."""
    from tierkv.formats import ChunkLayout

    lay = ChunkLayout(fmt, chunk_length, cfg.num_key_value_heads, cfg.head_dim)
    return lay.nbytes * -(-ctx // chunk_length) * cfg.num_hidden_layers * batch


def open_mode(stack, model, cfg, ids, mode, args, device, selection="head"):
    """Enter `mode`'s offload context on `stack` (a model of its own: one model runs in one context at a
    time), prefill, flush the disk tier, decode the warm-up steps; the state timed windows then run on."""
    kv = kv_bytes(cfg, ids.shape[1], ids.shape[0])
    # the cpu tier's share is of the KV in the chunk format, so that (1 - share) of the chunks are on disk
    enc = encoded_kv_bytes(cfg, ids.shape[1], ids.shape[0], args.format, args.chunk_length)
    cpu = int(kv * 1.1) + (256 << 20) if mode == "all-cpu" else int(enc * args.cpu_share)
    disk = None if mode == "all-cpu" else os.path.join(args.disk_dir, f"{mode}-{selection}")
    if disk and os.path.exists(disk):
        shutil.rmtree(disk)
    tcfg = TierConfig(gpu_budget=int(kv * 0.05), cpu_budget=cpu, disk_path=disk, budget=args.budget,
                      format=args.format, sink=4, window=args.window, chunk_length=args.chunk_length,
                      selection=selection, miss_policy="skip" if mode == "skip" else "wait")
    cache = stack.enter_context(tierkv.offload(model, tcfg))
    cache.predict = mode in ("pipeline", "skip")
    cache.gpu_installs = args.gpu_installs
    pre, tok = prefill(model, ids, cache, args.piece)
    if cache.store.disk is not None:
        cache.store.flush()
    decode(model, cache, tok, 0, args.warmup)
    return dict(mode=mode, selection=selection, model=model, cache=cache, tok=tok, prefill_s=pre, kv=kv, cpu=cpu,
                before=cache.stats(), windows=[], seconds=0.0, prof=None, trace=[])


def window_trace(st, args):
    """What one timed window of a disk mode moved (outside its timing): chunk-file bytes read per token,
    the share of gathered entries the gpu tier served, and the gpu tier's chunk count after it; a warm-up
    of the gpu tier shows as these moving from window to window."""
    s = st["cache"].stats()
    last = st.get("last_stats") or st["before"]
    st["last_stats"] = s
    read = (s.prefetch.get("bytes_read", 0) or 0) - (last.prefetch.get("bytes_read", 0) or 0)
    entries = sum(s.hits[t] for t in ("gpu", "cpu", "disk")) - sum(last.hits.get(t, 0) for t in ("gpu", "cpu", "disk"))
    gpu = s.hits["gpu"] - last.hits.get("gpu", 0)
    return dict(disk_bytes_per_token=read / (args.steps * args.batch),
                gpu_served=gpu / entries if entries else None, gpu_chunks=s.resident_chunks.get("gpu", 0))


def time_window(st, args):
    """One timed window of args.steps decode steps of a mode opened by open_mode (profiled on request)."""
    if args.profile_dir and st["mode"] != "all-cpu" and st["prof"] is None:
        import cProfile

        st["prof"] = cProfile.Profile()
    t0 = time.perf_counter()
    if st["prof"] is not None:
        st["prof"].enable()
    st["windows"].append(decode(st["model"], st["cache"], st["tok"], 0, args.steps))
    if st["prof"] is not None:
        st["prof"].disable()
    st["seconds"] += time.perf_counter() - t0
    if st["mode"] != "all-cpu":
        st["trace"].append(window_trace(st, args))
    # the next window is another mode's: the prefetch reads and writes this one left in flight must not
    # run (and take the GIL and the disk) in it
    st["cache"].wait_idle()


def close_mode(st, args, batch):
    """The row of a mode whose windows were timed (before its context is left)."""
    cache, before, mode, selection = st["cache"], st["before"], st["mode"], st["selection"]
    after = cache.stats()
    windows = st["windows"]
    tps = statistics.median(windows)
    if st["prof"] is not None:
        _write_profile(st["prof"], os.path.join(args.profile_dir, f"{mode}-{selection}.txt"), args.steps * len(windows))
    steps = args.steps * len(windows)  # the per-step figures are over all timed windows
    disk_bytes = (after.prefetch.get("bytes_read", 0) or 0) - (before.prefetch.get("bytes_read", 0) or 0)
    row = dict(mode=mode, selection=selection, tokens_per_s=tps, tokens_per_s_windows=windows,
               prefill_s=st["prefill_s"], cpu_budget=st["cpu"], kv_bytes=st["kv"],
               stall_s_per_step=(after.stall_seconds - before.stall_seconds) / steps,
               # host time per step in the disk path's parts (stage_from_disk includes the stall)
               host_ms_per_step={k: (v - before.prefetch["host_seconds"][k]) / steps * 1e3
                                 for k, v in after.prefetch["host_seconds"].items()},
               disk_bytes_per_token=disk_bytes / (steps * batch),
               resident=after.resident_chunks, prefetch=after.prefetch, decode_wall_s=st["seconds"],
               windows_trace=st["trace"])
    spread = f" (windows {min(windows):.2f}-{max(windows):.2f})" if len(windows) > 1 else ""
    print(f"  {mode:9s} {selection:6s} tok/s={tps:.2f}{spread} stall/step={row['stall_s_per_step'] * 1e3:.1f} ms "
          f"disk/token={row['disk_bytes_per_token'] / 2**20:.1f} MiB resident={after.resident_chunks} "
          f"next-layer hit={after.prefetch.get('predict_next_layer_hit_rate')} "
          f"next-step hit={after.prefetch.get('predict_next_step_hit_rate')}", flush=True)
    if st["trace"]:
        print("            by window: disk MiB/token " + " ".join(f"{w['disk_bytes_per_token'] / 2**20:.2f}" for w in st["trace"])
              + " | gpu-served " + " ".join("-" if w["gpu_served"] is None else f"{w['gpu_served']:.2f}" for w in st["trace"])
              + " | gpu chunks " + " ".join(str(w["gpu_chunks"]) for w in st["trace"]), flush=True)
    if mode != "all-cpu":
        print("            host ms/step: " + " ".join(f"{k}={v:.1f}" for k, v in row["host_ms_per_step"].items()), flush=True)
    return row


def run_modes(make_model, cfg, ids, modes, args, device, selection="head"):
    """Every mode of `modes` opened side by side (a model each), then timed in turns: window r of every
    mode runs before window r + 1 of any, so that a drift of the machine's speed over the run (it was
    up to 20% between processes and between modes run one after another) falls on all modes alike;
    each mode's ratio to all-cpu is also taken window by window (paired)."""
    with contextlib.ExitStack() as stack:
        states = [open_mode(stack, make_model(), cfg, ids, m, args, device, selection) for m in modes]
        for _ in range(args.repeats):
            for st in states:
                time_window(st, args)
        return [close_mode(st, args, ids.shape[0]) for st in states]


def _write_profile(prof, path, steps):
    """The host-side profile of the timed steps, by own time and by cumulative time (tokens/s under the
    profiler is lower than without it: the row's figures are the profiled run's)."""
    import io
    import pstats

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.StringIO()
    buf.write(f"{steps} decode steps under cProfile\n")
    for order in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(50)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def read_throughput(disk_dir, max_files=1024):
    """Store reads (DiskTier.read_many) against raw O_DIRECT reads of the same chunk files, cold cache.

    Raw: one thread reading the files in turn, and as many threads as the store reads with; the store
    is held against the faster of the two. The store's reader threads are started before the clock.
    """
    from tierkv.profiling import drop_pages
    from tierkv.tiers.disk import DiskTier

    store = DiskTier(disk_dir)
    keys = sorted(store.keys())[:max_files]
    if not keys:
        store.close()
        return None
    paths = [store.chunk_path(k) for k in keys]
    threads = store.read_threads
    # into one buffer (pinned on a GPU machine), as decode steps read the chunks they stage around the arena
    sizes = [store.nbytes(k) for k in keys]
    whole = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    outs = list(torch.split(whole, sizes))
    store.read_many(keys[: 2 * threads], outs[: 2 * threads])  # start the pool's threads, touch the buffer
    whole.fill_(0)
    drop_pages(paths)
    t0 = time.perf_counter()
    data = store.read_many(keys, outs)
    t_store = time.perf_counter() - t0
    nbytes = sum(d.numel() for d in data)
    direct = store.direct_reads
    store.close()
    out = dict(chunks=len(keys), store_seconds=t_store, store_bytes=nbytes, store_gbps=nbytes / t_store / 1e9,
               store_threads=threads, store_o_direct=direct)
    if hasattr(os, "O_DIRECT"):
        _raw_throughput(paths, threads, out)
    return out


def _raw_throughput(paths, threads, out):
    """Raw O_DIRECT reads of `paths`, one thread and `threads` threads, cold cache, into `out`."""
    from concurrent.futures import ThreadPoolExecutor

    from tierkv.profiling import drop_pages

    size = max(os.path.getsize(p) for p in paths)
    size = (size + 4095) // 4096 * 4096

    def raw_read(ps, buf):
        got = 0
        for p in ps:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            try:
                got += os.readv(fd, [buf])
            finally:
                os.close(fd)
        return got

    try:
        drop_pages(paths)
        t0 = time.perf_counter()
        file_bytes = raw_read(paths, mmap.mmap(-1, size))
        out["raw"] = dict(seconds=time.perf_counter() - t0, bytes=file_bytes, threads=1)
        drop_pages(paths)
        bufs = [mmap.mmap(-1, size) for _ in range(threads)]
        with ThreadPoolExecutor(threads) as ex:
            t0 = time.perf_counter()
            file_bytes = sum(ex.map(lambda j: raw_read(paths[j::threads], bufs[j]), range(threads)))
            out["raw_parallel"] = dict(seconds=time.perf_counter() - t0, bytes=file_bytes, threads=threads)
    except OSError as e:  # a filesystem without O_DIRECT (tmpfs): say so
        out["raw"] = dict(error=str(e))
        return
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in (out["raw"], out["raw_parallel"])]
    out["raw_gbps"], out["raw_parallel_gbps"] = rates
    out["store_over_raw"] = out["store_gbps"] / max(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--format", default="int4")
    p.add_argument("--chunk-length", type=int, default=64)
    p.add_argument("--cpu-share", type=float, default=0.10, help="cpu tier budget as a share of the KV in --format")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of --steps steps per mode; tokens/s is the median window's")
    p.add_argument("--piece", type=int, default=16384)
    p.add_argument("--modes", nargs="+", default=["all-cpu", "sync", "pipeline"],
                   choices=["all-cpu", "sync", "pipeline", "skip"])
    p.add_argument("--disk-dir", default="/tmp/tierkv-bench-pipeline")
    p.add_argument("--model", default="llama8b", choices=["llama8b", "retrieval"],
                   help="llama8b: Llama-3-8B-shaped, random weights; retrieval: the shipped trained model")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--selection", nargs="+", default=["head"], choices=["head", "shared"],
                   help="TierConfig.selection, each measured in every mode ('shared' reads each chunk file for "
                        "all heads at once); ratios are taken within one selection")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile-dir", default=None,
                   help="profile the timed steps of the disk modes with cProfile; text reports written here")
    p.add_argument("--json", default=None)
    p.add_argument("--gpu-installs", action="store_true",
                   help="chunks read from disk go into the gpu tier as well as the cpu tier (TierKVCache.gpu_installs)")
    p.add_argument("--no-process-warmup", dest="process_warmup", action="store_false",
                   help="leave out the short untimed run (first mode, first selection, at most "
                        f"{WARMUP_CONTEXT} tokens) made before the measured modes")
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "context", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.context, args.steps, args.warmup, args.piece, args.budget = 4096, 4, 1, 2048, 256
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.model == "retrieval":
        # the shipped model, whose attention is learned: a passkey prompt, so the decode steps look for
        # one place in the context the way retrieval does (random weights attend anywhere, step to step)
        from tierkv.models import load_retrieval_model
        from tierkv.models.tasks import make_prompts

        model, _ = load_retrieval_model(device=device, dtype=torch.bfloat16)
        cfg = model.config
        prompts = make_prompts("passkey", args.context, args.batch, seed=1234)
        ids = torch.tensor([p.input_ids for p in prompts], device=device)
    else:
        cfg = llama8b_config(args.quick)
        model = build_model(cfg, device)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device=device)
    os.makedirs(args.disk_dir, exist_ok=True)
    results = dict(bench="pipeline", model=args.model, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   torch=torch.__version__, tierkv=tierkv.__version__, git_commit=_git(), command=" ".join(sys.argv),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args), rows=[])
    results["ratios"] = {}
    # each mode runs in a model of its own (a copy: the same weights), all of a selection's modes open at once
    def make_model():
        return copy.deepcopy(model)

    if args.process_warmup:
        # the first mode of a process ran slower than the same mode later in it (one-time set-up: kernels,
        # handles, allocator pools), which favoured whichever mode came later: one short untimed run first
        print("process warm-up (not measured):", flush=True)
        warm = argparse.Namespace(**{**vars(args), "steps": max(1, args.warmup), "repeats": 1, "profile_dir": None})
        run_modes(make_model, cfg, ids[:, : min(ids.shape[1], WARMUP_CONTEXT)], args.modes[:1], warm, device,
                  args.selection[0])
    results["paired_ratios"] = {}
    for selection in args.selection:
        print(f"selection {selection!r}", flush=True)
        rows = run_modes(make_model, cfg, ids, args.modes, args, device, selection)
        results["rows"].extend(rows)
        if args.json:
            _dump(results, args.json)
        by = {r["mode"]: r for r in rows}
        if "all-cpu" in by:
            base = by["all-cpu"]
            ratios = {f"{m}_over_all_cpu": by[m]["tokens_per_s"] / base["tokens_per_s"]
                      for m in ("pipeline", "sync", "skip") if m in by}
            results["ratios"][selection] = ratios
            # window r of a mode over window r of all-cpu (timed one after the other): the median of these
            results["paired_ratios"][selection] = {
                f"{m}_over_all_cpu": statistics.median(
                    a / b for a, b in zip(by[m]["tokens_per_s_windows"], base["tokens_per_s_windows"]))
                for m in ("pipeline", "sync", "skip") if m in by}
            if selection == args.selection[0]:  # the first selection's also at the top level, as before
                results.update(ratios)
    for m in ("pipeline", "sync"):
        d = os.path.join(args.disk_dir, f"{m}-{args.selection[0]}")
        if os.path.isdir(d):
            results["disk_read"] = read_throughput(d)
            break
    print(json.dumps({k: v for k, v in results.items() if k.endswith("all_cpu") or k in ("ratios", "paired_ratios", "disk_read")}, indent=1))
    if args.json:
        _dump(results, args.json)


if __name__ == "__main__":
    main()
