#!/usr/bin/env bash
# One device call for the disk read path (results in $OUT):
#   1. the extension build, then the disk, pipeline and offload tests (C reader and Python reader)
#   2. bench_disk_depth.py: raw O_DIRECT vs the store (C and Python readers) by batch size and threads
#      (SKIP_DEPTH=1 leaves it out)
#   3. bench_pipeline.py at 128K, cpu tier at 10% of the KV (PIPE_ARGS, default --selection shared)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
t0=$(date +%s)
ls tierkv/_C*.so >/dev/null 2>&1 || MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || tail -30 $OUT/build.log
echo "build: $(( $(date +%s) - t0 )) s"
DISK=${DISK_DIR:-/tmp/tierkv-bench}
timeout ${T_TESTS:-120} python3 -m pytest -q ${TESTS:-tests/test_disk_native.py tests/test_disk.py tests/test_disk_faults.py tests/test_pipeline.py tests/test_offload_gpu.py} \
  2>&1 | tee $OUT/tests.txt | tail -4
[ -n "${SKIP_DEPTH:-}" ] || timeout ${T_DEPTH:-150} python3 bench/bench_disk_depth.py --dir $DISK/depth --files 8192 --per-pass 1024 --batches 28 1024 \
  --threads ${DEPTH_THREADS:-1 4 8 16 32} --python-reader --json $OUT/disk_depth.json 2>&1 | grep -v "wrote" | tee $OUT/depth_log.txt
rm -rf $DISK/depth
# shellcheck disable=SC2086
timeout ${T_PIPE:-330} python3 bench/bench_pipeline.py --disk-dir $DISK/pipeline --json $OUT/pipeline_gpu.json ${PIPE_ARGS:---selection shared} 2>&1 \
  | grep -v Warning | tee $OUT/pipeline_log.txt | tail -25
rm -rf $DISK/pipeline
