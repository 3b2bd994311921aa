"""2-process DDP on CPU (torchrun + gloo) matches a 1-process run with the same global batch."""
import pytest

from conftest import event_bpb, log_values, run_train
from test_export import without_timings


def assert_two_ranks_match_one(shards, tmp_path, steps, tol, **common):
    """1 process with GRAD_ACCUM_STEPS=2 vs 2 processes with 1: same losses and final val_bpb within tol.
    Returns the 2-process stdout."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_train(shards, tmp_path / "one", GRAD_ACCUM_STEPS=2, ITERATIONS=steps, **common)
    two = run_train(shards, tmp_path / "two", nproc=2, GRAD_ACCUM_STEPS=1, ITERATIONS=steps, **common)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    l1, l2 = log_values(one.stdout, "train_loss"), log_values(two.stdout, "train_loss")
    assert len(l1) == len(l2) == steps
    assert l1 == pytest.approx(l2, abs=tol)
    assert event_bpb(one.stdout, "final_roundtrip") == pytest.approx(event_bpb(two.stdout, "final_roundtrip"), abs=tol)
    return two.stdout


@pytest.mark.ddp
def test_two_process_gloo_matches_single_process(shards, tmp_path):
    """Sliding-window scores and the temperature search are sharded too: same T and val_bpb on 2 ranks."""
    out = assert_two_ranks_match_one(shards, tmp_path, 6, 2e-4, TRAIN_LOG_EVERY=1, COMPILE_WARMUP_STEPS=1,
                                     MAX_VAL_TOKENS=2048, EVAL_STRIDE=16, TEMPERATURE_SEARCH=1,
                                     TEMPERATURE_TOKENS=4096)
    assert "world_size:2" in out and "temperature T:" in out and "stride:16" in out


@pytest.mark.ddp
def test_two_process_gloo_with_every_feature_on_matches_single_process(shards, tmp_path):
    """All architecture features at once (MoE routing, capsules, feedback, recurrence switching on at half
    of the run, ...): DDP finds every parameter in the graph and the ranks stay in step."""
    from test_model import ALL_ON

    assert_two_ranks_match_one(shards, tmp_path, 4, 5e-4, **ALL_ON, TRAIN_LOG_EVERY=1, COMPILE_WARMUP_STEPS=1,
                               MAX_VAL_TOKENS=2048, RECUR_FROM_FRAC=0.5, MUON_WD=0.01)


@pytest.mark.ddp
def test_two_process_calibration_keeps_the_ranks_in_step(shards, tmp_path):
    """Every rank runs the same evaluations (losses and the budget flag are all-reduced): no hang, one result.
    The run also saves its checkpoint (rank 0 only); 2 ranks re-scoring it reproduce calibration and scores."""
    knobs = dict(ITERATIONS=4, TERNARY_CALIB=1, CALIB_MAX_EVALS=10, CALIB_TOKENS=4096,
                 CHECKPOINT_PATH=tmp_path / "ckpt.pt")
    (tmp_path / "again").mkdir()
    r = run_train(shards, tmp_path, nproc=2, CHECKPOINT_SAVE=1, **knobs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world_size:2" in r.stdout and "calibration tensors:" in r.stdout
    assert abs(event_bpb(r.stdout, "final_roundtrip") - event_bpb(r.stdout, "pre_export")) < 1e-3
    again = run_train(shards, tmp_path / "again", nproc=2, EVAL_FROM_CHECKPOINT=1, **knobs)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "train_done" not in again.stdout and "checkpoint_loaded" in again.stdout
    for event in ("calibration", "final_roundtrip"):
        assert without_timings(again.stdout, event) == without_timings(r.stdout, event)
    assert (tmp_path / "again" / "model.ptz").read_bytes() == (tmp_path / "model.ptz").read_bytes()


@pytest.mark.ddp
def test_two_process_exit_codes(shards, tmp_path):
    """Ranks leave through os._exit after destroying the group: a finished run exits 0, an over-cap one 1, and
    the log is complete either way."""
    (tmp_path / "model.ptz").write_bytes(b"old")
    over = run_train(shards, tmp_path, nproc=2, ITERATIONS=2, ARTIFACT_CAP_BYTES=1000)
    assert over.returncode == 1, over.stdout + over.stderr
    assert "ERROR artifact over cap" in (tmp_path / "logs" / "ternary.txt").read_text()
    assert (tmp_path / "model.ptz").read_bytes() == b"old" and "final_roundtrip" not in over.stdout
    assert (tmp_path / "logs" / "ternary.txt").read_text().splitlines()[-1].startswith("error: code + model is over")
    good = run_train(shards, tmp_path, nproc=2, ITERATIONS=2, RUN_ID="good")
    assert good.returncode == 0, good.stdout + good.stderr
    log = tmp_path / "logs" / "good.txt"
    assert log.read_text().splitlines()[-1].startswith("final_roundtrip")
    # the same RUN_ID again: rank 0 refuses its log, and rank 1 stops too instead of waiting in a collective
    before = log.read_bytes(), (tmp_path / "model.ptz").read_bytes()
    again = run_train(shards, tmp_path, nproc=2, ITERATIONS=2, RUN_ID="good")
    assert again.returncode != 0 and again.stderr.count(f"error: {log} already exists") == 2, again.stderr
    assert (log.read_bytes(), (tmp_path / "model.ptz").read_bytes()) == before


PHASE_PROBE = """
import os, sys, time
sys.path.insert(0, {root!r})
import train_gpt as tg

