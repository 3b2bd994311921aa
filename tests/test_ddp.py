"""2-process DDP on CPU (torchrun + gloo) matches a 1-process run with the same global batch."""
import pytest

from conftest import event_bpb, log_values, run_train


@pytest.mark.ddp
def test_two_process_gloo_matches_single_process(shards, tmp_path):
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, COMPILE_WARMUP_STEPS=1, MAX_VAL_TOKENS=2048)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_train(shards, tmp_path / "one", GRAD_ACCUM_STEPS=2, **common)
    two = run_train(shards, tmp_path / "two", nproc=2, GRAD_ACCUM_STEPS=1, **common)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    assert "world_size:2" in two.stdout
    l1, l2 = log_values(one.stdout, "train_loss"), log_values(two.stdout, "train_loss")
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, abs=2e-4)
    v1 = event_bpb(one.stdout, "final_roundtrip")
    v2 = event_bpb(two.stdout, "final_roundtrip")
    assert v1 == pytest.approx(v2, abs=2e-4)


@pytest.mark.ddp
def test_two_process_gloo_with_every_feature_on_matches_single_process(shards, tmp_path):
    """All architecture features at once (MoE routing, capsules, feedback, recurrence switching on at half
    of the run, ...): DDP finds every parameter in the graph and the ranks stay in step."""
    from test_model import ALL_ON

    common = dict(ALL_ON, ITERATIONS=4, TRAIN_LOG_EVERY=1, COMPILE_WARMUP_STEPS=1, MAX_VAL_TOKENS=2048,
                  RECUR_FROM_FRAC=0.5, MUON_WD=0.01)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_train(shards, tmp_path / "one", GRAD_ACCUM_STEPS=2, **common)
    two = run_train(shards, tmp_path / "two", nproc=2, GRAD_ACCUM_STEPS=1, **common)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    l1, l2 = log_values(one.stdout, "train_loss"), log_values(two.stdout, "train_loss")
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, abs=5e-4)
    assert event_bpb(one.stdout, "final_roundtrip") == pytest.approx(event_bpb(two.stdout, "final_roundtrip"), abs=5e-4)
