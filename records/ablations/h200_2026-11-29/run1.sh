#!/usr/bin/env bash
# Device call 1: default config, 300 s, checkpoint; then LoRA TTT / document-isolation re-scores.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B=/tmp/b; D=$B/golfmix_sp8192; mkdir -p $B
t0=$(date +%s)
for s in train val; do
  [ -e $D/fineweb_${s}_000000.bin ] || python3 data/build_shards.py --docs .bench/${s}_docs.jsonl.xz --split $s \
     --tokenizer .bench/fineweb_8192_bpe.model --out $D --vocab-size 8192 --workers 16 2>&1 | tail -1
done
echo "shards_s:$(( $(date +%s) - t0 ))"
export DATA_PATH=$D TOKENIZER_PATH=.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 LOG_DIR=$OUT \
  TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 MAX_WALLCLOCK_SECONDS=300 BROTLI_QUALITY=5 \
  CHECKPOINT_PATH=$B/ckpt1.pt PYTHONUNBUFFERED=1
RUN=${RUN:-c1}
if [ ! -e $B/ckpt1.pt ]; then
  RUN_ID=${RUN}_train CHECKPOINT_SAVE=1 EVAL_STRIDE=64 ARTIFACT_PATH=$B/${RUN}_train.ptz python3 train_gpt.py > $B/${RUN}_train.out 2>&1
  grep -E "^(step:[0-9]+0?0/|train_done|pre_export|artifact |final_roundtrip|eval_estimate|error)" $B/${RUN}_train.out | tail -8
fi
rescore() {  # name, env...
  local name=$1; shift
  env RUN_ID=${RUN}_$name EVAL_FROM_CHECKPOINT=1 ARTIFACT_PATH=$B/${RUN}_$name.ptz "$@" timeout 150 python3 train_gpt.py > $B/${RUN}_$name.out 2>&1
  echo "== $name $*"; grep -E "^(lora_ttt|pre_export|final_roundtrip|eval_estimate|error)" $B/${RUN}_$name.out; tail -2 $B/${RUN}_$name.out | grep -i error
}
rescore iso EVAL_STRIDE=64 EVAL_DOC_ISOLATED=1
rescore lora TTT_ENABLED=1 TTT_MODE=lora EVAL_DOC_ISOLATED=1
rescore lora_lr01 TTT_ENABLED=1 TTT_MODE=lora EVAL_DOC_ISOLATED=1 TTT_LORA_LR=0.01
rescore lora_all TTT_ENABLED=1 TTT_MODE=lora EVAL_DOC_ISOLATED=1 TTT_LORA_TARGETS=q,k,v,proj,up,down,head TTT_LORA_CHUNK=128
echo "total_s:$(( $(date +%s) - t0 ))"
