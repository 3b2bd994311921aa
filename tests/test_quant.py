"""Ternary quantizer against a numpy reference, its STE gradient, and construction-time shape checks."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    # the configuration is refused before any model is built (test_model checks that this holds for every width)
    with pytest.raises(tg.ConfigError, match="GROUP_SIZE=64 does not divide MODEL_DIM=96"):
        tg.Hyperparameters({"MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "GROUP_SIZE": "64",
                            "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "EMBED_DIM": "0"})


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


def calibrated(layer, threshold, mult):
    holder = torch.nn.Sequential(layer)
    tg.enable_calibration(holder)
    layer.calib.copy_(torch.tensor([threshold, mult]))
    return layer


def test_calibrated_quantizer_at_its_defaults_is_the_plain_one():
    torch.manual_seed(0)
    plain = tg.TernaryLinear(256, 64, 32)
    cal = calibrated(tg.TernaryLinear(256, 64, 32), 0.5, 1.0)
    cal.load_state_dict(plain.state_dict())
    for a, b in zip(plain.quantize(), cal.quantize()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threshold, mult", [(0.6, 1.1), (0.4, 0.9)])
def test_calibrated_quantizer_matches_numpy(threshold, mult):
    """Non-zero where |w| > threshold x the fp16 absmean of the group; scale = fp16(mult x that absmean)."""
    torch.manual_seed(1)
    layer = calibrated(tg.TernaryLinear(128, 8, 32), threshold, mult)
    w = layer.weight.detach().numpy().astype(np.float64).reshape(8, 4, 32)
    base = np.float16(np.abs(w).mean(-1, keepdims=True)).astype(np.float64)
    want = np.sign(w) * (np.abs(w) / base > threshold)
    trits, scale = layer.quantize()
    np.testing.assert_array_equal(trits.numpy().reshape(8, 4, 32), want)
    base32 = base[..., 0].astype(np.float32)
    np.testing.assert_array_equal(scale.numpy(), np.float16(np.float32(mult) * base32).astype(np.float32))


def test_calibrated_model_exports_what_it_computes():
    """The artifact holds the calibrated trits and scales; a fresh model, its calibration at the defaults,
    reloads them exactly and gives the same logits."""
    from test_model import BASE, model

    m = model(TERNARY_CALIB="1")
    layers = [x for x in m.modules() if isinstance(x, tg.CalibratedTernaryLinear)]
    assert layers and not any(isinstance(x, tg.TernaryLinear) and not isinstance(x, tg.CalibratedTernaryLinear)
                              for x in m.modules())
    for i, layer in enumerate(layers):
        layer.calib.copy_(torch.tensor([(0.4, 0.55, 0.6)[i % 3], (0.9, 1.1, 1.05)[i % 3]]))
    ternary = {id(x.weight) for x in layers}
    with torch.no_grad():  # the other parameters travel as fp16: make them fp16-exact to compare exactly
        for p in m.parameters():
            if id(p) not in ternary:
                p.copy_(p.half().float())
    h = tg.Hyperparameters({**BASE, "TERNARY_CALIB": "1"})
    fresh = tg.GPT(h)
    fresh.load_state_dict(tg.deserialize_state(tg.serialize_model(m, h), h))
    assert all(torch.equal(x.calib, torch.tensor([0.5, 1.0])) for x in fresh.modules() if hasattr(x, "calib"))
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    m.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.logits(idx)[0], m.logits(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("calib", [False, True])
def test_fp_phase_blend_is_the_latent_weight_then_exactly_ternary(calib):
    """FP_PHASE: q = 0 computes with the latent weight itself, q = 1 bit for bit what the plain (or calibrated)
    TernaryLinear computes, q in between the blend (1 - q) w + q wq; the gradient is straight through at every q."""
    torch.manual_seed(2)
    layer = tg.TernaryLinear(64, 16, 32)
    holder = torch.nn.Sequential(layer)
    if calib:
        tg.enable_calibration(holder)
        layer.calib.copy_(torch.tensor([0.6, 1.1]))
    plain = type(layer)(64, 16, 32)  # the class before the FP phase: the reference for q = 1
    plain.load_state_dict(layer.state_dict())
    if calib:
        plain.register_buffer("calib", layer.calib.clone(), persistent=False)
    mix = tg.QuantMix(holder)
    assert isinstance(layer, tg.FPPhaseLinear) and isinstance(layer, tg.CalibratedTernaryLinear) == calib
    assert "quant_mix" not in layer.state_dict()  # never exported
    w = layer.weight.detach().clone()
    wq = tg.dequantize_ternary(*plain.quantize(), 32)
    x, upstream = torch.randn(5, 64), torch.randn(5, 16)
    for q, want in ((0.0, x @ w.T), (1.0, plain(x).detach()), (0.25, x @ (0.75 * w + 0.25 * wq).T)):
        mix.set(q)
        layer.weight.grad = None
        y = layer(x)
        (y * upstream).sum().backward()
        if q == 1.0:
            assert torch.equal(y.detach(), want)
        else:
            torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight.grad, upstream.T @ x, rtol=1e-5, atol=1e-5)
    assert (x @ w.T - plain(x)).abs().max() > 0.1  # the two phases really compute different things


@pytest.mark.parametrize("kind", ["int", "log8"])
def test_fp_phase_keeps_each_layers_own_quantizer(kind):
    """FP_PHASE with HYBRID_INT or SCALE_FORMAT=log8: the blend goes towards the layer's own quantized weight (int
    rows, log8 scales), never the plain ternary one, and finish() gives back the layer's own class, which then
    computes bit for bit what a layer that never had an FP phase computes."""
    torch.manual_seed(3)
    holder = torch.nn.Sequential(tg.TernaryLinear(64, 16, 32))
    if kind == "int":
        holder[0].__class__, holder[0].bits = tg.IntQATLinear, 4  # as enable_int_linear makes a block's matrix
    else:
        tg.enable_log8_scales(holder)
    layer, plain_cls = holder[0], type(holder[0])
    plain = copy.deepcopy(layer)
    own = plain.dequantized()
    assert (own - tg.dequantize_ternary(*tg.ternary_quantize(layer.weight.detach(), 32), 32)).abs().max() > 1e-3
    mix = tg.QuantMix(holder)
    x = torch.randn(5, 64)
    mix.set(0.0)
    torch.testing.assert_close(layer(x), x @ layer.weight.detach().T, rtol=1e-5, atol=1e-6)
    mix.set(1.0)
    torch.testing.assert_close(layer(x).detach(), x @ own.T, rtol=1e-5, atol=1e-5)
    mix.finish()
    assert type(layer) is plain_cls and torch.equal(layer(x), plain(x))


def test_quant_mix_fills_only_on_change():
    holder = torch.nn.Sequential(tg.TernaryLinear(32, 8, 32), tg.TernaryLinear(32, 8, 32))
    mix = tg.QuantMix(holder)
    assert [m.quant_mix.item() for m in holder] == [1.0, 1.0] and mix.value == 1.0  # ternary until told otherwise
    mix.set(0.0)
    assert [m.quant_mix.item() for m in holder] == [0.0, 0.0]
    holder[0].quant_mix.fill_(7.0)  # a set to the value it already has touches no buffer
    mix.set(0.0)
    assert holder[0].quant_mix.item() == 7.0
    mix.set(0.5)
    assert [m.quant_mix.item() for m in holder] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# FP8_MATMUL: the training forward's ternary matmuls in e4m3 at 1x128 block scales

def ternary_weight(rows, cols, seed=0):
    """trits x one positive scale per row and group of 128 columns, as TernaryLinear's quantizer gives them."""
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (rows, cols), generator=g).float()
    scales = torch.rand(rows, cols // 128, generator=g) + 0.05
    return (trits.unflatten(-1, (-1, 128)) * scales[..., None]).flatten(-2)


def test_fp8_blocks_carry_a_ternary_weight_exactly_and_other_values_to_e4m3_precision():
    w = ternary_weight(6, 256)
    q, s = tg.fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 2)
    assert set(q.float().unique().tolist()) <= {-448.0, 0.0, 448.0}
    assert torch.equal(tg.fp8_dequantize(q, s), w)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 5)[:, None]
    q, s = tg.fp8_blocks(x)
    amax = np.abs(x.numpy().reshape(5, 3, 128)).max(-1)  # numpy: each block's absmax over e4m3's largest, 448
    np.testing.assert_allclose(s.numpy(), amax / 448.0, rtol=1e-6)
    err = np.abs(tg.fp8_dequantize(q, s).numpy() - x.numpy()).reshape(5, 3, 128)
    assert (err <= 2.0**-4 * amax[..., None]).all()  # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a binade
    assert err.max() > 0  # and random values are rounded


