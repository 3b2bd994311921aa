"""Make the small embedded sample in data/sample/ (deterministic).

Takes the documents whose "source" is "wikipedia" from the golfmix training corpus, in file order,
until --max-bytes UTF-8 bytes of text; drops exact duplicate texts; holds out every 20th document
for validation; writes {"text", "source"} jsonl compressed with xz (preset 9|EXTREME), copies the
challenge's sp1024 tokenizer, and writes data/sample/README.md with the resulting statistics.

    python3 data/make_sample.py [--src /work/shared/data/golfmix/train_docs.jsonl.xz]
"""
import argparse
import json
import lzma
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = "/work/shared/data"
HOLDOUT_EVERY = 20

README = """# Embedded sample corpus

A small real-text corpus shipped with the repository so that tests and smoke runs work without
network access or the full data sets.

| file | docs | UTF-8 bytes of text | sp1024 tokens (BOS per doc) |
|---|---|---|---|
| `train_docs.jsonl.xz` | {train_docs:,} | {train_bytes:,} | {train_tokens:,} |
| `val_docs.jsonl.xz` | {val_docs:,} | {val_bytes:,} | {val_tokens:,} |

- Each line of the `.jsonl.xz` files is one document: `{{"text": ..., "source": "wikipedia"}}`.
- `fineweb_1024_bpe.model` is the Parameter Golf challenge's SentencePiece BPE tokenizer, vocab 1024
  (pad 0, bos 1, eos 2, unk 3), the `sp1024` variant; sha256 `{tok_sha}`.

## How it was made

`python3 data/make_sample.py` (deterministic): the documents with `"source": "wikipedia"` of the
project's golfmix benchmark corpus (English Wikipedia, 2015 dump), in file order, until
{max_bytes:,} bytes of text; exact duplicate texts dropped; every {every}th document held out for
validation (train and val share no document); xz-compressed with preset 9|EXTREME.

Turn it into challenge-format shards with:

    python3 data/build_shards.py --docs data/sample/train_docs.jsonl.xz --split train \\
        --tokenizer data/sample/fineweb_1024_bpe.model --out /tmp/sample_sp1024
    python3 data/build_shards.py --docs data/sample/val_docs.jsonl.xz --split val \\
        --tokenizer data/sample/fineweb_1024_bpe.model --out /tmp/sample_sp1024

## Licence

Text from English Wikipedia, https://en.wikipedia.org, available under CC BY-SA
(Creative Commons Attribution-ShareAlike 3.0 / 4.0). The sample files `train_docs.jsonl.xz` and
`val_docs.jsonl.xz` are redistributed under the same licence. The tokenizer model is the one
published with the OpenAI Parameter Golf challenge.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=f"{SHARED}/golfmix/train_docs.jsonl.xz")
    ap.add_argument("--tokenizer", default=f"{SHARED}/tokenizers/fineweb_1024_bpe.model")
    ap.add_argument("--out", default=os.path.join(HERE, "sample"))
    ap.add_argument("--max-bytes", type=int, default=7_400_000)
    a = ap.parse_args()

    docs, seen, nbytes = [], set(), 0
    with lzma.open(a.src, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d.get("source") != "wikipedia" or d["text"] in seen:
                continue
            seen.add(d["text"])
            docs.append({"text": d["text"], "source": d["source"]})
            nbytes += len(d["text"].encode("utf-8"))
            if nbytes >= a.max_bytes:
                break
    splits = {"train": [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1],
              "val": [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]}

    import hashlib
    import sentencepiece as spm
    os.makedirs(a.out, exist_ok=True)
    tok_dst = os.path.join(a.out, "fineweb_1024_bpe.model")
    shutil.copyfile(a.tokenizer, tok_dst)
    sp = spm.SentencePieceProcessor(model_file=tok_dst)
    stats = {"max_bytes": a.max_bytes, "every": HOLDOUT_EVERY,
             "tok_sha": hashlib.sha256(open(tok_dst, "rb").read()).hexdigest()}
    for split, ds in splits.items():
        data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in ds).encode("utf-8")
        with open(os.path.join(a.out, f"{split}_docs.jsonl.xz"), "wb") as f:
            f.write(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
        texts = [d["text"] for d in ds]
        stats[f"{split}_docs"] = len(ds)
        stats[f"{split}_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        stats[f"{split}_tokens"] = sum(len(ids) + 1 for ids in sp.encode(texts))
        print(f"{split}: docs {len(ds):,} bytes {stats[split + '_bytes']:,} sp1024 tokens {stats[split + '_tokens']:,}")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(README.format(**stats))
    total = sum(os.path.getsize(os.path.join(a.out, n)) for n in os.listdir(a.out))
    print(f"data/sample files total {total:,} bytes")


if __name__ == "__main__":
    main()
