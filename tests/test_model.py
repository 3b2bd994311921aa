"""Model: shapes, attention against a slow reference, RoPE, causality, U-Net skips, losses."""
import contextlib
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

BASE = {"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2",
        "EXPORT_EMBED": "fp16", "EXPORT_FLOAT": "fp16"}  # lossless float export: the exact round-trip tests need it


def model(base=BASE, **overrides):
    torch.manual_seed(0)
    m = tg.GPT(tg.Hyperparameters({**base, **overrides}))
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


def test_rope_dims_default_rotates_half_of_the_default_head_and_all_of_a_narrower_one():
    """ROPE_DIMS's default, 64, rotates 64 of the default head's 128 channels (session 12: 1.2872 / 1.2849 against
    full RoPE's 1.2929 / 1.2937 on seeds 1337 / 42); under the default a narrower head rotates whole, as before.
    An explicit value wider than the head, or odd, is refused; 0 rotates the whole head."""
    h = tg.Hyperparameters({})
    assert (h.head_dim, h.rope_rotated) == (128, 64)
    attn = tg.CausalSelfAttention(h, None)
    x = torch.randn(1, 5, 2, 128)
    y = attn.rotary(x)
    assert attn.rotary.dims == 64 and torch.equal(y[..., 64:], x[..., 64:])
    assert not torch.allclose(y[:, 1:, :, :64], x[:, 1:, :, :64])
    assert tg.Hyperparameters({"ROPE_DIMS": "0"}).rope_rotated == 128
    assert model().blocks[0].mixer.rotary.dims == 16  # BASE's head is 16 wide
    assert model(ROPE_DIMS="8").blocks[0].mixer.rotary.dims == 8
    assert tg.Hyperparameters({**BASE, "ROPE_DIMS": "0"}).rope_rotated == 16
    for bad in ("32", "7"):
        with pytest.raises(tg.ConfigError, match=f"ROPE_DIMS={bad} must be even and <= head dim 16"):
            tg.Hyperparameters({**BASE, "ROPE_DIMS": bad})


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


def plain_softcap_loss(x, weight, targets, cap, z_loss):
    """The unfused objective, as GPT.logits and GPT.forward compute it, differentiated by autograd."""
    logits = F.linear(x, weight.to(x.dtype)).float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets) + z_loss * torch.logsumexp(logits, -1).square().mean()


@pytest.mark.parametrize("cap, z_loss", [(5.0, 0.0), (0.0, 0.0), (5.0, 0.01)])
def test_fused_loss_matches_the_plain_loss_and_its_gradients(cap, z_loss):
    """FusedSoftcapCrossEntropy against autograd through the plain path: 37 rows in chunks of 8 (a short last
    chunk), logits of a few units so the cap bends them, and a loss scaled by 3 (the backward scales by it)."""
    torch.manual_seed(0)
    x, w = torch.randn(37, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    tgt = torch.randint(0, 50, (37,))
    ref = plain_softcap_loss(x, w, tgt, cap, z_loss)
    want = torch.autograd.grad(3 * ref, (x, w))
    got = tg.FusedSoftcapCrossEntropy.apply(x, w, tgt, cap, z_loss, 8)
    grads = torch.autograd.grad(3 * got, (x, w))
    assert got.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32] * 2
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_fused_loss_keeps_the_inputs_dtypes_and_the_bf16_gemms_under_autocast():
    """Under bf16 autocast (CPU's, standing in for training's CUDA one) the GEMMs run in bf16 as F.linear's do: the
    loss and x's gradient match the plain path's to rounding, the weight's (fp32 over chunks, where the plain path
    rounds its one GEMM to bf16) to bf16's precision; the gradients come back in the inputs' dtypes."""
    torch.manual_seed(0)
    x = torch.randn(300, 64, dtype=torch.bfloat16, requires_grad=True)
    w, tgt = (torch.randn(256, 64) * 0.3).requires_grad_(), torch.randint(0, 256, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain_softcap_loss(x, w, tgt, 20.0, 0.0)
        got = tg.FusedSoftcapCrossEntropy.apply(x, w, tgt, 20.0, 0.0, 128)
    want, grads = torch.autograd.grad(ref, (x, w)), torch.autograd.grad(got, (x, w))
    assert got.dtype == torch.float32 and (grads[0].dtype, grads[1].dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], want[0], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grads[1], want[1], rtol=1e-2, atol=2e-2 * want[1].abs().max().item())


def loss_and_grads(m, idx, tgt):
    """GPT.forward's loss and every parameter's gradient after its backward."""
    loss = m(idx, tgt)
    loss.backward()
    return loss, {n: p.grad for n, p in m.named_parameters()}


def compiled_loss_and_grads(m, idx, tgt):
    """loss_and_grads through torch.compile (aot_eager, fullgraph: a graph break fails), the gradients by m's own
    parameter names."""
    loss = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)(idx, tgt)
    loss.backward()
    return loss, {n: p.grad for n, p in m.named_parameters()}


