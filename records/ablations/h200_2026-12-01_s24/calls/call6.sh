#!/usr/bin/env bash
# session 24 call 6 (nvidia-h200-x2): CUDA graphs under DDP. The env's proxy recipe (recipe_s24's base + kernels +
# MUON_FUSED=1) on 2 GPUs with torchrun for 45 s with COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32, then export,
# round trip and the sliding eval. Checks: it trains and scores without error; tok/s.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=$OUT/s24c6; mkdir -p $P
env DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 MAX_WALLCLOCK_SECONDS=45 TRAIN_BATCH_TOKENS=131072 GRAD_ACCUM_STEPS=1 BROTLI_QUALITY=5 EVAL_STRIDE=64 EVAL_BUDGET_SECONDS=35 FP_PHASE=1 QAT_START_FRAC=0.3 MLP_MULT=4 MUON_BATCHED=1 SCALE_FORMAT=log8 MUON_WD=0.04 NUM_HEADS=6 NUM_KV_HEADS=2 ROPE_DIMS=64 LOGIT_SOFTCAP=15 QAT_RAMP_FRAC=0.1 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1 MUON_FUSED=1 COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32 RUN_ID=ddpro32 LOG_DIR=$P ARTIFACT_PATH=/tmp/ddpro32.ptz timeout 200 torchrun --standalone --nproc_per_node=2 train_gpt.py > $P/ddpro32.stdout 2>&1
echo "ddpro32 rc $? at $(( $(date +%s) - t0 ))s"; grep -h "world_size\|step:.*mfu\|final_roundtrip\|rror" $P/ddpro32.txt | tail -6; tail -3 $P/ddpro32.stdout
