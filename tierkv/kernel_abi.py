"""What csrc/tierkv_kernels.cuh fixes at compile time and the host side must agree with.

Defined here once for the dispatcher (ops) and the cupy backend; tests/test_csrc_compile.py checks them
against the header.
"""

from __future__ import annotations

import torch

THREADS = 256  # TIERKV_THREADS: threads per block of every kernel
MAX_SOURCES = 64  # TIERKV_MAX_SOURCES: sources passed by value in a gather's argument struct; more go through a device array
MAX_HEAD_DIM = 1024  # TIERKV_MAX_HEAD_DIM
MASS_WARPS = 4  # TIERKV_MASS_WARPS: warps per block of the mass-scoring kernel (it is launched with this many)
# the kernels' template parameters for a chunk format and for an input/output dtype
FMT_CODES = {"bf16": 0, "fp16": 1, "int2": 2, "int4": 4, "int8": 8}
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
