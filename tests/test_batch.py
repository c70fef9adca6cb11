"""`tierkv batch` on the CPU with the shipped model: input checking, the results journal, resuming
after a real SIGKILL, retries, keys that refuse to mix results, and the CLI's messages and exit codes."""

import dataclasses
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tierkv import TierConfig
from tierkv.batch import (BatchInputError, BatchOptions, ResultsConflictError, ResultsFileError, example_path,
                          load_model, run_batch)
from tierkv.batch.journal import ResultsJournal
from tierkv.batch.requests import InputReader, InputSpec, Problem, Request
from tierkv.batch.schedule import Capacity, plan
from tierkv.cli.main import main
from tierkv.models import VOCAB
from tierkv.models.tasks import make_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small chunks and a small window so that even 100-token prompts are cut into chunks in the cpu tier;
# budget=None decodes exactly (every chunk), the fastest path on a CPU
TIER = TierConfig(budget=None, cpu_budget="64MiB", gpu_budget="4MiB", window=16, sink=4, chunk_length=16)
TIER_ARGS = ["--budget", "none", "--cpu-budget", "64MiB", "--gpu-budget", "4MiB", "--window", "16", "--sink", "4",
             "--chunk-length", "16", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two threads waiting for
    each other at every op made each batch about five times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model()


def requests_file(path, n=10, seed=0, lengths=(64, 80, 96, 112, 128), sampled=(), **extra):
    """n retrieval prompts (cycling through tasks and lengths) as a JSONL file; returns the records."""
    recs = []
    for i in range(n):
        task = ("passkey", "kv")[i % 2]
        p = make_prompt(task, lengths[i % len(lengths)], seed, i)
        rec = {"id": f"r{i}", "prompt": VOCAB.decode(p.input_ids), "max_new_tokens": len(p.answer_ids), **extra}
        if i in sampled:
            rec.update(temperature=0.8, top_k=20, seed=i)
        recs.append(rec)
    write_lines(path, [json.dumps(r) for r in recs])
    return recs


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def read_results(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_id(results):
    return {r["id"]: r for r in results}


def opts(**kw):
    return BatchOptions(tier=kw.pop("tier", TIER), **kw)


# --- reading the input --------------------------------------------------------------------------------
SPEC = InputSpec(VOCAB.encode, VOCAB.SIZE, 300, default_max_new_tokens=None)


def problems_of(tmp_path, lines, spec=SPEC):
    p = tmp_path / "in.jsonl"
    write_lines(p, lines)
    items = list(InputReader(str(p), spec))
    return [i for i in items if isinstance(i, Request)], [str(i) for i in items if isinstance(i, Problem)]


def test_each_bad_line_gets_one_message_naming_line_and_problem(tmp_path):
    good = '{"id": "a", "prompt": "<bos> KEY Bak 1 2 3 4 . QUERY Bak", "max_new_tokens": 4}'
    lines = [
        good,
        '{"id": "b", "prompt": "<bos> QUERY",',  # 2: malformed
        "[1, 2]",  # 3: not an object
        '{"prompt": "<bos>", "max_new_tokens": 1}',  # 4: no id
        '{"id": "c", "max_new_tokens": 1}',  # 5: no prompt
        '{"id": "d", "prompt": "<bos>"}',  # 6: no max_new_tokens
        '{"id": "e", "prompt": "<bos>", "max_new_tokens": 1, "temprature": 0.5}',  # 7: unknown parameter
        good,  # 8: duplicate id
        json.dumps({"id": "f", "prompt": [1] * 299, "max_new_tokens": 2}),  # 9: too long
        '{"id": "g", "prompt": "<bos> hello", "max_new_tokens": 1}',  # 10: not in the vocabulary
        '{"id": "h", "prompt": [1, 640], "max_new_tokens": 1}',  # 11: id out of range
        '{"id": "i", "prompt": "<bos>", "max_new_tokens": 1, "temperature": "hot"}',  # 12
        '{"id": "j", "prompt": "<bos>", "max_new_tokens": 0}',  # 13
        '{"id": "k", "prompt": "  ", "max_new_tokens": 1}',  # 14
        "",  # 15: blank lines are skipped silently
        '{"id": true, "prompt": "<bos>", "max_new_tokens": 1}',  # 16
        '{"id": "l", "prompt": "<bos>", "max_new_tokens": 1, "top_p": 0}',  # 17
    ]
    reqs, problems = problems_of(tmp_path, lines)
    assert [r.id for r in reqs] == ["a"]
    assert problems == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 37)",
        "line 3: expected a JSON object, got a list",
        "line 4: missing field 'id'",
        "line 5: missing field 'prompt'",
        "line 6: missing field 'max_new_tokens' (or pass a default: --max-new-tokens)",
        "line 7: unknown parameter 'temprature' (did you mean 'temperature'?); expected only id, prompt, "
        "max_new_tokens, temperature, top_p, top_k, seed, meta",
        'line 8: duplicate id "a" (first on line 1)',
        "line 9: prompt of 299 tokens + max_new_tokens 2 = 301 exceeds the model's 300 positions",
        "line 10: prompt: token 'hello' is not in the retrieval vocabulary (see tierkv/models/retrieval/README.md)",
        "line 11: prompt: token 1 is 640; expected an integer id in [0, 640)",
        "line 12: temperature: expected a number, got 'hot'",
        "line 13: max_new_tokens: expected an integer >= 1, got 0",
        "line 14: prompt: empty text",
        "line 16: id: expected a string or an integer, got a boolean",
        "line 17: top_p: expected a number in (0, 1], got 0",
    ]
    assert all("\n" not in p for p in problems)


