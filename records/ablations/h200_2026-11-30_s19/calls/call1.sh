#!/usr/bin/env bash
# (run from the repo root on the device, with .bench/ and .whl/ carried)
# session 19 call 1: GPU 0 trains xsaqk (recipe_s19: both kernels, checkpoint kept); GPU 1 runs profile_step with
# QK_NORM_KERNEL 0, 1, 1, 0 (XSA_KERNEL=1 throughout, as the env pins it), each with --gaps.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards at $(( $(date +%s) - t0 ))s"
(GPUS=0 CALL_SECONDS=$(( 565 - $(date +%s) + t0 )) bash scripts/sweep_device.sh scripts/sweeps/recipe_s19.toml s19 > /tmp/sweep_call1.txt 2>&1; echo "sweep rc $? at $(( $(date +%s) - t0 ))s" >> /tmp/sweep_call1.txt) &
P=/tmp/p1; mkdir -p $P
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" > $P/versions.txt 2>&1
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1"
run() { env $C QK_NORM_KERNEL=$1 CUDA_VISIBLE_DEVICES=1 timeout 125 python3 scripts/profile_step.py --gaps --out $P/$2 > $P/$2.txt 2>&1; echo "$2 rc $? at $(( $(date +%s) - t0 ))s"; }
run 0 q0a; run 1 q1a; run 1 q1b; run 0 q0b
grep -H "phase:timed" $P/*.txt
wait
tail -15 /tmp/sweep_call1.txt
cp /tmp/sweep_call1.txt $P/
tar czf $OUT/call1.tgz -C $P .
ls -la $OUT
