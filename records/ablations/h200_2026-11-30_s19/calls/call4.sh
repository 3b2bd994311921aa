#!/usr/bin/env bash
# session 19 call 4: GPU 0 benches QK_NORM_KERNEL's op alone (.bench/bench_nr.py: NORM_ROPE_TOKENS x num_warps
# against the compiled path), then profile_step --steady --gaps with COMPILE_MODE=reduce-overhead; GPU 1 runs
# profile_step --steady --gaps (default mode), gaps listed from 5 us, 16 profiled steps (two sync cycles).
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/p4; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1"
prof() {  # GPU, compile mode, name
  env $C COMPILE_MODE=$2 CUDA_VISIBLE_DEVICES=$1 timeout 200 python3 -c "import sys, runpy; sys.path[:0] = ['.', 'scripts']; import profile_step as ps; ps.gaps_markdown.__defaults__ = (5, 60, False); sys.exit(ps.main(['--gaps', '--steady', '--steps', '16', '--out', '/tmp/p4/$3']))" > $P/$3.txt 2>&1; echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
(CUDA_VISIBLE_DEVICES=0 timeout 240 python3 .bench/bench_nr.py > $P/bench_nr.txt 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 ))s"; prof 0 reduce-overhead sro) &
prof 1 default sd
wait
grep -H "phase:timed" $P/*.txt; cat $P/bench_nr.txt | tail -40
tar czf $OUT/call4.tgz -C $P .
