import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng_seed():
    """A fresh seed per test run (printed on failure) so fast paths meet new random data every time."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def cache_kwargs():
    """The kwargs that hand a cache to forward()/generate() under the installed transformers:
    `model(ids, **cache_kwargs(cache))` passes `cache=` where transformers wants it (newer versions warn on
    `past_key_values`) and `past_key_values=` where it knows only that (5.17). Same as tierkv.cache_kwargs."""
    import tierkv

    return tierkv.cache_kwargs


@pytest.fixture
def output_cache():
    """The cache a forward() output carries, under either name: `cache = output_cache(out)`."""
    import tierkv

    return tierkv.output_cache


@pytest.fixture(params=["c", "python"])
def reader(request, monkeypatch):
    """Run a disk test with each chunk-file reader: the C reader (tiers/disk/native.py, skipped where it
    cannot be built) and the Python one (the reference)."""
    from tierkv.tiers.disk import native

    if request.param == "python":
        monkeypatch.setenv("TIERKV_NATIVE_IO", "0")
    elif native.library() is None:
        pytest.skip(f"the C reader cannot be built here: {native.missing()}")
    return request.param
