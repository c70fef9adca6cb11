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


@pytest.fixture(params=["c", "python"])
def reader(request, monkeypatch):
    """Run a disk test with each chunk-file reader: the C reader (tiers/_native.py, skipped where it
    cannot be built) and the Python one (the reference)."""
    from tierkv.tiers import _native

    if request.param == "python":
        monkeypatch.setenv("TIERKV_NATIVE_IO", "0")
    elif _native.library() is None:
        pytest.skip(f"the C reader cannot be built here: {_native.missing()}")
    return request.param
