"""Export: trit packing (base-3, 2-bit, rANS) against slow references, the float formats against numpy quantizers,
artifact round trip (ternary bit-exact, identical logits), unreadable artifacts, and the over-cap path."""

import json
import math
import re
import struct

import brotli
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import event_bpb, log_values, run_train
from test_model import model

F16 = {"EXPORT_EMBED": "fp16", "EXPORT_FLOAT": "fp16"}  # lossless floats (the default is int8): exact round trips


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
    np.testing.assert_array_equal(tg.unpack_trits_base3(packed, [(n,)]), trits)
    packed2 = tg.pack_trits_2bit(trits)
    assert len(packed2) == -(-n // 4)
    first4 = list(trits[:4]) + [0] * (4 - len(trits[:4]))  # padding is the zero trit
    assert packed2[0] == sum((int(t) + 1) << (2 * k) for k, t in enumerate(first4))
    np.testing.assert_array_equal(tg.unpack_trits_2bit(packed2, [(n,)]), trits)


# ---------------------------------------------------------------------------------------------------------------
# rANS trit coder: an independent pure-Python decoder of the format, and code lengths against the entropy

M, LOW = 1 << 10, 1 << 16


def slow_rans_decode(buf, shapes):
    """The rANS format read one symbol at a time with Python ints: lane l codes stream positions [l*T, (l+1)*T);
    at row t every lane decodes its digit (context: 9 per tensor from the left and above neighbours, the zero trit
    where a neighbour lies outside the row, tensor or lane; the padding is one more tensor of rows of 1), then the
    lanes whose state fell below 2^16 read one 16-bit word each, the highest lane first."""
    n = sum(math.prod(s) for s in shapes)
    lanes, contexts = struct.unpack("<II", buf[:8])
    f02 = struct.unpack(f"<{2 * contexts}H", buf[8 : 8 + 4 * contexts])
    freq = [(f02[2 * c], M - f02[2 * c] - f02[2 * c + 1], f02[2 * c + 1]) for c in range(contexts)]
    x = list(struct.unpack(f"<{lanes}I", buf[8 + 4 * contexts : 8 + 4 * contexts + 4 * lanes]))
    rest = buf[8 + 4 * contexts + 4 * lanes :]
    words = list(struct.unpack(f"<{len(rest) // 2}H", rest))
    T = -(-n // lanes)
    starts = [sum(math.prod(s) for s in shapes[:k]) for k in range(len(shapes))]
    digits = [[None] * T for _ in range(lanes)]

    def context(lane, t):
        p = lane * T + t
        if p >= n:
            k, cols, rel = len(shapes), 1, p - n
        else:
            k = max(i for i in range(len(shapes)) if starts[i] <= p and math.prod(shapes[i]) > 0)
            cols, rel = shapes[k][-1], p - starts[k]
        left = digits[lane][t - 1] if rel % cols and t > 0 else 1
        above = digits[lane][t - cols] if rel >= cols and t >= cols else 1
        return 9 * k + 3 * above + left

    read = 0
    for t in range(T):
        need = []
        for lane in range(lanes):
            f = freq[context(lane, t)]
            slot = x[lane] % M
            d = 0 if slot < f[0] else 1 if slot < f[0] + f[1] else 2
            x[lane] = f[d] * (x[lane] >> 10) + slot - sum(f[:d])
            digits[lane][t] = d
            if x[lane] < LOW:
                need.append(lane)
        for lane in reversed(need):
            x[lane] = (x[lane] << 16) | words[read]
            read += 1
    assert read == len(words) and all(v == LOW for v in x)
    return np.array([d - 1 for lane in digits for d in lane][:n], np.int8)


def context_entropy_bits(trits, shapes):
    """Ideal code length in bits of the trits under the (left, above) context model, each tensor its own statistics,
    counted on the 2-D weights (lane boundaries ignored: they move a few hundred symbols at most)."""
    total, at = 0.0, 0
    for r, c in shapes:
        w = trits[at : at + r * c].reshape(r, c).astype(int) + 1
        at += r * c
        left = np.pad(w, ((0, 0), (1, 0)), constant_values=1)[:, :-1]
        above = np.pad(w, ((1, 0), (0, 0)), constant_values=1)[:-1]
        counts = np.bincount((9 * above + 3 * left + w).ravel(), minlength=27).reshape(9, 3).astype(float)
        p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        total -= (counts[counts > 0] * np.log2(p[counts > 0])).sum()
    return total


def skewed_trits(rng, n, p_zero):
    return rng.choice([-1, 0, 1], size=n, p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]).astype(np.int8)


@pytest.mark.parametrize("shapes,p_zero,lanes", [
    ([(1, 1)], 0.3, 2048), ([(3, 5)], 0.9, 2048), ([(4, 32), (8, 16)], 0.31, 1), ([(16, 64), (0, 8), (32, 32)], 0.5, 3),
    ([(48, 128), (24, 256)], 0.05, 7), ([(40, 50)], 1.0, 4), ([(64, 96), (96, 64)], 0.0, 5),
    ([(100, 200)], 0.9998, 2)])  # digits rarer than 1/1024 in their context still get a frequency
def test_rans_roundtrip_matches_the_slow_reference(shapes, p_zero, lanes, monkeypatch):
    monkeypatch.setattr(tg, "RANS_LANES", lanes)
    monkeypatch.setattr(tg, "RANS_LANE_TRITS", 16)  # several lanes even on small inputs
    n = sum(math.prod(s) for s in shapes)
    trits = skewed_trits(np.random.default_rng(n), n, p_zero)
    buf = tg.pack_trits_rans(trits, shapes)
    np.testing.assert_array_equal(tg.unpack_trits_rans(buf, shapes), trits)
    np.testing.assert_array_equal(slow_rans_decode(buf, shapes), trits)


def test_rans_of_nothing():
    for shapes in ([], [(0, 4)]):
        buf = tg.pack_trits_rans(np.zeros(0, np.int8), shapes)
        assert tg.unpack_trits_rans(buf, shapes).size == 0 and slow_rans_decode(buf, shapes).size == 0


@pytest.mark.parametrize("p_zero", [0.31, 0.6, 0.95])
def test_rans_reaches_the_context_entropy(p_zero):
    """Independent trits: rANS is within 0.3% of the order-0 entropy (+ its table and lane states), and no larger
    than base-3 + brotli. Column-correlated trits (each row flips 10% of the one above): rANS codes the context model's
    entropy, which brotli cannot see."""
    rng = np.random.default_rng(0)
    shapes = [(192, 256), (128, 512)]
    n = sum(r * c for r, c in shapes)
    trits = skewed_trits(rng, n, p_zero)
    buf = tg.pack_trits_rans(trits, shapes)
    h0 = -sum(p * math.log2(p) for p in (p_zero, (1 - p_zero) / 2, (1 - p_zero) / 2))
    overhead = 8 + 4 * 27 + 4 * (n // tg.RANS_LANE_TRITS)
    assert len(buf) <= (h0 * n / 8) * 1.003 + overhead
    assert len(buf) <= len(brotli.compress(tg.pack_trits_base3(trits), quality=11)) + overhead
    rows = [skewed_trits(rng, 256, p_zero)]
    for _ in range(191):
        flip = rng.random(256) < 0.1
        rows.append(np.where(flip, skewed_trits(rng, 256, p_zero), rows[-1]))
    corr = np.concatenate(rows + [trits[192 * 256 :]])
    buf = tg.pack_trits_rans(corr, shapes)
    lane_starts = 512 * math.log2(3) * (n // tg.RANS_LANE_TRITS)  # a lane's first row has no neighbour above
    assert len(buf) * 8 <= context_entropy_bits(corr, shapes) * 1.003 + 8 * overhead + lane_starts
    assert len(buf) < 0.8 * len(brotli.compress(tg.pack_trits_base3(corr), quality=11))


def test_rans_corruption_is_an_artifact_error():
    shapes = [(64, 64)]
    buf = tg.pack_trits_rans(skewed_trits(np.random.default_rng(1), 4096, 0.3), shapes)
    for bad in (buf[:-2], buf + b"\x00\x00", buf[:8] + b"\xff\xff" * 36 + buf[80:], struct.pack("<II", 1, 5) + buf[8:]):
        with pytest.raises(tg.ArtifactError, match="rANS"):
            tg.unpack_trits_rans(bad, shapes)


# ---------------------------------------------------------------------------------------------------------------
# float formats: bit for bit against numpy references

def ref_int_rows(w, bits):
    """numpy: symmetric per-row int codes, scale = max|row| / qmax in fp32 rounded to fp16, half-to-even rounding."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1).astype(np.float32)
    scale = np.maximum(np.abs(rows).max(1, keepdims=True) / np.float32(qmax), np.float32(2.0**-24)).astype(np.float16)
    q = np.clip(np.round(rows / scale.astype(np.float32)), -qmax, qmax).astype(np.int8)
    return q, scale


def awkward_matrix(rows=40, cols=24):
    """Gaussian rows at scales 1e-6..1e3, an all-zero row, a row of exact ties (k + 0.5) x scale, a one-hot row."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 3, rows).unsqueeze(1)
    w[0] = 0
    w[1] = (torch.arange(cols) - cols // 2 + 0.5) / 15.5  # max 11.5/15.5 -> ties at int5
    w[2] = 0
    w[2, 5] = -3.0
    return w


@pytest.mark.parametrize("kind", ["int8", "int6", "int5", "int4"])
def test_int_rows_format_is_the_numpy_quantizer(kind):
    w = awkward_matrix()
    q, scale = ref_int_rows(w.numpy(), tg.INT_BITS[kind])
    meta, buf = tg.encode_int_rows(w, kind)
    assert meta == {"kind": kind, "rows": 40} and buf == scale.tobytes() + q.tobytes()
    back = tg.decode_int_rows(meta, buf, (40, 24))
    np.testing.assert_array_equal(back.numpy(), q.astype(np.float32) * scale.astype(np.float32))
    assert np.abs(q).max() <= 2 ** (tg.INT_BITS[kind] - 1) - 1 and not q[0].any()
    qt, st = tg.int_rows_quantize(back, tg.INT_BITS[kind])  # the decoded matrix requantizes to itself
    assert torch.equal(qt * st, back)


def test_fp16_planes_roundtrip():
    x = np.random.default_rng(0).standard_normal(1001).astype(np.float16)
    planes = tg.fp16_planes(x)
    raw = x.tobytes()
    assert planes == raw[1::2] + raw[0::2]  # high bytes, then low bytes (little-endian fp16)
    np.testing.assert_array_equal(tg.from_fp16_planes(planes), x)


# ---------------------------------------------------------------------------------------------------------------
# the artifact

def fp16_exact(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


@pytest.mark.parametrize("packing", ["base3", "2bit", "rans"])
def test_roundtrip_is_exact(packing):
    m = fp16_exact(model()).eval()
    h = tg.Hyperparameters(F16)
    state = tg.deserialize_state(tg.serialize_model(m, h, packing), h)
    fresh = model().eval()
    fresh.load_state_dict(state)
    for name, mod in tg.ternary_modules(m).items():
        t0, s0 = tg.ternary_quantize(mod.weight, mod.group_size)
        t1, s1 = tg.ternary_quantize(state[name], mod.group_size)
        assert torch.equal(t0, t1) and torch.equal(s0, s1), name
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])  # identical, not close
    assert tg.serialize_model(fresh, h, packing) == tg.serialize_model(m, h, packing)  # re-export is idempotent


FORMATS = [("fp16", "fp16"), ("fp8", "fp8"), ("int8", "fp16"), ("int6", "int8"), ("int4", "int5")]


@pytest.mark.parametrize("embed,other", FORMATS)
def test_float_formats_per_family(embed, other):
    """EXPORT_EMBED for tok_emb, EXPORT_FLOAT for the other matrices, fp16 for vectors and scalars; the int formats
    come back exactly as the numpy quantizer gives them, fp8 within its precision, and the model reloaded from the
    payload re-exports to the same bytes."""
    m = model().eval()
    h = tg.Hyperparameters({**F16, "EXPORT_EMBED": embed, "EXPORT_FLOAT": other})
    payload = tg.serialize_model(m, h, "rans")
    state = tg.deserialize_state(payload, h)
    header = json.loads(payload[9 : 9 + struct.unpack("<I", payload[5:9])[0]])
    kinds = {t["name"]: t["kind"] for t in header["tensors"]}
    ternary = tg.ternary_modules(m)
    for name, p in m.state_dict().items():
        matrix = p.dim() == 2 and min(p.shape) >= 16
        want = "ternary" if name in ternary else (embed if name == "tok_emb.weight" else other) if matrix else "fp16"
        assert kinds[name] == want, name
        ref = p.float().numpy()
        if want in tg.INT_BITS:
            q, scale = ref_int_rows(ref, tg.INT_BITS[want])
            np.testing.assert_array_equal(state[name].numpy(), (q * scale.astype(np.float32)).reshape(ref.shape))
        elif want == "fp16":
            np.testing.assert_array_equal(state[name].numpy(), ref.astype(np.float16).astype(np.float32))
        elif want == "fp8":
            tol = 2**-3 * np.abs(ref).max(axis=-1, keepdims=True)
            assert (np.abs(state[name].numpy() - ref) <= tol + 1e-7).all(), name
    fresh = model().eval()
    fresh.load_state_dict(state)
    assert tg.serialize_model(fresh, h, "rans") == payload
    idx = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(fresh.logits(idx)[0], m.logits(idx)[0], rtol=0.1, atol=0.1)


def test_int8_embedding_shrinks_the_artifact():
    m = model(VOCAB_SIZE="1024")
    sizes = {kind: len(brotli.compress(tg.serialize_model(m, tg.Hyperparameters(
        {"VOCAB_SIZE": "1024", "EXPORT_EMBED": kind}), "rans"), quality=5)) for kind in ("fp16", "int8", "int6")}
    emb = 1024 * 32
    assert sizes["fp16"] - sizes["int8"] > 0.6 * emb and sizes["int8"] - sizes["int6"] > 0.15 * emb, sizes


def payload_with(payload, **changes):
    """The payload with header fields replaced."""
    hlen = struct.unpack("<I", payload[5:9])[0]
    header = json.loads(payload[9 : 9 + hlen])
    header.pop("sha256")  # an edited header: as written before the checksum, else that is what the loader reports
    header.update(changes)
    new = json.dumps(header, separators=(",", ":")).encode()
    return payload[:5] + struct.pack("<I", len(new)) + new + payload[9 + hlen :]


def test_unreadable_artifacts_are_artifact_errors_naming_the_file(tmp_path):
    m = model()
    h8 = tg.Hyperparameters({**F16, "EXPORT_EMBED": "int8"})
    good = tg.serialize_model(m, h8, "base3")
    tensors = json.loads(good[9 : 9 + struct.unpack("<I", good[5:9])[0]])["tensors"]
    renamed = [dict(t, kind="int3") if t["name"] == "tok_emb.weight" else t for t in tensors]
    cases = [  # (payload, loader's configuration, message)
        (b"NOPE" + b"\x00" * 20, h8, "bad magic"),
        (b"TGPT\x01" + good[5:], h8, "format version 1"),
        (payload_with(good, trit_packing="huffman"), h8, "unknown trit packing 'huffman'"),
        (payload_with(good, scale_layout="fp16"), h8, "unknown scale layout 'fp16'"),
        (payload_with(good, tensors=renamed), h8, "tok_emb.weight is stored as 'int3'"),
        (good, tg.Hyperparameters(F16), "tok_emb.weight is stored as 'int8', which this configuration does not read"),
        (good[:-1], h8, "does not match its sha256 checksum"),
        (payload_with(good)[:-1], h8, "header describes"),
        (payload_with(good, trits=None), h8, "malformed artifact (TypeError"),
    ]
    for i, (payload, h, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.ptz"
        path.write_bytes(brotli.compress(payload))
        with pytest.raises(tg.ArtifactError, match=re.escape(message)) as e:
            tg.load_artifact(str(path), h)
        assert str(e.value).startswith(str(path)), e.value
    (tmp_path / "junk.ptz").write_bytes(b"not brotli")
    with pytest.raises(tg.ArtifactError, match="junk.ptz: not a brotli stream"):
        tg.load_artifact(str(tmp_path / "junk.ptz"), h8)


def test_compress_keeps_the_smallest_packing_and_reloads(tmp_path):
    m = fp16_exact(model())
    h = tg.Hyperparameters({**F16, "BROTLI_QUALITY": "5"})
    lines = []
    packing, blob = tg.compress_model(m, h, log=lines.append)
    for other in tg.TRIT_PACKERS:
        assert len(blob) <= len(brotli.compress(tg.serialize_model(m, h, other), quality=5, lgwin=24))
    assert f"chosen:{packing}" in lines[0] and all(f"q5_{p}:" in lines[0] for p in tg.TRIT_PACKERS)
    path = tmp_path / "a.ptz"
    tg.write_atomic(str(path), blob)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ptz"]  # no temp file left behind
    fresh = model()
    fresh.load_state_dict(tg.load_artifact(str(path), h))
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
    state = tg.deserialize_state(payload, h)
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
    return re.sub(r"\S*seconds:\S+|fits:\S+", "", line)  # fits: follows the (timed) evaluation-time estimate


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["calib_after", "calib_aligned"])
def saved(request, shards, tmp_path_factory):
    """A training run that writes its checkpoint, then runs calibration, temperature, export and the sliding score
    itself; CALIB_AT_FRAC=0.5 calibrates halfway through training instead (the checkpoint must carry that)."""
    work = tmp_path_factory.mktemp("ckpt")
    knobs = dict(ITERATIONS=6, MUON_ROW_NORM=1, CALIB_AT_FRAC=request.param, CHECKPOINT_PATH=work / "ckpt.pt", **POST)
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
    assert ckpt["config"]["NUM_LAYERS"] == 2 and ckpt["config"]["MUON_ROW_NORM"] is True and ckpt["calib"] == {}
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


# ---------------------------------------------------------------------------------------------------------------
# corrupt files: a clear ArtifactError naming the file (issue 15 item 10)

H16 = tg.Hyperparameters(F16)  # the formats a loader of these payloads is configured for


def small_payload():
    return tg.serialize_model(fp16_exact(model()), H16)


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
        "short_preamble": (brotli.compress(tg.ARTIFACT_MAGIC + b"\x01"), "shorter than its 9-byte preamble"),
        "bad_magic": (brotli.compress(b"NOPE" + payload[4:]), "bad magic"),
        "header_past_end": (brotli.compress(tg.ARTIFACT_MAGIC + (10**6).to_bytes(4, "little") + body), "past the end"),
        "bad_json": (brotli.compress(rebuild(payload)[:9] + b"x" + rebuild(payload)[10:]), "unreadable header"),
        "unknown_packing": (brotli.compress(rebuild(payload, lambda h: h.update(trit_packing="zstd"))),
                            "unknown trit packing 'zstd'"),
        "unknown_kind": (brotli.compress(rebuild(payload, lambda h: h["tensors"][0].update(kind="int3"))),
                         "is stored as 'int3'"),
        "short_payload": (brotli.compress(rebuild(payload)[:-100]), "its header describes"),
        "trailing_bytes": (brotli.compress(rebuild(payload) + b"\0" * 8), "its header describes"),
        "bad_shape": (brotli.compress(rebuild(payload, lambda h: h["tensors"][-1].update(shape=[3, 5]))),
                      "malformed artifact"),
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
        tg.load_artifact(str(path), H16)
    assert str(path) in str(e.value)


def test_every_bit_flip_is_caught_or_harmless(tmp_path):
    """Brotli has no checksum: without one of its own, most flipped bits decode to other weights, silently."""
    payload = small_payload()
    blob = brotli.compress(payload, quality=5, lgwin=24)
    want = tg.deserialize_state(payload, H16)
    rng = np.random.default_rng(0)
    path = tmp_path / "flip.ptz"
    caught = 0
    for pos, bit in zip(rng.integers(0, len(blob), 150), rng.integers(0, 8, 150)):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        try:
            got = tg.load_artifact(str(path), H16)
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
    got, want = tg.load_artifact(str(path), H16), tg.deserialize_state(payload, H16)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_file_that_is_not_a_checkpoint_says_so_plainly(tmp_path):
    import functools

    h = lambda p: tg.Hyperparameters({**F16, "EVAL_FROM_CHECKPOINT": "1", "CHECKPOINT_PATH": str(p)})  # noqa: E731
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
                             "BROTLI_QUALITY": "1", "RUN_ID": "full", **F16})
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
    fresh.load_state_dict(tg.load_artifact(str(blob), h))  # the artifact itself, whole
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


# ---------------------------------------------------------------------------------------------------------------
# EMBED_QAT: training through the embedding's export rounding

def test_embed_qat_trains_the_exported_embedding():
    """With EMBED_QAT the forward sees tok_emb as EXPORT_EMBED stores it: the reloaded artifact gives bit-identical
    logits, and the gradient reaching the float embedding is the one of a plain model holding the rounded embedding
    (straight-through)."""
    h = tg.Hyperparameters({**F16, "EMBED_QAT": "1", "EXPORT_EMBED": "int6"})
    m = fp16_exact(model(EMBED_QAT="1", EXPORT_EMBED="int6")).eval()  # the other floats are stored in fp16
    state = tg.deserialize_state(tg.serialize_model(m, h, "base3"), h)
    fresh = model(EMBED_QAT="1", EXPORT_EMBED="int6").eval()
    fresh.load_state_dict(state)
    idx, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])
    q, scale = ref_int_rows(m.tok_emb.weight.detach().numpy(), 6)
    plain = model().eval()
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        plain.tok_emb.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale.astype(np.float32)))
    assert torch.equal(plain.logits(idx)[0], m.logits(idx)[0])
    m(idx, targets).backward()
    plain(idx, targets).backward()
    assert m.tok_emb.weight.grad.abs().sum() > 0
    torch.testing.assert_close(m.tok_emb.weight.grad, plain.tok_emb.weight.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(tg.ConfigError, match="EMBED_QAT=1 trains through an int format"):
        tg.Hyperparameters({**F16, "EMBED_QAT": "1", "EXPORT_EMBED": "fp8"})


# ---------------------------------------------------------------------------------------------------------------
# SCALE_FORMAT=log8: ternary group scales on a per-row log grid, in training and in the artifact

def ref_log8(absmean):
    """numpy: base = the row's largest absmean in fp16; code = how many of the midpoints 2^(-(k+1/2)/16), k < 255,
    lie above absmean / base; scale = base x 2^(-code/16) in fp32."""
    a = absmean.astype(np.float32)
    base = a.max(1, keepdims=True).astype(np.float16).astype(np.float32)
    mids = np.array([2.0 ** (-(k + 0.5) / 16) for k in range(255)], np.float32)
    codes = ((a / base)[..., None] < mids).sum(-1)
    factors = np.array([2.0 ** (-k / 16) for k in range(256)], np.float32)
    return codes, base, base * factors[codes]


def test_log8_scales_are_the_numpy_reference():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 512, generator=g) * torch.logspace(-3, 0, 48).unsqueeze(1) * (1 + 3 * torch.rand(512, generator=g))
    w[3, :128] = 0  # a dead group: absmean clamps to SCALE_EPS
    w[4] *= 1e-6  # a row far below SCALE_EPS
    absmean = w.reshape(48, 4, 128).abs().mean(-1).clamp_min(tg.SCALE_EPS)
    codes, base = tg.log8_codes(absmean, torch.from_numpy(tg.LOG8_BOUNDS))
    ref_codes, ref_base, ref_scale = ref_log8(absmean.numpy())
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(base.numpy(), ref_base)
    trits, scale = tg.ternary_quantize_log8(w, 128, torch.from_numpy(tg.LOG8_BOUNDS), torch.from_numpy(tg.LOG8_FACTORS))
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(trits.numpy(), np.clip(np.round(w.numpy().reshape(48, 4, 128) / ref_scale[..., None]), -1, 1).reshape(48, 512))
    rel = np.abs(ref_scale / absmean.numpy() - 1)[ref_codes < 255]
    assert rel.max() <= 2 ** (1 / 32) - 1 + 2**-10 and (ref_codes == 0).any(1).all()


