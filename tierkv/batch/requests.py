"""Reading and checking the input JSONL of `tierkv batch`: one request per line.

    {"id": "q1", "prompt": "<bos> ... QUERY PASSKEY", "max_new_tokens": 5}
    {"id": 7, "prompt": [1, 88, 301, 6, 4], "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3}

Fields: `id` (a string or an integer, unique in the file), `prompt` (text, encoded with the model's
tokenizer, or a list of token ids), `max_new_tokens` (required unless a default is given), and the
sampling parameters `temperature` (0, the default, is greedy), `top_p`, `top_k`, `seed`; `meta` (any
JSON) is copied to the result untouched. Anything else is an error: a misspelt parameter silently
ignored would run the wrong job.

Every problem is reported as one line naming the input line and what is wrong with it. A line is
checked completely before anything runs (InputReader yields a Problem for it instead of a Request).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np

from ..errors import TierKVError

FIELDS = ("id", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "meta")
MAX_ID_CHARS = 512
SEED_LIMIT = 2**63


@dataclass(frozen=True, eq=False)  # eq would compare token arrays elementwise
class Request:
    """One checked request: its prompt already encoded to token ids."""

    id: Union[str, int]
    line: int
    tokens: np.ndarray = field(repr=False)  # int32 [n]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    meta: Any = None

    @property
    def key(self) -> str:
        """The id as results are keyed on it: 7 and "7" are different ids."""
        return id_key(self.id)

    @property
    def prompt_len(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_seed(self) -> int:
        """The seed of this request's sampler: its own, or one derived from its id, so that a sampled
        request gives the same tokens in every run (and after a resume) without a seed in the input."""
        if self.seed is not None:
            return self.seed
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "little") >> 1

    def params(self) -> Dict[str, Any]:
        """The parameters that decide its tokens; a greedy request's sampling fields decide nothing."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "sampling": "greedy"}
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.sampling_seed()}

    def digest(self) -> str:
        """Of the prompt's token ids and params(): results are reused only for the same request."""
        h = hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    line: int
    message: str
    kind: str  # malformed | invalid | duplicate | too_long

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def id_key(value: Union[str, int]) -> str:
    return json.dumps(value, ensure_ascii=False)


class _Bad(Exception):
    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class InputSpec:
    """What a request is checked against: the model's tokenizer and limits, and the defaults."""

    encode: Optional[Callable[[str], List[int]]]  # None: the model has no tokenizer; prompts must be ids
    vocab_size: int
    max_positions: Optional[int]  # prompt + new tokens must fit; None: no limit known
    default_max_new_tokens: Optional[int] = None
    no_tokenizer_hint: str = "the model has no tokenizer"


class InputReader:
    """Iterates a JSONL file as Requests and Problems, in line order (blank lines are skipped).

    A duplicate id is a problem of the later line; the first keeps the id. Lines are read as bytes,
    so text that is not UTF-8 is a malformed line, not a crash.
    """

    def __init__(self, path: str, spec: InputSpec) -> None:
        self.path = path
        self.spec = spec
        self.seen: Dict[str, int] = {}
        self.lines = 0

    def __iter__(self) -> Iterator[Union[Request, Problem]]:
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                self.lines = n
                if not raw.strip():
                    continue
                try:
                    req = self._request(raw, n)
                except _Bad as e:
                    yield Problem(n, str(e), e.kind)
                    continue
                first = self.seen.get(req.key)
                if first is not None:
                    yield Problem(n, f"duplicate id {req.key} (first on line {first})", "duplicate")
                    continue
                self.seen[req.key] = n
                yield req

    def _request(self, raw: bytes, n: int) -> Request:
        try:
            obj = json.loads(raw.rstrip().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Bad(f"not UTF-8 text (at column {e.start + 1})", "malformed") from None
        except json.JSONDecodeError as e:
            raise _Bad(f"not valid JSON ({e.msg} at column {e.colno})", "malformed") from None
        if not isinstance(obj, dict):
            raise _Bad(f"expected a JSON object, got {_kind(obj)}", "malformed")
        unknown = [k for k in obj if k not in FIELDS]
        if unknown:
            raise _Bad(_unknown_message(unknown[0]))
        for name in ("id", "prompt"):
            if name not in obj:
                raise _Bad(f"missing field '{name}'")
        rid = _check_id(obj["id"])
        max_new = obj.get("max_new_tokens", self.spec.default_max_new_tokens)
        if max_new is None:
            raise _Bad("missing field 'max_new_tokens' (or pass a default: --max-new-tokens)")
        max_new = _int_field("max_new_tokens", max_new, 1)
        temperature = _number_field("temperature", obj.get("temperature", 0.0), 0.0, None)
        top_p = _number_field("top_p", obj.get("top_p", 1.0), 0.0, 1.0, open_low=True)
        top_k = _int_field("top_k", obj.get("top_k", 0), 0)
        seed = obj.get("seed")
        if seed is not None:
            seed = _int_field("seed", seed, 0)
            if seed >= SEED_LIMIT:
                raise _Bad(f"seed: expected an integer below 2**63, got {seed}")
        tokens = self._tokens(obj["prompt"])
        limit = self.spec.max_positions
        if limit is not None and tokens.shape[0] + max_new > limit:
            raise _Bad(f"prompt of {tokens.shape[0]} tokens + max_new_tokens {max_new} = {tokens.shape[0] + max_new} "
                       f"exceeds the model's {limit} positions", "too_long")
        return Request(rid, n, tokens, max_new, float(temperature), float(top_p), top_k, seed, obj.get("meta"))

    def _tokens(self, prompt: Any) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _Bad("prompt: empty text")
            if self.spec.encode is None:
                raise _Bad(f"prompt: text given, but {self.spec.no_tokenizer_hint}; give token ids instead")
            try:
                ids = self.spec.encode(prompt)
            except TierKVError as e:
                raise _Bad(f"prompt: {e}") from None
            if not ids:
                raise _Bad("prompt: the tokenizer made no tokens of it")
            return np.asarray(ids, dtype=np.int32)
        if isinstance(prompt, list):
            if not prompt:
                raise _Bad("prompt: empty list of token ids")
            V = self.spec.vocab_size
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                    raise _Bad(f"prompt: token {i} is {t!r}; expected an integer id in [0, {V})")
            return np.asarray(prompt, dtype=np.int32)
        raise _Bad(f"prompt: expected text or a list of token ids, got {_kind(prompt)}")


def _check_id(value: Any) -> Union[str, int]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f"id: expected a string or an integer, got {_kind(value)}")
    if isinstance(value, str) and not value:
        raise _Bad("id: empty string")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise _Bad(f"id: {len(value)} characters; expected at most {MAX_ID_CHARS}")
    return value


def _int_field(name: str, value: Any, lo: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{name}: expected an integer >= {lo}, got {value!r}")
    if value < lo:
        raise _Bad(f"{name}: expected an integer >= {lo}, got {value}")
    return value


def _number_field(name: str, value: Any, lo: float, hi: Optional[float], open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{name}: expected a number, got {value!r}")
    low_bad = value <= lo if open_low else value < lo
    if low_bad or (hi is not None and value > hi):
        span = f"{'(' if open_low else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}]'}"
        raise _Bad(f"{name}: expected a number in {span}, got {value!r}")
    return float(value)


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown parameter '{name}'{hint}; expected only {', '.join(FIELDS)}"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
