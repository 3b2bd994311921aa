"""Legal score-first TTT: a canary model that catches any token scored after an update that used it, coverage of
every target exactly once, the numbers against a hand-written loop, the time budget, and end-to-end runs."""
import copy
import functools
import re
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT, event_bpb, log_values, run_train
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


# ---------------------------------------------------------------------------------------------------------------
# LoRA TTT (TTT_MODE=lora)

def lora_h(**kw):
    env = {**BASE, "TRAIN_SEQ_LEN": "16", "TTT_ENABLED": "1", "TTT_MODE": "lora", "TTT_LORA_CHUNK": "6",
           "TTT_LORA_RANK": "2", "TTT_LORA_LR": "0.05", "TTT_LORA_DOCS": "2", "TTT_LORA_TARGETS": "q,v,down,head"}
    return tg.Hyperparameters({**env, **{k: str(v) for k, v in kw.items()}})


def docs_stream(seed=0, n=90):
    """Random ids with BOS (1) at 0 and at a few places: documents of different lengths, one longer than the
    16-token window, one of a single target."""
    tokens = np.random.default_rng(seed).integers(2, 128, n)
    tokens[[0, 30, 31, 52]] = 1
    return tokens


def recorded_model(what=lambda x: tuple(x.shape)):
    """(a test model, a list): each token_nll call first appends what(its input) to the list, the batch shape by
    default, so a test sees what the pass ran, step by step."""
    m, seen = model(), []
    real = m.token_nll
    m.token_nll = lambda x, y, *rest: seen.append(what(x)) or real(x, y, *rest)
    return m, seen


def lora_nll(m, tokens, h):
    spans = tg.adapter_spans(*tg.document_bounds(tokens, 1), h)
    nll, scored, adapted = tg.lora_ttt_nll(m, tokens, h, spans, CPU, time.perf_counter())
    assert scored == len(tokens) - 1 and not torch.isnan(nll).any()
    return nll, adapted


@pytest.mark.parametrize("isolated, span, targets", [("0", 0, "q,v,down,head"), ("1", 0, "q,v,down,head"),
                                                     ("1", 4, "q,v,down,head"), ("1", 0, "attn,mlp")])
def test_lora_canary_a_score_never_depends_on_its_own_or_a_later_token(isolated, span, targets):
    """Black-box legality: change the token at position p. Score-first TTT (and causal windows) leave the score
    of every target before p exactly as it was, in every document; an update that used p before scoring the
    targets of p's chunk would move them. Moving the update before the scoring makes this test fail."""
    h = lora_h(EVAL_DOC_ISOLATED=isolated, TTT_LORA_SPAN=span, TTT_LORA_TARGETS=targets)
    tokens = docs_stream()
    m = model()
    for p in m.parameters():
        p.requires_grad_(False)
    before, adapted = lora_nll(m, tokens, h)
    assert adapted > 0
    p = 1 + 6 + 3  # mid-way through the second chunk of the first document
    changed = tokens.copy()
    changed[p] = (changed[p] + 1) % 126 + 2
    after, _ = lora_nll(m, changed, h)
    torch.testing.assert_close(after[: p - 1], before[: p - 1], rtol=0, atol=1e-6)  # targets 1..p-1
    later = slice(p + 6, 30)  # the first document's later chunks: adapted on p, so they move
    assert not torch.allclose(after[later], before[later], atol=1e-4)
    torch.testing.assert_close(after[30:], before[30:], rtol=0, atol=1e-6)  # other documents: untouched


def reference_spans(tokens, span):
    """(first, last, document's first) of each adapter's span: documents cut every `span` targets (0: never)."""
    out = []
    for first, last in zip(*tg.document_bounds(tokens, 1)):
        step = span or last - first + 1
        out += [(a, min(a + step - 1, last), first) for a in range(first, last + 1, step)]
    return out


def reference_delta(a, b, _module, inputs, out):
    """out + (x A^T) B^T: on the output itself, or a mixer's (output, values) first part (the bypass targets)."""
    if isinstance(out, tuple):
        return (out[0] + inputs[0] @ a.T @ b.T, *out[1:])
    return out + inputs[0] @ a.T @ b.T


def lora_reference(m, tokens, h, a_init, adapt=True):
    """A hand-written loop, one span at a time: windows ending at each chunk's last target (reading back to the
    document's start at most, with EVAL_DOC_ISOLATED), adapters added by explicit hooks, score the chunk, then
    one Adam step on its mean NLL. Returns the total NLL."""
    seq, chunk = h.train_seq_len, h.ttt_lora_chunk
    mods = tg.lora_target_modules(m, h.ttt_lora_targets)
    total = 0.0
    for d, (first, last, doc_first) in enumerate(reference_spans(tokens, h.ttt_lora_span)):
        a = [t[d].clone().requires_grad_() for t in a_init]
        b = [torch.zeros(getattr(mod, "out_features", h.model_dim), h.ttt_lora_rank, requires_grad=True) for mod in mods]
        hooks = [mod.register_forward_hook(functools.partial(reference_delta, ai, bi)) for mod, ai, bi in zip(mods, a, b)]
        opt = torch.optim.Adam(a + b, lr=h.ttt_lora_lr, betas=(h.ttt_lora_beta1, h.ttt_lora_beta2))
        for lo in range(first, last + 1, chunk):
            hi = min(lo + chunk - 1, last)
            w = max(doc_first - 1 if h.eval_doc_isolated else 0, hi - seq)
            x, y = torch.from_numpy(tokens[w:hi][None]), torch.from_numpy(tokens[w + 1 : hi + 1][None])
            nll = m.token_nll(x, y)[0][0, lo - 1 - w :]
            total += nll.sum().item()
            if adapt:
                opt.zero_grad()
                nll.mean().backward()
                with torch.no_grad():  # decoupled weight decay, before the Adam step (as AdamW orders it)
                    for p in a + b:
                        p.mul_(1 - h.ttt_lora_lr * h.ttt_lora_wd)
                opt.step()
        for hook in hooks:
            hook.remove()
    return total


