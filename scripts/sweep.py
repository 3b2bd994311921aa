"""Runs an environment-variable sweep of train_gpt.py from a manifest, one run at a time or on GPU lanes; tabulates it.

    python3 scripts/sweep.py MANIFEST [--out DIR] [--gpus LANES] [--deadline SECONDS] [--rescore-deadline SECONDS]
                             [--dry-run]

MANIFEST is TOML or JSON (by suffix): `command` (optional; default: this Python on train_gpt.py, or e.g.
"torchrun --standalone --nproc_per_node=2 train_gpt.py"), a `base` table of env vars for every run, and a list
`runs`, each with a unique `name` and an `env` table of overrides. Values are strings, ints, floats or bools
(true/false become 1/0). Runs start from the repo root, so relative paths are relative to it.

The whole manifest is checked before anything runs: every key must be a train_gpt.py knob (or OMP_NUM_THREADS,
CUDA_VISIBLE_DEVICES, PYTHONUNBUFFERED), and every run's config must pass Hyperparameters. The runner sets
RUN_ID=<name> and LOG_DIR=DIR/logs itself; ARTIFACT_PATH defaults to DIR/artifacts/<name>.ternary.ptz.

Outputs in DIR (default logs/sweep_<manifest stem>): logs/<name>.txt (train_gpt.py's log), logs/<name>.stdout,
results.csv and results.md (rewritten after every run), sweep.png (final val_bpb per run, loss curves).
Rerunning the same command resumes: a finished run whose logged config still matches its manifest row is
skipped; an unfinished or failed one, or one whose row changed, reruns (its old log moved to *.prev first).
One sweep at a time per DIR (a lock on DIR/.sweep.lock, held by the training child too). SIGTERM or SIGINT stops
the training child (a SIGTERM), waits for it, writes the tables and exits 128 + the signal.
Exit code: 0 if every run finished, 1 if any failed, 2 for a bad manifest (nothing is run or written then) or a
DIR in use, 3 if --deadline SECONDS left runs unstarted (no run starts that long after the sweep's start: for
machines whose commands have a time limit; the next invocation resumes). --rescore-deadline SECONDS gives the rows
that only re-score a checkpoint (EVAL_FROM_CHECKPOINT), much shorter than training rows, a later limit of their own:
past --deadline a free lane takes the next of them in manifest order, so they fill the end of a call.

Rows that share a float checkpoint (CHECKPOINT_PATH) keep their manifest order: a row that re-scores it
(EVAL_FROM_CHECKPOINT) waits for the earlier rows that write it (CHECKPOINT_SAVE), is failed unrun if one of them
failed, and reruns on resume when one of them reruns.

--gpus runs the rows side by side on GPU lanes: `0,1,2,3` is four lanes of one GPU each, `0+1,2+3` two lanes of two
(for a torchrun command with --nproc_per_node=2). Each lane takes the next row in manifest order when its last
run ends, with CUDA_VISIBLE_DEVICES set to its GPUs; a signal stops every lane's child. On an 8-GPU box an
ablation of eight proxy runs then takes the time of one.
"""
import argparse
import csv
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from runlog import read_run_log  # noqa: E402

TORCHRUN_KNOBS = {"WORLD_SIZE", "RANK", "LOCAL_RANK"}  # the launcher's, not the manifest's: never compared
EXTRA_ENV = {"OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED"}  # not knobs, but runs may need them
RESERVED = {"RUN_ID": "the sweep runner (the run name)", "LOG_DIR": "the sweep runner (OUT/logs)",
            "WORLD_SIZE": "torchrun", "RANK": "torchrun", "LOCAL_RANK": "torchrun"}
NAME = re.compile(r"[A-Za-z0-9_.-]+")
COLUMNS = ["name", "status", "env", "final_val_bpb", "delta_bpb", "pre_export_val_bpb", "final_eval_s", "total_bytes",
           "steps", "tok_s", "train_seconds", "compile_s", "calib_s", "temperature_s", "params", "error"]


class SweepError(ValueError):
    """A bad manifest; the message names the run or key."""


# ---- manifest --------------------------------------------------------------------------------------------------

