#!/usr/bin/env bash
# One device call: install the carried wheels, build the extension, run the GPU offload tests, then the
# decode benchmark with the contexts/batches given (default: all). Results land in $OUT.
#   bash bench/gpu_offload.sh [bench_decode args...]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
t0=$(date +%s)
if [ ! -e tierkv/_C*.so ] && ! ls tierkv/_C*.so >/dev/null 2>&1; then
  MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; }
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import tierkv, tierkv.ops as o, torch, transformers; print('backend', o.backend(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -x tests/test_offload_gpu.py 2>&1 | tee $OUT/offload_gpu_tests.txt | tail -15
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 bench/bench_decode.py --json $OUT/decode_h100.json "$@" 2>&1 | tee $OUT/decode_log.txt | tail -60
fi
