"""Muon's Newton-Schulz orthogonalization, its update rule, optimizer grouping and the schedules."""
import math

import pytest
import torch

import train_gpt as tg
from test_model import model


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (192, 48)])
def test_newton_schulz_orthogonalizes(shape):
    gen = torch.Generator().manual_seed(1)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    g = u @ torch.diag(torch.logspace(0, 1.5, k)) @ v.T  # a gradient-like spread of singular values (31.6x)
    s_in = torch.linalg.svdvals(g)
    s_out = torch.linalg.svdvals(tg.newton_schulz(g, 5, torch.float32))
    assert s_in.max() / s_in.min() > 30
    # the quintic iteration trades exactness for speed: singular values land in a band around 1, not on 1
    assert s_out.min() > 0.6 and s_out.max() < 1.25
    # and it keeps the singular vectors: the output is close to U V^T from an exact SVD
    exact = u @ v.T
    cos = (tg.newton_schulz(g, 5, torch.float32) * exact).sum() / exact.norm() ** 2
    assert cos > 0.85


def test_muon_step_matches_manual_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 32))
    p0 = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01)
    g1, g2 = torch.randn(48, 32), torch.randn(48, 32)
    p.grad = g1.clone()
    opt.step()
    expected = p0 * (1 - 0.1 * 0.01) - 0.1 * (48 / 32) ** 0.5 * tg.newton_schulz(g1 + 0.9 * g1, 5, torch.float32)
    torch.testing.assert_close(p.detach(), expected)
    p.grad = g2.clone()
    opt.step()
    buf = 0.9 * g1 + g2
    expected = expected * (1 - 0.001) - 0.1 * 1.5**0.5 * tg.newton_schulz(g2 + 0.9 * buf, 5, torch.float32)
    torch.testing.assert_close(p.detach(), expected)


def test_muon_step_decays_and_adds_bf16_updates_as_the_per_matrix_loop(monkeypatch):
    """Muon.step decays the matrices with one foreach op and adds a bf16 update (what Newton-Schulz gives on a GPU)
    without a copy: bitwise the per-matrix loop p.mul_(1 - lr wd); p.add_(update.to(p.dtype), alpha=-lr), with an
    MoE matrix's sparse decay (rows and columns without gradient are not decayed)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in ((24, 40), (40, 24), (16, 16))]
    params[1].sparse_decay = True
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[1].grad[:5] = 0.0  # an idle expert's rows
    updates = [torch.randn(p.shape, generator=gen).bfloat16() for p in params]
    want = [p.detach().clone() for p in params]
    for w, p, u in zip(want, params, updates):
        decay = 0.05 * 0.1  # the loop as it was (session 19)
        if p is params[1]:
            g = p.grad.ne(0)
            decay = decay * (g.any(dim=1, keepdim=True) & g.any(dim=0, keepdim=True))
        w.mul_(1 - decay)
        w.add_(u.to(w.dtype), alpha=-0.05)
    opt = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
    monkeypatch.setattr(opt, "updates", lambda params, group, ns_dtype: iter(updates))
    opt.step()
    for p, w in zip(params, want):
        assert torch.equal(p.detach(), w)


def textbook_newton_schulz(g, steps):
    """Muon's quintic iteration as written in float64: x <- a x + (b s + c s s) x with s = x x^T, on the wide
    orientation of each matrix of g (a list of 2-D arrays), after scaling it to unit Frobenius norm."""
    a, b, c = tg.NS_COEFFS
    out = []
    for m in g:
        x = m.double().T if m.shape[0] > m.shape[1] else m.double()
        x = x / (x.norm() + 1e-7)
        for _ in range(steps):
            s = x @ x.T
            x = a * x + (b * s + c * s @ s) @ x
        out.append(x.T if m.shape[0] > m.shape[1] else x)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(24, 40), (56, 16), (3, 24, 40), (2, 56, 16)])
def test_newton_schulz_is_the_textbook_iteration(shape):
    """newton_schulz (a x folded into the small factor: (a I + b s + c s s) x) is the textbook iteration, in float64,
    for a matrix and a stack, wide and tall."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = textbook_newton_schulz(g.reshape(-1, *shape[-2:]), 5).reshape(shape)
    torch.testing.assert_close(tg.newton_schulz(g, 5, torch.float64), want, rtol=1e-10, atol=1e-12)


def test_muon_scale_skips_factor_one():
    """Muon.scale returns a wide or square matrix's update itself (factor 1: no pass over it) and multiplies a tall
    one's by sqrt(rows / columns)."""
    u = torch.randn(3, 8)
    assert tg.Muon.scale(u, torch.empty(8, 8)) is u and tg.Muon.scale(u, torch.empty(4, 8)) is u
    torch.testing.assert_close(tg.Muon.scale(u, torch.empty(32, 8)), u * 2)


