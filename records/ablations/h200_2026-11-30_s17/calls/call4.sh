#!/usr/bin/env bash
# (run from the repo root on the device, with .bench/ and .whl/ carried; .bench/train_gpt_8d31ffc.py = git show 8d31ffc:train_gpt.py)
# session 17 call 4: BatchedMuon foreach A/B, old (8d31ffc) vs new (HEAD), both GPU orders
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8"
P=/tmp/p4; mkdir -p $P /tmp/old/scripts; cp .bench/train_gpt_8d31ffc.py /tmp/old/train_gpt.py; cp scripts/profile_step.py /tmp/old/scripts/
run() { env $C CUDA_VISIBLE_DEVICES=$2 timeout $3 python3 $1 --out $P/$4 > $P/$4.txt 2>&1; echo "$4 rc $? at $(( $(date +%s) - t0 ))s"; }
run /tmp/old/scripts/profile_step.py 0 150 old_g0 & run scripts/profile_step.py 1 150 new_g1; wait
run scripts/profile_step.py 0 120 new_g0 & run /tmp/old/scripts/profile_step.py 1 120 old_g1; wait
grep -H "phase:timed" $P/*.txt
tar czf $OUT/call4.tgz -C $P .
