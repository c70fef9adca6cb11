"""The CUDA sources compile, on a machine without a GPU: a kernel that does not build fails CI.

* every kernel instance of csrc/tierkv_kernels.cuh with nvcc for sm_90, and the gather kernels keep
  their registers (at most a register or so spilled, which would otherwise slow the hot path);
* the gathers in the build-time variants the store-path bench compares;
* the same header through NVRTC, as the cupy backend compiles it (where libnvrtc can be found);
* the torch binding csrc/tierkv_ops.cu against the installed torch's headers (slow: ~1 min).
Skipped only when nvcc (or libnvrtc) is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

from tierkv import _cupy_backend as cb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _instances() -> str:
    lines = ['#include "tierkv_kernels.cuh"']
    for name in cb.GATHER_KERNELS.values():
        lines.append(f"template __global__ void {name}(const __grid_constant__ tierkv::GatherArgs);")
    for name in cb.INGEST_KERNELS.values():
        lines.append(f"template __global__ void {name}(const __grid_constant__ tierkv::IngestArgs);")
    for name in cb.MASS_KERNELS.values():
        lines.append(f"template __global__ void {name}(const __grid_constant__ tierkv::MassArgs);")
    return "\n".join(lines) + "\n"


@needs_nvcc
def test_kernels_compile_for_sm90(tmp_path):
    src = tmp_path / "instances.cu"
    src.write_text(_instances())
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-O3", "--fmad=false", "-Xptxas", "-v", "-I", CSRC, "-cubin",
           "-o", str(tmp_path / "k.cubin"), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    # ptxas -v: "Compiling entry function '<mangled>'" then "<n> bytes stack frame, <s> bytes spill stores, ..."
    report = re.findall(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores", r.stderr)
    assert len(report) >= len(cb.GATHER_KERNELS) + len(cb.INGEST_KERNELS) + len(cb.MASS_KERNELS), r.stderr[-2000:]
    for fn, stack, spill in report:
        if "gather" in fn or "mass" in fn:
            # the integer kernels spill one register, outside their inner loops; more is a regression
            assert int(stack) <= 16 and int(spill) <= 16, f"{fn}: {stack} bytes stack frame, {spill} spilled"


@needs_nvcc
def test_bench_variants_of_the_gathers_compile(tmp_path):
    """The build-time variants bench/bench_store_paths.py compares (store qualifiers, unrolled decode
    loops) still compile: a variant that rots would only show on the GPU machine."""
    src = tmp_path / "gathers.cu"
    lines = ['#include "tierkv_kernels.cuh"']
    for name in cb.GATHER_KERNELS.values():
        lines.append(f"template __global__ void {name}(const __grid_constant__ tierkv::GatherArgs);")
    src.write_text("\n".join(lines) + "\n")
    variants = (['-DTIERKV_ST_HINT=""', "-DTIERKV_ROW_UNROLL=4"], ['-DTIERKV_ST_HINT=".cs"'],
                ["-DTIERKV_ST_L2_EVICT_FIRST"])
    for defines in variants:
        cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-O3", "--fmad=false", *defines, "-I", CSRC, "-cubin",
               "-o", str(tmp_path / "g.cubin"), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{defines}: {r.stderr[-3000:]}"


def _libnvrtc():
    candidates = []
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheels

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    if NVCC:
        home = os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))
        candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    for c in candidates:
        if "builtins" in c or "alt" in os.path.basename(c):
            continue
        try:
            # libnvrtc opens its builtins library by name at compile time; load it first from the
            # same folder so a wheel's copy is found without a library path
            for b in sorted(glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*"))):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def test_kernels_compile_with_nvrtc():
    lib = _libnvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc to run this here)")
    source = open(cb.header_path()).read().encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"tierkv_kernels.cu", 0, None, None) == 0
    names = list(cb.GATHER_KERNELS.values()) + list(cb.INGEST_KERNELS.values()) + list(cb.MASS_KERNELS.values())
    for n in names:
        assert lib.nvrtcAddNameExpression(prog, n.encode()) == 0
    opts = [o.encode() for o in cb.NVRTC_OPTIONS] + [b"--gpu-architecture=sm_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc == 7 and b"builtins" in log.value:
        pytest.skip("libnvrtc found without its builtins library")
    assert rc == 0, log.value.decode()[-4000:]
    for n in names:
        lowered = ctypes.c_char_p()
        assert lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(lowered)) == 0 and lowered.value


@needs_nvcc
@pytest.mark.slow
def test_torch_binding_compiles(tmp_path):
    import torch.utils.cpp_extension as cpp

    includes = cpp.include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in includes):
        pytest.skip("this torch ships no c10/cuda headers")
    # CPU builds of torch leave out one generated CUDA header; its content is a single macro.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import torch

    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cmd = [NVCC, std, "-arch=sm_90", "-O0", "-Xcompiler", "-O0", "-w", "-c", os.path.join(CSRC, "tierkv_ops.cu"),
           "-o", str(tmp_path / "ops.o"), "-I", CSRC, "-I", str(tmp_path / "stub"),
           "-I", sysconfig.get_paths()["include"]]
    for p in includes:
        cmd += ["-I", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_kernel_abi_matches_the_header():
    """tierkv.kernel_abi's numbers are the ones csrc/tierkv_kernels.cuh compiles with."""
    import torch

    from tierkv import kernel_abi as abi

    src = open(os.path.join(CSRC, "tierkv_kernels.cuh")).read()
    defines = dict(re.findall(r"^#define (TIERKV_\w+) (\d+)", src, re.M))
    assert int(defines["TIERKV_THREADS"]) == abi.THREADS
    assert int(defines["TIERKV_MAX_SOURCES"]) == abi.MAX_SOURCES
    assert int(defines["TIERKV_MAX_HEAD_DIM"]) == abi.MAX_HEAD_DIM
    assert int(defines["TIERKV_MASS_WARPS"]) == abi.MASS_WARPS
    fmt_enum = dict((name.lower(), int(v)) for name, v in re.findall(r"FMT_(\w+) = (\d+)", src))
    assert fmt_enum == abi.FMT_CODES
    dt_enum = dict(re.findall(r"DT_(\w+) = (\d+)", src))
    names = {torch.bfloat16: "BF16", torch.float16: "FP16", torch.float32: "FP32"}
    assert {names[t]: c for t, c in abi.DTYPE_CODES.items()} == {k: int(v) for k, v in dt_enum.items()}