def test_batched_newton_schulz_is_each_matrix_on_its_own():
    """A stack of same-shape matrices (wide and tall) comes out as each matrix orthogonalized alone."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((4, 24, 40), (3, 56, 16)):
        g = torch.randn(*shape, generator=gen) * torch.logspace(0, 2, shape[0])[:, None, None]  # norms differ
        alone = torch.stack([tg.newton_schulz(m, 5, torch.float32) for m in g])
        torch.testing.assert_close(tg.newton_schulz(g, 5, torch.float32), alone, rtol=1e-5, atol=1e-6)


def muon_runs(classes, momenta, shapes, prepare=lambda opt: None, lrs=None):
    """(params, optimizer) of each Muon class in `classes` after len(momenta) steps from the same parameters and
    gradients, the momentum (and the lr, from lrs) set before each step, as their schedules set them; prepare(opt)
    runs before the first. The last matrix never gets a gradient."""
    runs = []
    for cls in classes:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        opt = cls(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
        prepare(opt)
        for m, lr in zip(momenta, lrs or [0.05] * len(momenta)):
            opt.param_groups[0].update(momentum=m, lr=lr)
            for p in params[:-1]:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((params, opt))
    return runs


def assert_same_muon_state(runs):
    """The second run's parameters and momentum buffers are the first's (to rounding), and its gradient-less last
    matrix has no buffer."""
    (ref, ref_opt), (got, got_opt) = runs
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got[:-1], ref[:-1]):
        torch.testing.assert_close(got_opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
    assert "momentum_buffer" not in got_opt.state[got[-1]]


@pytest.mark.parametrize("row_norm", [False, True])
def test_muon_batched_steps_like_muon(row_norm):
    """MUON_BATCHED: the same parameters and momentum as the per-matrix optimizer after three steps, with shapes
    that repeat (batched), occur once, and a matrix without a gradient (skipped)."""
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16), (24, 40), (40, 24), (8, 16)]
    h = tg.Hyperparameters({"MUON_BATCHED": "1", "MUON_ROW_NORM": str(int(row_norm))})
    plain_cls = tg.RowNormMuon if row_norm else tg.Muon
    runs = muon_runs((plain_cls, tg.batched_muon_class(plain_cls)), [0.9] * 3, shapes)
    assert type(runs[1][1]).__name__ == f"Batched{plain_cls.__name__}" and h.muon_batched
    assert_same_muon_state(runs)
    assert not torch.equal(runs[1][0][0], torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))  # moved


def test_batched_muon_makes_momentum_buffers_once(monkeypatch):
    """MUON_BATCHED makes each matrix's momentum buffer at its first step only: a setdefault whose default was
    zeros_like made and zero-filled a new one for every matrix at every step (session 17's H200 trace: 62 a step)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16, generator=gen)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.randn(16, 8, generator=gen)))
    opt = tg.batched_muon_class(tg.Muon)(params, lr=0.05, momentum=0.9, backend_steps=2, weight_decay=0.1)
    zeros = []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: zeros.append(1) or zeros_like(*a, **k))
    buffers = None
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        assert len(zeros) == len(params)
        now = [opt.state[p]["momentum_buffer"] for p in params]
        assert buffers is None or all(a is b for a, b in zip(now, buffers))  # the same tensors, advanced in place
        buffers = now


def fused_and_batched_runs(make_fused, momenta, shapes=((24, 40), (40, 24), (24, 40), (16, 16), (8, 16)), lrs=None,
                           plain=tg.Muon):
    """muon_runs of BatchedMuon (over `plain`) and of a FusedMuon over it, make_fused(opt) run on the FusedMuon
    only."""
    batched = tg.batched_muon_class(plain)
    return muon_runs((batched, tg.fused_muon_class(batched)), momenta, shapes,
                     lambda opt: make_fused(opt) if isinstance(opt, tg.FusedMuon) else None, lrs)


