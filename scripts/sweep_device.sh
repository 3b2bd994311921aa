#!/usr/bin/env bash
# One call of a lent GPU machine whose commands are cut at 600 s: golf-proxy shards (built once, kept in $WORK),
# then scripts/sweep.py on a manifest, resumed where the last call stopped, on GPU lanes side by side. Rows that
# would not finish in this call are not started (--deadline; rows that only re-score a checkpoint have their own,
# later --rescore-deadline, so they fill the end of a call); the next call, the same command, goes on. Logs and
# tables come back as $OUT/<name>_logs.tgz when the machine sets OUT.
#   bash scripts/sweep_device.sh scripts/sweeps/<manifest>.toml <name>
#   GOLFMIX_DIR  folder with train_docs.jsonl.xz / val_docs.jsonl.xz  (default .bench, else ../shared/data/golfmix)
#   TOKENIZER    SentencePiece model                                (default <that folder>/fineweb_8192_bpe.model)
#   WORK         shards, checkpoints and sweep outputs               (default /tmp/b: keep it between calls)
#   WHEELS       wheels to install first, e.g. brotli                (default .whl)
#   GPUS         sweep.py --gpus lanes                               (default 0,1; one GPU: 0)
#   CALL_SECONDS what this call may take in all                      (default 570)
#   ROW_SECONDS  the longest row, start to end (a 300 s run: 350-440) (default 440)
#   RESCORE_SECONDS  the longest re-scoring row (LoRA TTT: 40-70 s)  (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 MANIFEST NAME" >&2; exit 2; }
manifest=$1 name=$2
[ -f "$manifest" ] || { echo "no manifest $manifest" >&2; exit 2; }
t0=$(date +%s)
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # brotli, where the machine has none (the device README)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
GOLFMIX_DIR=${GOLFMIX_DIR:-$([ -d .bench ] && echo .bench || echo ../shared/data/golfmix)}
TOKENIZER=${TOKENIZER:-$GOLFMIX_DIR/fineweb_8192_bpe.model}
WORK=${WORK:-/tmp/b}
CALL_SECONDS=${CALL_SECONDS:-570} ROW_SECONDS=${ROW_SECONDS:-440} RESCORE_SECONDS=${RESCORE_SECONDS:-100}
for v in CALL_SECONDS ROW_SECONDS RESCORE_SECONDS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v=${!v}: must be whole seconds" >&2; exit 2; }
done
for f in "$GOLFMIX_DIR/train_docs.jsonl.xz" "$GOLFMIX_DIR/val_docs.jsonl.xz" "$TOKENIZER"; do
  [ -f "$f" ] || { echo "missing $f" >&2; exit 2; }
done
DATA=$(GOLFMIX_DIR=$GOLFMIX_DIR TOKENIZER=$TOKENIZER scripts/golfmix_shards.sh "$WORK")
export DATA_PATH=$DATA TOKENIZER_PATH=$TOKENIZER PYTHONUNBUFFERED=1
used=$(( $(date +%s) - t0 ))
left=$(( CALL_SECONDS - used ))
deadline=$(( left > ROW_SECONDS ? left - ROW_SECONDS : 0 ))  # no row starts that could not finish (0: none)
rescore_deadline=$(( left - RESCORE_SECONDS > deadline ? left - RESCORE_SECONDS : deadline ))
stamp=$(date +%s)
echo "sweep_device: $manifest -> $WORK/$name, deadline ${deadline}s (re-scoring rows ${rescore_deadline}s), cut at ${left}s"
rc=0
timeout "$left" python3 scripts/sweep.py "$manifest" --gpus "${GPUS:-0,1}" --deadline "$deadline" \
  --rescore-deadline "$rescore_deadline" --out "$WORK/$name" \
  > "$WORK/${name}_$stamp.out" 2>&1 || rc=$?
echo "sweep rc:$rc (0: all rows done; 3: rows left for the next call; 124: cut by the call's time)"
tail -n 30 "$WORK/${name}_$stamp.out"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/${name}_logs.tgz" -C "$WORK" "$name/logs" $(cd "$WORK" && ls "$name"/results.* 2>/dev/null) \
    $(cd "$WORK" && ls "${name}"_*.out)
fi
exit $rc
