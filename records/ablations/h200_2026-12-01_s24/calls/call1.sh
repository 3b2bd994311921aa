#!/usr/bin/env bash
# session 24 call 1 (nvidia-h200, one GPU): Newton-Schulz's a x folded into the small factor, Muon's decay folded
# into MUON_FUSED's parameter step and the factor-1 scale skipped (the working tree) against 3a4b7f6's train_gpt.py
# (.bench/old_code.py), the env's step, --steady --timed 64, in the order new old old new; then the new code with
# COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32. The first profile keeps 300 rows of the op table.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards at $(( $(date +%s) - t0 ))s"
P=$OUT/s24c1; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1 MUON_FUSED=1"
prof() {  # script, name, extra env, extra args
  env $C $3 timeout 150 python3 $1 --steady --timed 64 $4 --out $P/$2 > $P/$2.txt 2>&1; rc=$?
  echo "$2 rc $rc at $(( $(date +%s) - t0 ))s: $(grep -h 'phase:timed' $P/$2.txt)"
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
  return $rc; }
prof scripts/profile_step.py new_a "" "--top 300" || { tail -30 $P/new_a.txt; exit 1; }
prof .bench/old_code.py old_a
prof .bench/old_code.py old_b
prof scripts/profile_step.py new_b
prof scripts/profile_step.py ro32 "COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32"
for n in new_a old_a new_b old_b ro32; do echo "== $n"; grep -h -A3 "| optimizer step" $P/$n/profile_breakdown.md; grep -h "| gap (idle" $P/$n/profile_breakdown.md; done
echo "done at $(( $(date +%s) - t0 ))s"
