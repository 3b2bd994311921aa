"""build_submission.py: guard folding and pruning on a small synthetic trainer with known answers, every feature
flag of train_gpt.py on and off, identical training of the full and the extracted file, the cap, the record
writer and its refusals."""
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, TINY, log_values, run_train

import build_submission as bs
from test_model import ALL_ON

# ---------------------------------------------------------------------------------------------------------------
# the DCE itself, on a synthetic trainer whose extraction is known

TOY = textwrap.dedent('''
    """toy trainer"""
    import math
    import json


    class ConfigError(ValueError):
        pass


    class Knob:
        def __init__(self, name, default, kind=None, check=None, choices=None):
            self.name, self.default, self.kind, self.choices = name, default, kind or type(default), choices

        def read(self, environ):
            raw = environ.get(self.name)
            v = self.default if raw is None else (raw == "1" if self.kind is bool else self.kind(raw))
            if self.choices is not None and v not in self.choices:
                raise ConfigError(f"{self.name}={v!r} must be one of {sorted(self.choices)}")
            return v


    class Hyperparameters:
        fancy = Knob("FANCY", False)
        mode = Knob("MODE", "a", choices={"a", "b"})
        width = Knob("WIDTH", 4)
        fancy_width = Knob("FANCY_WIDTH", 2)  # read only by fancy code

        def __init__(self, environ):
            for attr, knob in vars(Hyperparameters).items():
                if isinstance(knob, Knob):
                    setattr(self, attr, knob.read(environ))


    def fancy_helper(x):
        return math.sqrt(x)


    UNUSED_GRID = tuple(round(0.5 * i, 1) for i in range(3))  # pure and unreferenced: goes
    STAMP = print("toy loaded")  # unreferenced, but a call with an effect: stays


    class Model:
        def __init__(self, h):
            self.h = h

        def fancy(self, x):  # same name as the knob: must not keep it alive
            return fancy_helper(x) * self.h.fancy_width

        def forward(self, x, extra=None):
            h = self.h
            if h.fancy and extra is not None:
                x = self.fancy(x)
            elif h.mode == "b":
                x = -x
            else:
                x = x + 1
            y = 2 if not h.fancy else 3
            return x * y * h.width


    def main():
        h = Hyperparameters({})
        print(Model(h).forward(4.0, extra=1))


    if __name__ == "__main__":
        main()
''')


class ToyTrainer:
    """A loaded toy trainer and its extraction under an env."""

    def __init__(self, tmp_path, env, source=TOY):
        self.path = tmp_path / "toy.py"
        self.path.write_text(source)
        self.config = bs.Config(bs.load_trainer(self.path), env)

    def extract(self):
        return bs.extract(self.path, self.config)

    def run(self, text, tmp_path):
        out = tmp_path / "out.py"
        out.write_text(text)
        lines = subprocess.run([sys.executable, str(out)], capture_output=True, text=True).stdout.split()
        assert lines[0] == "toy" and lines[1] == "loaded"
        return lines[-1]


def test_guards_fold_and_dead_code_goes(tmp_path):
    toy = ToyTrainer(tmp_path, {})
    text = toy.extract()
    assert "fancy_helper" not in text and "def fancy" not in text and "import math" not in text
    assert "FANCY_WIDTH" not in text  # a knob only dead code read
    assert "import json" not in text and '"""' not in text and "toy trainer" not in text
    assert "UNUSED_GRID" not in text and "STAMP = print('toy loaded')" in text
    tree = ast.parse(text)
    assert not any(isinstance(n, ast.If) and "h.mode" in ast.unparse(n.test) for n in ast.walk(tree))
    assert "x = x + 1" in text and "x = -x" not in text and "y = 2" in text
    assert toy.run(text, tmp_path) == toy.run(TOY, tmp_path) == str((4.0 + 1) * 2 * 4)


def test_partial_boolean_guard_keeps_the_unknown_part(tmp_path):
    toy = ToyTrainer(tmp_path, {"FANCY": "1", "MODE": "b", "WIDTH": "5"})
    text = toy.extract()
    assert "if extra is not None:" in text and "x = -x" in text  # `h.fancy and extra is not None` -> the rest
    assert "fancy_helper" in text and "FANCY_WIDTH" in text and "y = 3" in text
    assert "Knob('WIDTH', 5)" in text  # the configuration is baked in as the default
    assert toy.run(text, tmp_path) == str(math_sqrt(4.0) * 2 * 3 * 5)


def math_sqrt(x):
    return x ** 0.5


def test_switches_are_frozen(tmp_path):
    toy = ToyTrainer(tmp_path, {"MODE": "b"})
    (tmp_path / "x.py").write_text(toy.extract())
    frozen = bs.load_trainer(tmp_path / "x.py")
    assert frozen.Hyperparameters({}).mode == "b"
    with pytest.raises(frozen.ConfigError, match="MODE"):
        frozen.Hyperparameters({"MODE": "a"})  # loud, not silently ignored
    with pytest.raises(frozen.ConfigError, match="FANCY"):
        frozen.Hyperparameters({"FANCY": "1"})