def test_fp8_matmul_is_the_product_of_the_dequantized_operands():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 256, generator=g), ternary_weight(5, 256, seed=3)
    (xq, xs), (wq, ws) = tg.fp8_blocks(x), tg.fp8_blocks(w)
    deq = lambda q, s: q.float().numpy().reshape(q.shape[0], -1, 128) * s.numpy()[..., None]  # noqa: E731
    want = deq(xq, xs).reshape(7, 256).astype(np.float64) @ deq(wq, ws).reshape(5, 256).astype(np.float64).T
    got = tg.fp8_matmul(x, w)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
    exact = (x.numpy() @ w.numpy().T)  # against the unquantized product: only x's e4m3 rounding and bf16 remain
    assert np.abs(got.float().numpy() - exact).max() < 0.05 * np.abs(exact).max()


def test_fp8_matmul_function_forward_is_exact_on_representable_inputs_and_backward_is_bf16s():
    g = torch.Generator().manual_seed(4)
    w = ternary_weight(6, 256, seed=5).requires_grad_()
    x = torch.randint(-2, 3, (2, 3, 256), generator=g).float()
    x[..., 0], x[..., 128] = 2.0, -2.0  # every block's absmax is 2, so each entry maps to 0, +-224 or +-448 exactly
    x.requires_grad_()
    y = tg.FP8Matmul.apply(x, w)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 6)
    ref = F.linear(x.detach(), w.detach())
    torch.testing.assert_close(y, ref.bfloat16().float(), rtol=0, atol=0)
    gy = torch.randn(2, 3, 6, generator=g)
    y.backward(gy)
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    F.linear(xb, wb).backward(gy.bfloat16())  # the bf16 path under autocast
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=1e-2, atol=1e-2)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_set_fp8_matmuls_switches_only_ternary_layers_and_back():
    cfg = {"VOCAB_SIZE": "128", "NUM_LAYERS": "2", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "EMBED_DIM": "32", "GROUP_SIZE": "64", "MLP_MULT": "2", "HYBRID_INT": "1", "HYBRID_FAMILIES": "k"}
    torch.manual_seed(0)
    m = tg.GPT(tg.Hyperparameters(cfg))
    for mod in m.modules():
        if isinstance(mod, tg.TernaryLinear):
            torch.nn.init.normal_(mod.weight, std=mod.in_features**-0.5)  # no zero-init projection hides a matmul
    idx = torch.randint(0, 128, (2, 16))
    before = m(idx, idx).detach()
    tg.set_fp8_matmuls(m, tg.FP8Matmul)
    layers = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, tg.TernaryLinear)]
    assert layers and all(("matmul" in mod.__dict__) == mod.ternary for _, mod in layers)
    assert any(not mod.ternary for _, mod in layers)  # HYBRID_INT's k matrices stay in F.linear
    fp8 = m(idx, idx).detach()
    assert not torch.equal(fp8, before) and abs(float(fp8) - float(before)) < 0.05 * abs(float(before))
    tg.set_fp8_matmuls(m, None)
    assert all("matmul" not in mod.__dict__ for _, mod in layers)
    assert torch.equal(m(idx, idx).detach(), before)
    with pytest.raises(tg.ConfigError, match="64->64, not blocks of 128"):
        tg.set_fp8_matmuls(tg.GPT(tg.Hyperparameters({**cfg, "MODEL_DIM": "64", "GROUP_SIZE": "32"})), tg.FP8Matmul)


