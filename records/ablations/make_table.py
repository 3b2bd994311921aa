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
LOG_DIRS = [HERE.parents[1] / "bench_logs" / "ablations", HERE.parents[1] / "bench_logs"]  # logs/ is git-ignored
FIELDS = ["final_val_bpb", "pre_export_val_bpb", "q5_model_bytes", "code_bytes", "steps", "tok_s", "peak_mem_mib",
          "compile_s", "params"]


def find_log(run, dirs):
    """The first <run>.txt among dirs, or None."""
    return next((d / f"{run}.txt" for d in dirs if (d / f"{run}.txt").exists()), None)


def cells(parsed, keys):
    """The parsed log's values of keys as table cells: bpb to 4 places, absent ones empty."""
    return {k: "" if parsed.get(k) is None else f"{parsed[k]:.4f}" if "bpb" in k else str(parsed[k]) for k in keys}


def main():
    rows = []
    for run, flags, commit in RUNS:
        path = find_log(run, LOG_DIRS)
        if path is None:
            continue
        rows.append({"run": run, "flags": flags, "commit": commit, **cells(read_run_log(path), FIELDS)})
    base = float(rows[0]["final_val_bpb"])
    for r in rows:
        r["delta_bpb"] = f"{float(r['final_val_bpb']) - base:+.4f}"
        r["q5_total_bytes"] = str(int(r["q5_model_bytes"]) + int(r["code_bytes"]))
    keys = ["run", "flags", "commit", "final_val_bpb", "delta_bpb", "pre_export_val_bpb", "q5_total_bytes", "steps",
            "tok_s", "peak_mem_mib", "compile_s", "params"]
    write_table(rows, keys, "results")