def load_manifest(path):
    path = Path(path)
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise SweepError(f"{path}: {e}") from None
    raise SweepError(f"{path}: manifest must end in .toml or .json")


def env_str(where, key, value):
    # bool before int: True is an int too, and train_gpt.py reads 1/0
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise SweepError(f"{where}: {key}={value!r} must be a string, number or bool")


def env_table(where, table):
    if not isinstance(table, dict):
        raise SweepError(f"{where}: env must be a table of KEY = value")
    return {k: env_str(where, k, v) for k, v in table.items()}


def plan_runs(manifest, out):
    """The manifest as (command, base, [run]), each run a dict {name, overrides, env}; SweepError if it is bad
    (the first structural problem, or every unknown key and rejected config at once)."""
    extra = set(manifest) - {"command", "base", "runs"}
    if extra:
        raise SweepError(f"unknown manifest keys {sorted(extra)} (allowed: command, base, runs)")
    command = manifest.get("command", [sys.executable, "train_gpt.py"])
    command = shlex.split(command) if isinstance(command, str) else command
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise SweepError(f"command={manifest['command']!r} must be a non-empty string or list of strings")
    if shutil.which(command[0]) is None:
        raise SweepError(f"command {command[0]!r} not found on PATH")
    base = env_table("base", manifest.get("base", {}))
    runs = manifest.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SweepError("manifest has no runs: add at least one [[runs]] entry with a name")
    plan, seen = [], set()
    for i, run in enumerate(runs):
        name = run.get("name") if isinstance(run, dict) else None
        where = f"run {name!r}" if name is not None else f"run #{i + 1}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SweepError(f"{where}: name must be a string of [A-Za-z0-9_.-]+")
        if name in seen:
            raise SweepError(f"{where}: duplicate run name")
        seen.add(name)
        if set(run) - {"name", "env"}:
            raise SweepError(f"{where}: unknown keys {sorted(set(run) - {'name', 'env'})} (allowed: name, env)")
        overrides = env_table(where, run.get("env", {}))
        env = {"ARTIFACT_PATH": str(out / "artifacts" / f"{name}.ternary.ptz"), **base, **overrides,
               "RUN_ID": name, "LOG_DIR": str(out / "logs")}
        plan.append({"name": name, "overrides": overrides, "env": env})
    check_env(plan, base, command)
    checkpoint_order(plan)
    return command, base, plan


def checkpoint_order(plan):
    """Sets each run's "after": the earlier rows it must wait for because they share its float checkpoint
    (CHECKPOINT_PATH): a row that reads it (EVAL_FROM_CHECKPOINT) waits for the earlier rows that write it
    (CHECKPOINT_SAVE), and a row that writes it also for the earlier ones that read it. One after another that is
    manifest order anyway; side by side (--gpus) it keeps a re-scoring row from reading a checkpoint not yet
    written, or one that a later training run is rewriting. Also sets "rescores": the row reads a checkpoint."""
    from train_gpt import Hyperparameters

    touched = []  # (name, checkpoint path, writes) of the rows so far
    for run in plan:
        h = Hyperparameters({**os.environ, **run["env"]})
        path = (ROOT / h.checkpoint_path).resolve()
        reads, writes = h.eval_from_checkpoint, h.checkpoint_save
        run["after"] = [name for name, p, w in touched if p == path and (w or writes)] if reads or writes else []
        run["rescores"] = bool(reads)
        if reads or writes:
            touched.append((run["name"], path, writes))


def parse_lanes(spec):
    """--gpus: lanes separated by commas, the GPUs of one lane joined by '+', as CUDA_VISIBLE_DEVICES values
    ('0+1,2+3' -> ['0,1', '2,3']); SweepError for a malformed list or a GPU in two lanes."""
    lanes = [lane.split("+") for lane in spec.split(",")]
    if not all(g.isdigit() for lane in lanes for g in lane):
        raise SweepError(f"--gpus {spec!r}: lanes are GPU indices separated by ',', the GPUs of one lane joined "
                         "by '+' (e.g. 0,1,2,3 or 0+1,2+3)")
    gpus = [g for lane in lanes for g in lane]
    if len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus {spec!r}: a GPU is in two lanes; runs side by side would share it")
    return [",".join(lane) for lane in lanes]