def test_scaled_mm_op_registers_once_and_has_its_shape_for_the_compiler():
    """The CUDA GEMM is a custom op (inductor calls it, rather than lowering _scaled_mm's blockwise scales): one
    registration per process, however many copies of the trainer load, and a fake kernel with the product's shape."""
    import importlib.util

    from torch._subclasses.fake_tensor import FakeTensorMode

    op = tg.scaled_mm_op()
    spec = importlib.util.spec_from_file_location("train_gpt_copy", tg.__file__)
    copy_of = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy_of)
    assert tg.scaled_mm_op() is op and copy_of.scaled_mm_op() is op
    with FakeTensorMode():
        y = op(torch.empty(64, 256, dtype=torch.float8_e4m3fn), torch.empty(64, 2),
               torch.empty(32, 256, dtype=torch.float8_e4m3fn), torch.empty(32, 2))
    assert y.shape == (64, 32) and y.dtype == torch.bfloat16


def test_fp8_layer_compiles_into_one_graph_with_eager_numbers():
    """torch.compile traces a TernaryLinear in FP8Matmul whole (fullgraph: no break at the autograd Function, the
    e4m3 casts or the autocast query), and AOT autograd gives eager's loss and gradients."""
    torch.manual_seed(0)
    lin = tg.TernaryLinear(256, 128, 128)
    lin.matmul = tg.FP8Matmul.apply
    x = torch.randn(4, 16, 256)
    grads = []
    for fn in (lambda t: lin(t).square().sum(),
               torch.compile(lambda t: lin(t).square().sum(), backend="aot_eager", fullgraph=True)):
        lin.weight.grad = None
        xi = x.clone().requires_grad_()
        loss = fn(xi)
        loss.backward()
        grads.append((loss.detach(), xi.grad, lin.weight.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_fp8_dgrad_input_gradient_is_the_e4m3_product_and_weight_gradient_stays_bf16():
    """FP8DgradMatmul: the forward as FP8Matmul's, the input gradient fp8_matmul(gy, w.T) (gy in blocks of 128
    outputs, w.T in blocks of 128 rows), the weight gradient the bf16 path's. Switching it on needs whole blocks of
    outputs too, and FP8_DGRAD needs FP8_MATMUL."""
    g = torch.Generator().manual_seed(6)
    w = ternary_weight(256, 384, seed=7).requires_grad_()
    x = torch.randn(2, 5, 384, generator=g).requires_grad_()
    y = tg.FP8DgradMatmul.apply(x, w)
    torch.testing.assert_close(y, tg.FP8Matmul.apply(x.detach(), w.detach()), rtol=0, atol=0)
    gy = torch.randn(2, 5, 256, generator=g)
    y.backward(gy)
    want = tg.fp8_matmul(gy.reshape(10, 256).bfloat16(), w.detach().t().contiguous()).float().reshape(2, 5, 384)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    exact = gy @ w.detach()
    assert 0 < (x.grad - exact).abs().max() < 0.05 * exact.abs().max()  # rounded, and close
    wb = w.detach().bfloat16().requires_grad_()
    F.linear(x.detach().bfloat16(), wb).backward(gy.bfloat16())
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=1e-2, atol=1e-2)
    lin = tg.TernaryLinear(128, 64, 64)
    tg.set_fp8_matmuls(lin, tg.FP8Matmul)
    assert lin.matmul == tg.FP8Matmul.apply
    with pytest.raises(tg.ConfigError, match="128->64, not blocks of 128"):
        tg.set_fp8_matmuls(lin, tg.FP8DgradMatmul)
    square = tg.TernaryLinear(128, 128, 64)
    tg.set_fp8_matmuls(square, tg.FP8DgradMatmul)
    assert square.matmul == tg.FP8DgradMatmul.apply
    with pytest.raises(tg.ConfigError, match="FP8_DGRAD=1 .* needs FP8_MATMUL=1"):
        tg.Hyperparameters({"FP8_DGRAD": "1"})


def test_fp8_wgrad_weight_gradient_is_the_e4m3_product_over_token_blocks():
    """FP8WgradMatmul: forward and input gradient as FP8DgradMatmul's, the weight gradient fp8_matmul(gy.T, x.T)
    (both in blocks of 128 tokens); FP8_WGRAD needs FP8_DGRAD and a TRAIN_SEQ_LEN of whole blocks."""
    g = torch.Generator().manual_seed(8)
    w = ternary_weight(128, 256, seed=9).requires_grad_()
    x = torch.randn(2, 128, 256, generator=g).requires_grad_()
    gy = torch.randn(2, 128, 128, generator=g)
    tg.FP8WgradMatmul.apply(x, w).backward(gy)
    xd, wd = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    tg.FP8DgradMatmul.apply(xd, wd).backward(gy)
    torch.testing.assert_close(x.grad, xd.grad, rtol=0, atol=0)
    g2 = gy.reshape(256, 128).bfloat16()
    want = tg.fp8_matmul(g2.t().contiguous(), x.detach().reshape(256, 256).t().contiguous()).float()
    torch.testing.assert_close(w.grad, want, rtol=0, atol=0)
    exact = g2.float().t() @ x.detach().reshape(256, 256)
    assert 0 < (w.grad - exact).abs().max() < 0.05 * exact.abs().max()  # rounded, and close
    with pytest.raises(tg.ConfigError, match="FP8_WGRAD=1 .* needs FP8_DGRAD=1"):
        tg.Hyperparameters({"FP8_MATMUL": "1", "FP8_WGRAD": "1"})
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN=96 in whole blocks of 128"):
        tg.Hyperparameters({"FP8_MATMUL": "1", "FP8_DGRAD": "1", "FP8_WGRAD": "1", "TRAIN_SEQ_LEN": "96"})


def test_check_fp8_matmul_stops_a_gemm_that_is_missing_or_off(monkeypatch):
    """Before training, the device's product is checked against the emulation: a GEMM that raises, or one off by
    more than bf16's rounding, is a ConfigError naming FP8_MATMUL; the emulation against itself passes. (On the CPU
    both sides are the emulation; the fakes stand in for the device's first call.)"""
    real, calls = tg.fp8_matmul, []

    def device_then_real(fault):
        def fn(x, w):
            calls.append(1)
            return fault(real(x, w)) if len(calls) % 2 == 1 else real(x, w)
        return fn

    tg.check_fp8_matmul(torch.device("cpu"))
    monkeypatch.setattr(tg, "fp8_matmul", device_then_real(lambda y: y * 1.02))
    with pytest.raises(tg.ConfigError, match="FP8_MATMUL=1: the GPU's FP8 GEMM is off its emulation by 0.02"):
        tg.check_fp8_matmul(torch.device("cpu"))

    def missing(y):
        raise RuntimeError("blockwise scaling is not supported")
    monkeypatch.setattr(tg, "fp8_matmul", device_then_real(missing))
    with pytest.raises(tg.ConfigError, match="needs blockwise-scaled FP8 GEMMs .*: blockwise scaling is not supported"):
        tg.check_fp8_matmul(torch.device("cpu"))
