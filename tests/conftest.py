"""Shared fixtures: tiny challenge-format shards built from the embedded sample with the project's own script,
and helpers that run train_gpt.py as a subprocess with a tiny CPU configuration."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# XSA_KERNEL's Triton kernels run on this CPU under Triton's interpreter. Triton reads the switch when it first
# defines a kernel, its own library's included (tl.sum is one), so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
SAMPLE = ROOT / "data" / "sample"
TOKENIZER = str(SAMPLE / "fineweb_1024_bpe.model")

TINY = dict(
    VOCAB_SIZE="1024", TOKENIZER_PATH=TOKENIZER, NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    MLP_MULT="2", EMBED_DIM="32", GROUP_SIZE="32", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024",
    MAX_WALLCLOCK_SECONDS="0", COMPILE_WARMUP_STEPS="0", COMPILE="0", WARMUP_STEPS="2", TRAIN_LOG_EVERY="1",
    MAX_VAL_TOKENS="4096", VAL_BATCH_TOKENS="1024", BROTLI_QUALITY="1", DEVICE="cpu", SEED="7",
    # lossless float export, so that the tests of exact round trips hold; the int formats (the default) have their own
    EXPORT_EMBED="fp16", EXPORT_FLOAT="fp16",
)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Directory with fineweb_train_000000..N and fineweb_val_000000 built from the sample (sp1024)."""
    import build_shards as bs

    out = tmp_path_factory.mktemp("shards")
    bs.build_shards(str(SAMPLE / "train_docs.jsonl.xz"), "train", TOKENIZER, str(out), shard_tokens=60_000,
                    workers=1, max_docs=60)
    bs.build_shards(str(SAMPLE / "val_docs.jsonl.xz"), "val", TOKENIZER, str(out), workers=1, max_docs=6)
    return out


def run_train(shards_dir, workdir, nproc=1, script=None, timeout=600, **overrides):
    """Runs train_gpt.py, or `script` (under torchrun when nproc > 1); returns the CompletedProcess. Logs go to
    workdir."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY, DATA_PATH=str(shards_dir), LOG_DIR=str(Path(workdir) / "logs"),
               ARTIFACT_PATH=str(Path(workdir) / "model.ptz"), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    script = str(script or ROOT / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def log_values(text, key):
    """Every value of `key:` in a log text, as floats, in order."""
    import re

    return [float(v) for v in re.findall(rf"\b{re.escape(key)}:([-+0-9.eE]+)", text)]


def event_bpb(text, event):
    """val_bpb of the first `event` line (e.g. pre_export, final_roundtrip) in a log text."""
    return log_values(text.split(event, 1)[1], "val_bpb")[0]
