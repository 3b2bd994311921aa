#!/usr/bin/env bash
# train_gpt_mlx.py with Mac defaults: a small model for a few minutes on the embedded sample (or your DATA_PATH),
# MAX_VAL_TOKENS capped for a quick score. Every train_gpt.py knob can still be overridden from the environment,
# e.g. `MAX_WALLCLOCK_SECONDS=60 ./run_mlx_reasoner.sh` or `MAX_VAL_TOKENS=0 ./run_mlx_reasoner.sh` (whole split).
# PYTHON=/path/to/python3 picks the interpreter; otherwise the first arm64 Python that imports mlx is used
# (an x86_64 Python under Rosetta cannot use the Apple GPU).
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=("${PYTHON:-}" python3 /opt/homebrew/bin/python3 /usr/local/bin/python3 /usr/bin/python3 python)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    if [ "$(uname -s)" = Darwin ] && [ "$("$py" -c 'import platform; print(platform.machine())' 2>/dev/null)" != arm64 ]; then
      continue
    fi
    "$py" -c 'import mlx.core' >/dev/null 2>&1 && { echo "$py"; return; }
  done
  echo "error: no Python with mlx found (on a Mac it must be arm64): pip install mlx numpy sentencepiece brotli" >&2
  exit 2
}
PY=$(find_python)

if [ -z "${DATA_PATH:-}" ]; then  # the embedded sample (sp1024), built once
  DATA_PATH=data/datasets/sample_sp1024
  TOKENIZER_PATH=${TOKENIZER_PATH:-data/sample/fineweb_1024_bpe.model}
  VOCAB_SIZE=${VOCAB_SIZE:-1024}
  for split in train val; do
    if ! ls $DATA_PATH/fineweb_${split}_*.bin >/dev/null 2>&1; then
      "$PY" data/build_shards.py --docs data/sample/${split}_docs.jsonl.xz --split $split \
        --tokenizer "$TOKENIZER_PATH" --out $DATA_PATH --vocab-size "$VOCAB_SIZE"
    fi
  done
fi

export DATA_PATH TOKENIZER_PATH=${TOKENIZER_PATH:-./data/tokenizers/fineweb_8192_bpe.model} VOCAB_SIZE=${VOCAB_SIZE:-8192} \
  RUN_ID=${RUN_ID:-mlx_$(date +%Y%m%d_%H%M%S)} ARTIFACT_PATH=${ARTIFACT_PATH:-logs/mlx.ternary.ptz} \
  NUM_LAYERS=${NUM_LAYERS:-6} MODEL_DIM=${MODEL_DIM:-256} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2} \
  EMBED_DIM=${EMBED_DIM:-128} GROUP_SIZE=${GROUP_SIZE:-64} MLP_MULT=${MLP_MULT:-3} \
  TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-512} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-16384} \
  MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-300} WARMUP_STEPS=${WARMUP_STEPS:-10} \
  MATRIX_LR=${MATRIX_LR:-0.04} EMBED_LR=${EMBED_LR:-0.05} MUON_MOMENTUM_WARMUP_STEPS=${MUON_MOMENTUM_WARMUP_STEPS:-50} \
  TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-10} MAX_VAL_TOKENS=${MAX_VAL_TOKENS:-65536} VAL_BATCH_TOKENS=${VAL_BATCH_TOKENS:-16384}
mkdir -p logs
echo "running: $PY train_gpt_mlx.py  ($("$PY" -c 'import platform, mlx.core as mx; print(platform.machine(), "mlx", mx.__version__, mx.default_device())'))"
echo "with: DATA_PATH=$DATA_PATH VOCAB_SIZE=$VOCAB_SIZE NUM_LAYERS=$NUM_LAYERS MODEL_DIM=$MODEL_DIM EMBED_DIM=$EMBED_DIM" \
  "TRAIN_SEQ_LEN=$TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS=$TRAIN_BATCH_TOKENS MAX_WALLCLOCK_SECONDS=$MAX_WALLCLOCK_SECONDS" \
  "MAX_VAL_TOKENS=$MAX_VAL_TOKENS ARTIFACT_PATH=$ARTIFACT_PATH"
exec "$PY" train_gpt_mlx.py