@pytest.mark.parametrize("packing", ["base3", "rans"])
def test_log8_roundtrip_is_exact_and_smaller(packing):
    cfg = {"SCALE_FORMAT": "log8", "EXPORT_EMBED": "int8", "EMBED_QAT": "1"}
    h = tg.Hyperparameters({**F16, **cfg})
    m = fp16_exact(model(**cfg)).eval()
    payload = tg.serialize_model(m, h, packing)
    fresh = model(**cfg).eval()
    fresh.load_state_dict(tg.deserialize_state(payload, h))
    for name, mod in tg.ternary_modules(m).items():
        (t0, s0), (t1, s1) = mod.quantize(), tg.ternary_modules(fresh)[name].quantize()
        assert torch.equal(t0, t1) and torch.equal(s0, s1), name
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])
    assert tg.serialize_model(fresh, h, packing) == payload
    header, body = tg.read_header(payload)
    fp16 = tg.serialize_model(m, tg.Hyperparameters({**F16, "EXPORT_EMBED": "int8", "EMBED_QAT": "1"}), packing)
    fp16_scales = tg.read_header(fp16)[0]["scales"][1]
    ternary = [t for t in header["tensors"] if t["kind"] == "ternary"]
    rows, groups = sum(t["shape"][0] for t in ternary), sum(math.prod(t["shape"]) // t["group_size"] for t in ternary)
    assert header["scale_layout"] == "log8" and header["scales"][1] == 2 * rows + groups  # fp16 bases, byte codes
    assert fp16_scales == 2 * groups
    with pytest.raises(tg.ArtifactError, match="scales are stored as 'log8', which this configuration does not read"):
        tg.deserialize_state(payload, tg.Hyperparameters({**F16, "EXPORT_EMBED": "int8"}))
    m.train()
    m(idx, torch.randint(0, 128, (2, 16))).backward()
    assert all(mod.weight.grad.abs().sum() > 0 for mod in tg.ternary_modules(m).values())  # straight-through
    with pytest.raises(tg.ConfigError, match="SCALE_FORMAT=log8 with TERNARY_CALIB=1"):
        tg.Hyperparameters({**F16, "SCALE_FORMAT": "log8", "TERNARY_CALIB": "1"})


def test_a_checkpoint_from_before_a_knob_existed_loads_with_its_default(tmp_path):
    """A checkpoint saved before SCALE_FORMAT / EMBED_QAT existed was trained with their defaults: it loads, so it can
    be re-scored in the new export formats; one saved with another value is still refused."""
    h = tg.Hyperparameters({**F16, "CHECKPOINT_PATH": str(tmp_path / "c.pt"), "EXPORT_EMBED": "int8"})
    m = model()
    config = {k: v for k, v in h.by_env_name().items() if k not in ("SCALE_FORMAT", "EMBED_QAT")}
    torch.save({"state": m.state_dict(), "calib": {}, "config": config}, tmp_path / "c.pt")
    fresh = model()
    assert tg.load_checkpoint(fresh, h, torch.device("cpu"), log=lambda s: None) is False
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    torch.save({"state": m.state_dict(), "calib": {}, "config": {**config, "SCALE_FORMAT": "log8"}}, tmp_path / "c.pt")
    with pytest.raises(tg.ConfigError, match=r"SCALE_FORMAT=log8 \(this run: fp16\)"):
        tg.load_checkpoint(model(), h, torch.device("cpu"), log=lambda s: None)


# ---------------------------------------------------------------------------------------------------------------
# HYBRID_INT: block matrices of some families in a per-row int format (QAT) instead of ternary

@pytest.mark.parametrize("families,bits,extra", [("q,k,v,proj", "6", {}), ("up", "8", {}), ("k,v,down", "4", {}),
                                                ("proj", "5", {"ENGRAM_ENABLED": "1"})])
def test_hybrid_matrices_train_and_export_in_their_int_format(families, bits, extra):
    """The HYBRID_FAMILIES matrices of the blocks (not EngramHash's proj) run on the numpy quantizer's int matrix,
    store it, reload exactly and get a straight-through gradient; a loader configured otherwise refuses them."""
    cfg = {"HYBRID_INT": "1", "HYBRID_FAMILIES": families, "HYBRID_BITS": bits, **extra}
    h = tg.Hyperparameters({**F16, **cfg})
    m = fp16_exact(model(**cfg)).eval()
    chosen = {n for n, mod in m.named_modules() if isinstance(mod, tg.IntQATLinear)}
    assert chosen and {n.split(".")[-1] for n in chosen} == set(families.split(","))
    assert all(n.startswith("blocks.") for n in chosen) and len(chosen) == 4 * len(families.split(","))
    for name in chosen:  # the forward uses exactly the numpy quantizer's matrix
        mod = m.get_submodule(name)
        x = torch.randn(3, mod.in_features)
        q, scale = ref_int_rows(mod.weight.detach().numpy(), int(bits))
        assert torch.equal(mod(x), torch.nn.functional.linear(x, torch.from_numpy(q * scale.astype(np.float32))))
    total, ternary = tg.count_params(m)
    assert ternary == sum(mod.weight.numel() for mod in m.modules() if type(mod) is tg.TernaryLinear)
    payload = tg.serialize_model(m, h, "rans")
    kinds = {t["name"]: t["kind"] for t in tg.read_header(payload)[0]["tensors"]}
    assert {n for n, k in kinds.items() if k == f"int{bits}"} == {f"{n}.weight" for n in chosen}
    fresh = model(**cfg).eval()
    fresh.load_state_dict(tg.deserialize_state(payload, h))
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(m.logits(idx)[0], fresh.logits(idx)[0])
    assert tg.serialize_model(fresh, h, "rans") == payload
    with pytest.raises(tg.ArtifactError, match="is an int block matrix, which this configuration does not train"):
        tg.deserialize_state(payload, tg.Hyperparameters(F16))
    plain = tg.serialize_model(fp16_exact(model()), tg.Hyperparameters(F16), "rans")
    with pytest.raises(tg.ArtifactError, match="is a ternary block matrix"):
        tg.deserialize_state(plain, h)
    m.train()
    m(idx, torch.randint(0, 128, (2, 16))).backward()
    assert all(m.get_submodule(n).weight.grad.abs().sum() > 0 for n in chosen)  # straight-through
