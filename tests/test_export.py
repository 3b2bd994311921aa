"""Export: trit packing against slow references, artifact round trip (ternary bit-exact, floats within their
precision, identical logits), and the over-cap path."""

import re

import brotli
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import event_bpb, log_values, run_train
from test_model import model


def slow_base3(trits):
    out = []
    digits = [int(t) + 1 for t in trits] + [1] * ((-len(trits)) % 5)
    for i in range(0, len(digits), 5):
        out.append(sum(d * 3**k for k, d in enumerate(digits[i : i + 5])))
    return bytes(out)


@pytest.mark.parametrize("n", [1, 5, 7, 1000, 1003])
def test_trit_packers_roundtrip_and_match_reference(n):
    trits = np.random.default_rng(n).integers(-1, 2, n).astype(np.int8)
    packed = tg.pack_trits_base3(trits)
    assert packed == slow_base3(trits) and len(packed) == -(-n // 5)
    np.testing.assert_array_equal(tg.unpack_trits_base3(packed, n), trits)
    packed2 = tg.pack_trits_2bit(trits)
    assert len(packed2) == -(-n // 4)
    first4 = list(trits[:4]) + [0] * (4 - len(trits[:4]))  # padding is the zero trit
    assert packed2[0] == sum((int(t) + 1) << (2 * k) for k, t in enumerate(first4))
    np.testing.assert_array_equal(tg.unpack_trits_2bit(packed2, n), trits)


def fp16_exact(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


@pytest.mark.parametrize("packing", ["base3", "2bit"])
def test_roundtrip_is_exact(packing):
    m = fp16_exact(model()).eval()
    h = tg.Hyperparameters({"EXPORT_FLOAT": "fp16"})
    state = tg.deserialize_state(tg.serialize_model(m, h, packing))
    fresh = model().eval()
    fresh.load_state_dict(state)
    for name, mod in tg.ternary_modules(m).items():
        t0, s0 = tg.ternary_quantize(mod.weight, mod.group_size)
        t1, s1 = tg.ternary_quantize(state[name], mod.group_size)
        assert torch.equal(t0, t1) and torch.equal(s0, s1), name
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])  # identical, not close
    assert tg.serialize_model(fresh, h, packing) == tg.serialize_model(m, h, packing)  # re-export is idempotent


def test_float_params_within_their_precision():
    m = model().eval()
    for kind, rtol in [("fp16", 2**-11), ("fp8", 2**-3)]:
        state = tg.deserialize_state(tg.serialize_model(m, tg.Hyperparameters({"EXPORT_FLOAT": kind})))
        ternary = tg.ternary_modules(m)
        for name, p in m.state_dict().items():
            if name not in ternary:
                ref = p.float()
                tol = rtol * ref.abs().amax(dim=-1, keepdim=True) if kind == "fp8" else rtol * ref.abs()
                assert ((state[name] - ref).abs() <= tol + 1e-7).all(), (kind, name)
        fresh = model().eval()
        fresh.load_state_dict(state)
        idx = torch.randint(0, 128, (1, 16))
        torch.testing.assert_close(fresh.logits(idx)[0], m.logits(idx)[0], rtol=0.1, atol=0.1)


def test_bad_payload_magic():
    with pytest.raises(tg.ArtifactError, match="bad magic"):
        tg.deserialize_state(b"NOPE" + b"\x00" * 20)


def test_compress_keeps_the_smaller_packing_and_reloads(tmp_path):
    m = fp16_exact(model())
    h = tg.Hyperparameters({"BROTLI_QUALITY": "5"})
    packing, blob = tg.compress_model(m, h, log=lambda s: None)
    other = "2bit" if packing == "base3" else "base3"
    assert len(blob) <= len(brotli.compress(tg.serialize_model(m, h, other), quality=5, lgwin=24))
    path = tmp_path / "a.ptz"
    tg.write_atomic(str(path), blob)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ptz"]  # no temp file left behind
    fresh = model()
    fresh.load_state_dict(tg.load_artifact(str(path)))
    idx = torch.randint(0, 128, (1, 8))
    assert torch.equal(fresh.logits(idx)[0], m.logits(idx)[0])


@pytest.mark.slow
def test_over_cap_fails_loudly_and_keeps_good_artifact(shards, tmp_path):
    good = tmp_path / "model.ptz"
    good.write_bytes(b"previous good artifact")
    r = run_train(shards, tmp_path, ITERATIONS=2, ARTIFACT_CAP_BYTES=50_000)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR artifact over cap" in r.stdout
    assert good.read_bytes() == b"previous good artifact"
    kept = tmp_path / "model.ptz.over_cap"
    assert kept.stat().st_size == log_values(r.stdout, "model_bytes")[0]
    assert "final_roundtrip" not in r.stdout


@pytest.mark.parametrize("feature", ["skc", "shared", "recur", "capsules", "feedback", "engram", "moe", "xsa",
                                     "value_residual", "smear", "layer_scale", "all"])
def test_feature_parameters_roundtrip_through_the_artifact(feature):
    """Every parameter a feature adds is in the artifact: a fresh model loaded from it gives identical logits,
    and the payload grows by the feature's own tensors."""
    from test_model import BASE, FEATURES

    cfg = FEATURES[feature]
    m = fp16_exact(model(**cfg)).eval()
    h = tg.Hyperparameters({**BASE, **cfg})
    payload = tg.serialize_model(m, h)
    state = tg.deserialize_state(payload)
    assert set(state) == set(m.state_dict())
    fresh = tg.GPT(h).eval()
    fresh.load_state_dict(state)
    idx = torch.randint(0, 128, (2, 19))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])
    if feature == "engram":
        plain = tg.serialize_model(fp16_exact(model()), tg.Hyperparameters(BASE))
        table_bytes = 4 * 64 * 8 * 2  # 2 orders x 2 heads x 64 buckets x dim 8, fp16
        assert len(payload) - len(plain) > table_bytes  # the tables (and their gate and projection) count