def test_unsound_sources_are_refused(tmp_path):
    assert TOY.count("        h = self.h\n") == 1
    rebinds = TOY.replace("        h = self.h\n", "        h = self.h\n        h.fancy = True\n")
    with pytest.raises(bs.BuildError, match="assigns config switch"):
        ToyTrainer(tmp_path, {}, rebinds).extract()
    other_h = TOY.replace("        h = self.h\n", "        h = dict(fancy=1)\n")
    with pytest.raises(bs.BuildError, match="the name h must always be"):
        ToyTrainer(tmp_path, {}, other_h).extract()


# ---------------------------------------------------------------------------------------------------------------
# train_gpt.py: every feature flag on and off

MARKERS = {  # flag -> (extra knobs it needs at the TINY shape, text only its code has)
    "SKC_ENABLED": ({}, "class SKCMixer"),
    "PARALLEL_RESIDUAL": ({}, "scales[0] * mixed + scales[1] * out"),
    "SHARED_BLOCKS": ({"SHARED_BLOCK_COUNT": "1"}, "SHARED_BLOCK_COUNT"),
    "DEPTH_RECUR": ({"RECUR_START": "0", "RECUR_END": "1"}, "RECUR_FROM_FRAC"),
    "CAPSULES_ENABLED": ({"CAPSULE_LAYER": "0", "CAPSULE_DIM": "16"}, "class CapsuleBank"),
    "FEEDBACK_ENABLED": ({}, "class FeedbackAdapters"),
    "ENGRAM_ENABLED": ({}, "class EngramHash"),
    "MOE_ENABLED": ({"MOE_EXPERTS": "4"}, "class MoEMLP"),
    "FUSED_LOSS": ({}, "class FusedSoftcapCrossEntropy"),
    "FUSED_QKV": ({}, "def qkv"),
    "XSA_ENABLED": ({}, "def exclusive_self_attention"),
    "XSA_KERNEL": ({}, "def xsa_kernels"),
    "QK_NORM_KERNEL": ({}, "def norm_rope_kernels"),
    "CE_KERNEL": ({}, "def softcap_ce_kernels"),
    "MLP_KERNEL": ({"MLP_MULT": "4"}, "def mlp_kernels"),
    "COMBO_KERNELS": ({}, "combo_kernels = True"),
    "VALUE_RESIDUAL": ({}, "value_mix"),
    "SMEAR_GATE": ({}, "class SmearGate"),
    "ATTN_GATE": ({}, "def gate_heads"),
    "LAYER_SCALE": ({}, "LAYER_SCALE_INIT"),
    "MUON_ROW_NORM": ({}, "class RowNormMuon"),
    "MUON_BATCHED": ({}, "class BatchedMuon"),
    "MUON_FUSED": ({}, "class FusedMuon"),
    "TEMPERATURE_SEARCH": ({}, "def search_temperature"),
    "TTT_ENABLED": ({}, "def ttt_adapt"),
    "EVAL_DOC_ISOLATED": ({}, "def document_bounds"),
    "EVAL_ENGRAM": ({}, "class EvalEngram"),
    "TERNARY_CALIB": ({}, "class CalibratedTernaryLinear"),
    "CHECKPOINT_SAVE": ({}, "def save_checkpoint"),
    "EVAL_FROM_CHECKPOINT": ({}, "def load_checkpoint"),
    "FP_PHASE": ({}, "class QuantMix"),
    "EMBED_QAT": ({"EXPORT_EMBED": "int6"}, "def embedding_weight"),
    "HYBRID_INT": ({}, "class IntQATLinear"),
    "TTT_LORA_GLOBAL": ({"TTT_ENABLED": "1", "TTT_MODE": "lora", "TTT_LORA_CHUNK": "32"}, "def lora_shared"),
    "TTT_LORA_WARM_A": ({"TTT_ENABLED": "1", "TTT_MODE": "lora", "TTT_LORA_CHUNK": "32"}, "def warm_start"),
    "TTT_LORA_BUCKET": ({"TTT_ENABLED": "1", "TTT_MODE": "lora", "TTT_LORA_CHUNK": "32"}, "def lora_bucket_batch"),
    "TTT_LORA_NO_CUDNN": ({"TTT_ENABLED": "1", "TTT_MODE": "lora", "TTT_LORA_CHUNK": "32"}, "SDPBackend.EFFICIENT_ATTENTION"),
    "FP8_MATMUL": ({"MODEL_DIM": "128"}, "class FP8Matmul"),
    "FP8_DGRAD": ({"MODEL_DIM": "128", "FP8_MATMUL": "1"}, "class FP8DgradMatmul"),
    "FP8_WGRAD": ({"MODEL_DIM": "128", "FP8_MATMUL": "1", "FP8_DGRAD": "1", "TRAIN_SEQ_LEN": "128"},
                  "class FP8WgradMatmul"),
}


