"""Builds results.md / results.csv of the architecture ablation from the run logs in logs/ (golf-proxy-300).
Usage: python3 records/ablations/make_table.py"""
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
from runlog import read_run_log  # noqa: E402

RUNS = [  # (run id, flags on top of the default, commit of the train_gpt.py that ran)
    ("proxy300_default_f01ccd9", "(none: foundation default)", "f01ccd9"),
    ("abl_tricks", "XSA_ENABLED=1 VALUE_RESIDUAL=1 SMEAR_GATE=1", "c547810"),
    ("abl_engram", "ENGRAM_ENABLED=1", "c547810"),
    ("abl_skc", "SKC_ENABLED=1 SKC_PATTERN=AS", "c547810"),
    ("abl_capsules", "CAPSULES_ENABLED=1", "c547810"),
    ("abl_tricks_seed2", "XSA_ENABLED=1 VALUE_RESIDUAL=1 SMEAR_GATE=1 SEED=2024", "764df7e"),
    ("abl_parallel", "XSA_ENABLED=1 VALUE_RESIDUAL=1 SMEAR_GATE=1 PARALLEL_RESIDUAL=1 (tricks are defaults there)", "a84c0c3"),
    ("abl_shared", "SHARED_BLOCKS=1 (tricks on: the default)", "cf44184"),
    ("abl_recur", "DEPTH_RECUR=1 (tricks on: the default)", "cf44184"),
    ("abl_feedback", "FEEDBACK_ENABLED=1 (tricks on: the default)", "cf44184"),
    ("abl_moe", "MOE_ENABLED=1 MOE_EXPERTS=3 (tricks on: the default)", "cf44184"),
    ("abl_layerscale", "LAYER_SCALE=1 (tricks on: the default)", "cf44184"),
]
FIELDS = ["final_val_bpb", "pre_export_val_bpb", "q5_model_bytes", "code_bytes", "steps", "tok_s", "peak_mem_mib",
          "compile_s", "params"]


def main():
    rows = []
    for run, flags, commit in RUNS:
        path = HERE / "logs" / f"{run}.txt"
        if not path.exists():
            continue
        parsed = read_run_log(path)
        row = {"run": run, "flags": flags, "commit": commit}
        row.update({k: "" if parsed[k] is None else f"{parsed[k]:.4f}" if "bpb" in k else str(parsed[k]) for k in FIELDS})
        rows.append(row)
    base = float(rows[0]["final_val_bpb"])
    for r in rows:
        r["delta_bpb"] = f"{float(r['final_val_bpb']) - base:+.4f}"
        r["q5_total_bytes"] = str(int(r["q5_model_bytes"]) + int(r["code_bytes"]))
    keys = ["run", "flags", "commit", "final_val_bpb", "delta_bpb", "pre_export_val_bpb", "q5_total_bytes", "steps",
            "tok_s", "peak_mem_mib", "compile_s", "params"]
    with open(HERE / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
