"""train_gpt.py data section: shard validation errors, tokenizer/vocab check, loader determinism and rank layout."""
import hashlib
import json

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY, TOKENIZER


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=None, extra=b""):
    header = np.zeros(tg.HEADER_INTS, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes() + extra)
    return path


def test_good_shard_roundtrip(tmp_path):
    toks = np.arange(1000) % 1024
    p = write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    assert tg.read_shard_header(p) == 1000
    np.testing.assert_array_equal(tg.load_shard(p, 1024), toks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(magic=12345), "bad magic"),
        (dict(version=2), "unsupported shard version"),
        (dict(count=999), "but file has"),
        (dict(extra=b"\x00\x00"), "but file has"),
    ],
)
def test_bad_header_names_file(tmp_path, kwargs, message):
    p = write_shard(tmp_path / "fineweb_train_000007.bin", np.arange(1000) % 1024, **kwargs)
    with pytest.raises(tg.DataError, match=message) as e:
        tg.load_shard(p, 1024)
    assert "fineweb_train_000007.bin" in str(e.value)


def test_truncated_header(tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(tg.DataError, match="shorter than"):
        tg.read_shard_header(p)


def test_token_out_of_vocab(tmp_path):
    toks = np.zeros(50, np.int64)
    toks[17] = 1024
    p = write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    with pytest.raises(tg.DataError, match=r"token id 1024 at position 17 >= VOCAB_SIZE=1024"):
        tg.load_shard(p, 1024)
    assert len(tg.load_shard(p, 2048)) == 50


def test_no_shards_and_tokenizer_checks(tmp_path):
    with pytest.raises(tg.DataError, match="no shard matches"):
        tg.shard_files(str(tmp_path / "fineweb_train_*.bin"))
    with pytest.raises(tg.DataError, match="vocab 1024 != VOCAB_SIZE=8192"):
        tg.load_tokenizer(TOKENIZER, 8192)
    with pytest.raises(tg.DataError, match="not found"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)
    assert tg.load_tokenizer(TOKENIZER, 1024).vocab_size() == 1024


def test_config_errors_name_the_variable():
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN='abc'"):
        tg.Hyperparameters({"TRAIN_SEQ_LEN": "abc"})
    with pytest.raises(tg.ConfigError, match="MODEL_DIM=0 must be > 0"):
        tg.Hyperparameters({"MODEL_DIM": "0"})
    with pytest.raises(tg.ConfigError, match="MLP_ACT='gelu' must be one of"):
        tg.Hyperparameters({"MLP_ACT": "gelu"})
    with pytest.raises(tg.ConfigError, match="MUON_ROW_NORM='maybe'"):
        tg.Hyperparameters({"MUON_ROW_NORM": "maybe"})
    with pytest.raises(tg.ConfigError, match="NUM_KV_HEADS"):
        tg.Hyperparameters({"NUM_HEADS": "12", "NUM_KV_HEADS": "5"})
    h = tg.Hyperparameters({"MUON_ROW_NORM": "true", "MATRIX_LR": "0.5"})
    assert h.muon_row_norm is True and h.matrix_lr == 0.5
    with pytest.raises(tg.ConfigError, match="GRAD_ACCUM_STEPS=3"):
        tg.check_batch_shape(tg.Hyperparameters({"TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "3"}), 1)


def make_loader(shards, world, rank, accum, seed=7, batch=1024, seq=64):
    h = tg.Hyperparameters({**TINY, "GRAD_ACCUM_STEPS": str(accum), "SEED": str(seed),
                            "TRAIN_BATCH_TOKENS": str(batch), "TRAIN_SEQ_LEN": str(seq)})
    return tg.DistributedTokenLoader(str(shards / "fineweb_train_*.bin"), h, rank, world, torch.device("cpu"))


def collect(loader, steps):
    out = [[(x.clone(), y.clone()) for x, y in loader.next_batch()] for _ in range(steps)]
    loader.close()
    return out


def test_loader_targets_are_shifted_inputs(shards):
    for x, y in collect(make_loader(shards, 1, 0, 2), 3)[0]:
        assert x.shape == y.shape == (8, 64)
        flat_x, flat_y = x.reshape(-1), y.reshape(-1)
        assert torch.equal(flat_x[1:], flat_y[:-1])  # one contiguous piece, shifted by one


def test_loader_deterministic_for_seed(shards):
    a, b = collect(make_loader(shards, 1, 0, 1, seed=3), 40), collect(make_loader(shards, 1, 0, 1, seed=3), 40)
    assert all(torch.equal(p[0][0], q[0][0]) for p, q in zip(a, b))
    # the train shards hold ~3 epochs-worth of 40 steps; a different seed visits the shards in another order
    c = collect(make_loader(shards, 1, 0, 1, seed=4), 40)
    assert not all(torch.equal(p[0][0], q[0][0]) for p, q in zip(a, c))


def test_ranks_read_disjoint_pieces_of_the_same_global_batch(shards):
    single = collect(make_loader(shards, 1, 0, 2), 5)  # world 1, accum 2
    r0, r1 = collect(make_loader(shards, 2, 0, 1), 5), collect(make_loader(shards, 2, 1, 1), 5)
    for step in range(5):
        assert torch.equal(single[step][0][0], r0[step][0][0])
        assert torch.equal(single[step][1][0], r1[step][0][0])
        assert not torch.equal(r0[step][0][0], r1[step][0][0])
    # consecutive pieces of a step do not overlap: rank 1's piece starts micro+1 tokens after rank 0's
    stream = tg.TokenStream(tg.shard_files(str(shards / "fineweb_train_*.bin")), 1024, 7)
    span = stream.take(2 * 513)
    assert torch.equal(r0[0][0][0].reshape(-1), torch.from_numpy(span[:512].astype(np.int64)))
    assert torch.equal(r1[0][0][0].reshape(-1), torch.from_numpy(span[513:1025].astype(np.int64)))


def test_token_stream_crosses_shards_and_epochs(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 10))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10, 17))
    stream = tg.TokenStream(tg.shard_files(str(tmp_path / "fineweb_train_*.bin")), 1024, 0)
    got = np.concatenate([stream.take(5) for _ in range(10)])  # 50 tokens = 2.9 epochs of 17
    for epoch in range(2):
        assert sorted(got[17 * epoch : 17 * (epoch + 1)].tolist()) == list(range(17))


def test_loader_surfaces_bad_shard_from_prefetch_thread(tmp_path):
    toks = np.zeros(5000, np.int64)
    toks[4000] = 2000
    write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    loader = make_loader(tmp_path, 1, 0, 1)
    with pytest.raises(tg.DataError, match="token id 2000"):
        loader.next_batch()
    loader.close()


# ---------------------------------------------------------------------------------------------------------------
# every shard checked at start (issue 15 item 6)

def test_check_shards_finds_a_bad_token_in_the_last_shard(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(500) % 1000)
    toks = np.arange(700) % 1000
    toks[650] = 1030
    write_shard(tmp_path / "fineweb_train_000003.bin", toks)
    files = tg.shard_files(str(tmp_path / "fineweb_train_*.bin"))
    with pytest.raises(tg.DataError, match=r"fineweb_train_000003.bin: token id 1030 at position 650 >= VOCAB_SIZE=1024"):
        tg.check_shards(files, 1024)
    assert tg.check_shards(files, 2048) == 2200  # total tokens


def test_check_shards_refuses_an_empty_shard(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(50))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.zeros(0))
    with pytest.raises(tg.DataError, match=r"fineweb_train_000001.bin: 0 tokens"):
        tg.check_shards(tg.shard_files(str(tmp_path / "fineweb_train_*.bin")), 1024)