def test_undecodable_bytes_are_a_malformed_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": [1], "max_new_tokens": 1}\n{"id": "\xff"}\n')
    items = list(InputReader(str(p), SPEC))
    assert isinstance(items[0], Request)
    assert str(items[1]) == "line 2: not UTF-8 text (at column 9)" and items[1].kind == "malformed"


def test_defaults_and_request_digest(tmp_path):
    spec = dataclasses.replace(SPEC, default_max_new_tokens=7)
    reqs, problems = problems_of(tmp_path, ['{"id": 7, "prompt": [1, 2, 3]}', '{"id": "7", "prompt": [1, 2, 3]}'], spec)
    assert not problems  # 7 and "7" are different ids
    a, b = reqs
    assert a.max_new_tokens == 7 and a.greedy and a.key == "7" and b.key == '"7"'
    assert a.digest() == b.digest()  # same prompt and parameters
    sampled = dataclasses.replace(a, temperature=0.5)
    assert sampled.digest() != a.digest()
    assert sampled.sampling_seed() == dataclasses.replace(a, temperature=0.9).sampling_seed()  # from the id
    # a greedy request's sampling fields decide nothing, so they do not change its key
    assert dataclasses.replace(a, top_k=5, seed=3).digest() == a.digest()


# --- planning -------------------------------------------------------------------------------------------
def _req(i, n, new=4):
    return Request(f"q{i}", i + 1, np.ones(n, dtype=np.int32), new)


def test_plan_groups_by_length_deterministically():
    lengths = [100, 900, 120, 880, 110, 300, 890, 105]
    reqs = [_req(i, n) for i, n in enumerate(lengths)]
    batches = plan(reqs, lambda length, new: 3, pad_waste=0.25)
    assert [[m.id for m in b.members] for b in batches] == [["q0", "q7", "q4"], ["q2"], ["q5"], ["q3", "q6", "q1"]]
    shuffled = plan(list(reversed(reqs)), lambda length, new: 3, pad_waste=0.25)
    assert [[m.id for m in b.members] for b in shuffled] == [[m.id for m in b.members] for b in batches]
    # no padding allowed: only equal lengths share a batch
    assert all(len(b) == 1 for b in plan(reqs, lambda length, new: 8, pad_waste=0.0))


