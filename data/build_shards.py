"""Build Parameter Golf challenge-format token shards from document jsonl.

Input: one JSON object per line with a "text" string (plain .jsonl, .jsonl.gz or .jsonl.xz).
Each document becomes BOS + SentencePiece ids (no EOS), as in the challenge's own FineWeb export.
The token stream is cut, in document order, into shards of --shard-tokens tokens:

    header: 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
    body:   the tokens as little-endian uint16
    names:  fineweb_{split}_000000.bin, fineweb_{split}_000001.bin, ...

Beside the shards goes tokenizer_fingerprint.json (sha256 of the tokenizer file, vocab size), which train_gpt.py
checks against TOKENIZER_PATH at start. A build is all or nothing: it works in a hidden sibling folder (the other
split and any other files hard-linked in) that replaces --out as a whole only once every shard is written and
verified, so an error or SIGTERM leaves --out as it was, and --overwrite loses the old shards only to a complete
new set.

Example:
    python3 data/build_shards.py --docs docs.jsonl.xz --split train \
        --tokenizer fineweb_1024_bpe.model --out data/datasets/golfmix_sp1024
"""
import argparse
import collections
import glob
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import shutil
import signal
import sys
import time

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val")
FINGERPRINT = "tokenizer_fingerprint.json"  # train_gpt.py's TOKENIZER_FINGERPRINT


def _open_binary(path):
    """Return (raw file, decompressed binary stream); raw.tell() measures progress."""
    if not os.path.isfile(path):
        raise SystemExit(f"build_shards: input file not found: {path}")
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    if path.endswith(".xz"):
        return raw, lzma.LZMAFile(raw)
    return raw, raw


def _iter_docs_progress(path, max_docs=None):
    """Yield (text, fraction of the input file read) for each document."""
    raw, stream = _open_binary(path)
    size = max(os.path.getsize(path), 1)
    n = lineno = 0
    try:
        with raw, stream:
            for lineno, line in enumerate(stream, 1):
                if max_docs is not None and n >= max_docs:
                    return
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    raise SystemExit(f"build_shards: {path}:{lineno}: line is not valid JSON ({e})")
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise SystemExit(f'build_shards: {path}:{lineno}: line has no "text" string')
                n += 1
                yield doc["text"], raw.tell() / size
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise SystemExit(f"build_shards: {path}: cannot read input after line {lineno}: {e}")


def iter_docs(path, max_docs=None):
    """Yield the "text" of each document of a .jsonl / .jsonl.gz / .jsonl.xz file, in order."""
    for text, _ in _iter_docs_progress(path, max_docs):
        yield text


def write_shard(path, tokens):
    """Write one shard atomically (path.tmp, then os.replace)."""
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """Read and check one shard; return its tokens (np.uint16). ValueError naming the file if bad."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else None
    if header is None or header[0] != MAGIC or header[1] != VERSION:
        raise ValueError(f"{path}: not a shard (bad header magic/version)")
    if size != HEADER_BYTES + 2 * int(header[2]):
        raise ValueError(f"{path}: header says {header[2]} tokens but file has {size} bytes")
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


_SP = None


def _init_worker(model_path):
    global _SP
    import sentencepiece as spm
    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _init_pool_worker(model_path):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must not run the builder's cleanup handler
    _init_worker(model_path)


def _encode_batch(texts):
    """BOS + ids for each text, concatenated into one uint16 array."""
    bos, flat = _SP.bos_id(), []
    for ids in _SP.encode(texts, out_type=int, num_threads=1):
        flat.append(bos)
        flat.extend(ids)
    return np.array(flat, dtype=np.uint16), len(texts)


def _batches(docs, max_docs, batch_docs):
    batch = []
    for text, frac in _iter_docs_progress(docs, max_docs):
        batch.append(text)
        if len(batch) == batch_docs:
            yield batch, frac
            batch = []
    if batch:
        yield batch, 1.0


def _encoded(docs, model, workers, max_docs, batch_docs):
    """Yield (tokens, n_docs, fraction read) per batch, in document order."""
    if workers <= 1:
        _init_worker(model)
        for batch, frac in _batches(docs, max_docs, batch_docs):
            yield (*_encode_batch(batch), frac)
        return
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(model,)) as pool:
        pending = collections.deque()  # bounded window of in-flight batches, collected in order
        for batch, frac in _batches(docs, max_docs, batch_docs):
            pending.append((pool.apply_async(_encode_batch, (batch,)), frac))
            if len(pending) >= 4 * workers:
                res, f = pending.popleft()
                yield (*res.get(), f)
        while pending:
            res, f = pending.popleft()
            yield (*res.get(), f)


def tokenizer_fingerprint(tokenizer, vocab):
    """What train_gpt.py checks TOKENIZER_PATH against: the model file's sha256 and vocab size."""
    with open(tokenizer, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"tokenizer_sha256": digest, "vocab_size": vocab, "tokenizer_file": os.path.basename(tokenizer)}