# ---------------------------------------------------------------------------------------------------------------
# checkpoint: one trained model scored again under other post-training settings

POST = dict(TEMPERATURE_SEARCH=1, TEMPERATURE_TOKENS=2048, TERNARY_CALIB=1, CALIB_TOKENS=1024, CALIB_MAX_EVALS=6,
            EVAL_STRIDE=32)


def without_timings(text, event):
    """The `event` line of a log with its seconds fields dropped (those differ between runs)."""
    line = next(l for l in text.splitlines() if l.startswith(event))
    return re.sub(r"\S*seconds:\S+", "", line)


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["calib_after", "calib_aligned"])
def saved(request, shards, tmp_path_factory):
    """A training run that writes its checkpoint, then runs calibration, temperature, export and the sliding score
    itself; CALIB_AT_FRAC=0.5 calibrates halfway through training instead (the checkpoint must carry that)."""
    work = tmp_path_factory.mktemp("ckpt")
    knobs = dict(ITERATIONS=6, EMA_ENABLED=1, CALIB_AT_FRAC=request.param, CHECKPOINT_PATH=work / "ckpt.pt", **POST)
    r = run_train(shards, work, CHECKPOINT_SAVE=1, **knobs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpoint_saved" in r.stdout and (work / "ckpt.pt").exists()
    return work, r, knobs


def test_rescoring_a_checkpoint_reproduces_the_training_run(saved, shards, tmp_path):
    work, trained, knobs = saved
    r = run_train(shards, tmp_path, EVAL_FROM_CHECKPOINT=1, **knobs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train_done" not in r.stdout and "train_loss" not in r.stdout  # nothing trained
    aligned = knobs["CALIB_AT_FRAC"] < 1
    loaded = int(re.search(r"^checkpoint_loaded .*calibrated_tensors:(\d+)", r.stdout, re.M).group(1))
    assert (loaded > 0) == aligned  # only an export-aligned run's thresholds travel in the checkpoint
    events = ["temperature", "pre_export", "artifact ", "final_roundtrip"] + ([] if aligned else ["calibration"])
    for event in events:
        assert without_timings(r.stdout, event) == without_timings(trained.stdout, event), event
    assert (tmp_path / "model.ptz").read_bytes() == (work / "model.ptz").read_bytes()


@pytest.mark.parametrize("saved", [1.0], indirect=True, ids=["calib_after"])  # aligned ones need TERNARY_CALIB=1
def test_rescoring_under_other_evaluation_settings(saved, shards, tmp_path):
    """The point of the checkpoint: the same weights under other settings. Without the post-training stages the
    artifact differs from the calibrated one, and the score is the one this process computes for the weights."""
    work, trained, knobs = saved
    plain = {k: v for k, v in knobs.items() if k not in POST}
    r = run_train(shards, tmp_path, EVAL_FROM_CHECKPOINT=1, **plain)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "temperature T:" not in r.stdout and "calibration " not in r.stdout and "stride:64" in r.stdout
    assert (tmp_path / "model.ptz").read_bytes() != (work / "model.ptz").read_bytes()
    # the weights it scored are the checkpoint's: score them here, in this process, with the plain evaluation
    import sentencepiece as spm
    from conftest import TINY, TOKENIZER

    h = tg.Hyperparameters({**TINY, **{k: str(v) for k, v in plain.items()}})
    ckpt = torch.load(knobs["CHECKPOINT_PATH"], weights_only=True)
    assert ckpt["config"]["NUM_LAYERS"] == 2 and ckpt["config"]["EMA_ENABLED"] is True and ckpt["calib"] == {}
    ref = tg.GPT(h)
    ref.load_state_dict(ckpt["state"])
    val = tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), 1024, h.max_val_tokens)
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=TOKENIZER), 1024)
    _, bpb = tg.evaluate(ref, val, luts, h, 0, 1, torch.device("cpu"))
    assert f"{bpb:.4f}" == f"{event_bpb(r.stdout, 'pre_export'):.4f}"


