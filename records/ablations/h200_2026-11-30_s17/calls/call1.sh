#!/usr/bin/env bash
# session 17 call 1: FUSED_QKV A/B (+ trace) on GPU 0, max-autotune-no-cudagraphs on GPU 1
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards $D at $(( $(date +%s) - t0 ))s"
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8"
P=/tmp/p; mkdir -p $P
(
  env $C FUSED_QKV=0 CUDA_VISIBLE_DEVICES=0 timeout 190 python3 scripts/profile_step.py --trace --out $P/qkv0 > $P/qkv0.txt 2>&1
  echo "qkv0 rc $? at $(( $(date +%s) - t0 ))s"
  gzip -f $P/qkv0/profile_trace.json
  env $C FUSED_QKV=1 CUDA_VISIBLE_DEVICES=0 timeout 190 python3 scripts/profile_step.py --out $P/qkv1 > $P/qkv1.txt 2>&1
  echo "qkv1 rc $? at $(( $(date +%s) - t0 ))s"
) &
env $C FUSED_QKV=0 COMPILE_MODE=max-autotune-no-cudagraphs TORCHINDUCTOR_COMPILE_THREADS=8 CUDA_VISIBLE_DEVICES=1 \
  timeout $(( 540 - ($(date +%s) - t0) )) python3 scripts/profile_step.py --out $P/mat > $P/mat.txt 2>&1
echo "mat rc $? at $(( $(date +%s) - t0 ))s"
wait
grep -h "phase:timed" $P/*.txt
tar czf $OUT/call1.tgz -C $P .
ls -la $OUT
