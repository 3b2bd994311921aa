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
        loss, bpb = tg.ttt_evaluate(canary, tokens, ONE_BYTE, h, rank, world, CPU, log=lambda msg: None)
        lo, hi = tg.ttt_segment(n - 1, rank, world)
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
    loss, bpb = tg.ttt_evaluate(m, tokens, luts, h, 0, 1, CPU, log=lambda msg: None)

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
    loss, _ = tg.ttt_evaluate(canary, np.arange(n), ONE_BYTE, hparams(EVAL_BUDGET_SECONDS=1e-9), 0, 1, CPU,
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
    assert "world_size:2" in r.stdout and "ttt scope:safe" in r.stdout
    assert event_bpb(r.stdout, "final_roundtrip") > 0