def test_capacity_from_the_budgets(lm):
    cfg = TierConfig(cpu_budget="1MiB", chunk_length=16, format="bf16")
    cap = Capacity.for_model(lm.model, cfg)
    per_seq = cap.chunk_bytes(1000)
    # 4 KV heads x 64 dims x K and V x 2 bytes = 1 KiB a token and layer, 4 layers, and the arenas' slack
    assert per_seq == int(4 * 1000 * 1024 * 1.1)
    assert cap.limit(990, 10) == max(1, (1 << 20) // per_seq) == 1
    assert Capacity.for_model(lm.model, cfg.replace(cpu_budget="64MiB")).limit(990, 10) == 8  # the CPU cap
    assert Capacity.for_model(lm.model, cfg.replace(cpu_budget="64MiB"), max_batch=3).limit(990, 10) == 3
    int4 = Capacity.for_model(lm.model, cfg.replace(format="int4"))
    assert int4.chunk_bytes(1000) < per_seq / 2  # 4-bit codes and their scales


# --- generating -----------------------------------------------------------------------------------------
def test_results_match_each_request_run_alone(lm, tmp_path):
    """A row's tokens do not depend on the other rows of its batch (left padding, own positions, own
    sampler); and the shipped model answers these prompts right."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    recs = requests_file(src, n=4, sampled=(3,))
    s = run_batch(str(src), str(out), opts(pad_waste=1.0), model=lm)
    assert s.ok == 4 and s.errors == 0 and s.batches == 1 and s.batch_sizes == [4]
    got = by_id(read_results(out))
    for i, rec in enumerate(recs):
        one, one_out = tmp_path / f"one{i}.jsonl", tmp_path / f"one{i}_out.jsonl"
        write_lines(one, [json.dumps(rec)])
        run_batch(str(one), str(one_out), opts(), model=lm)
        alone = read_results(one_out)[0]
        assert alone["tokens"] == got[rec["id"]]["tokens"], rec["id"]
    for i, rec in enumerate(recs):
        p = make_prompt(("passkey", "kv")[i % 2], (64, 80, 96, 112, 128)[i % 5], 0, i)
        if i != 3:  # greedy
            assert tuple(got[rec["id"]]["tokens"]) == p.answer_ids
    r0 = got["r0"]
    assert r0["status"] == "ok" and r0["finish_reason"] == "length" and r0["text"] == VOCAB.decode(r0["tokens"])
    assert set(r0["timings"]) == {"queue_s", "setup_s", "prefill_s", "decode_s"}
    assert r0["prompt_tokens"] == 64 and r0["output_tokens"] == 5 and r0["batch"] == {"index": 0, "size": 4}


def test_sparse_budget_and_quantized_chunks_give_the_answers(lm, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(src, n=4, lengths=(256, 320))
    cfg = TIER.replace(budget=64, format="int4")
    s = run_batch(str(src), str(out), opts(tier=cfg), model=lm)
    assert s.ok == 4 and s.bytes_moved.get("ingest->cpu", 0) > 0
    for i, r in enumerate(read_results(out)):
        p = make_prompt(("passkey", "kv")[int(r["id"][1:]) % 2], (256, 320)[int(r["id"][1:]) % 2], 0, int(r["id"][1:]))
        assert tuple(r["tokens"]) == p.answer_ids


def test_rows_stop_at_their_own_length_and_at_eos(lm, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    p = make_prompt("passkey", 96, 0, 0)  # its answer's digits, then more tokens
    write_lines(src, [json.dumps({"id": "long", "prompt": list(p.input_ids), "max_new_tokens": 5}),
                      json.dumps({"id": "short", "prompt": list(p.input_ids), "max_new_tokens": 2})])
    run_batch(str(src), str(out), opts(), model=lm)
    res = by_id(read_results(out))
    assert res["long"]["tokens"] == list(p.answer_ids) and res["short"]["tokens"] == list(p.answer_ids[:2])
    j = next(j for j in range(1, 5) if p.answer_ids[j] not in p.answer_ids[:j])  # a digit new at j
    eos_lm = dataclasses.replace(lm, eos_ids=frozenset({p.answer_ids[j]}))
    out2 = tmp_path / "out2.jsonl"
    run_batch(str(src), str(out2), opts(), model=eos_lm)
    res = by_id(read_results(out2))
    assert res["long"]["tokens"] == list(p.answer_ids[:j]) and res["long"]["finish_reason"] == "eos"
    assert res["short"]["finish_reason"] == ("length" if j >= 2 else "eos")


def test_summary_json_and_file_modes(lm, tmp_path):
    src, out, summ = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    requests_file(src, n=3)
    old = os.umask(0)
    try:
        run_batch(str(src), str(out), opts(summary_path=str(summ)), model=lm)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(summ).st_mode) == 0o600
    s = json.loads(summ.read_text())
    assert s["ok"] == 3 and s["output_tokens"] == sum(r["output_tokens"] for r in read_results(out))
    for k in ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s", "bytes_moved", "peak_gpu_bytes",
              "model_digest", "versions", "prefill_s", "decode_s"):
        assert k in s
    assert s["bytes_moved"]["ingest->cpu"] > 0 and s["versions"]["tierkv"]


def test_stream_mode_gives_the_same_tokens(lm, tmp_path):
    src = tmp_path / "in.jsonl"
    requests_file(src, n=7)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_batch(str(src), str(a), opts(), model=lm)
    s = run_batch(str(src), str(b), opts(stream=True, stream_window=3), model=lm)
    assert s.batches >= 3  # windows of 3, 3 and 1 requests
    assert {k: v["tokens"] for k, v in by_id(read_results(a)).items()} == \
           {k: v["tokens"] for k, v in by_id(read_results(b)).items()}


# --- resuming -------------------------------------------------------------------------------------------
N_REF = 8


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory):
    """Eight requests (two sampled), batches of 3, and the results of an uninterrupted run."""
    d = tmp_path_factory.mktemp("ref")
    src, out = d / "in.jsonl", d / "out.jsonl"
    requests_file(src, n=N_REF, lengths=(64, 68, 72, 76, 80), sampled=(4, 7))
    s = run_batch(str(src), str(out), opts(max_batch=3), model=lm)
    res = read_results(out)
    assert len(res) == N_REF and all(r["status"] == "ok" for r in res) and s.batch_sizes == [3, 3, 2]
    return src, {r["id"]: r["tokens"] for r in res}, out.read_bytes()


def _assert_complete(out, expected):
    res = read_results(out)
    ids = [r["id"] for r in res]
    assert sorted(ids) == sorted(expected), "every id exactly once"
    assert {r["id"]: r["tokens"] for r in res} == expected


@pytest.mark.slow
def test_kill_and_resume_gives_every_id_once_with_the_uninterrupted_outputs(lm, reference, tmp_path):
    """A real SIGKILL of `tierkv batch` at random points (before, between and after results), then
    --resume: every id exactly once, the tokens of the uninterrupted run."""
    src, expected, _ = reference
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for trial in range(3):
        out = tmp_path / f"out{trial}.jsonl"
        cmd = [sys.executable, "-m", "tierkv", "batch", str(src), str(out), "--batch-size", "3", *TIER_ARGS]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_lines = rng.randrange(0, N_REF)  # kill once this many results are in (0: as soon as it opened OUT)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and out.read_bytes().count(b"\n") >= wait_lines:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.02))  # a batch takes about a tenth of a second here
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        done = out.read_bytes().count(b"\n") if out.exists() else 0
        print(f"trial {trial}: killed after {done} of {N_REF} results (asked {wait_lines})")
        s = run_batch(str(src), str(out), opts(max_batch=3, resume=True), model=lm)
        assert s.already_done == done and s.ok == N_REF - done, f"trial {trial}, seed {seed}"
        _assert_complete(out, expected)


def test_resume_recomputes_a_half_done_batch_whole(lm, reference, tmp_path):
    """Results that landed before a crash are not written again; their batch is run again with the
    same members (so the others' tokens are those of the uninterrupted run)."""
    src, expected, results = reference
    out = tmp_path / "out.jsonl"
    lines = results.decode().splitlines(keepends=True)
    first_batch = [ln for ln in lines if json.loads(ln)["batch"]["index"] == 0]
    out.write_text(first_batch[0] + lines[-1])  # one row of batch 0, and a row of the last batch
    s = run_batch(str(src), str(out), opts(max_batch=3, resume=True), model=lm)
    assert s.already_done == 2 and s.ok == N_REF - 2 and s.recomputed == 2
    _assert_complete(out, expected)


def test_torn_last_line_is_cut_away_and_reported(lm, reference, tmp_path):
    src, expected, results = reference
    out = tmp_path / "out.jsonl"
    lines = results.splitlines(keepends=True)
    torn = lines[5][: len(lines[5]) // 2]
    out.write_bytes(b"".join(lines[:5]) + torn)
    s = run_batch(str(src), str(out), opts(max_batch=3, resume=True), model=lm)
    assert s.already_done == 5 and s.ok == N_REF - 5
    assert any("line 6" in n and "torn" in n and f"({len(torn)} bytes)" in n for n in s.notes), s.notes
    _assert_complete(out, expected)
    # a damaged line with results after it was not made by a crash: refused, naming the line
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:2]) + b"garbage\n" + b"".join(lines[2:4]))
    with pytest.raises(ResultsFileError, match=r"line 3 is not a result record"):
        run_batch(str(src), str(bad), opts(max_batch=3, resume=True), model=lm)
    # zeros where a crash left a block unwritten count as torn too
    zeros = tmp_path / "zeros.jsonl"
    zeros.write_bytes(b"".join(lines[:3]) + b"\0" * 100)
    s = run_batch(str(src), str(zeros), opts(max_batch=3, resume=True), model=lm)
    assert s.already_done == 3 and any("torn" in n for n in s.notes)
    _assert_complete(zeros, expected)


