"""The fixed vocabulary of the retrieval models: 640 ids built from constants, one word a token.

No tokenizer is downloaded: the table is built here from nothing but constants, so the token ids are
stable across machines and versions (the shipped weights depend on them). One token is one
whitespace-separated word of the decoded text, which keeps prompts printable and `encode` exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tierkv.errors import ConfigError

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