def check_lanes(lanes, plan, base, command):
    """With --gpus the lanes own CUDA_VISIBLE_DEVICES, and each lane's GPUs must match the command's processes."""
    errors = [f"{where}: CUDA_VISIBLE_DEVICES is set by --gpus, not by the manifest"
              for where, env in [("base", base)] + [(f"run {r['name']!r}", r["overrides"]) for r in plan]
              if "CUDA_VISIBLE_DEVICES" in env]
    world = command_world(command)
    errors += [f"--gpus lane {lane!r} has {lane.count(',') + 1} GPUs, but the command starts {world} process(es) "
               f"(torchrun --nproc_per_node)" for lane in lanes if lane.count(",") + 1 != world]
    if errors:
        raise SweepError("\n".join(errors))


def command_world(command):
    """torchrun's process count in the command, else 1."""
    nproc = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", " ".join(command))
    return int(nproc.group(1)) if nproc else 1


def check_env(plan, base, command):
    """Every key must be a knob, and every run's merged env a config that train_gpt.py accepts: a typo or a bad
    shape should stop the sweep now, not after hours of earlier runs."""
    sys.path.insert(0, str(ROOT))
    from train_gpt import ConfigError, Hyperparameters, check_batch_shape

    known = set(Hyperparameters({}).env_names().values()) | EXTRA_ENV
    world = command_world(command)  # torchrun's process count changes the batch split that check_batch_shape checks
    base_errors = [f"base: {k} is set by {RESERVED[k]}, not by the manifest" for k in base if k in RESERVED]
    base_errors += [f"base: unknown key {k} (not a train_gpt.py knob)" for k in base if k not in known]
    errors = list(base_errors)
    for run in plan:
        where = f"run {run['name']!r}"
        bad = [f"{where}: {k} is set by {RESERVED[k]}, not by the manifest" for k in run["overrides"] if k in RESERVED]
        bad += [f"{where}: unknown key {k} (not a train_gpt.py knob)" for k in run["overrides"] if k not in known]
        if not bad and not base_errors:  # with a bad key the config check would only add noise
            try:
                check_batch_shape(Hyperparameters({**os.environ, **run["env"]}), world)
            except ConfigError as e:
                bad.append(f"{where}: {e}")
        errors += bad
    if errors:
        raise SweepError("\n".join(errors))


# ---- resume ----------------------------------------------------------------------------------------------------

def log_error(log):
    """The last `error: ...` line of a log (train_gpt.py ends a failed run's log with one), or None."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    return lines[-1] if lines else None


def config_differences(run, logged):
    """The knobs on which a log's `config` line and its manifest row (as train_gpt.py resolves it now, with the
    caller's environment) disagree, as 'NAME log X, manifest Y' strings."""
    from train_gpt import ConfigError, Hyperparameters, Knob

    want = Hyperparameters({**os.environ, **run["env"]})
    diffs = []
    for attr, knob in vars(Hyperparameters).items():
        if not isinstance(knob, Knob) or knob.name in TORCHRUN_KNOBS:
            continue
        value = getattr(want, attr)
        if knob.name not in logged:  # a knob added since the run: its default is what that code did
            if value != knob.default:
                diffs.append(f"{knob.name} log -, manifest {value}")
            continue
        try:
            was = knob.read({knob.name: logged[knob.name]})
        except ConfigError:
            was = None
        if was != value:
            diffs.append(f"{knob.name} log {logged[knob.name]}, manifest {value}")
    known = {k.name for k in vars(Hyperparameters).values() if isinstance(k, Knob)}
    diffs += [f"{name} log {logged[name]}, not a knob any more" for name in sorted(set(logged) - known)]
    return diffs


def resume_status(run, log):
    """("done", None) for a run whose log finished, without an error, under the config its manifest row gives now;
    else ("pending", why it runs again, or None for a run that never started)."""
    if not log.exists():
        return "pending", None
    parsed = read_run_log(log)
    if not parsed["finished"] or log_error(log):
        return "pending", "its log is unfinished or failed"
    diffs = config_differences(run, parsed["config"])
    if diffs:
        return "pending", "its log's config differs from the manifest: " + "; ".join(diffs)
    return "done", None


