#!/usr/bin/env bash
# The competition stack (best_known_competition.env, extracted train_gpt.py, torchrun) at golf-proxy-300 scale
# on 2 GPUs: 300 s of training, 262,144 tokens per step. Shards are built from golfmix when missing.
#
#   ./run_skc_competition_2gpu_proxy.sh SEED [KEY=VALUE ...]
#
# Same environment as run_skc_competition_8xh100.sh; GOLFMIX_DIR defaults to ../shared/data/golfmix and
# DATA_PATH to data/datasets/golfmix_sp8192, TOKENIZER_PATH to ../shared/data/tokenizers/fineweb_8192_bpe.model. Logs go to logs/proxy2/<run id>/.
set -euo pipefail
cd "$(dirname "$0")"
SEED=${1:?usage: $0 SEED [KEY=VALUE ...]}
shift
export NPROC=${NPROC:-2} RUNS_DIR=${RUNS_DIR:-logs/proxy2} RUN_PREFIX=${RUN_PREFIX:-proxy2} \
  GOLFMIX_DIR=${GOLFMIX_DIR:-../shared/data/golfmix} DATA_PATH=${DATA_PATH:-data/datasets/golfmix_sp8192} \
  TOKENIZER_PATH=${TOKENIZER_PATH:-../shared/data/tokenizers/fineweb_8192_bpe.model}
exec ./run_skc_competition_8xh100.sh "$SEED" MAX_WALLCLOCK_SECONDS=300 TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=1 "$@"
