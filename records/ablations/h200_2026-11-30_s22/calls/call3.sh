#!/usr/bin/env bash
# session 22 call 3: inductor's coordinate-descent tuning (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1) against none on
# the env's step (MLP_KERNEL's TMA kernel), both GPUs, both orders, --steady --timed 64 (the first tuning run may take
# minutes: a 240 s cap; the second finds its kernels' tuned configs in the inductor cache).
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s22c3; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1"
prof() {  # GPU, extra env, name, cap
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout $4 python3 scripts/profile_step.py --steady --timed 64 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 cdt_g0a 240 & prof 1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 base_g1a 100; wait
prof 0 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 base_g0b 100 & prof 1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 cdt_g1b 200; wait
grep -H "phase:timed\|phase:warmup_done" $P/*.txt
grep -h -A10 "| bucket | ms/step" $P/cdt_g0a/profile_breakdown.md
tar czf $OUT/call3.tgz -C $P .