def move_aside(path):
    """A rerun's old output goes to <path>.prev, appended, so repeated reruns never lose one; the fresh run then
    starts a log of its own (a log holds one run)."""
    if path.exists():
        with open(f"{path}.prev", "ab") as prev:
            prev.write(path.read_bytes())
        path.unlink()


# ---- running ---------------------------------------------------------------------------------------------------

def lock_folder(out):
    """An exclusive lock on OUT/.sweep.lock, or SweepError: two sweeps in one folder would run the same rows twice.
    The training child inherits the descriptor, so a run orphaned by a killed sweep still holds the lock."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SweepError(f"{out} is in use by another sweep (or its training run): {out / '.sweep.lock'} is "
                         "locked; wait for it, or use another --out") from None
    return fd


class Stopper:
    """SIGTERM and SIGINT: every running training child gets a SIGTERM and is waited for (killed after GRACE s, or
    at a second signal); then the sweep writes its tables and stops. Without this a SIGTERM orphaned the child.
    Lanes start their children from threads, so `track` also stops a child that starts after the signal."""

    GRACE = 60.0

    def __init__(self):
        self.procs, self.signum, self.timer, self.lock = set(), None, None, threading.Lock()

    def __enter__(self):
        self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        if self.timer:
            self.timer.cancel()

    def track(self, proc):
        with self.lock:
            self.procs.add(proc)
            if self.signum is not None:
                proc.send_signal(signal.SIGTERM)

    def untrack(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def kill_all(self):
        with self.lock:
            for proc in self.procs:
                proc.kill()

    def handle(self, signum, frame):
        again, self.signum = self.signum is not None, self.signum or signum
        with self.lock:
            live = [p for p in self.procs if p.poll() is None]
        if again:
            self.kill_all()
            return
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        if live:
            self.timer = threading.Timer(self.GRACE, self.kill_all)
            self.timer.daemon = True
            self.timer.start()


def execute(command, run, out, stopper, lock_fd, lane=None):
    """Runs one config (on the lane's GPUs, if any); stdout and stderr both land in logs/<name>.stdout. Returns
    (exit code, the last `error:` line of train_gpt.py on stderr, else the last stderr line): torchrun ends its
    stderr with a banner of its own."""
    logs = out / "logs"
    for path in (logs / f"{run['name']}.txt", logs / f"{run['name']}.stdout"):
        move_aside(path)  # a stale log would mix two runs
    env = {**os.environ, **run["env"], **({"CUDA_VISIBLE_DEVICES": lane} if lane is not None else {})}
    with open(logs / f"{run['name']}.stdout", "a") as f:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True,
                                errors="replace", pass_fds=(lock_fd,))
        stopper.track(proc)
        last, error = "", ""
        for line in proc.stderr:  # stderr is read here only to remember the message for the table
            f.write(line)
            f.flush()
            last = line.strip() if re.search(r"\w", line) else last
            error = line.strip() if line.startswith("error: ") else error
        rc = proc.wait()
        stopper.untrack(proc)
        return rc, error or last


def outcome(rc, stderr_error, log, stopper):
    """(status, error) of a run that ended: the log's own `error:` line first (train_gpt.py's contract)."""
    if stopper.signum is not None:
        return "failed", f"rc:{rc} stopped by {signal.Signals(stopper.signum).name} (resuming reruns it)"
    parsed = read_run_log(log) if log.exists() else {"finished": False}
    error = log_error(log) if log.exists() else None
    if rc == 0 and parsed["finished"] and not error:
        return "done", None
    return "failed", f"rc:{rc} {error or stderr_error or 'but the log has no final_roundtrip'}"


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_sweep(command, plan, out, header, lock_fd, lanes=(None,), deadline=None, rescore_deadline=None):
    """Runs the plan's unfinished rows, one lane (GPU set) per thread; `lanes` (None,) is one run at a time on
    whatever the environment gives; no run starts `deadline` seconds after the start (a re-scoring row:
    `rescore_deadline`, where given). Returns the exit code."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "artifacts").mkdir(exist_ok=True)
    sweep = LaneRunner(command, plan, out, header, lock_fd, len(lanes), (deadline, rescore_deadline))
    with Stopper() as sweep.stopper:
        threads = [threading.Thread(target=sweep.lane_loop, args=(lane,), daemon=True) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short waits: the main thread must stay free to run the signal handler
        if sweep.crashed:
            raise sweep.crashed[0]
        if sweep.stopper.signum is not None:
            name = signal.Signals(sweep.stopper.signum).name
            print(f"sweep: stopped by {name}; tables in {out}/results.md", file=sys.stderr, flush=True)
            return 128 + sweep.stopper.signum
    rows = table_rows(plan, sweep.results, sweep.logs)
    write_tables(rows, out, header)
    plot(rows, out / "sweep.png")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    left = [r["name"] for r in rows if r["status"] == "pending"]
    if left:
        limits = [f"{flag} {t:g} s" for flag, t in (("--deadline", deadline), ("--rescore-deadline", rescore_deadline))
                  if t is not None]
        print(f"sweep paused at {' and '.join(limits)}: {len(left)} runs not started ({' '.join(left)}); "
              "rerun the same command to go on", flush=True)
    print(f"sweep done: {len(plan) - len(failed) - len(left)}/{len(plan)} finished"
          + (f", failed: {' '.join(failed)}" if failed else "") + f"; tables in {out}/results.md, plot {out}/sweep.png")
    return 1 if failed else 3 if left else 0


class LaneRunner:
    """The shared state of a sweep's lanes: the queue, each row's status, the tables. A free lane takes the first
    queued row whose checkpoint rows ("after") have ended; one whose checkpoint row failed is failed unrun."""

    def __init__(self, command, plan, out, header, lock_fd, n_lanes, deadlines=(None, None)):
        self.command, self.plan, self.out, self.header, self.lock_fd = command, plan, out, header, lock_fd
        self.deadline, self.rescore_deadline = deadlines
        self.logs = run_logs(plan, out)
        self.results, self.queue = resume_plan(plan, self.logs)
        self.progress, self.cond = Progress(len(self.queue), n_lanes), threading.Condition()
        self.crashed, self.stopper = [], None  # run_sweep sets the stopper

    def lane_loop(self, lane):
        while True:
            with self.cond:
                item = self.take(lane)
            if item is None:
                return
            i, run = item
            t_run = time.time()
            try:
                rc, last = execute(self.command, run, self.out, self.stopper, self.lock_fd, lane)
            except BaseException as e:  # an OSError here must end the sweep loudly, not a silent thread
                with self.cond:
                    self.crashed.append(e)  # the other lanes finish their runs and start no more
                    self.cond.notify_all()
                return
            with self.cond:
                self.progress.done(time.time() - t_run)
                status, error = outcome(rc, last, self.logs[run["name"]], self.stopper)
                self.finish(i, run, status, error, lane, time.time() - t_run)

    def take(self, lane):
        """The next (index, run) for this lane, with the condition held; None when the lane is done."""
        while self.queue and self.stopper.signum is None and not self.crashed:
            open_rows = [k for k, (_, run) in enumerate(self.queue) if self.may_start(run)]
            if not open_rows:
                return None
            ready = [k for k in open_rows
                     if all(self.results[d]["status"] in ("done", "failed") for d in self.queue[k][1]["after"])]
            if not ready:
                self.cond.wait(0.5)  # every queued row waits for a running one
                continue
            i, run = self.queue.pop(ready[0])
            lost = [d for d in run["after"] if self.results[d]["status"] == "failed"]
            if lost:
                self.progress.todo -= 1
                why = f"not run: {', '.join(lost)} failed, and it shares their checkpoint"
                self.finish(i, run, "failed", why, lane)
                continue
            self.results[run["name"]]["status"] = "running"
            print(f"sweep [{i}/{len(self.plan)}] start {run['name']}{on_lane(lane)} {self.progress.line()}", flush=True)
            return i, run
        return None

    def may_start(self, run):
        """Whether the run is still inside its deadline: --deadline, or --rescore-deadline for a re-scoring row."""
        limit = self.rescore_deadline if run["rescores"] and self.rescore_deadline is not None else self.deadline
        return limit is None or time.time() - self.progress.t0 < limit

    def finish(self, i, run, status, error, lane, seconds=0.0):
        res, log = self.results[run["name"]], self.logs[run["name"]]
        res["status"] = status
        if error:
            res["error"] = error
        bpb = read_run_log(log)["final_val_bpb"] if log.exists() else None
        print(f"sweep [{i}/{len(self.plan)}] {status} {run['name']}{on_lane(lane)} in {clock(seconds)} val_bpb:{bpb} "
              f"{self.progress.line()}" + (f" error:{error}" if error else ""), flush=True)
        write_tables(table_rows(self.plan, self.results, self.logs), self.out, self.header)  # a killed sweep keeps
        self.cond.notify_all()  # what finished, and rows waiting for this one may start


def on_lane(lane):
    return f" gpu:{lane}" if lane is not None else ""


def run_logs(plan, out):
    """{name: the log train_gpt.py writes for that row} (LOG_DIR out/logs, RUN_ID its name)."""
    return {r["name"]: out / "logs" / f"{r['name']}.txt" for r in plan}


def resume_plan(plan, logs, say=print):
    """({name: {"status"}}, [(index, run) to run]): finished rows are skipped, unless a row whose checkpoint they
    read or share runs again, since their scores would then describe the old checkpoint. `say` gets the skip and
    rerun lines."""
    results, queue, total = {}, [], len(plan)
    for i, run in enumerate(plan, 1):
        status, why = resume_status(run, logs[run["name"]])
        again = [d for d in run["after"] if results[d]["status"] == "pending"]
        if status == "done" and again:
            status, why = "pending", f"{', '.join(again)}, whose checkpoint it shares, runs again"
        results[run["name"]] = {"status": status}
        if status == "done":
            say(f"sweep [{i}/{total}] skip {run['name']}: already finished "
                f"val_bpb:{read_run_log(logs[run['name']])['final_val_bpb']}", flush=True)
            continue
        if why:
            say(f"sweep [{i}/{total}] rerun {run['name']}: {why}", flush=True)
        queue.append((i, run))
    return results, queue


class Progress:
    """Elapsed time and ETA of this invocation: the mean duration of its finished runs, times the runs still to
    go, over the lanes that share them."""

    def __init__(self, todo, lanes):
        self.t0, self.todo, self.lanes, self.durations = time.time(), todo, lanes, []

    def done(self, seconds):
        self.durations.append(seconds)

    def line(self):
        left = self.todo - len(self.durations)
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        eta = clock(left * mean / self.lanes) if mean is not None else "?"
        return f"elapsed:{clock(time.time() - self.t0)} eta:{eta}"


# ---- outputs ---------------------------------------------------------------------------------------------------

def table_rows(plan, results, logs):
    """One row per run in manifest order, with the log's fields (None where absent) and its loss curve."""
    rows = []
    for run in plan:
        parsed = read_run_log(logs[run["name"]]) if logs[run["name"]].exists() else {"curve": []}
        row = {k: parsed.get(k) for k in COLUMNS}
        row.update(name=run["name"], status=results[run["name"]]["status"], error=results[run["name"]].get("error"),
                   env=" ".join(f"{k}={v}" for k, v in run["overrides"].items()), curve=parsed["curve"])
        if row["status"] != "done":
            row["final_val_bpb"] = None  # no score for a run that crashed after its final eval, or has not run
        rows.append(row)
    first = rows[0]["final_val_bpb"]
    for row in rows:
        if first is not None and row["final_val_bpb"] is not None:
            row["delta_bpb"] = f"{row['final_val_bpb'] - first:+.4f}"
    return rows


def write_atomic(path, text_or_bytes):
    """Temp file + rename, so a reader (or a killed sweep) never sees half a table."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes)
    os.replace(tmp, path)


def cell(value):
    return "" if value is None else str(value)


def write_tables(rows, out, header):
    """results.csv and results.md; `header` is the markdown above the table (manifest, command, base env)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([[cell(r[k]) for k in COLUMNS] for r in rows])
    write_atomic(out / "results.csv", buf.getvalue())
    md = header + ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r[k]).replace("|", "\\|") for k in COLUMNS) + " |" for r in rows]
    write_atomic(out / "results.md", "\n".join(md) + "\n")


