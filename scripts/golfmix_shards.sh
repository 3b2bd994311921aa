#!/usr/bin/env bash
# golf-proxy shards, built once: ROOT/golfmix_sp<vocab> from GOLFMIX_DIR's train_docs / val_docs.jsonl.xz and the
# SentencePiece model TOKENIZER (both from the environment). Builds only the splits the folder lacks, with progress
# on stderr, and prints the folder on stdout. Used by bench_proxy.sh and sweep_device.sh:
#   DATA=$(scripts/golfmix_shards.sh ROOT)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: $0 ROOT  (GOLFMIX_DIR and TOKENIZER from the environment)" >&2; exit 2; }
vocab=$(python3 -c "import sentencepiece as s; print(s.SentencePieceProcessor(model_file='$TOKENIZER').vocab_size())")
data=$1/golfmix_sp$vocab
mkdir -p "$1"
for split in train val; do
  ls "$data"/fineweb_${split}_*.bin >/dev/null 2>&1 || python3 data/build_shards.py \
    --docs "$GOLFMIX_DIR/${split}_docs.jsonl.xz" --split $split --tokenizer "$TOKENIZER" --out "$data" \
    --vocab-size "$vocab" >&2
done
echo "$data"
