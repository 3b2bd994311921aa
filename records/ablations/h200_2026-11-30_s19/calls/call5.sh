#!/usr/bin/env bash
# session 19 call 5: QK_NORM_KERNEL with cos/sin tables. GPU 0: .bench/bench_nr.py (tokens x warps against the
# compiled path) while GPU 1 profiles QK_NORM_KERNEL=0; then the bench's best (tokens, warps) and the default
# (32, 4) with QK_NORM_KERNEL=1 against 0, both GPUs, both orders.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
D=$(GOLFMIX_DIR=.bench TOKENIZER=.bench/fineweb_8192_bpe.model scripts/golfmix_shards.sh /tmp/b) || exit 1
P=/tmp/p5; mkdir -p $P
C="DATA_PATH=$D TOKENIZER_PATH=$PWD/.bench/fineweb_8192_bpe.model VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 MUON_WD=0.04 SCALE_FORMAT=log8 XSA_KERNEL=1"
prof() {  # GPU, QK_NORM_KERNEL, tokens, warps, name
  env $C QK_NORM_KERNEL=$2 CUDA_VISIBLE_DEVICES=$1 timeout 150 python3 -c "import sys, runpy; sys.path[:0] = ['.', 'scripts']; import train_gpt as tg; tg.NORM_ROPE_TOKENS = ($3, $3); tg.NORM_ROPE_WARPS = ($4, $4); sys.argv = ['profile_step.py', '--out', '$P/$5']; runpy.run_path('scripts/profile_step.py', run_name='__main__')" > $P/$5.txt 2>&1; echo "$5 rc $? at $(( $(date +%s) - t0 ))s"; }
(CUDA_VISIBLE_DEVICES=0 timeout 150 python3 .bench/bench_nr.py > $P/bench_nr.txt 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 ))s") &
prof 1 0 32 4 q0g1
wait
best=$(python3 - $P/bench_nr.txt <<'PY'
import re, sys, collections
tot = collections.defaultdict(float)
for line in open(sys.argv[1]):
    m = re.match(r"H\d kernel BT(\d+) warps(\d+) fwd_ms:\S+ fwdbwd_ms:(\S+)", line)
    if m:
        tot[(m[1], m[2])] += float(m[3])
print(*min(tot, key=tot.get) if tot else ("32", "4"))
PY
)
set -- $best; echo "best tokens $1 warps $2"
prof 0 1 $1 $2 qb_g0 & prof 1 1 32 4 qd_g1; wait
prof 0 0 32 4 q0g0 & prof 1 1 $1 $2 qb_g1; wait
prof 0 1 32 4 qd_g0
grep -H "phase:timed" $P/*.txt; cat $P/bench_nr.txt
tar czf $OUT/call5.tgz -C $P .
