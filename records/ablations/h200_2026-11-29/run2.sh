#!/usr/bin/env bash
# Device call 2: FP_PHASE=1 QAT_START_FRAC=0.3, 300 s, checkpoint; LoRA TTT (spans) and export-format re-scores.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
B=/tmp/b; D=$B/golfmix_sp8192; mkdir -p $B
t0=$(date +%s)
for s in train val; do
  [ -e $D/fineweb_${s}_000000.bin ] || python3 data/build_shards.py --docs .bench/${s}_docs.jsonl.xz --split $s \
     --tokenizer .bench/fineweb_8192_bpe.model --out $D --vocab-size 8192 --workers 16 2>&1 | tail -1
done
echo "shards_s:$(( $(date +%s) - t0 ))"
export DATA_PATH=$D TOKENIZER_PATH=.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 LOG_DIR=$OUT \
  TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 MAX_WALLCLOCK_SECONDS=300 BROTLI_QUALITY=5 \
  CHECKPOINT_PATH=$B/ckpt2.pt PYTHONUNBUFFERED=1
source .bench/$CALL.conf
export $TRAIN_ENV
RUN=${RUN:-c2}
RUN_ID=${RUN}_train CHECKPOINT_SAVE=1 EVAL_STRIDE=64 ARTIFACT_PATH=$B/${RUN}_train.ptz python3 train_gpt.py > $B/${RUN}_train.out 2>&1
grep -E "^(step:[0-9]*00/|qat_start|ema_|trit_zero|train_done|compile_warmup|pre_export|export |artifact |final_roundtrip|error)" $B/${RUN}_train.out | tail -12
echo "train_total_s:$(( $(date +%s) - t0 ))"
rescore() {  # name, env...
  local name=$1; shift
  env RUN_ID=${RUN}_$name EVAL_FROM_CHECKPOINT=1 ARTIFACT_PATH=$B/${RUN}_$name.ptz EVAL_BUDGET_SECONDS=35 "$@" timeout 100 python3 train_gpt.py > $B/${RUN}_$name.out 2>&1
  echo "== $name $* ($(( $(date +%s) - t0 )) s)"; grep -E "^(lora_ttt|pre_export|export |final_roundtrip|error)" $B/${RUN}_$name.out; tail -3 $B/${RUN}_$name.out | grep -i "error\|Traceback"
}
for r in "${RESCORES[@]}"; do eval rescore $r; done
[ "$RUN" = c3 ] || timeout 90 python3 scripts/bytes_table.py $B/ckpt2.pt > $OUT/bytes_table.md 2>&1; tail -25 $OUT/bytes_table.md
echo "total_s:$(( $(date +%s) - t0 ))"
