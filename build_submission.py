"""From a good run to a valid Parameter Golf submission folder, in one command.

    python3 build_submission.py --dce --config best_known_competition.env --name ternary_skc \\
        --github-id ME --log logs/seed1337.txt --log logs/seed42.txt --log logs/seed2024.txt
    python3 build_submission.py --dce --config best_known_competition.env --extract-only /tmp/train_gpt.py

--dce specialises train_gpt.py to the run's configuration on the syntax tree (never on source text):
1. every feature guard (`if h.flag:`, `if h.knob == "value":`, CONVENTIONS.md rule 2) is replaced by its value
   under the configuration and the dead branch is dropped;
2. definitions, methods, knobs and imports that nothing references any more are removed, to a fixed point;
3. the configuration is baked in: the knobs the config sets get it as their default, and every feature switch is
   frozen to its value (setting it to anything else stops the submission at start instead of being ignored);
4. docstrings go (comments never survive an AST round trip); the result is checked with py_compile, and an
   lzma self-extracting wrapper is kept when it is smaller.
Then code bytes + each seed's model bytes are counted against the cap, and records/<name>/ is written with
README.md, submission.json, the logs, the extracted train_gpt.py and requirements.txt into records/<date>_<name>/,
atomically, never over an existing record. Any bad input is a clear error (exit 2) and writes nothing.
"""
import argparse
import ast
import base64
import datetime
import hashlib
import importlib.util
import json
import lzma
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
from runlog import LogError, read_run_log  # noqa: E402

CAP_BYTES = 16_000_000
EVAL_BUDGET_S = 600.0  # the challenge's evaluation time on 8 GPUs
# Knobs a log may legitimately differ on from the configuration: per-run paths, the seed, torchrun's variables.
PER_RUN_KNOBS = {"SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH", "DATA_PATH", "TOKENIZER_PATH", "WORLD_SIZE", "RANK",
                 "LOCAL_RANK"}
# Enumerated knobs that describe the machine, not the model: never frozen, so the submission still runs anywhere.
MACHINE_KNOBS = {"DEVICE", "COMPILE", "ATTN_IMPL"}
# Methods called implicitly (by Python, torch or the optimizer protocol), so never "unreferenced".
IMPLICIT_METHODS = {"forward", "backward", "step", "zero_grad", "extra_repr", "reset_parameters"}
PIP_NAMES = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece", "brotli": "brotli"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BuildError(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
# configuration

def read_env_file(path):
    """KEY=VALUE lines (optional `export `, quotes, # comments) -> dict."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise BuildError(f"config file not found: {path}") from None
    env = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not m:
            raise BuildError(f"{path}:{n}: not a KEY=VALUE line: {line!r}")
        value = m.group(2).split(" #")[0].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[m.group(1)] = value
    return env


def parse_sets(items):
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise BuildError(f"--set expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def load_trainer(path):
    """Imports train_gpt.py as a module (its main() is guarded) to read its knobs with its own parser."""
    spec = importlib.util.spec_from_file_location(f"_trainer_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Config:
    """The run's configuration as train_gpt.py itself resolves it."""

    def __init__(self, trainer, env):
        self.trainer, self.env = trainer, dict(env)
        self.knobs = {a: k for a, k in vars(trainer.Hyperparameters).items() if isinstance(k, trainer.Knob)}
        self.attr_of = {k.name: a for a, k in self.knobs.items()}
        unknown = sorted(set(env) - set(self.attr_of))
        if unknown:
            raise BuildError(f"the configuration names {', '.join(unknown)}, which train_gpt.py does not define "
                             "(a feature this file lacks, or a typo)")
        try:
            self.h = trainer.Hyperparameters(self.env)
        except trainer.ConfigError as e:
            raise BuildError(f"train_gpt.py rejects the configuration: {e}") from None

    def value(self, attr):
        return getattr(self.h, attr)

    def static_values(self):
        """Feature switches: boolean and enumerated knobs (except MACHINE_KNOBS). Guards over these fold."""
        return {a: self.value(a) for a, k in self.knobs.items()
                if (k.kind is bool or k.choices is not None) and k.name not in MACHINE_KNOBS}

    def check_log(self, run, log_name):
        """The log must come from this configuration: every knob its config line shows must agree."""
        if not run["config"]:
            raise BuildError(f"{log_name}: no `config ...` line; is it a train_gpt.py log?")
        for name, logged in run["config"].items():
            if name in PER_RUN_KNOBS:
                continue
            if name not in self.attr_of:
                raise BuildError(f"{log_name}: the run set {name}, which train_gpt.py does not define")
            attr = self.attr_of[name]
            try:
                was = self.knobs[attr].read({name: logged})
            except self.trainer.ConfigError as e:
                raise BuildError(f"{log_name}: {e}") from None
            if was != self.value(attr):
                raise BuildError(f"{log_name}: the run had {name}={logged} but the configuration gives "
                                 f"{self.value(attr)}; the submission would not reproduce it")


