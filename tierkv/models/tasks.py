"""Synthetic long-context retrieval tasks of the retrieval models (vocabulary: tierkv.models.vocab).

Every task is built so that losing the region that holds the answer makes the answer wrong:

- passkey: a 5-digit passkey hidden among filler words, asked for at the end.
      <bos> fa ... PASSKEY 7 3 9 1 2 . ... QUERY PASSKEY   ->  7 3 9 1 2
- kv (multi-key associative recall): many `KEY name d d d d .` pairs scattered among filler (the other
  pairs are the distractors), one key asked for at the end.
      <bos> ... KEY Bak 4 8 1 2 . ... KEY Tum 0 5 5 9 . ... QUERY Bak   ->  4 8 1 2
- near (close distractors): keys of two names, `KEY Bak Tum d d d d .`, made in families: beside the
  asked key stand keys that differ from it in one of its two names (`KEY Bak Fiz ...`, `KEY Lon Tum
  ...`), so a chunk that matches the question half-way is a trap.
      <bos> ... KEY Bak Fiz 1 1 0 7 . ... KEY Bak Tum 4 8 1 2 . ... QUERY Bak Tum   ->  4 8 1 2
- multi (several needles): a few `KEY name d d d d .` needles spread over the context at set depths,
  nothing else but filler; the question asks one of them. tierkv.models.turns asks them in turn.

passkey, kv and near take `depth`: the share of the prompt's filler words that precede the asked needle
(0: right after <bos>; 1: right before the question), with everything else drawn as without it, so
prompts of one (seed, index) at different depths differ only in where the needle sits.

The question ends with the very token(s) that precede the answer in the context (the key, or PASSKEY),
so the answer is found by matching them and copying what followed: the induction pattern small
transformers learn fastest. (With a marker between key and value, `KEY Bak VALUE 4 ...` asked as
`QUERY Bak ANSWER`, a first training run learnt passkeys but only 14% of kv answers at 512 tokens: the
first value digit needed a two-token match.)

A prompt of length L has exactly L tokens; the answer is generated greedily after it. Every prompt is a
pure function of (seed, task, length, index, options), so evaluations are reproducible and held-out sets
are simply other seeds than the one used for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tierkv.errors import ConfigError
from tierkv.models.evaluation import EvalResult, evaluate, generate_answers
from tierkv.models.vocab import MAX_KEYS, VOCAB, Vocab

__all__ = ["TASKS", "ALL_TASKS", "TRAIN_TASKS", "Prompt", "History", "make_prompt", "make_prompts", "make_history",
           "make_training_sequence", "training_rng", "default_pairs", "question_length", "evaluate",
           "generate_answers", "EvalResult", "VOCAB", "Vocab", "MAX_KEYS", "PASSKEY_DIGITS", "VALUE_DIGITS",
           "MIN_LENGTH"]

TASKS = ("passkey", "kv")  # the shipped 4-layer model's tasks
ALL_TASKS = ("passkey", "kv", "near", "multi")
TRAIN_TASKS = ("passkey", "kv", "near")  # what make_training_sequence builds
# stable small integers mixed into the RNG seeds; never renumber (held-out sets depend on them)
_TASK_CODE = {"passkey": 1, "kv": 2, "near": 3, "multi": 4}
_PURPOSE_PROMPT = 11
_PURPOSE_TRAIN = 12
PURPOSE_CONVERSATION = 13

PASSKEY_DIGITS = 5
VALUE_DIGITS = 4
MIN_LENGTH = 64
MULTI_NEEDLES = 4


@dataclass(frozen=True)
class Prompt:
    """One evaluation item. `needle` is the token range [start, end) of the context that holds the answer
    (the passkey sentence, or the queried key-value pair): what a sparse cache must not lose.

    needles:     every needle of the context a question could ask (multi; empty for the other tasks).
    distractors: the spans of keys that differ from the asked one in one name (near; empty otherwise).
    depth:       the share of filler before the needle when it was placed on purpose (None: at random).
    """

    task: str
    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    needle: tuple[int, int]
    needles: tuple[tuple[int, int], ...] = ()
    distractors: tuple[tuple[int, int], ...] = ()
    depth: float | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class History:
    """A context without its question, and what can be asked of it (tierkv.models.turns builds on it).

    input_ids:   <bos> + context.
    questions:   per askable needle, the question's tokens (QUERY + key).
    answers:     per askable needle, the answer's tokens.
    needles:     per askable needle, its span [start, end) in input_ids.
    distractors: per askable needle, the spans of keys that differ from its key in one name (near).
    """

    task: str
    input_ids: tuple[int, ...]
    questions: tuple[tuple[int, ...], ...]
    answers: tuple[tuple[int, ...], ...]
    needles: tuple[tuple[int, int], ...]
    distractors: tuple[tuple[tuple[int, int], ...], ...]


def _check(task: str, length: int, tasks: Sequence[str] = ALL_TASKS) -> None:
    if task not in tasks:
        raise ConfigError(f"task {task!r} is unknown; expected one of {tuple(tasks)}")
    if not isinstance(length, (int, np.integer)) or length < MIN_LENGTH:
        raise ConfigError(f"length {length!r} is too short; expected an int >= {MIN_LENGTH}")


def _check_depth(depth) -> None:
    if depth is not None and not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ConfigError(f"depth {depth!r} is out of range; expected a number in [0, 1] or None")


def question_length(task: str) -> int:
    """Tokens of the question that ends a prompt: QUERY + PASSKEY or the key (two names for near)."""
    return 3 if task == "near" else 2


def _filler(rng: np.random.Generator, n: int) -> list[int]:
    """Random filler words with a period every 6-14 words, so the haystack has sentence-like texture."""
    words = (VOCAB.FILLER0 + rng.integers(0, VOCAB.N_FILLER, size=n)).tolist()
    pos = int(rng.integers(6, 15))
    while pos < n:
        words[pos] = VOCAB.PERIOD
        pos += int(rng.integers(7, 16))
    return words


def _digits(rng: np.random.Generator, n: int) -> list[int]:
    return (VOCAB.DIGIT0 + rng.integers(0, 10, size=n)).tolist()


def default_pairs(length: int) -> int:
    """Key-value pairs in a kv prompt: about one per 64 tokens (64 at 4K), so pairs fill ~1/8 of it."""
    return int(min(MAX_KEYS, max(2, length // 64)))


def _scatter_at(filler: list[int], pieces: list[list[int]], cuts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert piece i before filler word cuts[i] (ties keep the pieces' order); returns ids and each piece's span."""
    order = sorted(range(len(pieces)), key=lambda i: (int(cuts[i]), i))
    out: list[int] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    prev = 0
    for i in order:
        cut = int(cuts[i])
        out += filler[prev:cut]
        spans[i] = (len(out), len(out) + len(pieces[i]))
        out += pieces[i]
        prev = cut
    out += filler[prev:]
    return out, spans


