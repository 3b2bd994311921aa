#!/usr/bin/env bash
# session 23 call 1 (prepared in session 22): MUON_FUSED 1 against 0 on the env's step (MLP_KERNEL's TMA kernel),
# both GPUs, both orders, --steady --timed 64; the first MUON_FUSED run also writes the op table by shapes.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s23c1; rm -rf $P; mkdir -p $P
nvidia-smi --query-gpu=index,name,clocks.max.sm,clocks.sm,power.limit,temperature.gpu --format=csv > $P/gpus.txt 2>&1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1"
prof() {  # GPU, extra env, name, extra args
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 150 python3 scripts/profile_step.py --steady --timed 64 $4 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 MUON_FUSED=1 fused_g0a "--top 300" & prof 1 MUON_FUSED=0 base_g1a; wait
prof 0 MUON_FUSED=0 base_g0b & prof 1 MUON_FUSED=1 fused_g1b; wait
grep -H "phase:timed" $P/*.txt
for n in fused_g0a base_g1a; do grep -h -A3 "| optimizer step" $P/$n/profile_breakdown.md; done
cat $P/gpus.txt
tar czf $OUT/call1.tgz -C $P .
