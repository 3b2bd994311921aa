#!/usr/bin/env bash
# golf-proxy-300 (../shared/bench/README.md) in one command on one GPU: shards from golfmix, 300 s of training,
# export, reload, final eval, and one summary line. Any knob of train_gpt.py can be overridden from the
# environment (e.g. MATRIX_LR=0.04 scripts/bench_proxy.sh). The final score uses sliding windows of stride 64, as
# issue 12's target is stated (EVAL_STRIDE=0: disjoint windows, about 0.025 worse).
#   GOLFMIX_DIR  folder with train_docs.jsonl.xz / val_docs.jsonl.xz   (default ../shared/data/golfmix)
#   TOKENIZER    SentencePiece model                                  (default ../shared/data/tokenizers/fineweb_8192_bpe.model)
#   BENCH_DIR    where shards, logs and the artifact go               (default bench_runs)
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)

GOLFMIX_DIR=${GOLFMIX_DIR:-../shared/data/golfmix}
TOKENIZER=${TOKENIZER:-../shared/data/tokenizers/fineweb_8192_bpe.model}
BENCH_DIR=${BENCH_DIR:-bench_runs}
RUN_ID=${RUN_ID:-proxy300_$(date +%Y%m%d_%H%M%S)}
DATA=$(GOLFMIX_DIR=$GOLFMIX_DIR TOKENIZER=$TOKENIZER scripts/golfmix_shards.sh "$BENCH_DIR")
VOCAB=${DATA##*_sp}
t_data=$(date +%s)

LOG="$BENCH_DIR/$RUN_ID.log"
env DATA_PATH="$DATA" TOKENIZER_PATH="$TOKENIZER" VOCAB_SIZE="$VOCAB" RUN_ID="$RUN_ID" LOG_DIR="$BENCH_DIR" \
  ARTIFACT_PATH="$BENCH_DIR/$RUN_ID.ternary.ptz" \
  MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-300} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-65536} \
  GRAD_ACCUM_STEPS=${GRAD_ACCUM_STEPS:-1} EVAL_STRIDE=${EVAL_STRIDE:-64} \
  python3 train_gpt.py 2>&1 | tee "$LOG.stdout"
t_end=$(date +%s)

python3 scripts/runlog.py "$BENCH_DIR/$RUN_ID.txt" --bench $((t_end - t_start)) $((t_data - t_start))
