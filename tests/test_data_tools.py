"""Tests for data/build_shards.py, data/cached_challenge_fineweb.py and the embedded sample (CPU, fast)."""
import gzip
import json
import lzma
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_shards as bs  # noqa: E402
import cached_challenge_fineweb as ccf  # noqa: E402

spm = pytest.importorskip("sentencepiece")
SAMPLE = ROOT / "data" / "sample"
TOKENIZER = str(SAMPLE / "fineweb_1024_bpe.model")

DOCS = [
    "Hello world. This is the first document.",
    "",  # an empty document is just its BOS
    "Ünïcödé text – with “quotes”, emoji 🙂 and 中文.",
    "Line one\nline two\n\n  indented line three\t(tab)",
    " ".join(f"word{i}" for i in range(300)),
    "The quick brown fox jumps over the lazy dog. " * 20,
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=TOKENIZER)


def reference_stream(sp, docs):
    out = []
    for text in docs:  # independent reference: one encode call per document
        out.append(sp.bos_id())
        out.extend(sp.encode(text))
    return np.array(out, dtype=np.uint16)


def write_jsonl(path, docs, lines=None):
    data = "".join(lines if lines is not None else
                   (json.dumps({"text": t, "source": "test", "id": i}) + "\n" for i, t in enumerate(docs)))
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(Path(path).suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(data)
    return str(path)


def read_all(paths):
    return np.concatenate([bs.read_shard(p) for p in paths])


@pytest.mark.parametrize("suffix,workers", [(".jsonl", 1), (".jsonl.gz", 1), (".jsonl.xz", 2)])
def test_build_matches_reference(tmp_path, sp, suffix, workers, capsys):
    docs = write_jsonl(tmp_path / f"docs{suffix}", DOCS)
    paths = bs.build_shards(docs, "train", TOKENIZER, str(tmp_path / "out"), workers=workers, batch_docs=2)
    assert [os.path.basename(p) for p in paths] == ["fineweb_train_000000.bin"]
    ref = reference_stream(sp, DOCS)
    got = bs.read_shard(paths[0])
    np.testing.assert_array_equal(got, ref)
    assert int((got == sp.bos_id()).sum()) == len(DOCS)  # BOS ids never occur inside the text
    raw = open(paths[0], "rb").read()
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, ref.size) and not any(header[3:])
    assert len(raw) == 1024 + 2 * ref.size
    assert f"shards:1 tokens:{ref.size} docs:{len(DOCS)} seconds:" in capsys.readouterr().out


