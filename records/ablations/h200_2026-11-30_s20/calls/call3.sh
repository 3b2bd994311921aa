#!/usr/bin/env bash
# session 20 call 3: is the step CPU-bound once CE_KERNEL shortens the GPU's work? COMPILE_MODE=reduce-overhead (CUDA
# graphs: the compiled forward and backward launched from a graph) against the default. GPU 0: CE_KERNEL=1 with
# reduce-overhead, default, default, reduce-overhead. GPU 1: reduce-overhead with CE_KERNEL=1 COMBO_KERNELS=1, then
# with CE_KERNEL=0, the same twice, the first again. The env's step (XSA_KERNEL=1 QK_NORM_KERNEL=1), --steady.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
echo "shards at $(( $(date +%s) - t0 ))s"
P=/tmp/s20c3; rm -rf $P; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1 QK_NORM_KERNEL=1"
prof() {  # GPU, extra env, name
  env $C $2 CUDA_VISIBLE_DEVICES=$1 timeout 170 python3 scripts/profile_step.py --steady --out $P/$3 > $P/$3.txt 2>&1
  echo "$3 rc $? at $(( $(date +%s) - t0 ))s"; }
R=COMPILE_MODE=reduce-overhead
(prof 0 "CE_KERNEL=1 $R" ro_ce1_a; prof 0 CE_KERNEL=1 d_ce1_a; prof 0 CE_KERNEL=1 d_ce1_b; prof 0 "CE_KERNEL=1 $R" ro_ce1_b) &
(prof 1 "CE_KERNEL=1 COMBO_KERNELS=1 $R" ro_ce1cb_a; prof 1 "CE_KERNEL=0 $R" ro_ce0_a; prof 1 "CE_KERNEL=0 $R" ro_ce0_b
 prof 1 "CE_KERNEL=1 COMBO_KERNELS=1 $R" ro_ce1cb_b) &
wait
grep -H "phase:timed" $P/*.txt; grep -il "skipping cudagraph" $P/*.txt
tar czf $OUT/call3.tgz -C $P .