def test_token_stream_raises_instead_of_spinning_on_empty_shards(tmp_path):
    import threading

    write_shard(tmp_path / "fineweb_train_000000.bin", np.zeros(0))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.zeros(0))
    stream = tg.TokenStream(tg.shard_files(str(tmp_path / "fineweb_train_*.bin")), 1024, 0)
    errors = []

    def take():
        try:
            stream.take(5)
        except tg.DataError as e:
            errors.append(str(e))

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "TokenStream.take spins on a whole epoch of empty shards"
    assert errors and "no tokens" in errors[0]


@pytest.mark.slow
def test_run_with_an_empty_train_shard_stops_at_start(shards, tmp_path):
    import shutil

    from conftest import run_train

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shards / "fineweb_val_000000.bin", data)
    write_shard(data / "fineweb_train_000000.bin", np.zeros(0))
    r = run_train(data, tmp_path, ITERATIONS=2, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "fineweb_train_000000.bin: 0 tokens" in r.stderr
    assert "step:" not in r.stdout
    # no fingerprint in this hand-made folder: the run says so in its log instead of trusting it silently
    assert "fingerprint:none" in r.stdout and f"warning: {data / 'tokenizer_fingerprint.json'} is missing" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer against the shards' fingerprint (issue 15 item 2)

def write_fingerprint(folder, sha, vocab=1024):
    (folder / "tokenizer_fingerprint.json").write_text(json.dumps(
        {"tokenizer_sha256": sha, "vocab_size": vocab, "tokenizer_file": "other_bpe.model"}))


def test_tokenizer_fingerprint_names_both_files(tmp_path):
    sha = hashlib.sha256(open(TOKENIZER, "rb").read()).hexdigest()  # independent of the code under test
    assert tg.tokenizer_fingerprint(tmp_path, TOKENIZER, 1024) == (sha, False)
    write_fingerprint(tmp_path, sha)
    assert tg.tokenizer_fingerprint(tmp_path, TOKENIZER, 1024) == (sha, True)
    for other_sha, vocab in (("ab" * 32, 1024), (sha, 2048)):
        write_fingerprint(tmp_path, other_sha, vocab)
        with pytest.raises(tg.DataError) as e:
            tg.tokenizer_fingerprint(tmp_path, TOKENIZER, 1024)
        msg = str(e.value)
        assert f"TOKENIZER_PATH={TOKENIZER}" in msg and str(tmp_path / "tokenizer_fingerprint.json") in msg
        assert "other_bpe.model" in msg and sha[:16] in msg
    (tmp_path / "tokenizer_fingerprint.json").write_text("{not json")
    with pytest.raises(tg.DataError, match="tokenizer_fingerprint.json: not a tokenizer fingerprint"):
        tg.tokenizer_fingerprint(tmp_path, TOKENIZER, 1024)


@pytest.mark.slow
def test_run_refuses_shards_of_another_tokenizer(shards, tmp_path):
    import shutil

    from conftest import run_train

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    write_fingerprint(data, "cd" * 32)
    r = run_train(data, tmp_path, ITERATIONS=2)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not the tokenizer that made the shards" in r.stderr and "tokenizer_fingerprint.json" in r.stderr
    assert "step:" not in r.stdout
    ok = run_train(shards, tmp_path, ITERATIONS=1, RUN_ID="ok")  # the fixture's folder: built with TOKENIZER
    assert ok.returncode == 0, ok.stdout + ok.stderr
    sha = hashlib.sha256(open(TOKENIZER, "rb").read()).hexdigest()
    assert f"tokenizer path:{TOKENIZER} sha256:{sha} vocab:1024 fingerprint:match" in ok.stdout
    assert "warning:" not in ok.stdout and "data_check shards:" in ok.stdout


@pytest.mark.parametrize("content", [b"", b"this is not a model", b"\x0a\x05hello"])
def test_a_file_that_is_not_a_tokenizer_names_itself(tmp_path, content):
    bad = tmp_path / "tok.model"
    bad.write_bytes(content)
    with pytest.raises(tg.DataError, match=f"{bad}: not a SentencePiece model") as e:
        tg.load_tokenizer(str(bad), 1024)
    assert "TOKENIZER_PATH" in str(e.value)