def write_table(rows, keys, stem):
    """<stem>.csv and <stem>.md (printed too) of the rows' `keys` columns."""
    with open(HERE / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    (HERE / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# Issues 12-14 on golf-proxy-300, one H200 (nvidia-h200), torch 2.11.0+cu130, 2026-11-29. Logs and the scripts
# that ran them: h200_2026-11-29/ (run1.sh; run2.sh with call2.conf / call3.conf). A "trains" row is a 300 s
# training run (SEED 1337, TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 BROTLI_QUALITY=5); a "re-scores" row loads
# that run's checkpoint (EVAL_FROM_CHECKPOINT=1) and changes only evaluation/export knobs. Each log's
# `code sha256` is the sha256 of train_gpt.py at the commit given.
H200 = HERE / "h200_2026-11-29"
H200_RUNS = [  # (run id, what it is, commit, checkpoint of)
    ("c1_train", "trains: default, EVAL_STRIDE=64", "a30dc71", ""),
    ("c1_iso", "re-scores: EVAL_STRIDE=64 EVAL_DOC_ISOLATED=1", "a30dc71", "c1_train"),
    ("c1_lora", "re-scores: LoRA TTT (q,v,head r8 lr 0.003 chunk 256), EVAL_DOC_ISOLATED=1, no span", "a30dc71", "c1_train"),
    ("c1_lora_lr01", "re-scores: as c1_lora, TTT_LORA_LR=0.01", "a30dc71", "c1_train"),
    ("c2_train", "trains: FP_PHASE=1 QAT_START_FRAC=0.3, EVAL_STRIDE=64", "281a7d2", ""),
    ("c2_int8", "re-scores: EVAL_STRIDE=64 EXPORT_EMBED=int8 EXPORT_FLOAT=int8", "281a7d2", "c2_train"),
    ("c2_lora_s2k", "re-scores: LoRA TTT, TTT_LORA_SPAN=2048, EVAL_DOC_ISOLATED=1", "281a7d2", "c2_train"),
    ("c2_lora_s2k_c128", "re-scores: as c2_lora_s2k, TTT_LORA_CHUNK=128", "281a7d2", "c2_train"),
    ("c2_lora_s1k_all", "re-scores: LoRA TTT on q,k,v,proj,up,down,head, lr 0.001, TTT_LORA_SPAN=1024", "281a7d2", "c2_train"),
    ("c3_train", "trains: FP_PHASE=1 QAT_START_FRAC=0.3 EXPORT_EMBED=int8 EXPORT_FLOAT=int8 MLP_MULT=4, EVAL_STRIDE=64",
     "281a7d2", ""),
    # session 6 (h200_2026-11-29_s6/: run4.sh with call4/5/6.conf)
    ("c4_train", "trains: as c3_train, SEED=42", "39a67b9", ""),
    ("c4_chunked", "re-scores: chunked (EVAL_STRIDE=0)", "39a67b9", "c4_train"),
    ("c4_temp", "re-scores: EVAL_STRIDE=64 TEMPERATURE_SEARCH=1 (T fitted on training tokens: 1.0000)", "39a67b9", "c4_train"),
    ("c4_calib", "re-scores: EVAL_STRIDE=64 TERNARY_CALIB=1 (0 of 60 tensors changed)", "39a67b9", "c4_train"),
    ("c4_engram", "re-scores: EVAL_ENGRAM=1 EVAL_ENGRAM_WEIGHT=0.1 (chunked stream)", "39a67b9", "c4_train"),
    ("c4_lora", "re-scores: LoRA TTT, TTT_LORA_SPAN=2048 TTT_LORA_CHUNK=128, EVAL_DOC_ISOLATED=1", "39a67b9", "c4_train"),
    ("c4_lora_e2", "re-scores: as c4_lora, TTT_EPOCHS=2", "39a67b9", "c4_train"),
    ("c4_lora_r16", "re-scores: as c4_lora, TTT_LORA_RANK=16", "39a67b9", "c4_train"),
    ("c4_lora_s4k", "re-scores: as c4_lora, TTT_LORA_SPAN=4096", "39a67b9", "c4_train"),
    ("c5_train", "trains: FP_PHASE=1 QAT_START_FRAC=0.3 int8 floats, MLP_MULT=3, HYBRID_INT=1 HYBRID_FAMILIES=q,k "
     "HYBRID_BITS=4", "39a67b9", ""),
    ("t150m3_train", "trains 150 s: FP_PHASE=1 QAT_START_FRAC=0.3 int8 floats, MLP_MULT=3", "39a67b9", ""),
    ("t150m4_train", "trains 150 s: FP_PHASE=1 QAT_START_FRAC=0.3 int8 floats, MLP_MULT=4", "39a67b9", ""),
]
H200_S6 = HERE / "h200_2026-11-29_s6"
# session 7 (h200_2026-11-29_s7/: run5.sh with call7..call10.conf) on nvidia-h200-x2: two runs side by side, one
# GPU each; every row adds to c3's configuration (FP_PHASE=1 QAT_START_FRAC=0.3 int8 floats MLP_MULT=4)
C3 = "as c3_train"
H200_RUNS += [
    ("s2k_train", f"trains: {C3}, TRAIN_SEQ_LEN=2048", "9ac6cb3", ""),
    ("s2k_lora", "re-scores: LoRA TTT, TTT_LORA_SPAN=4096 TTT_LORA_CHUNK=128, EVAL_DOC_ISOLATED=1", "9ac6cb3", "s2k_train"),
    ("q6_train", f"trains: {C3}, QAT_START_FRAC=0.6", "9ac6cb3", ""),
    ("q6_fp8", "re-scores: EVAL_STRIDE=64 EXPORT_FLOAT=fp8", "9ac6cb3", "q6_train"),
    ("ema_train", f"trains: {C3}, EMA_ENABLED=1 EMA_DECAY=0.99 (from the warmdown's start, latent)", "9ac6cb3", ""),
    ("lr45_train", f"trains: {C3}, MATRIX_LR=0.045", "9ac6cb3", ""),
    ("lr45_lora", "re-scores: LoRA TTT, TTT_LORA_SPAN=4096 TTT_LORA_CHUNK=128, EVAL_DOC_ISOLATED=1", "9ac6cb3", "lr45_train"),
    ("mb_train", f"trains: {C3}, MUON_BATCHED=1", "9ac6cb3", ""),
    ("b131_train", f"trains: {C3}, MUON_BATCHED=1 TRAIN_BATCH_TOKENS=131072 GRAD_ACCUM_STEPS=1", "9ac6cb3", ""),
    ("b131s42_train", "trains: as b131_train, SEED=42", "9ac6cb3", ""),
    ("b65_train", f"trains: {C3}, MUON_BATCHED=1 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1", "9ac6cb3", ""),
]
H200_S7 = HERE / "h200_2026-11-29_s7"
# session 8 (h200_2026-11-29_s8/: scripts/sweeps/batch_recipe.toml run by run_sweep_device.sh, four calls, on
# nvidia-h200-x2, two rows side by side); every row is c3's configuration at 65536 tokens a step with one change
B65 = "as b65_train"
H200_RUNS += [
    ("b65s42", f"trains: {B65}, SEED=42", "ce76ba9", ""),
    ("b65s42_lora", "re-scores: LoRA TTT, TTT_LORA_SPAN=4096 TTT_LORA_CHUNK=128, EVAL_DOC_ISOLATED=1", "ce76ba9",
     "b65s42"),
    ("b32", f"trains: {B65}, TRAIN_BATCH_TOKENS=32768", "ce76ba9", ""),
    ("b65lr2", f"trains: {B65}, MATRIX_LR=0.02", "ce76ba9", ""),
    ("b65wd5", f"trains: {B65}, WARMDOWN_FRAC=0.5", "ce76ba9", ""),
    ("b65emat", f"trains: {B65}, EMA_ENABLED=1 EMA_DECAY=0.99 EMA_DOMAIN=ternary (from the warmdown's start)",
     "ce76ba9", ""),
    ("b65log8", f"trains: {B65}, SCALE_FORMAT=log8", "ce76ba9", ""),
    ("b65sync8", f"trains: {B65}, TRAIN_SYNC_EVERY=8", "ce76ba9", ""),
    ("b65def", f"trains: {B65} but FP_PHASE=0 MLP_MULT=3 (train_gpt.py's defaults then)", "ce76ba9", ""),
]
H200_S8 = HERE / "h200_2026-11-29_s8"
# session 9 (h200_2026-11-29_s9/: `bash scripts/sweep_device.sh scripts/sweeps/recipe65.toml s9`, four calls, on
# nvidia-h200-x2, two rows side by side); every row is b65sync8's configuration plus SCALE_FORMAT=log8 (r65), with
# one change. The LoRA rows re-score r65's checkpoint (r65s42_lora: r65s42's) with documents isolated, span 4096.
R65 = "as r65"
LORA = "re-scores: LoRA TTT, EVAL_DOC_ISOLATED=1 TTT_LORA_SPAN=4096"
H200_RUNS += [
    ("r65", "trains: as b65sync8, SCALE_FORMAT=log8", "0fd1754", ""),
    ("r65s42", f"trains: {R65}, SEED=42", "0fd1754", ""),
    ("r65_lora", f"{LORA} TTT_LORA_CHUNK=128", "0fd1754", "r65"),
    ("r65s42_lora", f"{LORA} TTT_LORA_CHUNK=128", "0fd1754", "r65s42"),
    ("r65_lora_b0", f"{LORA} TTT_LORA_CHUNK=128, TTT_LORA_BETA1=0 TTT_LORA_WD=0.5", "0fd1754", "r65"),
    ("r65_lora_wide", f"{LORA} TTT_LORA_CHUNK=128, TTT_LORA_TARGETS=q,k,v,proj,down,head TTT_LORA_RANK=32 "
     "TTT_LORA_LR=0.001", "0fd1754", "r65"),
    ("r65_lora_rec", f"{LORA} TTT_LORA_CHUNK=64, TTT_LORA_TARGETS=q,k,v,attn,mlp,head TTT_LORA_RANK=64 "
     "TTT_LORA_LR=0.0003 TTT_LORA_BETA1=0 TTT_LORA_WD=0.5", "0fd1754", "r65"),
    ("r65_lora_c64", f"{LORA} TTT_LORA_CHUNK=64", "0fd1754", "r65"),
    ("r65_lora_s8k", "re-scores: LoRA TTT, EVAL_DOC_ISOLATED=1 TTT_LORA_SPAN=8192 TTT_LORA_CHUNK=128", "0fd1754", "r65"),
    ("r65lr4", f"trains: {R65}, MATRIX_LR=0.04", "0fd1754", ""),
    ("r65qk5", f"trains: {R65}, QK_GAIN_INIT=5.0", "0fd1754", ""),
    ("r65kv6", f"trains: {R65}, NUM_KV_HEADS=6", "0fd1754", ""),
    ("r65mwd", f"trains: {R65}, MUON_WD=0.04", "0fd1754", ""),
]
H200_S9 = HERE / "h200_2026-11-29_s9"
# session 10 (h200_2026-11-29_s10/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_mwd.toml s10`, three calls,
# then scripts/sweeps/lora_glob_s10.toml as s10g, three short calls, on nvidia-h200-x2, two rows side by side);
# every row is r65mwd's configuration (r65 plus MUON_WD=0.04, train_gpt.py's default since session 9) with one
# change. The re-scoring rows load m65s42's or m65s2024's checkpoint, with documents isolated.
M65 = "as r65mwd"
ISO = "re-scores: EVAL_DOC_ISOLATED=1 (no TTT)"
B0 = "re-scores: LoRA TTT, EVAL_DOC_ISOLATED=1 TTT_LORA_BETA1=0 TTT_LORA_WD=0.5"
GLOB = f"{B0} TTT_LORA_GLOBAL=1"
H200_RUNS += [
    ("m65s42", f"trains: {M65}, SEED=42", "08422ba", ""),
    ("m65s2024", f"trains: {M65}, SEED=2024", "08422ba", ""),
    ("m65wd8", f"trains: {M65}, MUON_WD=0.08", "08422ba", ""),
    ("m65wd2", f"trains: {M65}, MUON_WD=0.02", "08422ba", ""),
    ("m65m3", f"trains: {M65}, MLP_MULT=3", "08422ba", ""),
    ("m65eq", f"trains: {M65}, EMBED_QAT=1", "08422ba", ""),
    ("m65s42_iso", ISO, "08422ba", "m65s42"),
    ("m65s2024_iso", ISO, "08422ba", "m65s2024"),
    ("m65s42_lora", f"{B0} TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba", "m65s42"),
    ("m65s2024_lora", f"{B0} TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba", "m65s2024"),
    ("m65s42_lora_adam", "re-scores: LoRA TTT, EVAL_DOC_ISOLATED=1 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096 (Adam's "
     "defaults: TTT_LORA_BETA1=0.9 TTT_LORA_WD=0)", "08422ba", "m65s42"),
    ("m65s42_lora_c64", f"{B0} TTT_LORA_CHUNK=64 TTT_LORA_SPAN=4096", "08422ba", "m65s42"),
    ("m65s42_lora_lr6", f"{B0} TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096 TTT_LORA_LR=0.006", "08422ba", "m65s42"),
    ("m65s42_lora_lr15", f"{B0} TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096 TTT_LORA_LR=0.0015", "08422ba", "m65s42"),
    ("m65s42_lora_glob", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba", "m65s42"),
    ("m65s2024_lora_glob", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba",
     "m65s2024"),
    ("m65s42_lora_glob3k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.003 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba", "m65s42"),
    ("m65s42_lora_glob3e4", f"{GLOB} TTT_LORA_GLOBAL_LR=0.0003 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096", "08422ba",
     "m65s42"),
    ("m65s42_lora_glob_lr2", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_LR=0.002 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=4096",
     "08422ba", "m65s42"),
    ("m65s42_lora_glob_c64", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=64 TTT_LORA_SPAN=4096", "08422ba", "m65s42"),
    ("m65s2024_lora_glob_c64", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=64 TTT_LORA_SPAN=4096", "08422ba",
     "m65s2024"),
    ("m65s42_lora_glob_s8k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=8192", "08422ba", "m65s42"),
    ("m65s2024_lora_glob_s8k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=8192", "08422ba",
     "m65s2024"),
    ("m65s42_lora_glob2k_s8k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.002 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=8192", "08422ba",
     "m65s42"),
    ("m65s42_lora_glob_c64_s8k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=64 TTT_LORA_SPAN=8192", "08422ba",
     "m65s42"),
    ("m65s2024_lora_glob_c64_s8k", f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=64 TTT_LORA_SPAN=8192", "08422ba",
     "m65s2024"),
]
H200_S10 = HERE / "h200_2026-11-29_s10"
# session 11 (h200_2026-11-30_s11/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s11.toml s11`, four calls on
# nvidia-h200-x2, two rows side by side; the repo at 49c88f2, train_gpt.py as at 61e5859); every training row is
# r65mwd's configuration with one change. The re-scoring rows load d65s7's or m65hd128s42's checkpoint, with
# documents isolated, and all but the _iso rows run best_known_competition.env's LoRA pipeline of session 10
# (b0, chunk 128, span 8192, shared adapter at lr 0.001) with the named change.
ENV10 = f"{GLOB} TTT_LORA_GLOBAL_LR=0.001 TTT_LORA_CHUNK=128 TTT_LORA_SPAN=8192"
WIDE = "TTT_LORA_GLOBAL_TARGETS=q,k,v,proj,up,down,head"
HD128 = "NUM_HEADS=6 NUM_KV_HEADS=2"
H200_RUNS += [
    ("d65s7", f"trains: {M65}, SEED=7", "61e5859", ""),
    ("m65m3s42", f"trains: {M65}, SEED=42 MLP_MULT=3", "61e5859", ""),
    ("m65hd128", f"trains: {M65}, {HD128}", "61e5859", ""),
    ("m65hd128s42", f"trains: {M65}, SEED=42 {HD128}", "61e5859", ""),
    ("m65mom97", f"trains: {M65}, MUON_MOMENTUM=0.97", "61e5859", ""),
    ("m65wd25", f"trains: {M65}, WARMDOWN_FRAC=0.25", "61e5859", ""),
    ("d65s7_iso", ISO, "61e5859", "d65s7"),
    ("d65s7_env", ENV10, "61e5859", "d65s7"),
    ("d65s7_gr32", f"{ENV10}, TTT_LORA_GLOBAL_RANK=32", "61e5859", "d65s7"),
    ("d65s7_gr128", f"{ENV10}, TTT_LORA_GLOBAL_RANK=128", "61e5859", "d65s7"),
    ("d65s7_gr32lr3", f"{ENV10}, TTT_LORA_GLOBAL_RANK=32 TTT_LORA_GLOBAL_LR=0.0003", "61e5859", "d65s7"),
    ("d65s7_gwide", f"{ENV10}, {WIDE}", "61e5859", "d65s7"),
    ("d65s7_gwide32", f"{ENV10}, {WIDE} TTT_LORA_GLOBAL_RANK=32", "61e5859", "d65s7"),
    ("d65s7_gwidelr5", f"{ENV10}, {WIDE} TTT_LORA_GLOBAL_LR=0.0005", "61e5859", "d65s7"),
    ("d65s7_gwidelr2", f"{ENV10}, {WIDE} TTT_LORA_GLOBAL_LR=0.002", "61e5859", "d65s7"),
    ("d65s7_warm", f"{ENV10}, TTT_LORA_WARM_A=1", "61e5859", "d65s7"),
    ("hd128s42_iso", f"{ISO}, {HD128}", "61e5859", "m65hd128s42"),
    ("hd128s42_env", f"{ENV10}, {HD128}", "61e5859", "m65hd128s42"),
    ("hd128s42_gwide", f"{ENV10}, {HD128} {WIDE}", "61e5859", "m65hd128s42"),
]
H200_S11 = HERE / "h200_2026-11-30_s11"
# session 12 (h200_2026-11-30_s12/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s12.toml s12`, five calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at a256127); every training row is session 11's default
# (m65hd128's configuration) with one change. The re-scoring rows load h128s2024's or h128rope64s42's checkpoint,
# with documents isolated, and all but the _iso rows run best_known_competition.env's LoRA pipeline of session 11
# (ENV10 with the shared adapter on every block matrix) with the named change.
H128 = "as m65hd128"
ENV11 = f"{ENV10} {WIDE}"
H200_RUNS += [
    ("h128s2024", f"trains: {H128}, SEED=2024", "a256127", ""),
    ("h128fp8", f"trains: {H128}, FP8_MATMUL=1", "a256127", ""),
    ("h128rope64", f"trains: {H128}, ROPE_DIMS=64", "a256127", ""),
    ("h128rope64s42", f"trains: {H128}, ROPE_DIMS=64 SEED=42", "a256127", ""),
    ("h128rope32", f"trains: {H128}, ROPE_DIMS=32", "a256127", ""),
    ("h128qs2", f"trains: {H128}, QAT_START_FRAC=0.2", "a256127", ""),
    ("h128s2024_iso", ISO, "a256127", "h128s2024"),
    ("h128s2024_env", ENV11, "a256127", "h128s2024"),
    ("h128s2024_gr4", f"{ENV11}, TTT_LORA_GLOBAL_RANK=4", "a256127", "h128s2024"),
    ("h128s2024_glr7", f"{ENV11}, TTT_LORA_GLOBAL_LR=0.0007", "a256127", "h128s2024"),
    ("h128s2024_swide", f"{ENV11}, TTT_LORA_TARGETS=q,k,v,proj,up,down,head", "a256127", "h128s2024"),
    ("h128s2024_c96", f"{ENV11}, TTT_LORA_CHUNK=96", "a256127", "h128s2024"),
    ("h128s2024_lr2", f"{ENV11}, TTT_LORA_LR=0.002", "a256127", "h128s2024"),
    ("h128s2024_c96lr2", f"{ENV11}, TTT_LORA_CHUNK=96 TTT_LORA_LR=0.002", "a256127", "h128s2024"),
    ("h128s2024_c64lr2", f"{ENV11}, TTT_LORA_CHUNK=64 TTT_LORA_LR=0.002", "a256127", "h128s2024"),
    ("rope64s42_iso", f"{ISO}, ROPE_DIMS=64", "a256127", "h128rope64s42"),
    ("rope64s42_env", f"{ENV11}, ROPE_DIMS=64", "a256127", "h128rope64s42"),
    ("rope64s42_c96lr2", f"{ENV11}, ROPE_DIMS=64 TTT_LORA_CHUNK=96 TTT_LORA_LR=0.002", "a256127", "h128rope64s42"),
    ("rope64s42_c96lr15", f"{ENV11}, ROPE_DIMS=64 TTT_LORA_CHUNK=96 TTT_LORA_LR=0.0015", "a256127", "h128rope64s42"),
    ("rope64s42_c64lr2", f"{ENV11}, ROPE_DIMS=64 TTT_LORA_CHUNK=64 TTT_LORA_LR=0.002", "a256127", "h128rope64s42"),
    ("rope64s42_c48lr2", f"{ENV11}, ROPE_DIMS=64 TTT_LORA_CHUNK=48 TTT_LORA_LR=0.002", "a256127", "h128rope64s42"),
]
H200_S12 = HERE / "h200_2026-11-30_s12"
# session 13 (h200_2026-11-30_s13/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s13.toml s13`, four calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at e865f06); every training row is session 12's default
# (h128rope64's configuration, ROPE_DIMS=64) with one change. The re-scoring rows load r64s2024's checkpoint, and
# all but _chunked, _iso, _temp and _engram run best_known_competition.env's LoRA pipeline of session 12 (ENV11 with
# chunk 96 and span lr 0.002, documents isolated) with the named change.
R64 = "as h128rope64"
ENV12 = f"{ENV11} TTT_LORA_CHUNK=96 TTT_LORA_LR=0.002"
H200_RUNS += [
    ("r64s2024", f"trains: {R64}, SEED=2024", "e865f06", ""),
    ("r32s42", f"trains: {R64}, ROPE_DIMS=32 SEED=42", "e865f06", ""),
    ("r16", f"trains: {R64}, ROPE_DIMS=16", "e865f06", ""),
    ("r64rb50k", f"trains: {R64}, ROPE_BASE=50000", "e865f06", ""),
    ("h256r64", f"trains: {R64}, NUM_HEADS=3 NUM_KV_HEADS=1", "e865f06", ""),
    ("r64qs45", f"trains: {R64}, QAT_START_FRAC=0.45", "e865f06", ""),
    ("r64s2024_chunked", "re-scores: EVAL_STRIDE=0", "e865f06", "r64s2024"),
    ("r64s2024_iso", ISO, "e865f06", "r64s2024"),
    ("r64s2024_temp", "re-scores: TEMPERATURE_SEARCH=1", "e865f06", "r64s2024"),
    ("r64s2024_engram", "re-scores: EVAL_STRIDE=0 EVAL_ENGRAM=1 EVAL_ENGRAM_WEIGHT=0.1", "e865f06", "r64s2024"),
    ("r64s2024_env", ENV12, "e865f06", "r64s2024"),
    ("r64s2024_envb", f"{ENV12}, TTT_LORA_BUCKET=1", "e865f06", "r64s2024"),
    ("r64s2024_envnc", f"{ENV12}, TTT_LORA_NO_CUDNN=1", "e865f06", "r64s2024"),
    ("r64s2024_r16", f"{ENV12}, TTT_LORA_RANK=16", "e865f06", "r64s2024"),
    ("r64s2024_s4k", f"{ENV12}, TTT_LORA_SPAN=4096", "e865f06", "r64s2024"),
    ("r64s2024_c80", f"{ENV12}, TTT_LORA_CHUNK=80", "e865f06", "r64s2024"),
    ("r64s2024_c64", f"{ENV12}, TTT_LORA_CHUNK=64", "e865f06", "r64s2024"),
    ("r64s2024_c64b", f"{ENV12}, TTT_LORA_CHUNK=64 TTT_LORA_BUCKET=1", "e865f06", "r64s2024"),
    ("r64s2024_c64nc", f"{ENV12}, TTT_LORA_CHUNK=64 TTT_LORA_NO_CUDNN=1", "e865f06", "r64s2024"),
    ("r64s2024_c64bnc", f"{ENV12}, TTT_LORA_CHUNK=64 TTT_LORA_BUCKET=1 TTT_LORA_NO_CUDNN=1", "e865f06", "r64s2024"),
    ("r64s2024_c64s4k", f"{ENV12}, TTT_LORA_CHUNK=64 TTT_LORA_SPAN=4096", "e865f06", "r64s2024"),
    ("r64s2024_c64d128", f"{ENV12}, TTT_LORA_CHUNK=64 TTT_LORA_DOCS=128", "e865f06", "r64s2024"),
    ("r64s2024_c48nc", f"{ENV12}, TTT_LORA_CHUNK=48 TTT_LORA_NO_CUDNN=1", "e865f06", "r64s2024"),
    ("r64s2024_c32nc", f"{ENV12}, TTT_LORA_CHUNK=32 TTT_LORA_NO_CUDNN=1", "e865f06", "r64s2024"),
]
H200_S13 = HERE / "h200_2026-11-30_s13"
# session 14 (h200_2026-11-30_s14/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s14.toml s14`, five calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at 022dc7c); every training row is session 12's default
# with one change (r64 and r64s42 are the default itself). The re-scoring rows load r64's or r64s42's checkpoint,
# and all but _iso run best_known_competition.env's LoRA pipeline of session 13 (ENV12 with chunk 64, buckets and no
# cuDNN) with the named change; r64_env_e865f06 is r64_env run by train_gpt.py of e865f06 (scripts/sweeps/
# recipe_s14_ab.toml), the A/B of session 13's sync-free chunk step and fused AdamW.
ENV13 = f"{ENV12} TTT_LORA_CHUNK=64 TTT_LORA_BUCKET=1 TTT_LORA_NO_CUDNN=1"
H200_RUNS += [
    ("r64", f"trains: {R64}", "022dc7c", ""),
    ("r64s42", f"trains: {R64}, SEED=42", "022dc7c", ""),
    ("leaky", f"trains: {R64}, MLP_ACT=leaky_relu2", "022dc7c", ""),
    ("gs64", f"trains: {R64}, GROUP_SIZE=64", "022dc7c", ""),
    ("qramp", f"trains: {R64}, QAT_RAMP_FRAC=0.1", "022dc7c", ""),
    ("cap20", f"trains: {R64}, LOGIT_SOFTCAP=20", "022dc7c", ""),
    ("r64_iso", ISO, "022dc7c", "r64"),
    ("r64_env_e865f06", ENV13, "e865f06", "r64"),
]
S14_LORA = [("env", ""), ("c48", ", TTT_LORA_CHUNK=48"), ("c40", ", TTT_LORA_CHUNK=40"), ("d32", ", TTT_LORA_DOCS=32"),
            ("d32c48", ", TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48")]  # each re-scoring on both checkpoints
H200_RUNS += [(f"{ckpt}_{name}", ENV13 + change, "022dc7c", ckpt) for ckpt in ("r64", "r64s42") for name, change in S14_LORA]
H200_S14 = HERE / "h200_2026-11-30_s14"
# session 15 (h200_2026-11-30_s15/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s15.toml s15`, three calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at 022dc7c); every training row is session 12's default
# with the named changes. The re-scoring rows load cap20s42's checkpoint (so LOGIT_SOFTCAP=20) and run
# best_known_competition.env's LoRA pipeline of session 14 (ENV13 with 32 spans a batch at chunk 48) with the named
# change.
ENV14 = f"{ENV13} TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48 LOGIT_SOFTCAP=20"
H200_RUNS += [
    ("cap20s42", f"trains: {R64}, LOGIT_SOFTCAP=20 SEED=42", "022dc7c", ""),
    ("qramps42", f"trains: {R64}, QAT_RAMP_FRAC=0.1 SEED=42", "022dc7c", ""),
    ("capramp", f"trains: {R64}, LOGIT_SOFTCAP=20 QAT_RAMP_FRAC=0.1", "022dc7c", ""),
    ("capramps42", f"trains: {R64}, LOGIT_SOFTCAP=20 QAT_RAMP_FRAC=0.1 SEED=42", "022dc7c", ""),
    ("eq4", f"trains: {R64}, EXPORT_EMBED=int4 EMBED_QAT=1", "022dc7c", ""),
    ("l11eq4", f"trains: {R64}, NUM_LAYERS=11 EXPORT_EMBED=int4 EMBED_QAT=1", "022dc7c", ""),
    ("cap20s42_env", ENV14, "022dc7c", "cap20s42"),
    ("cap20s42_d32c40", f"{ENV14}, TTT_LORA_CHUNK=40", "022dc7c", "cap20s42"),
    ("cap20s42_d24c48", f"{ENV14}, TTT_LORA_DOCS=24", "022dc7c", "cap20s42"),
]
H200_S15 = HERE / "h200_2026-11-30_s15"
# session 16 (h200_2026-11-30_s16/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s16.toml s16`, three calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at 2f0f631); every row is session 15's default (r64's with
# LOGIT_SOFTCAP=20 QAT_RAMP_FRAC=0.1) with the named changes; t150old is session 14's default at 150 s.
S15 = f"{R64}, LOGIT_SOFTCAP=20 QAT_RAMP_FRAC=0.1"
H200_RUNS += [
    ("cap15", f"trains: {S15}, LOGIT_SOFTCAP=15", "2f0f631", ""),
    ("ramp2", f"trains: {S15}, QAT_RAMP_FRAC=0.2", "2f0f631", ""),
    ("cap15s42", f"trains: {S15}, LOGIT_SOFTCAP=15 SEED=42", "2f0f631", ""),
    ("cap10", f"trains: {S15}, LOGIT_SOFTCAP=10", "2f0f631", ""),
    ("t150", f"trains 150 s: {S15}, LOGIT_SOFTCAP=15", "2f0f631", ""),
    ("t150old", f"trains 150 s: {S15}, LOGIT_SOFTCAP=30 QAT_RAMP_FRAC=0", "2f0f631", ""),
]
H200_S16 = HERE / "h200_2026-11-30_s16"
# session 17 (h200_2026-11-30_s17/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s17.toml s17`, two calls on
# nvidia-h200-x2, two rows side by side; train_gpt.py as at 5c5059e); every training row is session 16's default
# (session 15's with LOGIT_SOFTCAP=15) with the named change. d16s2024_env loads d16s2024's checkpoint and runs
# best_known_competition.env's LoRA pipeline (ENV14's, at the checkpoint's softcap 15).
S16 = f"{S15}, LOGIT_SOFTCAP=15"
H200_RUNS += [
    ("d16s2024", f"trains: {S16}, SEED=2024", "5c5059e", ""),
    ("wdcos", f"trains: {S16}, WARMDOWN_SHAPE=cosine", "5c5059e", ""),
    ("zloss", f"trains: {S16}, Z_LOSS=0.0001", "5c5059e", ""),
    ("clip1", f"trains: {S16}, GRAD_CLIP_NORM=1.0", "5c5059e", ""),
    ("d16s2024_env", f"{ENV13} TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48 LOGIT_SOFTCAP=15", "5c5059e", "d16s2024"),
]
H200_S17 = HERE / "h200_2026-11-30_s17"
# session 18 (h200_2026-11-30_s18/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s18.toml s18`, three calls
# on nvidia-h200-x2, the first with GPUS=0 while GPU 1 profiled; train_gpt.py as at 3086bfe); every row is session
# 16's default with the named change.
H200_RUNS += [
    ("elr04", f"trains: {S16}, EMBED_LR=0.04", "3086bfe", ""),
    ("xsak", f"trains: {S16}, XSA_KERNEL=1", "3086bfe", ""),
    ("elr01", f"trains: {S16}, EMBED_LR=0.01", "3086bfe", ""),
    ("xsaks42", f"trains: {S16}, XSA_KERNEL=1 SEED=42", "3086bfe", ""),
    ("elr01s42", f"trains: {S16}, EMBED_LR=0.01 SEED=42", "3086bfe", ""),
]
H200_S18 = HERE / "h200_2026-11-30_s18"
# session 19 (h200_2026-11-30_s19/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s19.toml s19` with GPUS=0,
# on nvidia-h200-x2 while the other GPU profiled or stood idle); every training row is session 16's default with the
# named change. xsaqk_sincos ran QK_NORM_KERNEL's first kernels (sin and cos per element, 6213729's train_gpt.py,
# the same as 1cce632's); xsaqk its kernels with cos/sin tables (8226c42). The _env rows load their checkpoint and run
# best_known_competition.env's LoRA pass with both kernels.
ENV19 = f"{ENV13} TTT_LORA_DOCS=32 TTT_LORA_CHUNK=48 LOGIT_SOFTCAP=15 XSA_KERNEL=1 QK_NORM_KERNEL=1"
H200_RUNS += [
    ("xsaqk_sincos", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 (sin and cos in the kernel)", "6213729", ""),
    ("xsaqk_sincos_env", ENV19, "6213729", "xsaqk_sincos"),
    ("xsaqk", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1", "8226c42", ""),
    ("xsaqk_env", ENV19, "8226c42", "xsaqk"),
]
H200_S19 = HERE / "h200_2026-11-30_s19"
# session 20 (h200_2026-11-30_s20/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s20.toml s20` at e20592f
# (CE_KERNEL's and COMBO_KERNELS's knobs added, both off) and `... recipe_s20b.toml s20b` at 2bf22e5, on nvidia-h200-x2, two rows side by side);
# every row is session 16's default with the named change: the env's training recipe on two more seeds, then
# CE_KERNEL's second kernels, alone and with COMPILE_MODE=reduce-overhead, at seed 1337.
H200_RUNS += [
    ("xsaqks42", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 SEED=42", "e20592f", ""),
    ("xsaqks2024", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 SEED=2024", "e20592f", ""),
    ("xsaqkce", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1", "2bf22e5", ""),
    ("xsaqkce_ro", f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1 COMPILE_MODE=reduce-overhead",
     "2bf22e5", ""),
]
H200_S20 = HERE / "h200_2026-11-30_s20"
# session 21 (h200_2026-11-30_s21/: `bash scripts/sweep_device.sh scripts/sweeps/recipe_s21.toml s21` at eecc433,
# `... recipe_s21b.toml s21b` at fefd8f7 and `... recipe_s21c.toml s21c` at 97fae6b (train_gpt.py as at c969e87, which
# added MLP_KERNEL), on nvidia-h200-x2, two rows side by side): session 16's default with the env's kernels, CE_KERNEL
# on two more seeds, then MLP_KERNEL on three seeds and once with COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32.
XSAQKCE = f"trains: {S16}, XSA_KERNEL=1 QK_NORM_KERNEL=1 CE_KERNEL=1"
H200_RUNS += [
    ("xsaqkces42", f"{XSAQKCE} SEED=42", "eecc433", ""),
    ("xsaqkces2024", f"{XSAQKCE} SEED=2024", "eecc433", ""),
    ("mlpk", f"{XSAQKCE} MLP_KERNEL=1", "fefd8f7", ""),
    ("mlpks42", f"{XSAQKCE} MLP_KERNEL=1 SEED=42", "fefd8f7", ""),
    ("mlpks2024", f"{XSAQKCE} MLP_KERNEL=1 SEED=2024", "97fae6b", ""),
    ("mlpkro32", f"{XSAQKCE} MLP_KERNEL=1 COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32", "97fae6b", ""),
]
H200_S21 = HERE / "h200_2026-11-30_s21"
# session 22 (h200_2026-11-30_s22/, nvidia-h200-x2, two rows side by side): MLP_KERNEL's persistent TMA kernel.
# `bash scripts/sweep_device.sh scripts/sweeps/recipe_s22.toml s22` on one host (its train_gpt.py: 7f38d70's code with a
# longer docstring), then the tma150 rows for 150 s on the machine of a later lease (calls/call4.sh, at 7f38d70),
# where the same code trained 2 and 9% faster.
H200_RUNS += [
    ("tma", f"{XSAQKCE} MLP_KERNEL=1 (persistent TMA kernel)", "7f38d70", ""),
    ("tmaro32", f"{XSAQKCE} MLP_KERNEL=1 COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32 (persistent TMA kernel)",
     "7f38d70", ""),
    ("tma150g0", f"{XSAQKCE} MLP_KERNEL=1 MAX_WALLCLOCK_SECONDS=150, a later lease, GPU 0", "7f38d70", ""),
    ("tma150g1", f"{XSAQKCE} MLP_KERNEL=1 MAX_WALLCLOCK_SECONDS=150, a later lease, GPU 1", "7f38d70", ""),
]
H200_S22 = HERE / "h200_2026-11-30_s22"
# session 23 (h200_2026-11-30_s23/, nvidia-h200-x2, two rows side by side, one host for all six; profiles of 90f5fe0 in
# profile_call6/ and profile_call7/, no rows):
# `bash scripts/sweep_device.sh scripts/sweeps/recipe_s23.toml s23` over three calls (train_gpt.py as at 7130363, which
# compiles MUON_FUSED with inductor's loop reordering off). GPU 0: fused, base, fuseds2024; GPU 1: fuseds42, bases42,
# fuseds7.
TMA = f"{XSAQKCE} MLP_KERNEL=1"
H200_RUNS += [
    ("fused", f"{TMA} MUON_FUSED=1", "7130363", ""),
    ("base", f"{TMA} (the env's recipe before MUON_FUSED)", "7130363", ""),
    ("bases42", f"{TMA} SEED=42", "7130363", ""),
    ("fuseds42", f"{TMA} MUON_FUSED=1 SEED=42", "7130363", ""),
    ("fuseds2024", f"{TMA} MUON_FUSED=1 SEED=2024", "7130363", ""),
    ("fuseds7", f"{TMA} MUON_FUSED=1 SEED=7", "7130363", ""),
]
H200_S23 = HERE / "h200_2026-11-30_s23"
# session 24 (h200_2026-12-01_s24/, nvidia-h200: one GPU, one row at a time, one lease for all three):
# `GPUS=0 CALL_SECONDS=580 bash scripts/sweep_device.sh scripts/sweeps/recipe_s24.toml s24` over three calls, at 2f2985d
# (Newton-Schulz's a x folded into its small factor, Muon's decay into MUON_FUSED's parameter step).
H200_RUNS += [
    ("nsfold", f"{TMA} MUON_FUSED=1 (Newton-Schulz and decay folded)", "2f2985d", ""),
    ("nsfoldro32", f"{TMA} MUON_FUSED=1 COMPILE_MODE=reduce-overhead TRAIN_SYNC_EVERY=32 (folded)", "2f2985d", ""),
    ("nsfolds42", f"{TMA} MUON_FUSED=1 SEED=42 (folded)", "2f2985d", ""),
]
H200_S24 = HERE / "h200_2026-12-01_s24"
# session 25 (h200_2026-12-01_s25/, nvidia-h200: one GPU, one row at a time), at 1e856e4 (ATTN_GATE as a knob, off):
# `GPUS=0 CALL_SECONDS=580 bash scripts/sweep_device.sh scripts/sweeps/recipe_s25.toml s25` over two calls of one lease
# (gate, then base: its log is s25base.txt, as session 23 has a base), then
# `GPUS=0 CALL_SECONDS=590 ROW_SECONDS=270 bash scripts/sweep_device.sh scripts/sweeps/recipe_s25_t150.toml s25t150` in
# one call on a second lease (gate150, base150).
H200_RUNS += [
    ("gate", f"{TMA} MUON_FUSED=1 ATTN_GATE=1", "1e856e4", ""),
    ("s25base", f"{TMA} MUON_FUSED=1 (the env's recipe, after gate on its machine)", "1e856e4", ""),
    ("gate150", f"{TMA} MUON_FUSED=1 ATTN_GATE=1 MAX_WALLCLOCK_SECONDS=150, a second lease", "1e856e4", ""),
    ("base150", f"{TMA} MUON_FUSED=1 MAX_WALLCLOCK_SECONDS=150, after gate150 on its machine", "1e856e4", ""),
]
H200_S25 = HERE / "h200_2026-12-01_s25"
# session 26 (h200_2026-12-01_s26/, nvidia-h200: one GPU, one row at a time), at 494ea18 (train_gpt.py as 511ed33):
# `GPUS=0 CALL_SECONDS=580 bash scripts/sweep_device.sh scripts/sweeps/recipe_s26.toml s26`, four calls of one lease.
H200_RUNS += [
    ("rownorm", f"{TMA} MUON_FUSED=1 MUON_ROW_NORM=1", "494ea18", ""),
    ("scalar04", f"{TMA} MUON_FUSED=1 SCALAR_LR=0.04", "494ea18", ""),
    ("s26base", f"{TMA} MUON_FUSED=1 (the env's recipe, MUON_ROW_NORM off as it then was, after rownorm and "
                "scalar04 on their machine)", "494ea18", ""),
    ("rownorms42", f"{TMA} MUON_FUSED=1 MUON_ROW_NORM=1 SEED=42", "494ea18", ""),
]
H200_S26 = HERE / "h200_2026-12-01_s26"
H200_X2 = (H200_S7, H200_S8, H200_S9, H200_S10, H200_S11, H200_S12, H200_S13, H200_S14,
           H200_S15, H200_S16, H200_S17, H200_S18, H200_S19, H200_S20, H200_S21,
           H200_S22, H200_S23)  # two runs side by side, nvidia-h200-x2
RECIPE_ONLY = {"s2k_train", "q6_train", "ema_train", "lr45_train", "mb_train", "b131s42_train", "b65s42", "b32",
               "b65lr2", "b65wd5", "b65emat", "b65sync8", "r65s42", "r65lr4", "r65qk5", "r65mwd", "m65s2024", "m65wd8",
               "m65wd2", "m65eq", "d65s7", "m65hd128s42", "m65mom97", "m65wd25",
               "h128s2024", "h128fp8", "h128rope64", "h128rope32", "h128qs2",
               "r64s2024", "r32s42", "r16", "r64rb50k", "h256r64", "r64qs45",
               "r64", "r64s42", "leaky", "gs64", "qramp", "cap20", "cap20s42", "qramps42", "capramp", "capramps42",
               "cap15", "ramp2", "cap15s42", "cap10", "d16s2024", "wdcos", "zloss", "clip1",
               "elr04", "xsak", "elr01", "xsaks42", "elr01s42", "xsaqk_sincos", "xsaqk",
               "xsaqks42", "xsaqks2024", "xsaqkce", "xsaqkce_ro",
               "xsaqkces42", "xsaqkces2024", "mlpk", "mlpks42", "mlpks2024", "mlpkro32",
               "tma", "tmaro32", "tma150g0", "tma150g1", "fused", "base", "bases42", "fuseds42", "fuseds2024", "fuseds7",
               "nsfold", "nsfoldro32", "nsfolds42", "gate", "s25base", "gate150", "base150",
               "rownorm", "scalar04", "s26base", "rownorms42"}  # not in the plot:
# same parameters and bytes as c3, only the recipe differs
LABELS = {"c1_train": ", fp16", "c2_train": ", fp16", "c2_int8": ", int8", "c3_train": ", MLP 4", "c4_train": ", MLP 4",
          "c5_train": ", q,k int4",
          "b131_train": ", MLP 4, batch 131K", "b65_train": ", MLP 4, batch 65K",
          "b65log8": ", MLP 4, batch 65K, log8 scales", "b65def": ", MLP 3, no FP phase, batch 65K",
          "r65": ", MLP 4, batch 65K, log8 scales", "m65m3": ", MLP 3, batch 65K, log8 scales, MUON_WD",
          "m65s42": ", MLP 4, batch 65K, log8 scales, MUON_WD: the recipe of session 10",
          "r65kv6": ", MLP 4, 6 kv heads, batch 65K, log8 scales",
          "m65m3s42": ", MLP 3, seed 42", "m65hd128": ", head dim 128: the recipe of session 11",
          "h128rope64s42": ", RoPE on 64 of 128 dims: the recipe of session 12"}
H200_KEYS = ["run", "what", "commit", "machine", "checkpoint_of", "seed", "final_val_bpb", "delta_vs_c1_train", "stride",
             "pre_export_val_bpb", "steps", "tok_s", "params", "model_bytes", "total_bytes", "final_eval_s",
             "challenge_eval_s"]


def h200_table():
    """recipe_h200.md / .csv: one row per log of h200_2026-11-29/, deltas against the default's sliding score."""
    rows = []
    for run, what, commit, ckpt in H200_RUNS:
        row = {"run": run, "what": what, "commit": commit, "checkpoint_of": ckpt}
        path = find_log(run, (H200, H200_S6) + H200_X2 + (H200_S24, H200_S25, H200_S26))
        row["machine"] = "nvidia-h200-x2 (two runs side by side)" if path.parent in H200_X2 else "nvidia-h200"
        rows.append({**row, **cells(read_run_log(path), [k for k in H200_KEYS if k not in row])})
    base = float(rows[0]["final_val_bpb"])
    for r in rows:
        r["delta_vs_c1_train"] = f"{float(r['final_val_bpb']) - base:+.4f}" if r["final_val_bpb"] else ""
    write_table(rows, H200_KEYS, "recipe_h200")
    return rows


def capacity_plot(rows):
    """bytes_vs_bpb_h200.png: final (sliding, stride 64) val_bpb against total artifact bytes of the sliding-scored
    rows, with the cap marked (issue 13)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["stride"] == "64" and not r["run"].startswith("t150") and r["run"] not in RECIPE_ONLY
           and (r["checkpoint_of"] == "" or r["run"].endswith("_int8"))]  # trained models, and c2 exported in int8
    fig, ax = plt.subplots(figsize=(12, 7))
    for r in pts:
        x, y = int(r["total_bytes"]) / 1e6, float(r["final_val_bpb"])
        ax.scatter(x, y)
        ax.annotate(f"{r['run']} ({int(r['params']) / 1e6:.1f}M params{LABELS.get(r['run'], '')})", (x, y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(16.0, color="red", linestyle="--", label="cap 16,000,000 B")
    ax.set_xlabel("total artifact bytes (MB, brotli q5, unextracted code)")
    ax.set_ylabel("final val_bpb (sliding, stride 64)")
    ax.set_title("golf-proxy-300 on one H200, 2026-11-29 and 30")
    ax.legend(loc="upper right")
    ax.set_xlim(12.5, 18.5)
    fig.tight_layout()
    fig.savefig(HERE / "bytes_vs_bpb_h200.png", dpi=120)


if __name__ == "__main__":
    main()
    capacity_plot(h200_table())
