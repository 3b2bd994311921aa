"""Legal score-first TTT: a canary model that catches any token scored after an update that used it, coverage of
every target exactly once, the numbers against a hand-written loop, the time budget, and end-to-end runs."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import event_bpb, log_values, run_train
from test_model import BASE, model

ONE_BYTE = (np.ones(512, np.int64), np.zeros(512, bool), np.zeros(512, bool))  # every target is one byte
CPU = torch.device("cpu")


class CanaryModel(torch.nn.Module):
    """Token ids are positions (tokens = arange), so a target id names its place in the stream. Under no_grad
    (scoring) the per-token NLL it returns is the target id itself, which makes the pipeline's total the sum of
    the ids it scored; with gradients (adapting) it is a real loss, and every id in the batch is recorded as used.
    Scoring a target that an update already used is a leak."""

    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.out = torch.nn.Linear(4, vocab)
        self.used, self.leaks, self.updates = set(), [], 0

    def token_nll(self, idx, targets, state=None):
        if torch.is_grad_enabled():
            self.used |= set(idx.flatten().tolist()) | set(targets.flatten().tolist())
            self.updates += 1
            logits = self.out(self.emb(idx)).float()
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets), state
        scored = set(targets.flatten().tolist()) - {0}  # 0: padding rows and tails
        if scored & self.used:
            self.leaks.append(sorted(scored & self.used))
        return targets.double() + 0 * self.out.bias.sum(), state


def hparams(**kw):
    env = {**BASE, "TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "16", "TTT_ENABLED": "1", "TTT_SCOPE": "all",
           "TTT_CHUNK_TOKENS": "20", "VOCAB_SIZE": "512"}
    return tg.Hyperparameters({**env, **{k: str(v) for k, v in kw.items()}})


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("stride, epochs", [(0, 1), (3, 2), (8, 1)])
def test_canary_no_token_is_scored_after_an_update_that_used_it(monkeypatch, world, stride, epochs):
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t: None)  # ranks run one after another in this process
    n = 301
    tokens = np.arange(n)
    h = hparams(EVAL_STRIDE=stride, TTT_EPOCHS=epochs)
    canary = CanaryModel(512)
    total_nll, total_tokens = 0.0, 0
    for rank in range(world):
        loss, bpb = tg.stream_evaluate(canary, tokens, ONE_BYTE, h, rank, world, CPU, log=lambda msg: None)
        lo, hi = tg.rank_share(n - 1, rank, world)
        total_nll += loss * (hi - lo)
        total_tokens += hi - lo
    assert canary.leaks == []
    assert canary.updates > 0 and canary.used >= set(range(1, n - 1))  # it did adapt, on every token
    assert total_tokens == n - 1
    assert total_nll == pytest.approx(n * (n - 1) / 2)  # the sum of every target id 1..n-1: each scored once


def test_ttt_matches_a_hand_written_score_then_adapt_loop():
    """4 chunks of 16 targets, each one batch of two windows of 8: score the chunk, then one SGD-momentum step on
    it with the masked mean NLL; the momentum buffer carries over to the next chunk."""
    h = tg.Hyperparameters({**BASE, "TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "16", "TTT_ENABLED": "1",
                            "TTT_SCOPE": "safe", "TTT_CHUNK_TOKENS": "16", "TTT_LR": "0.05"})
    tokens = np.random.default_rng(3).integers(0, 128, 65)
    luts = ONE_BYTE
    m = model()
    ref = copy.deepcopy(m)
    loss, bpb = tg.stream_evaluate(m, tokens, luts, h, 0, 1, CPU, log=lambda msg: None)

    params = tg.ttt_parameters(ref, "safe")
    assert 0 < sum(p.numel() for p in params) < sum(p.numel() for p in ref.parameters()) // 10
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    total = 0.0
    for c in range(0, 64, 16):
        x = torch.from_numpy(tokens[c : c + 16].reshape(2, 8))
        y = torch.from_numpy(tokens[c + 1 : c + 17].reshape(2, 8))
        ref.eval()
        with torch.no_grad():
            total += ref.token_nll(x, y)[0].sum().item()
        ref.train()
        opt.zero_grad()
        ref.token_nll(x, y)[0].mean().backward()
        opt.step()
    assert loss == pytest.approx(total / 64, rel=1e-5)
    assert bpb == pytest.approx(total / 64 / np.log(2), rel=1e-5)
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)  # the same adapted model, so the same updates happened
    untouched = model()
    changed = [n for (n, a), b in zip(m.named_parameters(), untouched.parameters()) if not torch.equal(a, b)]
    safe = {n for n, p in m.named_parameters() if any(p is q for q in tg.ttt_parameters(m, "safe"))}
    assert changed and set(changed) <= safe  # only the safe scope moved


def test_over_the_budget_scoring_goes_on_without_adapting():
    n = 301
    canary = CanaryModel(512)
    before = copy.deepcopy(canary.state_dict())
    msgs = []
    loss, _ = tg.stream_evaluate(canary, np.arange(n), ONE_BYTE, hparams(EVAL_BUDGET_SECONDS=1e-9), 0, 1, CPU,
                              log=msgs.append)
    assert loss * (n - 1) == pytest.approx(n * (n - 1) / 2)  # still every target, once
    assert canary.updates == 0 and all(torch.equal(v, canary.state_dict()[k]) for k, v in before.items())
    assert "adapted:0" in msgs[-1] and "chunks:15" in msgs[-1]


def test_ttt_scope_capsule_bank_needs_capsules():
    with pytest.raises(tg.ConfigError, match="CAPSULES_ENABLED"):
        tg.Hyperparameters({"TTT_ENABLED": "1", "TTT_SCOPE": "capsule_bank"})
    m = model(CAPSULES_ENABLED="1", CAPSULE_LAYER="1", CAPSULE_DIM="16")
    assert tg.ttt_parameters(m, "capsule_bank") == list(m.capsules.parameters())


def test_end_to_end_ttt_run(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=4, TTT_ENABLED=1, TTT_CHUNK_TOKENS=512, TTT_LR=0.01)
    assert r.returncode == 0, r.stdout + r.stderr
    chunks = log_values(r.stdout, "chunks")[0]
    assert chunks == log_values(r.stdout, "adapted")[0] == 8  # MAX_VAL_TOKENS=4096 in chunks of 512
    assert event_bpb(r.stdout, "final_roundtrip") > 0


@pytest.mark.ddp
def test_two_process_ttt_owns_contiguous_segments(shards, tmp_path):
    r = run_train(shards, tmp_path, nproc=2, ITERATIONS=4, TTT_ENABLED=1, TTT_CHUNK_TOKENS=512,
                  EVAL_BUDGET_SECONDS=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world_size:2" in r.stdout and "stream_eval ttt:1 scope:safe" in r.stdout
    assert event_bpb(r.stdout, "final_roundtrip") > 0


# ---------------------------------------------------------------------------------------------------------------
# EvalEngram

def engram_h(**kw):
    env = {"VOCAB_SIZE": "64", "EVAL_ENGRAM": "1", "EVAL_ENGRAM_ORDER": "3", "EVAL_ENGRAM_BUCKETS": str(1 << 12)}
    return tg.Hyperparameters({**env, **{k: str(v) for k, v in kw.items()}})


def test_eval_engram_mixture_is_a_distribution():
    h = engram_h(EVAL_ENGRAM_WEIGHT=0.7)
    cache = tg.EvalEngram(h, CPU)
    rng = np.random.default_rng(0)
    cache.insert(rng.integers(0, 8, 400))  # a small alphabet, so most contexts below are seen
    x = torch.from_numpy(rng.integers(0, 8, (3, 10)))
    logp = torch.randn(3, 10, 64).log_softmax(-1)
    total = sum(cache.target_prob(logp, x, torch.full((3, 10), v)) for v in range(64))
    torch.testing.assert_close(total, torch.ones(3, 10), rtol=0, atol=1e-5)
    mixed = cache.target_prob(logp, x, torch.zeros(3, 10, dtype=torch.long))
    assert not torch.allclose(mixed, logp[..., 0].exp())  # the cache did move the probabilities


def test_eval_engram_counts_match_a_slow_reference():
    """A uniform model (entropy ln V) and weight 1: the mixture is the cache alone, (c(ctx, v) + a)/(c(ctx) + aV)
    with c from a plain Counter of trigrams; an unseen context keeps the model's probability."""
    from collections import Counter

    h = engram_h(EVAL_ENGRAM_WEIGHT=1.0, EVAL_ENGRAM_ALPHA=0.5)
    cache = tg.EvalEngram(h, CPU)
    seq = np.random.default_rng(1).integers(0, 5, 300)
    cache.insert(seq[:150])
    cache.insert(seq[150:])  # two inserts: the n-grams across the cut are not counted, as in the evaluation
    tri = Counter(tuple(seq[i : i + 3]) for i in range(148)) + Counter(tuple(seq[150 + i : 153 + i]) for i in range(148))
    ctx = Counter()
    for (a, b, _), k in tri.items():
        ctx[(a, b)] += k
    logp = torch.full((1, 3, 64), -np.log(64.0))
    for a, b, v in [(0, 1, 2), (3, 3, 3), (4, 0, 1), (9, 9, 1)]:
        x = torch.tensor([[7, a, b]])
        got = cache.target_prob(logp, x, torch.tensor([[0, 0, v]]))[0, 2].item()
        want = (tri[(a, b, v)] + 0.5) / (ctx[(a, b)] + 0.5 * 64) if ctx[(a, b)] else 1 / 64
        assert got == pytest.approx(want, rel=1e-5)
    # position 0 holds one token of context, fewer than the 2 a trigram needs: the model alone
    x = torch.tensor([[1, 0, 1]])
    assert cache.target_prob(logp, x, torch.tensor([[2, 2, 2]]))[0, 0].item() == pytest.approx(1 / 64)


