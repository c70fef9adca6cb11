#!/usr/bin/env bash
# One device call for the shipped retrieval model: up to two training runs side by side on the one GPU
# (each its own process and data workers), and meanwhile, if asked, the extension build plus
# compute-sanitizer memcheck over the mass-scoring kernel's tests. Each run's directory is packed into
# one tar split in 15 MB pieces (a file coming back from the device is limited to 16 MiB).
#   RUNS="a:--hidden 512 --heads 4 --kv-heads 2;b:--hidden 384" SANITIZE=1 bash bench/gpu_train.sh
# LOGONLY="name ..." brings back only the log of those runs (short check runs).
# With several GPUs the runs are spread over them (run i on GPU i mod the GPU count), one per GPU when
# there are as many GPUs as runs: e.g. eight seeds at once on an 8-GPU machine.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/tierkv_out}
COMMON=${COMMON:---steps 8000 --time-budget 450 --eval-prompts 200 --eval-batch 50 --workers 6 --log-every 100}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# a run asked for --deterministic that fails because some kernel has no deterministic version is
# started again without it (its output says so), so the call still yields a model
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
train_one() {
  local name=$1 extra=$2
  export CUDA_VISIBLE_DEVICES=$(( $3 % (NGPU > 0 ? NGPU : 1) ))
  # shellcheck disable=SC2086
  python3 bench/train_retrieval_model.py $COMMON $extra --git-commit "${GIT_COMMIT:-unknown}" --out /tmp/train_$name \
    > /tmp/train_$name.out 2>&1 && return
  if [[ " $extra " == *" --deterministic "* ]] && grep -q "deterministic" /tmp/train_$name.out; then
    echo "RUN $name FAILED IN DETERMINISTIC MODE; again without it" | tee -a /tmp/train_$name.fallback
    grep -m3 -i "error" /tmp/train_$name.out >> /tmp/train_$name.fallback
    # shellcheck disable=SC2086
    python3 bench/train_retrieval_model.py $COMMON ${extra/--deterministic/} --git-commit "${GIT_COMMIT:-unknown}" \
      --out /tmp/train_$name > /tmp/train_$name.out 2>&1
  fi
}
pids=()
IFS=';' read -ra specs <<< "${RUNS:?RUNS=name:args;name:args}"
i=0
for spec in "${specs[@]}"; do
  name=${spec%%:*}; extra=${spec#*:}
  train_one "$name" "$extra" $i &
  pids+=($!)
  echo "started $name on GPU $(( i % (NGPU > 0 ? NGPU : 1) )): $extra"
  i=$((i + 1))
done
if [ -n "${SANITIZE:-}" ]; then
  t0=$(date +%s)
  MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
  echo "build: $(( $(date +%s) - t0 )) s"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  timeout 300 "$CS" --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest -q -m gpu tests/test_ops.py -k "mass" -p no:cacheprovider > $OUT/mass_sanitizer.txt 2>&1
  echo "sanitizer exit code $? (9: errors found)"
  grep -E "ERROR SUMMARY|passed|failed|skipped" $OUT/mass_sanitizer.txt | tail -4
fi
for p in "${pids[@]}"; do wait "$p"; done
# KEEP_BEST=1: only the run with the best kv accuracy at the training length (4096) comes back whole, the
# others as their JSON (a call brings back at most 8 files: eight runs' weights would not fit)
if [ -n "${KEEP_BEST:-}" ]; then
  best=$(python3 - "${specs[@]}" <<'PY'
import json, sys
score = {}
for spec in sys.argv[1:]:
    name = spec.split(":", 1)[0]
    try:
        rows = json.load(open(f"/tmp/train_{name}/train_retrieval.json"))["eval"]
        score[name] = max(r["accuracy"] for r in rows if r["task"] == "kv" and r["length"] == 4096)
    except (OSError, KeyError, ValueError):
        score[name] = -1.0
print(max(score, key=score.get))
print(" ".join(f"{k}={v}" for k, v in score.items()), file=sys.stderr)
PY
)
  echo "best run: $best"
  for spec in "${specs[@]}"; do
    name=${spec%%:*}
    [ "$name" = "$best" ] || LOGONLY="${LOGONLY:-} $name"
  done
fi
for spec in "${specs[@]}"; do
  name=${spec%%:*}
  cp /tmp/train_$name.out /tmp/train_$name/stdout.txt 2>/dev/null
  cat /tmp/train_$name.fallback 2>/dev/null
  tail -16 /tmp/train_$name.out
  if [[ " ${LOGONLY:-} " == *" $name "* ]]; then  # a check run: its log is all that is needed
    if [ -n "${KEEP_BEST:-}" ] && [ -f /tmp/train_$name/train_retrieval.json ]; then
      cp /tmp/train_$name/train_retrieval.json $OUT/train_$name.json  # its history holds the log
    else
      cp /tmp/train_$name.out $OUT/train_$name.log
    fi
  else
    tar -C /tmp -cf - train_$name | split -b 15M - $OUT/train_$name.tar.
  fi
done
ls -la $OUT
