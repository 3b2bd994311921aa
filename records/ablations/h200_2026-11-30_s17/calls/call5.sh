#!/usr/bin/env bash
# session 17 call 5: COMPILE_MODE=reduce-overhead A/B at HEAD, both GPU orders; stdout straight to $OUT
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8"
run() { env $C COMPILE_MODE=$1 CUDA_VISIBLE_DEVICES=$2 timeout $3 python3 scripts/profile_step.py --out /tmp/p5/$4 > $OUT/$4.txt 2>&1; echo "$4 rc $? at $(( $(date +%s) - t0 ))s"; }
run default 0 110 def_g0 & run reduce-overhead 1 110 ro_g1; wait
run reduce-overhead 0 60 ro_g0 & run default 1 60 def_g1; wait
grep -H "phase:timed" $OUT/*.txt
