"""Ternary quantizer against a numpy reference, its STE gradient, and construction-time shape checks."""
import numpy as np
import pytest
import torch

import train_gpt as tg


def numpy_ternary(w, group):
    """Slow reference: per (row, group) absmean scale rounded to fp16, trits = clip(round(w / scale))."""
    rows, cols = w.shape
    trits, scales = np.zeros_like(w), np.zeros((rows, cols // group), np.float32)
    for r in range(rows):
        for g in range(cols // group):
            block = w[r, g * group : (g + 1) * group].astype(np.float64)
            s = np.float32(np.float16(max(np.abs(block).mean(), tg.SCALE_EPS)))
            scales[r, g] = s
            trits[r, g * group : (g + 1) * group] = np.clip(np.round(block / np.float64(s)), -1, 1)
    return trits, scales


@pytest.mark.parametrize("shape, group", [((8, 64), 16), ((5, 96), 32), ((3, 128), 128)])
def test_quantizer_matches_numpy(shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
    w[0, :group] = 0.0  # an all-zero group takes the epsilon scale and all-zero trits
    trits, scale = tg.ternary_quantize(w, group)
    ref_t, ref_s = numpy_ternary(w.numpy(), group)
    np.testing.assert_array_equal(scale.numpy(), ref_s)
    mismatch = (trits.numpy() != ref_t).mean()
    assert mismatch < 1e-3  # only exact .5 ties of fp32 vs fp64 division may differ
    assert set(np.unique(trits.numpy())) <= {-1.0, 0.0, 1.0}
    assert (trits[0, :group] == 0).all()
    deq = tg.dequantize_ternary(trits, scale, group)
    np.testing.assert_allclose(deq.numpy(), ref_t * np.repeat(ref_s, group, axis=1), rtol=0, atol=0)


def test_trit_distribution_is_balanced_for_gaussian_weights():
    trits, _ = tg.ternary_quantize(torch.randn(256, 256), 128)
    zero_frac = (trits == 0).float().mean().item()
    # absmean of N(0,1) is 0.798: |w| < 0.399 has probability ~0.31
    assert 0.28 < zero_frac < 0.34


def test_ste_gradient_is_identity():
    layer = tg.TernaryLinear(32, 8, group_size=16)
    x = torch.randn(4, 32)
    upstream = torch.randn(4, 8)
    (layer(x) * upstream).sum().backward()
    # y = x Wq^T with dWq/dW treated as identity: dL/dW = upstream^T x
    torch.testing.assert_close(layer.weight.grad, upstream.T @ x, rtol=1e-5, atol=1e-5)
    wq = layer.quantized_weight().detach()
    torch.testing.assert_close(layer(x), x @ wq.T)


def test_group_size_mismatch_fails_at_construction():
    with pytest.raises(tg.ConfigError, match=r"TernaryLinear\(100->8\).*GROUP_SIZE=32"):
        tg.TernaryLinear(100, 8, group_size=32)
    h = tg.Hyperparameters({"MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "GROUP_SIZE": "64",
                            "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "EMBED_DIM": "0"})
    with pytest.raises(tg.ConfigError, match="GROUP_SIZE=64"):
        tg.GPT(h)


def test_small_params_stay_fp32_and_compute_is_bf16_under_autocast():
    layer = tg.TernaryLinear(64, 16, group_size=32)
    assert layer.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 64))
    assert y.dtype == torch.bfloat16


def test_master_from_export_requantizes_exactly():
    w = torch.randn(16, 64) * 0.02
    trits, scale = tg.ternary_quantize(w, 32)
    master = tg.ternary_master_from_export(trits.to(torch.int8), scale, 32)
    t2, s2 = tg.ternary_quantize(master, 32)
    assert torch.equal(t2, trits) and torch.equal(s2, scale)
