#!/usr/bin/env bash
# session 23 call 6: MUON_FUSED's compiled parameter step (subtract_updates) against the eager add a matrix
# (.bench/muon_eager_subtract.py), the env's step, both GPUs, both orders, --steady --timed 64
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=$OUT/s23c6; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1 MUON_FUSED=1"
prof() {  # GPU, script, name
  env $C CUDA_VISIBLE_DEVICES=$1 timeout 110 python3 $2 --steady --timed 64 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 scripts/profile_step.py sub_g0a & prof 1 .bench/muon_eager_subtract.py eager_g1a; wait
grep -H "phase:timed" $P/*.txt
prof 0 .bench/muon_eager_subtract.py eager_g0b & prof 1 scripts/profile_step.py sub_g1b; wait
grep -H "phase:timed" $P/*.txt
for n in sub_g0a eager_g1a; do grep -h -A1 "| optimizer step" $P/$n/profile_breakdown.md; done