def test_retry_errors_reruns_failed_ids(lm, reference, tmp_path, monkeypatch):
    src, expected, _ = reference
    out = tmp_path / "out.jsonl"
    from tierkv.batch import runner

    real_run = runner.Runner.run

    def flaky(self, members, emit):
        if any(m.id == "r5" for m in members):
            raise RuntimeError("injected fault")
        return real_run(self, members, emit)

    monkeypatch.setattr(runner.Runner, "run", flaky)
    s = run_batch(str(src), str(out), opts(max_batch=3), model=lm)
    failed = [r for r in read_results(out) if r["status"] == "error"]
    n_failed = len(failed)
    assert s.errors == n_failed and n_failed in (2, 3) and s.ok == N_REF - n_failed
    assert failed[0]["error"] == "RuntimeError: injected fault"
    monkeypatch.setattr(runner.Runner, "run", real_run)
    s = run_batch(str(src), str(out), opts(max_batch=3, resume=True), model=lm)
    assert s.already_done == N_REF and s.ok == 0  # a plain resume keeps failures as they are
    s = run_batch(str(src), str(out), opts(max_batch=3, resume=True, retry_errors=True), model=lm)
    assert s.retried == n_failed and s.ok == n_failed and s.already_done == N_REF - n_failed
    _assert_complete(out, expected)