# ----------------------------------------------------------------------------------------------------------------
# dead-code elimination on the syntax tree

UNKNOWN = object()
COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b, ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}


PURE_CALLS = {"tuple", "list", "dict", "set", "frozenset", "range", "round", "len", "min", "max", "sum", "int",
              "float", "str", "sorted", "zip", "enumerate"}


def has_call(node, allow_pure=False):
    """Whether evaluating `node` may call something with side effects (builtins in PURE_CALLS have none)."""
    return any(isinstance(n, ast.Call) and not (allow_pure and isinstance(n.func, ast.Name) and n.func.id in PURE_CALLS)
               for n in ast.walk(node))


class GuardFolder(ast.NodeTransformer):
    """Replaces `if <guard>:` / `x if <guard> else y` by the branch the configuration takes.

    A guard reads config values as `h.attr` or `self.h.attr` (and `self.attr` inside Hyperparameters): by
    convention the name `h` always denotes the run's Hyperparameters. Only truthiness of a test matters, so
    `and`/`or` fold partially: `h.flag and x` becomes `x` when flag is on and dead when it is off.
    """

    def __init__(self, values):
        self.values, self.in_hparams, self.folded = values, False, 0

    def config_value(self, node):
        if not (isinstance(node, ast.Attribute) and node.attr in self.values):
            return UNKNOWN
        base = node.value
        if isinstance(base, ast.Name) and (base.id == "h" or (self.in_hparams and base.id == "self")):
            return self.values[node.attr]
        if isinstance(base, ast.Attribute) and base.attr == "h" and isinstance(base.value, ast.Name) \
                and base.value.id == "self":
            return self.values[node.attr]
        return UNKNOWN

    def fold(self, node):
        """(truth value or UNKNOWN, simplified node)."""
        if isinstance(node, ast.Constant):
            return node.value, node
        value = self.config_value(node)
        if value is not UNKNOWN:
            return value, node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            value, inner = self.fold(node.operand)
            return (not value, node) if value is not UNKNOWN else (UNKNOWN, ast.UnaryOp(ast.Not(), inner))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
            left = self.fold(node.left)[0]
            try:
                right = ast.literal_eval(node.comparators[0])
            except (ValueError, TypeError, SyntaxError):  # not a literal: a config value, or unknown
                right = self.config_value(node.comparators[0])
            if left is not UNKNOWN and right is not UNKNOWN:
                return COMPARE[type(node.ops[0])](left, right), node
            return UNKNOWN, node
        if isinstance(node, ast.BoolOp):
            return self.fold_boolop(node)
        return UNKNOWN, node

    def fold_boolop(self, node):
        short = not isinstance(node.op, ast.And)  # the truth value that decides the whole expression
        kept = []
        for operand in node.values:
            value, sub = self.fold(operand)
            if value is UNKNOWN:
                kept.append(sub)
            elif bool(value) == short and not any(has_call(k) for k in kept):
                return short, node  # earlier operands are side-effect free, so dropping them is safe
            elif bool(value) == short:
                return UNKNOWN, ast.BoolOp(node.op, kept + [ast.Constant(short)])
        if not kept:
            return not short, node
        return UNKNOWN, kept[0] if len(kept) == 1 else ast.BoolOp(node.op, kept)

    def visit_ClassDef(self, node):
        outer, self.in_hparams = self.in_hparams, node.name == "Hyperparameters"
        self.generic_visit(node)
        self.in_hparams = outer
        return node

    def decide(self, node):
        """The branch a test takes under the configuration (True/False), or None: then the test is simplified."""
        value, test = self.fold(node.test)
        if value is UNKNOWN:
            node.test = test
            return None
        self.folded += 1
        return bool(value)

    def visit_If(self, node):
        taken = self.decide(node)
        if taken is None:
            return self.generic_visit(node)
        out = []
        for stmt in node.body if taken else node.orelse:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new] if new is not None else [])
        return out

    def visit_IfExp(self, node):
        taken = self.decide(node)
        return self.generic_visit(node) if taken is None else self.visit(node.body if taken else node.orelse)