@pytest.mark.parametrize("isolated, adapt, span, opt", [("0", True, 0, {}), ("1", True, 0, {}), ("1", False, 0, {}),
                                                        ("1", True, 10, {}), ("0", True, 7, {}),
                                                        ("1", True, 0, {"TTT_LORA_BETA1": 0.9, "TTT_LORA_WD": 0}),
                                                        ("1", True, 0, {"TTT_LORA_TARGETS": "q,attn,mlp"})])
def test_lora_ttt_matches_a_one_span_at_a_time_loop(isolated, adapt, span, opt):
    """Spans batched 2 at a time, longest first, with a prefix of rows running at each step, against the
    sequential reference: the same total, so each span adapted on its own. adapt=False: over the budget from
    the start, so the adapters stay at zero and the score is the trained model's. span > 0 cuts documents into
    spans with adapters of their own, whose windows still read the document before them."""
    h = lora_h(EVAL_DOC_ISOLATED=isolated, EVAL_BUDGET_SECONDS=0 if adapt else 1e-9, TTT_LORA_SPAN=span, **opt)
    tokens = docs_stream(1)
    m = model()
    nll, adapted = lora_nll(m, tokens, h)
    assert (adapted > 0) == adapt
    first = [a for a, _, _ in reference_spans(tokens, span)]
    a_init = tg.lora_init(h, first, tg.lora_target_modules(m, h.ttt_lora_targets))
    total = lora_reference(m, tokens, h, a_init, adapt)
    assert nll.sum().item() == pytest.approx(total, rel=1e-5)
    if adapt:
        assert total != pytest.approx(lora_reference(m, tokens, h, a_init, adapt=False), rel=1e-4)  # TTT moved it


def test_lora_ttt_on_log8_scales_matches_the_loop():
    """best_known_competition.env runs LoRA TTT on a SCALE_FORMAT=log8 model: the adapters sit on its own
    quantized weight (log-grid scales), as the sequential reference's hooks do."""
    h = lora_h(SCALE_FORMAT="log8")
    tokens = docs_stream(3)
    m = model(SCALE_FORMAT="log8")
    assert isinstance(m.blocks[0].mixer.q, tg.Log8TernaryLinear)
    nll, adapted = lora_nll(m, tokens, h)
    assert adapted > 0
    first = [a for a, _, _ in reference_spans(tokens, 0)]
    a_init = tg.lora_init(h, first, tg.lora_target_modules(m, h.ttt_lora_targets))
    assert nll.sum().item() == pytest.approx(lora_reference(m, tokens, h, a_init), rel=1e-5)


@pytest.mark.parametrize("targets", ["q,k,v,down", "v"])
def test_lora_ttt_adapts_a_fused_qkv_model_exactly_as_an_unfused_one(targets):
    """LoRA TTT's adapters are forward hooks on q, k, v: FUSED_QKV's one GEMM would skip them, so a hooked layer's
    attention computes q, k, v through the modules' own calls. The same scores, bit for bit, as FUSED_QKV=0, with
    every projection adapted and with v alone (the fused GEMM then also drops v's hook unless it falls back)."""
    tokens = docs_stream(2)
    scores = []
    for fused in ("0", "1"):
        h = lora_h(TTT_LORA_TARGETS=targets, FUSED_QKV=fused)
        m = model(FUSED_QKV=fused)
        assert m.h.fused_qkv == (fused == "1")
        nll, adapted = lora_nll(m, tokens, h)
        assert adapted > 0
        scores.append(nll)
    assert torch.equal(scores[1], scores[0])
    plain = lora_nll(model(), tokens, lora_h(TTT_LORA_TARGETS=targets, EVAL_BUDGET_SECONDS=1e-9))[0]
    assert not torch.allclose(scores[0], plain, atol=1e-4)  # the adapters did move the scores


@pytest.mark.parametrize("kw", [{}, {"SCALE_FORMAT": "log8"}, {"HYBRID_INT": "1", "HYBRID_BITS": "4"}, {"calib": 1}])
def test_frozen_weights_score_bit_for_bit_and_leave_the_model_as_it_was(kw):
    """frozen_weights (LoRA TTT's reloaded model): the same per-token NLL exactly, for every quantizer; the weight
    is quantized once (changing the latent weight inside changes nothing); the classes come back, the buffers go."""
    m = model(**{k: v for k, v in kw.items() if k != "calib"})
    if kw.get("calib"):
        tg.enable_calibration(m)
        m.blocks[0].mlp.up.calib.copy_(torch.tensor([0.45, 1.05]))
    for p in m.parameters():
        p.requires_grad_(False)  # as lora_ttt_evaluate runs it
    classes = {name: type(mod) for name, mod in m.named_modules()}
    tokens = torch.from_numpy(docs_stream(4)[None, :33])
    x, y = tokens[:, :-1], tokens[:, 1:]
    want = m.token_nll(x, y)[0]
    with tg.frozen_weights(m):
        layers = [mod for mod in m.modules() if isinstance(mod, tg.TernaryLinear)]
        assert layers and all(isinstance(mod, tg.FrozenQuantLinear) for mod in layers)
        assert torch.equal(m.token_nll(x, y)[0], want)
        with torch.no_grad():
            for mod in layers:
                mod.weight.mul_(-1)
        assert torch.equal(m.token_nll(x, y)[0], want)  # the frozen copy, not the weight, is what scores
    assert {name: type(mod) for name, mod in m.named_modules()} == classes
    assert not any(hasattr(mod, "frozen") for mod in m.modules())
    assert not torch.allclose(m.token_nll(x, y)[0], want)  # the flipped weights score again


