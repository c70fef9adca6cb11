#!/usr/bin/env bash
# One device call of eval_quality on the long-context model (issue #29): about 9 minutes on one GPU.
# The model: MODEL (default "long", tierkv/models/retrieval_long, written by
#   python bench/train_long_model.py --export .gpu/ckpt29 --out tierkv/models/retrieval_long
# and then in the working tree: committed, or untracked, it travels either way; 8.5 MB).
# One context per call (CONTEXT, default 32768); GRID picks the cells (prompts: PROMPTS, or the default
# given first for contexts up to 32K, second beyond):
#   targets  int4 at 1/16, 2048 tokens and dense; passkey kv near; 80 / 40 prompts: the targets
#   full     bf16 int8 int4 int2 x (dense, 1/4, 1/8, 1/16, 1/32, 2048) at mass/head, and every scoring x
#            selection pair at int4 (39 cells); passkey kv; 12 / 6 prompts: the grid and the plot
#   depth    int4 at 1/16 and 2048; passkey kv near at depths 0, 0.25, 0.5, 0.75, 1, and multi (four
#            needles spread over the context); 16 / 8 prompts
# DISK_FORMATS="int2" adds cells with chunks on disk in int2 below each cpu format (skipped and listed
# until TierConfig.disk_format exists); then carry .whl too (zarr, lz4, crc32c for the disk tier).
# Writes $OUT/quality_long_<GRID>_<CONTEXT>.json and its log. Merge the calls' files here:
#   python bench/eval_quality.py --merge <files_at>/quality_long_*.json \
#       --json bench/results/quality_long_h100.json --plot bench/results/quality_long_h100.png
# A prompt costs each cell about (CONTEXT / chunk length) x 8 layers x 0.1 ms of host work (the store's
# put per chunk): chunk lengths grow with the context to keep a call within its time (MAX_S guards it).
#   run:  GRID=targets CONTEXT=32768 bash bench/gpu_eval_long.sh      carry: [] (or [".whl"])
set -uo pipefail
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tierkv_out}
mkdir -p "$OUT"
CTX=${CONTEXT:-32768}
GRID=${GRID:-targets}
case $CTX in
  8192) CL=32; B=8 ;;
  16384|32768) CL=64; B=8 ;;
  *) CL=128; B=4 ;;
esac
LONG=$(( CTX > 32768 ))
case $GRID in
  targets) CELLS="--formats int4 --fractions 16 --fixed-budgets 2048 --tasks passkey kv near"
           P=${PROMPTS:-$(( LONG ? 40 : 80 ))} ;;
  full) CELLS="--formats bf16 int8 int4 int2 --fractions 4 8 16 32 --fixed-budgets 2048 --scorings mass bound
               --selections head shared --cross-formats int4 --tasks passkey kv"; P=${PROMPTS:-$(( LONG ? 6 : 12 ))} ;;
  depth) CELLS="--formats int4 --fractions 16 --fixed-budgets 2048 --tasks passkey kv near multi
                --depths 0 0.25 0.5 0.75 1"; P=${PROMPTS:-$(( LONG ? 8 : 16 ))} ;;
  *) echo "GRID=$GRID: expected targets, full or depth"; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NAME=quality_long_${GRID}_${CTX}
# shellcheck disable=SC2086
timeout "${T_EVAL:-560}" python3 bench/eval_quality.py --model "${MODEL:-long}" --device "${DEVICE:-cuda}" --contexts "$CTX" \
  $CELLS --prompts "$P" --batch "$B" --chunk-length "$CL" --max-seconds "${MAX_S:-440}" \
  ${DISK_FORMATS:+--disk-formats $DISK_FORMATS} --json "$OUT/$NAME.json" --plot '' > "$OUT/$NAME.log" 2>&1
rc=$?
grep -vE 'prompts, full attention' "$OUT/$NAME.log" | tail -120
echo "exit code $rc"
ls -la "$OUT"
