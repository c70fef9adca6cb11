"""Multi-turn conversations over one long history: each turn asks about another needle of it.

The shape a conversation cache serves: the history is prefilled once; every later turn adds only the
previous answer, a period, optional new filler (`gap` words, the rest of the turn's text) and a question,
and must still find its needle far back in the history. Turn t's prompt is turn t-1's prompt followed by
turn t-1's answer and `new_ids(t)`, so the prompts are growing token-id sequences:

    turn 0:  <bos> ... KEY Bak 4 8 1 2 . ... KEY Tum 0 5 5 9 . ... QUERY Tum                 -> 0 5 5 9
    turn 1:  <bos> ... KEY Bak 4 8 1 2 . ... KEY Tum 0 5 5 9 . ... QUERY Tum 0 5 5 9 . QUERY Bak -> 4 8 1 2

This is also the layout of the kv and near training rows (several `QUERY k v .` in a row), so the trained
models answer later turns as they answer the first.

    conv = make_conversation("multi", 32768, seed=1, turns=4)
    for prompt in conv:            # tierkv.models.tasks.Prompt, input_ids growing turn by turn
        ...                        # prompt.answer_ids, prompt.needle (span in the history)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tierkv.errors import ConfigError
from tierkv.models.tasks import (MULTI_NEEDLES, PURPOSE_CONVERSATION, History, Prompt, make_history,
                                 question_length)
from tierkv.models.vocab import VOCAB

__all__ = ["Conversation", "make_conversation", "CONVERSATION_TASKS"]

CONVERSATION_TASKS = ("kv", "near", "multi")


@dataclass(frozen=True)
class Conversation:
    """The turns of one conversation. `order[t]` is the history's needle turn t asks about."""

    task: str
    history: History
    order: tuple[int, ...]
    turns: tuple[Prompt, ...]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    def new_ids(self, t: int) -> tuple[int, ...]:
        """What turn t adds after turn t-1's prompt and answer (for t = 0, the whole first prompt)."""
        if not 0 <= t < len(self.turns):
            raise ConfigError(f"turn {t} is out of range; the conversation has {len(self.turns)} turns")
        if t == 0:
            return self.turns[0].input_ids
        before = len(self.turns[t - 1]) + len(self.turns[t - 1].answer_ids)
        return self.turns[t].input_ids[before:]


def make_conversation(task: str, length: int, seed: int, index: int = 0, turns: int = 4, gap: int = 0,
                      n_pairs: int | None = None, depths: Sequence[float] | None = None) -> Conversation:
    """A conversation whose first prompt has exactly `length` tokens; `turns` questions about distinct needles.

    task:    kv, near (pairs, one per 64 tokens by default) or multi (`n_pairs` needles, default
             max(turns, 4), at `depths`, default evenly spread).
    gap:     filler words added before each later turn's question (new text arriving with the turn).
    The same arguments give the same conversation on any machine."""
    if task not in CONVERSATION_TASKS:
        raise ConfigError(f"task {task!r} has no conversations; expected one of {CONVERSATION_TASKS}")
    if not isinstance(turns, int) or turns < 1:
        raise ConfigError(f"turns {turns!r}: expected an int >= 1")
    if not isinstance(gap, int) or gap < 0:
        raise ConfigError(f"gap {gap!r}: expected an int >= 0")
    if task == "multi" and n_pairs is None:
        n_pairs = max(turns, MULTI_NEEDLES)
    history = make_history(task, length - question_length(task), seed, index, n_pairs, depths)
    if turns > len(history.questions):
        raise ConfigError(f"turns {turns} exceed the {len(history.questions)} needles of the history; "
                          f"expected at most that many")
    rng = np.random.default_rng([int(seed), PURPOSE_CONVERSATION, int(length), int(index), 0, 0])
    order = rng.permutation(len(history.questions))[:turns].tolist()
    ids = list(history.input_ids)
    out = []
    for t, n in enumerate(order):
        if t:
            prev = order[t - 1]
            ids += list(history.answers[prev]) + [VOCAB.PERIOD] + _gap_words(rng, gap)
        ids += list(history.questions[n])
        out.append(Prompt(task, tuple(ids), history.answers[n], history.needles[n],
                          history.needles if task == "multi" else (), history.distractors[n]))
    return Conversation(task, history, tuple(order), tuple(out))


def _gap_words(rng: np.random.Generator, n: int) -> list[int]:
    """n filler words ending in a period (no digits, no keys: new text that holds no needle)."""
    if n == 0:
        return []
    words = (VOCAB.FILLER0 + rng.integers(0, VOCAB.N_FILLER, size=n)).tolist()
    words[-1] = VOCAB.PERIOD
    return words
