#!/usr/bin/env bash
# Planned device call of the next session (not run yet): shards, then scripts/sweeps/batch_recipe.toml on two GPU
# lanes (nvidia-h200-x2), resuming where the last call stopped; logs and tables come back in $OUT. Copy this file to
# .bench/ and carry .bench and .whl as in session 7: `bash .bench/run_sweep_device.sh`, four calls in a row.
# On one GPU: GPUS=0 (one row at a time; half as many rows a call).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
B=/tmp/b; D=$B/golfmix_sp8192; mkdir -p $B
for s in train val; do
  [ -e $D/fineweb_${s}_000000.bin ] || python3 data/build_shards.py --docs .bench/${s}_docs.jsonl.xz --split $s \
     --tokenizer .bench/fineweb_8192_bpe.model --out $D --vocab-size 8192 --workers 16 2>&1 | tail -1
done
export DATA_PATH=$D TOKENIZER_PATH=.bench/fineweb_8192_bpe.model PYTHONUNBUFFERED=1
timeout 560 python3 scripts/sweep.py scripts/sweeps/batch_recipe.toml --gpus ${GPUS:-0,1} --deadline ${DEADLINE:-170} \
  --out $B/s8 > $B/s8_$(date +%s).out 2>&1
echo "sweep rc:$?"
tail -n 30 $(ls -t $B/s8_*.out | head -1)
tar czf $OUT/s8_logs.tgz -C $B s8/logs s8/results.md s8/results.csv $(cd $B && ls s8_*.out)
