"""scripts/sweep.py: manifest validation, sequential runs with tables and plot, resume, failed runs, dry run."""
import csv
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "scripts"))
import sweep as sw  # noqa: E402
from runlog import read_run_log  # noqa: E402

SWEEP = str(ROOT / "scripts" / "sweep.py")


def write_manifest(path, runs, base=None, **top):
    path.write_text(json.dumps({"base": base or {}, "runs": runs, **top}))
    return path


def tiny_base(shards, **extra):
    return {**TINY, "DATA_PATH": str(shards), "ITERATIONS": 3, "MAX_WALLCLOCK_SECONDS": 0, "OMP_NUM_THREADS": 1,
            **extra}


def sweep(*args):
    return subprocess.run([sys.executable, SWEEP, *map(str, args)], capture_output=True, text=True, timeout=300)


def read_csv(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_runs_tables_plot_and_resume(shards, tmp_path):
    out = tmp_path / "out"
    runs = [{"name": "base"}, {"name": "no_smear", "env": {"SMEAR_GATE": False}}]
    manifest = write_manifest(tmp_path / "m.json", runs, base=tiny_base(shards))
    r = sweep(manifest, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep [1/2] start base" in r.stdout and "sweep [2/2] done no_smear" in r.stdout
    assert "eta:" in r.stdout and "elapsed:" in r.stdout
    logs = {n: out / "logs" / f"{n}.txt" for n in ("base", "no_smear")}
    parsed = {n: read_run_log(p) for n, p in logs.items()}
    assert all(p["finished"] for p in parsed.values())
    assert parsed["no_smear"]["config"]["SMEAR_GATE"] == "False" and parsed["base"]["config"]["SMEAR_GATE"] == "True"
    assert parsed["base"]["config"]["ARTIFACT_PATH"] == str(out / "artifacts" / "base.ternary.ptz")
    assert (out / "artifacts" / "base.ternary.ptz").exists() and (out / "logs" / "base.stdout").exists()

    rows = read_csv(out)
    assert [row["name"] for row in rows] == ["base", "no_smear"]
    for row in rows:
        p = parsed[row["name"]]
        assert row["status"] == "done"
        assert float(row["final_val_bpb"]) == p["final_val_bpb"]
        assert float(row["pre_export_val_bpb"]) == p["pre_export_val_bpb"]
        assert int(row["steps"]) == p["steps"] == 3 and int(row["total_bytes"]) == p["total_bytes"]
    assert rows[0]["delta_bpb"] == "+0.0000" and rows[1]["env"] == "SMEAR_GATE=0"
    assert float(rows[1]["delta_bpb"]) == pytest.approx(
        parsed["no_smear"]["final_val_bpb"] - parsed["base"]["final_val_bpb"], abs=1e-4)
    md = (out / "results.md").read_text()
    assert f"| base | done |  | {parsed['base']['final_val_bpb']} |" in md and "| no_smear | done |" in md
    assert "Base env: `VOCAB_SIZE=1024 " in md and "ITERATIONS=3 " in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # second invocation: both finished, so nothing runs and the logs are untouched
    mtimes = {n: p.stat().st_mtime_ns for n, p in logs.items()}
    r = sweep(manifest, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" skip ") == 2 and " start " not in r.stdout
    assert {n: p.stat().st_mtime_ns for n, p in logs.items()} == mtimes
    assert [row["final_val_bpb"] for row in read_csv(out)] == [row["final_val_bpb"] for row in rows]

    # a log without its final line is unfinished: only that run reruns, its old log kept aside
    old = logs["no_smear"].read_text()
    logs["no_smear"].write_text(old[:old.rindex("final_roundtrip")])
    r = sweep(manifest, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skip base" in r.stdout and "start no_smear" in r.stdout and "start base" not in r.stdout
    assert logs["base"].stat().st_mtime_ns == mtimes["base"]
    assert read_run_log(logs["no_smear"])["finished"] and logs["no_smear"].read_text().count("run_id:") == 1
    assert (out / "logs" / "no_smear.txt.prev").read_text() == old[:old.rindex("final_roundtrip")]
    assert float(read_csv(out)[1]["final_val_bpb"]) == read_run_log(logs["no_smear"])["final_val_bpb"]


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_sweep_goes_on(shards, tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    manifest = write_manifest(tmp_path / "m.json", [{"name": "broken", "env": {"DATA_PATH": str(empty)}},
                                                    {"name": "fine"}], base=tiny_base(shards))
    r = sweep(manifest, "--out", out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sweep [1/2] failed broken" in r.stdout and "sweep [2/2] done fine" in r.stdout
    broken, fine = read_csv(out)
    assert broken["status"] == "failed" and broken["final_val_bpb"] == "" and broken["delta_bpb"] == ""
    assert broken["error"].startswith("rc:2 error: no shard matches") and str(empty) in broken["error"]
    assert "no shard matches" in (out / "logs" / "broken.stdout").read_text()
    assert fine["status"] == "done"
    assert float(fine["final_val_bpb"]) == read_run_log(out / "logs" / "fine.txt")["final_val_bpb"]
    assert "| broken | failed |" in (out / "results.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("runs, base, command, expect", [
    ([{"name": "typo", "env": {"SMEAR_GAT": 0}}], {}, None, "run 'typo': unknown key SMEAR_GAT"),
    ([{"name": "a"}, {"name": "heads", "env": {"NUM_HEADS": 5}}], {"MODEL_DIM": 64}, None,
     "run 'heads': MODEL_DIM=64 is not divisible by NUM_HEADS=5"),
    ([{"name": "lr", "env": {"MATRIX_LR": "fast"}}], {}, None, "run 'lr': MATRIX_LR='fast' is not a valid float"),
    ([{"name": "mine", "env": {"RUN_ID": "x"}}], {}, None, "run 'mine': RUN_ID is set by the sweep runner"),
    ([{"name": "a"}], {"LOG_DIR": "x"}, None, "base: LOG_DIR is set by the sweep runner"),
    ([{"name": "twice"}, {"name": "twice"}], {}, None, "run 'twice': duplicate run name"),
    ([{"name": "has space"}], {}, None, "run 'has space': name must be"),
    ([{"name": "lst", "env": {"SEED": [1, 2]}}], {}, None, "run 'lst': SEED=[1, 2] must be"),
    ([], {}, None, "manifest has no runs"),
    ([{"name": "a"}], {}, "no_such_launcher_xyz train_gpt.py", "command 'no_such_launcher_xyz' not found"),
    ([{"name": "a"}], {}, 7, "command=7 must be"),
    ([{"name": "ddp"}], {"TRAIN_BATCH_TOKENS": 1000, "TRAIN_SEQ_LEN": 100},
     "python3 -m torch.distributed.run --nproc_per_node=3 train_gpt.py",
     "run 'ddp': TRAIN_BATCH_TOKENS=1000 must split into WORLD_SIZE=3"),
])
def test_bad_manifest_is_rejected_before_anything_runs(tmp_path, runs, base, command, expect):
    top = {"command": command} if command else {}
    out = tmp_path / "out"
    code = sw.main([str(write_manifest(tmp_path / "m.json", runs, base, **top)), "--out", str(out)])
    assert code == 2
    assert not out.exists()
    with pytest.raises(sw.SweepError, match=re.escape(expect)):
        sw.plan_runs(json.loads((tmp_path / "m.json").read_text()), out)


def test_bad_manifest_cli_message(tmp_path):
    out = tmp_path / "out"
    r = sweep(write_manifest(tmp_path / "m.json", [{"name": "typo", "env": {"NUM_HEDS": 4}}]), "--out", out)
    assert r.returncode == 2 and "run 'typo': unknown key NUM_HEDS" in r.stderr and r.stdout == ""
    assert not out.exists()


def test_dry_run_runs_nothing(tmp_path):
    out = tmp_path / "out"
    manifest = tmp_path / "m.toml"
    manifest.write_text('command = "torchrun --standalone --nproc_per_node=2 train_gpt.py"\n'
                        '[base]\nMAX_WALLCLOCK_SECONDS = 300\n[[runs]]\nname = "a"\n'
                        '[[runs]]\nname = "b"\nenv = { SMEAR_GATE = false, MATRIX_LR = 0.04 }\n')
    r = sweep(manifest, "--out", out, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("sweep [2/2] b:")
    assert "SMEAR_GATE=0 MATRIX_LR=0.04 RUN_ID=b LOG_DIR=" in lines[1]
    assert lines[1].endswith("torchrun --standalone --nproc_per_node=2 train_gpt.py")
    assert not out.exists()


def test_batch_recipe_manifest_validates_on_two_lanes():
    r = sweep(ROOT / "scripts" / "sweeps" / "batch_recipe.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 8 and all("TRAIN_BATCH_TOKENS=" in ln and "FP_PHASE=" in ln for ln in rows)
    assert "b65s42_lora (waits for b65s42: same checkpoint)" in r.stdout


def test_recipe65_manifest_validates_on_two_lanes():
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe65.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 14 and all("TRAIN_BATCH_TOKENS=65536 " in ln and "SCALE_FORMAT=log8 " in ln for ln in rows)
    assert sum("(waits for r65: same checkpoint)" in ln for ln in rows) == 6
    assert "r65s42_lora (waits for r65s42: same checkpoint)" in r.stdout and "TTT_LORA_BETA1=0 " in r.stdout


def test_recipe_mwd_manifest_validates_on_two_lanes():
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_mwd.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 20 and all("SCALE_FORMAT=log8 " in ln for ln in rows)
    assert sum("MUON_WD=0.04 " in ln for ln in rows) == 18  # the base's, but where a row sets its own
    assert sum("(waits for m65s42: same checkpoint)" in ln for ln in rows) == 9
    assert sum("TTT_LORA_GLOBAL=1 " in ln for ln in rows) == 4
    assert "m65s2024_lora (waits for m65s2024: same checkpoint)" in r.stdout


def test_recipe_s11_manifest_validates_on_two_lanes():
    """Session 11's sweep as it ran: eight training rows, ten re-scorings of the first row's checkpoint (isolated
    sliding, then the competition env's LoRA pipeline, alone and with one change each) and three of m65hd128s42's."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s11.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 21 and all("SCALE_FORMAT=log8 " in ln and "MUON_WD=0.04 " in ln for ln in rows)
    assert sum("(waits for d65s7: same checkpoint)" in ln for ln in rows) == 10
    assert sum("(waits for m65hd128s42: same checkpoint)" in ln for ln in rows) == 3
    lora = [ln for ln in rows if "TTT_MODE=lora " in ln]
    assert len(lora) == 11 and all("TTT_LORA_SPAN=8192 " in ln and "TTT_LORA_GLOBAL=1 " in ln for ln in lora)


def test_lora_glob_s10_manifest_only_rescores_recipe_mwd_checkpoints():
    """Session 10's last rows: every one re-scores a checkpoint that recipe_mwd.toml's first two rows wrote (no
    training row, so a short call can run them), with the shared adapter on."""
    r = sweep(ROOT / "scripts" / "sweeps" / "lora_glob_s10.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 8 and all("EVAL_FROM_CHECKPOINT=1 " in ln and "TTT_LORA_GLOBAL=1 " in ln for ln in rows)
    assert all(re.search(r"CHECKPOINT_PATH=/tmp/b/ckpt_m65s(42|2024)\.pt ", ln) for ln in rows)


def test_example_arch_ablation_manifest_validates():
    r = sweep(ROOT / "scripts" / "sweeps" / "arch_ablation.toml", "--dry-run")
    assert r.returncode == 0, r.stderr
    names = [ln.split()[2].rstrip(":") for ln in r.stdout.splitlines()]
    assert names[0] == "default" and len(names) == 13 and len(set(names)) == 13
    assert "MOE_ENABLED=1 MOE_EXPERTS=3" in r.stdout and "XSA_ENABLED=0" in r.stdout
    base = "MAX_WALLCLOCK_SECONDS=300 TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 BROTLI_QUALITY=5"
    assert r.stdout.count(base) == 13


@pytest.mark.slow
def test_eval_ladder_manifest_runs_end_to_end(shards, tmp_path):
    """scripts/sweeps/eval_ladder.toml at the TINY shape: one training run keeps its checkpoint, every later row
    re-scores it with one more post-training stage on, and the table carries each row's evaluation seconds."""
    import tomllib

    ladder = tomllib.loads((ROOT / "scripts" / "sweeps" / "eval_ladder.toml").read_text())
    names = [run["name"] for run in ladder["runs"]]
    assert names == ["chunked", "sliding", "temperature", "calibration", "ttt", "eval_engram"]
    tiny = {"EVAL_STRIDE": 32, "TEMPERATURE_TOKENS": 2048, "CALIB_TOKENS": 1024, "CALIB_MAX_EVALS": 6,
            "TTT_CHUNK_TOKENS": 1024, "EVAL_ENGRAM_BUCKETS": 256}
    for run in ladder["runs"][1:]:
        assert run["env"]["EVAL_FROM_CHECKPOINT"] == 1
        run["env"].update(tiny)  # stride 32: the ladder's 64 is the whole TINY sequence
    base = {**ladder["base"], **tiny_base(shards, BROTLI_QUALITY=1, CHECKPOINT_PATH=str(tmp_path / "ckpt.pt"))}
    out = tmp_path / "out"
    r = sweep(write_manifest(tmp_path / "ladder.json", ladder["runs"], base=base), "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr

    rows = {row["name"]: row for row in read_csv(out)}
    logs = {n: (out / "logs" / f"{n}.txt").read_text() for n in names}
    assert all(row["status"] == "done" and row["final_eval_s"] for row in rows.values())
    assert rows["chunked"]["steps"] == "3" and "checkpoint_saved" in logs["chunked"]
    for i, name in enumerate(names[1:], 2):  # stage k is on from row k on, and nothing was trained again
        assert rows[name]["steps"] == "" and "checkpoint_loaded" in logs[name] and "stride:32" in logs[name]
        assert bool(rows[name]["temperature_s"]) == (i >= 3) and bool(rows[name]["calib_s"]) == (i >= 4)
        assert ("stream_eval ttt:1" in logs[name]) == (i >= 5) and ("eval_engram:1" in logs[name]) == (i >= 6)
    assert read_run_log(out / "logs" / "ttt.txt")["ttt_adapted"] == 4  # 4096 val tokens in chunks of 1024
    artifacts = {n: (out / "artifacts" / f"{n}.ternary.ptz").read_bytes() for n in names}
    # the same weights exported twice are the same bytes; T and the calibrated trits change them
    assert artifacts["sliding"] == artifacts["chunked"] != artifacts["temperature"] != artifacts["calibration"]
    assert artifacts["calibration"] == artifacts["ttt"] == artifacts["eval_engram"]  # TTT/EvalEngram: eval only


# ---------------------------------------------------------------------------------------------------------------
# resume against the manifest, signals, the folder lock, the log's error line (issue 15 item 8). A fake trainer
# stands in for train_gpt.py: it writes train_gpt.py's config line and events, fast.

FAKE = r'''
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from train_gpt import Hyperparameters
h = Hyperparameters()
mode = h.run_id.split("-")[-1]  # the row's name says how this fake run ends
log = open(os.path.join(h.log_dir, h.run_id + ".txt"), "a", buffering=1)
log.write(f"run_id:{h.run_id} world_size:1 device:cpu torch:x compile:False\n")
log.write("config " + " ".join(f"{k}={v}" for k, v in h.by_env_name().items()) + "\n")
if os.environ.get("FAKE_LANES"):  # which GPUs the sweep gave this run
    open(os.path.join(os.environ["FAKE_LANES"], h.run_id), "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
if mode == "meet":  # waits for FAKE_MEET_N runs named *-meet: only runs side by side get past this
    meet = os.environ["FAKE_MEET"]
    open(os.path.join(meet, h.run_id), "w").write("x")
    deadline = time.time() + 20
    while len(os.listdir(meet)) < int(os.environ["FAKE_MEET_N"]):
        if time.time() > deadline:
            log.write("error: no other run started beside this one\n")
            sys.exit(3)
        time.sleep(0.05)
if mode == "sleep":
    marker = os.environ["FAKE_MARKER"] + "." + h.run_id.split("-")[0]  # one marker per run
    def stop(signum, frame):
        time.sleep(1.0)  # the sweep must wait for this, not leave it running
        open(marker, "w").write(f"stopped by {signum}")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    open(marker + ".started", "w").write("x")
    time.sleep(120)
if h.eval_from_checkpoint and not os.path.exists(h.checkpoint_path):
    log.write(f"error: no checkpoint at {h.checkpoint_path}\n")
    sys.exit(4)
if mode in ("nan", "nan_rc0"):
    log.write("step:3/3 train_loss:nan\nerror: non-finite loss nan at step 3; no artifact written\n")
    print("some unrelated last line on stderr", file=sys.stderr)
    sys.exit(0 if mode == "nan_rc0" else 2)
if h.checkpoint_save:  # slowly, so that a re-scoring row started beside it would find nothing
    time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
    open(h.checkpoint_path, "w").write(h.run_id)
log.write("train_done steps:3 train_seconds:0.1 tok/s:1 peak_mem_mib:0\n")
log.write("final_roundtrip val_loss:3.0000 val_bpb:1.5000 gap_bpb:+0.0000 eval_seconds:0.1 stride:64\n")
'''


def fake_manifest(tmp_path, runs, **base):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    return write_manifest(tmp_path / "m.json", runs, base={"MAX_WALLCLOCK_SECONDS": 0, **base},
                          command=[sys.executable, str(script), str(ROOT)])


def test_resume_reruns_a_row_whose_config_changed(tmp_path):
    out = tmp_path / "out"
    runs = [{"name": "a"}, {"name": "b", "env": {"MATRIX_LR": 0.05}}]
    r = sweep(fake_manifest(tmp_path, runs), "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    old_b = (out / "logs" / "b.txt").read_text()
    a_mtime = (out / "logs" / "a.txt").stat().st_mtime_ns
    runs[1]["env"]["MATRIX_LR"] = 0.03  # the row was edited after it ran: its score no longer describes it
    r = sweep(fake_manifest(tmp_path, runs), "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skip a" in r.stdout and "start a" not in r.stdout
    assert "rerun b: its log's config differs from the manifest: MATRIX_LR log 0.05, manifest 0.03" in r.stdout
    assert read_run_log(out / "logs" / "b.txt")["config"]["MATRIX_LR"] == "0.03"
    assert (out / "logs" / "b.txt.prev").read_text() == old_b  # the old log moved aside, whole
    assert (out / "logs" / "a.txt").stat().st_mtime_ns == a_mtime
    r = sweep(fake_manifest(tmp_path, runs), "--out", out)  # and now both match: nothing runs
    assert r.stdout.count(" skip ") == 2 and " start " not in r.stdout


@pytest.mark.parametrize("mode", ["nan", "nan_rc0"])
def test_a_failed_run_is_reported_with_its_logs_error_line(tmp_path, mode):
    out = tmp_path / "out"
    r = sweep(fake_manifest(tmp_path, [{"name": f"diverged-{mode}"}]), "--out", out)
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = read_csv(out)
    assert row["status"] == "failed"
    assert row["error"] == f"rc:{0 if mode == 'nan_rc0' else 2} error: non-finite loss nan at step 3; no artifact written"
    assert "error: non-finite loss nan" in r.stdout


def wait_for(path, timeout=60):
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_reaches_the_training_child_and_the_folder_is_locked(tmp_path, sig, monkeypatch):
    import signal

    out, marker = tmp_path / "out", tmp_path / "marker.long"
    monkeypatch.setenv("FAKE_MARKER", str(tmp_path / "marker"))  # runs start with the caller's environment
    manifest = fake_manifest(tmp_path, [{"name": "long-sleep"}])
    first = subprocess.Popen([sys.executable, SWEEP, str(manifest), "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "marker.long.started")
        second = sweep(manifest, "--out", out)  # an immediate resume must not run a second copy
        assert second.returncode == 2 and "is in use by another sweep" in second.stderr, second.stdout + second.stderr
        assert " start " not in second.stdout
        first.send_signal(getattr(signal, sig))
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert marker.read_text() == f"stopped by {signal.SIGTERM.value}"  # forwarded, and waited for (1 s)
    assert first.returncode == 128 + getattr(signal, sig).value, stdout + stderr
    assert f"sweep: stopped by {sig}" in stderr
    (row,) = read_csv(out)
    assert row["status"] == "failed" and "stopped by" in row["error"]


# ---- --gpus: lanes side by side ---------------------------------------------------------------------------------

def test_gpu_lanes_run_side_by_side_on_their_own_gpus(tmp_path, monkeypatch):
    """Two lanes: the two *-meet runs can only finish if they run at the same time, on different GPUs; the last
    two rows follow on whichever lane is free, and the tables keep manifest order."""
    out, lanes, meet = tmp_path / "out", tmp_path / "lanes", tmp_path / "meet"
    lanes.mkdir()
    meet.mkdir()
    monkeypatch.setenv("FAKE_LANES", str(lanes))
    monkeypatch.setenv("FAKE_MEET", str(meet))
    monkeypatch.setenv("FAKE_MEET_N", "2")
    names = ["a-meet", "b-meet", "c", "d"]
    r = sweep(fake_manifest(tmp_path, [{"name": n} for n in names]), "--out", out, "--gpus", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    gpu = {n: (lanes / n).read_text() for n in names}
    assert {gpu["a-meet"], gpu["b-meet"]} == {"0", "1"} and {gpu["c"], gpu["d"]} <= {"0", "1"}
    assert [row["name"] for row in read_csv(out)] == names and all(row["status"] == "done" for row in read_csv(out))
    assert re.search(r"start a-meet gpu:[01] ", r.stdout) and "sweep done: 4/4 finished" in r.stdout


def test_a_lane_of_two_gpus_gets_both(tmp_path, monkeypatch):
    out, lanes = tmp_path / "out", tmp_path / "lanes"
    lanes.mkdir()
    monkeypatch.setenv("FAKE_LANES", str(lanes))
    manifest = fake_manifest(tmp_path, [{"name": "a"}, {"name": "b"}])
    cmd = json.loads(manifest.read_text())
    cmd["command"].append("--nproc_per_node=2")  # as a torchrun command would say; the fake ignores it
    manifest.write_text(json.dumps(cmd))
    r = sweep(manifest, "--out", out, "--gpus", "0+1,2+3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {(lanes / n).read_text() for n in "ab"} <= {"0,1", "2,3"}


@pytest.mark.parametrize("gpus, runs, expect", [
    ("0,x", [{"name": "a"}], "lanes are GPU indices"),
    ("0,1+0", [{"name": "a"}], "a GPU is in two lanes"),
    ("0+1", [{"name": "a"}], "lane '0,1' has 2 GPUs, but the command starts 1 process"),
    ("0,1", [{"name": "a", "env": {"CUDA_VISIBLE_DEVICES": "3"}}], "run 'a': CUDA_VISIBLE_DEVICES is set by --gpus"),
])
def test_bad_gpu_lanes_are_refused_before_anything_runs(tmp_path, gpus, runs, expect):
    out = tmp_path / "out"
    r = sweep(fake_manifest(tmp_path, runs), "--out", out, "--gpus", gpus)
    assert r.returncode == 2 and expect in r.stderr, r.stdout + r.stderr
    assert not out.exists()


def test_rows_that_share_a_checkpoint_keep_their_order():
    plan = [{"name": n, "env": env} for n, env in [
        ("w1", {"CHECKPOINT_SAVE": "1"}), ("r1", {"EVAL_FROM_CHECKPOINT": "1"}), ("r2", {"EVAL_FROM_CHECKPOINT": "1"}),
        ("free", {}), ("w2", {"CHECKPOINT_SAVE": "1"}), ("r3", {"EVAL_FROM_CHECKPOINT": "1"}),
        ("elsewhere", {"EVAL_FROM_CHECKPOINT": "1", "CHECKPOINT_PATH": "other.pt"})]]
    sw.checkpoint_order(plan)
    after = {r["name"]: r["after"] for r in plan}
    assert after == {"w1": [], "r1": ["w1"], "r2": ["w1"], "free": [], "w2": ["w1", "r1", "r2"], "r3": ["w1", "w2"],
                     "elsewhere": []}


def test_lanes_rescore_a_checkpoint_only_after_its_training_row(tmp_path, monkeypatch):
    """Row 2 re-scores row 1's checkpoint: the second lane runs row 3 meanwhile, then row 2 once row 1 is done. A
    failed training row fails its re-scoring rows unrun, and rerunning a training row reruns them."""
    out, ckpt = tmp_path / "out", tmp_path / "float.pt"
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "1.5")
    runs = [{"name": "train", "env": {"CHECKPOINT_SAVE": 1}}, {"name": "rescore", "env": {"EVAL_FROM_CHECKPOINT": 1}},
            {"name": "other"}]
    r = sweep(fake_manifest(tmp_path, runs, CHECKPOINT_PATH=str(ckpt)), "--out", out, "--gpus", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    order = [line.split()[3] for line in r.stdout.splitlines() if " start " in line or " done " in line]
    assert order.index("rescore") > order.index("train", order.index("train") + 1)  # started after train's "done"
    runs[0]["env"]["MATRIX_LR"] = 0.05  # the training row changed: its checkpoint will, and so will the score
    dry = sweep(fake_manifest(tmp_path, runs, CHECKPOINT_PATH=str(ckpt)), "--out", out, "--dry-run").stdout
    assert "rescore (finished" not in dry and "other (finished: would skip)" in dry  # as the run below decides
    r = sweep(fake_manifest(tmp_path, runs, CHECKPOINT_PATH=str(ckpt)), "--out", out, "--gpus", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rerun rescore: train, whose checkpoint it shares, runs again" in r.stdout and "skip other" in r.stdout
    ckpt.unlink()
    runs[0]["name"] = "train-nan"
    r = sweep(fake_manifest(tmp_path, runs[:2], CHECKPOINT_PATH=str(ckpt)), "--out", tmp_path / "out2", "--gpus", "0,1")
    assert r.returncode == 1
    rows = {row["name"]: row for row in read_csv(tmp_path / "out2")}
    assert rows["rescore"]["status"] == "failed" and rows["rescore"]["error"].startswith("not run: train-nan failed")
    assert " start rescore" not in r.stdout


def test_deadline_starts_no_run_past_it_and_the_next_call_goes_on(tmp_path, monkeypatch):
    """--deadline 0.5 with runs of about 1 s: the first runs to its end, the other two wait for the next call."""
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "1")
    runs = [{"name": n, "env": {"CHECKPOINT_SAVE": 1, "CHECKPOINT_PATH": str(tmp_path / f"{n}.pt")}} for n in "abc"]
    manifest = fake_manifest(tmp_path, runs)
    r = sweep(manifest, "--out", out, "--deadline", "0.5")
    assert r.returncode == 3, r.stdout + r.stderr
    assert [row["status"] for row in read_csv(out)] == ["done", "pending", "pending"]
    assert "sweep paused at --deadline 0.5 s: 2 runs not started (b c)" in r.stdout
    r = sweep(manifest, "--out", out)
    assert r.returncode == 0 and "skip a" in r.stdout and " start b" in r.stdout and " start c" in r.stdout


def test_rescore_deadline_lets_re_scoring_rows_fill_the_call_past_the_training_deadline(tmp_path, monkeypatch):
    """--deadline 0.5 --rescore-deadline 30, one lane: a trains past 0.5 s, so the training row b waits for the next
    call, but the re-scoring row r after it in the manifest still starts, on a's checkpoint."""
    out, ckpt = tmp_path / "out", tmp_path / "a.pt"
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "1")
    runs = [{"name": "a", "env": {"CHECKPOINT_SAVE": 1, "CHECKPOINT_PATH": str(ckpt)}},
            {"name": "b", "env": {"CHECKPOINT_SAVE": 1, "CHECKPOINT_PATH": str(tmp_path / "b.pt")}},
            {"name": "r", "env": {"EVAL_FROM_CHECKPOINT": 1, "CHECKPOINT_PATH": str(ckpt)}}]
    manifest = fake_manifest(tmp_path, runs)
    r = sweep(manifest, "--out", out, "--deadline", "0.5", "--rescore-deadline", "30")
    assert r.returncode == 3, r.stdout + r.stderr
    assert [row["status"] for row in read_csv(out)] == ["done", "pending", "done"]
    assert "sweep paused at --deadline 0.5 s and --rescore-deadline 30 s: 1 runs not started (b)" in r.stdout
    r = sweep(manifest, "--out", tmp_path / "out2", "--deadline", "0.5", "--rescore-deadline", "0.5")
    assert [row["status"] for row in read_csv(tmp_path / "out2")] == ["done", "pending", "pending"]


def test_a_signal_stops_every_lane(tmp_path, monkeypatch):
    import signal

    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_MARKER", str(tmp_path / "marker"))
    manifest = fake_manifest(tmp_path, [{"name": "x-sleep"}, {"name": "y-sleep"}, {"name": "z"}])
    first = subprocess.Popen([sys.executable, SWEEP, str(manifest), "--out", str(out), "--gpus", "0,1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "marker.x.started")
        wait_for(tmp_path / "marker.y.started")
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    for run in "xy":
        assert (tmp_path / f"marker.{run}").read_text() == f"stopped by {signal.SIGTERM.value}"
    assert first.returncode == 128 + signal.SIGTERM.value, stdout + stderr
    rows = {row["name"]: row for row in read_csv(out)}
    assert rows["x-sleep"]["status"] == rows["y-sleep"]["status"] == "failed"
    assert rows["z"]["status"] == "pending" and " start z" not in stdout  # no new run after the signal


# ---- scripts/runlog.py -----------------------------------------------------------------------------------------

ONE_RUN = """run_id:a world_size:1 device:cuda:0 torch:2.11 compile:True
code sha256:{sha} gpu:NVIDIA_H100_80GB_HBM3
config SEED=1 MATRIX_LR=0.03
step:1/2 train_loss:6.9000 mfu:0.100
step:2/2 train_loss:6.5000 mfu:0.200
train_done steps:2 train_seconds:1.0 tok/s:10 peak_mem_mib:5
final_roundtrip val_loss:3.0000 val_bpb:1.5000 gap_bpb:+0.0 eval_seconds:1.0 stride:64
"""


def test_runlog_reads_one_run_and_refuses_a_log_of_two(tmp_path):
    import runlog

    sha = "ab" * 32
    run = runlog.parse_run_log(ONE_RUN.format(sha=sha))
    assert run["code_sha256"] == sha and run["gpu"] == "NVIDIA_H100_80GB_HBM3" and run["device"] == "cuda:0"
    assert run["curve"] == [(1, 6.9), (2, 6.5)] and run["mfu"] == 0.2  # within one run the last step line wins
    assert run["finished"] and run["seed"] == 1 and run["steps"] == 2
    # a finished run followed by a crashed one with another config, as appending to one log used to produce
    crashed = "run_id:a world_size:1 device:cuda:0 torch:2.11 compile:True\nconfig SEED=2 MATRIX_LR=0.05\n"
    log = tmp_path / "a.txt"
    log.write_text(ONE_RUN.format(sha=sha) + crashed)
    with pytest.raises(runlog.LogError, match=re.escape(f"{log}: holds 2 runs")):
        runlog.read_run_log(log)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "runlog.py"), str(log)], capture_output=True, text=True)
    assert r.returncode != 0 and "holds 2 runs" in r.stderr


def small_golfmix(folder, n=20):
    """The embedded sample's first n documents of each split, as GOLFMIX_DIR wants them."""
    import lzma

    from conftest import SAMPLE

    folder.mkdir()
    for split in ("train", "val"):
        with lzma.open(SAMPLE / f"{split}_docs.jsonl.xz", "rt") as f:
            lines = [next(f) for _ in range(n)]
        with lzma.open(folder / f"{split}_docs.jsonl.xz", "wt") as f:
            f.writelines(lines)
    return folder


def sweep_device(tmp_path, *args, **env):
    import os

    from conftest import TOKENIZER

    full = {**os.environ, "GOLFMIX_DIR": str(tmp_path / "golfmix"), "TOKENIZER": TOKENIZER,
            "WORK": str(tmp_path / "work"), "WHEELS": str(tmp_path / "no_wheels"), "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "sweep_device.sh"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=full)


def test_sweep_device_builds_shards_once_runs_the_lanes_and_returns_the_logs(tmp_path):
    import tarfile

    small_golfmix(tmp_path / "golfmix")
    (tmp_path / "out").mkdir()
    manifest = fake_manifest(tmp_path, [{"name": "a"}, {"name": "b"}])
    (tmp_path / "lanes").mkdir()
    r = sweep_device(tmp_path, manifest, "s9", FAKE_LANES=str(tmp_path / "lanes"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.read_text() for p in (tmp_path / "lanes").iterdir()) == ["0", "1"]  # GPUS' default lanes
    assert "sweep rc:0" in r.stdout and "sweep [2/2] done" in r.stdout and "--gpus" not in r.stderr
    deadline, rescore, cut = map(int, re.search(r"deadline (\d+)s \(re-scoring rows (\d+)s\), cut at (\d+)s",
                                                r.stdout).groups())
    assert (deadline, rescore) == (cut - 440, cut - 100)  # ROW_SECONDS and RESCORE_SECONDS' defaults
    shard = tmp_path / "work" / "golfmix_sp1024" / "fineweb_val_000000.bin"
    built = shard.stat().st_mtime_ns
    with tarfile.open(tmp_path / "out" / "s9_logs.tgz") as tar:
        names = tar.getnames()
    assert {"s9/logs/a.txt", "s9/logs/b.txt", "s9/results.md", "s9/results.csv"} <= set(names)
    assert any(n.startswith("s9_") and n.endswith(".out") for n in names)
    r = sweep_device(tmp_path, manifest, "s9")  # the next call: nothing to build or run
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" skip ") == 2 and " start " not in r.stdout and shard.stat().st_mtime_ns == built


def test_sweep_device_starts_no_row_that_the_call_could_not_finish(tmp_path):
    small_golfmix(tmp_path / "golfmix")
    (tmp_path / "out").mkdir()
    manifest = fake_manifest(tmp_path, [{"name": "a"}])
    r = sweep_device(tmp_path, manifest, "s10", CALL_SECONDS="60", ROW_SECONDS="440", RESCORE_SECONDS="100")
    assert r.returncode == 3, r.stdout + r.stderr  # rows left for the next call, none cut halfway
    assert re.search(r"deadline 0s \(re-scoring rows 0s\)", r.stdout) and " start a" not in r.stdout
    assert "1 runs not started (a)" in r.stdout


def test_sweep_device_refuses_bad_input_before_anything_runs(tmp_path):
    manifest = fake_manifest(tmp_path, [{"name": "a"}])
    r = sweep_device(tmp_path, manifest)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = sweep_device(tmp_path, tmp_path / "nope.toml", "s9")
    assert r.returncode == 2 and "no manifest" in r.stderr
    r = sweep_device(tmp_path, manifest, "s9")  # no golfmix folder
    assert r.returncode == 2 and "missing" in r.stderr and "train_docs.jsonl.xz" in r.stderr
    r = sweep_device(tmp_path, manifest, "s9", RESCORE_SECONDS="1m")
    assert r.returncode == 2 and "RESCORE_SECONDS=1m: must be whole seconds" in r.stderr
    assert not (tmp_path / "work").exists()


def test_recipe_s12_manifest_validates_on_two_lanes():
    """Session 12's plan as it ran: ten training rows at head dim 128 (the default since session 11) or with one
    change of the attention's shape or RoPE, the FP phase or FP8 matmuls (the FP8 rows after the first moved last once
    it lost), then fifteen re-scorings of two of those rows' checkpoints: isolated sliding, then the competition
    env's LoRA pipeline (shared adapter on every block matrix), alone and with one or two changes."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s12.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 25 and all("SCALE_FORMAT=log8 " in ln and "MUON_WD=0.04 " in ln for ln in rows)
    assert sum("NUM_HEADS=6 NUM_KV_HEADS=2 " in ln for ln in rows) == 24 and "NUM_HEADS=3 NUM_KV_HEADS=1 " in rows[7]
    assert "FP8_MATMUL=1 " in rows[1] and "FP8_MATMUL=1 FP8_DGRAD=1 " in rows[8]
    assert "FP8_MATMUL=1 FP8_DGRAD=1 FP8_WGRAD=1 " in rows[9] and sum("FP8_MATMUL" in ln for ln in rows) == 3
    assert ["ROPE_DIMS=64 " in ln for ln in rows[2:5]] == [True, False, True] and "ROPE_DIMS=32 " in rows[5]
    assert sum("(waits for h128s2024: same checkpoint)" in ln for ln in rows) == 9
    assert sum("(waits for h128rope64s42: same checkpoint)" in ln for ln in rows) == 6
    assert all("ROPE_DIMS=64 " in ln for ln in rows if "waits for h128rope64s42" in ln)
    lora = [ln for ln in rows if "TTT_MODE=lora " in ln]
    assert len(lora) == 13 and all("TTT_LORA_GLOBAL_TARGETS=q,k,v,proj,up,down,head " in ln for ln in lora)


def valid_manifest(name):
    """scripts/sweeps/<name> parsed, once train_gpt.py has accepted every row of it (its base and its env): a row
    it would refuse is found here, before a GPU is held."""
    import tomllib

    import train_gpt as tg

    manifest = tomllib.loads((ROOT / "scripts" / "sweeps" / name).read_text())
    for run in manifest["runs"]:
        tg.Hyperparameters({k: str(v) for k, v in {**manifest["base"], **run["env"]}.items()})
    return manifest


def test_recipe_s13_manifest_validates_on_two_lanes():
    """Session 13's plan: six training rows at session 12's default (head dim 128, RoPE on 64 channels) or with one
    change of RoPE, the heads or the FP phase, then eighteen re-scorings of the first row's checkpoint: issue 14's
    table on the default (chunked, isolated sliding, temperature, EvalEngram) and the env's LoRA pipeline alone and
    with one change or two (the last four rows, added for the session's fourth call)."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s13.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 24 and all("SCALE_FORMAT=log8 " in ln and "MUON_WD=0.04 " in ln for ln in rows)
    assert [re.findall(r" ROPE_DIMS=(\d+) ", ln) for ln in rows] == [["64"], ["32"], ["16"]] + [["64"]] * 21
    assert "NUM_HEADS=3 NUM_KV_HEADS=1 " in rows[4] and sum("NUM_HEADS=6 NUM_KV_HEADS=2 " in ln for ln in rows) == 23
    assert sum("(waits for r64s2024: same checkpoint)" in ln for ln in rows) == 18
    lora = [ln for ln in rows if "TTT_MODE=lora " in ln]
    assert len(lora) == 14 and all("TTT_LORA_GLOBAL_TARGETS=q,k,v,proj,up,down,head " in ln for ln in lora)
    assert all("TTT_LORA_LR=0.002 " in ln for ln in lora) and sum("TTT_LORA_BUCKET=1 " in ln for ln in lora) == 3
    assert sum("TTT_LORA_NO_CUDNN=1 " in ln for ln in lora) == 5
    valid_manifest("recipe_s13.toml")


def test_recipe_s14_manifests_validate_on_two_lanes():
    """Session 14's plan: the default retrained on seeds 1337 and 42 (checkpoints for issue 14), four knobs no proxy
    run has tried, then the env's LoRA pipeline and chunk 48 on both checkpoints, chunk 40 and 32 spans a batch
    (the session added both on r64s42, and 32 spans at chunk 48 on both); and the A/B manifest, which runs
    e865f06's trainer (from .bench, carried) on r64's checkpoint with the same env."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s14.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 17 and all(" ROPE_DIMS=64 " in ln and "SCALE_FORMAT=log8 " in ln for ln in rows)
    assert ["CHECKPOINT_SAVE=1 " in ln for ln in rows[:6]] == [True, True, False, False, False, False]
    assert sum("(waits for r64: same checkpoint)" in ln for ln in rows) == 6
    assert sum("(waits for r64s42: same checkpoint)" in ln for ln in rows) == 5
    lora = [ln for ln in rows if "TTT_MODE=lora " in ln]
    assert len(lora) == 10 and all("TTT_LORA_BUCKET=1 TTT_LORA_NO_CUDNN=1 " in ln for ln in lora)
    assert sorted(re.findall(r" TTT_LORA_CHUNK=(\d+) ", " ".join(lora))) == ["40", "40", "48", "48", "48", "48",
                                                                              "64", "64", "64", "64"]
    assert sum(" TTT_LORA_DOCS=32" in ln for ln in lora) == 4
    ab = sweep(ROOT / "scripts" / "sweeps" / "recipe_s14_ab.toml", "--dry-run", "--gpus", "0,1")
    assert ab.returncode == 0, ab.stderr
    (line,) = ab.stdout.splitlines()[1:]
    assert line.endswith(".bench/train_gpt_e865f06.py") and "/tmp/b/ckpt_r64.pt " in line
    new, old = valid_manifest("recipe_s14.toml"), valid_manifest("recipe_s14_ab.toml")
    r64_env = next(run for run in new["runs"] if run["name"] == "r64_env")
    assert old["base"] == new["base"] and old["runs"][0]["env"] == r64_env["env"]  # the same row, on the old code


def test_recipe_s15_manifest_validates_on_two_lanes():
    """Session 15's plan: the second seeds of session 14's two leaders (softcap 20, a 10% ramp into ternary), both
    leaders together on both seeds (moved up after call 1), an int4 embedding alone and with an 11th layer, softcap
    15, then four schedule and optimizer knobs, each one change to the pinned default; then the env's LoRA pipeline
    and two variants on the first row's checkpoint."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s15.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 14 and all(" ROPE_DIMS=64 " in ln and " MUON_WD=0.04 " in ln for ln in rows)
    assert [" SEED=42 " in ln for ln in rows[:5]] == [True, True, False, True, False]
    assert "CHECKPOINT_SAVE=1 " in rows[0]
    assert [" LOGIT_SOFTCAP=20 QAT_RAMP_FRAC=0.1 " in ln for ln in rows[1:5]] == [False, True, True, False]
    lora = rows[11:]  # the env's pipeline and two cheaper-at-scale settings, on cap20s42's checkpoint
    assert all("(waits for cap20s42: same checkpoint)" in ln and " TTT_LORA_BUCKET=1 " in ln for ln in lora)
    assert [re.findall(r" TTT_LORA_(DOCS|CHUNK)=(\d+)", ln) for ln in lora] == [
        [("DOCS", "32"), ("CHUNK", "48")], [("DOCS", "32"), ("CHUNK", "40")], [("DOCS", "24"), ("CHUNK", "48")]]
    assert [" EXPORT_EMBED=int4 EMBED_QAT=1 " in ln for ln in rows[3:7]] == [False, True, True, False]
    assert valid_manifest("recipe_s15.toml")["base"] == valid_manifest("recipe_s14.toml")["base"]


def test_recipe_s16_manifest_validates_on_two_lanes():
    """Session 16's plan, on session 15's default (softcap 20, a 10% ramp), as it ran: a tighter cap and a longer
    ramp, then (added after call 1, cap15 having won) cap15's second seed and cap 10, the new default (now softcap 15)
    and the old one at 150 s (the scale check), a third seed whose checkpoint the env's LoRA pipeline re-scores, and
    four schedule and optimizer knobs, each one change to the pinned default."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s16.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 12 and all(" ROPE_DIMS=64 " in ln and " MUON_WD=0.04 " in ln for ln in rows)
    caps = [re.findall(r" LOGIT_SOFTCAP=(\d+) ", ln) + re.findall(r" QAT_RAMP_FRAC=([0-9.]+) ", ln) for ln in rows]
    assert caps[:6] == [["15", "0.1"], ["20", "0.2"], ["15", "0.1"], ["10", "0.1"], ["15", "0.1"], ["30", "0"]]
    assert all(c == ["20", "0.1"] for c in caps[6:])
    assert " SEED=42 " in rows[2] and all(" SEED=" not in ln for ln in rows[:2] + rows[3:6])
    seconds = [re.findall(r" MAX_WALLCLOCK_SECONDS=(\d+) ", ln) for ln in rows[:7]]
    assert seconds == [["300"]] * 4 + [["150"]] * 2 + [["300"]]
    assert "CHECKPOINT_SAVE=1 " in rows[6] and "(waits for d15s2024: same checkpoint)" in rows[11]
    assert " TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48 " in rows[11] and " SEED=2024 " in rows[11]
    base = valid_manifest("recipe_s16.toml")["base"]
    assert base == {**valid_manifest("recipe_s15.toml")["base"], "LOGIT_SOFTCAP": 20, "QAT_RAMP_FRAC": 0.1}


def test_recipe_s17_manifest_validates_on_two_lanes():
    """Session 17's plan, on session 16's default (softcap 15, a 10% ramp): a third seed whose checkpoint the env's
    LoRA pipeline re-scores, then the four schedule and optimizer knobs recipe_s16 left, each one change."""
    r = sweep(ROOT / "scripts" / "sweeps" / "recipe_s17.toml", "--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 6 and all(" LOGIT_SOFTCAP=15 QAT_RAMP_FRAC=0.1 " in ln for ln in rows)
    assert "CHECKPOINT_SAVE=1 " in rows[0] and "(waits for d16s2024: same checkpoint)" in rows[5]
    assert " TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48 " in rows[5] and all(" SEED=2024 " in rows[k] for k in (0, 5))
    changes = [" WARMDOWN_SHAPE=cosine ", " Z_LOSS=0.0001 ", " GRAD_CLIP_NORM=1.0 ", " EMBED_LR=0.04 "]
    assert all(c in ln for c, ln in zip(changes, rows[1:5])) and all(" SEED=" not in ln for ln in rows[1:5])
    base = valid_manifest("recipe_s17.toml")["base"]
    assert base == {**valid_manifest("recipe_s16.toml")["base"], "LOGIT_SOFTCAP": 15}
