#!/usr/bin/env bash
# (run from the repo root on the device, with .bench/ and .whl/ carried)
# session 18 call 1: GPU 0 trains elr04 (recipe_s18); GPU 1 benches XSA_KERNEL alone (bench_xsa.py), then
# profile_step A/B (XSA_KERNEL 0, 1, 1, 0 on the same GPU), the last with --shapes.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards at $(( $(date +%s) - t0 ))s"
if pgrep -f "scripts/sweep.py" >/dev/null; then echo "sweep already running"; else (GPUS=0 CALL_SECONDS=$(( 560 - $(date +%s) + t0 )) bash scripts/sweep_device.sh scripts/sweeps/recipe_s18.toml s18 > /tmp/sweep_call1.txt 2>&1; echo "sweep rc $? at $(( $(date +%s) - t0 ))s" >> /tmp/sweep_call1.txt) & fi
P=/tmp/p1; mkdir -p $P
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" > $P/versions.txt 2>&1
CUDA_VISIBLE_DEVICES=1 timeout 150 python3 scripts/bench_xsa.py --tokens 32/16,16/16,64/32,32/8,16/8 > $P/bench_xsa.txt 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 ))s"
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8"
run() { env $C XSA_KERNEL=$1 CUDA_VISIBLE_DEVICES=1 timeout 110 python3 scripts/profile_step.py --out $P/$2 ${3:-} > $P/$2.txt 2>&1; echo "$2 rc $? at $(( $(date +%s) - t0 ))s"; }
run 0 x0a; run 1 x1a; run 1 x1b; run 0 x0b --shapes
grep -H "phase:timed\|step_ms" $P/*.txt | head -20
wait; while pgrep -f scripts/sweep.py >/dev/null && [ $(( $(date +%s) - t0 )) -lt 585 ]; do sleep 5; done
cat /tmp/sweep_call1.txt | tail -15
cp /tmp/sweep_call1.txt $P/
tar czf $OUT/call1.tgz -C $P .
ls $OUT
