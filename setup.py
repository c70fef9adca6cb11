"""Builds the CUDA extension tierkv._C where a CUDA torch and nvcc are present; the project's metadata
is in pyproject.toml.

TIERKV_NO_CUDA_EXT=1 skips the extension. Without it (CI, CPU machines) tierkv still installs and falls
back to the cupy JIT of the same kernel source, or to the torch reference.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

here = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    if os.environ.get("TIERKV_NO_CUDA_EXT", "") not in ("", "0"):
        print("tierkv: TIERKV_NO_CUDA_EXT set, skipping the CUDA extension", file=sys.stderr)
        return None, {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return None, {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # no torch in the build environment (isolated build): nothing to build against
        print(f"tierkv: no torch in the build environment ({e}); skipping the CUDA extension", file=sys.stderr)
        return None, {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("tierkv: torch has no CUDA or nvcc was not found; skipping the CUDA extension", file=sys.stderr)
        return None, {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    ext = CUDAExtension(
        name="tierkv._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        # no --use_fast_math: the kernels must round exactly as the torch reference does
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--fmad=false"]},
    )
    return ext, {"build_ext": BuildExtension}


class build_py_with_kernels(build_py):
    """Copies csrc/*.cuh and csrc/*.c into the built package as tierkv/csrc/, where the cupy backend finds
    the kernel source and the disk tier the C reader's source in an installed tierkv (an editable
    install reads <repo>/csrc directly)."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        target = os.path.join(self.build_lib, "tierkv", "csrc")
        self.mkpath(target)
        for header in sorted(glob.glob(os.path.join(here, "csrc", "*.cuh")) + glob.glob(os.path.join(here, "csrc", "*.c"))):
            self.copy_file(header, os.path.join(target, os.path.basename(header)))


ext, cmdclass = cuda_extension()
setup(
    ext_modules=[ext] if ext is not None else [],
    cmdclass={**cmdclass, "build_py": build_py_with_kernels},
)