def check_no_config_writes(tree, values):
    """Folding is only sound if nothing assigns a switch after Hyperparameters read it."""
    folder = GuardFolder(values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "h" for t in node.targets):
            v = node.value
            if not (ast.unparse(v) == "self.h" or isinstance(v, ast.Call) and ast.unparse(v.func) == "Hyperparameters"):
                raise BuildError(f"line {node.lineno}: `h = {ast.unparse(v)}`; the name h must always be the run's "
                                 "Hyperparameters for guards to fold")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if folder.config_value(t) is not UNKNOWN:
                raise BuildError(f"line {t.lineno}: assigns config switch `{ast.unparse(t)}`; guards over it "
                                 "cannot be folded")


def is_config_object(node, self_is_h=False):
    """`h`, `x.h` (e.g. self.h), or `self` inside Hyperparameters: the objects whose attributes are knobs."""
    if isinstance(node, ast.Name):
        return node.id == "h" or (self_is_h and node.id == "self")
    return isinstance(node, ast.Attribute) and node.attr == "h"


def references(node, self_is_h=False):
    """How often each identifier is used in `node`. Keys: a loaded name or attribute name; ("h", attr) for an
    attribute of the config object, so a knob and a method of the same name never keep each other alive;
    ("str", s) for identifier-like strings (getattr(obj, "name") keeps its target)."""
    c = Counter()

    def visit(n, self_is_h):
        if isinstance(n, ast.ClassDef):
            self_is_h = n.name == "Hyperparameters"
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Store):
            c[n.id] += 1
        elif isinstance(n, ast.Attribute):
            c[("h", n.attr) if is_config_object(n.value, self_is_h) else n.attr] += 1
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
            c[("str", n.value)] += 1
        for child in ast.iter_child_nodes(n):
            visit(child, self_is_h)

    visit(node, self_is_h)
    return c


def uses(counter, name, of_config=False):
    return counter[("h", name) if of_config else name] + counter[("str", name)]


def defined_names(stmt):
    """Names a removable top-level statement defines (empty when it must stay)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets) \
            and not has_call(stmt.value, allow_pure=True):
        return {t.id for t in stmt.targets}
    return set()


def member_name(stmt):
    """The name a class-body statement defines, if removing it when unreferenced is safe."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        dunder = stmt.name.startswith("__") and stmt.name.endswith("__")
        return None if dunder or stmt.name in IMPLICIT_METHODS else stmt.name
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def prune_unreferenced(tree, keep=(), keep_knobs=()):
    """Drops top-level definitions and class members nothing else references, until nothing changes. `keep`
    names top-level definitions to keep, `keep_knobs` members of Hyperparameters."""
    removed, changed = [], True
    while changed:
        changed = False
        total = references(tree)
        for stmt in list(tree.body):
            names = defined_names(stmt)
            if names and not names & set(keep):
                own = references(stmt)
                if all(uses(total, n) - uses(own, n) == 0 for n in names):
                    tree.body.remove(stmt)
                    total -= own
                    removed.append(next(iter(names)))
                    changed = True
        for cls in [s for s in tree.body if isinstance(s, ast.ClassDef)]:
            hp = cls.name == "Hyperparameters"
            for stmt in list(cls.body):
                name = member_name(stmt)
                if not name or (hp and name in keep_knobs):
                    continue
                own = references(stmt, self_is_h=hp)
                if uses(total, name, hp) - uses(own, name, hp) == 0:
                    cls.body.remove(stmt)
                    total -= own
                    removed.append(f"{cls.name}.{name}")
                    changed = True
    return removed


