"""Reads a train_gpt.py log (one `key:value` line per event, CONVENTIONS.md rule 6) into a dict.

One parser for every consumer: scripts/bench_proxy.sh's summary line, scripts/sweep.py's tables and plots,
records/ablations/make_table.py and build_submission.py.

    python3 scripts/runlog.py LOG                     # the parsed fields as JSON
    python3 scripts/runlog.py LOG --bench WALL DATA   # golf-proxy-300 summary line (bench_proxy.sh)
"""
import json
import re
import sys

NUM = r"([-+]?[0-9.]+(?:[eE][-+]?\d+)?)"
# field -> (pattern, type). A log holds one run (train_gpt.py refuses to reuse one; parse_run_log refuses a log
# of several), so a field appears once, except the step lines' mfu, where the last step line wins.
FIELDS = {
    "final_val_bpb": (rf"final_roundtrip val_loss:\S+ val_bpb:{NUM}", float),
    "final_val_loss": (rf"final_roundtrip val_loss:{NUM}", float),
    "final_eval_s": (rf"final_roundtrip .*?eval_seconds:{NUM}", float),
    "stride": (r"final_roundtrip .*?stride:(\d+)", int),
    "temperature": (rf"^temperature T:{NUM}", float),
    "temperature_s": (rf"^temperature T:.*?seconds:{NUM}", float),
    "calib_s": (rf"^calibration tensors:.*?seconds:{NUM}", float),
    "ttt_adapted": (r"^stream_eval ttt:1 .*?adapted:(\d+)", int),
    "lora_adapted_chunks": (r"^lora_ttt .*?adapted_chunks:(\d+)", int),
    "lora_chunks": (r"^lora_ttt .*? chunks:(\d+)", int),
    "lora_seconds": (rf"^lora_ttt docs:.*? seconds:{NUM}", float),
    "challenge_eval_s": (r"^final_roundtrip .*?challenge_eval_seconds:(\d+)", int),
    "pre_export_val_bpb": (rf"pre_export val_loss:\S+ val_bpb:{NUM}", float),
    "model_bytes": (r"artifact packing:\S+ model_bytes:(\d+)", int),
    "code_bytes": (r"artifact packing:.*?code_bytes:(\d+)", int),
    "total_bytes": (r"artifact packing:.*?total_bytes:(\d+)", int),
    "q5_model_bytes": (r"export q5_\w+:(\d+)", int),
    "steps": (r"train_done steps:(\d+)", int),
    "train_seconds": (rf"train_done .*?train_seconds:{NUM}", float),
    "tok_s": (r"train_done .*?tok/s:(\d+)", int),
    "mfu": (rf"^step:.*?mfu:{NUM}", float),
    "peak_mem_mib": (r"peak_mem_mib:(\d+)", int),
    "compile_s": (rf"compile_warmup steps:\d+ seconds:{NUM}", float),
    "params": (r"model params:(\d+)", int),
    "world_size": (r"^run_id:\S+ world_size:(\d+)", int),
    "device": (r"^run_id:\S+ .*?device:(\S+)", str),
    "torch": (r"^run_id:\S+ .*?torch:(\S+)", str),
    "tokenizer_sha256": (r"^tokenizer path:.*? sha256:([0-9a-f]{64})", str),
    "code_sha256": (r"^code sha256:([0-9a-f]{64})", str),
    "gpu": (r"^code sha256:\S+ .*?gpu:(\S+)", str),
}
BANNER = re.compile(r"^run_id:\S+", re.M)
STEP_LINE = re.compile(rf"^step:(\d+)/\d+ train_loss:{NUM}", re.M)


class LogError(ValueError):
    pass


def parse_config(text):
    """The `config KEY=VALUE ...` line as a dict of strings ({} when the log has none)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("config ")]
    if not lines:
        return {}
    return dict(item.split("=", 1) for item in lines[-1].split()[1:])


def parse_run_log(text, name="the log"):
    """Every field of FIELDS that the log has (absent ones are None), plus `config` and the loss `curve`.
    LogError when the text holds more than one run: its fields would mix two runs."""
    runs = len(BANNER.findall(text))
    if runs > 1:
        raise LogError(f"{name}: holds {runs} runs (one `run_id:` line each); a log must hold one run. It was "
                       "appended to by an older train_gpt.py: split it, or keep only the run you mean")
    out = {}
    for key, (pattern, kind) in FIELDS.items():
        found = re.findall(pattern, text, re.M)
        out[key] = kind(found[-1]) if found else None
    out["config"] = parse_config(text)
    out["seed"] = int(out["config"]["SEED"]) if "SEED" in out["config"] else None
    out["curve"] = [(int(s), float(v)) for s, v in STEP_LINE.findall(text)]
    out["finished"] = out["final_val_bpb"] is not None
    return out


def read_run_log(path):
    try:
        with open(path) as f:
            return parse_run_log(f.read(), path)
    except FileNotFoundError:
        raise LogError(f"log not found: {path}") from None


def bench_summary(run, wall_s, data_s):
    """The one-line golf-proxy-300 report (../shared/bench/README.md); '?' marks a field the log lacks."""
    keys = ["final_val_bpb", "pre_export_val_bpb", "total_bytes", "steps", "tok_s", "mfu", "peak_mem_mib",
            "final_eval_s"]
    names = {"total_bytes": "artifact_bytes", "tok_s": "tok/s"}
    parts = [f"{names.get(k, k)}:{'?' if run[k] is None else run[k]}" for k in keys]
    return "bench:golf-proxy-300 " + " ".join(parts + [f"data_s:{data_s}", f"wall_s:{wall_s}"])


def main(argv):
    try:
        if len(argv) == 4 and argv[1] == "--bench":
            print(bench_summary(read_run_log(argv[0]), argv[2], argv[3]))
        elif len(argv) == 1:
            print(json.dumps(read_run_log(argv[0]), indent=1))
        else:
            sys.exit(__doc__)
    except LogError as e:
        sys.exit(f"runlog: error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
