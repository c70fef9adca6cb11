"""The shipped retrieval model: its vocabulary, task generators, evaluation helper and packaged weights."""

import json

import pytest
import torch

from tierkv.compat import cache_kwarg
from tierkv.errors import ConfigError
from tierkv.models import load_retrieval_model, retrieval_model_dir
from tierkv.models.tasks import (
    PASSKEY_DIGITS, TASKS, VALUE_DIGITS, VOCAB, Vocab, evaluate, make_prompt, make_prompts,
    make_training_sequence, question_length, training_rng,
)

HAVE_WEIGHTS = (retrieval_model_dir() / "model.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="retrieval weights not trained yet")


def test_vocab_is_fixed_and_round_trips():
    v = Vocab()
    assert len(v) == 640 and len(set(v.tokens)) == 640
    assert v.tokens == VOCAB.tokens  # construction is deterministic
    # the ids the shipped weights depend on
    assert (v.PAD, v.BOS, v.EOS) == (0, 1, 2)
    assert [v.tokens[i] for i in (4, 5, 6, 7)] == ["PASSKEY", "KEY", "QUERY", "."]
    assert [v.tokens[v.digit(d)] for d in range(10)] == [str(d) for d in range(10)]
    assert v.tokens[26] == "baba" and v.tokens[346] == "Bab"
    ids = list(range(640))
    assert v.encode(v.decode(ids)) == ids
    assert v.decode(torch.tensor([[1, 16, 25]])) == "<bos> 0 9"
    with pytest.raises(ConfigError, match="'hello'"):
        v.encode("KEY hello")
    with pytest.raises(ConfigError, match="640"):
        v.decode([640])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [64, 257, 1000, 4096])