@pytest.mark.parametrize("plain", [tg.Muon, tg.RowNormMuon])
def test_muon_fused_steps_like_batched_muon(plain):
    """MUON_FUSED: the same parameters and momentum as MUON_BATCHED after four steps whose momentum changes (the
    warmup) and then holds while the lr changes (the warmdown), with shapes that repeat, occur once, and a matrix
    without a gradient; its 0-d momentum and lr tensors hold the last values. With MUON_ROW_NORM (the default since
    session 26) too: the fused update goes through the same row scaling."""
    fills = []
    runs = fused_and_batched_runs(lambda opt: fills.append(opt.scalars), [0.85, 0.9, 0.95, 0.95],
                                  lrs=[0.05, 0.05, 0.03, 0.01], plain=plain)
    assert_same_muon_state(runs)
    opt = runs[1][1]
    assert type(opt).__name__ == f"FusedBatched{plain.__name__}"
    group = id(opt.param_groups[0])
    assert fills[0].keys() == {(group, "momentum"), (group, "lr"), (group, "keep")}
    for key, want in (("momentum", 0.95), ("lr", 0.01), ("keep", 1 - 0.01 * 0.1)):
        value, tensor = fills[0][group, key]
        assert value == want and tensor.item() == pytest.approx(want) and tensor.dim() == 0


def test_muon_fused_compiles_one_graph_per_shape():
    """MUON_FUSED under torch.compile (aot_eager, fullgraph): one graph for each of the three shapes and one for the
    parameter update, none again when the momentum and the lr change (tensors, not guarded floats), and the eager
    optimizer's numbers."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def compiled(opt):
        opt.fused = torch.compile(tg.nesterov_newton_schulz, backend=counter, dynamic=False, fullgraph=True)
        opt.subtract = torch.compile(tg.subtract_updates, backend=counter, dynamic=False, fullgraph=True)

    runs = fused_and_batched_runs(compiled, [0.85, 0.875, 0.9, 0.925], lrs=[0.05, 0.04, 0.03, 0.02])
    assert_same_muon_state(runs)
    assert counter.frame_count == 4


def test_muon_fused_compiles_its_own_way_with_inductor():
    """MUON_FUSED's own compile (compile_newton_schulz: inductor, with the loop reordering that failed on torch 2.11's
    CUDA backend turned off) builds, and steps like MUON_BATCHED (one shape, and the gradient-less matrix)."""
    torch._dynamo.reset()
    runs = fused_and_batched_runs(lambda opt: opt.compile_newton_schulz(), [0.85, 0.9], shapes=((24, 40),) * 3)
    assert_same_muon_state(runs)
    assert runs[1][1].fused is not tg.nesterov_newton_schulz


def test_subtract_updates_multiplies_bf16_updates_in_fp32():
    """subtract_updates (MUON_FUSED's parameter step) on the GPU's dtypes: fp32 matrices and bf16 updates, one a
    transposed view as Newton-Schulz returns a tall matrix's: keep x p - lr x update with the product in fp32, as
    Muon's decay and add compute it (float64 reference), eagerly and compiled."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(24, 40, generator=gen), torch.randn(40, 24, generator=gen)]
    updates = [torch.randn(24, 40, generator=gen).bfloat16(), torch.randn(24, 40, generator=gen).bfloat16().mT]
    lr, keep = torch.tensor(0.037), torch.tensor(1 - 0.037 * 0.04)
    want = [(keep.double() * p.double() - lr.double() * u.double()).float() for p, u in zip(params, updates)]
    for fn in (tg.subtract_updates, torch.compile(tg.subtract_updates, backend="aot_eager", fullgraph=True)):
        got = [p.clone() for p in params]
        fn(got, updates, lr, keep)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_muon_fused_decays_moe_experts_once():
    """MUON_FUSED with MoE's sparsely decayed experts: Muon.decay decays the matrices (sparse rule included) and
    subtract_updates keeps them (keep 1), so the parameters are MUON_BATCHED's, not decayed twice or never."""
    def sparse(opt):
        opt.param_groups[0]["params"][1].sparse_decay = True

    batched = tg.batched_muon_class(tg.Muon)
    runs = muon_runs((batched, tg.fused_muon_class(batched)), [0.9, 0.9], ((24, 40), (40, 24), (8, 16)), sparse)
    assert_same_muon_state(runs)
    assert runs[1][1].scalars[id(runs[1][1].param_groups[0]), "keep"][0] == 1.0


def test_muon_fused_needs_batched():
    with pytest.raises(tg.ConfigError, match="MUON_FUSED=1 compiles MUON_BATCHED"):
        tg.Hyperparameters({"MUON_FUSED": "1", "MUON_BATCHED": "0"})
    assert tg.Hyperparameters({"MUON_FUSED": "1"}).muon_fused and not tg.Hyperparameters({}).muon_fused


def test_build_optimizers_batches_row_normed_muon_by_default():
    from test_model import BASE

    for flags, name in (({}, "BatchedRowNormMuon"), ({"MUON_ROW_NORM": "0"}, "BatchedMuon"),
                        ({"MUON_BATCHED": "0", "MUON_ROW_NORM": "0"}, "Muon"), ({"MUON_BATCHED": "0"}, "RowNormMuon"),
                        ({"MUON_FUSED": "1"}, "FusedBatchedRowNormMuon"),
                        ({"MUON_FUSED": "1", "MUON_ROW_NORM": "0"}, "FusedBatchedMuon")):
        h = tg.Hyperparameters({**BASE, **flags})
        assert type(tg.build_optimizers(tg.GPT(h), h)[1]).__name__ == name


@pytest.mark.parametrize("shape", [(16, 64), (96, 32)])
def test_muon_row_norm_equalises_rows_at_the_default_update_rms(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, 2, shape[0])[:, None]
    updates = {}
    for row_norm in (False, True):
        p = torch.nn.Parameter(torch.zeros(*shape))
        opt = (tg.RowNormMuon if row_norm else tg.Muon)([p], lr=1.0, momentum=0.0, backend_steps=5)
        p.grad = grad.clone()
        opt.step()
        updates[row_norm] = -p.detach()
    row_rms = updates[True].pow(2).mean(1).sqrt()
    torch.testing.assert_close(row_rms, torch.full_like(row_rms, shape[1] ** -0.5), rtol=1e-4, atol=1e-6)
    # the plain update has that RMS overall (not per row): NS output entries have RMS 1/sqrt(max dim)
    assert updates[False].pow(2).mean().sqrt().item() == pytest.approx(shape[1] ** -0.5, rel=0.15)
    assert updates[False].pow(2).mean(1).sqrt().std() > 10 * row_rms.std()


def test_optimizer_groups_cover_every_parameter_once():
    m = model()
    adam, muon = tg.build_optimizers(m, tg.Hyperparameters({"MATRIX_LR": "0.05", "EMBED_LR": "0.3"}))
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params}.isdisjoint(id(p) for p in adam_params)
    assert len(muon_params) + len(adam_params) == len(list(m.parameters()))
    assert all(p.ndim == 2 for p in muon_params)
    ternary = {id(mod.weight) for mod in m.modules() if isinstance(mod, tg.TernaryLinear)}
    assert ternary <= {id(p) for p in muon_params}
    assert adam.param_groups[0]["params"][0] is m.tok_emb.weight and adam.param_groups[0]["lr"] == 0.3
    assert m.skip_weights in adam.param_groups[1]["params"]
    assert muon.param_groups[0]["lr"] == 0.05


