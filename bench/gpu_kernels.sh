#!/usr/bin/env bash
# One device call for the kernels: build tierkv._C, run the GPU kernel tests (ext and cupy backends),
# compute-sanitizer memcheck over them, then bench/bench_kernels.py. Everything lands in $OUT:
#   build.log, kernel_tests.txt, sanitizer.txt, kernels.json, bench.txt, ncu.txt
# Usage (repo root, on the GPU machine): bash bench/gpu_kernels.sh [tests|sanitizer|bench|ncu|all]...
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tierkv_out}
mkdir -p "$OUT"
STAGES=${*:-all}
has() { [[ " $STAGES " == *" all "* || " $STAGES " == *" $1 "* ]]; }
PY=python3

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
$PY -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1

start=$(date +%s)
echo "== build"
if ! MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
grep -E "warning|error" "$OUT/build.log" | grep -v "cpp_extension\|UserWarning" | head -20
echo "built in $(( $(date +%s) - start )) s"
$PY -c "from tierkv import ops; print('backends:', ops.available_backends(), 'chosen:', ops.backend())"

if has tests; then
  echo "== GPU kernel tests"
  t0=$(date +%s)
  timeout 150 $PY -m pytest -q -m gpu tests/test_ops.py -rs -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.txt" | tail -30
  echo "tests took $(( $(date +%s) - t0 )) s"
fi

if has bench; then
  echo "== bench_kernels"
  timeout 200 $PY bench/bench_kernels.py --cupy --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.txt"
fi
if has sanitizer; then
  echo "== compute-sanitizer memcheck"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  t0=$(date +%s)
  # -k ext: the kernels' own tests under the extension (cupy launches the same kernels); the
  # reference runs inside them too, so its torch kernels are checked alongside
  timeout 200 "$CS" --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY -m pytest -q -x -m gpu tests/test_ops.py -k "ext" -p no:cacheprovider >"$OUT/sanitizer.txt" 2>&1
  echo "sanitizer exit code $? (9: errors found) after $(( $(date +%s) - t0 )) s"
  grep -E "ERROR SUMMARY|passed|failed|Invalid|=========" "$OUT/sanitizer.txt" | tail -8
fi

if has ncu; then
  echo "== ncu: gathers from device memory (NCU_CFGS, format:chunk_len:source)"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for cfg in ${NCU_CFGS:-bf16:64:device int4:64:device}; do
    timeout 90 "$NCU" --clock-control none --kernel-name regex:"gather_(raw|int)" --launch-skip 4 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      $PY bench/bench_kernels.py --profile $cfg >>"$OUT/ncu.txt" 2>&1
  done
  grep -E "gather_|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Duration|Stall|L2 Hit|Mem Busy|Max Bandwidth|One or More|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Eligible Warps|Executed Ipc" "$OUT/ncu.txt" | head -90
fi
echo "total $(( $(date +%s) - start )) s"
