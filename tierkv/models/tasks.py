"""Synthetic long-context retrieval tasks and the fixed vocabulary of the shipped retrieval model.

No tokenizer is downloaded: the vocabulary is a fixed table built here from nothing but constants, so
the token ids are stable across machines and versions (the shipped weights depend on them). One token
is one whitespace-separated word of the decoded text, which keeps prompts printable and `encode` exact.

Two tasks, both built so that losing the one region that holds the answer makes the answer wrong:

- passkey: a 5-digit passkey hidden at a random depth among filler words, asked for at the end.
      <bos> fa ... PASSKEY 7 3 9 1 2 . ... QUERY PASSKEY   ->  7 3 9 1 2
- kv (multi-key associative recall): many `KEY name d d d d .` pairs scattered among filler (the other
  pairs are the distractors), one key asked for at the end.
      <bos> ... KEY Bak 4 8 1 2 . ... KEY Tum 0 5 5 9 . ... QUERY Bak   ->  4 8 1 2

The question ends with the very token that precedes the answer in the context (the key name, or
PASSKEY), so the answer is found by matching that token and copying what followed it: the induction
pattern small transformers learn fastest. (With a marker between key and value, `KEY Bak VALUE 4 ...`
asked as `QUERY Bak ANSWER`, a first training run learnt passkeys but only 14% of kv answers at 512
tokens: the first value digit needed a two-token match.)

A prompt of length L has exactly L tokens; the answer is generated greedily after it. Every prompt is a pure function of (seed, task, length, index), so evaluations are reproducible and
held-out sets are simply other seeds than the one used for training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from tierkv.compat import cache_kwargs, output_cache
from tierkv.errors import ConfigError

TASKS = ("passkey", "kv")
# stable small integers mixed into the RNG seeds; never renumber (held-out sets depend on them)
_TASK_CODE = {"passkey": 1, "kv": 2}
_PURPOSE_PROMPT = 11
_PURPOSE_TRAIN = 12

PASSKEY_DIGITS = 5
VALUE_DIGITS = 4
MIN_LENGTH = 64
MAX_KEYS = 256


def _pseudo_words(consonants: str, vowels: str, pattern: str, count: int, stride: int) -> list[str]:
    """`count` distinct pronounceable words; the stride scatters picks over the alphabet so neighbours differ."""
    pools = [consonants if c == "c" else vowels for c in pattern]
    combos = ["".join(p) for p in itertools.product(*pools)]
    n = len(combos)
    if np.gcd(stride, n) != 1 or count > n:
        raise AssertionError("vocabulary construction constants are inconsistent")
    return [combos[(i * stride) % n] for i in range(count)]


@dataclass(frozen=True)
class Vocab:
    """The fixed vocabulary: ids are positions in `tokens`.

    Layout (640 ids, a multiple of 64 for tidy matrix shapes):
      0-3     <pad> <bos> <eos> <unk>
      4-15    markers: PASSKEY KEY QUERY . and reserved <m8>..<m15>
      16-25   digits 0-9
      26-345  320 filler words (lowercase, 4 letters: "bako")
      346-601 256 key names (capitalised, 3 letters: "Bak")
      602-639 reserved <u602>..<u639>
    """

    tokens: tuple[str, ...] = field(init=False)
    index: dict = field(init=False, repr=False, compare=False)

    SIZE = 640
    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    PASSKEY, KEY, QUERY, PERIOD = 4, 5, 6, 7
    DIGIT0 = 16
    FILLER0, N_FILLER = 26, 320
    KEY0, N_KEYS = 346, MAX_KEYS

    def __post_init__(self):
        toks = ["<pad>", "<bos>", "<eos>", "<unk>", "PASSKEY", "KEY", "QUERY", "."]
        toks += [f"<m{i}>" for i in range(len(toks), self.DIGIT0)]
        toks += [str(d) for d in range(10)]
        assert len(toks) == self.FILLER0
        toks += _pseudo_words("bdfgklmnprstvz", "aeiou", "cvcv", self.N_FILLER, 7919)
        assert len(toks) == self.KEY0
        toks += [w.capitalize() for w in _pseudo_words("bdfgklmnprstvz", "aeiou", "cvc", self.N_KEYS, 613)]
        toks += [f"<u{i}>" for i in range(len(toks), self.SIZE)]
        if len(toks) != self.SIZE or len(set(toks)) != self.SIZE:
            raise AssertionError("vocabulary construction produced duplicate or missing tokens")
        object.__setattr__(self, "tokens", tuple(toks))
        object.__setattr__(self, "index", {t: i for i, t in enumerate(toks)})

    def __len__(self) -> int:
        return self.SIZE

    def digit(self, d: int) -> int:
        return self.DIGIT0 + d

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated tokens to ids; an unknown word is an error, never silently <unk>."""
        ids = []
        for w in text.split():
            if w not in self.index:
                raise ConfigError(f"token {w!r} is not in the retrieval vocabulary (see tierkv/models/retrieval/README.md)")
            ids.append(self.index[w])
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.SIZE:
                raise ConfigError(f"token id {i} is outside the retrieval vocabulary [0, {self.SIZE})")
            out.append(self.tokens[i])
        return " ".join(out)


