"""MLX port (train_gpt_mlx.py) against train_gpt.py: logits, loss, gradients and optimizer steps on the same
weights (in the FP phase too); the same batches and byte accounting; a smoke training run; artifacts across frameworks both ways
(and byte-identical serialization); flags the port does not implement are a clear error."""
import json
import math
import os
import re
import struct
import subprocess
import sys

import brotli
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as mnn  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

import train_gpt as tg  # noqa: E402
import train_gpt_mlx as tm  # noqa: E402
from conftest import ROOT, TINY, TOKENIZER, event_bpb, log_values, run_train  # noqa: E402
from test_model import model  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import runlog  # noqa: E402

MLX_SCRIPT = ROOT / "train_gpt_mlx.py"
MODEL_KEYS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "EMBED_DIM",
              "GROUP_SIZE", "TRAIN_SEQ_LEN")
SHAPE = {k: TINY[k] for k in MODEL_KEYS} | {"NUM_LAYERS": "3"}  # odd depth: the last layer gets no skip


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)  # the torch side runs on CPU too; fp32 on both


def torch_model(**overrides):
    return model(SHAPE, **overrides)  # test_model's perturbed GPT, at this file's shape


def mlx_copy(m, **overrides):
    mm = tm.GPT(tm.Hyperparameters({**SHAPE, **overrides}))
    tm.load_state(mm, {k: v.detach().numpy() for k, v in m.state_dict().items()})
    return mm