def test_lr_schedule_warmup_wallclock_warmdown():
    h = tg.Hyperparameters({"WARMUP_STEPS": "10", "WARMDOWN_FRAC": "0.25", "MAX_WALLCLOCK_SECONDS": "100",
                            "ITERATIONS": "100000"})
    lr = tg.TrainingSchedule(h).lr
    assert lr(0, 0.0) == pytest.approx(0.1)
    assert lr(9, 0.0) == pytest.approx(1.0)
    assert lr(50, 70.0) == 1.0
    assert lr(50, 87.5) == pytest.approx(0.5)  # halfway through the last 25 s
    assert lr(50, 100.0) == 0.0
    steps = tg.TrainingSchedule(tg.Hyperparameters({"WARMUP_STEPS": "0", "WARMDOWN_FRAC": "0.5",
                                                    "MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "200"}))
    assert steps.lr(100, 1e9) == 1.0 and steps.lr(150, 1e9) == pytest.approx(0.5)


def test_warmdown_shape_and_floor():
    """WARMDOWN_MIN_LR floors the warmdown, WARMDOWN_SHAPE=cosine bends it: 1 at its start, the floor at the end."""
    env = {"WARMUP_STEPS": "0", "WARMDOWN_FRAC": "0.5", "MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "100",
           "WARMDOWN_MIN_LR": "0.1"}
    lin = tg.TrainingSchedule(tg.Hyperparameters(env)).lr
    cos = tg.TrainingSchedule(tg.Hyperparameters({**env, "WARMDOWN_SHAPE": "cosine"})).lr
    for step, left in ((50, 1.0), (60, 0.8), (75, 0.5), (90, 0.2), (100, 0.0), (130, 0.0)):
        assert lin(step, 0.0) == pytest.approx(0.1 + 0.9 * left)
        assert cos(step, 0.0) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * (1 - left))) / 2)
    assert cos(60, 0.0) > lin(60, 0.0) and cos(90, 0.0) < lin(90, 0.0)  # stays high longer, lands softer
    assert lin(49, 0.0) == cos(49, 0.0) == 1.0


# The functions TrainingSchedule replaced (train_gpt.py at 45780f3), frozen here as the reference it must equal.
def old_run_progress(step, elapsed, h):
    progress = step / h.iterations
    if h.max_wallclock_seconds:
        progress = max(progress, elapsed / h.max_wallclock_seconds)
    return progress


