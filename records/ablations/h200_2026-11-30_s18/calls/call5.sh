#!/usr/bin/env bash
# (run from the repo root on the device, with .bench/ and .whl/ carried; .bench/train_gpt_3086bfe.py = git show 3086bfe:train_gpt.py)
# session 18 call 5: XSA_KERNEL=1 as an opaque custom op (3086bfe) against a triton_op that inductor launches from
# its own wrapper (the working tree), both GPU orders.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1"
P=/tmp/p5; mkdir -p $P /tmp/old/scripts; cp .bench/train_gpt_3086bfe.py /tmp/old/train_gpt.py; cp scripts/profile_step.py /tmp/old/scripts/
run() { env $C CUDA_VISIBLE_DEVICES=$2 timeout 120 python3 $1 --out $P/$3 > $P/$3.txt 2>&1; echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
run /tmp/old/scripts/profile_step.py 0 old_g0 & run scripts/profile_step.py 1 new_g1; wait
run scripts/profile_step.py 0 new_g0 & run /tmp/old/scripts/profile_step.py 1 old_g1; wait
grep -H "phase:timed" $P/*.txt
tail -5 $P/new_g1.txt
tar czf $OUT/call5.tgz -C $P .
