"""Transitional alias of tierkv.tiers.disk.native (the C reader's loader) for tests/conftest.py; new code
imports tierkv.tiers.disk.native."""

from .disk.native import library, missing  # noqa: F401
