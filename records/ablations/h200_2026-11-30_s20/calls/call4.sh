#!/usr/bin/env bash
# session 20 call 4: .bench/ce_check.py (CE_KERNEL's second kernels: op timing and the model's gradients on the GPU),
# then recipe_s20b side by side (xsaqkce on GPU 0, xsaqkce_ro on GPU 1).
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1"
env $C CUDA_VISIBLE_DEVICES=0 timeout 100 python3 .bench/ce_check.py > $OUT/ce_check_v2.txt 2>&1; echo "ce_check rc $? at $(( $(date +%s) - t0 ))s"
cat $OUT/ce_check_v2.txt | tail -8
CALL_SECONDS=$(( 580 - ($(date +%s) - t0) )) bash scripts/sweep_device.sh scripts/sweeps/recipe_s20b.toml s20b 2>&1 | tail -30
