#!/usr/bin/env bash
# One device call of the long-context model's training (issue #29): about 9.5 minutes on one H100 or H200.
#   - resumes from the checkpoint in $CKPT (default .gpu/ckpt29, carried into the call) when there is
#     one; else starts at step 0 and first times forward + backward per context length (--profile);
#   - trains for TRAIN_BUDGET seconds (default 470), deterministic kernels, 6 batch workers;
#   - writes the next checkpoint to $OUT/ckpt (index.json, summary.json, shards of at most 15 MiB:
#     5 files, about 33 MiB), saved every 4 minutes too, so a call cut short still leaves one;
#   - scores 16 held-out prompts per task at the current stage's length;
#   - prints the run's events, evals and profile, every 10th log line, and last the line "TRAIN_LONG {...}".
# Needs only the device image's torch and transformers (no wheels).
#   run (from the repository root):  bash bench/gpu_train_long.sh      carry: [".gpu/ckpt29"]
# then, here, before the next call:  rm -rf .gpu/ckpt29 && cp -r <files_at>/ckpt .gpu/ckpt29
# EXTRA="..." adds arguments (e.g. "--init-from .gpu/ckpt29 --stages 131072:200:800" for more training
# after the curriculum has finished; then CKPT must name an empty or absent directory).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tierkv_out}
CKPT=${CKPT:-.gpu/ckpt29}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ARGS="--deterministic --time-budget ${TRAIN_BUDGET:-470} --workers 6 --out $OUT/ckpt --git-commit ${GIT_COMMIT:-unknown}"
if [ -f "$CKPT/index.json" ]; then ARGS="$ARGS --resume $CKPT"; else ARGS="$ARGS --profile"; fi
echo "python3 bench/train_long_model.py $ARGS ${EXTRA:-}"
t0=$(date +%s)
# shellcheck disable=SC2086
timeout "${T_TRAIN:-570}" python3 bench/train_long_model.py $ARGS ${EXTRA:-} > "$OUT/train_log.txt" 2>&1
rc=$?
# a kernel without a deterministic version fails the first steps: go on without --deterministic (the
# call's JSON records it), in the time left, rather than come back empty
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ ! -f "$OUT/ckpt/index.json" ] && grep -q "deterministic" "$OUT/train_log.txt"; then
  left=$(( ${T_TRAIN:-570} - ($(date +%s) - t0) ))
  echo "DETERMINISTIC MODE FAILED; again without it for ${left} s:"; grep -m3 -i "error" "$OUT/train_log.txt"
  mv "$OUT/train_log.txt" "$OUT/train_log_deterministic.txt"
  ARGS="${ARGS/--deterministic /} --time-budget $(( left > 100 ? left - 100 : 10 ))"
  # shellcheck disable=SC2086
  timeout "$left" python3 bench/train_long_model.py $ARGS ${EXTRA:-} > "$OUT/train_log.txt" 2>&1
  rc=$?
fi
rm -rf "$OUT/ckpt.tmp" "$OUT/ckpt.old"  # a save cut by the timeout; the last whole checkpoint stays
grep -E '"event"|"eval"|"profile"|resumed|weights from|flash attention|Error|error|Traceback' "$OUT/train_log.txt" | tail -40
grep -E '^\{"step"' "$OUT/train_log.txt" | awk 'NR % 10 == 1' | tail -12
tail -2 "$OUT/train_log.txt"
echo "exit code $rc"
[ "$rc" = 124 ] && echo "stopped by the timeout: the checkpoint saved last (every 4 minutes) is in $OUT/ckpt"
ls -la "$OUT/ckpt"