rank, original_train, original_step = int(os.environ["RANK"]), tg.train, tg.train_step


def train(*args, **kwargs):
    if rank == 1:
        time.sleep(0.5)  # this rank's own clock starts later: only the shared (max-reduced) clock keeps it in step
    return original_train(*args, **kwargs)


def train_step(model, base, loader, optimizers, h, schedule, step, elapsed, forced=None):
    loss = original_step(model, base, loader, optimizers, h, schedule, step, elapsed, forced)
    with open(os.environ["PROBE_OUT"] + str(rank), "a") as f:
        f.write(f"{{step}} {{elapsed!r}} {{base.quant_mix.value}}\\n")
    return loss


tg.train, tg.train_step = train, train_step
tg.main()
"""


@pytest.mark.ddp
@pytest.mark.parametrize("sync_every,ramp", [("1", "0"), ("4", "0"), ("4", "0.2")])
def test_two_ranks_leave_the_fp_phase_at_the_same_step(shards, tmp_path, sync_every, ramp):
    """FP_PHASE on the wall clock: rank 1 starts its clock 0.5 s late, yet both ranks turn the quantizer on at
    the same step (the one the log names), because the schedule reads the slowest rank's clock; also when they
    read it only every 4 steps (TRAIN_SYNC_EVERY), and both stop on the same step. With QAT_RAMP_FRAC (the
    default's 0.1) the ranks blend the quantizer in through the same values, rising from 0 to 1."""
    from conftest import ROOT

    probe = tmp_path / "probe.py"
    probe.write_text(PHASE_PROBE.format(root=str(ROOT)))
    r = run_train(shards, tmp_path, nproc=2, script=probe, FP_PHASE=1, QAT_START_FRAC=0.5, QAT_RAMP_FRAC=ramp,
                  ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=4, PROBE_OUT=tmp_path / "rank", TRAIN_SYNC_EVERY=sync_every)
    assert r.returncode == 0, r.stdout + r.stderr
    records = [(tmp_path / f"rank{k}").read_text().splitlines() for k in (0, 1)]
    assert records[0] == records[1]  # step, shared clock and quant_mix, line for line
    mix = [float(line.split()[2]) for line in records[0]]
    start, full = next(i for i, m in enumerate(mix) if m > 0), mix.index(1.0)
    assert 3 <= start and full < len(mix) - 3 and set(mix[:start]) == {0.0} and set(mix[full:]) == {1.0}
    ramping = mix[start:full]
    assert (ramping == []) if ramp == "0" else (len(ramping) >= 2 and ramping == sorted(set(ramping)))
    assert log_values(r.stdout, "qat_start step") == [start]


MUON_SHAPES = [(48, 32), (32, 64), (64, 64), (96, 32), (32, 32)]  # odd count: the ranks' shares differ in size


def muon_run(muon_class, steps=3, shapes=MUON_SHAPES):
    """Muon over `shapes` from fixed weights and gradients (the same on every rank, as DDP leaves them); the
    last matrix never gets a gradient. Returns (parameters, optimizer)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    opt = muon_class(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
    for _ in range(steps):
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


MUON_CLASSES = ("Muon", "RowNormMuon")
BATCHED_SHAPES = [(48, 32), (32, 64), (48, 32), (48, 32), (32, 64), (32, 32)]  # 3 and 2 of a shape, then a lone one


def sharded_muon_worker(rank, world, store, out):
    import torch
    import torch.distributed as dist

    import train_gpt as tg

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for name in MUON_CLASSES:
        params, opt = muon_run(getattr(tg, name))
        owned = sorted(i for i, p in enumerate(params) if "momentum_buffer" in opt.state[p])
        torch.save({"world": opt.world, "owned": owned, "params": [p.detach() for p in params]}, f"{out}{name}{rank}")
    for name in MUON_CLASSES:
        batched = tg.batched_muon_class(getattr(tg, name))
        for tag, cls in (("batched", batched), ("fused", tg.fused_muon_class(batched))):
            params, opt = muon_run(cls, shapes=BATCHED_SHAPES)
            owned = sorted(i for i, p in enumerate(params) if "momentum_buffer" in opt.state[p])
            torch.save({"owned": owned, "params": [p.detach() for p in params]}, f"{out}{tag}{name}{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.ddp
def test_sharded_muon_equals_unsharded(tmp_path):
    """2 gloo ranks: each orthogonalizes every other matrix and keeps only those momentum buffers, and after
    3 steps both hold exactly the parameters one unsharded process computes (Muon and RowNormMuon; with
    MUON_BATCHED and MUON_FUSED over either, every other matrix of each shape, to rounding: a batch of a different
    size)."""
    import torch
    import torch.multiprocessing as mp

    import train_gpt as tg

    mp.spawn(sharded_muon_worker, args=(2, tmp_path / "store", tmp_path / "rank"), nprocs=2)
    for name in MUON_CLASSES:
        ref, opt = muon_run(getattr(tg, name))
        assert opt.world == 1 and all("momentum_buffer" in opt.state[p] for p in ref[:-1])
        got = [torch.load(tmp_path / f"rank{name}{r}") for r in (0, 1)]
        assert [g["world"] for g in got] == [2, 2]
        assert got[0]["owned"] == [0, 2] and got[1]["owned"] == [1, 3]  # the gradient-less matrix 4 is nobody's
        for g in got:
            for a, b in zip(g["params"], ref):
                assert torch.equal(a, b), name
        assert not torch.equal(ref[0], muon_run(getattr(tg, name), steps=0)[0][0])  # the steps moved it
    # MUON_BATCHED (and MUON_FUSED over it), over Muon and RowNormMuon (the default since session 26): each rank
    # takes every other matrix of each shape, and all end with the one-process parameters
    for name in MUON_CLASSES:
        ref, _ = muon_run(tg.batched_muon_class(getattr(tg, name)), shapes=BATCHED_SHAPES)
        for tag in ("batched", "fused"):
            got = [torch.load(tmp_path / f"rank{tag}{name}{r}") for r in (0, 1)]
            assert got[0]["owned"] == [0, 1, 3] and got[1]["owned"] == [2, 4]  # lone gradient-less matrix 5: nobody's
            for g in got:
                for a, b in zip(g["params"], ref):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{tag} {name}")
