#!/usr/bin/env bash
# session 21 call 1 (prepared in session 20): Muon.step's foreach decay (440bd24) against the old per-matrix loop
# (.bench/muon_old_step.py), on the env's step (CE_KERNEL=1 too), both GPUs, both orders; --steady.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s21c1; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1"
prof() {  # GPU, script, name, extra args
  env $C CUDA_VISIBLE_DEVICES=$1 timeout 170 python3 $2 --steady $4 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 scripts/profile_step.py new_g0a "--top 300 --shapes --gaps" & prof 1 .bench/muon_old_step.py old_g1a; wait
prof 0 .bench/muon_old_step.py old_g0b & prof 1 scripts/profile_step.py new_g1b "--top 300 --shapes --gaps"; wait
grep -H "phase:timed" $P/*.txt
tar czf $OUT/call1.tgz -C $P .