def test_out_of_memory_splits_the_batch(lm, reference, tmp_path, monkeypatch):
    src, expected, _ = reference
    from tierkv.batch import runner

    real_run = runner.Runner.run

    def small_only(self, members, emit):
        if len(members) > 2:
            raise torch.OutOfMemoryError("injected: too big")
        return real_run(self, members, emit)

    monkeypatch.setattr(runner.Runner, "run", small_only)
    out = tmp_path / "out.jsonl"
    s = run_batch(str(src), str(out), opts(max_batch=3), model=lm)
    assert s.ok == N_REF and s.batch_sizes == [1, 2, 1, 2, 2]
    assert any("OutOfMemoryError" in n and "two halves" in n for n in s.notes)
    assert sorted(r["id"] for r in read_results(out)) == sorted(expected)


def test_keys_refuse_to_mix_results(lm, reference, tmp_path):
    src, _, results = reference
    out = tmp_path / "out.jsonl"
    out.write_bytes(results)
    other = dataclasses.replace(lm, digest="0123456789abcdef")
    with pytest.raises(ResultsConflictError, match=rf"{N_REF} of the input's ids already have results made with "
                                                   r"another model .*--overwrite"):
        run_batch(str(src), str(out), opts(resume=True), model=other)
    with pytest.raises(ResultsConflictError, match="other cache settings"):
        run_batch(str(src), str(out), opts(resume=True, tier=TIER.replace(format="int8")), model=lm)
    changed = tmp_path / "changed.jsonl"
    recs = [json.loads(line) for line in src.read_text().splitlines()]
    recs[4]["max_new_tokens"] += 1
    write_lines(changed, [json.dumps(r) for r in recs])
    with pytest.raises(ResultsConflictError, match=r"1 of the input's ids .* other generation parameters \(first: "
                                                   r'id "r4"'):
        run_batch(str(changed), str(out), opts(resume=True), model=lm)
    s = run_batch(str(changed), str(out), opts(overwrite=True, max_batch=3), model=lm)
    assert s.ok == N_REF and len(read_results(out)) == N_REF
    assert len(by_id(read_results(out))["r4"]["tokens"]) == recs[4]["max_new_tokens"]