def batch(seed=0, rows=3, seq=64):
    """Tokens with documents: BOS (id 1) at a few positions of every row, the first row starts with one."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 1024, (rows, seq + 1), generator=g)
    idx[:, [0, 17, 40]] = 1
    idx[1, 0] = 5  # a row that starts mid-document
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def to_mx(t):
    return mx.array(t.numpy().astype(np.int32))


VARIANTS = [{}, {"XSA_ENABLED": "0", "VALUE_RESIDUAL": "0", "SMEAR_GATE": "0"},
            {"EMBED_DIM": "0", "MLP_ACT": "leaky_relu2", "ROPE_DIMS": "8", "LAYER_SCALE": "1", "LOGIT_SOFTCAP": "0"}]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_same_weights_same_logits(overrides):
    m = torch_model(**overrides).eval()
    mm = mlx_copy(m, **overrides)
    assert list(tm.state_dict(mm)) == list(m.state_dict())  # names and order map 1:1
    x, _ = batch()
    with torch.no_grad():
        ref = m.logits(x)[0].numpy()
    got = np.array(mm.logits(to_mx(x)))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale, (np.abs(got - ref).max(), scale)


def assert_same_loss_and_gradients(m, mm, x, y):
    """The torch model m and the MLX model mm give one batch the same loss and gradients."""
    loss = m(x, y)
    loss.backward()
    mloss, mgrads = mnn.value_and_grad(mm, lambda a, b: mm(a, b))(to_mx(x), to_mx(y))
    np.testing.assert_allclose(float(mloss), loss.item(), rtol=1e-5)
    mgrads = dict(tree_flatten(mgrads))
    assert set(mgrads) == {n for n, _ in m.named_parameters()}
    for name, p in m.named_parameters():
        ref, got = p.grad.numpy(), np.array(mgrads[name])
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        assert err < 1e-3, (name, err)  # fp32 sums in another order, through a dozen layers' backward


def test_same_loss_and_gradients():
    m = torch_model(Z_LOSS="1e-4")
    assert_same_loss_and_gradients(m, mlx_copy(m, Z_LOSS="1e-4"), *batch(1))


@pytest.mark.parametrize("q", [0.0, 0.375, 1.0])
def test_fp_phase_same_loss_and_gradients(q):
    """FP_PHASE at quant_mix q (0: the latent weights, 1: ternary, between: the ramp's blend), train_gpt.py's
    QuantMix against the port's on the same weights: the same logits, loss and straight-through gradients. Below
    q = 1 the logits are far from the quantized model's, so this is not the plain comparison again."""
    m = torch_model(FP_PHASE="1")
    mm = mlx_copy(m, FP_PHASE="1")
    x, y = batch(2)
    with torch.no_grad():
        plain = m.logits(x)[0].numpy()
    tg.QuantMix(m).set(q)
    tm.QuantMix(mm).set(q)
    with torch.no_grad():
        ref = m.logits(x)[0].numpy()
    scale = np.abs(ref).max()
    assert np.abs(np.array(mm.logits(to_mx(x))) - ref).max() <= 1e-4 * scale
    assert np.array_equal(ref, plain) if q == 1 else np.abs(ref - plain).max() > 0.05 * scale
    assert_same_loss_and_gradients(m, mm, x, y)


def test_fp_phase_at_one_and_after_finish_is_the_plain_model():
    """q = 1 computes bit for bit what the plain TernaryLinears compute, loss and gradients; q stays out of the
    parameters (no gradient, no optimizer, no export); finish() leaves the plain layers and state behind."""
    m = torch_model()
    plain, fp = mlx_copy(m), mlx_copy(m, FP_PHASE="1")
    mix = tm.QuantMix(fp)
    x, y = (to_mx(t) for t in batch(3))
    for model in (plain, fp):
        model.result = mnn.value_and_grad(model, lambda a, b: model(a, b))(x, y)
    assert float(fp.result[0]) == float(plain.result[0])
    for (name, g), (_, h) in zip(tree_flatten(plain.result[1]), tree_flatten(fp.result[1]), strict=True):
        assert np.array_equal(np.array(g), np.array(h)), name
    assert list(tm.state_dict(fp)) == list(tm.state_dict(plain))
    assert all(type(m) is tm.FPPhaseTernaryLinear and "_quant_mix" in m for m in mix.layers)
    mix.set(0.0)
    mix.finish()
    assert all(type(m) is tm.TernaryLinear and "_quant_mix" not in m for m in mix.layers)
    assert float(fp(x, y)) == float(plain(x, y))


def test_fp_phase_schedule_and_checks_are_train_gpts():
    """quant_mix at every step and clock of a few schedules (steps or wall clock ahead, a ramp or a switch), and
    the start check with train_gpt.py's message."""
    for env in ({"QAT_START_FRAC": "0.3"}, {"QAT_START_FRAC": "0.25", "QAT_RAMP_FRAC": "0.4"},
                {"QAT_START_FRAC": "0", "QAT_RAMP_FRAC": "0.5"}, {"QAT_START_FRAC": "0.5", "MAX_WALLCLOCK_SECONDS": "0"}):
        env = {"FP_PHASE": "1", "ITERATIONS": "20", "MAX_WALLCLOCK_SECONDS": "10", **env}
        sched, h = tg.TrainingSchedule(tg.Hyperparameters(env)), tm.Hyperparameters(env)
        for step in range(21):
            for elapsed in (0.0, 2.4, 2.5, 5.0, 7.0, 9.99):
                assert tm.quant_mix(step, elapsed, h) == sched.quant_mix(step, elapsed), (env, step, elapsed)
    bad = {"FP_PHASE": "1", "QAT_START_FRAC": "0.7", "QAT_RAMP_FRAC": "0.3"}
    with pytest.raises(tg.ConfigError) as want:
        tg.Hyperparameters(bad)
    with pytest.raises(tm.ConfigError, match=re.escape(str(want.value))):
        tm.Hyperparameters(bad)
    tm.Hyperparameters({**bad, "FP_PHASE": "0"})  # only the FP phase has to end on the quantizer


def test_optimizer_steps_match():
    """Two Muon + Adam steps from the same weights and batches move the weights the same way (schedule and
    weight decay included). Compared as whole updates (L2): Adam turns a tiny gradient entry into a full-size
    step, so the few entries whose gradient is ~0 differ elementwise at the fp32 noise level."""
    env = {"WARMUP_STEPS": "2", "ADAM_WD": "0.01", "MUON_WD": "0.01", "ITERATIONS": "4"}
    m = torch_model(**env)
    mm = mlx_copy(m, **env)
    start = {k: v.clone().numpy() for k, v in m.state_dict().items()}
    h = tg.Hyperparameters({**SHAPE, **env})
    opts, mopts = tg.build_optimizers(m, h), tm.Optimizers(mm, tm.Hyperparameters({**SHAPE, **env}))
    grad_fn = tm.make_grad_fn(mm, use_compile=False)
    sched = tg.TrainingSchedule(h)
    for step in range(2):
        x, y = batch(step)
        for opt in opts:  # train_gpt.train_step's schedule
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * sched.lr(step, 0.0)
                if isinstance(opt, tg.Muon):
                    g["momentum"] = sched.momentum(step)
        m(x, y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _, grads = grad_fn(to_mx(x), to_mx(y))
        mopts.step(mm, dict(tree_flatten(grads)), step, 0.0)
    for name, p in m.state_dict().items():
        ref, got = p.numpy() - start[name], np.array(tm.state_dict(mm)[name]) - start[name]
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        assert err < 1e-3, (name, err)


class TwoLayers(mnn.Module):
    """make_grad_fn's contract (model(x, y) -> a scalar loss) on two TernaryLinears: small enough that mx.compile
    builds its kernels in seconds on the CPU, where the whole model takes half a minute."""

    def __init__(self):
        super().__init__()
        mx.random.seed(0)
        self.a, self.b = tm.TernaryLinear(32, 64, 32), tm.TernaryLinear(64, 32, 32)

    def __call__(self, x, y):
        return mx.square(self.b(mnn.relu(self.a(x))) - y).mean()


def assert_same_step(want, got, rtol=1e-6):
    (loss, grads), (mloss, mgrads) = want, got
    np.testing.assert_allclose(float(mloss), float(loss), rtol=rtol)
    grads, mgrads = dict(tree_flatten(grads)), dict(tree_flatten(mgrads))
    assert set(grads) == set(mgrads)
    for name, g in grads.items():
        np.testing.assert_allclose(np.array(mgrads[name]), np.array(g), rtol=rtol, atol=1e-7, err_msg=name)


def test_the_compiled_step_follows_the_weights():
    """COMPILE=1: the compiled step gives the eager step's loss and gradients, call after call while the weights
    move (it failed at its second call once: make_grad_fn has to hand the model's state back to mx.compile)."""
    m = TwoLayers()
    eager, compiled = tm.make_grad_fn(m, use_compile=False), tm.make_grad_fn(m, use_compile=True)
    x, y = mx.random.normal((4, 32)), mx.random.normal((4, 32))
    for _ in range(3):
        want = eager(x, y)
        got = compiled(x, y)
        assert_same_step(want, got)
        m.update(tree_map(lambda p, g: p - 0.5 * g, m.parameters(), want[1]))


def test_fp_phase_compiles_one_graph_for_every_q(monkeypatch):
    """COMPILE=1 with FP_PHASE: q is an input of the compiled step, not a constant baked into it: the step traces
    once, and at every q after that gives the eager step's loss and gradients."""
    traces = []
    monkeypatch.setattr(TwoLayers, "__call__", lambda self, x, y: traces.append(1) or mx.square(
        self.b(mnn.relu(self.a(x))) - y).mean())
    m = TwoLayers()
    mix = tm.QuantMix(m)
    eager, compiled = tm.make_grad_fn(m, use_compile=False), tm.make_grad_fn(m, use_compile=True)
    x, y = mx.random.normal((4, 32)), mx.random.normal((4, 32))
    losses = []
    for q in (0.0, 0.5, 1.0, 0.25):
        mix.set(q)
        want = eager(x, y)
        before = len(traces)
        assert_same_step(want, compiled(x, y))
        assert len(traces) == before + (q == 0.0)  # the first call traces; no other q does
        losses.append(float(want[0]))
    assert len(set(losses)) == 4


def test_same_batches_as_the_torch_loader(shards):
    h_env = {**TINY, "DATA_PATH": str(shards), "GRAD_ACCUM_STEPS": "2"}
    pattern = str(shards / "fineweb_train_*.bin")
    ref = tg.DistributedTokenLoader(pattern, tg.Hyperparameters(h_env), 0, 1, torch.device("cpu"))
    got = tm.TokenLoader(pattern, tm.Hyperparameters(h_env))
    try:
        for _ in range(3):
            for (rx, ry), (gx, gy) in zip(ref.next_batch(), got.next_batch(), strict=True):
                assert np.array_equal(rx.numpy(), np.array(gx)) and np.array_equal(ry.numpy(), np.array(gy))
    finally:
        ref.close()


def test_byte_accounting_matches_train_gpt():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    ref, got = tg.build_byte_luts(sp, 1024), tm.build_byte_luts(sp, 1024)
    for r, g in zip(ref, got, strict=True):
        assert np.array_equal(r, g)
    x, y = (t.numpy() for t in batch())
    assert np.array_equal(tg.target_bytes(x, y, ref), tm.target_bytes(x, y, got))


def payload_parts(payload):
    """(header, {float tensor name: bytes}, trits of all ternary tensors, their fp16 scales) of a payload."""
    header, body = tg.read_header(payload)
    floats = {t["name"]: payload[body + t["offset"] : body + t["offset"] + t["nbytes"]]
              for t in header["tensors"] if t["kind"] != "ternary"}
    shapes = [tuple(t["shape"]) for t in header["tensors"] if t["kind"] == "ternary"]
    (t_off, t_len), (s_off, s_len) = header["trits"], header["scales"]
    trits = tg.TRIT_PACKERS[header["trit_packing"]][1](payload[body + t_off : body + t_off + t_len], shapes)
    return header, floats, trits, tg.from_fp16_planes(payload[body + s_off : body + s_off + s_len])


FORMATS = [{"EXPORT_FLOAT": "fp16"}, {"EXPORT_FLOAT": "fp8", "EXPORT_EMBED": "fp8"},
           {"EXPORT_FLOAT": "int6", "EXPORT_EMBED": "int8"}, {"EXPORT_EMBED": "int4"}]


@pytest.mark.parametrize("formats", FORMATS, ids=lambda f: "-".join(f.values()))
def test_same_weights_serialize_alike(formats):
    """Same table, same float bytes (fp16, fp8 through the numpy e4m3 encoder, the per-row int codes), same trits,
    for every trit packing. A ternary scale may differ by one fp16 ulp: the two frameworks sum a group's absmean in
    different orders, so a group whose fp32 absmean lands on an fp16 rounding tie can round either way (here 1 group
    of 3,000); its trits (and so the packed trit stream's length) may differ with it."""
    m = torch_model()
    mm = mlx_copy(m)
    h = tg.Hyperparameters(formats)
    for packing in tg.TRIT_PACKERS:
        ref_payload = tg.serialize_model(m, h, packing)
        ref, got = payload_parts(ref_payload), payload_parts(tm.serialize_model(mm, tm.Hyperparameters(formats), packing))
        assert ref[0]["tensors"] == got[0]["tensors"]  # names, shapes, formats, offsets, sizes
        assert ref[1] == got[1]  # every float tensor's bytes
        ternary = [t for t in ref[0]["tensors"] if t["kind"] == "ternary"]
        same = np.repeat(ref[3] == got[3], [t["group_size"] for t in ternary for _ in range(
            math.prod(t["shape"]) // t["group_size"])])
        assert np.array_equal(ref[2][same], got[2][same])
        ulps = np.abs(ref[3].view(np.int16).astype(int) - got[3].view(np.int16).astype(int))
        assert ulps.max() <= 1 and (ulps > 0).sum() <= max(1, ulps.size // 1000), ulps.sum()
        ref_state, got_state = tg.deserialize_state(ref_payload, h), tm.deserialize_state(ref_payload)
        for name, t in ref_state.items():  # both loaders read one payload to the same numbers
            assert np.array_equal(t.numpy(), got_state[name]), name


@pytest.mark.parametrize("formats", FORMATS[1:], ids=lambda f: "-".join(f.values()))
def test_torch_artifact_formats_load_into_mlx(formats, tmp_path):
    """An artifact train_gpt.py writes in each float format and trit packing gives the MLX model the torch model's
    logits; one in a format MLX does not know is refused with an ArtifactError naming the file."""
    m = torch_model().eval()
    h = tg.Hyperparameters({**SHAPE, **formats})
    x, _ = batch()
    for packing in tg.TRIT_PACKERS:
        path = tmp_path / f"{packing}.ptz"
        path.write_bytes(brotli.compress(tg.serialize_model(m, h, packing)))
        ref = tg.GPT(h).eval()
        ref.load_state_dict(tg.load_artifact(str(path), h))
        mm = tm.GPT(tm.Hyperparameters({**SHAPE, **formats}))
        tm.load_state(mm, tm.load_artifact(path))
        with torch.no_grad():
            want = ref.logits(x)[0].numpy()
        assert np.abs(np.array(mm.logits(to_mx(x))) - want).max() <= 1e-4 * np.abs(want).max(), packing
    payload = tg.serialize_model(m, h, "rans")
    hlen = struct.unpack("<I", payload[5:9])[0]
    header = json.loads(payload[9 : 9 + hlen])
    header.pop("sha256")  # an edited header: as written before the checksum, else that is what the loader reports
    header["tensors"] = [dict(t, kind="int3") if t["name"] == "tok_emb.weight" else t for t in header["tensors"]]
    new = json.dumps(header, separators=(",", ":")).encode()
    (tmp_path / "odd.ptz").write_bytes(brotli.compress(payload[:5] + struct.pack("<I", len(new)) + new + payload[9 + hlen :]))
    with pytest.raises(tm.ArtifactError, match=r"odd\.ptz: tensor tok_emb.weight is stored as 'int3'"):
        tm.load_artifact(tmp_path / "odd.ptz")
    log8 = {**SHAPE, **formats, "SCALE_FORMAT": "log8"}
    (tmp_path / "log8.ptz").write_bytes(brotli.compress(tg.serialize_model(model(log8), tg.Hyperparameters(log8), "rans")))
    with pytest.raises(tm.ArtifactError, match=r"log8\.ptz: ternary scales stored as 'log8' \(SCALE_FORMAT=log8\)"):
        tm.load_artifact(tmp_path / "log8.ptz")
    hybrid = {**SHAPE, **formats, "HYBRID_INT": "1"}
    (tmp_path / "hybrid.ptz").write_bytes(brotli.compress(tg.serialize_model(model(hybrid), tg.Hyperparameters(hybrid), "rans")))
    with pytest.raises(tm.ArtifactError, match=r"hybrid\.ptz: block matrices in an int format \(HYBRID_INT"):
        tm.load_artifact(tmp_path / "hybrid.ptz")


@pytest.fixture(scope="module")
def mlx_run(shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("mlx_run")
    r = run_train(shards, work, script=MLX_SCRIPT, ITERATIONS=12, MATRIX_LR=0.04, EMBED_LR=0.05, WARMDOWN_FRAC=0.3,
                  VAL_LOSS_EVERY=5)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, work


def test_smoke_run_loss_falls_and_log_parses(mlx_run):
    r, work = mlx_run
    losses = log_values(r.stdout, "train_loss")
    assert losses[0] > 6.5  # ln(1024) = 6.93 at init
    assert sum(losses[-3:]) / 3 < losses[0] - 0.8
    run = runlog.parse_run_log((work / "logs" / "ternary.txt").read_text())
    assert run["finished"] and run["steps"] == 12 and len(run["curve"]) == 12
    assert run["model_bytes"] == (work / "model.ptz").stat().st_size
    assert run["config"]["SKC_ENABLED"] == "False" and run["config"]["XSA_ENABLED"] == "True"
    assert abs(run["final_val_bpb"] - run["pre_export_val_bpb"]) < 0.01  # fp16 storage of the small params only
    # mid-run validation at every VAL_LOSS_EVERY steps, skipped at the last step (pre_export scores that one)
    assert re.findall(r"^step:(\d+) val_loss:", r.stdout, re.M) == ["5", "10"]


def test_fp_phase_run_leaves_it_where_train_gpt_does(shards, tmp_path):
    """FP_PHASE in a run that ends inside the ramp: qat_start at the step train_gpt.py's schedule gives (the first
    with q > 0: the ramp's first step has q = 0), and the model the run scores before export is the quantized one
    (finish(), q = 1) that the artifact holds."""
    env = dict(FP_PHASE=1, QAT_START_FRAC=0.5, QAT_RAMP_FRAC=0.45, ITERATIONS=10, WARMDOWN_FRAC=0.3)
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    sched = tg.TrainingSchedule(tg.Hyperparameters({**TINY, **{k: str(v) for k, v in env.items()}}))
    assert [sched.quant_mix(s, 0.0) > 0 for s in (5, 6)] == [False, True] and sched.quant_mix(9, 0.0) < 1
    assert log_values(r.stdout, "qat_start step") == [6]
    assert abs(log_values(r.stdout, "gap_bpb")[0]) < 5e-4  # fp16 small parameters only (the ramp's q: 0.003)


def test_other_ported_knobs_and_the_wall_clock_stop(shards, tmp_path):
    """Row-norm Muon, weight decay, accumulation, clipping, mid-run validation; MAX_WALLCLOCK_SECONDS ends
    the run long before ITERATIONS, and the exported weights are the ones pre_export scored. How many steps
    fit in 1.5 s depends on the machine (a slow CI runner may stop at step 1 or 2), so the validation steps are
    checked against the step count the run reached rather than against a fixed step."""
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=1.5,
                  MUON_ROW_NORM=1, MUON_WD=0.01, ADAM_WD=0.01, GRAD_ACCUM_STEPS=2, GRAD_CLIP_NORM=1.0,
                  VAL_LOSS_EVERY=2, EXPORT_FLOAT="fp8")
    assert r.returncode == 0, r.stdout + r.stderr
    run = runlog.parse_run_log(r.stdout)
    assert 1 <= run["steps"] < 1000 and run["train_seconds"] >= 1.5
    val_steps = [int(s) for s in re.findall(r"^step:(\d+) val_loss:", r.stdout, re.M)]
    assert val_steps == list(range(2, run["steps"], 2))
    assert abs(run["final_val_bpb"] - run["pre_export_val_bpb"]) < 0.02  # fp8 small params


def test_over_cap_keeps_the_blob_and_fails(shards, tmp_path):
    (tmp_path / "model.ptz").write_bytes(b"old")
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, ITERATIONS=1, ARTIFACT_CAP_BYTES=1000)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR artifact over cap" in r.stdout and "final_roundtrip" not in r.stdout
    assert (tmp_path / "model.ptz").read_bytes() == b"old" and (tmp_path / "model.ptz.over_cap").stat().st_size > 1000

    assert (tmp_path / "logs" / "ternary.txt").read_text().splitlines()[-1].startswith("error: code + model is over")


def test_a_log_holds_one_run_and_ends_with_its_error(shards, tmp_path):
    """As in train_gpt.py: a failed run's log ends with its `error:` line, and a RUN_ID whose log exists is
    refused at start with the log left as it was."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, DATA_PATH=empty)
    log = tmp_path / "logs" / "ternary.txt"
    assert r.returncode == 2 and log.read_text().splitlines()[-1] == r.stderr.strip().splitlines()[-1]
    assert log.read_text().splitlines()[-1].startswith("error: no shard matches")
    before = log.read_bytes()
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, ITERATIONS=1)
    assert r.returncode == 2 and f"error: {log} already exists" in r.stderr, r.stdout + r.stderr
    assert log.read_bytes() == before and not (tmp_path / "model.ptz").exists()


@pytest.mark.parametrize("steps, error", [(6, "error: training diverged at step 3: train_loss:nan"),
                                          (2, "error: the trained weights are not finite")])
def test_a_diverged_run_writes_no_model(shards, tmp_path, steps, error):
    """EMBED_LR=1e30: the loss is NaN from step 3 (the run stops there), and after 2 steps the weights are
    already non-finite while both logged losses are not. Exit 1 either way, the artifact on disk untouched."""
    (tmp_path / "model.ptz").write_bytes(b"good")
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, ITERATIONS=steps, EMBED_LR=1e30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (tmp_path / "logs" / "ternary.txt").read_text().splitlines()[-1].startswith(error)
    assert "step:4/" not in r.stdout and "pre_export" not in r.stdout
    assert (tmp_path / "model.ptz").read_bytes() == b"good"


def val_setup(shards):
    import sentencepiece as spm

    h_env = {**TINY, "DATA_PATH": str(shards)}
    tokens = tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), 1024, int(TINY["MAX_VAL_TOKENS"]))
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=TOKENIZER), 1024)
    return h_env, tokens, luts


def torch_score(path, h_env, tokens, luts):
    h = tg.Hyperparameters(h_env)
    m = tg.GPT(h)
    m.load_state_dict(tg.load_artifact(path, h))
    return m, tg.evaluate(m, tokens, luts, h, 0, 1, torch.device("cpu"))[1]


def test_mlx_artifact_scores_the_same_in_torch(mlx_run, shards):
    r, work = mlx_run
    h_env, tokens, luts = val_setup(shards)
    _, bpb = torch_score(work / "model.ptz", h_env, tokens, luts)
    assert abs(bpb - event_bpb(r.stdout, "final_roundtrip")) < 1e-4  # the log prints 4 decimals


def test_torch_artifact_loads_into_mlx(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=4)
    assert r.returncode == 0, r.stdout + r.stderr
    h_env, tokens, luts = val_setup(shards)
    m, bpb = torch_score(tmp_path / "model.ptz", h_env, tokens, luts)
    mm = tm.GPT(tm.Hyperparameters(h_env))
    tm.load_state(mm, tm.load_artifact(tmp_path / "model.ptz"))
    mbpb = tm.evaluate(mm, tokens, luts, tm.Hyperparameters(h_env))[1]
    assert abs(mbpb - bpb) < 1e-5 and abs(mbpb - event_bpb(r.stdout, "final_roundtrip")) < 1e-4
    x, _ = batch()
    with torch.no_grad():
        ref = m.logits(x)[0].numpy()
    assert np.abs(np.array(mm.logits(to_mx(x))) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["SKC_ENABLED", "PARALLEL_RESIDUAL", "SHARED_BLOCKS", "DEPTH_RECUR",
                                  "CAPSULES_ENABLED", "FEEDBACK_ENABLED", "ENGRAM_ENABLED", "MOE_ENABLED",
                                  "TEMPERATURE_SEARCH", "TTT_ENABLED", "EVAL_ENGRAM", "TERNARY_CALIB", "EMBED_QAT",
                                  "HYBRID_INT", "ATTN_GATE"])
def test_unported_flag_is_a_clear_error(name):
    with pytest.raises(tm.ConfigError, match=f"{name}=True is not implemented in train_gpt_mlx.py"):
        tm.Hyperparameters({name: "1"})
    with pytest.raises(tm.ConfigError, match="EVAL_STRIDE=16 is not implemented"):
        tm.Hyperparameters({"EVAL_STRIDE": "16"})
    with pytest.raises(tm.ConfigError, match="SCALE_FORMAT=log8 is not implemented"):
        tm.Hyperparameters({"SCALE_FORMAT": "log8"})


def test_the_same_knobs_as_train_gpt():
    """The port reads every env var train_gpt.py reads, with the same default: a knob added there has to come here
    too, ported or refused in UNPORTED."""
    ours = {k.name: k.default for k in vars(tm.Hyperparameters).values() if isinstance(k, tm.Knob)}
    theirs = {k.name: k.default for k in vars(tg.Hyperparameters).values() if isinstance(k, tg.Knob)}
    assert ours == theirs


def test_unported_flag_stops_the_script(shards, tmp_path):
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, SKC_ENABLED=1)
    assert r.returncode == 2
    assert "SKC_ENABLED=True is not implemented in train_gpt_mlx.py" in r.stderr
    r = run_train(shards, tmp_path, script=MLX_SCRIPT, WORLD_SIZE=2)
    assert r.returncode == 2 and "WORLD_SIZE=2" in r.stderr


def test_runs_without_torch():
    code = "import sys; sys.modules['torch'] = None; import train_gpt_mlx; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_mac_launcher_prints_what_it_runs(shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY, DATA_PATH=str(shards), LOG_DIR=str(tmp_path / "logs"), ARTIFACT_PATH=str(tmp_path / "m.ptz"),
               ITERATIONS="2", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run([str(ROOT / "run_mlx_reasoner.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"running: {sys.executable} train_gpt_mlx.py" in r.stdout and "MAX_VAL_TOKENS=4096" in r.stdout
    assert "final_roundtrip" in r.stdout


def test_the_same_start_checks_as_train_gpt(tmp_path):
    """Issue 15: the port checks every shard's token range, refuses empty shards without spinning, and checks the
    tokenizer against the shards' fingerprint, with train_gpt.py's messages."""
    from test_data import write_fingerprint, write_shard

    write_shard(tmp_path / "fineweb_train_000000.bin", np.zeros(0))
    toks = np.arange(300) % 1000
    toks[299] = 1500
    write_shard(tmp_path / "fineweb_train_000001.bin", toks)
    files = tg.shard_files(str(tmp_path / "fineweb_train_*.bin"))
    for mod in (tg, tm):
        with pytest.raises(mod.DataError, match="fineweb_train_000000.bin: 0 tokens"):
            mod.check_shards(files, 1024)
        with pytest.raises(mod.DataError, match="no tokens"):
            mod.TokenStream(files[:1], 1024, 0).take(3)
        assert mod.shard_token_error(files[1], 1024).endswith("token id 1500 at position 299 >= VOCAB_SIZE=1024")
        write_fingerprint(tmp_path, "ef" * 32)
        with pytest.raises(mod.DataError, match="is not the tokenizer that made the shards"):
            mod.tokenizer_fingerprint(tmp_path, TOKENIZER, 1024)


@pytest.mark.parametrize("case", ["empty", "truncated", "bad_json", "unknown_packing", "unknown_kind", "short_payload",
                                  "bad_shape", "checksum"])
def test_a_corrupt_artifact_is_the_same_clear_error_here(tmp_path, case):
    from test_export import corrupt, small_payload

    data, message = corrupt(case, small_payload())
    path = tmp_path / f"{case}.ptz"
    path.write_bytes(data)
    with pytest.raises(tm.ArtifactError, match=re.escape(message)) as e:
        tm.load_artifact(str(path))
    assert str(path) in str(e.value)


def test_output_paths_are_checked_at_start_here_too(tmp_path):
    env = {"LOG_DIR": str(tmp_path / "logs")}
    (tmp_path / "adir").mkdir()
    for path, reason in ((tmp_path / "adir", "is a directory"), (tmp_path / "no" / "a.ptz", "does not exist")):
        with pytest.raises(tm.ConfigError, match=f"ARTIFACT_PATH=.*{reason}"):
            tm.check_outputs(tm.Hyperparameters({**env, "ARTIFACT_PATH": str(path)}))
    with pytest.raises(tm.ConfigError, match="LOG_DIR=/proc/x: cannot create"):
        tm.check_outputs(tm.Hyperparameters({"LOG_DIR": "/proc/x", "ARTIFACT_PATH": str(tmp_path / "a.ptz")}))


@pytest.mark.parametrize("env", [{"GROUP_SIZE": "48"}, {"MLP_MULT": "2.25"}, {"MLP_MULT": "2.7"}, {"BOS_ID": "1024"}])
def test_the_same_shape_errors_as_train_gpt(env):
    full = {**SHAPE, **env}
    with pytest.raises(tg.ConfigError) as ours:
        tg.Hyperparameters(full)
    with pytest.raises(tm.ConfigError) as theirs:
        tm.Hyperparameters(full)
    assert str(ours.value) == str(theirs.value)
