"""bench/train_long_model.py on the CPU: a run stopped and resumed from its checkpoint continues exactly as
the uninterrupted run; the curriculum, the optimizer, the batches and the checkpoint's size on their own."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import train_long_lib as lib  # noqa: E402
import train_long_model as tlm  # noqa: E402

from tierkv.errors import ConfigError  # noqa: E402
from tierkv.models.tasks import TRAIN_TASKS, VOCAB  # noqa: E402


def _comparable(history):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in history]


def test_resumed_run_continues_exactly(tmp_path, capsys):
    """10 steps in one go, and 7 + 3 with a checkpoint between (the cooldown, decided before the stop, starts
    after it): the same losses and weight sums at every step, the same curriculum, the same final weights
    and optimizer moments."""
    torch.set_num_threads(1)
    whole = tlm.main(["--quick", "--out", str(tmp_path / "whole"), "--stop-after", "10", "--eval-prompts", "0"])
    first = tlm.main(["--quick", "--out", str(tmp_path / "part"), "--stop-after", "7", "--eval-prompts", "0"])
    assert len(first["history"]) == 7 and first["curriculum"]["cooldown_start"] == 8  # decided, not begun
    second = tlm.main(["--quick", "--resume", str(tmp_path / "part"), "--out", str(tmp_path / "part2"),
                       "--stop-after", "10", "--eval-prompts", "0"])
    assert _comparable(second["history"]) == _comparable(whole["history"])
    assert second["curriculum"] == whole["curriculum"] and whole["curriculum"]["cooldown_start"] is not None
    a, meta_a = tlm.load_checkpoint(tmp_path / "whole")
    b, meta_b = tlm.load_checkpoint(tmp_path / "part2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if k != "rng.cpu")
    assert meta_a["step"] == meta_b["step"] == 10 and len(meta_b["calls"]) == 2
    assert any(k.startswith("opt.v.") and a[k].dtype == torch.bfloat16 for k in a)
    out = capsys.readouterr().out
    assert out.count("TRAIN_LONG ") == 3 and "resumed" in out


def test_resume_refuses_other_training_arguments(tmp_path):
    tlm.main(["--quick", "--out", str(tmp_path / "c"), "--stop-after", "1", "--eval-prompts", "0"])
    with pytest.raises(SystemExit):
        tlm.main(["--quick", "--resume", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--lr", "0.01"])


def test_export_loads_as_a_retrieval_model(tmp_path):
    from tierkv.models import load_retrieval_model
    from tierkv.models.tasks import evaluate, make_prompts

    tlm.main(["--quick", "--out", str(tmp_path / "c"), "--stop-after", "2", "--eval-prompts", "1"])
    report = tlm.main(["--export", str(tmp_path / "c"), "--out", str(tmp_path / "model")])
    model, vocab = load_retrieval_model(path=tmp_path / "model")
    assert vocab is VOCAB and model.config.num_hidden_layers == 2 and report["step"] == 2
    assert json.loads((tmp_path / "model" / "train_long.json").read_text())["weights_sha256"] == report["weights_sha256"]
    res = evaluate(model, make_prompts("kv", 128, 2, seed=0), batch_size=2)
    assert res.total == 2  # answers are noise after two steps; the path is what is checked


def test_plan_prints_every_stage(capsys):
    rows = tlm.main(["--plan"])["plan"]
    assert [r["length"] for r in rows] == [s.length for s in lib.parse_stages(tlm.STAGES)]
    assert all(r["seconds"][0] <= r["seconds"][1] for r in rows)
    # the longest stage's full-length step: about 1.9 GFLOP of attention per token at 128K
    assert rows[-1]["top_step_s"] > 10 * rows[0]["top_step_s"]
    assert "cooldown_steps" in capsys.readouterr().out


def test_default_checkpoint_fits_the_carry_and_the_file_limit(tmp_path):
    """The default model's checkpoint: at most 15 MiB a file, at most 8 files, and small enough to travel
    with the repository in the device call's 64 MiB working tree."""
    _, a = tlm.parse_args(["--out", str(tmp_path / "x")])
    config = tlm.model_config(a)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    opt = lib.make_optimizer(model, 1e-3, 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert sum(p.numel() for p in model.parameters()) == 4_264_192
    from tierkv.models.checkpoint import save_sharded

    files = save_sharded(tlm.checkpoint_state(model, opt), tmp_path / "ck", {"x": 1})
    sizes = [(tmp_path / "ck" / f).stat().st_size for f in files]
    assert len(files) <= 6 and max(sizes) <= 15 << 20 and sum(sizes) <= 34 << 20


def test_training_forward_never_builds_a_mask(monkeypatch):
    """A 128K-token row must not materialise a causal mask (128K x 128K): attention runs with is_causal."""
    from transformers import LlamaForCausalLM

    _, a = tlm.parse_args(["--quick", "--out", "unused"])
    model = LlamaForCausalLM(tlm.model_config(a))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("attn_mask"), kw.get("is_causal")))
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, mask, _ = lib.build_batch(lib.BatchSpec(0, 0, 256, 2, (("kv", 1.0),), 32))
    lib.answer_loss(model, torch.from_numpy(ids), torch.from_numpy(mask), False)[0].backward()
    assert calls and all(m is None and c for m, c in calls)


# --- the parts alone --------------------------------------------------------------------------------------

