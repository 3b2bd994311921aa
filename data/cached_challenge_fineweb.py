"""Download the Parameter Golf challenge's published FineWeb shards and tokenizer (Hugging Face Hub).

The dataset repo (repo_type "dataset") is mirrored under --out (default: this data/ directory):

    <out>/datasets/fineweb10B_<variant>/fineweb_val_000000.bin
    <out>/datasets/fineweb10B_<variant>/fineweb_train_000000.bin ... (--train-shards of them)
    <out>/tokenizers/fineweb_<vocab>_bpe.model

Files already present and valid are not downloaded again. Every shard's header is checked afterwards, and the
shard folder gets tokenizer_fingerprint.json for the downloaded tokenizer (what train_gpt.py checks
TOKENIZER_PATH against; data/build_shards.py writes the same file).
huggingface_hub is imported only when downloading for real; fetch() takes any `download` callable
with hf_hub_download's signature (repo_id, filename, repo_type, local_dir) -> local path.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
"""
import argparse
import os
import shutil
import struct

REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
VARIANTS = {"sp1024": 1024, "sp8192": 8192}
DEFAULT_DEST = os.path.dirname(os.path.abspath(__file__))
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4


def remote_files(variant, train_shards):
    """Return (shard paths in the repo, tokenizer path in the repo); val shard first."""
    if variant not in VARIANTS:
        raise SystemExit(f"cached_challenge_fineweb: unknown variant {variant!r} (choose from {sorted(VARIANTS)})")
    if train_shards < 0:
        raise SystemExit("cached_challenge_fineweb: --train-shards must be >= 0")
    ds = f"datasets/fineweb10B_{variant}"
    shards = [f"{ds}/fineweb_val_000000.bin"] + [f"{ds}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return shards, f"tokenizers/fineweb_{VARIANTS[variant]}_bpe.model"


def check_shard(path):
    """Check a shard's header against its size; return its token count. ValueError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
    if size < HEADER_BYTES or len(head) < 12:
        raise ValueError(f"{path}: too small to be a shard ({size} bytes)")
    magic, version, n = struct.unpack("<3i", head)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"{path}: bad shard header (magic {magic}, version {version})")
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens but file has {size} bytes")
    return n


def _valid(path, is_shard):
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    try:
        return check_shard(path) >= 0 if is_shard else True
    except ValueError:
        return False


def _hf_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SystemExit("cached_challenge_fineweb: huggingface_hub is not installed "
                         "(pip install huggingface_hub), or pass a `download` function to fetch()")
    return hf_hub_download


def stamp_fingerprint(folder, tokenizer, vocab):
    """The published shards were made with the published tokenizer: say so beside them. A folder whose
    fingerprint names another tokenizer holds shards of that one (files present are not downloaded again)."""
    from build_shards import read_fingerprint, tokenizer_fingerprint, write_fingerprint

    fp = tokenizer_fingerprint(tokenizer, vocab)
    recorded = read_fingerprint(folder)
    if recorded is not None and recorded != (fp["tokenizer_sha256"], vocab):
        raise SystemExit(f"cached_challenge_fineweb: {os.path.join(folder, 'tokenizer_fingerprint.json')} names "
                         f"another tokenizer (sha256 {recorded[0][:16]}) than {tokenizer}: the folder holds shards "
                         "built elsewhere; use another --out")
    write_fingerprint(folder, fp)


def fetch(variant, train_shards=80, dest=DEFAULT_DEST, download=None, repo_id=REPO_ID):
    """Download (if needed) and validate one variant; return {"shards", "tokenizer", "tokens"}."""
    shards, tokenizer = remote_files(variant, train_shards)
    download = download or _hf_download()
    os.makedirs(dest, exist_ok=True)
    local = {}
    for rel in [tokenizer] + shards:
        path = os.path.join(dest, rel)
        if not _valid(path, rel.endswith(".bin")):
            try:
                got = download(repo_id=repo_id, filename=rel, repo_type="dataset", local_dir=dest)
            except Exception as e:  # network, auth, missing file, ...
                raise SystemExit(f"cached_challenge_fineweb: download of {rel} from {repo_id} failed: "
                                 f"{type(e).__name__}: {e}")
            if got and os.path.isfile(got) and os.path.abspath(got) != os.path.abspath(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copyfile(got, path)
            if not os.path.isfile(path):
                raise SystemExit(f"cached_challenge_fineweb: download of {rel} produced no file at {path}")
        local[rel] = path

    tokens = {}
    for rel in shards:
        try:
            tokens[rel] = check_shard(local[rel])
        except ValueError as e:
            raise SystemExit(f"cached_challenge_fineweb: invalid shard: {e}")
    tok_path = local[tokenizer]
    try:
        import sentencepiece as spm
    except ImportError:
        spm = None
    if spm is not None:
        try:
            vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
        except Exception as e:
            raise SystemExit(f"cached_challenge_fineweb: cannot load tokenizer {tok_path}: {e}")
        if vocab != VARIANTS[variant]:
            raise SystemExit(f"cached_challenge_fineweb: {tok_path} has vocab {vocab}, expected {VARIANTS[variant]}")
    stamp_fingerprint(os.path.dirname(local[shards[0]]), tok_path, VARIANTS[variant])
    val_tokens = tokens[shards[0]]
    train_tokens = sum(tokens.values()) - val_tokens
    print(f"{variant}: {len(shards) - 1} train shards ({train_tokens:,} tokens) + 1 val shard "
          f"({val_tokens:,} tokens) in {os.path.dirname(local[shards[0]])}; tokenizer {tok_path}", flush=True)
    return {"shards": [local[r] for r in shards], "tokenizer": tok_path, "tokens": sum(tokens.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    ap.add_argument("--train-shards", type=int, default=80)
    ap.add_argument("--out", default=DEFAULT_DEST, help="local root mirroring the repo layout (default: data/)")
    ap.add_argument("--repo-id", default=REPO_ID)
    a = ap.parse_args(argv)
    fetch(a.variant, a.train_shards, a.out, repo_id=a.repo_id)


if __name__ == "__main__":
    main()