def old_lr_multiplier(step, elapsed, h):
    if h.warmup_steps and step < h.warmup_steps:
        return (step + 1) / h.warmup_steps
    progress = old_run_progress(step, elapsed, h)
    if h.warmdown_frac and progress > 1 - h.warmdown_frac:
        return max(0.0, (1 - progress) / h.warmdown_frac)
    return 1.0


def old_muon_momentum(step, h):
    if not h.muon_momentum_warmup_steps:
        return h.muon_momentum
    frac = min(step / h.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


@pytest.mark.parametrize("env", [
    {},
    {"WARMUP_STEPS": "0", "WARMDOWN_FRAC": "0", "MUON_MOMENTUM_WARMUP_STEPS": "0"},
    {"WARMUP_STEPS": "7", "WARMDOWN_FRAC": "1.0", "MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "90"},
    {"WARMDOWN_FRAC": "0.3", "MAX_WALLCLOCK_SECONDS": "37.5", "ITERATIONS": "400", "RECUR_FROM_FRAC": "0.25"},
])
def test_schedule_equals_the_functions_it_replaced(env):
    """Bit for bit, over a grid of steps and clocks on both sides of every switch: the LR multiplier, Muon's
    momentum, the depth-recurrence switch (was in train_step) and CALIB_AT_FRAC's (was in train)."""
    h = tg.Hyperparameters({"DEPTH_RECUR": "1", "TERNARY_CALIB": "1", "CALIB_AT_FRAC": "0.6", **env})
    sched = tg.TrainingSchedule(h)
    for step in [0, 1, 5, 6, 7, 19, 20, 21, 60, 89, 90, 150, 299, 300, 301, 1000, 12999, 13000, 19999, 20000, 25000]:
        for elapsed in [0.0, 1e-3, 9.375, 18.75, 26.25, 36.0, 37.5, 100.0, 210.0, 389.9, 390.0, 600.0, 700.0]:
            assert sched.progress(step, elapsed) == old_run_progress(step, elapsed, h)
            assert sched.lr(step, elapsed) == old_lr_multiplier(step, elapsed, h)
            assert sched.forward_kwargs(step, elapsed) == {
                "recur": old_run_progress(step, elapsed, h) >= h.recur_from_frac}
            assert sched.on("calib", step, elapsed) == (old_run_progress(step, elapsed, h) >= h.calib_at_frac)
        assert sched.momentum(step) == old_muon_momentum(step, h)


def test_phases_and_compile_variants():
    """Phases exist only for features that are on; compile_warmup gets each graph combination the run reaches."""
    off = tg.Hyperparameters({"FP_PHASE": "0"})
    assert tg.TrainingSchedule(off).starts == {}
    assert tg.TrainingSchedule(off).compile_variants() == []
    assert tg.TrainingSchedule(off).forward_kwargs(10**6, 1e9) == {}
    assert tg.TrainingSchedule(tg.Hyperparameters({})).starts == {"qat": 0.3}  # the FP phase is on by default
    h = tg.Hyperparameters({"DEPTH_RECUR": "1", "FP_PHASE": "1"})
    sched = tg.TrainingSchedule(h)
    assert sched.starts == {"recur": 0.5, "qat": 0.3}
    assert sched.compile_variants() == [{"recur": True}]


def test_qat_switches_at_the_right_step():
    """FP_PHASE: quant_mix is 0 before QAT_START_FRAC of the run, 1 from the first step at or past it (by steps
    or by the wall clock, whichever is further along), or ramps linearly over QAT_RAMP_FRAC."""
    env = {"FP_PHASE": "1", "QAT_START_FRAC": "0.3", "QAT_RAMP_FRAC": "0", "ITERATIONS": "10",
           "MAX_WALLCLOCK_SECONDS": "0"}
    sched = tg.TrainingSchedule(tg.Hyperparameters(env))
    assert [sched.quant_mix(s, 1e9) for s in range(10)] == [0.0] * 3 + [1.0] * 7
    ramp = tg.TrainingSchedule(tg.Hyperparameters({**env, "QAT_RAMP_FRAC": "0.4"}))
    assert [ramp.quant_mix(s, 0.0) for s in range(10)] == pytest.approx([0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1])
    clock = tg.TrainingSchedule(tg.Hyperparameters({**env, "ITERATIONS": "1000", "MAX_WALLCLOCK_SECONDS": "100"}))
    assert clock.quant_mix(5, 29.99) == 0.0 and clock.quant_mix(5, 30.0) == 1.0 and clock.quant_mix(300, 0.0) == 1.0
    with pytest.raises(tg.ConfigError, match="QAT_RAMP_FRAC"):
        tg.Hyperparameters({**env, "QAT_START_FRAC": "0.7", "QAT_RAMP_FRAC": "0.3"})
    with pytest.raises(tg.ConfigError, match="CALIB_AT_FRAC"):
        tg.Hyperparameters({**env, "TERNARY_CALIB": "1", "CALIB_AT_FRAC": "0.2"})


def test_muon_momentum_warmup():
    h = tg.Hyperparameters({"MUON_MOMENTUM_WARMUP_START": "0.8", "MUON_MOMENTUM": "0.9",
                            "MUON_MOMENTUM_WARMUP_STEPS": "10"})
    momentum = tg.TrainingSchedule(h).momentum
    assert momentum(0) == pytest.approx(0.8)
    assert momentum(5) == pytest.approx(0.85)
    assert momentum(50) == pytest.approx(0.9)


def test_feature_parameters_land_in_the_right_optimizer():
    from test_model import ALL_ON, BASE

    m = model(**ALL_ON)
    adam, muon = tg.build_optimizers(m, tg.Hyperparameters({**BASE, **ALL_ON}))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(mod.weight) for mod in m.modules() if isinstance(mod, tg.TernaryLinear)} | {
        id(m.embed_in.weight), id(m.embed_out.weight)}
    assert {id(p) for p in adam.param_groups[0]["params"]} == {id(m.tok_emb.weight), id(m.engram.table.weight)}
    small = {id(p) for p in adam.param_groups[1]["params"]}
    for p in (m.capsules.u, m.capsules.diag, m.feedback.gates, m.blocks[0].mlp.router, m.layer_scales):
        assert id(p) in small
    assert len(muon_ids) + sum(len(g["params"]) for g in adam.param_groups) == len(list(m.parameters()))


def test_idle_moe_expert_is_not_decayed():
    """An expert no token was routed to has zero gradient rows (up) / columns (down): weight decay spares them,
    while the experts that got tokens (and every dense matrix) are decayed."""
    h = tg.Hyperparameters({"MOE_ENABLED": "1", "MOE_EXPERTS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
                            "NUM_KV_HEADS": "2", "MLP_MULT": "2", "GROUP_SIZE": "32"})
    moe = tg.MoEMLP(h)
    with torch.no_grad():
        moe.down.weight.normal_()
        moe.router.zero_()
        moe.router[2] = 5.0  # positive inputs all route to expert 2
    x = torch.rand(3, 6, 64)
    moe(x)[0].square().sum().backward()
    assert moe.up.weight.grad.view(4, 32, 64)[[0, 1, 3]].abs().sum() == 0
    opt = tg.Muon([moe.up.weight, moe.down.weight], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5)
    up0, down0 = moe.up.weight.detach().clone(), moe.down.weight.detach().clone()
    opt.step()
    up_change = (moe.up.weight - up0).view(4, 32, 64).abs().sum(dim=(1, 2))
    down_change = (moe.down.weight - down0).view(64, 4, 32).abs().sum(dim=(0, 2))
    assert up_change[2] > 0 and down_change[2] > 0
    assert up_change[[0, 1, 3]].sum() == 0 and down_change[[0, 1, 3]].sum() == 0
    dense = torch.nn.Parameter(torch.randn(8, 8))
    dense.grad = torch.zeros(8, 8)
    dense.grad[0, 0] = 1.0
    before = dense.detach().clone()
    tg.Muon([dense], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5).step()
    assert (dense[1:, 1:] != before[1:, 1:]).all()  # no sparse_decay mark: decayed everywhere


class OneBatchLoader:
    def __init__(self, x, y):
        self.batch = [(x, y)]

    def next_batch(self):
        return self.batch


def test_train_step_clamps_capsule_dynamics_and_switches_depth_recurrence(monkeypatch):
    from test_model import FEATURES

    cfg = {**FEATURES["capsules"], **FEATURES["recur"], "RECUR_FROM_FRAC": "0.5", "ITERATIONS": "10",
           "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "FP_PHASE": "0"}  # no training_model: no QuantMix
    m = model(**cfg)
    h = tg.Hyperparameters({"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
                            "NUM_KV_HEADS": "2", "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2", **cfg})
    opts = tg.build_optimizers(m, h)
    with torch.no_grad():
        m.capsules.diag.fill_(2.0)
    seen, sched = [], tg.TrainingSchedule(h)
    forward = m.forward
    monkeypatch.setattr(m, "forward", lambda x, y, **kw: seen.append(kw["recur"]) or forward(x, y, **kw))
    idx = torch.randint(0, 128, (2, 12))
    for step in (0, 4, 5, 9):
        tg.train_step(m, m, OneBatchLoader(idx, idx), opts, h, sched, step, 0.0)
        assert m.capsules.diag.abs().max() <= h.capsule_max_decay
    assert seen == [False, False, True, True]  # recurrence from half of the 10 steps on
    tg.train_step(m, m, OneBatchLoader(idx, idx), opts, h, sched, 0, 0.0, {"recur": True})
    assert seen[-1] is True


# ---------------------------------------------------------------------------------------------------------------
# every parameter routed to its optimizer by an explicit rule (issue 15, "also")

FLAG_CONFIGS = {  # each feature flag with the small knobs test_model uses for it
    "SKC": {"SKC_ENABLED": "1", "SKC_CHUNK": "4", "SKC_PATTERN": "AS"},
    "PARALLEL": {"PARALLEL_RESIDUAL": "1"},
    "SHARED": {"SHARED_BLOCKS": "1", "SHARED_BLOCK_COUNT": "2"},
    "RECUR": {"DEPTH_RECUR": "1", "RECUR_START": "1", "RECUR_END": "3"},
    "CAPSULES": {"CAPSULES_ENABLED": "1", "CAPSULE_COUNT": "2", "CAPSULE_DIM": "16", "CAPSULE_CHUNK": "4",
                 "CAPSULE_LAYER": "1"},
    "FEEDBACK": {"FEEDBACK_ENABLED": "1", "FEEDBACK_PASSES": "3"},
    "ENGRAM": {"ENGRAM_ENABLED": "1", "ENGRAM_DIM": "8", "ENGRAM_BUCKETS": "64", "ENGRAM_LAYER": "1"},
    "MOE": {"MOE_ENABLED": "1", "MOE_EXPERTS": "2"},
    "XSA": {"XSA_ENABLED": "1"}, "VALUE_RESIDUAL": {"VALUE_RESIDUAL": "1"}, "SMEAR": {"SMEAR_GATE": "1"},
    "LAYER_SCALE": {"LAYER_SCALE": "1"},
    "HYBRID": {"HYBRID_INT": "1", "HYBRID_FAMILIES": "q,up"}, "LOG8": {"SCALE_FORMAT": "log8"},
    "FP_PHASE": {"FP_PHASE": "1"}, "EMBED_QAT": {"EMBED_QAT": "1", "EXPORT_EMBED": "int8"},
}
OFF = {"XSA_ENABLED": "0", "VALUE_RESIDUAL": "0", "SMEAR_GATE": "0"}  # the defaults that are on


def flag_grid(n=48, seed=0):
    """All flags off, all on, each alone, SKC-only layers, and n random combinations."""
    import random

    names = list(FLAG_CONFIGS)
    rng = random.Random(seed)
    combos = [(), tuple(names)] + [(f,) for f in names] + [tuple(rng.sample(names, rng.randint(2, 8))) for _ in range(n)]
    configs = []
    for combo in combos:
        env = dict(OFF)
        for f in combo:
            env.update(FLAG_CONFIGS[f])
        configs.append(env)
    configs.append({**FLAG_CONFIGS["SKC"], "SKC_PATTERN": "S"})  # no attention layer at all
    return configs


def test_every_parameter_is_routed_by_exactly_one_rule_for_every_flag_combination():
    from test_model import BASE

    used = set()
    for env in flag_grid():
        h = tg.Hyperparameters({**BASE, **env})
        torch.manual_seed(0)
        m = tg.GPT(h)
        adam, muon = tg.build_optimizers(m, h)
        groups = {"matrices": muon.param_groups[0]["params"], "tables": adam.param_groups[0]["params"],
                  "scalars": adam.param_groups[1]["params"]}
        routed = [id(p) for g in groups.values() for p in g]
        assert sorted(routed) == sorted(id(p) for p in m.parameters()), env  # each exactly once, none left out
        ternary = {id(mod.weight) for mod in m.modules() if isinstance(mod, tg.TernaryLinear)}
        linear = {id(mod.weight) for mod in m.modules() if type(mod) is torch.nn.Linear}
        tables = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Embedding)}
        assert {id(p) for p in groups["matrices"]} == ternary | linear, env
        assert {id(p) for p in groups["tables"]} == tables, env
        names = dict(m.named_parameters())
        used |= {pat for pat, _ in tg.optimizer_rules(h) if any(tg.fnmatch.fnmatchcase(n, pat) for n in names)}
    assert used == {pat for env in flag_grid() for pat, _ in tg.optimizer_rules(tg.Hyperparameters({**BASE, **env}))}


