"""The LoRA TTT pass's time as a cost model (issue 14), fitted on logged passes and applied to a larger split.

Each logged pass (a train_gpt.py log whose `lora_ttt` line adapted every chunk) is replayed without a model
(lora_shapes.pass_shapes, under the log's own config, on the validation split it scored), which gives its chunk
steps and window tokens. A least-squares fit of the passes' seconds to those two, without an intercept, gives
seconds per chunk step (each step's fixed work: the host's launches, eager small kernels) and seconds per million
window tokens (the compute). The model then predicts each setting's pass on --share-tokens tokens drawn from the
split's documents (lora_shapes.resample_documents): one GPU's share of the challenge, whose batches fill as a
150-document split's never do. Beside it is the tokens-linear extrapolation that the logs' challenge estimate
makes (by bytes, nearly the same ratio for documents drawn from the same split).

    python3 scripts/lora_cost.py '<golfmix_sp8192>/fineweb_val_*.bin' records/ablations/h200_2026-11-30_s14/*.txt \\
        [--share-tokens 5010000] [--predict 24:48,32:40]

--predict DOCS:CHUNK adds settings (TTT_LORA_DOCS, TTT_LORA_CHUNK) to predict, with every other knob from the
first fitted log. Logs without a LoRA pass, and passes cut by EVAL_BUDGET_SECONDS, are skipped and named.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_gpt as tg  # noqa: E402
from lora_shapes import pass_shapes, resample_documents  # noqa: E402
from runlog import LogError, read_run_log  # noqa: E402


def lora_h(config, **override):
    return tg.Hyperparameters({**config, "TTT_ENABLED": "1", "TTT_MODE": "lora", **override})


def replay(tokens, h, world=1):
    """(chunk steps, window tokens) of rank 0's pass over `tokens` under h."""
    shapes = pass_shapes(tokens, h, 0, world)
    return len(shapes), sum(r * t for r, t in shapes)


def split_of(pattern, h, splits):
    """The validation split under h (its vocabulary and MAX_VAL_TOKENS), read once per such pair into `splits`."""
    key = (h.vocab_size, h.max_val_tokens)
    if key not in splits:
        splits[key] = tg.load_validation_tokens(pattern, h.vocab_size, h.max_val_tokens)
    return splits[key]


def fitted_passes(paths, pattern, splits):
    """[(name, config, (docs, chunk), steps, window tokens, seconds)] of the logs' complete LoRA passes, and the
    names of the logs skipped, with why. The splits they scored are read into `splits` (split_of)."""
    passes, skipped = [], []
    for path in paths:
        run = read_run_log(path)
        name = Path(path).stem
        if run["lora_seconds"] is None:
            skipped.append(f"{name} (no LoRA pass)")
            continue
        if run["lora_adapted_chunks"] != run["lora_chunks"]:
            skipped.append(f"{name} (cut by EVAL_BUDGET_SECONDS)")
            continue
        h = lora_h(run["config"])
        steps, window = replay(split_of(pattern, h, splits), h, run["world_size"] or 1)
        passes.append((name, run["config"], (h.ttt_lora_docs, h.ttt_lora_chunk), steps, window, run["lora_seconds"]))
    return passes, skipped


def fit(passes):
    """(seconds per step, seconds per window token, residuals) by least squares without an intercept."""
    a = np.array([[steps, window] for _, _, _, steps, window, _ in passes], dtype=np.float64)
    y = np.array([p[-1] for p in passes], dtype=np.float64)
    if np.linalg.matrix_rank(a) < 2:
        raise ValueError(f"{len(passes)} passes span fewer than two independent (steps, window tokens) points: "
                         "the fit needs passes of at least two settings that differ in more than scale")
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return coef[0], coef[1], a @ coef - y


def parse_predict(text):
    try:
        return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        raise ValueError(f"--predict {text!r}: expected DOCS:CHUNK[,DOCS:CHUNK...]") from None


def report(passes, skipped, per_step, per_token, residuals, split, share, predict):
    """The fit, then each setting on the split and on the share, as markdown lines."""
    ms = lambda steps, window: per_step * steps + per_token * window  # noqa: E731
    lines = [f"fit over {len(passes)} passes: {per_step:.4f} s a chunk step + {per_token * 1e6:.3f} s per million "
             f"window tokens (largest residual {np.abs(residuals).max():.2f} s)"]
    if skipped:
        lines.append("skipped: " + ", ".join(skipped))
    lines += ["", "| log | docs | chunk | steps | M window tokens | seconds | model s |", "|---|---:|---:|---:|---:|---:|---:|"]
    measured = defaultdict(list)
    for (name, _, (docs, chunk), steps, window, seconds), r in zip(passes, residuals):
        lines.append(f"| {name} | {docs} | {chunk} | {steps:,} | {window / 1e6:.2f} | {seconds:.1f} | {seconds + r:.1f} |")
        measured[docs, chunk].append(seconds)
    ratio = (len(share) - 1) / (len(split) - 1)
    lines += ["", f"share: {len(share) - 1:,} targets drawn from the split's documents ({ratio:.1f}x the split)", "",
              "| docs | chunk | share steps | share M window tokens | model s | tokens-linear s |",
              "|---:|---:|---:|---:|---:|---:|"]
    config = passes[0][1]
    for docs, chunk in list(dict.fromkeys([p[2] for p in passes] + predict)):
        steps, window = replay(share, lora_h(config, TTT_LORA_DOCS=str(docs), TTT_LORA_CHUNK=str(chunk)))
        linear = f"{np.mean(measured[docs, chunk]) * ratio:.0f}" if measured[docs, chunk] else "-"
        lines.append(f"| {docs} | {chunk} | {steps:,} | {window / 1e6:.1f} | {ms(steps, window):.0f} | {linear} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pattern", help="the validation shards the logged passes scored (a glob)")
    ap.add_argument("logs", nargs="+", help="train_gpt.py logs; those with a complete LoRA pass are fitted")
    ap.add_argument("--share-tokens", type=int, default=5_010_000, help="tokens of the split to predict on "
                    "(default: one GPU's share of the challenge, 18.8x the proxy's 266,528 by bytes)")
    ap.add_argument("--predict", default="", help="more DOCS:CHUNK settings to predict, comma-separated")
    args = ap.parse_args(argv)
    try:
        predict = parse_predict(args.predict)
        if args.share_tokens < 1:
            raise ValueError(f"--share-tokens {args.share_tokens}: must be positive")
        splits = {}
        passes, skipped = fitted_passes(args.logs, args.pattern, splits)
        if not passes:
            raise ValueError("no log has a complete LoRA pass: " + ", ".join(skipped))
        per_step, per_token, residuals = fit(passes)
        h = lora_h(passes[0][1])
        split = split_of(args.pattern, h, splits)  # the first fitted pass's, read already
        share = resample_documents(split, args.share_tokens, h.bos_id)
        print("\n".join(report(passes, skipped, per_step, per_token, residuals, split, share, predict)))
    except (ValueError, LogError, tg.ConfigError, tg.DataError) as e:
        sys.exit(f"lora_cost: {e}")


if __name__ == "__main__":
    main()