VOCAB = Vocab()  # immutable table, not state: the ids are part of the shipped model


@dataclass(frozen=True)
class Prompt:
    """One evaluation item. `needle` is the token range [start, end) of the context that holds the answer
    (the passkey sentence, or the queried key-value pair): what a sparse cache must not lose."""

    task: str
    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    needle: tuple[int, int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _check(task: str, length: int) -> None:
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is unknown; expected one of {TASKS}")
    if not isinstance(length, (int, np.integer)) or length < MIN_LENGTH:
        raise ConfigError(f"length {length!r} is too short; expected an int >= {MIN_LENGTH}")


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


def _scatter(rng: np.random.Generator, filler: list[int], pieces: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert pieces into the filler at random, order-preserving points; returns ids and each piece's span."""
    cuts = np.sort(rng.integers(0, len(filler) + 1, size=len(pieces)))
    out: list[int] = []
    spans = []
    prev = 0
    for cut, piece in zip(cuts.tolist(), pieces):
        out += filler[prev:cut]
        spans.append((len(out), len(out) + len(piece)))
        out += piece
        prev = cut
    out += filler[prev:]
    return out, spans


def _passkey(rng: np.random.Generator, length: int) -> tuple[list[int], list[int], tuple[int, int]]:
    key = _digits(rng, PASSKEY_DIGITS)
    needle = [VOCAB.PASSKEY] + key + [VOCAB.PERIOD]
    question = [VOCAB.QUERY, VOCAB.PASSKEY]
    n_fill = length - 1 - len(needle) - len(question)
    ctx, spans = _scatter(rng, _filler(rng, n_fill), [needle])
    span = (spans[0][0] + 1, spans[0][1] + 1)
    return [VOCAB.BOS] + ctx + question, key, span


def _kv_context(rng: np.random.Generator, n_ctx: int, n_pairs: int, pool: Sequence[int] | None = None):
    """`pool`: the digits values are drawn from (all ten when None): with few, values repeat digits and
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
    ctx, spans = _scatter(rng, _filler(rng, n_ctx - 1 - n_pairs * pair_len), pieces)
    spans = [(a + 1, b + 1) for a, b in spans]
    return [VOCAB.BOS] + ctx, keys, values, spans


def make_prompt(task: str, length: int, seed: int, index: int = 0, n_pairs: int | None = None) -> Prompt:
    """The `index`-th prompt of (task, length, seed): exactly `length` tokens ending in the question."""
    _check(task, length)
    rng = np.random.default_rng([int(seed), _PURPOSE_PROMPT, _TASK_CODE[task], int(length), int(index)])
    if task == "passkey":
        ids, answer, span = _passkey(rng, length)
    else:
        n_pairs = default_pairs(length) if n_pairs is None else n_pairs
        if not 1 <= n_pairs <= MAX_KEYS:
            raise ConfigError(f"n_pairs {n_pairs} is out of range; expected 1..{MAX_KEYS}")
        ctx, keys, values, spans = _kv_context(rng, length - 2, n_pairs)
        q = int(rng.integers(0, n_pairs))
        ids = ctx + [VOCAB.QUERY, keys[q]]
        answer, span = values[q], spans[q]
    assert len(ids) == length
    return Prompt(task, tuple(ids), tuple(answer), span)


def make_prompts(task: str, length: int, n: int, seed: int, **kw) -> list[Prompt]:
    """`n` prompts of one task and length; the same arguments give the same prompts on any machine."""
    if n < 1:
        raise ConfigError(f"n {n} prompts requested; expected >= 1")
    return [make_prompt(task, length, seed, i, **kw) for i in range(n)]


def make_training_sequence(task: str, length: int, rng: np.random.Generator, n_queries: int = 8,
                           n_pairs: int | None = None, pool: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """A training sequence of exactly `length` tokens and a 0/1 mask marking answer tokens (the loss targets).

    kv sequences carry up to `n_queries` questions in a row (`QUERY k v .`), each about a different
    key, which multiplies the learning signal per sequence; the first question sits exactly where an
    evaluation prompt's does. A passkey sequence has one question (later ones could copy the first answer).
    `n_pairs` (kv only) overrides default_pairs(length): denser contexts train telling many keys apart.
    `pool` (kv only): the digits its values are drawn from (see _kv_context); with two or three, the
    digits already answered do not say what comes next, only the place after the key does.
    """
    _check(task, length)
    if task == "passkey":
        ids, answer, _ = _passkey(rng, length - PASSKEY_DIGITS)
        mask = [0] * len(ids) + [1] * len(answer)
        return ids + answer, mask
    block = 2 + VALUE_DIGITS + 1
    n_pairs = default_pairs(length) if n_pairs is None else n_pairs
    if not 1 <= n_pairs <= MAX_KEYS:
        raise ConfigError(f"n_pairs {n_pairs} is out of range; expected 1..{MAX_KEYS}")
    nq = max(1, min(n_queries, n_pairs))
    if pool is not None and (len(pool) < 1 or not set(int(d) for d in pool) <= set(range(10))):
        raise ConfigError(f"pool {list(pool)!r} must be a non-empty set of digits 0-9")
    ctx, keys, values, _ = _kv_context(rng, length - nq * block + 1, n_pairs, pool)
    ids, mask = list(ctx), [0] * len(ctx)
    for j, q in enumerate(rng.choice(n_pairs, size=nq, replace=False).tolist()):
        ids += [VOCAB.QUERY, keys[q]] + values[q]
        mask += [0, 0] + [1] * VALUE_DIGITS
        if j < nq - 1:  # the last question ends the sequence without its period
            ids.append(VOCAB.PERIOD)
            mask.append(0)
    assert len(ids) == length == len(mask)
    return ids, mask


def training_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator for one training row: data depend on (seed, step, row) only, never on timing."""
    return np.random.default_rng([int(seed), _PURPOSE_TRAIN, int(step), int(row)])


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[tuple[int, ...]]
    hits: list[bool]

    def summary(self) -> str:
        return f"{self.correct}/{self.total} = {100 * self.accuracy:.1f}%"


@torch.inference_mode()
def generate_answers(model, prompts: Sequence[Prompt], cache_factory: Callable[[], object] | None = None,
                     max_new_tokens: int | None = None, batch_size: int = 16) -> list[tuple[int, ...]]:
    """Greedy decoding of each prompt's answer, one prefill then token by token through a cache.

    `cache_factory()` makes a fresh cache object per batch (tierkv's cache, a DynamicCache,
    ...); None lets the model make its own DynamicCache. Prompts are batched only with prompts of the same
    length, so no padding or attention mask is ever needed (pass batch_size=1 for single-sequence caches).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} is invalid; expected >= 1")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    preds: list[tuple[int, ...] | None] = [None] * len(prompts)
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and j - i < batch_size and len(prompts[order[j]]) == len(prompts[order[i]]):
            j += 1
        batch = [prompts[k] for k in order[i:j]]
        n_new = max_new_tokens if max_new_tokens is not None else max(len(p.answer_ids) for p in batch)
        ids = torch.tensor([p.input_ids for p in batch], dtype=torch.long, device=device)
        cache = cache_factory() if cache_factory is not None else None
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        gen = [tok]
        for _ in range(n_new - 1):
            out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            cache = output_cache(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            gen.append(tok)
        rows = torch.cat(gen, dim=1).tolist()
        for k, row in zip(order[i:j], rows):
            preds[k] = tuple(row)
        i = j
    return preds  # type: ignore[return-value]


def evaluate(model, prompts: Sequence[Prompt], cache_factory: Callable[[], object] | None = None,
             max_new_tokens: int | None = None, batch_size: int = 16) -> EvalResult:
    """Exact-match accuracy of greedy answers: a prompt counts only if every answer token is right."""
    if len(prompts) == 0:
        raise ConfigError("evaluate got no prompts; expected at least one")
    was_training = model.training
    model.eval()
    try:
        preds = generate_answers(model, prompts, cache_factory, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    hits = [tuple(p[: len(q.answer_ids)]) == tuple(q.answer_ids) for p, q in zip(preds, prompts)]
    return EvalResult(sum(hits) / len(hits), sum(hits), len(hits), preds, hits)
