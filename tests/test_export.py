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
    for overrides, message in cases:
        r = run_train(shards, tmp_path, EVAL_FROM_CHECKPOINT=1, **{**knobs, **overrides})
        assert r.returncode == 2 and message in r.stderr, (overrides, r.stdout + r.stderr)
        assert not (tmp_path / "model.ptz").exists()


# ---------------------------------------------------------------------------------------------------------------
# corrupt files: a clear ArtifactError naming the file (issue 15 item 10)

def small_payload():
    return tg.serialize_model(fp16_exact(model()), tg.Hyperparameters({"EXPORT_FLOAT": "fp16"}))


def rebuild(payload, edit_header=None, data=None):
    """The payload with its JSON header edited and/or its tensor bytes replaced (no checksum: an old artifact)."""
    import json
    import struct

    n = len(tg.ARTIFACT_MAGIC) + 4
    (hlen,) = struct.unpack("<I", payload[len(tg.ARTIFACT_MAGIC) : n])
    header = json.loads(payload[n : n + hlen])
    header.pop("sha256", None)
    if edit_header:
        edit_header(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    return tg.ARTIFACT_MAGIC + struct.pack("<I", len(text)) + text + (payload[n + hlen :] if data is None else data)


def corrupt(case, payload):
    """(file bytes, message) for one way an artifact file can be broken."""
    blob = brotli.compress(payload, quality=1)
    body = payload[len(tg.ARTIFACT_MAGIC) + 4 :]
    cases = {
        "empty": (b"", "not a brotli stream"),
        "truncated": (blob[: len(blob) // 2], "not a brotli stream"),
        "not_brotli": (b"PK\x03\x04 a zip file" * 10, "not a brotli stream"),
        "short_preamble": (brotli.compress(tg.ARTIFACT_MAGIC + b"\x01"), "shorter than"),
        "bad_magic": (brotli.compress(b"NOPE" + payload[4:]), "bad magic"),
        "header_past_end": (brotli.compress(tg.ARTIFACT_MAGIC + (10**6).to_bytes(4, "little") + body), "past the end"),
        "bad_json": (brotli.compress(rebuild(payload)[:12] + b"{" + rebuild(payload)[13:]), "header is not JSON"),
        "unknown_packing": (brotli.compress(rebuild(payload, lambda h: h.update(trit_packing="rans"))),
                            "unknown trit packing 'rans'"),
        "unknown_kind": (brotli.compress(rebuild(payload, lambda h: h["tensors"][0].update(kind="int5"))),
                         "unknown tensor kind 'int5'"),
        "short_payload": (brotli.compress(rebuild(payload)[:-100]), "short payload"),
        "trailing_bytes": (brotli.compress(rebuild(payload) + b"\0" * 8), "after its last tensor"),
        "bad_shape": (brotli.compress(rebuild(payload, lambda h: h["tensors"][-1].update(shape=[3, 5]))),
                      "corrupt artifact"),
        "checksum": (brotli.compress(payload[:-1] + bytes([payload[-1] ^ 1])), "checksum"),
    }
    return cases[case]


CORRUPT = ["empty", "truncated", "not_brotli", "short_preamble", "bad_magic", "header_past_end", "bad_json",
           "unknown_packing", "unknown_kind", "short_payload", "trailing_bytes", "bad_shape", "checksum"]


@pytest.mark.parametrize("case", CORRUPT)
def test_a_corrupt_artifact_is_an_artifact_error_naming_the_file(tmp_path, case):
    data, message = corrupt(case, small_payload())
    path = tmp_path / f"{case}.ptz"
    path.write_bytes(data)
    with pytest.raises(tg.ArtifactError, match=re.escape(message)) as e:
        tg.load_artifact(str(path))
    assert str(path) in str(e.value)


def test_every_bit_flip_is_caught_or_harmless(tmp_path):
    """Brotli has no checksum: without one of its own, most flipped bits decode to other weights, silently."""
    payload = small_payload()
    blob = brotli.compress(payload, quality=5, lgwin=24)
    want = tg.deserialize_state(payload)
    rng = np.random.default_rng(0)
    path = tmp_path / "flip.ptz"
    caught = 0
    for pos, bit in zip(rng.integers(0, len(blob), 150), rng.integers(0, 8, 150)):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        try:
            got = tg.load_artifact(str(path))
        except tg.ArtifactError as e:
            assert str(path) in str(e)
            caught += 1
            continue
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (pos, bit)
    assert caught > 140  # a few flips land in brotli padding or metadata and change nothing


def test_an_old_artifact_without_checksum_still_loads(tmp_path):
    payload = small_payload()
    old = rebuild(payload)  # what train_gpt.py wrote before the checksum
    path = tmp_path / "old.ptz"
    path.write_bytes(brotli.compress(old))
    got, want = tg.load_artifact(str(path)), tg.deserialize_state(payload)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_file_that_is_not_a_checkpoint_says_so_plainly(tmp_path):
    import functools

    h = lambda p: tg.Hyperparameters({"EVAL_FROM_CHECKPOINT": "1", "CHECKPOINT_PATH": str(p)})  # noqa: E731
    m = model()
    cases = {
        "junk.pt": (lambda p: p.write_bytes(b"not a torch file"), "written by CHECKPOINT_SAVE=1: not a torch file"),
        "pickle.pt": (lambda p: torch.save({"f": functools.partial(print)}, p), "holds Python objects"),
        "state_dict.pt": (lambda p: torch.save(m.state_dict(), p), "a torch file, but not a CHECKPOINT_SAVE=1 checkpoint"),
        "artifact.ptz": (lambda p: p.write_bytes(brotli.compress(small_payload())), "not a torch file"),
    }
    for name, (make, message) in cases.items():
        make(tmp_path / name)
        with pytest.raises(tg.ArtifactError) as e:
            tg.load_checkpoint(m, h(tmp_path / name), torch.device("cpu"), print)
        assert message in str(e.value) and str(tmp_path / name) in str(e.value), str(e.value)
        assert "weights_only" not in str(e.value)  # torch's advice to unpickle anything misleads here


# ---------------------------------------------------------------------------------------------------------------
# output paths checked at start; a failed artifact write keeps the weights (issue 15 item 5)

def outputs(tmp_path, **env):
    base = {"ARTIFACT_PATH": str(tmp_path / "a.ptz"), "LOG_DIR": str(tmp_path / "logs"),
            "CHECKPOINT_PATH": str(tmp_path / "c.pt")}
    return tg.Hyperparameters({**base, **{k: str(v) for k, v in env.items()}})


def test_output_paths_are_checked_at_start(tmp_path):
    import os

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro.ptz"
    ro.write_text("a good old artifact")
    ro.chmod(0o444)
    cases = [
        (dict(ARTIFACT_PATH=tmp_path / "adir"), "ARTIFACT_PATH=", "is a directory"),
        (dict(ARTIFACT_PATH=tmp_path / "missing" / "a.ptz"), "ARTIFACT_PATH=", "does not exist"),
        (dict(ARTIFACT_PATH="/proc/i15_not_writable.ptz"), "ARTIFACT_PATH=", "cannot create files in /proc"),
        (dict(ARTIFACT_PATH=ro), "ARTIFACT_PATH=", "is read-only"),
        (dict(CHECKPOINT_SAVE=1, CHECKPOINT_PATH=tmp_path / "missing" / "c.pt"), "CHECKPOINT_PATH=", "does not exist"),
        (dict(CHECKPOINT_SAVE=1, CHECKPOINT_PATH=tmp_path / "adir"), "CHECKPOINT_PATH=", "is a directory"),
        (dict(LOG_DIR=tmp_path / "afile" / "logs"), "LOG_DIR=", "cannot create"),
        (dict(LOG_DIR="/proc/i15_logs"), "LOG_DIR=", "cannot create"),
    ]
    for env, knob, reason in cases:
        with pytest.raises(tg.ConfigError) as e:
            tg.check_outputs(outputs(tmp_path, **env))
        assert str(e.value).startswith(knob) and reason in str(e.value), (env, str(e.value))
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        (tmp_path / "rodir").mkdir(mode=0o555)
        with pytest.raises(tg.ConfigError, match="cannot create files in"):
            tg.check_outputs(outputs(tmp_path, ARTIFACT_PATH=tmp_path / "rodir" / "a.ptz"))
    before = sorted(p.name for p in tmp_path.iterdir())
    tg.check_outputs(outputs(tmp_path, CHECKPOINT_SAVE=1))  # fine: the checkpoint folder need not hold one yet
    tg.check_outputs(outputs(tmp_path, CHECKPOINT_PATH=tmp_path / "missing" / "c.pt"))  # not saved: not checked
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) | {"logs"})  # no probe file left
    assert not list((tmp_path / "logs").iterdir())


@pytest.mark.slow
def test_an_unwritable_artifact_path_stops_the_run_before_training(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=2, ARTIFACT_PATH=tmp_path / "no_such_folder" / "m.ptz")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: ARTIFACT_PATH=" in r.stderr and "does not exist" in r.stderr
    assert "step:" not in r.stdout and "Traceback" not in r.stderr


def test_a_failed_artifact_write_keeps_the_weights_and_says_where(tmp_path, monkeypatch):
    import errno

    h = outputs(tmp_path, **{"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
                             "NUM_KV_HEADS": "2", "EMBED_DIM": "32", "GROUP_SIZE": "32", "MLP_MULT": "2",
                             "BROTLI_QUALITY": "1", "RUN_ID": "full"})
    (tmp_path / "logs").mkdir()
    m = fp16_exact(model())
    real_write = tg.write_atomic
    full = {str(tmp_path / "a.ptz"), str(tmp_path / "logs")}  # the artifact's disk, and the log dir's, are full

    def write(path, data):
        if str(path) in full or str(tmp_path / "logs") in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(tg, "write_atomic", write)
    monkeypatch.setattr(tg.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(tg.ArtifactError) as e:
        tg.export_artifact(m, h, log=lambda s: None)
    msg = str(e.value)
    blob, ckpt = tmp_path / "tmp" / "full.rescued.ternary.ptz", tmp_path / "tmp" / "full.rescued.float.pt"
    assert f"ARTIFACT_PATH={tmp_path / 'a.ptz'}" in msg and "No space left" in msg
    assert str(blob) in msg and str(ckpt) in msg and not (tmp_path / "a.ptz").exists()
    fresh = model()
    fresh.load_state_dict(tg.load_artifact(str(blob)))  # the artifact itself, whole
    idx = torch.randint(0, 128, (1, 8))
    assert torch.equal(fresh.logits(idx)[0], m.logits(idx)[0])
    again = model()  # and the float weights, as EVAL_FROM_CHECKPOINT reads them
    h2 = tg.Hyperparameters({**{k: str(v) for k, v in h.by_env_name().items()}, "EVAL_FROM_CHECKPOINT": "1",
                             "CHECKPOINT_PATH": str(ckpt)})
    tg.load_checkpoint(again, h2, torch.device("cpu"), lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tg.os, "fsync", no_space)
    with pytest.raises(OSError):
        tg.write_atomic(str(tmp_path / "a.ptz"), b"x" * 1000)
    assert list(tmp_path.iterdir()) == []
