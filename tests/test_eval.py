"""Evaluation: BPB byte accounting by hand from real tokenizer pieces, coverage, and the full evaluate()."""
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import TOKENIZER

SP = spm.SentencePieceProcessor(model_file=TOKENIZER)
LUTS = tg.build_byte_luts(SP, 1024)
BOS = SP.bos_id()


def bytes_of(ids):
    ids = np.asarray(ids)
    return int(tg.target_bytes(ids[:-1], ids[1:], LUTS).sum())


def test_hand_computed_bytes_from_pieces():
    ids = SP.encode("Hello world")
    assert [SP.id_to_piece(i) for i in ids] == ["H", "ell", "o", "\u2581wor", "ld"]
    # after BOS: H=1, ell=3, o=1, '▁wor' = space + 3 = 4, ld=2
    assert bytes_of([BOS] + ids) == 11 == len("Hello world".encode())
    emoji = SP.encode("naïve café 🙂")
    pieces = [SP.id_to_piece(i) for i in emoji]
    assert pieces.count("<0xF0>") == 1 and "<0xC3>" in pieces  # byte fallback: one byte per piece
    # n a ï(2 byte pieces) ve ▁c a f é(2) ▁ 🙂(4) = 1+1+2+2+2+1+1+2+1+4
    assert bytes_of([BOS] + emoji) == 17 == len("naïve café 🙂".encode())


def test_leading_space_after_boundary_counts_zero():
    wor, ld = SP.piece_to_id("\u2581wor"), SP.piece_to_id("ld")
    assert bytes_of([BOS, wor, ld]) == 3 + 2  # '▁' straight after BOS is no text
    assert bytes_of([ld, wor]) == 4  # mid-document it is one space byte
    assert bytes_of([ld, SP.eos_id()]) == 0  # control tokens have no bytes
    assert bytes_of([ld, SP.unk_id()]) == 0


def test_bytes_equal_utf8_of_decoded_documents():
    """Independent reference over real documents: bytes of the targets = UTF-8 bytes of the decoded texts."""
    import lzma, json

    docs = [json.loads(line)["text"] for _, line in zip(range(5), lzma.open(str(tg.Path(TOKENIZER).parent / "val_docs.jsonl.xz"), "rt"))]
    docs.append("Tabs\tand\nnewlines and  double  spaces 中文")
    stream, expected = [], 0
    for d in docs:
        ids = SP.encode(d)
        stream += [BOS] + ids
        expected += len(SP.decode(ids).encode("utf-8"))
    assert bytes_of(stream) == expected


@pytest.mark.parametrize("n, seq, batch, world, stride", [
    (1000, 64, 4, 1, 0), (1000, 64, 4, 3, 0), (129, 64, 8, 2, 0), (65, 64, 2, 4, 0), (1000, 64, 4, 1, 64),
    (1000, 64, 4, 3, 16), (129, 64, 8, 2, 1), (65, 64, 2, 4, 7), (40, 64, 3, 2, 16), (300, 32, 5, 3, 31)])
def test_every_target_scored_exactly_once(n, seq, batch, world, stride):
    """Disjoint (stride 0) and sliding windows: each target once, with at least seq - stride + 1 tokens of
    context (all the tokens before it, near the start of the split)."""
    tokens = np.arange(n)
    seen = np.zeros(n, int)
    shapes = set()
    for rank in range(world):
        for x, y, m in tg.eval_batches(tokens, seq, batch, rank, world, stride):
            shapes.add(x.shape)
            np.testing.assert_array_equal(y[m], x[m] + 1)  # target is the next token
            np.add.at(seen, y[m], 1)
            rows, offsets = np.nonzero(m)
            context = offsets + 1
            np.testing.assert_array_equal(x[rows, 0] + offsets, y[m] - 1)  # the row holds contiguous tokens
            assert (context >= np.minimum(y[m], seq - (stride or seq) + 1)).all()
    assert seen[0] == 0 and (seen[1:] == 1).all()
    assert len(shapes) == 1  # one shape for every batch of every rank: no recompiles