def test_prompts_are_well_formed(task, length):
    p = make_prompt(task, length, seed=3, index=5)
    assert len(p.input_ids) == length and p.task == task
    assert p.input_ids[0] == VOCAB.BOS and p.input_ids[-2] == VOCAB.QUERY
    digits = set(range(VOCAB.DIGIT0, VOCAB.DIGIT0 + 10))
    assert len(p.answer_ids) == (PASSKEY_DIGITS if task == "passkey" else VALUE_DIGITS)
    assert set(p.answer_ids) <= digits
    s, e = p.needle
    needle = list(p.input_ids[s:e])
    if task == "passkey":
        assert p.input_ids[-1] == VOCAB.PASSKEY
        assert needle == [VOCAB.PASSKEY, *p.answer_ids, VOCAB.PERIOD]
        assert p.input_ids.count(VOCAB.PASSKEY) == 2  # the needle and the question, nothing else
    else:
        key = p.input_ids[-1]
        assert VOCAB.KEY0 <= key < VOCAB.KEY0 + VOCAB.N_KEYS
        assert needle == [VOCAB.KEY, key, *p.answer_ids, VOCAB.PERIOD]
        assert p.input_ids.count(key) == 2  # keys are unique within a prompt
        assert p.input_ids.count(VOCAB.KEY) == max(2, length // 64)
    # digits appear only inside needles/pairs, never in the filler
    outside = p.input_ids[:s] + p.input_ids[e:]
    if task == "passkey":
        assert not set(outside) & digits


def test_prompts_are_deterministic_and_seeds_differ():
    a = make_prompts("kv", 512, 4, seed=7)
    assert a == make_prompts("kv", 512, 4, seed=7)
    assert a[0] != a[1]
    assert all(x.input_ids != y.input_ids for x, y in zip(a, make_prompts("kv", 512, 4, seed=8)))
    # lengths draw from separate streams: the 512 prompt is not a prefix-extension of the 256 one
    assert make_prompt("passkey", 256, 7).answer_ids != make_prompt("passkey", 512, 7).answer_ids or \
        make_prompt("passkey", 256, 7).needle != make_prompt("passkey", 512, 7).needle


def test_needle_depths_cover_the_context():
    depths = [p.needle[0] / len(p) for p in make_prompts("passkey", 1024, 200, seed=0)]
    assert min(depths) < 0.1 and max(depths) > 0.9


def test_bad_arguments_are_rejected():
    with pytest.raises(ConfigError, match="task 'nope'"):
        make_prompt("nope", 256, 0)
    with pytest.raises(ConfigError, match="length 10"):
        make_prompt("kv", 10, 0)
    with pytest.raises(ConfigError, match="n_pairs 300"):
        make_prompt("kv", 512, 0, n_pairs=300)
    with pytest.raises(ConfigError, match="do not fit"):
        make_prompt("kv", 128, 0, n_pairs=100)


@pytest.mark.parametrize("task", TASKS)
def test_training_sequences(task):
    ids, mask = make_training_sequence(task, 512, training_rng(0, 3, 1), n_queries=8)
    again = make_training_sequence(task, 512, training_rng(0, 3, 1), n_queries=8)
    assert (ids, mask) == again and len(ids) == len(mask) == 512
    targets = [t for t, m in zip(ids, mask) if m]
    assert all(VOCAB.DIGIT0 <= t < VOCAB.DIGIT0 + 10 for t in targets)
    # every answer run follows the asked token (PASSKEY or a key name) right after QUERY
    for i, m in enumerate(mask):
        if m and not mask[i - 1]:
            assert ids[i - 2] == VOCAB.QUERY and (ids[i - 1] == VOCAB.PASSKEY or ids[i - 1] >= VOCAB.KEY0)
    assert len(targets) == (PASSKEY_DIGITS if task == "passkey" else 8 * VALUE_DIGITS)


def test_training_sequence_pair_count():
    ids, _ = make_training_sequence("kv", 512, training_rng(0, 0, 0), n_queries=8, n_pairs=40)
    assert len(ids) == 512 and ids.count(VOCAB.KEY) == 40
    with pytest.raises(ConfigError, match="n_pairs 0"):
        make_training_sequence("kv", 512, training_rng(0, 0, 0), n_pairs=0)


def test_training_sequence_digit_pool():
    """kv rows with a digit pool: every value digit (in the context and in the answers) is from the pool,
    each answer is still the value after its key, and plain rows are unchanged by the option."""
    plain = make_training_sequence("kv", 512, training_rng(0, 5, 2), n_queries=8)
    assert make_training_sequence("kv", 512, training_rng(0, 5, 2), n_queries=8, pool=None) == plain
    ids, mask = make_training_sequence("kv", 512, training_rng(0, 5, 2), n_queries=8, pool=[3, 7])
    assert len(ids) == 512 and ids != plain[0]
    digits = {t - VOCAB.DIGIT0 for t in ids if VOCAB.DIGIT0 <= t < VOCAB.DIGIT0 + 10}
    assert digits == {3, 7}
    where = {ids[i + 1]: ids[i + 2 : i + 2 + VALUE_DIGITS] for i, t in enumerate(ids) if t == VOCAB.KEY}
    for i, m in enumerate(mask):
        if m and not mask[i - 1]:
            assert ids[i : i + VALUE_DIGITS] == where[ids[i - 1]]
    for bad in ([], [3, 10]):
        with pytest.raises(ConfigError, match="pool"):
            make_training_sequence("kv", 512, training_rng(0, 5, 2), pool=bad)


class _Oracle(torch.nn.Module):
    """A stand-in model that 'retrieves' by reading the prompt: checks evaluate's decoding and caching loop."""

    def __init__(self, prompts, wrong=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.by_prefix = {p.input_ids: p.answer_ids for p in prompts}
        self.wrong = set(wrong)
        self.calls = []

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kw):
        from types import SimpleNamespace
        cache = kw.pop(cache_kwarg())  # the name the installed transformers' models take
        assert not kw, kw
        if cache is None:
            cache = {"rows": input_ids.tolist()}
        else:
            for row, t in zip(cache["rows"], input_ids.tolist()):
                row.extend(t)
        self.calls.append(input_ids.shape)
        logits = torch.zeros(input_ids.shape[0], 1, VOCAB.SIZE)
        for b, row in enumerate(cache["rows"]):
            for n in range(len(row), 0, -1):
                if tuple(row[:n]) in self.by_prefix:
                    ans = self.by_prefix[tuple(row[:n])]
                    k = len(row) - n
                    tok = ans[k] if k < len(ans) else VOCAB.EOS
                    if tuple(row[:n]) in self.wrong and k == len(ans) - 1:
                        tok = VOCAB.DIGIT0 + (tok - VOCAB.DIGIT0 + 1) % 10
                    logits[b, 0, tok] = 1.0
                    break
        return SimpleNamespace(logits=logits, **{cache_kwarg(): cache})


def test_evaluate_decodes_through_the_cache_and_scores_exact_match():
    prompts = make_prompts("kv", 128, 5, seed=1) + make_prompts("passkey", 96, 4, seed=1)
    oracle = _Oracle(prompts, wrong={prompts[1].input_ids, prompts[6].input_ids})
    made = []

    def factory():
        made.append(1)
        return None  # the oracle builds its own "cache" like a model given none

    res = evaluate(oracle, prompts, cache_factory=factory, batch_size=3)
    assert (res.correct, res.total) == (7, 9) and res.accuracy == pytest.approx(7 / 9)
    assert res.hits == [i not in (1, 6) for i in range(9)]
    assert res.predictions[0][:VALUE_DIGITS] == prompts[0].answer_ids
    # batches never mix lengths: 96 x4 -> 3+1, 128 x5 -> 3+2 prefills
    prefills = [s for s in oracle.calls if s[1] > 1]
    assert sorted(s[0] for s in prefills) == [1, 2, 3, 3] and len(made) == 4
    with pytest.raises(ConfigError):
        evaluate(oracle, [])


def test_cache_kwargs_use_the_name_transformers_wants(cache_kwargs, output_cache):
    import warnings

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 2, 3]])
    cache = DynamicCache(config=cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert output_cache(out) is cache and cache.get_seq_length() == 3
    if cache_kwarg() == "cache":  # why the helper exists: the old name draws a warning on every call
        with pytest.warns(FutureWarning, match="past_key_values"):
            model(input_ids=ids, past_key_values=DynamicCache(config=cfg))


def test_loader_reports_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_retrieval_model(path=tmp_path)


@needs_weights
def test_shipped_weights_load_with_the_documented_config():
    from transformers import LlamaForCausalLM

    model, vocab = load_retrieval_model(device="cpu", dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and vocab is VOCAB and not model.training
    cfg = json.loads((retrieval_model_dir() / "config.json").read_text())
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (640, cfg["hidden_size"], cfg["num_hidden_layers"])
    assert c.head_dim in (64, 128, 256) and c.num_attention_heads % c.num_key_value_heads == 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    size = (retrieval_model_dir() / "model.safetensors").stat().st_size
    assert size <= 30 * 2**20


@needs_weights
@pytest.mark.parametrize("task,length,need", [("passkey", 256, 16), ("kv", 256, 12)])
def test_shipped_model_answers_short_prompts(task, length, need):
    # held-out accuracy on 200 prompts: passkey 97.5% and kv 97% at 256 (bench/results/train_retrieval_h200.json);
    # a broken load or wrong vocabulary scores ~0, so a loose bar still catches it
    model, _ = load_retrieval_model(device="cpu", dtype=torch.bfloat16)
    prompts = make_prompts(task, length, 16, seed=4242)
    res = evaluate(model, prompts, batch_size=16)
    assert res.correct >= need, res.summary()


# --- the tasks that stress tierkv: depth, several needles, close distractors, conversations -------------

def test_existing_tasks_are_unchanged():
    """The shipped model's prompts and training rows, byte for byte as before the long-context tasks came:
    a digest of passkey and kv prompts at four lengths and of training rows with and without a digit pool."""
    import hashlib

    h = hashlib.sha256()
    for task in ("passkey", "kv"):
        for length in (64, 300, 1024, 4096):
            for p in make_prompts(task, length, 5, seed=1234):
                h.update(json.dumps([p.input_ids, p.answer_ids, p.needle]).encode())
        for length in (256, 1000):
            for pool in ((None,) if task == "passkey" else (None, [3, 7])):
                ids, mask = make_training_sequence(task, length, training_rng(5, 7, 1), 8, None, pool)
                h.update(json.dumps([ids, mask]).encode())
    assert h.hexdigest() == "fd2b67513c1a269454789ca4051609561d2ed427b137936757ab5a58f48db06e"


def _pair_len(task):
    return {"passkey": PASSKEY_DIGITS + 2, "kv": VALUE_DIGITS + 3, "near": VALUE_DIGITS + 4}[task]


@pytest.mark.parametrize("task", ["passkey", "kv", "near"])
def test_needle_sits_at_the_asked_depth(task):
    """depth d: a share d of the prompt's filler words precede the needle, exactly; everything else (the
    answer, the other pairs) is the same prompt at every depth."""
    length = 1000
    prompts = [make_prompt(task, length, seed=2, index=3, depth=d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    n_pairs = 1 if task == "passkey" else max(3 if task == "near" else 1, length // 64)
    n_filler = length - 1 - question_length(task) - n_pairs * _pair_len(task)
    for p, d in zip(prompts, (0.0, 0.25, 0.5, 0.75, 1.0)):
        s, e = p.needle
        assert len(p) == length and p.depth == d and e - s == _pair_len(task)
        marker = VOCAB.PASSKEY if task == "passkey" else VOCAB.KEY
        pieces_before = p.input_ids[1:s].count(marker) if task != "passkey" else 0
        assert s - 1 - pieces_before * _pair_len(task) == round(d * n_filler)
        assert p.input_ids[e - 1] == VOCAB.PERIOD and tuple(p.input_ids[e - 1 - len(p.answer_ids) : e - 1]) == p.answer_ids
    assert len({p.answer_ids for p in prompts}) == 1 and len({p.input_ids[-2:] for p in prompts}) == 1
    assert prompts[0].needle[0] == 1 and prompts[-1].needle[1] == length - question_length(task)
    with pytest.raises(ConfigError, match="depth 1.5"):
        make_prompt(task, length, 0, depth=1.5)


def test_near_distractors_differ_from_the_asked_key_in_one_name():
    for i in range(20):
        p = make_prompt("near", 2048, seed=5, index=i)
        s, e = p.needle
        asked = p.input_ids[s + 1 : s + 3]
        assert p.input_ids[-3:] == (VOCAB.QUERY, *asked) and p.input_ids[s] == VOCAB.KEY
        assert p.input_ids[s + 3 : s + 3 + VALUE_DIGITS] == p.answer_ids
        assert p.distractors, "every asked key has a near key beside it"
        for a, b in p.distractors:
            other = p.input_ids[a + 1 : a + 3]
            assert sum(x != y for x, y in zip(other, asked)) == 1
        # no other pair holds the asked key: the answer is unique
        keys = [p.input_ids[j + 1 : j + 3] for j, t in enumerate(p.input_ids[:-3]) if t == VOCAB.KEY]
        assert keys.count(asked) == 1


def test_multi_needle_prompts():
    p = make_prompt("multi", 4096, seed=1, index=0, depths=[0.1, 0.4, 0.6, 0.9])
    assert len(p.needles) == 4 and p.needle in p.needles and len(p) == 4096
    assert p.input_ids.count(VOCAB.KEY) == 4  # nothing but the needles among the filler
    for (s, e), d in zip(p.needles, [0.1, 0.4, 0.6, 0.9]):
        assert abs(s / 4096 - d) < 0.01
    s, _ = p.needle
    assert p.input_ids[-1] == p.input_ids[s + 1] and p.input_ids[s + 2 : s + 6] == p.answer_ids
    assert make_prompt("multi", 4096, seed=1, index=0, depths=[0.1, 0.4, 0.6, 0.9]) == p
    with pytest.raises(ConfigError, match="depths has 2"):
        make_prompt("multi", 4096, 1, depths=[0.1, 0.2])


@pytest.mark.parametrize("task", ["kv", "near", "multi"])
def test_conversation_turns_extend_each_other(task):
    from tierkv.models.turns import make_conversation

    conv = make_conversation(task, 2048, seed=9, turns=4, gap=12)
    assert conv == make_conversation(task, 2048, seed=9, turns=4, gap=12)
    assert len(conv) == 4 and len(set(conv.order)) == 4 and len(conv.turns[0]) == 2048
    needles = [t.needle for t in conv]
    assert len(set(needles)) == 4  # each turn asks another needle of the same history
    for t, turn in enumerate(conv):
        s, e = turn.needle
        assert e <= len(conv.history.input_ids)  # in the history, far before the question
        assert turn.input_ids[s:e][-1 - VALUE_DIGITS : -1] == turn.answer_ids
        assert turn.input_ids[-question_length(task):] == conv.history.questions[conv.order[t]]
        if t:
            prev = conv.turns[t - 1]
            grown = prev.input_ids + prev.answer_ids + conv.new_ids(t)
            assert turn.input_ids == grown
            assert conv.new_ids(t)[0] == VOCAB.PERIOD and len(conv.new_ids(t)) == 1 + 12 + question_length(task)
    assert conv.new_ids(0) == conv.turns[0].input_ids
    with pytest.raises(ConfigError, match="turns 99"):
        make_conversation("multi", 2048, 0, turns=99, n_pairs=4)
    with pytest.raises(ConfigError, match="passkey"):
        make_conversation("passkey", 2048, 0)


def test_near_training_rows():
    ids, mask = make_training_sequence("near", 1024, training_rng(0, 1, 2), n_queries=6)
    assert len(ids) == len(mask) == 1024 and sum(mask) == 6 * VALUE_DIGITS
    pairs = {tuple(ids[i + 1 : i + 3]): ids[i + 3 : i + 3 + VALUE_DIGITS] for i, t in enumerate(ids) if t == VOCAB.KEY}
    for i, m in enumerate(mask):
        if m and not mask[i - 1]:
            assert ids[i - 3] == VOCAB.QUERY and ids[i : i + VALUE_DIGITS] == pairs[tuple(ids[i - 2 : i])]


# --- sharded checkpoints and sharded weights ------------------------------------------------------------

def test_sharded_checkpoint_round_trip_and_checks(tmp_path):
    from tierkv.models.checkpoint import load_sharded, save_sharded

    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(300, 700, generator=g), "half": torch.randn(64, 64, generator=g).bfloat16(),
             "step": torch.tensor([7])}
    files = save_sharded(state, tmp_path / "ck", meta={"step": 7}, max_bytes=(64 << 10) + 300 * 1024,
                         extra_files={"log.txt": "hello"})
    shards = sorted((tmp_path / "ck").glob("shard-*.safetensors"))
    assert len(shards) >= 3 and all(f.stat().st_size <= (64 << 10) + 300 * 1024 for f in shards)
    assert "log.txt" in files and "index.json" in files
    back, meta = load_sharded(tmp_path / "ck")
    assert meta == {"step": 7} and set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    # replaced whole: a second save leaves only its own files
    save_sharded({"x": torch.zeros(3)}, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["index.json", "shard-00000.safetensors"]
    shard = tmp_path / "ck" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        load_sharded(tmp_path / "ck")
    with pytest.raises(ConfigError, match="index.json"):
        load_sharded(tmp_path)


def test_loader_reads_hugging_face_shards(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / f))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg.save_pretrained(str(tmp_path))
    model, _ = load_retrieval_model(path=tmp_path, dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in names)
    with pytest.raises(ConfigError, match="'nope'"):
        load_retrieval_model(name="nope")


@pytest.mark.skipif((retrieval_model_dir("long") / "model.safetensors").is_file(), reason="the long model is trained")
def test_long_model_not_yet_trained_says_so():
    with pytest.raises(ConfigError, match="config.json"):
        load_retrieval_model(name="long")
