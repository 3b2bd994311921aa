#!/usr/bin/env bash
# Device calls of session 6. .bench/$CALL.conf is a bash script of `train RUN "ENV"` and `rescore RUN "ENV" NAME
# ENV...` lines (checkpoints live in /tmp/b while the machine is warm), plus any other commands.
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
  TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 MAX_WALLCLOCK_SECONDS=300 BROTLI_QUALITY=5 PYTHONUNBUFFERED=1
train() {  # run, env (string)
  local run=$1; echo "== train $run $2"
  env $2 RUN_ID=${run}_train CHECKPOINT_SAVE=1 CHECKPOINT_PATH=$B/ckpt_$run.pt EVAL_STRIDE=64 ARTIFACT_PATH=$B/${run}_train.ptz \
    python3 train_gpt.py > $B/${run}_train.out 2>&1
  grep -E "^(model |step:[0-9]*00/|qat_start|ema_|trit_zero|train_done|compile_warmup|pre_export|export |artifact |final_roundtrip|error)" $B/${run}_train.out | tail -14
  tail -3 $B/${run}_train.out | grep -i "error\|Traceback"
  echo "t:$(( $(date +%s) - t0 ))"
}
rescore() {  # run, its training env (string), name, env...
  local run=$1 tenv=$2 name=$3; shift 3
  env $tenv RUN_ID=${run}_$name EVAL_FROM_CHECKPOINT=1 CHECKPOINT_PATH=$B/ckpt_$run.pt ARTIFACT_PATH=$B/${run}_$name.ptz \
    EVAL_BUDGET_SECONDS=35 "$@" timeout 120 python3 train_gpt.py > $B/${run}_$name.out 2>&1
  echo "== $run $name $* ($(( $(date +%s) - t0 )) s)"
  grep -E "^(lora_ttt|temperature|calib|pre_export|export |final_roundtrip|error)" $B/${run}_$name.out; tail -3 $B/${run}_$name.out | grep -i "error\|Traceback"
}
source .bench/$CALL.conf
echo "total_s:$(( $(date +%s) - t0 ))"