class RecordingEngram(tg.EvalEngram):
    """Records what it is asked to score and what it is given to count: a scored target that was already counted
    is a leak."""

    def __init__(self, h, device):
        super().__init__(h, device)
        self.counted, self.leaks, self.scored = set(), [], 0

    def target_prob(self, logp, x, targets):
        hit = (set(targets.flatten().tolist()) - {0}) & self.counted
        if hit:
            self.leaks.append(sorted(hit))
        self.scored += 1
        return super().target_prob(logp, x, targets)

    def insert(self, tokens):
        self.counted |= set(np.asarray(tokens).tolist())
        super().insert(tokens)


@pytest.mark.parametrize("ttt", ["0", "1"])
def test_canary_eval_engram_counts_only_scored_tokens(ttt):
    n = 301
    tokens = np.arange(n)  # ids are positions
    h = hparams(EVAL_ENGRAM="1", TTT_ENABLED=ttt, EVAL_STRIDE=3)
    cache = RecordingEngram(h, CPU)
    canary = CanaryModel(512)
    canary.scored_logits = lambda idx, state=None: (canary.out(canary.emb(idx)).float(), state)
    loss, _ = tg.stream_evaluate(canary, tokens, ONE_BYTE, h, 0, 1, CPU, log=lambda m: None, cache=cache)
    assert cache.leaks == [] and canary.leaks == []
    assert cache.scored > 0 and cache.counted == set(range(n))
    assert np.isfinite(loss)


def test_engram_hash_tables_are_restored_after_adapting():
    m = model(ENGRAM_ENABLED="1")
    h = tg.Hyperparameters({**BASE, "ENGRAM_ENABLED": "1", "TRAIN_SEQ_LEN": "8", "VAL_BATCH_TOKENS": "16",
                            "TTT_ENABLED": "1", "TTT_SCOPE": "all", "TTT_CHUNK_TOKENS": "16", "TTT_LR": "0.1"})
    table = m.engram.table.weight.detach().clone()
    other = m.blocks[0].mlp_norm.weight.detach().clone()
    tg.stream_evaluate(m, np.random.default_rng(0).integers(0, 128, 97), ONE_BYTE, h, 0, 1, CPU, log=lambda s: None)
    assert torch.equal(m.engram.table.weight, table)
    assert not torch.equal(m.blocks[0].mlp_norm.weight, other)  # the rest did adapt


def test_end_to_end_eval_engram_run(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=4, EVAL_ENGRAM=1, TTT_CHUNK_TOKENS=512)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stream_eval ttt:0" in r.stdout and "eval_engram:1 chunks:8 adapted:8" in r.stdout
    assert event_bpb(r.stdout, "final_roundtrip") > 0
