#!/usr/bin/env bash
# session 21 call 4: MLP_KERNEL 1 against 0 on the env's step (CE_KERNEL=1 too), both GPUs, both orders; --steady.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s21c4; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1"
prof() {  # GPU, extra env, name
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 170 python3 scripts/profile_step.py --steady --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 MLP_KERNEL=1 mlpk_g0a & prof 1 MLP_KERNEL=0 base_g1a; wait
prof 0 MLP_KERNEL=0 base_g0b & prof 1 MLP_KERNEL=1 mlpk_g1b; wait
grep -H "phase:timed" $P/*.txt
grep -h -A12 "| bucket | ms/step" $P/mlpk_g0a/profile_breakdown.md
tail -5 $P/mlpk_g0a.txt
tar czf $OUT/call4.tgz -C $P .
