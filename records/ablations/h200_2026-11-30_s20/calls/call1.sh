#!/usr/bin/env bash
# session 20 call 1: GPU 0 checks CE_KERNEL on the GPU (.bench/ce_check.py), then profiles CE_KERNEL 0, 1, 1, 0;
# GPU 1 profiles COMBO_KERNELS 0, 1, 1, 0. Both on the env's step (XSA_KERNEL=1 QK_NORM_KERNEL=1), --steady.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards at $(( $(date +%s) - t0 ))s"
P=/tmp/s20c1; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1"
prof() {  # GPU, extra env, name
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 170 python3 scripts/profile_step.py --steady --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
(env $C CUDA_VISIBLE_DEVICES=0 timeout 120 python3 .bench/ce_check.py > $P/ce_check.txt 2>&1; echo "ce_check rc $? at $(( $(date +%s) - t0 ))s"
 prof 0 CE_KERNEL=0 ce0a; prof 0 CE_KERNEL=1 ce1a; prof 0 CE_KERNEL=1 ce1b; prof 0 CE_KERNEL=0 ce0b) &
(prof 1 COMBO_KERNELS=0 cb0a; prof 1 COMBO_KERNELS=1 cb1a; prof 1 COMBO_KERNELS=1 cb1b; prof 1 COMBO_KERNELS=0 cb0b) &
wait
grep -H "phase:timed" $P/*.txt; cat $P/ce_check.txt; tail -3 $P/cb1a.txt
tar czf $OUT/call1.tgz -C $P .