def plot(rows, path):
    """Left: final val_bpb per run (failed ones marked). Right: every run's training loss curve."""
    try:
        import matplotlib
    except ImportError:  # the GPU boxes have no network to install it; the tables are what matters
        print(f"sweep: matplotlib is not installed, so no {path}", file=sys.stderr)
        return
    matplotlib.use("Agg")  # no display on the GPU boxes or in CI
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 5))
    # the 10 dark tab20 colours first, then the light ones, so neighbouring runs are easy to tell apart
    colors = [plt.cm.tab20((2 * i + i // 10) % 20) for i in range(len(rows))]
    scored = [(i, r["final_val_bpb"]) for i, r in enumerate(rows) if r["final_val_bpb"] is not None]
    if scored:
        lo, hi = min(v for _, v in scored), max(v for _, v in scored)
        pad = max(hi - lo, 0.002) * 0.5  # zoom in: ablation differences are ~0.01 bpb on values ~1.36
        bars.set_ylim(lo - pad, hi + pad)
        for i, v in scored:
            bars.bar(i, v, color=colors[i])
            bars.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=7)
    bottom = bars.get_ylim()[0]
    for i, r in enumerate(rows):
        if r["status"] != "done":
            bars.text(i, bottom, f" {r['status']}", rotation=90, ha="center", va="bottom", color="red", fontsize=8)
    bars.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
    bars.set_ylabel("final val_bpb (reloaded artifact)")
    bars.set_title("final val_bpb per run")
    for i, r in enumerate(rows):
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            curves.plot(steps, losses, color=colors[i], label=r["name"], ls="-" if r["status"] == "done" else ":")
    curves.set_xlabel("step")
    curves.set_ylabel("train_loss")
    curves.set_title("training loss")
    if any(r["curve"] for r in rows):
        curves.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ---- main ------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--out", help="output folder (default: logs/sweep_<manifest stem> in the repo)")
    ap.add_argument("--gpus", help="GPU lanes, runs side by side: 0,1,2,3 (one GPU each) or 0+1,2+3 (two each)")
    ap.add_argument("--deadline", type=float, help="start no run after this many seconds (a machine whose commands "
                    "have a time limit: the rest waits for the next invocation, which resumes); exit code 3 then")
    ap.add_argument("--rescore-deadline", type=float, help="the same for the rows that only re-score a checkpoint "
                    "(EVAL_FROM_CHECKPOINT), which take a fraction of a training row: later than --deadline")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the runs without running them")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve() if args.out else ROOT / "logs" / f"sweep_{Path(args.manifest).stem}"
    try:
        lanes = parse_lanes(args.gpus) if args.gpus else [None]
        command, base, plan = plan_runs(load_manifest(args.manifest), out)
        if args.gpus:
            check_lanes(lanes, plan, base, command)
    except SweepError as e:
        print(f"sweep: invalid manifest {args.manifest} or --gpus:\n{e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.gpus:
            print(f"sweep: {len(lanes)} lanes side by side (CUDA_VISIBLE_DEVICES={' | '.join(lanes)}), each taking "
                  "the next run in this order")
        logs = run_logs(plan, out)
        results, _ = resume_plan(plan, logs, say=lambda *a, **k: None)  # the sweep's own skip decisions
        for i, run in enumerate(plan, 1):
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run["env"].items())
            skip = " (finished: would skip)" if results[run["name"]]["status"] == "done" else ""
            after = f" (waits for {', '.join(run['after'])}: same checkpoint)" if run["after"] else ""
            print(f"sweep [{i}/{len(plan)}] {run['name']}{skip}{after}: "
                  f"cd {ROOT} && env {env} {shlex.join(command)}")
        return 0
    header = [f"# Sweep {args.manifest}", "", f"Command: `{shlex.join(command)}`", "",
              "Base env: `" + " ".join(f"{k}={v}" for k, v in base.items()) + "`", ""]
    try:
        lock_fd = lock_folder(out)
    except SweepError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    return run_sweep(command, plan, out, header, lock_fd, lanes, args.deadline, args.rescore_deadline)


if __name__ == "__main__":
    sys.exit(main())