def read_fingerprint(folder):
    path = os.path.join(folder, FINGERPRINT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            fp = json.load(f)
        return fp["tokenizer_sha256"], fp["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"build_shards: {path}: not a tokenizer fingerprint ({e})")


def write_fingerprint(folder, fingerprint):
    tmp = os.path.join(folder, FINGERPRINT + ".tmp")
    with open(tmp, "w") as f:
        json.dump(fingerprint, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, FINGERPRINT))


def _tokenizer_check(out, split, fingerprint):
    """Whether the finished folder gets a fingerprint. The other split, if present, must come from the same
    tokenizer; when it predates fingerprints its tokenizer is unknown, so the folder gets none."""
    other = [s for s in SPLITS if s != split and glob.glob(os.path.join(out, f"fineweb_{s}_*.bin"))]
    if not other:
        return True
    recorded = read_fingerprint(out)
    if recorded is None:
        print(f"build_shards: warning: {out} holds {other[0]} shards without a {FINGERPRINT}; their tokenizer is "
              f"unknown, so none is written (rebuild both splits to get one)", file=sys.stderr, flush=True)
        return False
    if recorded != (fingerprint["tokenizer_sha256"], fingerprint["vocab_size"]):
        raise SystemExit(f"build_shards: {out} holds {other[0]} shards made by another tokenizer (sha256 "
                         f"{recorded[0][:16]}, vocab {recorded[1]}) than {fingerprint['tokenizer_file']} (sha256 "
                         f"{fingerprint['tokenizer_sha256'][:16]}); build into another --out")
    return True


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # same filesystem (a sibling folder): no data is copied
    except OSError:
        shutil.copy2(src, dst)


def _stage(out, split):
    """A hidden sibling of `out` holding everything of `out` except this split's shards and the fingerprint."""
    parent, name = os.path.split(out)
    stage = os.path.join(parent, f".{name}.build-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    for stale in glob.glob(os.path.join(parent, f".{name}.build-*")) + glob.glob(os.path.join(parent, f".{name}.old-*")):
        print(f"build_shards: note: {stale} is left from a killed build; delete it", file=sys.stderr, flush=True)
    if os.path.isdir(out):
        def skip(folder, names):
            if folder != out:
                return []
            return [n for n in names if n.startswith(f"fineweb_{split}_") or n.startswith(FINGERPRINT)]
        shutil.copytree(out, stage, symlinks=True, ignore=skip, copy_function=_link_or_copy)
    else:
        os.makedirs(stage)
    return stage


def _swap_in(stage, out):
    """`stage` becomes `out`; the old folder is removed after. Signals wait until both renames are done, so
    `out` is the old folder or the new one, never neither."""
    parent, name = os.path.split(out)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        if os.path.exists(out):
            os.rename(out, old)
            try:
                os.rename(stage, out)
            except OSError:
                os.rename(old, out)
                raise
        else:
            os.rename(stage, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def _stop_on_sigterm(signum, frame):
    raise SystemExit(f"build_shards: stopped by signal {signum}; the output folder is left as it was")


def build_shards(docs, split, tokenizer, out, shard_tokens=100_000_000, workers=None,
                 max_docs=None, vocab_size=None, overwrite=False, batch_docs=256, progress_every=5.0):
    """Tokenize `docs` into challenge shards under `out`; verify them; return their paths. All or nothing: the
    shards are written into a staging sibling that replaces `out` only when complete."""
    if split not in SPLITS:
        raise SystemExit(f"build_shards: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if not os.path.isfile(tokenizer):
        raise SystemExit(f"build_shards: tokenizer model not found: {tokenizer}")
    if not os.path.isfile(docs):
        raise SystemExit(f"build_shards: input file not found: {docs}")
    if shard_tokens < 1:
        raise SystemExit("build_shards: --shard-tokens must be >= 1")
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer)
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"build_shards: {tokenizer}: not a SentencePiece model ({e})")
    vocab = sp.vocab_size()
    if vocab_size is not None and vocab_size != vocab:
        raise SystemExit(f"build_shards: --vocab-size {vocab_size} != vocab size {vocab} of {tokenizer}")
    if vocab > 65536:
        raise SystemExit(f"build_shards: {tokenizer}: vocab {vocab} does not fit uint16 tokens")
    if sp.bos_id() < 0:
        raise SystemExit(f"build_shards: {tokenizer} has no BOS piece (bos_id < 0)")
    real = os.path.realpath(out)
    if os.path.commonpath([real, os.getcwd()]) == real:
        raise SystemExit(f"build_shards: --out {out} holds the current directory; it is replaced as a whole")
    existing = sorted(glob.glob(os.path.join(real, f"fineweb_{split}_*.bin")))
    if existing and not overwrite:
        raise SystemExit(f"build_shards: {out} already has {len(existing)} {split} shard(s) "
                         f"(e.g. {existing[0]}); pass --overwrite to replace them")
    fingerprint = tokenizer_fingerprint(tokenizer, vocab)
    with_fingerprint = _tokenizer_check(real, split, fingerprint)

    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # SIGTERM unwinds through the cleanup below
    stage = None
    try:
        stage = _stage(real, split)
        paths, n_docs, n_tokens, t0 = _write_split(docs, split, tokenizer, stage, shard_tokens, workers, max_docs,
                                                   batch_docs, progress_every)
        _verify(paths, vocab, n_tokens)
        if with_fingerprint:
            write_fingerprint(stage, fingerprint)
        _swap_in(stage, real)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)  # gone already after a successful swap
    print(f"shards:{len(paths)} tokens:{n_tokens} docs:{n_docs} seconds:{time.time() - t0:.1f}", flush=True)
    return [os.path.join(out, os.path.basename(p)) for p in paths]


def _write_split(docs, split, tokenizer, folder, shard_tokens, workers, max_docs, batch_docs, progress_every):
    """Tokenizes the documents into shards in `folder`: (paths, documents, tokens, start time)."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    t0 = last = time.time()
    buf, fill, n_docs, n_tokens, paths = np.empty(shard_tokens, np.uint16), 0, 0, 0, []

    def flush():
        paths.append(os.path.join(folder, f"fineweb_{split}_{len(paths):06d}.bin"))
        write_shard(paths[-1], buf[:fill])

    for tokens, n, frac in _encoded(docs, tokenizer, workers, max_docs, batch_docs):
        n_docs, n_tokens, i = n_docs + n, n_tokens + tokens.size, 0
        while i < tokens.size:
            take = min(tokens.size - i, shard_tokens - fill)
            buf[fill:fill + take] = tokens[i:i + take]
            fill, i = fill + take, i + take
            if fill == shard_tokens:
                flush()
                fill = 0
        now = time.time()
        if now - last >= progress_every:
            last, dt = now, now - t0
            eta = f" {frac:.0%} ETA {dt * (1 - frac) / frac:.0f}s" if 0 < frac < 1 and max_docs is None else ""
            print(f"[build_shards] {split}: {n_docs:,} docs {n_tokens:,} tokens | "
                  f"{n_docs / dt:,.0f} docs/s {n_tokens / dt:,.0f} tok/s{eta}", file=sys.stderr, flush=True)
    if fill:
        flush()
    if not n_docs:
        raise SystemExit(f"build_shards: {docs}: no documents")
    return paths, n_docs, n_tokens, t0


def _verify(paths, vocab, n_tokens):
    total = 0
    for p in paths:
        try:
            t = read_shard(p)
        except ValueError as e:
            raise SystemExit(f"build_shards: verification failed: {e}")
        if t.size and int(t.max()) >= vocab:
            raise SystemExit(f"build_shards: verification failed: {p} has token {int(t.max())} >= vocab {vocab}")
        total += t.size
    if total != n_tokens:
        raise SystemExit(f"build_shards: verification failed: shards hold {total} tokens, expected {n_tokens}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", required=True, help="input .jsonl / .jsonl.gz / .jsonl.xz")
    ap.add_argument("--split", required=True, help="train or val")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None, help="must equal the tokenizer's vocab")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards of this split")
    a = ap.parse_args(argv)
    build_shards(a.docs, a.split, a.tokenizer, a.out, a.shard_tokens, a.workers,
                 a.max_docs, a.vocab_size, a.overwrite)


if __name__ == "__main__":
    main()
