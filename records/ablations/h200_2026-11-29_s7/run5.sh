#!/usr/bin/env bash
# Device calls of session 7, on nvidia-h200-x2: two lanes, one GPU each, run side by side. .bench/$CALL.conf is a
# bash script that starts `lane GPU 'train RUN "ENV"; rescore RUN "ENV" NAME ENV...' &` lines and then `wait`s.
# Checkpoints and shards live in /tmp/b while the machine stays warm; run logs go to $OUT (at most 8 a call).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
B=${B:-/tmp/b}; D=$B/golfmix_sp8192; mkdir -p $B
t0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
for s in train val; do
  [ -e $D/fineweb_${s}_000000.bin ] || python3 data/build_shards.py --docs .bench/${s}_docs.jsonl.xz --split $s \
     --tokenizer .bench/fineweb_8192_bpe.model --out $D --vocab-size 8192 --workers 16 2>&1 | tail -1
done
echo "shards_s:$(( $(date +%s) - t0 ))"
export DATA_PATH=$D TOKENIZER_PATH=.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 LOG_DIR=$OUT \
  TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 MAX_WALLCLOCK_SECONDS=300 BROTLI_QUALITY=5 PYTHONUNBUFFERED=1
P="FP_PHASE=1 QAT_START_FRAC=0.3 EXPORT_EMBED=int8 EXPORT_FLOAT=int8 MLP_MULT=4"  # c3's configuration
LORA="TTT_ENABLED=1 TTT_MODE=lora EVAL_DOC_ISOLATED=1 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096"
train() {  # run, env (string)
  local run=$1; echo "== train $run $2 (gpu $CUDA_VISIBLE_DEVICES, t $(( $(date +%s) - t0 )))"
  env $2 RUN_ID=${run}_train CHECKPOINT_SAVE=1 CHECKPOINT_PATH=$B/ckpt_$run.pt EVAL_STRIDE=64 ARTIFACT_PATH=$B/${run}_train.ptz \
    python3 train_gpt.py > $B/${run}_train.out 2>&1
  grep -E "^(model |step:[0-9]*00/|qat_start|ema_|trit_zero|train_done|compile_warmup|pre_export|export |artifact |final_roundtrip|error)" $B/${run}_train.out | tail -14
  tail -3 $B/${run}_train.out | grep -i "error\|Traceback"
  echo "t:$(( $(date +%s) - t0 ))"
}
rescore() {  # run, its training env (string), name, env...; skipped when the call is too far along
  local run=$1 tenv=$2 name=$3; shift 3
  if [ $(( $(date +%s) - t0 )) -gt ${RESCORE_UNTIL:-470} ]; then echo "== $run $name skipped (time)"; return; fi
  env $tenv RUN_ID=${run}_$name EVAL_FROM_CHECKPOINT=1 CHECKPOINT_PATH=$B/ckpt_$run.pt ARTIFACT_PATH=$B/${run}_$name.ptz \
    EVAL_BUDGET_SECONDS=35 "$@" timeout 120 python3 train_gpt.py > $B/${run}_$name.out 2>&1
  echo "== $run $name $* ($(( $(date +%s) - t0 )) s)"
  grep -E "^(lora_ttt|temperature|calib|pre_export|export |final_roundtrip|error)" $B/${run}_$name.out; tail -3 $B/${run}_$name.out | grep -i "error\|Traceback"
}
lane() {  # gpu, commands: run on that GPU, console kept in $B/lane<gpu>_$CALL.txt and printed after the wait
  local gpu=$1; shift
  ( export CUDA_VISIBLE_DEVICES=$gpu; eval "$@" ) >> $B/lane${gpu}_$CALL.txt 2>&1
}
source .bench/$CALL.conf
wait
for g in 0 1; do echo "#### lane $g"; cat $B/lane${g}_$CALL.txt 2>/dev/null; done
echo "total_s:$(( $(date +%s) - t0 ))"
