#!/usr/bin/env bash
# session 23 call 2: MUON_FUSED's compile on the GPU (.bench/ns_fused_check.py: three forms against the eager
# path); if form B (loop_ordering_after_fusion off, what train_gpt.py now compiles) works, the A/B of call 1 again.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
P=/tmp/s23c2; rm -rf $P; mkdir -p $P
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 .bench/ns_fused_check.py > $P/ns_check.txt 2>&1; echo "ns_check rc $? at $(( $(date +%s) - t0 ))s"
grep "^form" $P/ns_check.txt
if grep -q "^form B: ok" $P/ns_check.txt; then
  D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
  C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1"
  prof() {  # GPU, extra env, name, extra args
    env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 150 python3 scripts/profile_step.py --steady --timed 64 $4 --out $P/$3 > $P/$3.txt 2>&1
    echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
  prof 0 MUON_FUSED=1 fused_g0a "--top 300" & prof 1 MUON_FUSED=0 base_g1a; wait
  prof 0 MUON_FUSED=0 base_g0b & prof 1 MUON_FUSED=1 fused_g1b; wait
  grep -H "phase:timed" $P/*.txt
  for n in fused_g0a base_g1a; do grep -h -A3 "| optimizer step" $P/$n/profile_breakdown.md; done
fi
tail -5 $P/ns_check.txt
tar czf $OUT/call2.tgz -C $P .