def test_rescoring_refuses_a_checkpoint_it_cannot_describe(saved, shards, tmp_path):
    work, _, knobs = saved
    cases = [  # (overrides, message)
        (dict(MODEL_DIM=32), "MODEL_DIM=64 (this run: 32)"),
        (dict(CHECKPOINT_PATH=tmp_path / "none.pt"), "does not exist"),
        (dict(CHECKPOINT_PATH=tmp_path / "junk.pt"), "is not a checkpoint"),
        (dict(CHECKPOINT_SAVE=1), "trains nothing to save"),
    ]
    if knobs["CALIB_AT_FRAC"] < 1:
        cases.append((dict(TERNARY_CALIB=0), "set TERNARY_CALIB=1"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for i, (overrides, message) in enumerate(cases):  # a RUN_ID each: a log holds one run
        r = run_train(shards, tmp_path, EVAL_FROM_CHECKPOINT=1, RUN_ID=f"case{i}", **{**knobs, **overrides})
        assert r.returncode == 2 and message in r.stderr, (overrides, r.stdout + r.stderr)
        assert not (tmp_path / "model.ptz").exists()


@pytest.mark.parametrize("saved", [1.0], indirect=True, ids=["calib_after"])
def test_rescoring_under_the_training_run_id_is_refused(saved, shards):
    """Re-scoring into the training run's own log would make a log of two runs (and a record of a re-scored
    model whose code cannot train): refused at start, the training log and its artifact untouched."""
    work, trained, knobs = saved
    log, artifact = work / "logs" / "ternary.txt", work / "model.ptz"
    before = log.read_bytes(), artifact.read_bytes()
    r = run_train(shards, work, EVAL_FROM_CHECKPOINT=1, **knobs)
    assert r.returncode == 2 and f"{log} already exists" in r.stderr, r.stdout + r.stderr
    assert (log.read_bytes(), artifact.read_bytes()) == before and log.read_text().count("run_id:") == 1
