"""Model: shapes, attention against a slow reference, RoPE, causality, U-Net skips, losses."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

BASE = {"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2"}


def model(**overrides):
    torch.manual_seed(0)
    m = tg.GPT(tg.Hyperparameters({**BASE, **overrides}))
    with torch.no_grad():  # zero-init projections would make every block an identity: perturb them
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def reference_attention(q, k, v):
    """Slow loop: softmax(q k^T / sqrt(d)) v over positions <= t, kv head = head // group."""
    B, T, H, D = q.shape
    group = H // k.size(2)
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = torch.tensor([float(q[b, t, h] @ k[b, s, h // group]) / math.sqrt(D) for s in range(t + 1)])
                w = torch.softmax(scores.double(), 0)
                out[b, t, h] = sum(w[s] * v[b, s, h // group].double() for s in range(t + 1))
    return out


def test_sdpa_gqa_matches_reference():
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    got = tg.causal_attention(q, k, v, None)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_partial_rope_rotates_only_first_dims_and_preserves_norm():
    rot = tg.Rotary(head_dim=8, dims=4, base=10000.0)
    x = torch.randn(1, 5, 2, 8)
    y = rot(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
    # relative: <R_m q, R_n k> depends on m - n only
    q, k = torch.randn(8), torch.randn(8)
    seq_q, seq_k = q.expand(1, 6, 1, 8).clone(), k.expand(1, 6, 1, 8).clone()
    rq, rk = rot(seq_q)[0, :, 0], rot(seq_k)[0, :, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[5] @ rk[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"EMBED_DIM": "0", "MLP_ACT": "leaky_relu2", "ROPE_DIMS": "8"}])
def test_shapes_and_causality(overrides):
    m = model(**overrides).eval()
    idx = torch.randint(0, 128, (2, 16))
    logits = m.logits(idx)[0]
    assert logits.shape == (2, 16, 128)
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 128, (2, 7))
    logits2 = m.logits(changed)[0]
    torch.testing.assert_close(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


def test_unet_skips_and_softcap():
    m = model(NUM_LAYERS="5", LOGIT_SOFTCAP="2.0")
    assert m.num_encoder == 2 and m.skip_weights.shape == (2, 64)
    logits = m.logits(torch.randint(0, 128, (1, 8)))[0]
    assert logits.abs().max() <= 2.0
    # the skip weights are used: zeroing them changes the output
    idx = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        m.skip_weights.fill_(1.0)
        a = m.logits(idx)[0]
        m.skip_weights.zero_()
        b = m.logits(idx)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("layers", ["4", "5"])
def test_losses_match_definitions_and_all_params_get_gradients(layers):
    m = model(Z_LOSS="0.01", NUM_LAYERS=layers)
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    loss = m(idx, tgt)
    logits = m.logits(idx)[0].reshape(-1, 128)
    ce = F.cross_entropy(logits, tgt.reshape(-1))
    torch.testing.assert_close(loss, ce + 0.01 * torch.logsumexp(logits, -1).square().mean())
    torch.testing.assert_close(m.token_nll(idx, tgt)[0].mean(), ce)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing  # DDP needs every parameter in the graph, odd depth included


def test_param_count_and_ternary_share():
    m = model()
    total, ternary = tg.count_params(m)
    # per block: q 64x64, k/v 32x64 each, proj 64x64, mlp up 128x64 and down 64x128
    per_block = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2
    assert ternary == 4 * per_block
    assert total == ternary + 128 * 32 + 2 * 32 * 64 + 4 * (4 * 64 + 4) + 2 * 64 + 64


def test_attention_backend_resolution(monkeypatch):
    import sys
    import types

    for module in tg.FLASH_MODULES.values():
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes the import fail
    assert tg.resolve_attention("auto") == ("sdpa", None)
    with pytest.raises(tg.ConfigError, match="ATTN_IMPL=fa3 but flash_attn_interface is not importable"):
        tg.resolve_attention("fa3")
    fake = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal: q)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert tg.resolve_attention("auto") == ("fa2", fake.flash_attn_func)
    assert tg.resolve_attention("sdpa") == ("sdpa", None)