def _curriculum(**kw):
    args = dict(stages=lib.parse_stages("256:2:5,512:2:5"), tasks=["kv"], seed=0, tokens_per_step=1024, lr=1.0,
                warmup=2, cooldown=4, min_lr_ratio=0.1, gate=0.5, window=2, delay=3)
    args.update(kw)
    return lib.Curriculum(**args)


def test_curriculum_gate_delay_and_cooldown():
    c = _curriculum()
    top = c.top_length(0)
    assert top == 256 + lib.MARGIN and c.lr(0) == 0.5 and c.lr(5) == 1.0
    assert c.observe(0, top, {"kv": [1.0, 1.0]}) is None  # min_steps not done yet
    event = c.observe(1, top, {"kv": [1.0]})
    assert event["starts_at"] == 4 and not event["forced"] and c.starts == [0, 4]
    assert c.top_length(3) == top and c.top_length(4) == 512 + lib.MARGIN  # the delay
    assert c.observe(2, top, {"kv": [1.0]}) is None  # a switch is on its way: nothing more decided
    for s in range(4, 9):  # never exact: the stage ends at its max steps, forced, and the cooldown begins
        event = c.observe(s, c.top_length(s), {"kv": [0.0]}) or event
    assert event["forced"] and event["decided_at"] == 8 and c.cooldown_start == 8 + 3
    assert c.lr(c.cooldown_start - 1) == 1.0 and c.lr(c.cooldown_start + 3) == pytest.approx(0.1)
    assert not c.done(c.cooldown_start + 3) and c.done(c.cooldown_start + 4)
    again = _curriculum()
    again.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert again.state_dict() == c.state_dict() and again.shape(9) == c.shape(9)


def test_curriculum_shapes_mix_full_and_shorter_lengths():
    c = _curriculum(stages=lib.parse_stages("4096:1:1"), tokens_per_step=65536)
    shapes = [c.shape(s) for s in range(400)]
    full = [s for s in shapes if s[0] == 4096 + lib.MARGIN]
    assert 150 < len(full) < 250 and all(lib.MIN_TRAIN_LENGTH <= n <= 4224 and n % 64 == 0 for n, _ in shapes)
    assert all(rows == max(1, round(65536 / n)) for n, rows in shapes)
    assert shapes == [c.shape(s) for s in range(400)]


def test_adamw_bf16_matches_adamw_closely_and_is_deterministic():
    torch.manual_seed(0)
    w0 = torch.randn(32, 16)
    grads = [torch.randn(32, 16) for _ in range(20)]
    runs = []
    for cls in (lib.AdamWBf16, lib.AdamWBf16, torch.optim.AdamW):
        p = torch.nn.Parameter(w0.clone())
        opt = cls([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert torch.allclose(runs[0], runs[2], atol=3e-3)
    assert (runs[0] - w0).abs().mean() > 0.02  # it moved (20 steps of 1e-2)


def test_batches_are_deterministic_and_well_formed():
    spec = lib.BatchSpec(3, 17, 1024, 6, (("passkey", 0.2), ("kv", 0.5), ("near", 0.3)), 32)
    ids, mask, kind = lib.build_batch(spec)
    again = lib.build_batch(spec)
    assert all(np.array_equal(x, y) for x, y in zip((ids, mask, kind), again))
    assert ids.shape == mask.shape == (6, 1024) and (ids[:, 0] == VOCAB.BOS).all()
    for r in range(6):
        task = TRAIN_TASKS[kind[r]]
        answers = mask[r].sum()
        assert answers == (5 if task == "passkey" else 4 * lib.queries_for(1024)) or task != "passkey" and answers % 4 == 0


def test_exact_by_task_counts_whole_answers():
    mask = np.zeros((2, 12), dtype=bool)
    mask[0, [3, 4, 7, 8]] = True  # two answers of two tokens in row 0
    mask[1, [5, 6, 7]] = True     # one answer of three tokens in row 1
    kind = np.array([TRAIN_TASKS.index("kv"), TRAIN_TASKS.index("near")])
    right = np.array([True, True, True, False, True, True, True])
    loss = np.arange(7, dtype=float)
    exact, task_loss = lib.exact_by_task(mask, kind, right, loss)
    assert exact == {"kv": [0.5], "near": [1.0]}
    assert task_loss == {"kv": pytest.approx(1.5), "near": pytest.approx(5.0)}


def test_stage_and_mix_parsing_errors():
    for bad in ("512:3", "100:1:2", "512:5:2", "1024:1:2,512:1:2"):
        with pytest.raises(ValueError):
            lib.parse_stages(bad)
    assert lib.parse_mix("kv:1,near:3") == {"kv": 0.25, "near": 0.75}
    with pytest.raises(ValueError):
        lib.parse_mix("multi:1")
    with pytest.raises(ConfigError):
        from tierkv.models.checkpoint import load_sharded
        load_sharded("/nonexistent-dir")


def test_worker_processes_build_the_same_batches(tmp_path):
    """Batches built ahead in forked workers train exactly as batches built in the loop itself."""
    runs = [tlm.main(["--quick", "--out", str(tmp_path / f"w{w}"), "--stop-after", "8", "--eval-prompts", "0",
                      "--switch-delay", "4", "--workers", str(w)]) for w in (0, 2)]
    assert _comparable(runs[0]["history"]) == _comparable(runs[1]["history"])
    with pytest.raises(SystemExit):  # batches may not be built further ahead than the switch delay
        tlm.parse_args(["--quick", "--out", "x", "--workers", "3", "--switch-delay", "4"])