@pytest.fixture(scope="module")
def trainer():
    return bs.load_trainer(ROOT / "train_gpt.py")


def test_every_bool_flag_has_a_marker(trainer):
    flags = {k.name for k in vars(trainer.Hyperparameters).values() if isinstance(k, trainer.Knob) and k.kind is bool}
    assert flags == set(MARKERS)


@pytest.mark.parametrize("flag", list(MARKERS))
def test_flag_on_and_off(trainer, flag, tmp_path):
    extra, marker = MARKERS[flag]
    texts = {}
    for on in ("1", "0"):
        config = bs.Config(trainer, {**TINY, **extra, flag: on})
        texts[on] = bs.extract(ROOT / "train_gpt.py", config)
        bs.py_compile_check(texts[on])
        path = tmp_path / f"x{on}.py"
        path.write_text(texts[on])
        frozen = bs.load_trainer(path)
        baked = vars(frozen.Hyperparameters({}))
        assert baked == {k: v for k, v in vars(config.h).items() if k in baked}  # the run's configuration
        assert {"model_dim", "num_layers", "seed", flag.lower()} <= set(baked)
        with pytest.raises(frozen.ConfigError, match=flag):
            frozen.Hyperparameters({flag: "0" if on == "1" else "1"})
    assert marker in texts["1"] and marker not in texts["0"]
    assert max(len(texts["0"]), len(texts["1"])) < len((ROOT / "train_gpt.py").read_text())


@pytest.mark.parametrize("mode, kept, stripped", [("lora", "class LoRABank", "def ttt_adapt"),
                                                   ("sgd", "def ttt_adapt", "class LoRABank")])
def test_ttt_mode_keeps_only_its_own_code(trainer, mode, kept, stripped):
    config = bs.Config(trainer, {**TINY, "TTT_ENABLED": "1", "TTT_MODE": mode, "TTT_LORA_CHUNK": "32"})
    text = bs.extract(ROOT / "train_gpt.py", config)
    bs.py_compile_check(text)
    assert kept in text and stripped not in text


FORMAT_CODE = {"fp8": ["def encode_fp8", "def decode_fp8"],
               "int": ["def encode_int_rows", "def decode_int_rows", "def int_rows_quantize"],
               "log8": ["class Log8TernaryLinear", "def log8_scale_bytes", "def read_log8_scales", "def log8_codes"]}


@pytest.mark.parametrize("formats,used", [({}, []), ({"EXPORT_EMBED": "fp8"}, ["fp8"]), ({"EXPORT_FLOAT": "int6"}, ["int"]),
                                          ({"EXPORT_EMBED": "int8", "EXPORT_FLOAT": "fp8"}, ["fp8", "int"]),
                                          ({"SCALE_FORMAT": "log8"}, ["log8"])])
def test_export_formats_a_config_does_not_use_are_stripped(trainer, tmp_path, formats, used):
    """Each float format's encoder and decoder stay only where EXPORT_EMBED / EXPORT_FLOAT name it, the log8 scale
    code only with SCALE_FORMAT=log8; the extracted file still writes its artifact and reads it back to the same
    weights."""
    text = bs.extract(ROOT / "train_gpt.py", bs.Config(trainer, {**TINY, **formats}))
    for codec, markers in FORMAT_CODE.items():
        for marker in markers:
            assert (marker in text) == (codec in used), (codec, marker)
    path = tmp_path / "x.py"
    path.write_text(text)
    mod = bs.load_trainer(path)
    h = mod.Hyperparameters({})
    m = mod.GPT(h).eval()
    payload = mod.assemble_payload(mod.export_parts(m, h), "rans")
    fresh = mod.GPT(h).eval()
    fresh.load_state_dict(mod.deserialize_state(payload, h))
    assert mod.assemble_payload(mod.export_parts(fresh, h), "rans") == payload


# ---------------------------------------------------------------------------------------------------------------
# the extracted file trains exactly like the full one

RECORD_CONFIG = "".join(f"{k}={v}\n" for k, v in TINY.items()) + "ITERATIONS=6\n"  # what build() records