def assert_same_loss_and_grads(got, want):
    """Two (loss, gradients) of loss_and_grads: the same loss and the same gradient for every parameter."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert want[1].keys() == got[1].keys()
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("overrides", [{}, {"EMBED_DIM": "0", "LOGIT_SOFTCAP": "0", "Z_LOSS": "0.01"},
                                       {"EMBED_QAT": "1", "EXPORT_EMBED": "int6", "LOGIT_SOFTCAP": "2"},
                                       {"MOE_ENABLED": "1", "MOE_EXPERTS": "4"}])
def test_fused_loss_trains_the_same_model(overrides):
    """FUSED_LOSS=1 gives GPT.forward's loss and every parameter's gradient as FUSED_LOSS=0 does (same init), with
    the factored head (embed_out), without cap and with z-loss, through EMBED_QAT's rounded weight, and with an
    auxiliary loss (MoE's balance) added."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    runs = [loss_and_grads(model(FUSED_LOSS=fused, **overrides), idx, tgt) for fused in ("0", "1")]
    assert_same_loss_and_grads(runs[1], runs[0])


def softcap_ce_float64(logits, targets, cap):
    """(nll, lse) per row of cap * tanh(logits / cap) (the logits at cap 0), written out in float64."""
    z = logits.double()
    if cap:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(1, targets[:, None])[:, 0], lse


# tanh's exp overflows to inf for the saturated row by design (tanh is then exactly -1): numpy, the interpreter's, warns
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("vocab, cap, dtype", [(300, 2.5, torch.float32), (256, 0.0, torch.float32),
                                               (300, 15.0, torch.bfloat16)])
def test_softcap_ce_kernel_matches_the_formulas_in_float64(vocab, cap, dtype, monkeypatch):
    """CE_KERNEL's op and its backward against softcap_ce_float64 (gradients by float64 autograd, for random upstream
    gradients of both nll and lse): a vocabulary in blocks that do not divide it (300 in 128s: masked lanes) and one
    that they do, with and without the cap, fp32 and bf16 logits, rows with logits large enough that tanh saturates
    and one whose target is its largest logit. A loss that uses only nll (no z-loss) still gets its gradient."""
    tg.softcap_ce_kernels()
    monkeypatch.setattr(tg, "CE_BLOCK", 128)
    torch.manual_seed(0)
    logits = (torch.randn(37, vocab) * 3).to(dtype)
    logits[3] *= 40  # |x| up to ~400: tanh at +-1
    targets = torch.randint(0, vocab, (37,))
    targets[5] = logits[5].argmax()
    logits.requires_grad_()
    nll, lse = torch.ops.ternary_golf.softcap_ce(logits, targets, cap)
    g_nll, g_lse = torch.randn(37), torch.randn(37)
    got = (nll, lse, *torch.autograd.grad((nll, lse), logits, (g_nll, g_lse)))
    x64 = logits.detach().double().requires_grad_()
    want = softcap_ce_float64(x64, targets, cap)
    want = (*want, *torch.autograd.grad(want, x64, (g_nll.double(), g_lse.double())))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
    for g, w, kind in zip(got, want, (torch.float32, torch.float32, dtype)):
        assert g.shape == w.shape and g.dtype == kind
        torch.testing.assert_close(g.double(), w.detach(), rtol=tol, atol=tol * w.abs().max().item())
    only_nll = torch.autograd.grad(torch.ops.ternary_golf.softcap_ce(logits, targets, cap)[0].sum(), logits)[0]
    want_nll = torch.autograd.grad(softcap_ce_float64(x64, targets, cap)[0].sum(), x64)[0]
    torch.testing.assert_close(only_nll.double(), want_nll, rtol=tol, atol=tol * want_nll.abs().max().item())


@pytest.mark.parametrize("overrides", [{}, {"EMBED_DIM": "0", "LOGIT_SOFTCAP": "0", "Z_LOSS": "0.01"},
                                       {"Z_LOSS": "0.001", "MOE_ENABLED": "1", "MOE_EXPERTS": "4"}])
def test_ce_kernel_trains_the_same_model(overrides):
    """CE_KERNEL=1 gives GPT.forward's loss and every parameter's gradient as CE_KERNEL=0 does (same init, fp32): with
    the factored head and the cap, without either and with z-loss, with both and an auxiliary loss (MoE's balance);
    and the same under torch.compile (aot_eager, fullgraph)."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    want = loss_and_grads(model(**overrides), idx, tgt)
    assert_same_loss_and_grads(loss_and_grads(model(CE_KERNEL="1", **overrides), idx, tgt), want)
    assert_same_loss_and_grads(compiled_loss_and_grads(model(CE_KERNEL="1", **overrides), idx, tgt), want)


def test_ce_kernel_refuses_fused_loss():
    with pytest.raises(tg.ConfigError, match="CE_KERNEL=1 with FUSED_LOSS=1"):
        tg.Hyperparameters({"CE_KERNEL": "1", "FUSED_LOSS": "1"})
    assert tg.Hyperparameters({"CE_KERNEL": "1"}).ce_kernel and not tg.Hyperparameters({}).ce_kernel


def relu2_mlp_float64(x, w_up, w_down):
    """The dense MLP with relu^2, a w_down^T for a = relu(x w_up^T)^2, written out in float64."""
    return F.relu(x.double() @ w_up.double().t()).square() @ w_down.double().t()


@pytest.mark.parametrize("rows, dtype", [(200, torch.float32), (128, torch.float32), (600, torch.float32),
                                         (70, torch.float16)])
def test_relu2_mlp_kernel_matches_the_formulas_in_float64(rows, dtype):
    """MLP_KERNEL's op and its backward against float64 autograd, for a random upstream gradient: tokens in row
    blocks that do not divide them (200, 600 and 70 in 128s: the descriptors pad and clip) and that do, two column
    blocks of the hidden width, about half of its units below zero; the interpreter's 3 programs walk 2 tiles (200)
    and 4 (600: 10 tiles, 12 slots, spare programs on the last round); fp32 and fp16 (Triton's interpreter gets
    bf16's dot wrong). The output and all three gradients, and the stored activations a: exactly zero wherever relu
    cuts."""
    tg.mlp_kernels()
    torch.manual_seed(0)
    x = torch.randn(rows, 64).to(dtype).requires_grad_()
    w_up = (torch.randn(512, 64) / 8).to(dtype).requires_grad_()
    w_down = (torch.randn(64, 512) / 16).to(dtype).requires_grad_()
    g = torch.randn(rows, 64).to(dtype)
    out = tg.Relu2MLP.apply(x, w_up, w_down)
    got = (out, *torch.autograd.grad(out, (x, w_up, w_down), g))
    leaves = [t.detach().double().requires_grad_() for t in (x, w_up, w_down)]
    want = relu2_mlp_float64(*leaves)
    want = (want, *torch.autograd.grad(want, leaves, g.double()))
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # fp16 stores a, the output and the gradients
    for got_t, want_t, like in zip(got, want, (x, x, w_up, w_down)):
        assert got_t.shape == like.shape[:-1] + want_t.shape[-1:] and got_t.dtype == dtype
        torch.testing.assert_close(got_t.double(), want_t.detach(), rtol=tol, atol=tol * want_t.abs().max().item())
    dead = (x.detach().double() @ w_up.detach().double().t()) <= 0
    assert 0.3 < dead.float().mean() < 0.7
    assert not torch.ops.ternary_golf.relu2_mlp(x.detach(), w_up.detach(), w_down.detach())[1][dead].any()


@pytest.mark.parametrize("overrides", [{}, {"SCALE_FORMAT": "log8", "FP_PHASE": "1"}])
def test_mlp_kernel_trains_the_same_model(overrides):
    """MLP_KERNEL=1 gives GPT.forward's loss and every parameter's gradient as MLP_KERNEL=0 does (same init, fp32),
    with the default quantizer and with log8 scales under FP_PHASE's blend, eager and under torch.compile (aot_eager,
    fullgraph)."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    overrides = {"MLP_MULT": "4", **overrides}
    want = loss_and_grads(model(**overrides), idx, tgt)
    assert_same_loss_and_grads(loss_and_grads(model(MLP_KERNEL="1", **overrides), idx, tgt), want)
    assert_same_loss_and_grads(compiled_loss_and_grads(model(MLP_KERNEL="1", **overrides), idx, tgt), want)


def test_mlp_kernel_traces_as_one_graph_under_autocast():
    """Under autocast (the CPU's here, CUDA's in training) MLP_KERNEL's forward, which reads autocast's state to cast
    x, traces as one dynamo graph without a break: a break would split the compiled step at every MLP."""
    m = model(MLP_MULT="4", MLP_KERNEL="1", FP_PHASE="1", SCALE_FORMAT="log8")
    tg.QuantMix(m)
    idx = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(m)(idx, idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_mlp_kernel_keeps_the_hooked_modules_calls():
    """A forward hook on an MLP's up or down GEMM (how LoRA TTT adds its adapters) runs under MLP_KERNEL=1: the layer
    goes through the modules' own calls, and gives what MLP_KERNEL=0 gives with the same hook."""
    x = torch.randn(2, 5, 64)
    outs = []
    for kernel in ("0", "1"):
        mlp = model(MLP_MULT="4", MLP_KERNEL=kernel).blocks[0].mlp
        calls = []
        mlp.up.register_forward_hook(lambda m, inputs, out: calls.append(1) or out * 2)
        outs.append(mlp(x))
        assert calls == [1]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("overrides, match", [({"MLP_ACT": "leaky_relu2"}, "needs MLP_ACT=relu2"),
                                              ({"MOE_ENABLED": "1"}, "MOE_ENABLED=0"),
                                              ({"FP8_MATMUL": "1"}, "FP8_MATMUL=0"),
                                              ({"MODEL_DIM": "96", "NUM_HEADS": "3", "NUM_KV_HEADS": "1", "GROUP_SIZE": "32",
                                                "MLP_MULT": "8"}, "MODEL_DIM=96 in 64s"),
                                              ({"MLP_MULT": "2.5"}, "hidden width 1920 in 256s")])
def test_mlp_kernel_refuses_what_it_cannot_fuse(overrides, match):
    with pytest.raises(tg.ConfigError, match=match):
        tg.Hyperparameters({"MLP_KERNEL": "1", **overrides})
    assert tg.Hyperparameters({"MLP_KERNEL": "1"}).mlp_kernel and not tg.Hyperparameters({}).mlp_kernel


@pytest.mark.parametrize("overrides, mix", [({}, None), ({"SCALE_FORMAT": "log8"}, None),
                                             ({"HYBRID_INT": "1", "HYBRID_FAMILIES": "q,k"}, None),
                                             ({"HYBRID_INT": "1", "HYBRID_FAMILIES": "k", "SCALE_FORMAT": "log8"}, 0.5),
                                             ({}, 0.5)])
def test_fused_qkv_trains_the_same_model(overrides, mix):
    """FUSED_QKV=1 gives GPT.forward's loss and every parameter's gradient as FUSED_QKV=0 does (same init, fp32), with
    log8 scales, with int (HYBRID_INT) q and k next to a ternary v, and through FP_PHASE's blend at q=0.5; and the
    attention's q, k, v are each x @ W^T of that layer's own quantized weight (a reference independent of the code)."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    runs = []
    for fused in ("0", "1"):
        m = model(FUSED_QKV=fused, **overrides)
        if mix is not None:
            tg.QuantMix(m).set(mix)
        attn = m.blocks[1].mixer
        kinds = {type(attn.q), type(attn.k), type(attn.v)}
        assert len(kinds) == 1 + ("HYBRID_INT" in overrides)  # int and ternary quantizers side by side
        assert all(issubclass(c, tg.FPPhaseLinear) for c in kinds) == (mix is not None)
        runs.append(loss_and_grads(m, idx, tgt))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = [x @ lin.quantized_weight().T for lin in (attn.q, attn.k, attn.v)]
        got = attn.qkv(x)
    assert [g.shape for g in got] == [(2, 5, 64), (2, 5, 32), (2, 5, 32)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert_same_loss_and_grads(runs[1], runs[0])


@pytest.mark.parametrize("fused", ["0", "1"])
def test_fused_qkv_runs_one_gemm_for_q_k_v_forward_and_backward(fused):
    """What FUSED_QKV is for: the products ATen runs for an attention's forward and backward, seen at its dispatch.
    Fused, q, k and v are one x @ W^T of width 64 + 32 + 32 = 128, and one weight-gradient GEMM of 128 rows, with
    no 32-wide k or v product left; unfused, k's and v's own products (and no 128-wide one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                shapes.append(tuple(out.shape))
            return out

    attn = model(FUSED_QKV=fused).blocks[0].mixer
    x = torch.randn(2, 5, 64)
    with Products():
        attn(x)[0].sum().backward()
    if fused == "1":
        assert (10, 128) in shapes and (128, 64) in shapes and not any(32 in s for s in shapes), shapes
    else:
        assert (10, 32) in shapes and (32, 64) in shapes and not any(128 in s for s in shapes), shapes


def test_fused_qkv_with_fp8_matmul_is_refused():
    """The fused GEMM is F.linear: it would bypass the e4m3 matmul FP8_MATMUL puts on each layer."""
    with pytest.raises(tg.ConfigError, match="FUSED_QKV=1 with FP8_MATMUL=1"):
        tg.Hyperparameters({"FUSED_QKV": "1", "FP8_MATMUL": "1"})
    assert tg.Hyperparameters({"FUSED_QKV": "1"}).fused_qkv and tg.Hyperparameters({"FP8_MATMUL": "1"}).fp8_matmul


def test_param_count_and_ternary_share():
    m = model()
    total, ternary = tg.count_params(m)
    # per block: q 64x64, k/v 32x64 each, proj 64x64, mlp up 128x64 and down 64x128
    per_block = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2
    assert ternary == 4 * per_block
    tricks = 4 + 64 + 1  # default-on: a value-residual mix per layer, SmearGate's weight and bias
    assert total == ternary + 128 * 32 + 2 * 32 * 64 + 4 * (4 * 64 + 4) + 2 * 64 + 64 + tricks


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


# --- the architecture family: every feature alone and all together -----------------------------------------------

FEATURES = {
    "skc": {"SKC_ENABLED": "1", "SKC_CHUNK": "4"},
    "skc_only_parallel": {"SKC_ENABLED": "1", "SKC_PATTERN": "S", "SKC_CHUNK": "8", "PARALLEL_RESIDUAL": "1"},
    "parallel": {"PARALLEL_RESIDUAL": "1"},
    "shared": {"SHARED_BLOCKS": "1", "SHARED_BLOCK_COUNT": "2"},
    "recur": {"DEPTH_RECUR": "1", "RECUR_START": "1", "RECUR_END": "3"},
    "capsules": {"CAPSULES_ENABLED": "1", "CAPSULE_COUNT": "2", "CAPSULE_DIM": "16", "CAPSULE_CHUNK": "4",
                 "CAPSULE_LAYER": "1"},
    "feedback": {"FEEDBACK_ENABLED": "1", "FEEDBACK_PASSES": "3"},
    "feedback_halt": {"FEEDBACK_ENABLED": "1", "FEEDBACK_PASSES": "3", "FEEDBACK_HALT_TOL": "0.2"},
    "engram": {"ENGRAM_ENABLED": "1", "ENGRAM_DIM": "8", "ENGRAM_BUCKETS": "64", "ENGRAM_LAYER": "1"},
    "moe": {"MOE_ENABLED": "1", "MOE_EXPERTS": "2"},
    "moe_top2": {"MOE_ENABLED": "1", "MOE_EXPERTS": "4", "MOE_TOP_K": "2"},
    "xsa": {"XSA_ENABLED": "1"},
    "value_residual": {"VALUE_RESIDUAL": "1"},
    "smear": {"SMEAR_GATE": "1"},
    "layer_scale": {"LAYER_SCALE": "1"},
    "attn_gate": {"ATTN_GATE": "1"},
    "fused_qkv": {"FUSED_QKV": "1"},  # not architecture, a throughput path: with the rest, it must compile as one graph
}
ALL_ON = {k: v for f in ("skc", "parallel", "recur", "capsules", "feedback_halt", "engram", "moe", "xsa",
                         "value_residual", "smear", "layer_scale", "attn_gate", "fused_qkv")
          for k, v in FEATURES[f].items()}
ALL_ON.update(SHARED_BLOCKS="1", SHARED_BLOCK_COUNT="3", NUM_LAYERS="5")
FEATURES["all"] = ALL_ON


def tokens_with_documents(batch, length, seed=0):
    """Random ids with a few BOS (id 1) document starts, so SmearGate's mask is exercised."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 128, (batch, length), generator=gen)
    idx[:, 0], idx[:, length // 3] = 1, 1
    return idx


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_is_causal(feature):
    """The output at t must not change when any token after t changes, in training and evaluation mode, with
    and without carried capsule state; 21 tokens are not a whole number of SKC/capsule chunks."""
    m = model(**FEATURES[feature])
    idx = tokens_with_documents(2, 21)
    for t in (0, 6, 13, 20):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(2, 128, changed[:, t + 1 :].shape)
        if t < 20:
            changed[:, -1] = 1  # a document start after t too
        for training in (True, False):
            m.train(training)
            a, b = m.logits(idx)[0], m.logits(changed)[0]
            torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
            if t < 13:
                assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    m.eval()
    _, state = m.token_nll(idx, idx)
    a, b = m.logits(idx, state)[0], m.logits(changed, state)[0]
    torch.testing.assert_close(a[:, :21 - 1], b[:, :21 - 1], rtol=0, atol=1e-5)  # changed[:, 20:] only differs at 20


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_gradients_reach_every_parameter(feature):
    m = model(**FEATURES[feature])
    idx = tokens_with_documents(4, 24, seed=1)
    loss = m(idx, torch.roll(idx, -1, 1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_all_features_compile_as_one_graph_and_leave_module_state_alone():
    """fullgraph=True fails on any graph break; the state dict (buffers included) is the same after forward."""
    m = model(**ALL_ON)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    idx = tokens_with_documents(2, 16)
    for recur in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
        loss = compiled(idx, idx, recur=recur)
        torch.testing.assert_close(loss, m(idx, idx, recur=recur))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(before) == set(after)


def slow_decay_scan(u, decay):
    s, out = torch.zeros(u.size(0), u.size(2), dtype=torch.float64), []
    for t in range(u.size(1)):
        s = decay.double() * s + u[:, t].double()
        out.append(s.clone())
    return torch.stack(out, 1)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 4), (19, 8), (5, 64)])
def test_chunked_decay_scan_matches_slow_loop(length, chunk):
    u = torch.randn(2, length, 6)
    decay = torch.tensor([0.0, 0.3, 0.9, 0.99, 0.5, 0.999])[:6].clamp_min(1e-3)
    got = tg.chunked_decay_scan(u, decay, chunk)
    assert got.shape == u.shape
    torch.testing.assert_close(got.double(), slow_decay_scan(u, decay), rtol=1e-4, atol=1e-5)


def test_skc_mixer_is_the_gated_recurrence():
    h = tg.Hyperparameters({**BASE, "SKC_ENABLED": "1", "SKC_CHUNK": "4", "TRAIN_SEQ_LEN": "64"})
    mixer = tg.SKCMixer(h)
    decay = torch.sigmoid(mixer.decay_logit)
    assert 0.05 <= decay.min() < 0.5 and decay.max() > 0.97  # timescales spread from ~1 token to the sequence
    with torch.no_grad():
        mixer.out.weight.normal_()
    x = torch.randn(2, 11, 64)
    u = mixer.inp(x) * (1 - decay)
    ref = mixer.out((slow_decay_scan(u, decay).float() * F.silu(mixer.gate(x))))
    out, v = mixer(x)
    assert v is None
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_hybrid_pattern_and_shared_blocks_and_depth_recurrence_layout():
    m = model(SKC_ENABLED="1", SKC_PATTERN="AAS", NUM_LAYERS="6")
    kinds = [type(b.mixer).__name__ for b in m.blocks]
    assert kinds == ["CausalSelfAttention", "CausalSelfAttention", "SKCMixer"] * 2
    shared = model(SHARED_BLOCKS="1", SHARED_BLOCK_COUNT="2", NUM_LAYERS="5")
    assert len(shared.blocks) == 2 and shared.layer_scales.shape == (5, 2, 64)  # per-layer residual scales
    shared_one = model(SHARED_BLOCKS="1", SHARED_BLOCK_COUNT="2", NUM_LAYERS="5")
    assert tg.count_params(shared)[1] * 2 < tg.count_params(model(NUM_LAYERS="5"))[1]
    idx = torch.randint(0, 128, (1, 8))
    with torch.no_grad():  # per-layer scales matter even though layers 0, 2, 4 run the same block
        shared_one.layer_scales[4].mul_(3.0)
    assert not torch.allclose(shared.logits(idx)[0], shared_one.logits(idx)[0])
    rec = model(DEPTH_RECUR="1", RECUR_START="1", RECUR_END="3")
    assert rec.layer_order(False) == [(i, True) for i in range(4)]
    assert rec.layer_order(True) == [(0, True), (1, True), (2, True), (1, False), (2, False), (3, True)]
    assert not torch.allclose(rec.logits(idx, recur=False)[0], rec.logits(idx, recur=True)[0])
    with pytest.raises(tg.ConfigError, match="RECUR_START"):
        tg.Hyperparameters({**BASE, "DEPTH_RECUR": "1", "RECUR_START": "3", "RECUR_END": "3"})
    with pytest.raises(tg.ConfigError, match="SKC_PATTERN"):
        tg.Hyperparameters({**BASE, "SKC_PATTERN": "AX"})


def test_parallel_residual_block_reads_one_normalised_input():
    h = tg.Hyperparameters({**BASE, "PARALLEL_RESIDUAL": "1"})
    torch.manual_seed(0)
    block = tg.Block(h, tg.CausalSelfAttention(h, None))
    assert not hasattr(block, "mlp_norm")
    x, scales = torch.randn(2, 7, 64), torch.randn(2, 64)
    assert torch.equal(block(x, scales)[0], x)  # zero-initialised merge: a fresh block is the identity
    with torch.no_grad():
        block.mixer.proj.weight.normal_()
        block.mlp.down.weight.normal_()
    n = block.mixer_norm(x)
    ref = x + scales[0] * block.mixer(n)[0] + scales[1] * block.mlp(n)
    torch.testing.assert_close(block(x, scales)[0], ref)


def test_layer_scale_damps_the_initial_branches():
    assert torch.equal(tg.GPT(tg.Hyperparameters(BASE)).layer_scales, torch.ones(4, 2, 64))
    damped = tg.GPT(tg.Hyperparameters({**BASE, "LAYER_SCALE": "1", "LAYER_SCALE_INIT": "0.25"}))
    assert torch.equal(damped.layer_scales, torch.full((4, 2, 64), 0.25))


def test_exclusive_self_attention_output_is_orthogonal_to_own_value():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = tg.exclusive_self_attention(y, v)
    own = v.repeat_interleave(2, dim=2)  # query head h uses kv head h // 2
    assert (out * own).sum(-1).abs().max() < 1e-5
    torch.testing.assert_close(y - out, (y * F.normalize(own, dim=-1)).sum(-1, keepdim=True) * F.normalize(own, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [2, 6])
def test_exclusive_self_attention_matches_the_repeated_values_bit_for_bit(dtype, kv_heads):
    """XSA normalizes each kv head's value once for its group of query heads: the same numbers, bit for bit, as
    repeating the values per query head first (the formula it replaced), with grouped and with plain heads, on the
    transposed layout attention returns."""
    torch.manual_seed(0)
    y = torch.randn(2, 6, 16, 32, dtype=dtype).transpose(1, 2)  # (B, T, H, D), not contiguous
    v = torch.randn(2, 16, kv_heads, 32, dtype=dtype)
    vn = F.normalize(v.repeat_interleave(6 // kv_heads, dim=2).float(), dim=-1).to(dtype)
    out = tg.exclusive_self_attention(y, v)
    assert out.shape == y.shape and torch.equal(out, y - (y * vn).sum(dim=-1, keepdim=True) * vn)


@pytest.fixture
def xsa_op():
    """XSA_KERNEL's op, its Triton kernels run by Triton's interpreter on the CPU (conftest.py switches it on)."""
    tg.xsa_kernels()
    return torch.ops.ternary_golf.xsa


def xsa_numpy(y, v, go):
    """XSA and its gradients in float64 numpy, a loop over tokens and query heads, from the formula
    out = y - (y . u) u with u = v / max(|v|, 1e-12), u the kv head's unit value: (out, dL/dy, dL/dv) for
    L = sum(out * go)."""
    y, v, go = (np.asarray(t.detach().double()) for t in (y, v, go))
    B, T, H, D = y.shape
    group = H // v.shape[2]
    out, gy, gv = np.zeros_like(y), np.zeros_like(y), np.zeros_like(v)
    for b in range(B):
        for t in range(T):
            for j in range(v.shape[2]):
                norm = np.sqrt((v[b, t, j] ** 2).sum())
                n = max(norm, 1e-12)
                u = v[b, t, j] / n
                jac = (np.eye(D) - np.outer(u, u)) / n if norm > 1e-12 else np.eye(D) / n  # du/dv
                g_u = np.zeros(D)
                for h in range(j * group, (j + 1) * group):
                    s = y[b, t, h] @ u
                    out[b, t, h] = y[b, t, h] - s * u
                    gy[b, t, h] = go[b, t, h] - (go[b, t, h] @ u) * u
                    g_u -= s * go[b, t, h] + (go[b, t, h] @ u) * y[b, t, h]
                gv[b, t, j] = jac.T @ g_u
    return out, gy, gv


@pytest.mark.parametrize("kv_heads, head_dim, tokens", [(2, 24, (16, 8)), (6, 16, (8, 4)), (1, 32, (64, 32))])
def test_xsa_kernel_matches_a_numpy_loop(xsa_op, monkeypatch, kv_heads, head_dim, tokens):
    """XSA_KERNEL's op and its backward against xsa_numpy: grouped and plain heads, head dims under their power of two
    (24: masked lanes), T = 37 in blocks of XSA_TOKENS that do not divide it, y in the transposed layout attention
    returns, v strided along the head dim and a gradient that is not contiguous either, one value of 0 and one of
    norm 5e-13 (the clamped normalisation: its gradient, about 1e12 times the others', is compared on its own)."""
    monkeypatch.setattr(tg, "XSA_TOKENS", tokens)
    torch.manual_seed(0)
    y = torch.randn(2, 6, 37, head_dim).transpose(1, 2).requires_grad_()  # (B, T, H, D), not contiguous
    v = torch.randn(2, 37, head_dim, kv_heads).transpose(2, 3)  # head dim not unit-stride: the launcher fixes it
    v[0, 5, 0], v[1, 36, -1] = 5e-13 * F.normalize(v[0, 5, 0], dim=-1), 0.0
    v.requires_grad_()
    out = xsa_op(y, v)
    go = torch.randn(2, 6, 37, head_dim).transpose(1, 2)
    gy, gv = torch.autograd.grad(out, (y, v), go)
    want = xsa_numpy(y, v, go)
    clamped = want[2][0, 5, 0].copy()
    assert np.abs(clamped).max() > 1e10  # through the clamp: g / eps, no projection
    np.testing.assert_allclose(gv[0, 5, 0].double().numpy(), clamped, rtol=1e-4, atol=1e-5 * np.abs(clamped).max())
    gv, want[2][0, 5, 0] = gv.clone(), 0.0
    gv[0, 5, 0] = 0.0
    for got, ref in zip((out, gy, gv), want):
        assert got.shape == ref.shape and got.is_contiguous()
        np.testing.assert_allclose(got.detach().double().numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_xsa_kernel_trains_the_same_model(xsa_op):
    """XSA_KERNEL=1 gives GPT.forward's loss and every parameter's gradient as XSA_KERNEL=0 does (same init, fp32),
    the value residual's mix included (v is the mixed value), eager and under torch.compile (aot_eager, fullgraph:
    the op's fake shapes trace without a graph break)."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    runs = [loss_and_grads(model(XSA_KERNEL=k), idx, tgt) for k in ("0", "1")]
    assert_same_loss_and_grads(runs[1], runs[0])
    assert_same_loss_and_grads(compiled_loss_and_grads(model(XSA_KERNEL="1"), idx, tgt), runs[0])


def test_xsa_kernel_needs_xsa():
    with pytest.raises(tg.ConfigError, match="XSA_KERNEL=1 runs XSA in Triton kernels: it needs XSA_ENABLED=1"):
        tg.Hyperparameters({"XSA_KERNEL": "1", "XSA_ENABLED": "0"})
    assert tg.Hyperparameters({"XSA_KERNEL": "1"}).xsa_kernel and not tg.Hyperparameters({}).xsa_kernel


def norm_rope_float64(x, gain, inv_freq, eps):
    """RMSNorm with eps, times the head's gain, then channel i < HALF rotated with i + HALF by the angle t * inv_freq[i]
    (t the position): the formulas written out in float64, for (B, T, H, D) x."""
    x, gain, inv_freq = x.double(), gain.double(), inv_freq.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain[:, None]
    half = inv_freq.numel()
    angle = torch.arange(x.size(1), dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, HALF)
    c, s = torch.cos(angle)[None, :, None, :], torch.sin(angle)[None, :, None, :]
    y1, y2 = y[..., :half], y[..., half:2 * half]
    return torch.cat([y1 * c - y2 * s, y1 * s + y2 * c, y[..., 2 * half:]], dim=-1)


@pytest.mark.parametrize("head_dim, rotated, tokens", [(24, 16, (16, 8)), (16, 16, (8, 4)), (32, 8, (64, 64))])
def test_norm_rope_kernel_matches_the_formulas_in_float64(head_dim, rotated, tokens, monkeypatch):
    """QK_NORM_KERNEL's op and its backward against norm_rope_float64 (gradients by float64 autograd): part or all of
    the head rotated, head dims under their power of two (24: masked lanes), T = 37 in blocks that do not divide it,
    x and the output's gradient in the transposed layout, a row of zeros and a row small enough that eps counts
    (fp32's, F.rms_norm's default)."""
    tg.norm_rope_kernels()
    monkeypatch.setattr(tg, "NORM_ROPE_TOKENS", tokens)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, head_dim).transpose(1, 2)  # (B, T, H, D), not contiguous
    x[1, 4, 2], x[0, 7, 1] = 0.0, 1e-4 * x[0, 7, 1]  # a row of zeros, and one whose mean square eps rivals
    x.requires_grad_()
    gain = (torch.rand(3) + 0.5).requires_grad_()
    rotary = tg.Rotary(head_dim, rotated, 10000.0)
    inv_freq = rotary.inv_freq
    out = torch.ops.ternary_golf.norm_rope(x, gain, *rotary.tables(37, x.device))
    go = torch.randn(2, 3, 37, head_dim).transpose(1, 2)
    got = (out, *torch.autograd.grad(out, (x, gain), go))
    x64, gain64 = (t.detach().double().requires_grad_() for t in (x, gain))
    ref = norm_rope_float64(x64, gain64, inv_freq, torch.finfo(torch.float32).eps)
    want = (ref, *torch.autograd.grad(ref, (x64, gain64), go.double()))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous() and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w.detach(), rtol=1e-4, atol=1e-5 * w.abs().max().item())
    assert torch.equal(out[1, 4, 2], torch.zeros(head_dim))


def test_norm_rope_kernel_refuses_tables_of_another_length():
    """The kernels index the cos/sin tables by position: tables shorter than x's sequence (or not contiguous) are an
    error before any launch, not a read past their end."""
    tg.norm_rope_kernels()
    x, gain = torch.randn(1, 12, 2, 16), torch.ones(2)
    cos, sin = tg.Rotary(16, 8, 10000.0).tables(12, x.device)
    with pytest.raises(ValueError, match=r"tables \(11, 4\) for 12 tokens"):
        torch.ops.ternary_golf.norm_rope(x, gain, cos[:11], sin[:11])
    with pytest.raises(ValueError, match="want \\(T, HALF\\)"):
        torch.ops.ternary_golf.norm_rope(x, gain, cos.t().contiguous().t(), sin)
    assert torch.ops.ternary_golf.norm_rope(x, gain, cos, sin).shape == x.shape


def test_norm_rope_kernel_trains_the_same_model():
    """QK_NORM_KERNEL=1 gives GPT.forward's loss and every parameter's gradient (q_gain's included) as
    QK_NORM_KERNEL=0 does (same init, fp32), at a partial RoPE, with XSA_KERNEL too, eager and under torch.compile
    (aot_eager, fullgraph)."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    rope = {"ROPE_DIMS": "8"}  # of the heads' 16 channels
    want = loss_and_grads(model(**rope), idx, tgt)
    for overrides in ({"QK_NORM_KERNEL": "1"}, {"QK_NORM_KERNEL": "1", "XSA_KERNEL": "1"}):
        assert_same_loss_and_grads(loss_and_grads(model(**rope, **overrides), idx, tgt), want)
    assert_same_loss_and_grads(compiled_loss_and_grads(model(**rope, QK_NORM_KERNEL="1"), idx, tgt), want)


def test_value_residual_mixes_the_first_layers_values():
    h = tg.Hyperparameters({**BASE, "VALUE_RESIDUAL": "1"})
    torch.manual_seed(0)
    attn = tg.CausalSelfAttention(h, None)
    with torch.no_grad():
        attn.proj.weight.normal_()
    x, v_first = torch.randn(1, 6, 64), torch.randn(1, 6, 2, 16)
    out_first, v_own = attn(x)
    assert v_own.shape == (1, 6, 2, 16)
    out_mixed, v_own2 = attn(x, v_first)
    assert torch.equal(v_own, v_own2)  # what is passed on is the layer's own values
    assert not torch.allclose(out_mixed, out_first)
    with torch.no_grad():
        attn.value_mix.zero_()
        plain = attn(x)[0]
        torch.testing.assert_close(attn(x, v_first)[0], plain)  # mix 0: the plain layer
        attn.value_mix.fill_(1.0)
        torch.testing.assert_close(attn(x)[0], 2 * plain)  # the first layer mixes in its own values: a rescale


def test_attn_gate_scales_each_heads_output_by_its_sigmoid_gate():
    """ATTN_GATE=1: the output projection reads head j's output at token t times sigmoid(g_j . x_t), against the
    same layer without the gate (the same weights); at its zero init every head is halved."""
    h = tg.Hyperparameters({**BASE, "ATTN_GATE": "1"})
    torch.manual_seed(0)
    gated, plain = tg.CausalSelfAttention(h, False), tg.CausalSelfAttention(tg.Hyperparameters(BASE), False)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "head_gate"})
    x = torch.randn(2, 9, 64)
    seen = {}
    for name, attn in (("gated", gated), ("plain", plain)):
        attn.proj.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0]))
    gated(x), plain(x)
    torch.testing.assert_close(seen["gated"], seen["plain"] / 2)
    with torch.no_grad():
        gated.head_gate.normal_()
    gated(x)
    heads = seen["plain"].view(2, 9, 4, 16)
    for j in range(4):
        want = heads[:, :, j] * torch.sigmoid(x @ gated.head_gate[j])[..., None]
        torch.testing.assert_close(seen["gated"].view(2, 9, 4, 16)[:, :, j], want)


@contextlib.contextmanager
def fp32_rms_norm_autocast_rule():
    """CPU autocast with the rule torch 2.12 and later give CUDA autocast for aten::rms_norm: the inputs upcast to
    fp32 (torch 2.13's CPU autocast has none)."""
    lib = torch.library.Library("aten", "IMPL")
    autocast_cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def upcast(x, shape, weight=None, eps=None):
        with torch._C._ExcludeDispatchKeyGuard(autocast_cpu):
            return torch.ops.aten.rms_norm(x.float(), shape, None if weight is None else weight.float(), eps)

    lib.impl("rms_norm", upcast, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


def test_norms_keep_the_bf16_stream_under_an_fp32_autocast_rule():
    """Under the rule (a bare F.rms_norm comes back fp32), the model's norms still compute in their input's dtype:
    every block reads and returns a bf16 stream, and the loss and gradients are those without the rule, exactly."""
    idx, tgt = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    runs = []
    for rule in (contextlib.nullcontext, fp32_rms_norm_autocast_rule):
        m, seen = model(), []
        for b in m.blocks:
            b.register_forward_hook(lambda mod, args, out: seen.extend((args[0].dtype, out[0].dtype)))
        with rule(), torch.autocast("cpu", dtype=torch.bfloat16):
            bare = F.rms_norm(x, (64,)).dtype
            assert tg.rms_norm(x).dtype == m.blocks[0].mixer_norm(x).dtype == torch.bfloat16
            runs.append(loss_and_grads(m, idx, tgt))
        assert set(seen) == {torch.bfloat16}
    assert bare == torch.float32  # the rule was in force
    assert_same_loss_and_grads(runs[1], runs[0])


def test_smear_gate_formula_and_document_mask():
    h = tg.Hyperparameters({**BASE, "SMEAR_GATE": "1"})
    smear = tg.SmearGate(h)
    with torch.no_grad():
        smear.weight.normal_()
    x = torch.randn(1, 6, 64)
    idx = torch.tensor([[5, 7, 1, 9, 1, 3]])
    out = smear(x, idx)
    for t in range(6):
        if t == 0 or idx[0, t] == 1:
            assert torch.equal(out[0, t], x[0, t])
        else:
            g = torch.sigmoid(x[0, t] @ smear.weight + smear.bias)
            torch.testing.assert_close(out[0, t], x[0, t] + g * x[0, t - 1])


def test_engram_hash_buckets_match_a_slow_reference_and_the_gate_is_bounded():
    h = tg.Hyperparameters({**BASE, **FEATURES["engram"], "ENGRAM_SCALE": "0.5"})
    eng = tg.EngramHash(h)
    idx = torch.randint(0, 128, (2, 9))
    got = eng.bucket_ids(idx)
    assert got.shape == (2, 9, 4)
    for b in range(2):
        for t in range(9):
            col = 0
            for n in (2, 3):
                for j in range(2):
                    primes = tg.ENGRAM_PRIMES[j * 3 : j * 3 + n]
                    key = sum((int(idx[b, t - k]) + 1 if t - k >= 0 else 0) * primes[k] for k in range(n))
                    assert got[b, t, col] == key % 64 + col * 64
                    col += 1
    assert (got[..., 0] != got[..., 1]).any()  # distinct primes per head: different buckets
    with torch.no_grad():
        eng.proj.weight.normal_()
        eng.gate.normal_()
    x = torch.randn(2, 9, 64)
    e = eng.table(got).flatten(-2)
    full = eng.proj(F.rms_norm(e, (32,)))
    out = eng(x, idx)
    ratio = out / full
    assert (ratio > 0).all() and (ratio <= 0.5 + 1e-6).all()  # a sigmoid gate times ENGRAM_SCALE
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-5)  # one gate per token


def test_capsule_bank_dynamics_state_carry_and_cold_start():
    h = tg.Hyperparameters({**BASE, **FEATURES["capsules"]})
    bank = tg.CapsuleBank(h)
    x = torch.randn(2, 16, 64)
    update, consistency, state, read = bank(x)
    assert torch.equal(update, torch.zeros_like(update))  # cold start: the gate is closed
    H = tg.hadamard(32)
    torch.testing.assert_close(H @ H.T, torch.eye(32), rtol=0, atol=1e-6)
    assert torch.equal(H.abs(), torch.full((32, 32), 32**-0.5)) and torch.equal(H[0], H[:, 0])
    A = H @ (torch.diag(bank.diag) + bank.u @ bank.v.T) @ H.T
    torch.testing.assert_close(bank.dynamics(), A)
    # state: s_c = A s_{c-1} + o_c over the chunk means of x; chunk c reads s_{c-1}
    pooled = x.view(2, 4, 4, 64).mean(2)
    obs = F.rms_norm(bank.encode(pooled), (32,))
    s = torch.zeros(2, 32)
    for c in range(4):
        torch.testing.assert_close(read[:, 4 * c : 4 * c + 4], s[:, None].expand(2, 4, 32), rtol=1e-5, atol=1e-5)
        s = s @ A.T + obs[:, c]
    torch.testing.assert_close(state, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(consistency, (obs[:, 1:] - obs[:, :-1] @ A.T).square().mean())
    # carrying the state across two windows equals one pass over both (chunk-aligned)
    with torch.no_grad():
        bank.gate.fill_(0.7)
    whole = bank(x)[0]
    first = bank(x[:, :8])
    second = bank(x[:, 8:], first[2])
    torch.testing.assert_close(torch.cat((first[0], second[0]), 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[2], bank(x)[2], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        bank.diag.fill_(3.0)
    bank.clamp_dynamics()
    assert bank.diag.abs().max() <= h.capsule_max_decay
    with pytest.raises(tg.ConfigError, match="power of 2"):
        tg.Hyperparameters({**BASE, **FEATURES["capsules"], "CAPSULE_DIM": "12"})


def test_feedback_sketch_is_a_prefix_mean_and_fresh_gates_repeat_pass_one():
    x = torch.randn(2, 7, 5)
    ref = torch.stack([x[:, : t + 1].mean(1) for t in range(7)], 1)
    torch.testing.assert_close(tg.FeedbackAdapters.sketch(x), ref)
    torch.manual_seed(0)
    m = tg.GPT(tg.Hyperparameters({**BASE, **FEATURES["feedback"]})).eval()
    plain = tg.GPT(tg.Hyperparameters(BASE)).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2 and p is not m.tok_emb.weight:
                p.normal_(0, 0.1)
        plain.load_state_dict(m.state_dict(), strict=False)
    idx = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(m.logits(idx)[0], plain.logits(idx)[0])  # gates 0: passes 2..P change nothing
    with torch.no_grad():
        m.feedback.gates.fill_(0.5)
    assert not torch.allclose(m.logits(idx)[0], plain.logits(idx)[0])


def test_feedback_halting_keeps_a_halted_tokens_output(monkeypatch):
    cfg = {**BASE, **FEATURES["feedback"], "FEEDBACK_HALT_TOL": "1e9"}
    m = model(**cfg).eval()
    idx = torch.randint(0, 128, (1, 9))
    calls = []
    run = m.run_layers
    monkeypatch.setattr(m, "run_layers", lambda *a, **k: calls.append(1) or run(*a, **k))
    halted_logits = m.logits(idx)[0]
    assert len(calls) == 2  # every token halts after pass 2: pass 3 is skipped
    m.h.feedback_halt_tol = 0.0
    calls.clear()
    two_pass = m.logits(idx)[0]
    assert len(calls) == 3
    m.train()
    calls.clear()
    m.logits(idx)
    assert len(calls) == 3  # no halting in training
    assert not torch.allclose(halted_logits, two_pass)


def test_moe_routing_weights_balance_loss_and_single_expert_equals_mlp():
    h = tg.Hyperparameters({**BASE, "MOE_ENABLED": "1", "MOE_EXPERTS": "4"})
    moe = tg.MoEMLP(h)
    with torch.no_grad():
        moe.down.weight.normal_()
        moe.router.normal_()
    x = torch.randn(2, 5, 64)
    out, balance = moe(x)
    probs = torch.softmax(x @ moe.router.T, -1)
    top = probs.argmax(-1)
    u = moe.activation(x).view(2, 5, 4, 32)
    mask = F.one_hot(top, 4).float()
    ref = moe.down((u * (probs * mask)[..., None]).flatten(-2))  # k = 1: weight is the probability itself
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    frac = mask.view(-1, 4).mean(0)
    torch.testing.assert_close(balance, 4 * (frac * probs.view(-1, 4).mean(0)).sum())
    h2 = tg.Hyperparameters({**BASE, "MOE_ENABLED": "1", "MOE_EXPERTS": "4", "MOE_TOP_K": "2"})
    moe2 = tg.MoEMLP(h2)
    moe2.load_state_dict(moe.state_dict())
    p2, i2 = probs.topk(2, -1)
    w2 = torch.zeros_like(probs).scatter(-1, i2, p2 / p2.sum(-1, keepdim=True))
    torch.testing.assert_close(moe2(x)[0], moe.down((u * w2[..., None]).flatten(-2)), rtol=1e-4, atol=1e-5)
    one = tg.MoEMLP(tg.Hyperparameters({**BASE, "MOE_ENABLED": "1", "MOE_EXPERTS": "1"}))
    dense = tg.MLP(h)
    with torch.no_grad():
        one.down.weight.normal_()
    dense.load_state_dict({k: v for k, v in one.state_dict().items() if k != "router"})
    torch.testing.assert_close(one(x)[0], dense(x))
    with pytest.raises(tg.ConfigError, match="MOE_TOP_K"):
        tg.Hyperparameters({**BASE, "MOE_ENABLED": "1", "MOE_TOP_K": "5"})


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters catches every shape the model would reject (issue 15 item 9)

SHAPE_GRID = {  # knob -> values, good and bad ones mixed (a repeated value is a likelier one)
    "MODEL_DIM": ["64", "64", "96", "48"], "NUM_HEADS": ["2", "4", "4", "3"], "NUM_KV_HEADS": ["1", "2"],
    "GROUP_SIZE": ["16", "32", "32", "48"], "MLP_MULT": ["2", "2", "1.5", "2.25", "3"], "EMBED_DIM": ["0", "24", "32"],
    "NUM_LAYERS": ["3", "4", "4", "1"], "ROPE_DIMS": ["0", "8"],
    "CAPSULES_ENABLED": ["0", "1"], "CAPSULE_COUNT": ["2", "4", "3"], "CAPSULE_DIM": ["8", "16"],
    "CAPSULE_LAYER": ["0", "2"], "CAPSULE_CHUNK": ["4"],
    "ENGRAM_ENABLED": ["0", "1"], "ENGRAM_DIM": ["4", "8", "16"], "ENGRAM_ORDERS": ["2", "2,3", "1,2,3"],
    "ENGRAM_HEADS": ["1", "2"], "ENGRAM_BUCKETS": ["16"], "ENGRAM_LAYER": ["0", "2"],
    "MOE_ENABLED": ["0", "1"], "MOE_EXPERTS": ["2", "3"], "MOE_TOP_K": ["1", "2"],
    "SKC_ENABLED": ["0", "1"], "SKC_CHUNK": ["4"], "FEEDBACK_ENABLED": ["0", "1"], "PARALLEL_RESIDUAL": ["0", "1"],
    "SHARED_BLOCKS": ["0", "1"], "SHARED_BLOCK_COUNT": ["2"], "DEPTH_RECUR": ["0", "0", "1"], "RECUR_START": ["0", "1"],
    "RECUR_END": ["2", "3"], "VOCAB_SIZE": ["64"], "HYBRID_INT": ["0", "1"], "HYBRID_FAMILIES": ["q,k,v,proj", "up,down"],
    "SCALE_FORMAT": ["fp16", "log8"], "FP_PHASE": ["0", "1"], "EMBED_QAT": ["0", "0", "1"], "EXPORT_EMBED": ["int8", "fp16"],
}


def test_every_shape_the_model_rejects_is_rejected_by_hyperparameters_first():
    """Random configurations from SHAPE_GRID: whatever Hyperparameters accepts, the model builds and runs forward
    and backward (so a sweep's up-front check finds every shape error); and the grid does contain shape errors."""
    import random

    rng = random.Random(0)
    idx = torch.randint(0, 64, (1, 12))
    rejected, built = 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a hundred tiny models: thread start-up would cost more than the work
    try:
        for _ in range(700):
            env = {k: rng.choice(v) for k, v in SHAPE_GRID.items()}
            try:
                h = tg.Hyperparameters(env)
            except tg.ConfigError:
                rejected += 1
                continue
            try:
                m = tg.GPT(h)
                m(idx, idx).backward()
            except Exception as e:  # noqa: BLE001: any failure here is a shape Hyperparameters let through
                pytest.fail(f"Hyperparameters accepted {env} but the model fails: {type(e).__name__}: {e}")
            built += 1
    finally:
        torch.set_num_threads(threads)
    assert rejected > 100 and built > 80, (rejected, built)


@pytest.mark.parametrize("env, message", [
    ({"MODEL_DIM": "64", "NUM_HEADS": "4", "GROUP_SIZE": "48"}, "GROUP_SIZE=48 does not divide MODEL_DIM=64"),
    ({"MODEL_DIM": "64", "NUM_HEADS": "4", "MLP_MULT": "2.25", "GROUP_SIZE": "32"},
     "GROUP_SIZE=32 does not divide the MLP hidden width MLP_MULT x MODEL_DIM=144"),
    ({"MODEL_DIM": "64", "NUM_HEADS": "4", "MLP_MULT": "2.7", "GROUP_SIZE": "32"},
     "MLP_MULT=2.7 x MODEL_DIM=64 = 172.8 is not a whole number of hidden units"),
    ({"MODEL_DIM": "64", "NUM_HEADS": "4", "GROUP_SIZE": "32", "CAPSULES_ENABLED": "1", "CAPSULE_COUNT": "1",
      "CAPSULE_DIM": "16"}, "GROUP_SIZE=32 does not divide the capsule state width CAPSULE_COUNT x CAPSULE_DIM=16"),
    ({"MODEL_DIM": "64", "NUM_HEADS": "4", "GROUP_SIZE": "32", "ENGRAM_ENABLED": "1", "ENGRAM_DIM": "4",
      "ENGRAM_ORDERS": "2,3", "ENGRAM_HEADS": "1"},
     "GROUP_SIZE=32 does not divide the EngramHash width len(ENGRAM_ORDERS) x ENGRAM_HEADS x ENGRAM_DIM=8"),
    ({"VOCAB_SIZE": "64", "BOS_ID": "64"}, "BOS_ID=64 must be < VOCAB_SIZE=64"),
])
def test_shape_errors_name_the_knobs(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters(env)
