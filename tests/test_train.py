"""End-to-end: a short CPU training run of train_gpt.py whose loss falls, exported, reloaded and scored."""
import pytest
import torch

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
def test_ema_run_exports_the_averaged_weights(shards, tmp_path):
    r = run_train(shards, tmp_path, ITERATIONS=6, EMA_ENABLED=1, EMA_DECAY=0.5, MUON_ROW_NORM=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "EMA_ENABLED=True" in r.stdout and "MUON_ROW_NORM=True" in r.stdout
    pre = event_bpb(r.stdout, "pre_export")
    final = event_bpb(r.stdout, "final_roundtrip")
    assert abs(final - pre) < 0.01  # the artifact holds the EMA weights that pre_export scored


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