def test_shard_splitting(tmp_path, sp):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    ref = reference_stream(sp, DOCS)
    paths = bs.build_shards(docs, "val", TOKENIZER, str(tmp_path), shard_tokens=97, workers=2, batch_docs=1)
    n = -(-ref.size // 97)
    assert n >= 3 and [os.path.basename(p) for p in paths] == [f"fineweb_val_{i:06d}.bin" for i in range(n)]
    assert all(bs.read_shard(p).size == 97 for p in paths[:-1])
    np.testing.assert_array_equal(read_all(paths), ref)
    assert not list(tmp_path.glob("*.tmp"))


def test_max_docs_and_cli(tmp_path, sp, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl.xz", DOCS)
    bs.main(["--docs", docs, "--split", "train", "--tokenizer", TOKENIZER, "--out", str(tmp_path / "o"),
             "--workers", "1", "--max-docs", "3", "--vocab-size", "1024", "--shard-tokens", "1000"])
    np.testing.assert_array_equal(read_all(sorted((tmp_path / "o").glob("*.bin"))), reference_stream(sp, DOCS[:3]))
    assert "docs:3 " in capsys.readouterr().out


def test_overwrite(tmp_path, sp):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = str(tmp_path / "out")
    assert len(bs.build_shards(docs, "train", TOKENIZER, out, shard_tokens=50, workers=1)) > 2
    with pytest.raises(SystemExit, match="--overwrite"):
        bs.build_shards(docs, "train", TOKENIZER, out, workers=1)
    bs.build_shards(docs, "val", TOKENIZER, out, workers=1)  # other split: allowed
    paths = bs.build_shards(docs, "train", TOKENIZER, out, workers=1, overwrite=True)
    assert sorted(Path(out).glob("fineweb_train_*.bin")) == [Path(paths[0])]  # stale shards removed
    np.testing.assert_array_equal(bs.read_shard(paths[0]), reference_stream(sp, DOCS))


@pytest.mark.parametrize("bad,msg", [("{not json\n", "not valid JSON"), ('{"txt": "x"}\n', 'no "text"'),
                                     ('{"text": 3}\n', 'no "text"'), ('["a"]\n', 'no "text"')])
def test_bad_line_names_file_and_line(tmp_path, bad, msg):
    good = json.dumps({"text": "fine"}) + "\n"
    docs = write_jsonl(tmp_path / "bad.jsonl.gz", None, lines=[good, good, bad, good])
    with pytest.raises(SystemExit, match=rf"bad\.jsonl\.gz:3: .*{msg}"):
        bs.build_shards(docs, "train", TOKENIZER, str(tmp_path / "out"), workers=1)
    assert not list((tmp_path / "out").glob("*.bin"))


def test_argument_errors(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="8192.*1024"):
        bs.build_shards(docs, "train", TOKENIZER, out, vocab_size=8192, workers=1)
    with pytest.raises(SystemExit, match="missing.jsonl"):
        bs.build_shards(str(tmp_path / "missing.jsonl"), "train", TOKENIZER, out, workers=1)
    with pytest.raises(SystemExit, match="unknown split 'test'"):
        bs.build_shards(docs, "test", TOKENIZER, out, workers=1)
    with pytest.raises(SystemExit, match="nope.model"):
        bs.build_shards(docs, "train", str(tmp_path / "nope.model"), out, workers=1)
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="junk.model: not a SentencePiece model"):
        bs.build_shards(docs, "train", str(tmp_path / "junk.model"), out, workers=1)


def test_read_shard_rejects_bad_files(tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    bs.write_shard(str(p), np.arange(10, dtype=np.uint16))
    np.testing.assert_array_equal(bs.read_shard(str(p)), np.arange(10))
    assert ccf.check_shard(str(p)) == 10
    p.write_bytes(p.read_bytes()[:-2])
    for check in (bs.read_shard, ccf.check_shard):
        with pytest.raises(ValueError, match="fineweb_val_000000.bin"):
            check(str(p))


# --- the tokenizer fingerprint and the all-or-nothing build (issue 15 items 2 and 7) ---------------------

def sha256_of(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second, different SentencePiece model (trained here on the test documents)."""
    d = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 20), model_prefix=str(d / "other"),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return str(d / "other.model")


def test_build_writes_a_tokenizer_fingerprint_that_train_gpt_accepts(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    bs.build_shards(docs, "train", TOKENIZER, str(out), workers=1)
    bs.build_shards(docs, "val", TOKENIZER, str(out), workers=1)
    fp = json.loads((out / "tokenizer_fingerprint.json").read_text())
    assert fp["tokenizer_sha256"] == sha256_of(TOKENIZER) and fp["vocab_size"] == 1024
    assert fp["tokenizer_file"] == "fineweb_1024_bpe.model"
    assert tg.tokenizer_fingerprint(out, TOKENIZER, 1024) == (sha256_of(TOKENIZER), True)


def test_a_split_of_another_tokenizer_is_refused(tmp_path, other_tokenizer):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    bs.build_shards(docs, "train", TOKENIZER, str(out), workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(SystemExit, match="train shards.*another tokenizer"):
            bs.build_shards(docs, "val", other_tokenizer, str(out), workers=1, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a split whose partner predates fingerprints gets none (its tokenizer is unknown), with a warning
    old = tmp_path / "old"
    bs.build_shards(docs, "train", TOKENIZER, str(old), workers=1)
    (old / "tokenizer_fingerprint.json").unlink()
    bs.build_shards(docs, "val", TOKENIZER, str(old), workers=1)
    assert not (old / "tokenizer_fingerprint.json").exists()


class Boom(Exception):
    pass


def failing_encoder(monkeypatch, after_batches):
    """_encoded that yields `after_batches` batches (enough for several shards), then raises."""
    real = bs._encoded

    def encoded(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == after_batches:
                raise Boom("tokenizer worker died")
            yield item
    monkeypatch.setattr(bs, "_encoded", encoded)


def test_a_failed_build_leaves_no_shards_and_keeps_the_old_ones(tmp_path, monkeypatch):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS * 4)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    bs.build_shards(docs, "train", TOKENIZER, str(kept), shard_tokens=50, workers=1, max_docs=3)
    bs.build_shards(docs, "val", TOKENIZER, str(kept), workers=1, max_docs=2)
    (kept / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    failing_encoder(monkeypatch, after_batches=10)
    with pytest.raises(Boom):  # batch_docs=1: 10 documents, several 50-token shards written, then the crash
        bs.build_shards(docs, "train", TOKENIZER, str(fresh), shard_tokens=50, workers=1, batch_docs=1)
    assert not fresh.exists()
    with pytest.raises(Boom):
        bs.build_shards(docs, "train", TOKENIZER, str(kept), shard_tokens=50, workers=1, batch_docs=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before  # the old set, whole, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "kept"]  # no staging folder left


def test_overwrite_swaps_in_the_complete_set(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    bs.build_shards(docs, "train", TOKENIZER, str(out), shard_tokens=50, workers=1)
    bs.build_shards(docs, "val", TOKENIZER, str(out), workers=1)
    val = (out / "fineweb_val_000000.bin").read_bytes()
    paths = bs.build_shards(docs, "train", TOKENIZER, str(out), workers=1, overwrite=True, max_docs=2)
    assert [Path(p) for p in paths] == [out / "fineweb_train_000000.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                     "tokenizer_fingerprint.json"]
    assert (out / "fineweb_val_000000.bin").read_bytes() == val  # the other split is carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


SLOW_BUILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import build_shards as bs
real = bs._encode_batch
def slow(texts):
    time.sleep(0.05)
    return real(texts)
bs._encode_batch = slow
bs.main(sys.argv[2:])
"""


@pytest.mark.parametrize("overwrite, workers", [(False, 1), (True, 1), (False, 2)])
def test_sigterm_mid_build_leaves_no_partial_set(tmp_path, overwrite, workers):
    import signal
    import subprocess
    import time

    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS * 200)
    out = tmp_path / "out"
    if overwrite:
        bs.build_shards(docs, "train", TOKENIZER, str(out), workers=1, max_docs=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if overwrite else None
    cmd = [sys.executable, "-c", SLOW_BUILD, str(ROOT / "data"), "--docs", docs, "--split", "train", "--tokenizer",
           TOKENIZER, "--out", str(out), "--workers", str(workers), "--shard-tokens", "100"] + ["--overwrite"] * overwrite
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    # wait until the build has written several shards (wherever it writes them), then stop it
    while time.time() < deadline and len(list(tmp_path.rglob("fineweb_train_*.bin"))) < 4 + overwrite:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped by signal" in err, err
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not list(out.glob("fineweb_train_*.bin")) if out.exists() else True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"] + ["out"] * overwrite, err


# --- cached_challenge_fineweb with a fake (local) download ----------------------------------------------

@pytest.fixture
def remote(tmp_path):
    """A local stand-in for the Hugging Face dataset repo, built with build_shards."""
    root = tmp_path / "remote"
    ds = root / "datasets" / "fineweb10B_sp1024"
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    bs.build_shards(docs, "train", TOKENIZER, str(ds), shard_tokens=200, workers=1)
    bs.build_shards(docs, "val", TOKENIZER, str(ds), workers=1)
    (root / "tokenizers").mkdir()
    shutil.copy(TOKENIZER, root / "tokenizers" / "fineweb_1024_bpe.model")
    return root


def make_fake(remote, calls):
    def download(repo_id, filename, repo_type, local_dir):
        assert repo_id == "willdepueoai/parameter-golf" and repo_type == "dataset"
        calls.append(filename)
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote / filename, dst)
        return str(dst)
    return download


def test_fetch_with_fake_download(tmp_path, remote, capsys):
    calls, dest = [], tmp_path / "local"
    res = ccf.fetch("sp1024", train_shards=2, dest=str(dest), download=make_fake(remote, calls))
    ds = dest / "datasets" / "fineweb10B_sp1024"
    names = ["fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert res["shards"] == [str(ds / n) for n in names]
    assert res["tokenizer"] == str(dest / "tokenizers" / "fineweb_1024_bpe.model")
    assert sorted(calls) == sorted(["tokenizers/fineweb_1024_bpe.model"] +
                                   [f"datasets/fineweb10B_sp1024/{n}" for n in names])
    for n in names:
        assert (ds / n).read_bytes() == (remote / "datasets" / "fineweb10B_sp1024" / n).read_bytes()
    assert res["tokens"] == sum(bs.read_shard(p).size for p in res["shards"])
    assert "2 train shards" in capsys.readouterr().out
    # the shards get the fingerprint of the tokenizer downloaded with them, which train_gpt.py then accepts
    fp = json.loads((ds / "tokenizer_fingerprint.json").read_text())
    assert (fp["tokenizer_sha256"], fp["vocab_size"]) == (sha256_of(TOKENIZER), 1024)
    # cached: nothing downloaded again; a truncated shard is fetched again
    calls.clear()
    ccf.fetch("sp1024", train_shards=2, dest=str(dest), download=make_fake(remote, calls))
    assert calls == []
    (ds / names[1]).write_bytes((ds / names[1]).read_bytes()[:-4])
    ccf.fetch("sp1024", train_shards=2, dest=str(dest), download=make_fake(remote, calls))
    assert calls == [f"datasets/fineweb10B_sp1024/{names[1]}"]


def test_fetch_errors(tmp_path, remote, monkeypatch):
    def failing(repo_id, filename, repo_type, local_dir):
        raise ConnectionError("network unreachable")
    with pytest.raises(SystemExit, match="tokenizers/fineweb_1024_bpe.model.*network unreachable"):
        ccf.fetch("sp1024", train_shards=1, dest=str(tmp_path / "a"), download=failing)

    bad = remote / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])  # the "published" file itself is corrupt
    with pytest.raises(SystemExit, match="invalid shard.*fineweb_train_000001.bin"):
        ccf.fetch("sp1024", train_shards=2, dest=str(tmp_path / "b"), download=make_fake(remote, []))

    # a folder whose fingerprint names another tokenizer holds shards of that one: refused, not re-stamped
    good = tmp_path / "e"
    ccf.fetch("sp1024", train_shards=1, dest=str(good), download=make_fake(remote, []))
    fp_path = good / "datasets" / "fineweb10B_sp1024" / "tokenizer_fingerprint.json"
    fp_path.write_text(json.dumps({"tokenizer_sha256": "ab" * 32, "vocab_size": 1024}))
    with pytest.raises(SystemExit, match="tokenizer_fingerprint.json.*another tokenizer"):
        ccf.fetch("sp1024", train_shards=1, dest=str(good), download=make_fake(remote, []))

    with pytest.raises(SystemExit, match="unknown variant"):
        ccf.fetch("sp4096", train_shards=1, dest=str(tmp_path / "c"), download=failing)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(SystemExit, match="huggingface_hub is not installed"):
        ccf.fetch("sp1024", train_shards=1, dest=str(tmp_path / "d"))


# --- embedded sample ------------------------------------------------------------------------------------

def test_embedded_sample():
    files = ["train_docs.jsonl.xz", "val_docs.jsonl.xz", "fineweb_1024_bpe.model", "README.md"]
    assert all((SAMPLE / f).is_file() for f in files)
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*")) <= 3_000_000
    train = list(bs.iter_docs(str(SAMPLE / "train_docs.jsonl.xz")))
    val = list(bs.iter_docs(str(SAMPLE / "val_docs.jsonl.xz")))
    assert len(train) > 100 and len(val) > 10
    assert sum(len(t.encode("utf-8")) for t in val) >= 100_000
    assert not set(train) & set(val)
    with lzma.open(SAMPLE / "val_docs.jsonl.xz", "rt", encoding="utf-8") as f:
        assert all(json.loads(line).keys() == {"text", "source"} for line in f)
