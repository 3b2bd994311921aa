"""End-to-end: a short CPU training run of train_gpt.py whose loss falls, exported, reloaded and scored."""
import pytest
import torch

import train_gpt as tg

from conftest import event_bpb, log_values, run_train


@pytest.mark.slow
def test_short_run_loss_falls_and_roundtrip_scores(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=40, WARMDOWN_FRAC=0.3, MATRIX_LR=0.04, EMBED_LR=0.05,
                  TRAIN_LOG_EVERY=5, VAL_LOSS_EVERY=20, COMPILE_WARMUP_STEPS=2)
    assert r.returncode == 0, r.stdout + r.stderr
    losses = log_values(r.stdout, "train_loss")
    assert losses[0] > 6.5  # ln(1024) = 6.93 at init
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
    assert "compile_warmup steps:2" in r.stdout
    pre = event_bpb(r.stdout, "pre_export")
    final = event_bpb(r.stdout, "final_roundtrip")
    assert abs(final - pre) < 0.01  # fp16 storage of the small params only
    assert (tmp_path / "model.ptz").stat().st_size == log_values(r.stdout, "model_bytes")[0]
    assert (tmp_path / "logs" / "ternary.txt").read_text().count("step:") >= 8
    assert "remaining:" in r.stdout and "tok/s:" in r.stdout


def test_bad_config_exits_with_message(shards, tmp_path):
    r = run_train(shards, tmp_path, GROUP_SIZE=48)
    assert r.returncode == 2
    assert "GROUP_SIZE=48" in r.stderr

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(shards, tmp_path):
    r = run_train(shards, tmp_path, DEVICE="cuda")
    assert r.returncode == 2 and "DEVICE=cuda but torch.cuda.is_available() is False" in r.stderr


