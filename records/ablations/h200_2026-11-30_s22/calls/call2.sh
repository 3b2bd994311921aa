#!/usr/bin/env bash
# session 22 call 2: MLP_KERNEL's TMA op checked on the GPU (.bench/mlp_gpu_check.py); the env's step with the TMA
# kernel against session 21's pointer kernel (.bench/mlp_old_kernel.py), both GPUs, both orders, --steady --timed 64;
# then recipe_s22's two training runs side by side.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/s22c2; rm -rf $P; mkdir -p $P
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 .bench/mlp_gpu_check.py > $P/gpu_check.txt 2>&1; echo "gpu_check rc $?"; cat $P/gpu_check.txt | tail -8
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 MLP_KERNEL=1"
prof() {  # GPU, script, name, extra args
  env $C CUDA_VISIBLE_DEVICES=$1 timeout 120 python3 $2 --steady --timed 64 $4 --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
prof 0 scripts/profile_step.py tma_g0a "--top 300" & prof 1 .bench/mlp_old_kernel.py old_g1a; wait
prof 0 .bench/mlp_old_kernel.py old_g0b & prof 1 scripts/profile_step.py tma_g1b; wait
grep -H "phase:timed" $P/*.txt
tar czf $OUT/call2a.tgz -C $P .
CALL_SECONDS=$(( 585 - $(date +%s) + t0 )) ROW_SECONDS=400 bash scripts/sweep_device.sh scripts/sweeps/recipe_s22.toml s22