def lora_batch_reference(m, tokens, h, a_init, g_init=None):
    """TTT_LORA_GLOBAL and TTT_LORA_WARM_A by hand: spans in the order lora_ttt_nll takes them (longest first,
    TTT_LORA_DOCS at a time), but every running span's chunk scored by its own forward, with its own adapters plus
    the shared ones (g_init: their A; None: no shared adapter); then one Adam step for each span's adapters and one
    for the shared adapters on the sum of the spans' chunk means. With TTT_LORA_WARM_A the i-th span of a batch
    starts from the final A of the previous batch's i-th span. Returns the total NLL."""
    seq, chunk = h.train_seq_len, h.ttt_lora_chunk
    mods = tg.lora_target_modules(m, h.ttt_lora_targets)
    outs = [getattr(mod, "out_features", h.model_dim) for mod in mods]
    gmods = tg.lora_target_modules(m, h.ttt_lora_global_targets or h.ttt_lora_targets)
    spans = reference_spans(tokens, h.ttt_lora_span)
    order = np.argsort([-(last - first) for first, last, _ in spans], kind="stable")
    ga = [t[0].clone().requires_grad_() for t in g_init or []]
    gb = [torch.zeros(getattr(mod, "out_features", h.model_dim), h.ttt_lora_global_rank or h.ttt_lora_rank,
                      requires_grad=True) for mod in gmods] if g_init else []
    gopt = [torch.optim.Adam(ga + gb, lr=h.ttt_lora_global_lr, betas=(h.ttt_lora_beta1, h.ttt_lora_beta2))] if g_init else []
    total, last_a = 0.0, None
    for start in range(0, len(order), h.ttt_lora_docs):
        rows = order[start : start + h.ttt_lora_docs]
        ab = {d: ([(last_a[i][j] if last_a else t[d]).detach().clone().requires_grad_() for j, t in enumerate(a_init)],
                  [torch.zeros(o, h.ttt_lora_rank, requires_grad=True) for o in outs]) for i, d in enumerate(rows)}
        opts = [torch.optim.Adam(ab[d][0] + ab[d][1], lr=h.ttt_lora_lr, betas=(h.ttt_lora_beta1, h.ttt_lora_beta2))
                for d in rows]
        for lo_c in range(0, max(spans[d][1] - spans[d][0] + 1 for d in rows), chunk):
            loss = 0.0
            for d in rows:
                first, last, doc_first = spans[d]
                lo, hi = first + lo_c, min(first + lo_c + chunk - 1, last)
                if lo > last:
                    continue
                hooks = [mod.register_forward_hook(functools.partial(reference_delta, a, b))
                         for a, b, mod in [*zip(*ab[d], mods), *zip(ga, gb, gmods)]]
                w = max(doc_first - 1 if h.eval_doc_isolated else 0, hi - seq)
                x, y = torch.from_numpy(tokens[w:hi][None]), torch.from_numpy(tokens[w + 1 : hi + 1][None])
                nll = m.token_nll(x, y)[0][0, lo - 1 - w :]
                for hook in hooks:
                    hook.remove()
                total += nll.sum().item()
                loss = loss + nll.mean()
            for opt in [*opts, *gopt]:
                opt.zero_grad()
            loss.backward()
            with torch.no_grad():  # decoupled weight decay, before each Adam step, at each optimizer's lr
                for params, lr in [(ga + gb, h.ttt_lora_global_lr), *((ab[d][0] + ab[d][1], h.ttt_lora_lr) for d in rows)]:
                    for p in params:
                        p.mul_(1 - lr * h.ttt_lora_wd)
            for opt in [*opts, *gopt]:
                opt.step()
        if h.ttt_lora_warm_a:
            last_a = [ab[d][0] for d in rows]
    return total


@pytest.mark.parametrize("span, docs, opt", [(0, 2, {}), (7, 3, {"TTT_LORA_BETA1": 0.9, "TTT_LORA_WD": 0}),
                                             (0, 1, {"TTT_LORA_TARGETS": "q,attn,head"}),
                                             (0, 2, {"TTT_LORA_GLOBAL_RANK": 3, "TTT_LORA_GLOBAL_TARGETS": "k,up,head"})])