def prune_imports(tree):
    used = references(tree)
    for stmt in list(tree.body):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and not (
                isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            stmt.names = [a for a in stmt.names if uses(used, (a.asname or a.name).split(".")[0])]
            if not stmt.names:
                tree.body.remove(stmt)


def drop_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 and isinstance(s.value.value, str))]


def drop_dead_locals(tree):
    """`h = self.h` and similar aliases whose every use was folded away."""
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        loads = Counter(n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Store))
        fn.body = [s for s in fn.body if not (
            isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
            and not loads[s.targets[0].id] and isinstance(s.value, (ast.Name, ast.Attribute, ast.Constant)))]


def fill_empty_bodies(tree):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module) and isinstance(getattr(node, "body", None), list) and not node.body:
            node.body = [ast.Pass()]


def bake_knobs(tree, config):
    """The knobs the configuration sets get its value as default; switches are frozen to their value."""
    static = config.static_values()
    hp = next(s for s in tree.body if isinstance(s, ast.ClassDef) and s.name == "Hyperparameters")
    for stmt in hp.body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "Knob"):
            continue
        attr, call = stmt.targets[0].id, stmt.value
        if attr in static:
            value = static[attr]
            call.args[1] = ast.Constant(value)
            call.keywords = [k for k in call.keywords if k.arg not in ("choices", "check")]
            call.keywords.append(ast.keyword("choices", ast.Set([ast.Constant(value)])))
        elif config.knobs[attr].name in config.env:
            call.args[1] = ast.Constant(config.value(attr))


def check_hparams_complete(tree):
    """Every `h.x` the extracted code reads must still exist on Hyperparameters (guards a pruning bug)."""
    hp = next(s for s in tree.body if isinstance(s, ast.ClassDef) and s.name == "Hyperparameters")
    have = {member_name(s) or getattr(s, "name", None) for s in hp.body}
    have |= {t.id for s in hp.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "h" \
                and not isinstance(n.ctx, ast.Store) and n.attr not in have:
            raise BuildError(f"internal: extraction removed Hyperparameters.{n.attr}, still read at line {n.lineno}")


def extract(source_path, config, header=""):
    """The configured train_gpt.py as source text, specialised by dead-code elimination."""
    tree = ast.parse(Path(source_path).read_text())
    values = config.static_values()
    check_no_config_writes(tree, values)
    folder = GuardFolder(values)
    tree = folder.visit(tree)
    drop_docstrings(tree)
    drop_dead_locals(tree)
    fill_empty_bodies(tree)
    bake_knobs(tree, config)
    prune_unreferenced(tree, keep={"main"}, keep_knobs=values)  # frozen switches stay, so setting one is loud
    prune_imports(tree)
    fill_empty_bodies(tree)
    check_hparams_complete(tree)
    ast.fix_missing_locations(tree)
    text = header + ast.unparse(tree) + "\n"
    compile(text, "train_gpt.py", "exec")
    return text


def wrap_compressed(text):
    """A self-extracting form: lzma + base85 (its alphabet has no quote or backslash), run with exec."""
    payload = base64.b85encode(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME)).decode()
    return f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{payload}")))\n'


def choose_code(text, wrap):
    wrapped = wrap_compressed(text)
    use = wrap == "always" or (wrap == "auto" and len(wrapped.encode()) < len(text.encode()))
    return (wrapped, True) if use else (text, False)


