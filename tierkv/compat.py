"""The name transformers gives the cache argument of forward() and generate(), whichever is installed.

transformers 5.17, the oldest tierkv supports, calls it `past_key_values`; newer versions call it
`cache` and warn on every call that passes the old name, which they will stop accepting. tierkv works
under both, so code that hands tierkv's cache to a model writes

    out = model(input_ids=ids, **tierkv.cache_kwargs(cache), use_cache=True)
    model.generate(input_ids, **tierkv.cache_kwargs(cache), max_new_tokens=64)
    cache = tierkv.output_cache(out)       # the cache a forward() returned

and gets no deprecation warning on either.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["cache_kwarg", "cache_kwargs", "output_cache"]


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """"cache" where the installed transformers' models take `cache=`, else "past_key_values"."""
    # The rename went through every model at once; a Llama's forward signature tells which side of it
    # the installed version is on (the deprecation wrapper keeps the new signature visible to inspect).
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache) -> dict:
    """{name: cache} for forward() / generate() under the installed transformers."""
    return {cache_kwarg(): cache}


def output_cache(output):
    """The cache a model output carries (`output.cache`, or `output.past_key_values` before the rename)."""
    return getattr(output, cache_kwarg())