def test_lora_global_adapter_matches_a_hand_written_loop(span, docs, opt):
    """TTT_LORA_GLOBAL against lora_batch_reference: the same total, and not the total without it (the shared
    adapter moved later documents' scores). The last case gives the shared adapter its own rank and modules."""
    h = lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_SPAN=span, TTT_LORA_DOCS=docs, TTT_LORA_GLOBAL=1,
               TTT_LORA_GLOBAL_LR=0.03, **opt)
    tokens = docs_stream(1)
    m = model()
    nll, adapted = lora_nll(m, tokens, h)
    mods = tg.lora_target_modules(m, h.ttt_lora_targets)
    a_init = tg.lora_init(h, [a for a, _, _ in reference_spans(tokens, span)], mods)
    gmods = tg.lora_target_modules(m, opt.get("TTT_LORA_GLOBAL_TARGETS", h.ttt_lora_targets))
    g_init = tg.lora_init(h, [-1], gmods, opt.get("TTT_LORA_GLOBAL_RANK", h.ttt_lora_rank))
    assert g_init[0].shape[1] == opt.get("TTT_LORA_GLOBAL_RANK", 2)
    total = lora_batch_reference(m, tokens, h, a_init, g_init)
    assert nll.sum().item() == pytest.approx(total, rel=1e-5)
    spans_only = {k: v for k, v in opt.items() if not k.startswith("TTT_LORA_GLOBAL")}
    alone, _ = lora_nll(m, tokens, lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_SPAN=span, TTT_LORA_DOCS=docs, **spans_only))
    assert nll.sum().item() != pytest.approx(alone.sum().item(), rel=1e-4)


@pytest.mark.parametrize("docs, opt", [(1, {}), (2, {"TTT_LORA_SPAN": 7}), (2, {"TTT_LORA_GLOBAL": 1})])
def test_lora_warm_a_matches_a_hand_written_loop(docs, opt):
    """TTT_LORA_WARM_A against lora_batch_reference: the same total, and not the total without it (A carried from
    one batch of spans to the next moved the later batches' scores)."""
    h = lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_DOCS=docs, TTT_LORA_WARM_A=1, **opt)
    tokens = docs_stream(1)
    m = model()
    nll, _ = lora_nll(m, tokens, h)
    mods = tg.lora_target_modules(m, h.ttt_lora_targets)
    a_init = tg.lora_init(h, [a for a, _, _ in reference_spans(tokens, h.ttt_lora_span)], mods)
    g_init = tg.lora_init(h, [-1], mods) if h.ttt_lora_global else None
    assert nll.sum().item() == pytest.approx(lora_batch_reference(m, tokens, h, a_init, g_init), rel=1e-5)
    cold, _ = lora_nll(m, tokens, lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_DOCS=docs, **opt))
    assert not torch.allclose(nll, cold, atol=1e-3)


@pytest.mark.parametrize("docs, carry", [(2, {"TTT_LORA_GLOBAL": 1, "TTT_LORA_GLOBAL_LR": 0.03}),
                                         (1, {"TTT_LORA_WARM_A": 1})])
def test_lora_global_canary_no_score_depends_on_a_token_not_yet_scored(monkeypatch, docs, carry):
    """Black-box legality of what carries across documents (the shared adapter, or A warm-started from the last
    batch): change the token at p, scored at chunk step s. Every target scored at an earlier step, and every target
    of step s outside p's document from p on, keeps its score exactly; later documents' scores move (p was carried
    to them). Stepping before scoring fails it."""
    steps = []
    real = tg.lora_chunk_batch

    def recording(*args):
        batch = real(*args)
        steps.append(batch[3][batch[2]])  # the target positions this step scores
        return batch

    monkeypatch.setattr(tg, "lora_chunk_batch", recording)
    h = lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_DOCS=docs, **carry)
    tokens = docs_stream()
    m = model()
    before, _ = lora_nll(m, tokens, h)
    step_of = np.zeros(len(tokens), int)
    for i, pos in enumerate(steps):
        step_of[pos] = i
    first, last = tg.document_bounds(tokens, 1)
    p = 1 + 6 + 3  # mid-way through the second chunk of the first document
    d = np.searchsorted(first, p, side="right") - 1
    s, doc_first, doc_last = step_of[p], first[d], last[d]
    changed = tokens.copy()
    changed[p] = (changed[p] + 1) % 126 + 2
    after, _ = lora_nll(m, changed, h)
    pos = np.arange(1, len(tokens))
    keep = (step_of[pos] < s) | ((step_of[pos] == s) & ~((pos >= p) & (pos <= doc_last)))
    assert keep.sum() > 10 and (step_of[pos] > s).any()
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-6)
    other_later = (step_of[pos] > s) & ((pos < doc_first) | (pos > doc_last))
    assert not torch.allclose(after[other_later], before[other_later], atol=1e-4)


@pytest.mark.parametrize("opt", [{}, {"TTT_LORA_GLOBAL": 1, "TTT_LORA_GLOBAL_LR": 0.03}, {"EVAL_DOC_ISOLATED": 0},
                                 {"TTT_LORA_SPAN": 7}])