@pytest.fixture(scope="module")
def seed_runs(shards, tmp_path_factory):
    """Two seeds trained as run_skc_competition_8xh100.sh trains them: the file `build_submission.py --dce
    --wrap never --extract-only` writes for RECORD_CONFIG. {seed: (stdout, log path)}."""
    d = tmp_path_factory.mktemp("extracted")
    (d / "run.env").write_text(RECORD_CONFIG)
    script = d / "train_gpt.py"
    r = subprocess.run([sys.executable, str(ROOT / "build_submission.py"), "--dce", "--wrap", "never", "--config",
                        str(d / "run.env"), "--extract-only", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runs = {}
    for seed in (7, 8):
        r = run_train(shards, d, script=script, SEED=seed, RUN_ID=f"s{seed}")
        assert r.returncode == 0, r.stdout + r.stderr
        runs[seed] = (r.stdout, d / "logs" / f"s{seed}.txt")
    return runs


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    """The full train_gpt.py at RECORD_CONFIG, seed 7: (stdout, log path)."""
    d = tmp_path_factory.mktemp("full")
    r = run_train(shards, d, ITERATIONS=6, SEED=7, RUN_ID="s7")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, d / "logs" / "s7.txt"


def extracted_run(shards, tmp_path, env, wrap):
    config = bs.Config(bs.load_trainer(ROOT / "train_gpt.py"), {**TINY, **env})
    code, wrapped = bs.choose_code(bs.extract(ROOT / "train_gpt.py", config), wrap)
    assert wrapped == (wrap == "always")
    script = tmp_path / "train_gpt.py"
    script.write_text(code)
    r = run_train(shards, tmp_path, script=script, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"code sha256:{hashlib.sha256(code.encode()).hexdigest()} " in r.stdout  # the bytes that ran
    return r.stdout, len(code.encode())


def same_run(full, extracted, code_bytes):
    assert log_values(extracted, "train_loss") == log_values(full, "train_loss") and log_values(full, "train_loss")
    for key in ("val_bpb", "model_bytes"):
        assert log_values(extracted, key) == log_values(full, key)
    assert log_values(extracted, "code_bytes") == [code_bytes]


@pytest.mark.parametrize("wrap", ["never", "always"])
def test_extracted_default_trains_identically(shards, full_run, tmp_path, wrap):
    extracted, code_bytes = extracted_run(shards, tmp_path, dict(ITERATIONS=6, SEED=7, RUN_ID="s7"), wrap)
    same_run(full_run[0], extracted, code_bytes)


@pytest.mark.parametrize("features", ["all", "foundation"])
def test_extracted_feature_configs_train_identically(shards, tmp_path, features):
    env = dict(ALL_ON, FEEDBACK_HALT_TOL="0") if features == "all" else dict(
        XSA_ENABLED="0", VALUE_RESIDUAL="0", SMEAR_GATE="0")
    env.update(ITERATIONS=4, MUON_ROW_NORM="1")  # a training-only flag too
    (tmp_path / "full").mkdir()
    full = run_train(shards, tmp_path / "full", **env)
    assert full.returncode == 0, full.stdout + full.stderr
    extracted, code_bytes = extracted_run(shards, tmp_path, env, "never")
    same_run(full.stdout, extracted, code_bytes)


# ---------------------------------------------------------------------------------------------------------------
# the record writer

def build(tmp_path, logs, *extra, config=None):
    cfg = tmp_path / "run.env"
    cfg.write_text(config if config is not None else RECORD_CONFIG)
    cmd = [sys.executable, str(ROOT / "build_submission.py"), "--dce", "--config", str(cfg), "--name", "tiny",
           "--github-id", "tester", "--records-dir", str(tmp_path / "records"), "--date", "2026-11-23",
           *[a for log in logs for a in ("--log", str(log))], "--eval-budget", "1e9", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)  # CPU runs extrapolate to hours


@pytest.mark.parametrize("estimate, budget, ok", [(601, "600", False), (599, "600", True), (None, "1e9", False)])
def test_a_final_evaluation_over_the_challenge_budget_is_refused(seed_runs, tmp_path, estimate, budget, ok):
    """The log's final_roundtrip extrapolates its evaluation to the challenge's 8 GPUs; over the budget (or
    missing) the record is refused and nothing is written."""
    text = seed_runs[7][1].read_text()
    text = re.sub(r" challenge_eval_seconds:\d+", "" if estimate is None else f" challenge_eval_seconds:{estimate}", text)
    log = tmp_path / "seed7.txt"
    log.write_text(text)
    r = build(tmp_path, [log], "--eval-budget", budget)
    assert (r.returncode == 0) == ok, r.stderr
    if not ok:
        assert "challenge_eval_seconds" in r.stderr and not (tmp_path / "records").exists()


def record_dir(tmp_path):
    return tmp_path / "records" / "2026-11-23_tiny"


def test_record_is_written_whole(seed_runs, tmp_path):
    r = build(tmp_path, [seed_runs[7][1], seed_runs[8][1]], "--blurb", "tiny test")
    assert r.returncode == 0, r.stderr
    out = record_dir(tmp_path)
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["2026-11-23_tiny"]  # no temp dir left
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                      "train_gpt.py", "train_seed7.log", "train_seed8.log"]
    sub = json.loads((out / "submission.json").read_text())
    bpb = {s: log_values(seed_runs[s][1].read_text().split("final_roundtrip")[1], "val_bpb")[0] for s in (7, 8)}
    model = {s: int(log_values(seed_runs[s][1].read_text(), "model_bytes")[0]) for s in (7, 8)}
    code = (out / "train_gpt.py").stat().st_size
    assert sub["val_bpb_per_seed"] == {"7": bpb[7], "8": bpb[8]}
    assert sub["val_bpb"] == pytest.approx((bpb[7] + bpb[8]) / 2, abs=1e-9)
    assert sub["bytes_code"] == code and sub["bytes_total"] == code + max(model.values())
    assert sub["github_id"] == "tester" and sub["date"] == "2026-11-23" and sub["blurb"] == "tiny test"
    assert (out / "train_seed7.log").read_bytes() == seed_runs[7][1].read_bytes()
    assert set((out / "requirements.txt").read_text().split()) == {"brotli", "numpy", "sentencepiece", "torch"}
    readme = (out / "README.md").read_text()
    assert f"{bpb[7]:.4f}" in readme and f"{bpb[8]:.4f}" in readme and f"{code:,}" in readme
    shipped = (out / "train_gpt.py").read_text()
    if shipped.startswith("import lzma,base64"):  # the wrapper execs exactly the extracted text that trained
        shipped = bs.lzma.decompress(bs.base64.b85decode(shipped.split('"')[1])).decode()
    assert f"code sha256:{hashlib.sha256(shipped.encode()).hexdigest()} " in seed_runs[7][1].read_text()

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = build(tmp_path, [seed_runs[7][1]])
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_over_cap_is_refused(seed_runs, tmp_path):
    log = tmp_path / "big.txt"
    text = seed_runs[7][1].read_text()
    model = int(log_values(text, "model_bytes")[0])
    log.write_text(text.replace(f"model_bytes:{model}", "model_bytes:15990000"))
    r = build(tmp_path, [log])
    assert r.returncode == 2 and "over the cap" in r.stderr and "15,990,000" in r.stderr
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("case", ["missing_log", "unknown_flag", "missing_feature", "other_config", "unfinished",
                                  "same_seed", "bad_line", "no_training", "two_runs", "other_code", "no_code_hash"])
def test_bad_input_is_a_clear_error_and_writes_nothing(seed_runs, full_run, tmp_path, case):
    logs, config = [seed_runs[7][1]], None
    base = RECORD_CONFIG
    expect = {"missing_log": "log not found", "unknown_flag": "NUM_LAYER,", "missing_feature": "TTT_ENABLED",
              "other_config": "SMEAR_GATE", "unfinished": "final_val_bpb", "same_seed": "same seed",
              "bad_line": "not a KEY=VALUE line", "no_training": "no training in the log",
              "two_runs": "holds 2 runs", "other_code": "is not the code this record ships",
              "no_code_hash": "no `code sha256:` line"}[case]
    if case == "missing_log":
        logs = [tmp_path / "nope.txt"]
    elif case == "unknown_flag":
        config = base + "NUM_LAYER=3\n"
    elif case == "missing_feature":
        config = base + "TTT_ENABLED=1\n"
    elif case == "other_config":
        config = base + "SMEAR_GATE=0\n"
    elif case == "unfinished":
        logs = [tmp_path / "cut.txt"]
        logs[0].write_text(seed_runs[7][1].read_text().split("final_roundtrip")[0])
    elif case == "same_seed":
        logs = [seed_runs[7][1], seed_runs[7][1]]
    elif case == "bad_line":
        config = base + "this is not a setting\n"
    elif case == "no_training":  # what an EVAL_FROM_CHECKPOINT run logs: scores and an artifact, no training
        logs = [tmp_path / "rescored.txt"]
        text = seed_runs[7][1].read_text()
        logs[0].write_text("".join(l for l in text.splitlines(True) if not l.startswith(("train_done", "step:"))))
    elif case == "two_runs":  # a finished run, then a second seed's crashed one, as appending to one log made
        logs = [tmp_path / "two.txt"]
        logs[0].write_text(seed_runs[7][1].read_text() + seed_runs[8][1].read_text().split("step:")[0])
    elif case == "other_code":  # the full train_gpt.py trained it, not the extracted file the record ships
        logs = [full_run[1]]
    elif case == "no_code_hash":
        logs = [tmp_path / "old.txt"]
        logs[0].write_text("".join(l for l in seed_runs[7][1].read_text().splitlines(True) if not l.startswith("code ")))
    r = build(tmp_path, logs, config=config)
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert r.stderr.startswith("build_submission: error:")
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())


@pytest.mark.parametrize("case", ["other_tokenizer", "missing_tokenizer", "mixed_tokenizers", "no_tokenizer_line"])
def test_a_log_of_another_tokenizer_is_refused(seed_runs, tmp_path, case):
    """The logs' tokenizer sha256 must agree across seeds, and with the TOKENIZER_PATH the record names."""
    import hashlib

    base = "".join(f"{k}={v}\n" for k, v in TINY.items() if k != "TOKENIZER_PATH") + "ITERATIONS=6\n"
    sha = hashlib.sha256(open(TINY["TOKENIZER_PATH"], "rb").read()).hexdigest()
    logs = [seed_runs[7][1], seed_runs[8][1]]
    (tmp_path / "ok").mkdir()
    ok = build(tmp_path / "ok", logs, config=base + f"TOKENIZER_PATH={TINY['TOKENIZER_PATH']}\n")
    assert ok.returncode == 0, ok.stderr
    config = base
    if case == "other_tokenizer":  # same vocab, other pieces: the silently wrong val_bpb of issue 15
        other = tmp_path / "other.model"
        other.write_bytes(open(TINY["TOKENIZER_PATH"], "rb").read() + b"\0")
        config, expect = base + f"TOKENIZER_PATH={other}\n", f"is not the configuration's TOKENIZER_PATH={other}"
    elif case == "missing_tokenizer":
        config, expect = base + "TOKENIZER_PATH=nowhere.model\n", "TOKENIZER_PATH=nowhere.model, which is not found"
    elif case == "mixed_tokenizers":
        logs[1] = tmp_path / "mixed.txt"
        logs[1].write_text(seed_runs[8][1].read_text().replace(f"sha256:{sha}", "sha256:" + "0" * 64))
        expect = "the logs ran with different tokenizers"
    else:
        logs[1] = tmp_path / "old.txt"
        logs[1].write_text("".join(l for l in seed_runs[8][1].read_text().splitlines(True)
                                   if not l.startswith("tokenizer ")))
        expect = "no `tokenizer ... sha256:` line"
    r = build(tmp_path, logs, config=config)
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert not (tmp_path / "records").exists()


def test_extract_only_cli(tmp_path):
    out = tmp_path / "x.py"
    r = subprocess.run([sys.executable, str(ROOT / "build_submission.py"), "--dce", "--set", "SKC_ENABLED=1",
                        "--extract-only", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "class SKCMixer" in bs.lzma.decompress(bs.base64.b85decode(out.read_text().split('"')[1])).decode()
    assert f"code_bytes:{out.stat().st_size}" in r.stdout
    assert not os.path.exists(f"{out}.tmp")


# ---------------------------------------------------------------------------------------------------------------
# the launch scripts, on CPU with 2 gloo processes

def launch(tmp_path, shards, *args, config=None, script="run_skc_competition_2gpu_proxy.sh", **env):
    cfg = tmp_path / "tiny.env"
    cfg.write_text(config if config is not None else "".join(
        f"{k}={v}\n" for k, v in TINY.items() if k not in ("TOKENIZER_PATH", "DEVICE")) + "ITERATIONS=4\n")
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GOLFMIX_DIR")}
    full_env.update(CONFIG=str(cfg), RUNS_DIR=str(tmp_path / "runs"), DATA_PATH=str(shards), DEVICE="cpu",
                    TOKENIZER_PATH=TINY["TOKENIZER_PATH"], OMP_NUM_THREADS="1")
    full_env.update(env)
    return subprocess.run(["bash", str(ROOT / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.ddp
def test_proxy_launch_runs_the_extracted_file_on_two_processes(shards, tmp_path):
    # the proxy's own MAX_WALLCLOCK_SECONDS=300 / batch are overridden back to the tiny shape by trailing args
    r = launch(tmp_path, shards, "7", "MAX_WALLCLOCK_SECONDS=0", "TRAIN_BATCH_TOKENS=2048", MATRIX_LR="0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: MATRIX_LR=0.5 is set in the environment" in r.stderr  # a stray knob: dropped, and said so
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("proxy2_seed7_")
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.env", "commit", "train_gpt.py", "stdout.txt", f"{run_dir.name}.txt",
            "final_model.ternary.ptz"} <= names
    log = (run_dir / f"{run_dir.name}.txt").read_text()
    assert "world_size:2" in log and "SEED=7" in log and "TRAIN_BATCH_TOKENS=2048" in log and "MATRIX_LR=0.03" in log
    assert log_values(log, "code_bytes") == [(run_dir / "train_gpt.py").stat().st_size]  # the extracted file ran
    assert f"code sha256:{hashlib.sha256((run_dir / 'train_gpt.py').read_bytes()).hexdigest()} " in log
    assert "final_roundtrip" in log and f"run:{run_dir.name} final_val_bpb:" in r.stdout


@pytest.mark.parametrize("case", ["typo", "no_data"])
def test_launch_refuses_bad_setups_before_training(shards, tmp_path, case):
    if case == "typo":
        r = launch(tmp_path, shards, "7", "XSA_ENABLE=0")
        expect = "XSA_ENABLE,"
    else:
        r = launch(tmp_path, shards, "7", DATA_PATH=str(tmp_path / "empty"), script="run_skc_competition_8xh100.sh")
        expect = "no shards in"
    assert r.returncode != 0 and expect in r.stderr, r.stderr
    assert "launch:" not in r.stdout


def test_launch_runs_with_the_config_environment_and_warns_about_stray_knobs(shards, tmp_path):
    """A knob exported in the caller's shell (MATRIX_LR from an earlier experiment) must not reach the run: the
    launch runs with the config, the trailing overrides and the machine's variables, and names what it dropped.
    A stand-in python3 on PATH records the environment torchrun would get, instead of training."""
    bin_dir, dump = tmp_path / "bin", tmp_path / "env.txt"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        "#!/bin/bash\n"
        f'if [[ $1 == -m && $2 == torch.distributed.run ]]; then env > "{dump}"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    r = launch(tmp_path, shards, "7", "EMBED_LR=0.07", PATH=f"{bin_dir}:{os.environ['PATH']}", MATRIX_LR="0.5",
               SMEAR_GATE="0", ITERATIONS="99", NCCL_DEBUG="INFO", COMPILE="0", script="run_skc_competition_8xh100.sh")
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert "MATRIX_LR" not in env and "SMEAR_GATE" not in env, r.stderr  # strays: dropped
    assert env["ITERATIONS"] == "4" and env["EMBED_LR"] == "0.07"  # the config's and the override's values
    assert env["NCCL_DEBUG"] == "INFO" and env["COMPILE"] == "0" and env["DEVICE"] == "cpu"  # machine: kept
    assert env["SEED"] == "7" and env["DATA_PATH"] == str(shards)
    for name, value in (("MATRIX_LR", "0.5"), ("SMEAR_GATE", "0"), ("ITERATIONS", "99")):
        assert f"warning: {name}={value} is set in the environment" in r.stderr, r.stderr
    assert "warning: EMBED_LR" not in r.stderr and "warning: DEVICE" not in r.stderr
    # the launcher finds the knobs with sed; it must find every one Hyperparameters reads
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    found = subprocess.run(["sed", "-n", r's/.*= Knob("\([A-Z0-9_]*\)".*/\1/p', str(ROOT / "train_gpt.py")],
                           capture_output=True, text=True).stdout.split()
    assert sorted(found) == sorted(tg.Hyperparameters({}).env_names().values())


# The code of a submission counts against the 16,000,000-byte cap. These budgets are today's extracted sizes at
# best_known_competition.env plus a margin (79,589 bytes, 26,743 wrapped, once that config took LoRA TTT, the FP
# phase and the int8 float formats: 10.6 KB more code, 3.3 KB wrapped, for 2.2 MB of model bytes freed; 83,703 and
# 27,873 once it took SCALE_FORMAT=log8: 2.0 KB more code, 0.5 KB wrapped, for 339 KB of model bytes freed; 85,236
# and 28,273 once LoRA TTT froze the quantized weights: 0.6 KB, 0.16 KB wrapped, for an uncompiled pass that
# quantizes each matrix once instead of at every forward; 85,815 and 28,433 once it took the shared adapter,
# TTT_LORA_GLOBAL, and the pass logs a budget cut: 0.6 KB, 0.16 KB wrapped, for 0.0022 bpb; 86,676 and 28,643
# with the shared adapter's own rank and targets and TTT_LORA_WARM_A's knob, 0.21 KB wrapped, to be measured;
# 86,797 and 28,693 with COMPILE_MODE, 50 bytes wrapped, for issue 12's throughput A/B; 87,012 and 28,763 with
# FP8_MATMUL's, FP8_DGRAD's and FP8_WGRAD's knobs and the layers' matmul indirection, their whole cost when off;
# 87,265 and 28,813 with ROPE_DIMS's default of 64 and its rule for narrower heads, 50 bytes wrapped, for 0.007;
# 87,448 and 28,883 with the TTT_LORA_BUCKET and TTT_LORA_NO_CUDNN knobs and the padded rows' guard, to be measured;
# 87,706 and 28,938 once the LoRA pass's batching became the two helpers scripts/lora_shapes.py replays; 88,226
# and 29,148 once the env took TTT_LORA_BUCKET and TTT_LORA_NO_CUDNN: 0.2 KB wrapped, for chunk 64 inside the
# budget, 0.0013 below chunk 96; 88,570 and 29,258 once the LoRA pass's steps stopped reading back from the GPU
# (lora_step_tensors: 0.1 KB wrapped, to be measured); 88,606 and 29,248 once logits() took the head's input and
# weight from head_inputs (26 bytes, none wrapped), so that a fused loss can start from them too; 88,666 and
# 29,273 with FUSED_LOSS's knob, its whole cost when off, for issue 12's throughput A/B (no gain, session 16); 88,649
# and 29,273 with FUSED_QKV's knob, paid for by writing the attention's three views as one line; 88,764 and 29,293
# once BatchedMuon made its momentum buffers at the first step only (setdefault's default made and zero-filled 62 a
# step; no step-time change measured, session 17); 88,682 and 29,293 once Muon and BatchedMuon shared that as
# Muon.momentum_buffer; 88,742 and 29,323 with XSA_KERNEL's knob, its whole cost when off, for issue 12's
# throughput A/B; 92,448 and 30,418 once the env took XSA_KERNEL=1: 1.1 KB wrapped for a step 2.0-2.3 ms (2.6%)
# shorter (session 18; the artifact had 686 KB to spare); 92,516 and 30,428 with QK_NORM_KERNEL's knob, its whole
# cost when off, for issue 12's throughput A/B (built in session 18, unmeasured); 92,644 and 30,463 once
# XSA_KERNEL's grid became one flat axis (35 bytes wrapped: no 65535-block cap on sequences x heads); 92,823 and
# 30,503 once XSA_KERNEL and QK_NORM_KERNEL shared one launcher, launch_head_blocks (40 bytes wrapped for one
# copy of the grid, strides and contiguity instead of two); 97,728 and 31,468 once QK_NORM_KERNEL read cos/sin
# tables and the env took it: 0.95 KB wrapped for a step 1.9-2.1 ms (2.6%) shorter (session 19; the artifact had
# 699 KB to spare); 97,762 and 31,458 with CE_KERNEL's knob, its whole cost when off, for issue 12's throughput A/B
# (session 20); 97,828 and 31,488 with COMBO_KERNELS's knob, its whole cost when off, for the same A/B; 102,373
# and 32,493 once the env took CE_KERNEL=1: 1.0 KB wrapped for a step 0.6-1.2 ms shorter (session 20; the artifact
# had 660 KB to spare); 102,526 and 32,523 once Muon.step decayed the matrices in one foreach op (unmeasured);
# 102,572 and 32,543 with MLP_KERNEL's knob, its whole cost when off, for issue 12's throughput A/B (session 21);
# 106,580 and 33,683 once the env took MLP_KERNEL=1: 1.1 KB wrapped for a step 0.9-1.4 ms shorter (session 21; the
# artifact had 660 KB to spare); 106,634 and 33,693 once its config check read the tiles from MLP_TILES; 106,705 and
# 33,698 once FUSED_QKV and MLP_KERNEL shared one forward-hooks test, has_forward_hooks; 107,451 and 33,988 once
# MLP_KERNEL's GEMM became persistent with TMA loads and stores: 0.3 KB wrapped for a step 1.4-1.5 ms shorter
# (session 22; the artifact had 666 KB to spare); 107,511 and 33,993 with MUON_FUSED's knob, its whole cost when
# off, for issue 12's next throughput A/B (session 22); 108,925 and 34,313 once the env took MUON_FUSED=1: 0.3 KB
# wrapped for 0.5-0.7% more tokens a second (session 23; the artifact had 657 KB to spare); 109,459 and 34,463 once
# MUON_FUSED compiled the parameter step too: 0.15 KB wrapped for a step 0.3-0.4 ms shorter (session 23); 109,912 and
# 34,588 once Newton-Schulz folded a x into its small factor and MUON_FUSED's parameter step took Muon's decay: 0.13 KB
# wrapped for a step 0.9-1.1 ms shorter (session 24; the artifact had 659 KB to spare); 109,941 with ATTN_GATE's knob,
# its whole cost when off, for issue 12's gated-attention A/B (session 25); 110,073 and 34,628 once the norms ran
# with autocast off, so that torch 2.12's fp32 rule for rms_norm cannot turn the stream fp32 (session 25: 0.04 KB
# wrapped); 110,323 and 34,723 once the env took MUON_ROW_NORM=1: 0.1 KB wrapped for 0.0017 bpb on two seeds
# (session 26; the artifact had 625 KB to spare); raise them deliberately, with the figure this test prints, when a
# change is worth its bytes.
EXTRACTED_BUDGET, WRAPPED_BUDGET = 110_323, 34_723


def test_the_extracted_file_stays_within_its_byte_budget(capsys):
    config = bs.Config(bs.load_trainer(ROOT / "train_gpt.py"), bs.read_env_file(ROOT / "best_known_competition.env"))
    text = bs.extract(ROOT / "train_gpt.py", config)
    wrapped, _ = bs.choose_code(text, "always")
    sizes = (len(text.encode()), len(wrapped.encode()))
    with capsys.disabled():
        print(f"\nextracted train_gpt.py at best_known_competition.env: {sizes[0]:,} bytes, {sizes[1]:,} wrapped "
              f"(budgets {EXTRACTED_BUDGET:,} and {WRAPPED_BUDGET:,})")
    assert sizes[0] <= EXTRACTED_BUDGET and sizes[1] <= WRAPPED_BUDGET, sizes
