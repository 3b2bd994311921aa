#!/usr/bin/env bash
# The main job on the embedded sample, on CPU: builds shards from data/sample, trains a small preset for a few
# minutes, exports the artifact, reloads it and prints the final val_bpb and artifact bytes.
# Every train_gpt.py knob can still be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/datasets/sample_sp1024
TOK=data/sample/fineweb_1024_bpe.model
for split in train val; do
  if ! ls $DATA/fineweb_${split}_*.bin >/dev/null 2>&1; then
    python3 data/build_shards.py --docs data/sample/${split}_docs.jsonl.xz --split $split --tokenizer $TOK \
      --out $DATA --vocab-size 1024
  fi
done
export DATA_PATH=$DATA TOKENIZER_PATH=$TOK VOCAB_SIZE=1024 RUN_ID=${RUN_ID:-sample_cpu_$(date +%Y%m%d_%H%M%S)} DEVICE=${DEVICE:-cpu} \
  ARTIFACT_PATH=${ARTIFACT_PATH:-logs/sample_cpu.ternary.ptz} \
  NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2} \
  EMBED_DIM=${EMBED_DIM:-64} GROUP_SIZE=${GROUP_SIZE:-64} MLP_MULT=${MLP_MULT:-3} \
  TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192} \
  MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-150} COMPILE_WARMUP_STEPS=${COMPILE_WARMUP_STEPS:-0} \
  WARMUP_STEPS=${WARMUP_STEPS:-10} MATRIX_LR=${MATRIX_LR:-0.04} EMBED_LR=${EMBED_LR:-0.05} \
  MUON_MOMENTUM_WARMUP_STEPS=${MUON_MOMENTUM_WARMUP_STEPS:-50} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-20} \
  VAL_BATCH_TOKENS=${VAL_BATCH_TOKENS:-16384}
mkdir -p logs
python3 train_gpt.py
