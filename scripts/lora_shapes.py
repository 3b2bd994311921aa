"""The batch shapes a LoRA TTT pass meets (issue 14: TTT_LORA_BUCKET), without a model or a GPU: replays
train_gpt.py's own batching (lora_span_batches, lora_step_batches) over a validation split and prints, for each
chunk size, the pass's steps, its distinct (rows, window) shapes and the window tokens it computes, with and
without TTT_LORA_BUCKET. Everything else comes from the environment as train_gpt.py reads it (TTT_LORA_SPAN,
TTT_LORA_DOCS, EVAL_DOC_ISOLATED, TRAIN_SEQ_LEN, VOCAB_SIZE, BOS_ID); the pass's documents are those of one rank
of WORLD_SIZE ranks (default: the whole split).

    EVAL_DOC_ISOLATED=1 TTT_LORA_SPAN=8192 python3 scripts/lora_shapes.py '<shards>/fineweb_val_*.bin' --chunks 128,64
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402


def pass_shapes(tokens, h, rank=0, world=1):
    """The (rows, window) shape of every chunk step of rank `rank`'s LoRA TTT pass, in order."""
    first, last = tg.document_bounds(tokens, h.bos_id)
    lo, hi = tg.rank_share(len(tokens) - 1, rank, world)
    mine = (first > lo) & (first <= hi)
    spans = tg.adapter_spans(first[mine], last[mine], h)
    return [batch[0].shape for rows in tg.lora_span_batches(spans, h)
            for _, batch in tg.lora_step_batches(tokens, spans, rows, h)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="validation shards (a glob), as VAL_DATA_PATTERN would name them")
    ap.add_argument("--chunks", default="128,96,64,48", help="TTT_LORA_CHUNK values, comma-separated")
    args = ap.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        env = {**os.environ, "TTT_ENABLED": "1", "TTT_MODE": "lora"}
        h = tg.Hyperparameters(env)
        tokens = tg.load_validation_tokens(args.pattern, h.vocab_size)
        rows = []
        for chunk in chunks:
            for bucket in (0, 1):
                h = tg.Hyperparameters({**env, "TTT_LORA_CHUNK": str(chunk), "TTT_LORA_BUCKET": str(bucket)})
                shapes = pass_shapes(tokens, h)
                rows.append((chunk, bucket, len(shapes), len(set(shapes)), sum(r * t for r, t in shapes)))
    except (ValueError, tg.ConfigError, tg.DataError) as e:
        sys.exit(f"lora_shapes: {e}")
    print(f"{len(tokens) - 1} targets, span {h.ttt_lora_span}, {h.ttt_lora_docs} spans a batch, "
          f"documents isolated: {int(h.eval_doc_isolated)}")
    print("| chunk | TTT_LORA_BUCKET | steps | distinct shapes | window tokens |")
    print("|---:|---:|---:|---:|---:|")
    for chunk, bucket, steps, distinct, window in rows:
        print(f"| {chunk} | {bucket} | {steps} | {distinct} | {window:,} |")


if __name__ == "__main__":
    main()