@pytest.mark.parametrize("stride", [3, 8])
def test_sliding_evaluate_matches_a_per_target_reference(stride):
    """evaluate() with EVAL_STRIDE against a slow loop that finds each target's window by formula: target j is
    scored by window 0 if j <= L, else by window ceil((j - L) / stride), which starts at k * stride."""
    from test_model import BASE, model

    m = model()
    seq = 8
    h = tg.Hyperparameters({**BASE, "TRAIN_SEQ_LEN": str(seq), "VAL_BATCH_TOKENS": "24", "EVAL_STRIDE": str(stride)})
    tokens = np.random.default_rng(1).integers(0, 128, 43)
    luts = (np.ones(128, np.int64), np.zeros(128, bool), np.zeros(128, bool))  # one byte per token
    loss, bpb = tg.evaluate(m, tokens, luts, h, 0, 1, torch.device("cpu"), h.eval_stride)
    m.eval()
    total, n = 0.0, len(tokens) - 1
    with torch.no_grad():
        for j in range(1, n + 1):
            k = 0 if j <= seq else -(-(j - seq) // stride)
            a = k * stride
            x = torch.from_numpy(tokens[a : min(a + seq, n)][None])
            y = torch.from_numpy(tokens[a + 1 : min(a + seq, n) + 1][None])
            total += m.token_nll(x, y)[0][0, j - 1 - a].item()
    assert loss == pytest.approx(total / n, rel=1e-5)
    assert bpb == pytest.approx(total / n / math.log(2), rel=1e-5)
    chunked = tg.evaluate(m, tokens, luts, h, 0, 1, torch.device("cpu"))
    assert tg.evaluate(m, tokens, luts, h, 0, 1, torch.device("cpu"), seq) == pytest.approx(chunked)


def test_eval_stride_is_checked():
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE=65"):
        tg.Hyperparameters({"TRAIN_SEQ_LEN": "64", "EVAL_STRIDE": "65"})
    with pytest.raises(tg.ConfigError, match="CAPSULES_ENABLED"):
        tg.Hyperparameters({"EVAL_STRIDE": "64", "CAPSULES_ENABLED": "1"})
    assert tg.Hyperparameters({"TRAIN_SEQ_LEN": "64", "EVAL_STRIDE": "64", "CAPSULES_ENABLED": "1"}).eval_stride == 64


class UniformModel(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(()))

    def token_nll(self, idx, targets, state=None):
        return torch.full(targets.shape, math.log(self.vocab)) + self.p, None


def test_evaluate_uniform_model_gives_log2_vocab_bits_per_token():
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 🙂"
    tokens = np.array([BOS] + SP.encode(text) + [BOS] + SP.encode("Second document here."))
    h = tg.Hyperparameters({"TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "16", "VOCAB_SIZE": "1024"})
    loss, bpb = tg.evaluate(UniformModel(1024), tokens, LUTS, h, 0, 1, torch.device("cpu"))
    n_bytes = len(text.encode()) + len("Second document here.".encode())
    assert loss == pytest.approx(math.log(1024))
    assert bpb == pytest.approx((len(tokens) - 1) * 10 / n_bytes)


@pytest.mark.parametrize("n, seq, batch, world", [(1000, 64, 4, 1), (1000, 64, 4, 3), (129, 64, 8, 2), (65, 64, 2, 4),
                                                  (700, 16, 5, 2)])
def test_stream_batches_score_every_target_once_and_rows_walk_contiguously(n, seq, batch, world):
    """The capsule layout: row r of consecutive batches holds consecutive sequences of the text."""
    tokens = np.arange(n)
    seen = np.zeros(n, int)
    for rank in range(world):
        last_end = {}
        for x, y, m in tg.eval_stream_batches(tokens, seq, batch, rank, world):
            np.testing.assert_array_equal(y[m], x[m] + 1)
            np.add.at(seen, y[m], 1)
            for r in range(x.shape[0]):
                if m[r].any():
                    start = x[r, 0]
                    if r in last_end:
                        assert start == last_end[r]  # this window starts where the row's last one ended
                    last_end[r] = y[r][m[r]][-1]
    assert seen[0] == 0 and (seen[1:] == 1).all()


def test_evaluate_carries_capsule_state_from_window_to_window():
    from test_model import BASE, FEATURES, model

    cfg = {**BASE, **FEATURES["capsules"], "TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "16"}
    m = model(**{k: v for k, v in cfg.items() if k not in BASE})
    with torch.no_grad():
        m.capsules.gate.fill_(1.0)
    h = tg.Hyperparameters(cfg)
    tokens = np.random.default_rng(0).integers(0, 128, 57)
    luts = (np.ones(128, np.int64), np.zeros(128, bool), np.zeros(128, bool))  # one byte per token
    loss, bpb = tg.evaluate(m, tokens, luts, h, 0, 1, torch.device("cpu"))
    # by hand: 7 windows of 8 targets in two rows (4 + 3), state flowing along each row
    m.eval()
    total = 0.0
    for row in ([0, 1, 2, 3], [4, 5, 6]):
        state = None
        for w in row:
            x = torch.from_numpy(tokens[8 * w : 8 * w + 8][None])
            y = torch.from_numpy(tokens[8 * w + 1 : 8 * w + 9][None])
            nll, state = m.token_nll(x, y, state)
            total += nll.sum().item()
    assert loss == pytest.approx(total / 56, rel=1e-5)
    assert bpb == pytest.approx(total / 56 / math.log(2), rel=1e-5)
    fresh_total = sum(m.token_nll(torch.from_numpy(tokens[8 * w : 8 * w + 8][None]),
                                  torch.from_numpy(tokens[8 * w + 1 : 8 * w + 9][None]))[0].sum().item() for w in range(7))
    assert abs(fresh_total - total) > 1e-3  # the carried state matters


class OverconfidentModel(torch.nn.Module):
    """Context-free logits c * log p: data drawn from p is best scored at temperature c."""

    def __init__(self, p, c):
        super().__init__()
        self.logp, self.c = torch.log(torch.as_tensor(p, dtype=torch.float32)), c

    def logits(self, idx, state=None):
        return (self.c * self.logp).expand(*idx.shape, -1), 0.0, None


def test_temperature_search_finds_the_calibrating_temperature():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(64, 0.3))
    tokens = rng.choice(64, size=30001, p=p)
    h = tg.Hyperparameters({"TRAIN_SEQ_LEN": "100", "VAL_BATCH_TOKENS": "2000", "VOCAB_SIZE": "64"})
    model = OverconfidentModel(p, 1.2)
    t, nll = tg.search_temperature(model, tokens, h, 0, 1, torch.device("cpu"))
    assert t == pytest.approx(1.2, abs=0.021) and t == float(np.float16(t))  # stored exactly by an fp16 artifact
    for temp in (0.8, 1.0, 1.3):  # the per-token NLL by hand
        logq = 1.2 * np.log(p) / temp
        logq -= np.log(np.exp(logq).sum())
        assert nll[temp] == pytest.approx(-logq[tokens[1:]].mean(), rel=1e-4)
    assert min(nll, key=nll.get) == pytest.approx(t, abs=1e-3)


def calibration_run(**kw):
    from test_model import BASE, model

    m = model(TERNARY_CALIB="1")
    h = tg.Hyperparameters({**BASE, "TERNARY_CALIB": "1", "TRAIN_SEQ_LEN": "16", "VAL_BATCH_TOKENS": "64",
                            **{k: str(v) for k, v in kw.items()}})
    tokens = np.random.default_rng(2).integers(0, 128, 257)
    lines = []
    tg.calibrate_ternary(m, tokens, h, 0, 1, torch.device("cpu"), lines.append)
    return m, tokens, h, lines[-1]


def test_calibration_lowers_the_loss_within_its_budget():
    m, tokens, h, line = calibration_run(CALIB_MAX_EVALS=30, CALIB_SECONDS=3600)  # the eval budget binds, not the clock
    evals = int(line.split("evals:")[1].split()[0])
    before, after = (float(line.split(k)[1].split()[0]) for k in ("loss_before:", "loss_after:"))
    assert evals == 30 and after <= before
    m.eval()
    with torch.no_grad():  # the model as left scores exactly what the search reported
        x, y = torch.from_numpy(tokens[:-1].reshape(16, 16)), torch.from_numpy(tokens[1:].reshape(16, 16))
        assert m.token_nll(x, y)[0].mean().item() == pytest.approx(after, abs=1e-4)
    changed = int(line.split("changed:")[1].split()[0])
    assert changed == sum(not torch.equal(x.calib, torch.tensor([0.5, 1.0])) for x in m.modules() if hasattr(x, "calib"))


def test_calibration_stops_at_its_time_budget():
    _, _, _, line = calibration_run(CALIB_SECONDS=1e-9)
    assert "evals:2 " in line  # the baseline, then one candidate, after which the over-budget flag stops it


# ---------------------------------------------------------------------------------------------------------------
# document-aware scoring (EVAL_DOC_ISOLATED)

def stream_with_documents(n, seed, bos=1, p=0.05):
    """Random ids 2.. with BOS at random places, sometimes at 0, twice in a row, or last."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 100, n)
    tokens[rng.random(n) < p] = bos
    if seed % 2:
        tokens[0] = bos
    if seed % 3 == 0:
        tokens[[n // 2, n // 2 + 1, n - 1]] = bos
    return tokens


@pytest.mark.parametrize("seed", range(6))
def test_documents_tile_the_targets(seed):
    tokens = stream_with_documents(400, seed)
    first, last = tg.document_bounds(tokens, 1)
    owner = np.zeros(len(tokens), int)
    for k, (a, b) in enumerate(zip(first, last)):
        assert a <= b
        owner[a : b + 1] += 1
        assert (tokens[a : b] != 1).all()  # no BOS inside a document's inputs after its own start
        assert a == 1 or tokens[a - 1] == 1  # it starts at a BOS, or at the split's start
    assert owner[0] == 0 and (owner[1:] == 1).all()


@pytest.mark.parametrize("seed, seq, stride, batch, world", [(0, 16, 0, 4, 1), (1, 16, 4, 3, 2), (2, 8, 3, 5, 3),
                                                             (3, 32, 7, 2, 1), (4, 8, 8, 1, 4)])
def test_document_windows_score_every_target_once_and_never_read_across_a_bos(seed, seq, stride, batch, world):
    tokens = stream_with_documents(300, seed)
    docs = tg.document_bounds(tokens, 1)
    doc_of = np.zeros(len(tokens), int)
    for k, (a, b) in enumerate(zip(*docs)):
        doc_of[a - 1 : b] = k  # the document a token belongs to as an input (its BOS included)
    positions = np.arange(len(tokens))
    seen = np.zeros(len(tokens), int)
    for rank in range(world):
        for x, y, m in tg.eval_batches(positions, seq, batch, rank, world, stride, docs):  # ids are positions
            for r, c in zip(*np.nonzero(m)):
                target = y[r, c]
                seen[target] += 1
                context = x[r, : c + 1]
                assert (doc_of[context] == doc_of[target - 1]).all()  # all of it from the target's document
                in_doc = target - docs[0][doc_of[target - 1]] + 1  # tokens of the document up to the target
                assert len(context) >= min(in_doc, seq - (stride or seq) + 1)
    assert seen[0] == 0 and (seen[1:] == 1).all()


@pytest.mark.parametrize("stride", [0, 3])
def test_document_evaluate_is_the_sum_over_documents_scored_alone(stride):
    """Independent reference: each document's slice tokens[first - 1 : last + 1] scored on its own by evaluate()
    with no document knowledge; the totals add up to the document-aware score of the whole split."""
    from test_model import BASE, model

    m = model()
    h = tg.Hyperparameters({**BASE, "TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "24"})
    tokens = stream_with_documents(120, 5)
    luts = (np.arange(128) % 3 + 1, np.zeros(128, bool), np.zeros(128, bool))  # 1-3 bytes, per id
    cpu = torch.device("cpu")
    loss, bpb = tg.evaluate(m, tokens, luts, h, 0, 1, cpu, stride, tg.document_bounds(tokens, 1))
    nll = nbytes = n = 0.0
    for a, b in zip(*tg.document_bounds(tokens, 1)):
        part = tokens[a - 1 : b + 1]
        l, bp = tg.evaluate(m, part, luts, h, 0, 1, cpu, stride)
        nll += l * (b - a + 1)
        nbytes += luts[0][part[1:]].sum()
        n += b - a + 1
    assert n == len(tokens) - 1
    assert loss == pytest.approx(nll / n, rel=1e-6)
    assert bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert loss != pytest.approx(tg.evaluate(m, tokens, luts, h, 0, 1, cpu, stride)[0], rel=1e-6)  # it matters


def test_challenge_eval_estimate_scales_seconds_per_byte_per_gpu():
    """3 ranks scored 300 targets of 2 bytes in 6 s after a 2 s load: 6 * 3 / 600 s per byte and GPU, over the
    challenge's bytes on 8 GPUs, plus the load once."""
    tokens = np.full(301, 5)
    luts = (np.full(10, 2), np.zeros(10, bool), np.zeros(10, bool))
    want = 2.0 + 6.0 * 3 / 600 * tg.CHALLENGE_VAL_BYTES / 8
    assert tg.challenge_eval_seconds(2.0, 6.0, tokens, luts, 3) == pytest.approx(want)
