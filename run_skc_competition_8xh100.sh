#!/usr/bin/env bash
# The canonical competition launch: best_known_competition.env on 8 GPUs, 600 s of training, one seed.
#
#   ./run_skc_competition_8xh100.sh SEED [KEY=VALUE ...]      # trailing KEY=VALUEs override the config
#
# What it does: validates the config against train_gpt.py (a typo in a knob name is an error, not a silently
# ignored variable), builds shards from GOLFMIX_DIR if DATA_PATH has none, extracts the configured train_gpt.py
# with build_submission.py --dce (so the run trains the very code that gets submitted and its log counts the
# submission's code bytes), and launches it under torchrun. Everything of the run lands in a new folder
# $RUNS_DIR/<run id>/: config.env, commit, train_gpt.py, stdout.txt, the log and the artifact.
#
# Environment (defaults in brackets):
#   CONFIG [best_known_competition.env]  NPROC [8]  RUNS_DIR [logs/competition]  RUN_PREFIX [competition]
#   DATA_PATH [data/datasets/fineweb10B_sp8192]  TOKENIZER_PATH [data/tokenizers/fineweb_8192_bpe.model]
#   GOLFMIX_DIR  folder with train_docs.jsonl.xz / val_docs.jsonl.xz to build DATA_PATH from when it has no shards
#   EXTRACT [1]  0 launches the full train_gpt.py instead of the extracted one
#   DEVICE [auto]  cpu runs the multi-process path with gloo on CPU (tests, no GPU box)
# The run sees the config, the trailing KEY=VALUEs, DATA_PATH/TOKENIZER_PATH, the machine knobs DEVICE, COMPILE and
# ATTN_IMPL, and the machine's own variables (PATH, CUDA_*, NCCL_*, ...). Any other train_gpt.py knob set in the
# caller's environment (a MATRIX_LR exported for an earlier experiment) is unset, with a warning naming it.
set -euo pipefail
cd "$(dirname "$0")"
for knob in $(sed -n 's/.*= Knob("\([A-Z0-9_]*\)".*/\1/p' train_gpt.py); do
  case " DATA_PATH TOKENIZER_PATH DEVICE COMPILE ATTN_IMPL " in *" $knob "*) continue ;; esac
  [[ -n ${!knob+set} ]] || continue
  case " SEED RUN_ID LOG_DIR ARTIFACT_PATH WORLD_SIZE RANK LOCAL_RANK " in
    *" $knob "*) ;;  # set by this script or by torchrun anyway
    *) echo "warning: $knob=${!knob} is set in the environment, outside ${CONFIG:-best_known_competition.env} and" \
         "the arguments; unset for this run (pass $knob=... after the seed to keep it)" >&2 ;;
  esac
  unset "$knob"
done
SEED=${1:?usage: $0 SEED [KEY=VALUE ...]}
shift
CONFIG=${CONFIG:-best_known_competition.env}
NPROC=${NPROC:-8}
RUNS_DIR=${RUNS_DIR:-logs/competition}
DATA_PATH=${DATA_PATH:-data/datasets/fineweb10B_sp8192}
TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_8192_bpe.model}
fail() { echo "error: $*" >&2; exit 2; }

[[ -f $CONFIG ]] || fail "config $CONFIG not found"
[[ -f $TOKENIZER_PATH ]] || fail "tokenizer $TOKENIZER_PATH not found (set TOKENIZER_PATH)"
for kv in "$@"; do [[ $kv == *=* ]] || fail "expected KEY=VALUE, got '$kv'"; done
VOCAB=$(sed -n 's/^VOCAB_SIZE=//p' "$CONFIG" | tail -1); VOCAB=${VOCAB:-8192}
if ! ls "$DATA_PATH"/fineweb_train_*.bin >/dev/null 2>&1; then
  [[ -n ${GOLFMIX_DIR:-} ]] || fail "no shards in $DATA_PATH: set DATA_PATH, or GOLFMIX_DIR to build them"
  for split in train val; do
    python3 data/build_shards.py --docs "$GOLFMIX_DIR/${split}_docs.jsonl.xz" --split $split \
      --tokenizer "$TOKENIZER_PATH" --out "$DATA_PATH" --vocab-size "$VOCAB"
  done
fi
if [[ ${DEVICE:-auto} != cpu ]]; then
  found=$(python3 -c "import torch; print(torch.cuda.device_count())")
  (( found >= NPROC )) || fail "this launch needs $NPROC CUDA GPUs, found $found (NPROC=... for fewer)"
fi

RUN_ID=${RUN_PREFIX:-competition}_seed${SEED}_$(date +%Y%m%d_%H%M%S)
RUN_DIR=$RUNS_DIR/$RUN_ID
[[ -e $RUN_DIR ]] && fail "$RUN_DIR exists; never overwriting a run"
mkdir -p "$RUN_DIR"
cp "$CONFIG" "$RUN_DIR/config.env"
printf '%s\n' "$@" >>"$RUN_DIR/config.env"
git rev-parse HEAD >"$RUN_DIR/commit" 2>/dev/null || echo unknown >"$RUN_DIR/commit"

# extraction validates the config too: train_gpt.py itself ignores variables it does not know
sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
python3 build_submission.py --dce --wrap never --config "$CONFIG" "${sets[@]}" --extract-only "$RUN_DIR/train_gpt.py"
SCRIPT=$RUN_DIR/train_gpt.py
[[ ${EXTRACT:-1} == 1 ]] || SCRIPT=train_gpt.py

set -a
# shellcheck disable=SC1090
source "$CONFIG"
set +a
for kv in "$@"; do export "${kv?}"; done
export SEED RUN_ID DATA_PATH TOKENIZER_PATH LOG_DIR=$RUN_DIR ARTIFACT_PATH=$RUN_DIR/final_model.ternary.ptz
echo "launch: torchrun --standalone --nproc_per_node=$NPROC $SCRIPT  (config $CONFIG $*, seed $SEED, into $RUN_DIR)"
set +e
python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$SCRIPT" 2>&1 | tee "$RUN_DIR/stdout.txt"
rc=${PIPESTATUS[0]}
set -e
python3 scripts/runlog.py "$RUN_DIR/$RUN_ID.txt" --bench "$SECONDS" 0 | sed 's/^bench:golf-proxy-300/run:'"$RUN_ID"'/'
echo "next: python3 build_submission.py --dce --config $CONFIG --name <name> --github-id <you> --log $RUN_DIR/$RUN_ID.txt [--log ...]"
exit "$rc"
