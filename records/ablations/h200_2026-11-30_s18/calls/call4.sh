#!/usr/bin/env bash
# (run from the repo root on the device, with .bench/ and .whl/ carried)
# session 18 call 4: XSA_KERNEL's block sizes. GPU 0: bench_xsa.py over more XSA_TOKENS pairs; then profile_step at
# XSA_TOKENS (32,16) and (32,32), each on both GPUs (ABBA).
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/p4; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1"
prof() {  # GPU, forward tokens, backward tokens
  env $C CUDA_VISIBLE_DEVICES=$1 timeout 130 python3 -c "import sys, runpy; sys.path[:0] = ['.', 'scripts']; import train_gpt as tg; tg.XSA_TOKENS = ($2, $3); sys.argv = ['profile_step.py', '--out', '$P/t$2_$3_g$1']; runpy.run_path('scripts/profile_step.py', run_name='__main__')" > $P/t$2_$3_g$1.txt 2>&1; echo "t$2_$3_g$1 rc $? at $(( $(date +%s) - t0 ))s"; }
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 scripts/bench_xsa.py --tokens 32/16,32/32,64/32,64/64,16/32,128/64,32/64 > $P/bench_xsa.txt 2>&1 &
prof 1 32 32; wait
prof 0 32 32 & prof 1 32 16; wait
prof 0 32 16
grep -H "bench_xsa\|phase:timed" $P/*.txt
tar czf $OUT/call4.tgz -C $P .