def test_a_parameter_no_rule_names_is_an_error():
    from test_model import BASE

    h = tg.Hyperparameters(BASE)
    m = tg.GPT(h)
    m.blocks[1].mlp.new_gain = torch.nn.Parameter(torch.ones(64))  # a feature that forgot its optimizer rule
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.new_gain.*no rule of optimizer_rules"):
        tg.build_optimizers(m, h)


def test_a_parameter_two_rules_name_is_an_error(monkeypatch):
    from test_model import BASE

    h = tg.Hyperparameters(BASE)
    rules = tg.optimizer_rules(h)
    monkeypatch.setattr(tg, "optimizer_rules", lambda h: rules + [("skip_*", "matrices")])
    with pytest.raises(RuntimeError, match=r"skip_weights.*2 rules"):
        tg.build_optimizers(tg.GPT(h), h)


def test_compiled_newton_schulz_covers_every_shape(monkeypatch):
    """COMPILE: Muon's Newton-Schulz is compiled once per matrix shape; with more shapes than dynamo's recompile
    limit the limit is raised, so none silently falls back to eager (fullgraph would fail loudly instead), and
    the steps equal the eager optimizer's. (Dynamo's eager backend keeps the test fast: graphs and guards are
    dynamo's; inductor's NS output matched eager to 7e-7 when checked by hand.)"""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    counters.clear()
    shapes = [(32, 16), (16, 48), (24, 24)]
    runs = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        opt = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5)
        if compiled:
            opt.compile_newton_schulz()
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    assert torch._dynamo.config.recompile_limit == 3 and counters["stats"]["unique_graphs"] == 3
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("knob, mode", [(None, None), ("default", None), ("max-autotune-no-cudagraphs",
                                                                          "max-autotune-no-cudagraphs"),
                                        ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_reaches_torch_compile_for_the_model_only(monkeypatch, knob, mode):
    """COMPILE_MODE is torch.compile's mode for the model (default: torch's own, mode=None); Muon's Newton-Schulz
    keeps its own fullgraph compile. Nothing compiles without use_compile."""
    calls = []
    monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: calls.append((fn, kw)) or fn)
    cfg = {"VOCAB_SIZE": "128", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2", **({"COMPILE_MODE": knob} if knob else {})}
    h = tg.Hyperparameters(cfg)
    tg.training_model(tg.GPT(h), h, 1, torch.device("cpu"), False)
    assert calls == []
    base = tg.GPT(h)
    model, _ = tg.training_model(base, h, 1, torch.device("cpu"), True)
    assert model is base and calls[0] == (base, {"dynamic": False, "mode": mode})
    assert calls[1:] and all(fn is tg.newton_schulz and "mode" not in kw for fn, kw in calls[1:])


@pytest.mark.parametrize("knob", ["0", "1"])
def test_combo_kernels_reaches_inductor_config(monkeypatch, knob):
    """COMBO_KERNELS=1 turns on inductor's combo_kernels before the model compiles; off, the config is left alone."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "combo_kernels", False)
    monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: fn)
    cfg = {"VOCAB_SIZE": "128", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2", "COMBO_KERNELS": knob}
    h = tg.Hyperparameters(cfg)
    tg.training_model(tg.GPT(h), h, 1, torch.device("cpu"), True)
    assert inductor_config.combo_kernels is (knob == "1")


def test_fp8_matmul_trains_close_to_the_bf16_run(shards, tmp_path):
    """FP8_MATMUL=1 on the CPU (the GEMM's emulation): the run trains, exports and scores, with other losses than the
    bf16 run of the same seed, close to them."""
    from conftest import log_values, run_train

    # inputs in whole blocks of 128; the quantizer on at once from step 3 of 6, so that the FP8 forward steers
    # several updates (on four steps, under softcap 15, the losses differed by 0.0005 at the last step only)
    shape = dict(MODEL_DIM=128, GROUP_SIZE=64, ITERATIONS=6, QAT_START_FRAC=0.5, QAT_RAMP_FRAC=0)
    runs = {}
    for fp8 in (0, 1):
        (tmp_path / str(fp8)).mkdir()
        r = run_train(shards, tmp_path / str(fp8), FP8_MATMUL=fp8, **shape)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[fp8] = r.stdout
    plain, fp8 = log_values(runs[0], "train_loss"), log_values(runs[1], "train_loss")
    assert len(fp8) == len(plain) >= 6 and fp8 != plain
    assert max(abs(a - b) for a, b in zip(fp8, plain)) < 0.05 * max(plain)
    assert "final_roundtrip" in runs[1]
