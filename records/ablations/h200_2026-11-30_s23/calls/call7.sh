#!/usr/bin/env bash
# session 23 call 7: call 6's eager side again (its helper had assigned a staticmethod's function as a method), on
# both GPUs at once, right after call 6 on the same machine
t0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=$OUT/s23c7; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1 MUON_FUSED=1"
prof() {  # GPU, script, name
  env $C CUDA_VISIBLE_DEVICES=$1 timeout 100 python3 $2 --steady --timed 64 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 .bench/muon_eager_subtract.py eager_g0c & prof 1 .bench/muon_eager_subtract.py eager_g1c; wait
grep -H "phase:timed" $P/*.txt
grep -h -A1 "| optimizer step" $P/eager_g0c/profile_breakdown.md