def test_existing_results_need_resume_or_overwrite(lm, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(src, n=2)
    run_batch(str(src), str(out), opts(), model=lm)
    with pytest.raises(ResultsFileError, match="pass --resume to continue it, or --overwrite"):
        run_batch(str(src), str(out), opts(), model=lm)


def test_one_writer_at_a_time(tmp_path):
    out = str(tmp_path / "out.jsonl")
    with ResultsJournal.open(out, "new"):
        with pytest.raises(ResultsFileError, match="being written by another process"):
            ResultsJournal.open(out, "resume")


def test_a_failed_write_leaves_no_half_line(tmp_path, monkeypatch):
    out = str(tmp_path / "out.jsonl")
    key = {"model": "m", "tierkv": "v", "cache": "c", "request": "r"}
    with ResultsJournal.open(out, "new") as j:
        j.append({"id": "a", "status": "ok", "key": key})
        real_write = os.write

        def short_then_full(fd, data):
            if len(data) > 8:
                real_write(fd, bytes(data[:8]))
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", short_then_full)
        with pytest.raises(ResultsFileError, match="No space left on device.*rerun with --resume"):
            j.append({"id": "b", "status": "ok", "key": key})
        monkeypatch.setattr(os, "write", real_write)
    with ResultsJournal.open(out, "resume") as j:
        assert list(j.existing) == ['"a"'] and not j.notes


def test_strict_input_errors_reach_the_caller(lm, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, ['{"id": 1, "prompt": [1, 2], "max_new_tokens": 1}', "{", '{"id": 2}'])
    with pytest.raises(BatchInputError) as e:
        run_batch(str(src), str(out), opts(strict=True), model=lm)
    assert e.value.problems == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 3: missing field 'prompt'"]
    assert out.read_text() == ""


def test_disk_tier_gets_a_directory_per_batch_and_stale_ones_go(lm, tmp_path):
    src, out, disk = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "cold"
    requests_file(src, n=3)
    stale = disk / "tierkv-batch-999999999-abc"  # no such process
    stale.mkdir(parents=True)
    (disk / "keep-me").mkdir()
    cfg = TIER.replace(cpu_budget="48KiB", disk_path=str(disk))  # most chunks must go to disk
    s = run_batch(str(src), str(out), opts(tier=cfg), model=lm)
    assert s.ok == 3 and s.bytes_moved.get("cpu->disk", 0) + s.bytes_moved.get("ingest->disk", 0) > 0, s.bytes_moved
    assert sorted(os.listdir(disk)) == ["keep-me"]
    assert any("tierkv-batch-999999999-abc" in n for n in s.notes)


def tiny_transformers_model(folder, seed=0, tokenizer=True):
    """A small Llama saved by transformers, with a word-level tokenizer of 64 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=3,
                      pad_token_id=0, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    if tokenizer:
        words = ["[PAD]", "[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                eos_token="</s>").save_pretrained(folder)


def test_a_local_transformers_model_with_and_without_tokenizer(tmp_path, capsys):
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    tiny_transformers_model(a)
    tiny_transformers_model(b, seed=1)
    tiny_transformers_model(plain, tokenizer=False)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    text = " ".join(f"w{i % 60}" for i in range(120))
    write_lines(src, [json.dumps({"id": "t", "prompt": text, "max_new_tokens": 6}),
                      json.dumps({"id": "ids", "prompt": list(range(4, 64)), "max_new_tokens": 3}),
                      json.dumps({"id": "long", "prompt": list(range(4, 64)) * 5, "max_new_tokens": 3})])
    code, _, err = run_cli(capsys, src, out, "--model", a, *TIER_ARGS)
    assert code == 2
    assert "line 3: prompt of 300 tokens + max_new_tokens 3 = 303 exceeds the model's 256 positions" in err
    res = by_id(read_results(out))
    assert set(res) == {"t", "ids"} and res["t"]["prompt_tokens"] == 120 and res["t"]["status"] == "ok"
    assert res["t"]["finish_reason"] in ("length", "eos") and isinstance(res["t"]["text"], str)
    # the same request on other weights: refused, not mixed
    code, _, err = run_cli(capsys, src, out, "--resume", "--model", b, *TIER_ARGS)
    assert code == 2 and "another model" in err
    out2 = tmp_path / "out2.jsonl"
    code, _, err = run_cli(capsys, src, out2, "--model", plain, *TIER_ARGS)
    assert code == 2 and f"line 1: prompt: text given, but {plain} has no tokenizer; give token ids instead" in err
    assert read_results(out2)[0]["id"] == "ids" and read_results(out2)[0]["text"] is None


def test_failed_results_kept_by_a_resume_still_exit_1(lm, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(src, n=2)
    assert run_cli(capsys, src, out, *TIER_ARGS)[0] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    lines[0].update(status="error", error="RuntimeError: earlier")
    del lines[0]["tokens"]
    write_lines(out, [json.dumps(r) for r in lines])
    code, _, err = run_cli(capsys, src, out, "--resume", *TIER_ARGS)
    assert code == 1 and "1 request(s) have failed results (0 in this run)" in err
    assert run_cli(capsys, src, out, "--resume", "--retry-errors", *TIER_ARGS)[0] == 0
    assert [r["status"] for r in read_results(out)] == ["ok", "ok"]


# --- the command ----------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    code = main(["batch", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_bad_input_is_reported_and_skipped_with_exit_2(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    recs = requests_file(src, n=3)
    lines = [json.dumps(recs[0]), "{not json", json.dumps({**recs[1], "top": 3}), json.dumps(recs[0]),
             json.dumps(recs[2])]
    write_lines(src, lines)
    code, _, err = run_cli(capsys, src, out, *TIER_ARGS)
    assert code == 2
    assert f"{src}: line 2: not valid JSON" in err
    assert f"{src}: line 3: unknown parameter 'top' (did you mean 'top_p'?)" in err
    assert f'{src}: line 4: duplicate id "r0" (first on line 1)' in err
    assert "3 bad input line(s) skipped" in err and "Traceback" not in err
    assert sorted(r["id"] for r in read_results(out)) == ["r0", "r2"]  # the good lines' work is done


def test_cli_strict_stops_before_generating(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    recs = requests_file(src, n=2)
    write_lines(src, [json.dumps(recs[0]), json.dumps({"id": "x", "prompt": "<bos>"}), json.dumps(recs[1])])
    code, _, err = run_cli(capsys, src, out, "--strict", *TIER_ARGS)
    assert code == 2
    assert "line 2: missing field 'max_new_tokens'" in err and "--strict: nothing was generated" in err
    assert out.read_text() == "" and "Traceback" not in err


def test_cli_usage_errors_exit_2_without_traceback(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(src, n=1)
    cases = [
        ((tmp_path / "missing.jsonl", out), "no such input file"),
        ((src, out, "--retry-errors"), "add --resume"),
        ((src, out, "--resume", "--overwrite"), "choose one"),
        ((src, out, "--cpu-budget", "lots"), "cpu_budget: cannot read 'lots' as a size"),
        ((src, src), "the same file"),
        ((src, tmp_path / "no" / "out.jsonl", *TIER_ARGS), "does not exist"),
        ((src, out, "--model", tmp_path), "no config.json"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    all_bad = tmp_path / "bad.jsonl"
    write_lines(all_bad, ["{", "[]"])
    code, _, err = run_cli(capsys, all_bad, out, *TIER_ARGS)
    assert code == 2 and "2 bad input lines (no valid request in it)" in err


def test_cli_conflict_and_resume(lm, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(src, n=2)
    assert run_cli(capsys, src, out, *TIER_ARGS)[0] == 0
    code, _, err = run_cli(capsys, src, out, *TIER_ARGS)
    assert code == 2 and "--resume" in err
    code, _, err = run_cli(capsys, src, out, "--resume", *TIER_ARGS)
    assert code == 0 and "Traceback" not in err
    code, _, err = run_cli(capsys, src, out, "--resume", *TIER_ARGS[:-1], "--format", "int8", "--quiet")
    assert code == 2 and "other cache settings" in err and "--overwrite" in err


def test_cli_summary_and_progress(tmp_path, capsys):
    src, out, summ = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "s.json"
    requests_file(src, n=2)
    code, stdout, err = run_cli(capsys, src, out, "--summary", summ, *TIER_ARGS[:-1])
    assert code == 0
    assert "requests/s" in stdout and "tokens/s: total / output" in stdout and "bytes moved ingest->cpu" in stdout
    assert "records" in err  # the progress bar
    assert json.loads(summ.read_text())["ok"] == 2


def test_bundled_example_is_valid_and_answered(lm, tmp_path):
    spec = InputSpec(lm.encode, lm.vocab_size, lm.max_positions)
    items = list(InputReader(str(example_path()), spec))
    assert len(items) >= 24 and all(isinstance(i, Request) for i in items)
    short = sorted(items, key=lambda r: r.prompt_len)[:6]  # the whole example takes tens of seconds here
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [ln for ln in example_path().read_text().splitlines() if json.loads(ln)["id"] in {r.id for r in short}]
    write_lines(src, lines)
    run_batch(str(src), str(out), BatchOptions(), model=lm)
    for r in read_results(out):
        assert r["text"] == r["meta"]["answer"], r["id"]
