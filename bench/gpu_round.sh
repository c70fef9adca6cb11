#!/usr/bin/env bash
# One device call for the pipeline, store and decode benchmarks (results in $OUT):
#   1. bench_pipeline.py at 128K, cpu tier at 10% of the KV, disk tier on the machine's local disk (PIPE_ARGS)
#   2. bench_store.py (store vs plain reads, 256 KiB and 1 MiB chunks)
#   3. bench_decode.py for the cases given in DECODE_CASES (e.g. "32768x1 131072x1"; none if unset)
#   4. bench_decode.py tierkv only at 128K x 4 (the case DynamicCache does not fit on an 80 GB GPU)
# (run in the order 1, 3, 4, 2)
# Each stage has its own time limit, so one slow stage cannot take the others' results with it.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
t0=$(date +%s)
ls tierkv/_C*.so >/dev/null 2>&1 || MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || tail -30 $OUT/build.log
echo "build: $(( $(date +%s) - t0 )) s"
DISK=${DISK_DIR:-/tmp/tierkv-bench}
# shellcheck disable=SC2086  (PIPE_ARGS: extra bench_pipeline arguments, e.g. "--selection head shared")
timeout ${T_PIPE:-200} python3 bench/bench_pipeline.py --disk-dir $DISK/pipeline --json $OUT/pipeline_gpu.json ${PIPE_ARGS:-} 2>&1 \
  | grep -v Warning | tee $OUT/pipeline_log.txt | tail -25
rm -rf $DISK/pipeline
timeout ${T_B4:-200} python3 bench/bench_decode.py --json $OUT/decode_gpu_128k_b4.json --cases 131072x4 --modes tierkv \
  --steps 6 --warmup 2 2>&1 | tee $OUT/decode_b4_log.txt | grep -E "^  (tier)|Error|error" 
timeout ${T_STORE:-60} python3 bench/bench_store.py --dir $DISK/store --sizes 256,1024 --mib 256 --json $OUT/store_gpu.json 2>&1 \
  | tee $OUT/store_log.txt | tail -12
rm -rf $DISK/store
[ -n "${DECODE_CASES:-}" ] && timeout ${T_DECODE:-140} python3 bench/bench_decode.py --json $OUT/decode_gpu.json --cases $DECODE_CASES \
  --steps 10 --warmup 3 --offloaded-max-tokens 32768 2>&1 | tee $OUT/decode_log.txt | grep -E "^  (dyn|off|tier)"
