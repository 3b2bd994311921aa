#!/usr/bin/env bash
# Planned device call of the next session (not run yet): shards, then scripts/sweeps/batch_recipe.toml on two GPU
# lanes (nvidia-h200-x2), resuming where the last call stopped; logs and tables come back in $OUT. Copy this file to
# .bench/ and carry .bench and .whl as in session 7: `PROFILE=1 bash .bench/run_sweep_device.sh` once, then
# `bash .bench/run_sweep_device.sh` three times, in a row (about 1,700 s of device time in all).
# On one GPU: GPUS=0 (one row at a time; half as many rows a call).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
B=/tmp/b; D=$B/golfmix_sp8192; mkdir -p $B
t0=$(date +%s)  # the command may run 600 s: the sweep gets what is left of 570
for s in train val; do
  [ -e $D/fineweb_${s}_000000.bin ] || python3 data/build_shards.py --docs .bench/${s}_docs.jsonl.xz --split $s \
     --tokenizer .bench/fineweb_8192_bpe.model --out $D --vocab-size 8192 --workers 16 2>&1 | tail -1
done
export DATA_PATH=$D TOKENIZER_PATH=.bench/fineweb_8192_bpe.model PYTHONUNBUFFERED=1
if [ "${PROFILE:-0}" = 1 ]; then  # first call: TRAIN_SYNC_EVERY 1 against 8 at 65536, profile_step's timed steps,
  for k in 1 8; do                # one GPU each, side by side (~90 s); then the sweep
    g=$([ $k = 1 ] && echo 0 || echo 1)
    env CUDA_VISIBLE_DEVICES=$g FP_PHASE=1 MLP_MULT=4 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 TRAIN_SYNC_EVERY=$k \
      timeout 150 python3 scripts/profile_step.py --timed 80 --out $B/prof_sync$k > $B/prof_sync$k.out 2>&1 &
  done
  wait
  grep -h "phase:timed" $B/prof_sync1.out $B/prof_sync8.out
  tar czf $OUT/prof_sync.tgz -C $B prof_sync1 prof_sync8 prof_sync1.out prof_sync8.out
fi
used=$(( $(date +%s) - t0 ))
deadline=${DEADLINE:-$(( 170 - used > 10 ? 170 - used : 10 ))}  # a 300 s row takes ~360 s: start none after this
timeout $(( 570 - used )) python3 scripts/sweep.py scripts/sweeps/batch_recipe.toml --gpus ${GPUS:-0,1} \
  --deadline $deadline --out $B/s8 > $B/s8_$(date +%s).out 2>&1
echo "sweep rc:$?"
tail -n 30 $(ls -t $B/s8_*.out | head -1)
tar czf $OUT/s8_logs.tgz -C $B s8/logs s8/results.md s8/results.csv $(cd $B && ls s8_*.out)