@pytest.mark.slow
def test_row_norm_run_exports_what_it_scored(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=6, MUON_ROW_NORM=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MUON_ROW_NORM=True" in r.stdout
    pre = event_bpb(r.stdout, "pre_export")
    final = event_bpb(r.stdout, "final_roundtrip")
    assert abs(final - pre) < 0.01  # the artifact holds the weights that pre_export scored


@pytest.mark.slow
def test_every_feature_on_trains_and_roundtrips(shards, tmp_path):
    from test_model import ALL_ON

    r = run_train(shards, tmp_path, **ALL_ON, ITERATIONS=16, MATRIX_LR=0.04, EMBED_LR=0.05, COMPILE_WARMUP_STEPS=1)
    assert r.returncode == 0, r.stdout + r.stderr
    losses = log_values(r.stdout, "train_loss")
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    pre, final = event_bpb(r.stdout, "pre_export"), event_bpb(r.stdout, "final_roundtrip")
    assert abs(final - pre) < 0.01


def test_sliding_final_scores(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=4, EVAL_STRIDE=16)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stride:16" in r.stdout.split("pre_export", 1)[1].splitlines()[0]
    assert "stride:16" in r.stdout.split("final_roundtrip", 1)[1].splitlines()[0]
    assert abs(event_bpb(r.stdout, "final_roundtrip") - event_bpb(r.stdout, "pre_export")) < 0.01


def test_temperature_and_calibration_see_training_tokens_only(shards, tmp_path):
    """The same training data with a different validation split gives the same T and the same calibration:
    neither search reads validation. The reloaded model scores with the logged T."""
    import shutil

    import build_shards as bs
    import train_gpt as tg
    from conftest import SAMPLE, TOKENIZER

    other = tmp_path / "other_val"
    other.mkdir()
    for f in shards.glob("fineweb_train_*.bin"):
        shutil.copy(f, other)
    bs.build_shards(str(SAMPLE / "val_docs.jsonl.xz"), "val", TOKENIZER, str(other), workers=1, max_docs=3)
    temps, calibrations = [], []
    for name, data in (("a", shards), ("b", other)):
        (tmp_path / name).mkdir()
        r = run_train(data, tmp_path / name, ITERATIONS=4, TEMPERATURE_SEARCH=1, TEMPERATURE_TOKENS=4096,
                      TERNARY_CALIB=1, CALIB_MAX_EVALS=8, CALIB_TOKENS=2048)
        assert r.returncode == 0, r.stdout + r.stderr
        temps.append(log_values(r.stdout, "T")[0])
        calibrations.append(r.stdout.split("calibration ")[1].split(" seconds:")[0])
        assert abs(event_bpb(r.stdout, "final_roundtrip") - event_bpb(r.stdout, "pre_export")) < 1e-3
        stored = tg.load_artifact(str(tmp_path / name / "model.ptz"), tg.Hyperparameters({}))["logit_temperature"].item()
        assert stored == pytest.approx(temps[-1], abs=5e-5)
    assert temps[0] == temps[1] and 0.7 <= temps[0] <= 1.3
    assert calibrations[0] == calibrations[1] and "evals:8" in calibrations[0]


@pytest.mark.parametrize("at_frac", ["1.0", "0.5"])
def test_ternary_calibration_runs_on_training_tokens_and_exports_exactly(shards, tmp_path, at_frac):
    r = run_train(shards, tmp_path, ITERATIONS=6, TERNARY_CALIB=1, CALIB_MAX_EVALS=12, CALIB_TOKENS=2048,
                  CALIB_AT_FRAC=at_frac)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count("calibration tensors:") == 1 and log_values(out, "evals")[0] <= 12
    mid_run = out.index("calibration tensors:") < out.index("train_done")
    assert mid_run == (at_frac == "0.5")  # the export-aligned phase trains on through the calibrated quantizer
    assert abs(event_bpb(out, "final_roundtrip") - event_bpb(out, "pre_export")) < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# one log per run, failures recorded in it, and no diverged model written

def test_a_log_holds_one_run(shards, tmp_path):
    """A RUN_ID whose log exists is refused at start, before any work: nothing appended, nothing written."""
    log = tmp_path / "logs" / "ternary.txt"
    log.parent.mkdir()
    log.write_text("run_id:ternary world_size:1\nfinal_roundtrip val_loss:3 val_bpb:1.5\n")
    r = run_train(shards, tmp_path, ITERATIONS=2)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: {log} already exists" in r.stderr and "RUN_ID" in r.stderr
    assert log.read_text() == "run_id:ternary world_size:1\nfinal_roundtrip val_loss:3 val_bpb:1.5\n"
    assert "run_id:" not in r.stdout and not (tmp_path / "model.ptz").exists()


def last_line(path):
    return path.read_text().splitlines()[-1]


def test_a_failed_run_ends_its_log_with_the_error_and_the_log_names_its_code(shards, tmp_path):
    import hashlib
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import runlog

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_train(shards, tmp_path, DATA_PATH=empty)
    assert r.returncode == 2, r.stdout + r.stderr
    log = tmp_path / "logs" / "ternary.txt"
    assert last_line(log).startswith("error: no shard matches") and str(empty) in last_line(log)
    assert last_line(log) == r.stderr.strip().splitlines()[-1]  # the line stderr shows, word for word
    run = runlog.read_run_log(log)
    assert run["code_sha256"] == hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()
    assert run["gpu"] == "cpu"


def test_an_unexpected_exception_leaves_its_type_in_the_log(shards, tmp_path, monkeypatch):
    import train_gpt as tg
    from conftest import TINY

    for k, v in {**TINY, "DATA_PATH": str(shards), "LOG_DIR": str(tmp_path), "ITERATIONS": "1"}.items():
        monkeypatch.setenv(k, v)

    def boom(*args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(tg, "load_tokenizer", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tg.main()
    assert last_line(tmp_path / "ternary.txt") == "error: RuntimeError: boom second line"


def test_a_diverged_run_stops_at_once_and_keeps_the_good_artifact(shards, tmp_path):
    """EMBED_LR=1e30 turns the loss NaN at step 3: the run stops there, says so in its log, exits 1, and the
    artifact already on disk stays."""
    (tmp_path / "model.ptz").write_bytes(b"previous good artifact")
    r = run_train(shards, tmp_path, ITERATIONS=6, EMBED_LR=1e30)
    assert r.returncode == 1, r.stdout + r.stderr
    log = tmp_path / "logs" / "ternary.txt"
    assert "step:3/6 train_loss:nan" in r.stdout and "step:4/6" not in r.stdout and "pre_export" not in r.stdout
    assert last_line(log).startswith("error: training diverged at step 3: train_loss:nan")
    assert (tmp_path / "model.ptz").read_bytes() == b"previous good artifact"


@pytest.mark.parametrize("target", ["artifact", "checkpoint"])
def test_non_finite_weights_are_never_written(shards, tmp_path, target):
    """Two steps at EMBED_LR=1e30: both logged losses are finite, the weights after the last step are not. Neither
    the checkpoint nor the artifact is written, and the files already there stay."""
    good = {"artifact": tmp_path / "model.ptz", "checkpoint": tmp_path / "ckpt.pt"}
    for path in good.values():
        path.write_bytes(b"good " + path.name.encode())
    extra = dict(CHECKPOINT_SAVE=1, CHECKPOINT_PATH=good["checkpoint"]) if target == "checkpoint" else {}
    r = run_train(shards, tmp_path, ITERATIONS=2, EMBED_LR=1e30, **extra)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(log_values(r.stdout, "train_loss")) == 2 and "train_loss:nan" not in r.stdout
    error = last_line(tmp_path / "logs" / "ternary.txt")
    assert error.startswith("error: ") and "not finite" in error and str(good[target]) in error
    assert "tok_emb.weight" in error
    for path in good.values():
        assert path.read_bytes() == b"good " + path.name.encode()

@pytest.fixture
def one_thread():
    """In-process training like the subprocess runs (OMP_NUM_THREADS=1): on a shared CPU, spinning intra-op
    threads make small kernels many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unquantized_copy(m, cls):
    """A deep copy of m whose ternary layers are all of class cls."""
    import copy

    ref = copy.deepcopy(m)
    for layer in ref.modules():
        if isinstance(layer, tg.TernaryLinear):
            layer.__class__ = cls
    return ref


class FloatLinear(tg.TernaryLinear):
    """The FP phase's reference: the latent weight, unquantized."""

    def quantized_weight(self):
        return self.weight


def test_fp_phase_switches_inside_one_compiled_graph(one_thread):
    """FP_PHASE under torch.compile: one graph serves both phases (a recompile raises), the steps before
    QAT_START_FRAC compute the unquantized forward and the steps from it the ternary one, each against an eager
    reference on the same weights. (aot_eager keeps the test fast: the guards and the lifted buffers are dynamo's
    and AOTAutograd's; inductor was checked by hand, see the i12 report.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from test_model import BASE
    from test_optim import OneBatchLoader

    h = tg.Hyperparameters({**BASE, "NUM_LAYERS": "2", "FP_PHASE": "1", "QAT_START_FRAC": "0.5", "QAT_RAMP_FRAC": "0",
                            "ITERATIONS": "4", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "MATRIX_LR": "0.05"})
    torch.manual_seed(0)
    base = tg.GPT(h)
    with torch.no_grad():  # away from the zero-init projections, so that quantizing changes the loss visibly
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    base.quant_mix = tg.QuantMix(base)
    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(base, backend="aot_eager", dynamic=False)
    opts, sched = tg.build_optimizers(base, h), tg.TrainingSchedule(h)
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        with torch.no_grad():
            fp, ternary = (unquantized_copy(base, cls)(idx, idx).item() for cls in (FloatLinear, tg.TernaryLinear))
        assert abs(fp - ternary) > 1e-2
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = tg.train_step(model, base, OneBatchLoader(idx, idx), opts, h, sched, step, 0.0).item()
        assert loss == pytest.approx(fp if step < 2 else ternary, abs=1e-5), step
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs >= 1
    assert base.quant_mix.value == 1.0


def fit_in_process(shards, monkeypatch, **env):  # use with the one_thread fixture
    """train_gpt.fit on the TINY config in this process: (model, h, log lines, the parameters after every step
    as float64 numpy arrays, (val tokens, byte tables))."""
    import sentencepiece as spm
    from conftest import TINY, TOKENIZER

    h = tg.Hyperparameters({**TINY, "DATA_PATH": str(shards), **{k: str(v) for k, v in env.items()}})
    torch.manual_seed(h.seed)
    base = tg.GPT(h)
    trajectory, logs, step_fn = [], [], tg.train_step

    def recording_step(*args, **kwargs):
        loss = step_fn(*args, **kwargs)
        trajectory.append({n: p.detach().double().numpy().copy() for n, p in base.named_parameters()})
        return loss

    monkeypatch.setattr(tg, "train_step", recording_step)
    tokens = tg.load_validation_tokens(str(shards / "fineweb_val_*.bin"), h.vocab_size, h.max_val_tokens)
    val = (tokens, tg.build_byte_luts(spm.SentencePieceProcessor(model_file=TOKENIZER), h.vocab_size))
    tg.fit(base, h, str(shards / "fineweb_train_*.bin"), val, 0, 1, torch.device("cpu"), logs.append, False)
    return base, h, logs, trajectory, val


def test_trit_zero_frac_is_logged_after_training(shards, monkeypatch, one_thread):
    import numpy as np
    from test_quant import numpy_ternary

    base, h, logs, _, _ = fit_in_process(shards, monkeypatch, ITERATIONS=2, MUON_WD=0.1)
    trits = [numpy_ternary(m.weight.detach().numpy(), h.group_size)[0] for m in tg.ternary_modules(base).values()]
    want = sum((t == 0).sum() for t in trits) / sum(t.size for t in trits)
    assert 0.2 < want < 0.5 and [line for line in logs if line.startswith("trit_zero_frac:")] == [
        f"trit_zero_frac:{want:.4f}"]


class FakeTime:
    """A perf_counter the test advances, and a count of device syncs."""

    def __init__(self):
        self.now, self.syncs = 0.0, 0

    def perf_counter(self):
        return self.now

    def sync(self, device):
        self.syncs += 1


@pytest.mark.parametrize("every, reads", [
    (1, list(range(1, 21))),
    (4, [1, 2, 3, 4, 5, 8, 12, 16, 17, 18, 19, 20]),  # every 4th, then every step once 20 s may be 4 steps away
])
def test_train_clock_reads_every_k_steps_and_stops_on_the_same_step(monkeypatch, every, reads):
    """Steps of 1 s against a 20 s budget, as train() drives the clock: with TRAIN_SYNC_EVERY=4 it syncs 12 times
    instead of 20, and the run still ends on step 20, the first one past the budget."""
    fake = FakeTime()
    monkeypatch.setattr(tg.time, "perf_counter", fake.perf_counter)
    monkeypatch.setattr(tg, "sync", fake.sync)
    h = tg.Hyperparameters({"TRAIN_SYNC_EVERY": str(every), "MAX_WALLCLOCK_SECONDS": "20", "TRAIN_LOG_EVERY": "100"})
    clock = tg.TrainClock(h, torch.device("cpu"), 1)
    clock.start()
    step, seconds, seen = 0, 0.0, []
    while seconds < h.max_wallclock_seconds:
        fake.now += 1.0
        step += 1
        if clock.due(step):
            seconds = clock.read(step)
            seen.append(step)
        assert step < 100
    assert step == 20 and seen == reads and fake.syncs == len(reads) + 1


def test_train_sync_every_changes_no_step(shards, monkeypatch, one_thread):
    """TRAIN_SYNC_EVERY=4 on a run its wall clock does not stop: the same parameters after every step, and 7 clock
    reads (steps 1-5, 8, 12) in train() instead of 12."""
    import numpy as np

    counts, plain_step = {}, tg.train_step
    for every in (1, 4):
        fake = FakeTime()
        monkeypatch.setattr(tg, "sync", fake.sync)
        monkeypatch.setattr(tg, "train_step", plain_step)  # fit_in_process wraps it: once per run
        _, _, logs, trajectory, _ = fit_in_process(shards, monkeypatch, ITERATIONS=12, TRAIN_SYNC_EVERY=every,
                                                   TRAIN_LOG_EVERY=100, COMPILE_WARMUP_STEPS=0)
        counts[every] = (fake.syncs, trajectory)
    (s1, t1), (s4, t4) = counts[1], counts[4]
    assert len(t1) == len(t4) == 12
    for a, b in zip(t1, t4):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert s1 - s4 == 12 - 7


@pytest.mark.parametrize("dgrad, wgrad, fn", [("0", "0", "FP8Matmul"), ("1", "0", "FP8DgradMatmul"),
                                              ("1", "1", "FP8WgradMatmul")])
def test_fp8_matmul_is_on_for_every_training_step_and_off_after(shards, monkeypatch, one_thread, dgrad, wgrad, fn):
    """FP8_MATMUL=1: every step trains with the ternary layers in FP8Matmul (FP8DgradMatmul with FP8_DGRAD=1), and
    fit hands back a model whose layers multiply with F.linear again, as evaluation, LoRA TTT and the export
    expect."""
    seen, step_fn = [], tg.train_step

    def watching_step(model, base, *args, **kwargs):
        seen.append({mod.__dict__.get("matmul") for mod in tg.ternary_modules(base).values()})
        return step_fn(model, base, *args, **kwargs)

    monkeypatch.setattr(tg, "train_step", watching_step)
    base, h, _, _, _ = fit_in_process(shards, monkeypatch, FP8_MATMUL=1, FP8_DGRAD=dgrad, FP8_WGRAD=wgrad,
                                      MODEL_DIM=128, GROUP_SIZE=64, NUM_KV_HEADS=4, TRAIN_SEQ_LEN=128,
                                      ITERATIONS=2)  # k and v 128 wide, sequences of 128: whole blocks
    assert len(seen) == 2 and all(s == {getattr(tg, fn).apply} for s in seen)
    assert all("matmul" not in mod.__dict__ for mod in tg.ternary_modules(base).values())