def py_compile_check(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train_gpt.py"
        path.write_text(text)
        try:
            py_compile.compile(str(path), doraise=True)
        except py_compile.PyCompileError as e:
            raise BuildError(f"the extracted file does not compile: {e.msg}") from None


# ----------------------------------------------------------------------------------------------------------------
# submission folder

def git_commit(path):
    try:
        out = subprocess.run(["git", "-C", str(Path(path).parent), "log", "-1", "--format=%h", "--", str(path)],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def requirements(text):
    """pip names of the third-party modules the submission imports (optional flash-attn is found at run time)."""
    tree = ast.parse(text)
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return sorted(PIP_NAMES[m] for m in mods if m in PIP_NAMES)


def read_runs(logs, config, eval_budget):
    runs = []
    for path in logs:
        try:
            run = read_run_log(path)
        except LogError as e:
            raise BuildError(str(e)) from None
        for key in ("final_val_bpb", "model_bytes", "seed"):
            if run[key] is None:
                raise BuildError(f"{path}: no {key} in the log; did the run finish and export?")
        if run["steps"] is None:
            raise BuildError(f"{path}: no training in the log (no train_done line); a record needs the run that "
                             "trained the model, not one that re-scored a checkpoint (EVAL_FROM_CHECKPOINT)")
        if run["challenge_eval_s"] is None or run["challenge_eval_s"] > eval_budget:
            raise BuildError(f"{path}: the final evaluation extrapolates to {run['challenge_eval_s']} s on the "
                             f"challenge's 8 GPUs (final_roundtrip challenge_eval_seconds), over --eval-budget "
                             f"{eval_budget:g} s")
        run["path"] = Path(path)
        config.check_log(run, path)
        runs.append(run)
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise BuildError(f"two logs have the same seed: {seeds}")
    check_tokenizer(runs, config)
    return runs


def check_tokenizer(runs, config):
    """Every log ran with one tokenizer (its file's sha256, logged at start), and it is the TOKENIZER_PATH the
    configuration names, if it names one: a tokenizer with the right vocab but other pieces scores wrongly."""
    for r in runs:
        if r["tokenizer_sha256"] is None:
            raise BuildError(f"{r['path']}: no `tokenizer ... sha256:` line; the log predates tokenizer "
                             "fingerprints, so nothing shows which tokenizer scored it")
    shas = {r["tokenizer_sha256"] for r in runs}
    if len(shas) > 1:
        raise BuildError("the logs ran with different tokenizers: " + ", ".join(
            f"{r['path']} sha256 {r['tokenizer_sha256'][:16]}" for r in runs))
    named = config.env.get("TOKENIZER_PATH")
    if not named:
        return
    path = next((p for p in (Path(named), ROOT / named) if p.is_file()), None)
    if path is None:
        raise BuildError(f"the configuration names TOKENIZER_PATH={named}, which is not found (from here or {ROOT}); "
                         "cannot check the logs' tokenizer against it")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for r in runs:
        if r["tokenizer_sha256"] != sha:
            raise BuildError(f"{r['path']}: its tokenizer (sha256 {r['tokenizer_sha256'][:16]}) is not the "
                             f"configuration's TOKENIZER_PATH={named} (sha256 {sha[:16]})")


def check_code(runs, text, code):
    """Every log must come from the code this record ships. train_gpt.py logs the sha256 of the file that ran
    (`code sha256:`); it must be the shipped file's, or the extracted text's when the shipped file is its lzma
    wrapper: run_skc_competition_8xh100.sh trains `--dce --wrap never` output, and the wrapper execs exactly that
    text. The extraction is deterministic (same source, commit and configuration give the same bytes), so the
    record's file is byte for byte the one that trained."""
    ships = hashlib.sha256(text.encode()).hexdigest()
    accepted = {ships, hashlib.sha256(code.encode()).hexdigest()}
    for r in runs:
        if r["code_sha256"] is None:
            raise BuildError(f"{r['path']}: no `code sha256:` line, so the run cannot be tied to the code this "
                             "record ships (a log of an older train_gpt.py?)")
        if r["code_sha256"] not in accepted:
            raise BuildError(
                f"{r['path']}: the run's code (sha256 {r['code_sha256'][:12]}) is not the code this record ships "
                f"(sha256 {ships[:12]}); the score would not belong to the submitted file. Build from the same "
                "train_gpt.py, commit and configuration as the launch (it trains the --dce extract), or, for a run "
                "of the full file (EXTRACT=0), without --dce")


def check_cap(code_bytes, runs, cap):
    worst = max(runs, key=lambda r: r["model_bytes"])
    total = code_bytes + worst["model_bytes"]
    if total > cap:
        raise BuildError(f"over the cap: code {code_bytes:,} + model {worst['model_bytes']:,} (seed {worst['seed']}) "
                         f"= {total:,} bytes > {cap:,} by {total - cap:,}")
    return total


def submission_json(args, runs, code_bytes):
    bpbs = [r["final_val_bpb"] for r in runs]
    return {
        "author": args.author or args.github_id, "github_id": args.github_id, "name": args.title or args.name,
        "blurb": args.blurb, "date": args.date, "track": "10min_16mb",
        "val_bpb": round(statistics.fmean(bpbs), 6),
        "val_bpb_std": round(statistics.stdev(bpbs), 6) if len(bpbs) > 1 else None,
        "val_loss": round(statistics.fmean(r["final_val_loss"] for r in runs), 6),
        "seeds": [r["seed"] for r in runs],
        "val_bpb_per_seed": {str(r["seed"]): r["final_val_bpb"] for r in runs},
        "bytes_code": code_bytes,
        "bytes_model_per_seed": {str(r["seed"]): r["model_bytes"] for r in runs},
        "bytes_total": code_bytes + max(r["model_bytes"] for r in runs),
    }


def readme(args, sub, runs, config, info):
    rows = [f"| {r['seed']} | {r['steps']} | {r['train_seconds']} | {r['final_eval_s']} | {r['final_val_bpb']:.4f} "
            f"| {r['model_bytes']:,} | {sub['bytes_code'] + r['model_bytes']:,} |" for r in runs]
    std = f" ± {sub['val_bpb_std']:.4f}" if sub["val_bpb_std"] is not None else ""
    on = [config.knobs[a].name for a, v in config.static_values().items() if v is True]
    first = runs[0]
    lines = [
        f"# {sub['name']}", "", *([sub["blurb"], ""] if sub["blurb"] else []),
        f"## Results ({len(runs)} seed{'s' * (len(runs) > 1)})", "",
        "| seed | steps | train s | eval s | final val_bpb | model bytes | total bytes |", "|---|---|---|---|---|---|---|",
        *rows, f"| **mean** | | | | **{sub['val_bpb']:.4f}**{std} | | max {sub['bytes_total']:,} |", "",
        f"Hardware: {first['world_size']} process(es) on {str(first['device']).split(':')[0]}, torch {first['torch']}. "
        "The score is the reloaded "
        "artifact's (`final_roundtrip`), cap 16,000,000 bytes = code + model.", "",
        "## Code", "",
        f"`train_gpt.py` is {sub['bytes_code']:,} bytes: `build_submission.py"
        f"{' --dce' if args.dce else ''}` extracted it from train_gpt.py at commit {info['commit']} "
        f"({info['source_bytes']:,} bytes){', then wrapped it in an lzma self-extractor' if info['wrapped'] else ''}. "
        "The configuration is baked in: the knobs it sets are the defaults, and its feature switches are frozen.", "",
        f"Feature switches on: {', '.join(f'`{n}`' for n in on) or 'none'}.", "",
        "Configuration: " + (" ".join(f"`{k}={v}`" for k, v in sorted(config.env.items())) or "the defaults") + ".",
        "", "## How to run", "", "```bash", "pip install -r requirements.txt",
        "SEED=1337 DATA_PATH=./data/datasets/fineweb10B_sp8192 torchrun --standalone --nproc_per_node=8 train_gpt.py",
        "```", "",
    ]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    return "\n".join(lines)


def write_record(args, code, runs, config, info):
    out = Path(args.records_dir) / f"{args.date}_{args.name}"
    if out.exists():
        raise BuildError(f"{out} exists; a record is never overwritten (pick another --name)")
    sub = submission_json(args, runs, len(code.encode()))
    files = {
        "train_gpt.py": code,
        "submission.json": json.dumps(sub, indent=2) + "\n",
        "README.md": readme(args, sub, runs, config, info),
        "requirements.txt": "\n".join(info["requirements"]) + "\n",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        for r in runs:
            shutil.copyfile(r["path"], tmp / f"train_seed{r['seed']}.log")
        os.rename(tmp, out)  # atomic: the record appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, sub


# ----------------------------------------------------------------------------------------------------------------
# main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dce", action="store_true", help="strip the code of every feature the configuration turns off")
    p.add_argument("--config", help="env file of the run (KEY=VALUE lines)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config knob (repeatable)")
    p.add_argument("--source", default=str(ROOT / "train_gpt.py"))
    p.add_argument("--extract-only", metavar="OUT", help="only write the extracted train_gpt.py to OUT")
    p.add_argument("--wrap", choices=["auto", "never", "always"], default="auto",
                   help="lzma self-extracting wrapper (auto: only when smaller)")
    p.add_argument("--log", action="append", default=[], help="a finished run's log, one per seed (repeatable)")
    p.add_argument("--name", help="short name; the record goes to --records-dir/<date>_<name>/")
    p.add_argument("--title", help="human-readable name (default: --name)")
    p.add_argument("--author")
    p.add_argument("--github-id")
    p.add_argument("--blurb", default="")
    p.add_argument("--notes", help="markdown file appended to the record's README")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--records-dir", default=str(ROOT / "records"))
    p.add_argument("--cap", type=int, default=CAP_BYTES)
    p.add_argument("--eval-budget", type=float, default=EVAL_BUDGET_S,
                   help="seconds the final evaluation may take on the challenge's 8 GPUs (default: the challenge's)")
    args = p.parse_args(argv)
    if not args.extract_only:
        missing = [f for f in ("name", "github_id") if not getattr(args, f)] + ([] if args.log else ["log"])
        if missing:
            p.error("a record needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        if not NAME_RE.match(args.name):
            p.error(f"--name {args.name!r}: use letters, digits, '_', '.', '-'")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
            p.error(f"--date {args.date!r}: use YYYY-MM-DD")
        if args.notes and not Path(args.notes).is_file():
            p.error(f"--notes file not found: {args.notes}")
    return args


def build(args):
    env = read_env_file(args.config) if args.config else {}
    env.update(parse_sets(args.set))
    config = Config(load_trainer(args.source), env)
    source_text = Path(args.source).read_text()
    commit = git_commit(args.source)
    if args.dce:
        digest = hashlib.sha256(source_text.encode()).hexdigest()[:12]
        header = f"# train_gpt.py {commit} (sha256 {digest}) specialised by build_submission.py --dce\n"
        text = extract(args.source, config, header)
    else:
        text = source_text
    code, wrapped = choose_code(text, args.wrap)
    py_compile_check(code)
    info = {"commit": commit, "source_bytes": len(source_text.encode()), "wrapped": wrapped,
            "requirements": requirements(text)}  # from the source before any wrapper hides its imports
    print(f"code_bytes:{len(code.encode())} source_bytes:{info['source_bytes']} extracted_bytes:{len(text.encode())} "
          f"wrapped:{wrapped}")
    if args.extract_only:
        tmp = Path(f"{args.extract_only}.tmp")
        tmp.write_text(code)
        os.replace(tmp, args.extract_only)
        print(f"wrote {args.extract_only}")
        return
    runs = read_runs(args.log, config, args.eval_budget)
    check_code(runs, text, code)
    total = check_cap(len(code.encode()), runs, args.cap)
    out, sub = write_record(args, code, runs, config, info)
    print(f"record:{out} val_bpb:{sub['val_bpb']} seeds:{sub['seeds']} bytes_total:{total} cap:{args.cap}")


def main(argv=None):
    args = parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"build_submission: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
