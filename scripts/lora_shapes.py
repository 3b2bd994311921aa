"""The batch shapes a LoRA TTT pass meets (issue 14: TTT_LORA_BUCKET), without a model or a GPU: replays
train_gpt.py's own batching (lora_span_batches, lora_step_batches) over a validation split and prints, for each
chunk size, the pass's steps, its distinct (rows, window) shapes and the window tokens it computes, with and
without TTT_LORA_BUCKET. Everything else comes from the environment as train_gpt.py reads it (TTT_LORA_SPAN,
TTT_LORA_DOCS, EVAL_DOC_ISOLATED, TRAIN_SEQ_LEN, VOCAB_SIZE, BOS_ID); the pass's documents are those of one rank
of WORLD_SIZE ranks (default: the whole split).

    EVAL_DOC_ISOLATED=1 TTT_LORA_SPAN=8192 python3 scripts/lora_shapes.py '<shards>/fineweb_val_*.bin' --chunks 128,64

--resample-tokens N replays instead a split of N tokens drawn from the split's documents with replacement: a larger
split with the same document lengths, such as one GPU's share of the challenge's validation text (about 5.0M
sp8192 tokens, 18.8 times the proxy's 266,528 by bytes). Its batches fill as the proxy's 150 documents never do, so
its steps per token are fewer: the 8-GPU estimate, which scales the proxy's pass by bytes, does not see that.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import train_gpt as tg  # noqa: E402


def pass_shapes(tokens, h, rank=0, world=1):
    """The (rows, window) shape of every chunk step of rank `rank`'s LoRA TTT pass, in order."""
    first, last = tg.document_bounds(tokens, h.bos_id)
    lo, hi = tg.rank_share(len(tokens) - 1, rank, world)
    mine = (first > lo) & (first <= hi)
    spans = tg.adapter_spans(first[mine], last[mine], h)
    return [batch[0].shape for rows in tg.lora_span_batches(spans, h)
            for _, batch in tg.lora_step_batches(tokens, spans, rows, h)]


def resample_documents(tokens, n_tokens, bos_id, seed=0):
    """A token stream of at least n_tokens + 1 tokens: whole documents of `tokens` (each from its BOS up to the next
    BOS; tokens before the first BOS are no document) drawn with replacement by a generator seeded `seed`, then a
    closing BOS, so the last one's targets end as a document's do."""
    bos = np.flatnonzero(tokens == bos_id)
    if not len(bos):
        raise ValueError(f"no BOS ({bos_id}) in the split: no documents to resample")
    ends = np.append(bos[1:], len(tokens))
    rng, picked, n = np.random.default_rng(seed), [], 0
    while n < n_tokens:
        i = int(rng.integers(len(bos)))
        picked.append(tokens[bos[i] : ends[i]])
        n += ends[i] - bos[i]
    return np.concatenate(picked + [np.array([bos_id], dtype=tokens.dtype)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="validation shards (a glob), as VAL_DATA_PATTERN would name them")
    ap.add_argument("--chunks", default="128,96,64,48", help="TTT_LORA_CHUNK values, comma-separated")
    ap.add_argument("--resample-tokens", type=int, default=0, help="replay a split of this many tokens drawn from "
                    "the split's documents with replacement (0: the split itself)")
    args = ap.parse_args(argv)
    if args.resample_tokens < 0:
        ap.error(f"--resample-tokens {args.resample_tokens}: must be >= 0")
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        env = {**os.environ, "TTT_ENABLED": "1", "TTT_MODE": "lora"}
        h = tg.Hyperparameters(env)
        tokens = tg.load_validation_tokens(args.pattern, h.vocab_size)
        if args.resample_tokens:
            tokens = resample_documents(tokens, args.resample_tokens, h.bos_id)
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