def _random_cuts(rng: np.random.Generator, n_filler: int, n_pieces: int) -> list[int]:
    return np.sort(rng.integers(0, n_filler + 1, size=n_pieces)).tolist()


def _scatter(rng: np.random.Generator, filler: list[int], pieces: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert pieces into the filler at random, order-preserving points; returns ids and each piece's span."""
    return _scatter_at(filler, pieces, _random_cuts(rng, len(filler), len(pieces)))


def _depth_cut(depth: float, n_filler: int) -> int:
    return int(round(depth * n_filler))


def _shift(spans, by: int = 1) -> list[tuple[int, int]]:
    return [(a + by, b + by) for a, b in spans]


def _passkey(rng: np.random.Generator, length: int, depth: float | None = None):
    key = _digits(rng, PASSKEY_DIGITS)
    needle = [VOCAB.PASSKEY] + key + [VOCAB.PERIOD]
    question = [VOCAB.QUERY, VOCAB.PASSKEY]
    n_fill = length - 1 - len(needle) - len(question)
    filler = _filler(rng, n_fill)
    cuts = _random_cuts(rng, n_fill, 1)
    if depth is not None:
        cuts = [_depth_cut(depth, n_fill)]
    ctx, spans = _scatter_at(filler, [needle], cuts)
    return [VOCAB.BOS] + ctx + question, key, _shift(spans)[0]


def _kv_parts(rng: np.random.Generator, n_ctx: int, n_pairs: int, pool: Sequence[int] | None = None):
    """keys, values, pieces, filler and sorted random cuts of a kv context of n_ctx tokens (with <bos>).

    `pool`: the digits values are drawn from (all ten when None): with few, values repeat digits and
    resemble each other, so the digit just written says little about the next one."""
    pair_len = 2 + VALUE_DIGITS + 1
    if n_pairs * pair_len > n_ctx - 1:
        raise ConfigError(f"n_pairs {n_pairs} do not fit in {n_ctx} context tokens; expected at most {(n_ctx - 1) // pair_len}")
    keys = (VOCAB.KEY0 + rng.choice(VOCAB.N_KEYS, size=n_pairs, replace=False)).tolist()
    if pool is None:
        values = [_digits(rng, VALUE_DIGITS) for _ in range(n_pairs)]
    else:
        pool = np.asarray(pool, dtype=np.int64)
        values = [(VOCAB.DIGIT0 + rng.choice(pool, size=VALUE_DIGITS)).tolist() for _ in range(n_pairs)]
    pieces = [[VOCAB.KEY, k] + v + [VOCAB.PERIOD] for k, v in zip(keys, values)]
    filler = _filler(rng, n_ctx - 1 - n_pairs * pair_len)
    return keys, values, pieces, filler, _random_cuts(rng, len(filler), n_pairs)


def _kv_context(rng: np.random.Generator, n_ctx: int, n_pairs: int, pool: Sequence[int] | None = None):
    keys, values, pieces, filler, cuts = _kv_parts(rng, n_ctx, n_pairs, pool)
    ctx, spans = _scatter_at(filler, pieces, cuts)
    return [VOCAB.BOS] + ctx, keys, values, _shift(spans)


def _near_keys(rng: np.random.Generator, n_pairs: int) -> list[tuple[int, int]]:
    """n_pairs distinct two-name keys made in families: an anchor (A, B) with (A, X) and (Y, B) beside it."""
    keys: list[tuple[int, int]] = []
    seen = set()
    while len(keys) < n_pairs:
        a, b, x, y = (VOCAB.KEY0 + rng.choice(VOCAB.N_KEYS, size=4, replace=False)).tolist()
        family = [(a, b), (a, x), (y, b)]
        if n_pairs - len(keys) == 1 and keys:  # a lone anchor would have no near key: one more of the first family
            family = [(keys[0][0], x)]
        for k in family:
            if k not in seen and len(keys) < n_pairs:
                seen.add(k)
                keys.append(k)
    return [keys[i] for i in rng.permutation(n_pairs).tolist()]


def near_distractors(keys: Sequence[tuple[int, int]], asked: int) -> list[int]:
    """Indices of the keys that differ from keys[asked] in exactly one of its two names (same place)."""
    a, b = keys[asked]
    return [i for i, (x, y) in enumerate(keys) if i != asked and ((x == a) != (y == b))]


def _near_parts(rng: np.random.Generator, n_ctx: int, n_pairs: int):
    pair_len = 3 + VALUE_DIGITS + 1
    if n_pairs * pair_len > n_ctx - 1:
        raise ConfigError(f"n_pairs {n_pairs} do not fit in {n_ctx} context tokens; expected at most {(n_ctx - 1) // pair_len}")
    keys = _near_keys(rng, n_pairs)
    values = [_digits(rng, VALUE_DIGITS) for _ in range(n_pairs)]
    pieces = [[VOCAB.KEY, a, b] + v + [VOCAB.PERIOD] for (a, b), v in zip(keys, values)]
    filler = _filler(rng, n_ctx - 1 - n_pairs * pair_len)
    return keys, values, pieces, filler, _random_cuts(rng, len(filler), n_pairs)


def _pairs_for(task: str, length: int, n_pairs: int | None) -> int:
    lo = 3 if task == "near" else 1
    n = max(lo, default_pairs(length)) if n_pairs is None else n_pairs
    if not lo <= n <= MAX_KEYS:
        raise ConfigError(f"n_pairs {n} is out of range; expected {lo}..{MAX_KEYS}")
    return n


def _multi_parts(rng: np.random.Generator, n_ctx: int, n_needles: int, depths: Sequence[float] | None):
    if not 1 <= n_needles <= MAX_KEYS:
        raise ConfigError(f"n_needles {n_needles} is out of range; expected 1..{MAX_KEYS}")
    if depths is None:
        depths = [(i + 0.5) / n_needles for i in range(n_needles)]
    if len(depths) != n_needles:
        raise ConfigError(f"depths has {len(depths)} values for {n_needles} needles; expected one per needle")
    for d in depths:
        _check_depth(d)
    keys, values, pieces, filler, _ = _kv_parts(rng, n_ctx, n_needles)
    return keys, values, pieces, filler, [_depth_cut(d, len(filler)) for d in depths]


def make_history(task: str, length: int, seed: int, index: int = 0, n_pairs: int | None = None,
                 depths: Sequence[float] | None = None, purpose: int = PURPOSE_CONVERSATION) -> History:
    """A context of exactly `length` tokens (<bos> included) for kv, near or multi, and its questions.

    kv and near hold `n_pairs` pairs (default: one per 64 tokens), every one askable; multi holds
    `n_pairs` needles (default 4) at `depths` (default evenly spread). The RNG stream is the
    conversations' unless `purpose` says otherwise, so histories are not the prompts of make_prompt."""
    _check(task, length, ("kv", "near", "multi"))
    rng = np.random.default_rng([int(seed), int(purpose), _TASK_CODE[task], int(length), int(index)])
    if task == "multi":
        keys, values, pieces, filler, cuts = _multi_parts(rng, length, n_pairs or MULTI_NEEDLES, depths)
    elif task == "near":
        keys, values, pieces, filler, cuts = _near_parts(rng, length, _pairs_for(task, length, n_pairs))
    else:
        keys, values, pieces, filler, cuts = _kv_parts(rng, length, _pairs_for(task, length, n_pairs))
    ctx, spans = _scatter_at(filler, pieces, cuts)
    spans = _shift(spans)
    if task == "near":
        questions = [(VOCAB.QUERY, a, b) for a, b in keys]
        traps = [tuple(spans[j] for j in near_distractors(keys, i)) for i in range(len(keys))]
    else:
        questions = [(VOCAB.QUERY, k) for k in keys]
        traps = [()] * len(keys)
    return History(task, tuple([VOCAB.BOS] + ctx), tuple(questions), tuple(tuple(v) for v in values),
                   tuple(spans), tuple(traps))


def _asked_prompt(rng, keys, values, pieces, filler, cuts, depth, question_of) -> tuple:
    """Pick the asked pair, move it to `depth` if given, build the ids: (ids, answer, span, spans, q)."""
    q = int(rng.integers(0, len(keys)))
    if depth is not None:
        cuts = list(cuts)
        cuts[q] = _depth_cut(depth, len(filler))
    ctx, spans = _scatter_at(filler, pieces, cuts)
    spans = _shift(spans)
    return [VOCAB.BOS] + ctx + question_of(keys[q]), values[q], spans[q], spans, q


def make_prompt(task: str, length: int, seed: int, index: int = 0, n_pairs: int | None = None,
                depth: float | None = None, depths: Sequence[float] | None = None) -> Prompt:
    """The `index`-th prompt of (task, length, seed): exactly `length` tokens ending in the question.

    n_pairs: pairs of kv and near (default one per 64 tokens), needles of multi (default 4).
    depth:   passkey, kv, near: where the asked needle sits (share of the filler before it; None: random).
    depths:  multi: where each needle sits (default evenly spread)."""
    _check(task, length)
    _check_depth(depth)
    if depth is not None and task == "multi":
        raise ConfigError("depth applies to passkey, kv and near; multi places its needles with depths=[...]")
    rng = np.random.default_rng([int(seed), _PURPOSE_PROMPT, _TASK_CODE[task], int(length), int(index)])
    needles, traps = (), ()
    if task == "passkey":
        ids, answer, span = _passkey(rng, length, depth)
    elif task == "kv":
        parts = _kv_parts(rng, length - 2, _pairs_for(task, length, n_pairs))
        ids, answer, span, _, _ = _asked_prompt(rng, *parts, depth, lambda k: [VOCAB.QUERY, k])
    elif task == "near":
        parts = _near_parts(rng, length - 3, _pairs_for(task, length, n_pairs))
        ids, answer, span, spans, q = _asked_prompt(rng, *parts, depth, lambda k: [VOCAB.QUERY, *k])
        traps = tuple(spans[j] for j in near_distractors(parts[0], q))
    else:
        parts = _multi_parts(rng, length - 2, n_pairs or MULTI_NEEDLES, depths)
        ids, answer, span, spans, _ = _asked_prompt(rng, *parts, None, lambda k: [VOCAB.QUERY, k])
        needles = tuple(spans)
    assert len(ids) == length
    return Prompt(task, tuple(ids), tuple(answer), span, needles, traps, None if depth is None else float(depth))


def make_prompts(task: str, length: int, n: int, seed: int, **kw) -> list[Prompt]:
    """`n` prompts of one task and length; the same arguments give the same prompts on any machine."""
    if n < 1:
        raise ConfigError(f"n {n} prompts requested; expected >= 1")
    return [make_prompt(task, length, seed, i, **kw) for i in range(n)]


def _check_pool(pool) -> None:
    if pool is not None and (len(pool) < 1 or not set(int(d) for d in pool) <= set(range(10))):
        raise ConfigError(f"pool {list(pool)!r} must be a non-empty set of digits 0-9")


def make_training_sequence(task: str, length: int, rng: np.random.Generator, n_queries: int = 8,
                           n_pairs: int | None = None, pool: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """A training sequence of exactly `length` tokens and a 0/1 mask marking answer tokens (the loss targets).

    kv and near sequences carry up to `n_queries` questions in a row (`QUERY k v .`), each about a
    different key, which multiplies the learning signal per sequence; the first question sits exactly
    where an evaluation prompt's does. A passkey sequence has one question (later ones could copy the
    first answer). `n_pairs` overrides default_pairs(length): denser contexts train telling many keys
    apart. `pool` (kv only): the digits its values are drawn from (see _kv_parts); with two or three, the
    digits already answered do not say what comes next, only the place after the key does.
    """
    _check(task, length, TRAIN_TASKS)
    if task == "passkey":
        ids, answer, _ = _passkey(rng, length - PASSKEY_DIGITS)
        mask = [0] * len(ids) + [1] * len(answer)
        return ids + answer, mask
    key_len = 2 if task == "near" else 1
    block = 1 + key_len + VALUE_DIGITS + 1
    n_pairs = _pairs_for(task, length, n_pairs)
    nq = max(1, min(n_queries, n_pairs))
    _check_pool(pool)
    if task == "near" and pool is not None:
        raise ConfigError("pool applies to kv rows only")
    if task == "kv":
        ctx, keys, values, _ = _kv_context(rng, length - nq * block + 1, n_pairs, pool)
        keys = [(k,) for k in keys]
    else:
        keys, values, pieces, filler, cuts = _near_parts(rng, length - nq * block + 1, n_pairs)
        ctx = [VOCAB.BOS] + _scatter_at(filler, pieces, cuts)[0]
    ids, mask = list(ctx), [0] * len(ctx)
    for j, q in enumerate(rng.choice(n_pairs, size=nq, replace=False).tolist()):
        ids += [VOCAB.QUERY, *keys[q]] + values[q]
        mask += [0] * (1 + key_len) + [1] * VALUE_DIGITS
        if j < nq - 1:  # the last question ends the sequence without its period
            ids.append(VOCAB.PERIOD)
            mask.append(0)
    assert len(ids) == length == len(mask)
    return ids, mask


def training_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator for one training row: data depend on (seed, step, row) only, never on timing."""
    return np.random.default_rng([int(seed), _PURPOSE_TRAIN, int(step), int(row)])