def test_lora_bucket_pads_to_few_shapes_and_scores_the_same(monkeypatch, opt):
    """TTT_LORA_BUCKET=1 (with 5-token buckets here) over 13 documents of 1-39 targets in one batch: every chunk
    step runs whole 5-token buckets and 8 rows, 16 or the bank's 13, so the pass meets fewer shapes; the padding
    is masked out, so every score is the unpadded pass's (with the shared adapter too, which padded rows also
    add). Unmasking the padding, or dropping the guard against a padded row's empty mean, fails it."""
    tokens = np.random.default_rng(4).integers(2, 128, 140)
    tokens[[0, 5, 9, 20, 22, 40, 47, 60, 61, 75, 90, 100, 118]] = 1
    env = {"EVAL_DOC_ISOLATED": 1, "TRAIN_SEQ_LEN": 32, "TTT_LORA_CHUNK": 3, "TTT_LORA_DOCS": 16, **opt}
    monkeypatch.setattr(tg, "lora_bucket_batch", functools.partial(tg.lora_bucket_batch, tokens=5))
    runs = {}
    for bucket in (0, 1):
        m, seen = recorded_model()
        runs[bucket] = (seen, *lora_nll(m, tokens, lora_h(TTT_LORA_BUCKET=bucket, **env)))
    (plain, before, adapted), (padded, after, adapted_padded) = runs[0], runs[1]
    assert len(plain) == len(padded) and adapted == adapted_padded > 0
    spans = len(tg.adapter_spans(*tg.document_bounds(tokens, 1), lora_h(**env))[0])
    banks = {min(16, spans - b) for b in range(0, spans, 16)}  # the rows of each batch of spans
    assert all(t % 5 == 0 and r in {8, 16} | banks and r >= q for (r, t), (q, _) in zip(padded, plain))
    assert len(set(padded)) < len(set(plain)) and 8 in {r for r, _ in padded}  # the 8-row bucket is used
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bucket", [0, 1])
def test_lora_shapes_replays_the_pass_and_reports_its_shapes(shards, monkeypatch, capsys, bucket):
    """scripts/lora_shapes.py replays the pass's batching: its shapes are the ones the real pass (a tiny model)
    runs, step for step; on the sample's validation shard its table counts the steps a reference computes from the
    documents' lengths alone (each batch of spans, longest first, runs as many steps as its longest span has
    chunks), and with buckets it meets fewer shapes over at least as many window tokens."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import lora_shapes

    h = lora_h(EVAL_DOC_ISOLATED=1, TRAIN_SEQ_LEN=32, TTT_LORA_CHUNK=3, TTT_LORA_DOCS=4, TTT_LORA_SPAN=11,
               TTT_LORA_BUCKET=bucket)
    tokens = docs_stream(2, n=200)
    tokens[[70, 71, 77, 120, 150, 160]] = 1
    m, seen = recorded_model()
    lora_nll(m, tokens, h)
    assert [tuple(s) for s in lora_shapes.pass_shapes(tokens, h)] == seen and len(set(seen)) > (1 if bucket else 3)
    for k, v in {"VOCAB_SIZE": "1024", "TTT_LORA_SPAN": "300", "TTT_LORA_DOCS": "3", "EVAL_DOC_ISOLATED": "1",
                 "TRAIN_SEQ_LEN": "256"}.items():
        monkeypatch.setenv(k, v)
    lora_shapes.main([str(shards / "fineweb_val_*.bin"), "--chunks", "64,32"])
    lines = capsys.readouterr().out.splitlines()
    table = [ln.split("|")[1:-1] for ln in lines if ln.startswith("| ") and ln[2].isdigit()]
    val = tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), 1024)
    first, last = tg.document_bounds(val, 1)
    spans = np.concatenate([np.minimum(300, n - np.arange(0, n, 300)) for n in last - first + 1])
    spans = np.sort(spans)[::-1]
    got = {(int(c), int(b)): (int(st), int(d), int(w.replace(",", ""))) for c, b, st, d, w in table}
    for chunk in (64, 32):
        steps = sum(int((-(-spans[i : i + 3] // chunk)).max()) for i in range(0, len(spans), 3))
        assert got[chunk, 0][0] == got[chunk, 1][0] == steps
        assert got[chunk, 1][1] <= got[chunk, 0][1] and got[chunk, 1][2] >= got[chunk, 0][2]


def test_lora_shapes_resample_draws_whole_documents(shards, monkeypatch, capsys):
    """resample_documents: at least the tokens asked for, ending with a BOS, made of whole documents of the split
    (tokens before its first BOS are none), the same for the same seed; lora_shapes.py --resample-tokens replays
    that stream (its steps are the reference's from its documents' lengths); a split without a BOS is refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import lora_shapes

    tokens = np.random.default_rng(5).integers(2, 128, 120)
    tokens[[7, 30, 31, 52, 90]] = 1  # 7 tokens before the first BOS; documents of 23, 1, 21, 38 and 30 tokens
    docs = {tuple(tokens[a:b]) for a, b in zip([7, 30, 31, 52, 90], [30, 31, 52, 90, 120])}
    out = lora_shapes.resample_documents(tokens, 500, 1, seed=3)
    assert len(out) >= 501 and out[-1] == 1 and out[0] == 1
    bos = np.flatnonzero(out == 1)
    pieces = [tuple(out[a:b]) for a, b in zip(bos[:-1], bos[1:])]
    assert set(pieces) <= docs and len(set(pieces)) == len(docs) and sum(map(len, pieces)) == len(out) - 1
    order, rng, ref = [(7, 30), (30, 31), (31, 52), (52, 90), (90, 120)], np.random.default_rng(3), []
    while sum(map(len, ref)) < 500:  # the reference draw: documents by index, in the split's order
        a, b = order[int(rng.integers(len(order)))]
        ref.append(tokens[a:b])
    assert np.array_equal(out, np.concatenate(ref + [np.array([1])]))
    assert np.array_equal(out, lora_shapes.resample_documents(tokens, 500, 1, seed=3))
    assert not np.array_equal(out[:200], lora_shapes.resample_documents(tokens, 500, 1, seed=4)[:200])
    with pytest.raises(ValueError, match="no BOS"):
        lora_shapes.resample_documents(np.full(50, 7), 100, 1)
    for k, v in {"VOCAB_SIZE": "1024", "TTT_LORA_SPAN": "300", "TTT_LORA_DOCS": "3", "EVAL_DOC_ISOLATED": "1",
                 "TRAIN_SEQ_LEN": "256"}.items():
        monkeypatch.setenv(k, v)
    lora_shapes.main([str(shards / "fineweb_val_*.bin"), "--chunks", "64", "--resample-tokens", "20000"])
    lines = capsys.readouterr().out.splitlines()
    val = lora_shapes.resample_documents(tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), 1024), 20000, 1)
    assert lines[0].startswith(f"{len(val) - 1} targets,") and len(val) - 1 >= 20000
    first, last = tg.document_bounds(val, 1)
    spans = np.sort(np.concatenate([np.minimum(300, n - np.arange(0, n, 300)) for n in last - first + 1]))[::-1]
    steps = sum(int((-(-spans[i : i + 3] // 64)).max()) for i in range(0, len(spans), 3))
    assert [int(ln.split("|")[3]) for ln in lines if ln.startswith("| 64 |")] == [steps, steps]


def test_lora_no_cudnn_keeps_the_pass_off_cudnn_attention_and_scores_the_same():
    """TTT_LORA_NO_CUDNN=1: while the pass runs, SDPA may not pick cuDNN's kernel (its flash, memory-efficient and
    math kernels stay allowed), and afterwards every backend is as it was; the scores are the pass's without it."""
    tokens = docs_stream(1)
    runs = {}
    for off in (0, 1):
        flags = torch.backends.cuda
        m, seen = recorded_model(lambda x: (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(),
                                            flags.math_sdp_enabled()))
        loss, _ = tg.lora_ttt_evaluate(m, tokens, ONE_BYTE, lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_NO_CUDNN=off), 0, 1,
                                       CPU, log=lambda line: None)
        runs[off] = (set(seen), loss)
        assert flags.cudnn_sdp_enabled() and flags.flash_sdp_enabled() and flags.math_sdp_enabled()
    assert runs[0][0] == {(True, True, True)} and runs[1][0] == {(False, True, True)}
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-6)


HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero"}


@pytest.mark.parametrize("opt", [{}, {"TTT_LORA_GLOBAL": 1}, {"TTT_LORA_BUCKET": 1, "TTT_LORA_SPAN": 4}])
def test_lora_chunk_steps_read_nothing_back_from_the_device(monkeypatch, opt):
    """The pass queues its chunk steps without waiting on the GPU: no op that hands the host a device value (.item()
    or int() of a tensor, a count, a boolean index) runs inside lora_ttt_nll, model and adapters included. Seen at
    ATen's dispatch, so it holds on CPU as on a GPU. SGD stands in for AdamW, whose step counters live on the host
    and are read there. Indexing the scores by the mask on the device, or counting it there, fails it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            indices = [i for a in args if isinstance(a, (list, tuple)) for i in a if isinstance(i, torch.Tensor)]
            if func._schema.name in HOST_READS or any(i.dtype == torch.bool for i in indices):
                reads.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tg, "lora_optimizer", lambda params, lr, h: torch.optim.SGD(params, lr=lr))
    tokens, h = docs_stream(2), lora_h(EVAL_DOC_ISOLATED=1, **opt)
    spans = tg.adapter_spans(*tg.document_bounds(tokens, 1), h)
    with HostReads():
        nll, scored, adapted = tg.lora_ttt_nll(model(), tokens, h, spans, CPU, time.perf_counter())
    assert reads == [] and scored == len(tokens) - 1 and adapted > 3 and not torch.isnan(nll).any()


@pytest.mark.parametrize("shared", [0, 1])
def test_lora_ttt_leaves_the_model_as_it_was(shared):
    h = lora_h(TTT_LORA_GLOBAL=shared)
    m = model()
    state = copy.deepcopy(m.state_dict())
    loss, bpb = tg.lora_ttt_evaluate(m, docs_stream(2), ONE_BYTE, h, 0, 1, CPU, log=lambda s: None)
    assert np.isfinite(loss) and bpb == pytest.approx(loss / np.log(2))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert not any(mod._forward_hooks for mod in m.modules())


@pytest.mark.parametrize("world, docs", [(2, 2), (3, 2), (1, 1), (1, 5)])
def test_lora_ranks_own_whole_documents_and_add_up(monkeypatch, world, docs):
    """Ranks (run one after another in this process) and batch sizes change nothing: the ranks' documents tile
    the split, and their summed NLL is the one-rank score of two documents at a time."""
    tokens = docs_stream(3, n=140)
    tokens[[70, 100, 101]] = 1
    m = model()
    h = lora_h(TTT_LORA_DOCS=docs)
    first, last = tg.document_bounds(tokens, 1)
    total, count = 0.0, 0
    for rank in range(world):
        lo, hi = tg.rank_share(len(tokens) - 1, rank, world)
        mine = (first > lo) & (first <= hi)
        spans = tg.adapter_spans(first[mine], last[mine], h)
        nll, scored, _ = tg.lora_ttt_nll(m, tokens, h, spans, CPU, time.perf_counter())
        total, count = total + nll.sum().item(), count + scored
    one, n, _ = tg.lora_ttt_nll(m, tokens, lora_h(), tg.adapter_spans(first, last, h), CPU, time.perf_counter())
    assert count == n == len(tokens) - 1
    assert total == pytest.approx(one.sum().item(), rel=1e-5)
    if world > 1:  # a rank alone (no all-reduce here) has not scored the split: the final check says so
        monkeypatch.setattr(tg.dist, "all_reduce", lambda t: None)
        with pytest.raises(RuntimeError, match="scored"):
            tg.lora_ttt_evaluate(m, tokens, ONE_BYTE, h, 0, world, CPU, log=print)


def test_lora_ttt_says_when_the_budget_cut_its_updates():
    """A pass inside its budget adapts every chunk of every span (the log's chunks: is that count); one that runs
    past EVAL_BUDGET_SECONDS scores the rest without updates, like plain windows, and says so in a line of its own
    (session 9's r65_lora_rec read as "no gain" while its log held adapted_chunks:0)."""
    tokens = docs_stream()
    for budget in (0, 1e-9):
        lines = []
        tg.lora_ttt_evaluate(model(), tokens, ONE_BYTE, lora_h(EVAL_BUDGET_SECONDS=budget), 0, 1, CPU, log=lines.append)
        adapted, chunks = (int(re.search(rf" {k}:(\d+)", lines[0]).group(1)) for k in ("adapted_chunks", "chunks"))
        if budget:
            assert adapted == 0 and len(lines) == 2
            assert f"EVAL_BUDGET_SECONDS=1e-09 ran out on rank 0: {chunks} of {chunks} chunks not adapted" in lines[1]
        else:
            assert adapted == chunks > 0 and len(lines) == 1


def test_lora_config_is_checked():
    with pytest.raises(tg.ConfigError, match="TTT_LORA_TARGETS"):
        lora_h(TTT_LORA_TARGETS="q,w")
    with pytest.raises(tg.ConfigError, match="TTT_LORA_CHUNK=17"):
        lora_h(TTT_LORA_CHUNK=17)
    with pytest.raises(tg.ConfigError, match="EMBED_DIM"):
        lora_h(EMBED_DIM=0)
    with pytest.raises(tg.ConfigError, match="EVAL_ENGRAM"):
        lora_h(EVAL_ENGRAM=1)
    with pytest.raises(tg.ConfigError, match="TTT_LORA_GLOBAL=1 .* TTT_MODE=lora"):
        lora_h(TTT_LORA_GLOBAL=1, TTT_MODE="sgd")
    for knob, value in (("TTT_LORA_GLOBAL_RANK", 16), ("TTT_LORA_GLOBAL_TARGETS", "q")):  # shapes nothing without it
        with pytest.raises(tg.ConfigError, match="shape the shared adapter: set TTT_LORA_GLOBAL=1"):
            lora_h(**{knob: value})
    with pytest.raises(tg.ConfigError, match="TTT_LORA_WARM_A=1 .* TTT_MODE=lora"):
        lora_h(TTT_LORA_WARM_A=1, TTT_MODE="sgd")
    with pytest.raises(tg.ConfigError, match="TTT_LORA_GLOBAL_TARGETS"):
        lora_h(TTT_LORA_GLOBAL=1, TTT_LORA_GLOBAL_TARGETS="q,w")
    with pytest.raises(tg.ConfigError, match="EMBED_DIM"):
        lora_h(TTT_LORA_GLOBAL=1, TTT_LORA_TARGETS="q", TTT_LORA_GLOBAL_TARGETS="head", EMBED_DIM=0)
    assert lora_h(EMBED_DIM=0, TTT_LORA_TARGETS="q,k,v,proj,up,down").ttt_lora_targets.count(",") == 5


def test_end_to_end_lora_ttt_run(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=4, TTT_ENABLED=1, TTT_MODE="lora", TTT_LORA_CHUNK=32,
                  EVAL_DOC_ISOLATED=1, TTT_LORA_GLOBAL=1)  # the two-process test below runs without the shared adapter
    assert r.returncode == 0, r.stdout + r.stderr
    assert log_values(r.stdout, "scored")[0] == 4096 and log_values(r.stdout, "adapted_chunks")[0] > 0
    assert log_values(r.stdout, "global_lr")[0] == 0.001 and log_values(r.stdout, "global_rank")[0] == 8
    assert event_bpb(r.stdout, "final_roundtrip") > 0


@pytest.mark.ddp
def test_two_process_lora_ttt(shards, tmp_path):
    """(world 2, accum 1) trains on what (world 1, accum 2) does, and a document's adapter does not depend on
    which rank runs it, so the two LoRA TTT scores agree. 17,000 validation tokens hold three documents: rank 0
    adapts the first (15,578 targets), rank 1 the other two."""
    runs = []
    for nproc, accum in ((1, 2), (2, 1)):
        (tmp_path / str(nproc)).mkdir()
        runs.append(run_train(shards, tmp_path / str(nproc), nproc=nproc, GRAD_ACCUM_STEPS=accum, ITERATIONS=4,
                              TTT_ENABLED=1, TTT_MODE="lora", TTT_LORA_CHUNK=32, MAX_VAL_TOKENS=17000))
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    assert "world_size:2" in runs[1].stdout
    one, two = (event_bpb(r.stdout, "final_roundtrip") for r in runs)
    assert two == pytest.approx(one, abs=2e-3)


@pytest.mark.ddp
def test_two_process_lora_ttt_with_the_shared_adapter(shards, tmp_path):
    """TTT_LORA_GLOBAL keeps one shared adapter per rank and no collective, though the ranks run different numbers
    of chunk steps (rank 0 one long document, rank 1 two): the run ends, every target is scored once, the score
    is finite."""
    r = run_train(shards, tmp_path, nproc=2, ITERATIONS=2, TTT_ENABLED=1, TTT_MODE="lora", TTT_LORA_CHUNK=32,
                  MAX_VAL_TOKENS=17000, TTT_LORA_GLOBAL=1, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world_size:2" in r.stdout and log_values(r.stdout, "global_lr")[0] == 0.001
    assert np.isfinite(event_bpb(r.stdout, "final_roundtrip"))


def lora_cost_log(path, config, adapted, chunks, seconds):
    """A train_gpt.py log with only what lora_cost.py reads: the banner, the config line and the lora_ttt line."""
    items = " ".join(f"{k}={v}" for k, v in config.items())
    path.write_text(f"run_id:{path.stem} world_size:1 device:cpu torch:x compile:False\nconfig {items}\n"
                    f"lora_ttt docs:6 span:300 rank:8 adapted_chunks:{adapted} chunks:{chunks} scored:99 "
                    f"seconds:{seconds}\n")


def test_lora_cost_recovers_a_known_cost_model_and_predicts_the_share(shards, tmp_path, capsys):
    """Passes whose seconds are 0.05 s a step plus 3 s per million window tokens of their own replay: lora_cost.py
    fits exactly those two, reports each pass and predicts each setting (and a --predict one) on the resampled
    share as the same model of that share's replay; a pass cut by the budget and a log without a pass are skipped
    by name; passes of a single setting, or a bad --predict, are refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import lora_cost
    import lora_shapes

    base = {"VOCAB_SIZE": 1024, "TRAIN_SEQ_LEN": 256, "EVAL_DOC_ISOLATED": 1, "TTT_LORA_SPAN": 300, "TTT_LORA_BUCKET": 1}
    split = tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), 1024)
    cost = lambda shapes: 0.05 * len(shapes) + 3e-6 * sum(r * t for r, t in shapes)  # noqa: E731
    logs = []
    for docs, chunk in [(2, 32), (3, 64), (2, 64)]:
        config = {**base, "TTT_LORA_DOCS": docs, "TTT_LORA_CHUNK": chunk}
        logs.append(tmp_path / f"d{docs}c{chunk}.txt")
        lora_cost_log(logs[-1], config, 5, 5, round(cost(lora_shapes.pass_shapes(split, lora_h(**config))), 9))
    lora_cost_log(tmp_path / "cut.txt", {**base, "TTT_LORA_DOCS": 3, "TTT_LORA_CHUNK": 32}, 4, 5, 1.0)
    (tmp_path / "train_only.txt").write_text("run_id:t world_size:1 device:cpu\nconfig VOCAB_SIZE=1024\n")
    paths = [str(p) for p in logs + [tmp_path / "cut.txt", tmp_path / "train_only.txt"]]
    lora_cost.main([str(shards / "fineweb_val_*.bin"), *paths, "--share-tokens", "30000", "--predict", "3:32"])
    out = capsys.readouterr().out
    assert out.startswith("fit over 3 passes: 0.0500 s a chunk step + 3.000 s per million window tokens")
    assert "skipped: cut (cut by EVAL_BUDGET_SECONDS), train_only (no LoRA pass)" in out
    share = lora_shapes.resample_documents(split, 30000, 1)
    rows = {tuple(int(c) for c in ln.split("|")[1:3]): float(ln.split("|")[5]) for ln in out.splitlines()
            if ln.startswith("| ") and ln[2].isdigit()}
    assert set(rows) == {(2, 32), (3, 64), (2, 64), (3, 32)}
    for (docs, chunk), predicted in rows.items():
        want = cost(lora_shapes.pass_shapes(share, lora_h(**{**base, "TTT_LORA_DOCS": docs, "TTT_LORA_CHUNK": chunk})))
        assert predicted == pytest.approx(want, abs=0.6)  # printed to whole seconds
    with pytest.raises(SystemExit, match="fewer than two independent"):
        lora_cost.main([str(shards / "fineweb_val_*.bin"), paths[0]])
    with pytest.raises(SystemExit, match="expected DOCS:CHUNK"):
        lora_cost.main([str(shards / "fineweb_val_*.bin"), *paths, "--predict", "3x32"])


def test_lora_pass_scores_the_same_with_the_triton_kernels():
    """best_known_competition.env runs its LoRA pass with XSA_KERNEL=1 and QK_NORM_KERNEL=1: through the ops'
    forward and backward (the adapters' gradients pass through them) the pass gives the per-token NLLs that the
    torch functions give. (Interpreted, one case: about 25 s.)"""
    kernels = {"XSA_KERNEL": "1", "QK_NORM_KERNEL": "1"}
    h = lora_h(EVAL_DOC_ISOLATED=1, TTT_LORA_DOCS=2, TTT_LORA_GLOBAL=1, TTT_LORA_GLOBAL_LR=0.03, TTT_LORA_BUCKET=1)
    tokens = docs_stream(1, n=60)
    (plain, adapted), (kernel, adapted_kernel) = (lora_nll(model(**k), tokens, h) for k in ({}, kernels))
    assert adapted == adapted_kernel > 0
    torch.testing.assert_close(kernel, plain, rtol=1e-5, atol=1e-6)
