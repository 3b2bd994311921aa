#!/usr/bin/env bash
# session 22 call 1 (nvidia-h200-x2, at 7fd8dfd + the uncommitted benches): (A) GPU0 benches a persistent TMA relu^2 GEMM (.bench/mlp_tma_bench.py) and the SDPA backends
# (.bench/attn_bench.py) while GPU1 profiles the env's step (MLP_KERNEL=1) with TRAIN_SYNC_EVERY 8, 32, and 32 +
# COMPILE_MODE=reduce-overhead; (B) the same, GPUs swapped, profiles in the reverse order. --steady --timed 64.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s22c1; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1"
prof() {  # GPU, extra env, name, extra args
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 150 python3 scripts/profile_step.py --steady --timed 64 $4 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
benches() {  # GPU, tag
  CUDA_VISIBLE_DEVICES=$1 timeout 200 python3 .bench/mlp_tma_bench.py > $P/tma_$2.txt 2>&1; echo "tma_$2 rc $? at $(( $(date +%s) - t0 ))s"
  CUDA_VISIBLE_DEVICES=$1 timeout 60 python3 .bench/attn_bench.py > $P/attn_$2.txt 2>&1; echo "attn_$2 rc $? at $(( $(date +%s) - t0 ))s"; }
benches 0 g0 & (prof 1 TRAIN_SYNC_EVERY=8 sync8_g1a "--top 300 --shapes"; prof 1 TRAIN_SYNC_EVERY=32 sync32_g1a; prof 1 "TRAIN_SYNC_EVERY=32 COMPILE_MODE=reduce-overhead" ro32_g1a); wait
tar czf $OUT/call1a.tgz -C $P .
benches 1 g1 & (prof 0 "TRAIN_SYNC_EVERY=32 COMPILE_MODE=reduce-overhead" ro32_g0b; prof 0 TRAIN_SYNC_EVERY=32 sync32_g0b; prof 0 TRAIN_SYNC_EVERY=8 sync8_g0b); wait
grep -H "phase:timed" $P/*.txt
tar czf $OUT/call1.tgz -C $P .
