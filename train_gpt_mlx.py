"""MLX port of train_gpt.py (Apple silicon, or `pip install "mlx[cpu]"` on Linux): same config, data, model,
optimizers, BPB accounting, log lines and artifact format, so a Mac run means the same thing as an H100 run.

Needs numpy, mlx, sentencepiece and brotli; no torch. Ported: ternary STE layers, the U-Net GPT with the
default-on components (XSA, value residual, SmearGate; each can still be switched off), Muon + Adam, the FP
phase (FP_PHASE: unquantized latent weights, then the ternary quantizer blended in), wall-clock stop, export.
The other architecture flags of train_gpt.py (SKC, capsules, MoE, ...) are not ported: turning one on is a
ConfigError. Single process only (no DDP): WORLD_SIZE must be 1.
An artifact written here is scored by train_gpt.py's loader, and a CUDA-trained artifact loads here.
Launch: `./run_mlx_reasoner.sh` (Mac defaults) or `python3 train_gpt_mlx.py` with train_gpt.py's env vars.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad environment value; the message names the variable."""


class Knob:
    """One environment variable: its name, type and default. Read once by Hyperparameters."""

    def __init__(self, name, default, kind=None, check=None, choices=None):
        self.name, self.default, self.kind = name, default, kind or type(default)
        self.check, self.choices = check, choices

    def read(self, environ):
        raw = environ.get(self.name)
        if raw is None or raw == "":
            value = self.default
        else:
            try:
                value = self._parse(raw)
            except ValueError:
                raise ConfigError(f"{self.name}={raw!r} is not a valid {self.kind.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.name}={value!r} must be one of {sorted(self.choices)}")
        if self.check is not None and not self.check[0](value):
            raise ConfigError(f"{self.name}={value!r} {self.check[1]}")
        return value

    def _parse(self, raw):
        if self.kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return self.kind(raw)


HYBRID_NAMES = ("q", "k", "v", "proj", "up", "down")  # train_gpt.py's HYBRID_FAMILIES choices
POS = (lambda v: v > 0, "must be > 0")
NONNEG = (lambda v: v >= 0, "must be >= 0")
UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
UNIT_OPEN = (lambda v: 0 <= v < 1, "must be in [0, 1)")

# train_gpt.py switches this port does not implement, with the value that means "off". Their knobs (and the knobs
# that only tune them) are still read, so the config line and the env var names stay the same as train_gpt.py's.
UNPORTED = {
    "skc_enabled": False, "parallel_residual": False, "shared_blocks": False, "depth_recur": False,
    "capsules_enabled": False, "feedback_enabled": False, "engram_enabled": False, "moe_enabled": False,
    "world_size": 1, "eval_stride": 0, "temperature_search": False, "ttt_enabled": False, "eval_engram": False,
    "eval_doc_isolated": False,
    "ternary_calib": False, "checkpoint_save": False, "eval_from_checkpoint": False,
    "embed_qat": False, "scale_format": "fp16", "hybrid_int": False, "attn_gate": False,
}


class Hyperparameters:
    # data and run
    data_path = Knob("DATA_PATH", "./data/datasets/fineweb10B_sp8192")
    tokenizer_path = Knob("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model")
    vocab_size = Knob("VOCAB_SIZE", 8192, check=POS)
    run_id = Knob("RUN_ID", "ternary")
    log_dir = Knob("LOG_DIR", "logs")
    seed = Knob("SEED", 1337)
    device = Knob("DEVICE", "auto", choices={"auto", "cuda", "cpu"})  # auto: MLX's default (the GPU on a Mac)
    compile = Knob("COMPILE", "auto", choices={"auto", "1", "0"})  # auto: mx.compile the step on the GPU only
    compile_mode = Knob("COMPILE_MODE", "default", choices={"default", "max-autotune-no-cudagraphs", "max-autotune",
                                                            "reduce-overhead"})  # read, unused: torch.compile's
    combo_kernels = Knob("COMBO_KERNELS", False)  # read, unused: torch.compile's
    world_size = Knob("WORLD_SIZE", 1, check=POS)  # single process: must stay 1
    rank = Knob("RANK", 0, check=NONNEG)
    local_rank = Knob("LOCAL_RANK", 0, check=NONNEG)
    # training length and batch
    iterations = Knob("ITERATIONS", 20000, check=POS)
    max_wallclock_seconds = Knob("MAX_WALLCLOCK_SECONDS", 600.0, check=NONNEG)
    train_batch_tokens = Knob("TRAIN_BATCH_TOKENS", 524288, check=POS)
    train_seq_len = Knob("TRAIN_SEQ_LEN", 1024, check=POS)
    grad_accum_steps = Knob("GRAD_ACCUM_STEPS", 1, check=POS)
    warmup_steps = Knob("WARMUP_STEPS", 20, check=NONNEG)
    warmdown_frac = Knob("WARMDOWN_FRAC", 0.35, check=UNIT)
    warmdown_shape = Knob("WARMDOWN_SHAPE", "linear", choices={"linear", "cosine"})
    warmdown_min_lr = Knob("WARMDOWN_MIN_LR", 0.0, check=UNIT_OPEN)
    compile_warmup_steps = Knob("COMPILE_WARMUP_STEPS", 10, check=NONNEG)  # read, unused: MLX compiles lazily
    train_sync_every = Knob("TRAIN_SYNC_EVERY", 8, check=POS)  # read, unused: the MLX loop times each step itself
    train_log_every = Knob("TRAIN_LOG_EVERY", 25, check=POS)
    # evaluation
    val_loss_every = Knob("VAL_LOSS_EVERY", 0, check=NONNEG)
    val_batch_tokens = Knob("VAL_BATCH_TOKENS", 131072, check=POS)
    max_val_tokens = Knob("MAX_VAL_TOKENS", 0, check=NONNEG)
    # train_gpt.py's evaluation stages: read for the same config line, refused when on (UNPORTED)
    eval_stride = Knob("EVAL_STRIDE", 0, check=NONNEG)  # final scores in windows every EVAL_STRIDE tokens; 0: disjoint
    eval_doc_isolated = Knob("EVAL_DOC_ISOLATED", False)  # final scores: no window reaches back across a BOS
    temperature_search = Knob("TEMPERATURE_SEARCH", False)  # logit temperature fitted on training tokens, exported
    temperature_tokens = Knob("TEMPERATURE_TOKENS", 262144, check=POS)  # from the first training shard
    eval_budget_seconds = Knob("EVAL_BUDGET_SECONDS", 0.0, check=NONNEG)  # 0: none; past it TTT stops adapting
    # ternary calibration: per-tensor threshold and scale multipliers that minimise the quantized model's loss
    ternary_calib = Knob("TERNARY_CALIB", False)
    calib_tokens = Knob("CALIB_TOKENS", 65536, check=POS)  # from the first training shard
    calib_max_evals = Knob("CALIB_MAX_EVALS", 200, check=POS)
    calib_seconds = Knob("CALIB_SECONDS", 60.0, check=POS)
    calib_at_frac = Knob("CALIB_AT_FRAC", 1.0, check=UNIT)  # < 1: calibrate then, train on with it (export-aligned)
    # test-time training: legal score-first adaptation on the validation stream
    ttt_enabled = Knob("TTT_ENABLED", False)
    ttt_scope = Knob("TTT_SCOPE", "safe", choices={"safe", "capsule_bank", "all"})  # which parameters adapt
    ttt_chunk_tokens = Knob("TTT_CHUNK_TOKENS", 32768, check=POS)  # also EvalEngram's insertion step
    ttt_lr = Knob("TTT_LR", 0.001, check=POS)
    ttt_momentum = Knob("TTT_MOMENTUM", 0.9, check=UNIT_OPEN)
    ttt_epochs = Knob("TTT_EPOCHS", 1, check=POS)
    ttt_mode = Knob("TTT_MODE", "sgd", choices={"sgd", "lora"})
    ttt_lora_rank = Knob("TTT_LORA_RANK", 8, check=POS)
    ttt_lora_lr = Knob("TTT_LORA_LR", 0.003, check=POS)
    ttt_lora_beta1 = Knob("TTT_LORA_BETA1", 0.0, check=UNIT_OPEN)
    ttt_lora_beta2 = Knob("TTT_LORA_BETA2", 0.999, check=UNIT_OPEN)
    ttt_lora_wd = Knob("TTT_LORA_WD", 0.5, check=NONNEG)
    ttt_lora_targets = Knob("TTT_LORA_TARGETS", "q,v,head")
    ttt_lora_chunk = Knob("TTT_LORA_CHUNK", 256, check=POS)
    ttt_lora_docs = Knob("TTT_LORA_DOCS", 64, check=POS)
    ttt_lora_span = Knob("TTT_LORA_SPAN", 0, check=NONNEG)
    ttt_lora_global = Knob("TTT_LORA_GLOBAL", False)
    ttt_lora_global_lr = Knob("TTT_LORA_GLOBAL_LR", 0.001, check=POS)
    ttt_lora_warm_a = Knob("TTT_LORA_WARM_A", False)
    ttt_lora_bucket = Knob("TTT_LORA_BUCKET", False)
    ttt_lora_no_cudnn = Knob("TTT_LORA_NO_CUDNN", False)
    ttt_lora_global_rank = Knob("TTT_LORA_GLOBAL_RANK", 0, check=NONNEG)
    ttt_lora_global_targets = Knob("TTT_LORA_GLOBAL_TARGETS", "")
    # EvalEngram: an n-gram cache of already-scored validation tokens blended into the model's distribution
    eval_engram = Knob("EVAL_ENGRAM", False)
    eval_engram_order = Knob("EVAL_ENGRAM_ORDER", 3, check=(lambda v: v >= 2, "must be >= 2"))  # context n-1
    eval_engram_buckets = Knob("EVAL_ENGRAM_BUCKETS", 1 << 15, check=POS)  # context rows of V counts each
    eval_engram_alpha = Knob("EVAL_ENGRAM_ALPHA", 0.01, check=POS)  # Laplace smoothing
    eval_engram_weight = Knob("EVAL_ENGRAM_WEIGHT", 0.3, check=UNIT)  # cache share at maximal model entropy
    # model
    num_layers = Knob("NUM_LAYERS", 10, check=POS)
    model_dim = Knob("MODEL_DIM", 768, check=POS)
    num_heads = Knob("NUM_HEADS", 6, check=POS)  # head dim 128 (s11: 0.0019 better on two seeds, 2% faster)
    num_kv_heads = Knob("NUM_KV_HEADS", 2, check=POS)
    mlp_mult = Knob("MLP_MULT", 4.0, check=POS)  # train_gpt.py's: 4 with FP_PHASE won on the H200 proxy (session 8)
    mlp_act = Knob("MLP_ACT", "relu2", choices={"relu2", "leaky_relu2"})
    embed_dim = Knob("EMBED_DIM", 256, check=NONNEG)  # 0: no bottleneck, embedding width = MODEL_DIM
    group_size = Knob("GROUP_SIZE", 128, check=POS)
    rope_base = Knob("ROPE_BASE", 10000.0, check=POS)
    # channels of each head that RoPE rotates, 0: all. 64 of 128 (s12: 1.2872 / 1.2849 on two seeds against full
    # RoPE's 1.2929 / 1.2937); a head narrower than the default rotates whole
    rope_dims = Knob("ROPE_DIMS", 64, check=NONNEG)
    qk_gain_init = Knob("QK_GAIN_INIT", 1.5, check=POS)
    logit_softcap = Knob("LOGIT_SOFTCAP", 15.0, check=NONNEG)  # 0: off (s15: 20 beat 30, s16: 15 beat 20, two seeds each)
    z_loss = Knob("Z_LOSS", 0.0, check=NONNEG)
    fused_loss = Knob("FUSED_LOSS", False)  # read, unused: a CUDA throughput path; MLX differentiates the loss itself
    tied_embed_init_std = Knob("TIED_EMBED_INIT_STD", 0.02, check=POS)
    attn_impl = Knob("ATTN_IMPL", "auto", choices={"auto", "sdpa", "fa3", "fa2"})  # read, unused: mx.fast SDPA
    fused_qkv = Knob("FUSED_QKV", False)  # read, unused: a CUDA throughput path (one q/k/v GEMM)
    bos_id = Knob("BOS_ID", 1, check=NONNEG)  # document-start token of the shards (SmearGate masks it)
    # architecture family: the UNPORTED ones must stay off here
    skc_enabled = Knob("SKC_ENABLED", False)
    skc_pattern = Knob("SKC_PATTERN", "AS", check=(lambda v: v and set(v) <= {"A", "S"}, "must be a string of A and S"))
    skc_chunk = Knob("SKC_CHUNK", 64, check=POS)
    parallel_residual = Knob("PARALLEL_RESIDUAL", False)
    shared_blocks = Knob("SHARED_BLOCKS", False)
    shared_block_count = Knob("SHARED_BLOCK_COUNT", 5, check=POS)
    depth_recur = Knob("DEPTH_RECUR", False)
    recur_start = Knob("RECUR_START", 3, check=NONNEG)
    recur_end = Knob("RECUR_END", 6, check=POS)
    recur_from_frac = Knob("RECUR_FROM_FRAC", 0.5, check=UNIT_OPEN)
    capsules_enabled = Knob("CAPSULES_ENABLED", False)
    capsule_count = Knob("CAPSULE_COUNT", 4, check=POS)
    capsule_dim = Knob("CAPSULE_DIM", 64, check=POS)
    capsule_rank = Knob("CAPSULE_RANK", 4, check=POS)
    capsule_chunk = Knob("CAPSULE_CHUNK", 64, check=POS)
    capsule_layer = Knob("CAPSULE_LAYER", 4, check=NONNEG)
    capsule_consistency = Knob("CAPSULE_CONSISTENCY", 0.01, check=NONNEG)
    capsule_max_decay = Knob("CAPSULE_MAX_DECAY", 0.995, check=UNIT_OPEN)
    feedback_enabled = Knob("FEEDBACK_ENABLED", False)
    feedback_passes = Knob("FEEDBACK_PASSES", 2, check=(lambda v: v >= 2, "must be >= 2"))
    feedback_halt_tol = Knob("FEEDBACK_HALT_TOL", 0.0, check=NONNEG)
    engram_enabled = Knob("ENGRAM_ENABLED", False)
    engram_orders = Knob("ENGRAM_ORDERS", "2,3", check=(lambda v: all(o.strip().isdigit() and int(o) >= 1 for o in v.split(",")), "must be a comma list of n-gram orders >= 1"))
    engram_heads = Knob("ENGRAM_HEADS", 2, check=POS)
    engram_buckets = Knob("ENGRAM_BUCKETS", 2048, check=POS)
    engram_dim = Knob("ENGRAM_DIM", 32, check=POS)
    engram_layer = Knob("ENGRAM_LAYER", 0, check=NONNEG)
    engram_scale = Knob("ENGRAM_SCALE", 1.0, check=POS)
    moe_enabled = Knob("MOE_ENABLED", False)
    moe_experts = Knob("MOE_EXPERTS", 3, check=POS)
    moe_top_k = Knob("MOE_TOP_K", 1, check=POS)
    moe_balance = Knob("MOE_BALANCE", 0.01, check=NONNEG)
    xsa_enabled = Knob("XSA_ENABLED", True)  # exclusive self-attention
    xsa_kernel = Knob("XSA_KERNEL", False)  # read, unused: a CUDA throughput path (Triton kernels)
    qk_norm_kernel = Knob("QK_NORM_KERNEL", False)  # read, unused: a CUDA throughput path (Triton kernels)
    ce_kernel = Knob("CE_KERNEL", False)  # read, unused: a CUDA throughput path (Triton kernels)
    mlp_kernel = Knob("MLP_KERNEL", False)  # read, unused: a CUDA throughput path (Triton kernels)
    value_residual = Knob("VALUE_RESIDUAL", True)
    attn_gate = Knob("ATTN_GATE", False)  # train_gpt.py's gated attention: read, refused when on (UNPORTED)
    smear_gate = Knob("SMEAR_GATE", True)
    layer_scale = Knob("LAYER_SCALE", False)  # residual branch scales start at LAYER_SCALE_INIT instead of 1
    layer_scale_init = Knob("LAYER_SCALE_INIT", 0.1, check=POS)
    # optimizer
    matrix_lr = Knob("MATRIX_LR", 0.03, check=POS)
    embed_lr = Knob("EMBED_LR", 0.02, check=POS)
    scalar_lr = Knob("SCALAR_LR", 0.02, check=POS)
    muon_momentum = Knob("MUON_MOMENTUM", 0.95, check=UNIT_OPEN)
    muon_momentum_warmup_start = Knob("MUON_MOMENTUM_WARMUP_START", 0.85, check=UNIT_OPEN)
    muon_momentum_warmup_steps = Knob("MUON_MOMENTUM_WARMUP_STEPS", 300, check=NONNEG)
    muon_backend_steps = Knob("MUON_BACKEND_STEPS", 5, check=POS)
    muon_row_norm = Knob("MUON_ROW_NORM", True)  # train_gpt.py's default (its s26 winner)
    muon_batched = Knob("MUON_BATCHED", True)  # train_gpt.py's launch batching: the same update, nothing to port
    muon_fused = Knob("MUON_FUSED", False)  # read, unused: train_gpt.py's compiled update, nothing to port
    muon_wd = Knob("MUON_WD", 0.04, check=NONNEG)  # train_gpt.py's default (its s9 winner)
    adam_beta1 = Knob("ADAM_BETA1", 0.9, check=UNIT_OPEN)
    adam_beta2 = Knob("ADAM_BETA2", 0.95, check=UNIT_OPEN)
    adam_eps = Knob("ADAM_EPS", 1e-8, check=POS)
    adam_wd = Knob("ADAM_WD", 0.0, check=NONNEG)
    grad_clip_norm = Knob("GRAD_CLIP_NORM", 0.0, check=NONNEG)  # 0: off
    fp_phase = Knob("FP_PHASE", True)  # latent weights unquantized until QAT_START_FRAC, then ternary (train_gpt.py's default)
    qat_start_frac = Knob("QAT_START_FRAC", 0.3, check=UNIT_OPEN)
    qat_ramp_frac = Knob("QAT_RAMP_FRAC", 0.1, check=UNIT_OPEN)  # 0: switch at once; else blend in over this fraction
    fp8_matmul = Knob("FP8_MATMUL", False)  # read, unused: a CUDA GEMM (sm90); MLX multiplies in its own precision
    fp8_dgrad = Knob("FP8_DGRAD", False)  # read, unused, as FP8_MATMUL
    fp8_wgrad = Knob("FP8_WGRAD", False)  # read, unused, as FP8_MATMUL
    # export
    artifact_path = Knob("ARTIFACT_PATH", "final_model.ternary.ptz")
    artifact_cap_bytes = Knob("ARTIFACT_CAP_BYTES", 16_000_000, check=POS)
    export_float = Knob("EXPORT_FLOAT", "int8", choices={"fp16", "fp8", "int8", "int6", "int5", "int4"})  # float matrices
    export_embed = Knob("EXPORT_EMBED", "int8", choices={"fp16", "fp8", "int8", "int6", "int5", "int4"})  # tok_emb
    embed_qat = Knob("EMBED_QAT", False)  # train_gpt.py's embedding QAT: read, refused when on (UNPORTED)
    scale_format = Knob("SCALE_FORMAT", "fp16", choices={"fp16", "log8"})  # log8: UNPORTED
    hybrid_int = Knob("HYBRID_INT", False)  # train_gpt.py's int block matrices: read, refused when on (UNPORTED)
    hybrid_families = Knob("HYBRID_FAMILIES", "q,k,v,proj", check=(lambda v: set(v.split(",")) <= set(HYBRID_NAMES), "must be a comma list of q, k, v, proj, up, down"))
    hybrid_bits = Knob("HYBRID_BITS", 6, choices={4, 5, 6, 8})
    brotli_quality = Knob("BROTLI_QUALITY", 11, check=(lambda v: 0 <= v <= 11, "must be in [0, 11]"))
    # train_gpt.py's checkpoint re-scoring: read for the same config line, refused when on (UNPORTED)
    checkpoint_save = Knob("CHECKPOINT_SAVE", False)  # write the float weights after training
    eval_from_checkpoint = Knob("EVAL_FROM_CHECKPOINT", False)  # no training: load them, then calibrate/T/export/score
    checkpoint_path = Knob("CHECKPOINT_PATH", "final_model.float.pt")

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        for attr, knob in vars(Hyperparameters).items():
            if isinstance(knob, Knob):
                setattr(self, attr, knob.read(environ))
        self._check_ported()
        self._check_shapes()

    def _check_ported(self):
        names = self.env_names()
        for attr, off in UNPORTED.items():
            if getattr(self, attr) != off:
                raise ConfigError(f"{names[attr]}={getattr(self, attr)} is not implemented in train_gpt_mlx.py "
                                  f"(only {names[attr]}={off} is); run train_gpt.py for it")
        if self.device == "cuda":
            raise ConfigError("DEVICE=cuda is train_gpt.py's; train_gpt_mlx.py runs on DEVICE=auto (MLX default) or cpu")

    def _check_shapes(self):
        if self.model_dim % self.num_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} is not divisible by NUM_KV_HEADS={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even for RoPE")
        too_wide = self.rope_dims > self.head_dim and self.rope_dims != Hyperparameters.rope_dims.default
        if self.rope_dims % 2 or too_wide:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {self.head_dim}")
        if self.fp_phase and self.qat_start_frac + self.qat_ramp_frac >= 1:
            raise ConfigError(f"QAT_START_FRAC={self.qat_start_frac} + QAT_RAMP_FRAC={self.qat_ramp_frac} must be < 1: "
                              "the run has to end on the ternary quantizer it exports")
        self._check_ternary_widths()

    def _check_ternary_widths(self):
        """train_gpt.py's check for the ported model: every TernaryLinear's input width is whole groups."""
        exact = self.mlp_mult * self.model_dim
        if abs(exact - self.mlp_hidden) > 1e-6:
            raise ConfigError(f"MLP_MULT={self.mlp_mult} x MODEL_DIM={self.model_dim} = {exact:g} is not a whole "
                              "number of hidden units")
        if self.bos_id >= self.vocab_size:
            raise ConfigError(f"BOS_ID={self.bos_id} must be < VOCAB_SIZE={self.vocab_size}")
        widths = {"MODEL_DIM": self.model_dim, "the MLP hidden width MLP_MULT x MODEL_DIM": self.mlp_hidden}
        for what, width in widths.items():
            if width % self.group_size:
                raise ConfigError(f"GROUP_SIZE={self.group_size} does not divide {what}={width}: every ternary "
                                  "matrix's input width must be whole groups")

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    @property
    def rope_rotated(self):  # the default ROPE_DIMS on a narrower head: all of it
        return min(self.rope_dims or self.head_dim, self.head_dim)

    @property
    def mlp_hidden(self):
        return int(round(self.mlp_mult * self.model_dim))

    def as_dict(self):
        return {k: getattr(self, k) for k, v in vars(Hyperparameters).items() if isinstance(v, Knob)}

    def env_names(self):
        return {k: v.name for k, v in vars(Hyperparameters).items() if isinstance(v, Knob)}


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class DataError(ValueError):
    """Bad shard or tokenizer input; the message names the file."""


def read_shard_header(path):
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    ntok = int(header[2])
    if ntok < 0 or size != HEADER_BYTES + 2 * ntok:
        raise DataError(f"{path}: header says {ntok} tokens ({HEADER_BYTES + 2 * ntok} bytes) but file has {size} bytes")
    return ntok


def load_shard(path, vocab_size):
    ntok = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=ntok, offset=HEADER_BYTES)
    if ntok and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[bad])} at position {bad} >= VOCAB_SIZE={vocab_size}")
    return tokens


def shard_files(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no shard matches {pattern}")
    for f in files:
        read_shard_header(f)  # fail fast, before any training, on a corrupt file
    return files


def shard_token_error(path, vocab_size):
    """The problem of one shard's tokens, or None: no tokens at all, or an id >= vocab_size. Reads the file
    through a memory map and one vectorised max (about 0.1 s per 100M tokens once the file is in the page cache)."""
    ntok = read_shard_header(path)
    if ntok == 0:
        return f"{path}: 0 tokens; an empty shard is a failed build (the loader would find nothing in it)"
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))
    if int(tokens.max()) < vocab_size:
        return None
    bad = int(np.argmax(tokens >= vocab_size))
    return f"{path}: token id {int(tokens[bad])} at position {bad} >= VOCAB_SIZE={vocab_size}"


def check_shards(files, vocab_size):
    """Every shard's header and token range, before any training, so that a bad token in the last shard stops the
    run at start rather than minutes in. numpy's max releases the GIL, so a few threads read shards at once.
    Returns the total token count."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = [e for e in pool.map(lambda f: shard_token_error(f, vocab_size), files) if e]
    if errors:
        raise DataError(errors[0] + (f" (and {len(errors) - 1} more bad shards)" if len(errors) > 1 else ""))
    return sum(read_shard_header(f) for f in files)


def load_tokenizer(path, vocab_size):
    import sentencepiece as spm

    if not Path(path).is_file():
        raise DataError(f"{path}: tokenizer model not found (TOKENIZER_PATH)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:  # sentencepiece's own words ("unk is not defined") do not name the file
        raise DataError(f"{path}: not a SentencePiece model (TOKENIZER_PATH; sentencepiece says: {e})") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer vocab {sp.vocab_size()} != VOCAB_SIZE={vocab_size}")
    return sp


TOKENIZER_FINGERPRINT = "tokenizer_fingerprint.json"  # beside the shards; data/build_shards.py writes it


def tokenizer_fingerprint(data_path, tokenizer_path, vocab_size):
    """(sha256 of the TOKENIZER_PATH file, whether DATA_PATH's fingerprint vouches for it). A tokenizer with the
    right vocab size but other pieces gives a silently wrong val_bpb, so the shards' fingerprint must name this
    very file. Shards without one (built before fingerprints) are not refused: the caller warns."""
    digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    path = Path(data_path) / TOKENIZER_FINGERPRINT
    if not path.is_file():
        return digest, False
    try:
        fp = json.loads(path.read_text())
        want, vocab = fp["tokenizer_sha256"], fp["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a tokenizer fingerprint ({type(e).__name__}: {e})") from None
    if (want, vocab) != (digest, vocab_size):
        raise DataError(f"TOKENIZER_PATH={tokenizer_path} (sha256 {digest[:16]}, vocab {vocab_size}) is not the "
                        f"tokenizer that made the shards: {path} says sha256 {want[:16]}, vocab {vocab} "
                        f"({fp.get('tokenizer_file', '?')})")
    return digest, True


def check_data(h, log):
    """Before any training: the tokenizer against the shards' fingerprint, and every shard's header and token
    range (a bad token in a late shard, or an empty shard, would otherwise stop or hang the run minutes in)."""
    digest, vouched = tokenizer_fingerprint(h.data_path, h.tokenizer_path, h.vocab_size)
    log(f"tokenizer path:{h.tokenizer_path} sha256:{digest} vocab:{h.vocab_size} "
        f"fingerprint:{'match' if vouched else 'none'}")
    if not vouched:
        log(f"warning: {Path(h.data_path) / TOKENIZER_FINGERPRINT} is missing, so nothing checks that TOKENIZER_PATH "
            "made these shards (data/build_shards.py and data/cached_challenge_fineweb.py write it)")
    t0 = time.perf_counter()
    files = shard_files(os.path.join(h.data_path, "fineweb_train_*.bin"))
    files += shard_files(os.path.join(h.data_path, "fineweb_val_*.bin"))
    tokens = check_shards(files, h.vocab_size)
    log(f"data_check shards:{len(files)} tokens:{tokens} seconds:{time.perf_counter() - t0:.1f}")


def load_validation_tokens(pattern, vocab_size, max_tokens=0):
    tokens = np.concatenate([load_shard(f, vocab_size) for f in shard_files(pattern)])
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < 2:
        raise DataError(f"{pattern}: validation split has {len(tokens)} tokens; need at least 2")
    return tokens


class TokenStream:
    """Shards in a SEED-determined order, epoch after epoch; take(n) returns the next n tokens."""

    def __init__(self, files, vocab_size, seed):
        self.files, self.vocab_size = files, vocab_size
        self.rng = np.random.default_rng(seed)
        self.order, self.next_file, self.tokens, self.pos = [], 0, np.zeros(0, np.uint16), 0

    def _advance_file(self):
        if self.next_file == len(self.order):
            self.order, self.next_file = list(self.rng.permutation(len(self.files))), 0
        self.tokens = load_shard(self.files[self.order[self.next_file]], self.vocab_size)
        self.next_file, self.pos = self.next_file + 1, 0

    def take(self, n):
        parts, empty = [], 0
        while n > 0:
            if self.pos == len(self.tokens):
                if empty > len(self.files):  # a whole epoch gave nothing: raise rather than spin forever
                    raise DataError(f"the {len(self.files)} train shard(s) hold no tokens (e.g. {self.files[0]})")
                self._advance_file()
                empty += 1
                continue
            empty = 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class TokenLoader:
    """train_gpt.py's DistributedTokenLoader at world size 1: each step's span of the stream is cut into
    GRAD_ACCUM_STEPS pieces of micro+1 tokens, so the same SEED gives the same batches as a 1-GPU torch run.
    No prefetch thread: MLX evaluates lazily, and reading a shard slice is cheap next to a step."""

    def __init__(self, pattern, h):
        self.micro, self.seq, self.accum = h.train_batch_tokens // h.grad_accum_steps, h.train_seq_len, h.grad_accum_steps
        self.stream = TokenStream(shard_files(pattern), h.vocab_size, h.seed)

    def next_batch(self):
        """List of (inputs, targets) per micro-step, each (micro/seq, seq) int32 mx arrays."""
        pieces = self.stream.take(self.accum * (self.micro + 1)).reshape(-1, self.micro + 1).astype(np.int32)
        return [(mx.array(p[:-1].reshape(-1, self.seq)), mx.array(p[1:].reshape(-1, self.seq))) for p in pieces]


# ---------------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------------

SCALE_EPS = 1e-4


def ternary_quantize(w, group_size):
    """(trits in {-1,0,1} as float, per-group scale) for a 2-D weight, groups along the input dim.
    The scale is absmean of the group rounded to fp16, so the exported fp16 scales are exactly the ones trained."""
    rows, cols = w.shape
    g = w.astype(mx.float32).reshape(rows, cols // group_size, group_size)
    scale = mx.maximum(mx.abs(g).mean(axis=-1, keepdims=True), SCALE_EPS).astype(mx.float16).astype(mx.float32)
    trits = mx.clip(mx.round(g / scale), -1, 1)
    return trits.reshape(rows, cols), scale.squeeze(-1)


def dequantize_ternary(trits, scale, group_size):
    rows, cols = trits.shape
    return (trits.reshape(rows, -1, group_size) * scale[..., None]).reshape(rows, cols)


def ternary_master_from_export(trits, scale, group_size):
    """numpy: a float weight that ternary_quantize maps back to exactly (trits, scale): the non-zero entries of a
    group get magnitude scale/f (f = their fraction), so the group's absmean is scale again."""
    rows, cols = trits.shape
    t = trits.astype(np.float32).reshape(rows, -1, group_size)
    frac = np.abs(t).mean(axis=-1, keepdims=True)
    mag = np.where(frac > 0, scale.astype(np.float32)[..., None] / np.maximum(frac, 1.0 / group_size), 0.0)
    return (t * mag).astype(np.float32).reshape(rows, cols)


class TernaryLinear(nn.Module):
    """y = x @ (trits * scale)^T with a straight-through estimator: the fp32 master weight gets the gradient of
    the quantized one. No bias."""

    def __init__(self, in_features, out_features, group_size, zero_init=False):
        super().__init__()
        if in_features % group_size:
            raise ConfigError(
                f"TernaryLinear({in_features}->{out_features}): in_features is not divisible by GROUP_SIZE={group_size}"
            )
        self.group_size = group_size
        if zero_init:
            self.weight = mx.zeros((out_features, in_features))
        else:
            self.weight = mx.random.normal((out_features, in_features)) * in_features**-0.5

    def dequantized(self):
        """The stored weight as floats: the trits times their scales, multiplied out."""
        trits, scale = ternary_quantize(mx.stop_gradient(self.weight), self.group_size)
        return dequantize_ternary(trits, scale, self.group_size)

    def quantized_weight(self):
        w = self.weight
        return w + mx.stop_gradient(self.dequantized() - w)

    def __call__(self, x):
        return x @ self.quantized_weight().astype(x.dtype).T


class FPPhaseTernaryLinear(TernaryLinear):
    """FP_PHASE (train_gpt.py's FPPhaseLinear): the forward uses w + q (wq - w), q = 0 the unquantized latent
    weight, q = 1 exactly the plain TernaryLinear (same float ops), the gradient reaching w straight through at any
    q. q is an array in the layer's state, under a name with a leading underscore, which keeps it out of
    parameters(): no gradient, optimizer step or export sees it. The compiled step takes the model's state as input,
    so q is an input of its graph like the weights: one graph serves every q."""

    def quantized_weight(self):
        w = self.weight
        return w + mx.stop_gradient(self._quant_mix * (self.dequantized() - w))


class QuantMix:
    """FP_PHASE: turns every TernaryLinear of a model into an FPPhaseTernaryLinear, q = 1 until set, and sets their
    q; a new q array only when q changes. finish() puts the plain class back, so that what is exported and scored
    after training is exactly the quantized model."""

    def __init__(self, model):
        self.layers, self.value = list(ternary_names(model).values()), 1.0
        for m in self.layers:
            m.__class__ = FPPhaseTernaryLinear
            m._quant_mix = mx.array(1.0)

    def finish(self):
        for m in self.layers:
            m.__class__ = TernaryLinear
            del m["_quant_mix"]
        self.value = 1.0

    def set(self, value):
        if value != self.value:
            q = mx.array(value, dtype=mx.float32)
            for m in self.layers:
                m._quant_mix = q
            self.value = value


# ---------------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------------

RMS_EPS = float(np.finfo(np.float32).eps)  # torch's F.rms_norm default for fp32


def rms_norm(x, weight=None):
    return mx.fast.rms_norm(x, weight, RMS_EPS)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = mx.ones((dim,))

    def __call__(self, x):
        return rms_norm(x, self.weight.astype(x.dtype))


class Rotary(nn.Module):
    """RoPE on the first `dims` channels of each head (partial RoPE), halves layout as train_gpt.py. Written out
    rather than mx.fast.rope so the angles are computed exactly as torch does. inv_freq is numpy, not a parameter."""

    def __init__(self, head_dim, dims, base):
        super().__init__()
        self.dims = dims or head_dim
        self.inv_freq = 1.0 / base ** (np.arange(0, self.dims, 2, dtype=np.float32) / self.dims)

    def __call__(self, x):  # x: (B, T, H, D)
        freqs = mx.arange(x.shape[1], dtype=mx.float32)[:, None] * mx.array(self.inv_freq.astype(np.float32))[None]
        cos, sin = mx.cos(freqs)[None, :, None].astype(x.dtype), mx.sin(freqs)[None, :, None].astype(x.dtype)
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half : self.dims], x[..., self.dims :]
        return mx.concatenate((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), axis=-1)


def causal_attention(q, k, v):
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) -> (B, T, H, D). mx.fast SDPA does the GQA head grouping."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    y = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")
    return y.transpose(0, 2, 1, 3)


def exclusive_self_attention(y, v):
    """XSA: drop from each head's output its component along the token's own value vector, so attention carries
    what the other positions say (the residual stream already holds the token itself). y: (B,T,H,D), v: (B,T,Hkv,D).
    Each kv head's value is normalized once and broadcast over its group of query heads (train_gpt.py's form)."""
    B, T, H, D = y.shape
    v = v.astype(mx.float32)
    vn = (v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(y.dtype)  # F.normalize
    vn = vn[:, :, :, None]  # (B, T, Hkv, 1, D)
    g = y.reshape(B, T, v.shape[2], H // v.shape[2], D)  # query head h reads kv head h // (H / Hkv)
    return (g - (g * vn).sum(axis=-1, keepdims=True) * vn).reshape(B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        d, hd = h.model_dim, h.head_dim
        self.h, self.num_heads, self.num_kv_heads, self.head_dim = h, h.num_heads, h.num_kv_heads, hd
        # parameters before submodules: the same order as torch's state_dict, so exports are byte-identical
        self.q_gain = mx.full((h.num_heads,), h.qk_gain_init)
        if h.value_residual:
            self.value_mix = mx.array(0.5)
        self.q = TernaryLinear(d, h.num_heads * hd, h.group_size)
        self.k = TernaryLinear(d, h.num_kv_heads * hd, h.group_size)
        self.v = TernaryLinear(d, h.num_kv_heads * hd, h.group_size)
        self.proj = TernaryLinear(h.num_heads * hd, d, h.group_size, zero_init=True)
        self.rotary = Rotary(hd, h.rope_rotated, h.rope_base)

    def __call__(self, x, v_first=None):
        """(output, this layer's values before mixing: the first attention layer's feed the value residual)."""
        h = self.h
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_own = v
        if h.value_residual:
            # ResFormer: later layers add a learned share of the first attention layer's values (the first layer
            # mixes in its own, a plain rescale, exactly as train_gpt.py does)
            v = v + self.value_mix.astype(v.dtype) * (v if v_first is None else v_first)
        # qk-norm keeps ternary-scale drift out of the attention logits; q_gain sets their temperature
        q = rms_norm(q) * self.q_gain.astype(q.dtype)[:, None]
        k = rms_norm(k)
        q, k = self.rotary(q), self.rotary(k)
        y = causal_attention(q, k, v)
        if h.xsa_enabled:
            y = exclusive_self_attention(y, v)
        return self.proj(y.reshape(B, T, -1)), v_own


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.up = TernaryLinear(h.model_dim, h.mlp_hidden, h.group_size)
        self.down = TernaryLinear(h.mlp_hidden, h.model_dim, h.group_size, zero_init=True)
        self.leaky = h.mlp_act == "leaky_relu2"

    def __call__(self, x):
        u = self.up(x)
        u = nn.leaky_relu(u, 0.5) if self.leaky else nn.relu(u)
        return self.down(u * u)


class SmearGate(nn.Module):
    """x_t += sigmoid(w . x_t + b) * x_{t-1} on the embeddings: a cheap bigram path. The gate is zero where
    token t starts a document (BOS), so no token borrows from the previous document; position 0 of a window
    has no previous token and is left alone."""

    def __init__(self, h):
        super().__init__()
        self.bos_id = h.bos_id
        self.weight = mx.zeros((h.model_dim,))
        self.bias = mx.array(-2.0)

    def __call__(self, x, idx):
        gate = mx.sigmoid(x[:, 1:] @ self.weight.astype(x.dtype) + self.bias.astype(x.dtype))
        gate = gate * (idx[:, 1:] != self.bos_id).astype(x.dtype)
        return mx.concatenate((x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]), axis=1)


class Block(nn.Module):
    """Pre-norm residual block: attention then an MLP, residual scales passed in per layer.
    Returns (x, the attention's values)."""

    def __init__(self, h):
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(h.model_dim), CausalSelfAttention(h)
        self.mlp_norm, self.mlp = RMSNorm(h.model_dim), MLP(h)

    def __call__(self, x, scales, v_first=None):
        scales = scales.astype(x.dtype)
        mixed, v = self.mixer(self.mixer_norm(x), v_first)
        x = x + scales[0] * mixed
        return x + scales[1] * self.mlp(self.mlp_norm(x)), v


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """U-Net transformer: the first half of the layers push their outputs, the second half pops them in reverse
    and adds them with learned per-channel weights. The embedding is tied and factored through EMBED_DIM.
    Attribute order follows torch's state_dict order (own parameters first), so names and order map 1:1."""

    def __init__(self, h):
        super().__init__()
        self.h = h
        d, e = h.model_dim, h.embed_dim or h.model_dim
        self.num_encoder = h.num_layers // 2
        self.skip_weights = mx.ones((self.num_encoder, d))  # odd depth: last layer has no skip
        scale_init = 1.0
        if h.layer_scale:
            scale_init = h.layer_scale_init  # damped residual branches: each layer starts as a small correction
        self.layer_scales = mx.full((h.num_layers, 2, d), scale_init)  # (mixer, MLP) per layer
        self.tok_emb = nn.Embedding(h.vocab_size, e)
        self.tok_emb.weight = mx.random.normal((h.vocab_size, e)) * h.tied_embed_init_std
        if e != d:  # nn.Linear's default init is torch's: U(+-1/sqrt(fan_in))
            self.embed_in = nn.Linear(e, d, bias=False)
            self.embed_out = nn.Linear(d, e, bias=False)
        self.blocks = [Block(h) for _ in range(h.num_layers)]
        self.final_norm = RMSNorm(d)
        if h.smear_gate:
            self.smear = SmearGate(h)

    def embed(self, idx):
        h = self.h
        x = self.tok_emb(idx)
        if "embed_in" in self:
            x = self.embed_in(x)
        x = rms_norm(x)
        if h.smear_gate:
            x = self.smear(x, idx)
        return x

    def hidden(self, idx):
        h = self.h
        x = self.embed(idx)
        skips, v_first = [], None
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].astype(x.dtype) * skips.pop()
            x, v = block(x, self.layer_scales[i], v_first)
            if h.value_residual:
                if v_first is None:
                    v_first = v
            if i < self.num_encoder:
                skips.append(x)
        return self.final_norm(x)

    def logits(self, idx):
        """Logits in fp32, softcapped."""
        x = self.hidden(idx)
        if "embed_out" in self:
            x = self.embed_out(x)
        logits = (x @ self.tok_emb.weight.astype(x.dtype).T).astype(mx.float32)
        if self.h.logit_softcap:
            c = self.h.logit_softcap
            logits = c * mx.tanh(logits / c)
        return logits

    def __call__(self, idx, targets):
        """Training objective: mean cross-entropy (+ z-loss)."""
        logits = self.logits(idx)
        loss = nn.losses.cross_entropy(logits, targets).mean()
        if self.h.z_loss:
            loss = loss + self.h.z_loss * mx.square(mx.logsumexp(logits, axis=-1)).mean()
        return loss

    def token_nll(self, idx, targets):
        """Per-token negative log-likelihood in nats (B, T) fp32."""
        return nn.losses.cross_entropy(self.logits(idx), targets)


def ternary_names(model):
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


def state_dict(model):
    """{name: mx.array} in torch's state_dict order and naming."""
    return dict(tree_flatten(model.parameters()))


def load_state(model, state):
    """Loads a {name: numpy or mx array} state (every parameter, nothing else), as torch's load_state_dict."""
    model.load_weights([(k, mx.array(np.asarray(v, np.float32))) for k, v in state.items()], strict=True)
    mx.eval(model.parameters())


def count_params(model):
    ternary = sum(m.weight.size for m in ternary_names(model).values())
    return sum(v.size for v in state_dict(model).values()), ternary


# ---------------------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g, steps, dtype):
    """Approximate U V^T of g = U S V^T with a quintic Newton-Schulz iteration (Muon's orthogonalization)."""
    a, b, c = NS_COEFFS
    x = g.astype(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (mx.linalg.norm(x.astype(mx.float32)).astype(dtype) + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon:
    """SGD-momentum (Nesterov) whose update is orthogonalized by Newton-Schulz, for 2-D weights; train_gpt.py's
    Muon on a flat {name: array} dict. Newton-Schulz runs in bf16 on the GPU and fp32 on the CPU, as there."""

    def __init__(self, lr, momentum, backend_steps, weight_decay=0.0, row_norm=False):
        self.lr, self.momentum, self.backend_steps, self.weight_decay = lr, momentum, backend_steps, weight_decay
        self.row_norm, self.buffers = row_norm, {}
        self.ns_dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32

    def scale(self, update, p):
        if self.row_norm:  # MUON_ROW_NORM: every row of the update gets the same RMS (train_gpt.py's RowNormMuon)
            row_rms = mx.sqrt(mx.square(update.astype(mx.float32)).mean(axis=1, keepdims=True)) + 1e-7
            return update / (row_rms * p.shape[1] ** 0.5).astype(update.dtype)
        # an RMS of 1/sqrt(fan_in) for the orthogonalized update, whatever the matrix's aspect ratio
        return update * max(1.0, p.shape[0] / p.shape[1]) ** 0.5

    def apply(self, params, grads):
        out = {}
        for name, p in params.items():
            g = grads[name]
            buf = self.buffers.get(name, mx.zeros_like(p)) * self.momentum + g
            self.buffers[name] = buf
            update = self.scale(newton_schulz(g + self.momentum * buf, self.backend_steps, self.ns_dtype), p)
            if self.weight_decay:
                p = p * (1 - self.lr * self.weight_decay)
            out[name] = p - self.lr * update.astype(p.dtype)
        return out

    def state(self):
        return list(self.buffers.values())


class Adam:
    """torch.optim.AdamW semantics (bias correction on, decoupled weight decay) on one group of a flat dict."""

    def __init__(self, lr, h):
        self.base_lr = lr
        self.opt = optim.AdamW(lr, betas=[h.adam_beta1, h.adam_beta2], eps=h.adam_eps, weight_decay=h.adam_wd,
                               bias_correction=True)

    def apply(self, params, grads, mult):
        self.opt.learning_rate = self.base_lr * mult
        return self.opt.apply_gradients(grads, params)

    def state(self):
        return self.opt.state


class Optimizers:
    """Muon for matrices (ternary weights and the embedding projections); Adam for the token embedding table
    and for every small parameter (norms, scales, gates), each group at its own learning rate."""

    def __init__(self, model, h):
        ternary = ternary_names(model)
        self.groups = {"tables": [], "matrices": [], "scalars": []}
        for name in state_dict(model):
            if name == "tok_emb.weight":
                self.groups["tables"].append(name)
            elif name in ternary or name.startswith(("embed_in.", "embed_out.")):
                self.groups["matrices"].append(name)
            else:
                self.groups["scalars"].append(name)
        self.adam = {"tables": Adam(h.embed_lr, h), "scalars": Adam(h.scalar_lr, h)}
        self.muon = Muon(h.matrix_lr, h.muon_momentum, h.muon_backend_steps, h.muon_wd, h.muon_row_norm)
        self.h = h

    def step(self, model, grads, step, elapsed):
        """Updates model in place with flat grads {name: array} at the schedule of `step`."""
        h, mult = self.h, lr_multiplier(step, elapsed, self.h)
        params = state_dict(model)
        self.muon.lr, self.muon.momentum = h.matrix_lr * mult, muon_momentum(step, h)
        new = self.muon.apply({n: params[n] for n in self.groups["matrices"]}, grads)
        for group, adam in self.adam.items():
            names = self.groups[group]
            new.update(adam.apply({n: params[n] for n in names}, {n: grads[n] for n in names}, mult))
        model.update(tree_unflatten(list(new.items())))

    def state(self):
        return [self.muon.state(), [a.state() for a in self.adam.values()]]


def run_progress(step, elapsed, h):
    """Fraction of the run done: whichever of the step budget and the wall-clock budget is further along."""
    progress = step / h.iterations
    if h.max_wallclock_seconds:
        progress = max(progress, elapsed / h.max_wallclock_seconds)
    return progress


def lr_multiplier(step, elapsed, h):
    """Linear warmup over WARMUP_STEPS, then 1, then over the last WARMDOWN_FRAC of the run a warmdown (linear or
    half-cosine) to WARMDOWN_MIN_LR, where the run's progress is whichever of the step budget and the wall-clock
    budget is further along (train_gpt.py's TrainingSchedule.lr)."""
    if h.warmup_steps and step < h.warmup_steps:
        return (step + 1) / h.warmup_steps
    progress = run_progress(step, elapsed, h)
    if h.warmdown_frac and progress > 1 - h.warmdown_frac:
        left = max(0.0, (1 - progress) / h.warmdown_frac)
        if h.warmdown_shape == "cosine":
            left = 0.5 * (1 - math.cos(math.pi * left))
        return h.warmdown_min_lr + (1 - h.warmdown_min_lr) * left
    return 1.0


def quant_mix(step, elapsed, h):
    """FP_PHASE: 0 (latent weights unquantized) before QAT_START_FRAC, then 1 (ternary), or a linear ramp from 0
    to 1 over QAT_RAMP_FRAC (train_gpt.py's TrainingSchedule.quant_mix)."""
    into = run_progress(step, elapsed, h) - h.qat_start_frac
    if into < 0:
        return 0.0
    return min(1.0, into / h.qat_ramp_frac) if h.qat_ramp_frac else 1.0


def muon_momentum(step, h):
    if not h.muon_momentum_warmup_steps:
        return h.muon_momentum
    frac = min(step / h.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------


def build_byte_luts(sp, vocab_size):
    """Per-token UTF-8 byte counts from the SentencePiece pieces (train_gpt.py's accounting, line for line).
    base_bytes[t]: bytes of the piece without its leading '▁' (byte-fallback pieces: 1; control/unknown: 0).
    has_space[t]: the piece starts with '▁', which is one space byte unless the previous token is a boundary.
    is_boundary[t]: control/unknown/unused tokens (BOS, EOS, ...), after which a leading '▁' is no text."""
    base = np.zeros(vocab_size, np.int64)
    space = np.zeros(vocab_size, bool)
    boundary = np.zeros(vocab_size, bool)
    for t in range(sp.vocab_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            boundary[t] = True
        elif sp.is_byte(t):
            base[t] = 1
        else:
            piece = sp.id_to_piece(t)
            if piece.startswith("\u2581"):
                space[t], piece = True, piece[1:]
            base[t] = len(piece.encode("utf-8"))
    return base, space, boundary


def target_bytes(inputs, targets, luts):
    """UTF-8 bytes of each target token given the token before it (its input position)."""
    base, space, boundary = luts
    return base[targets] + (space[targets] & ~boundary[inputs])


def window_batch(tokens, windows, seq_len, rows):
    """(inputs, targets, mask) numpy arrays of shape (rows, seq_len); row r holds window windows[r]. The tail of
    the split's last window and spare rows are padding with mask 0."""
    n_targets = len(tokens) - 1
    x = np.zeros((rows, seq_len), np.int64)
    y = np.zeros((rows, seq_len), np.int64)
    m = np.zeros((rows, seq_len), bool)
    for r, w in enumerate(windows):
        a = w * seq_len
        n = min(seq_len, n_targets - a)
        x[r, :n], y[r, :n], m[r, :n] = tokens[a : a + n], tokens[a + 1 : a + 1 + n], True
    return x, y, m


def eval_batches(tokens, seq_len, batch_seqs):
    """train_gpt.py's eval_batches at world size 1: fixed-shape batches in which every target position 1..N-1
    of the split lands exactly once (causal, so padding after a token cannot change its score)."""
    n_windows = -(-(len(tokens) - 1) // seq_len)
    batch_seqs = max(1, min(batch_seqs, n_windows))
    for start in range(0, n_windows, batch_seqs):
        yield window_batch(tokens, range(start, min(start + batch_seqs, n_windows)), seq_len, batch_seqs)


def evaluate(model, tokens, luts, h):
    """(val_loss in nats/token, val_bpb) over the whole split. BPB = total target NLL in bits / total UTF-8
    bytes of the targets. Sums in float64 on the host, as train_gpt.py does."""
    batch_seqs = max(1, h.val_batch_tokens // h.train_seq_len)
    nll_sum, ntok, nbytes = 0.0, 0, 0
    for x, y, m in eval_batches(tokens, h.train_seq_len, batch_seqs):
        nll = np.array(model.token_nll(mx.array(x.astype(np.int32)), mx.array(y.astype(np.int32))), np.float64)
        nll_sum += float((nll * m).sum())
        ntok += int(m.sum())
        nbytes += int(target_bytes(x, y, luts)[m].sum())
    return nll_sum / ntok, nll_sum / math.log(2) / nbytes


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------

ARTIFACT_MAGIC = b"TGPT\x02"  # version 2: trits and scales in one section each, per-tensor float formats
FP8_MAX = 448.0
FLOAT_MATRIX_MIN = 16  # a float tensor whose two sides are both at least this long is a matrix (lossy formats apply)
RANS_PROB_BITS = 10  # each context's digit frequencies sum to 1024 (tables of 1024 slots per context stay in cache)
RANS_LOW = 1 << 16  # lane states live in [2^16, 2^32): at most one 16-bit word moves per symbol
RANS_LANES = 2048  # lanes at most; each costs its 4-byte final state (8 KB in all, 0.0013 bits per trit at 51M)
RANS_LANE_TRITS = 16384  # trits per lane at least, so the states cost < 0.002 bits per trit
RANS_BLOCK = 1024  # stream rows whose contexts are laid out at once


class ArtifactError(RuntimeError):
    pass


def trit_count(shapes):
    return sum(math.prod(s) for s in shapes)


def pack_trits_base3(trits, shapes=None):
    """5 trits per byte: sum_i (t_i + 1) * 3^i, i < 5 (values 0..242)."""
    d = (trits.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    d = np.concatenate([d, np.ones((-len(d)) % 5, np.uint8)]).reshape(-1, 5).astype(np.uint16)
    return (d @ np.array([1, 3, 9, 27, 81], np.uint16)).astype(np.uint8).tobytes()


def unpack_trits_base3(buf, shapes):
    v = np.frombuffer(buf, np.uint8).astype(np.int16)
    d = np.stack([(v // 3**i) % 3 for i in range(5)], axis=1).reshape(-1)[: trit_count(shapes)]
    return (d - 1).astype(np.int8)


def pack_trits_2bit(trits, shapes=None):
    """4 trits per byte at 2 bits each: looser than base-3 but byte-aligned patterns can compress better."""
    d = (trits.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    d = np.concatenate([d, np.ones((-len(d)) % 4, np.uint8)]).reshape(-1, 4)
    return (d[:, 0] | d[:, 1] << 2 | d[:, 2] << 4 | d[:, 3] << 6).astype(np.uint8).tobytes()


def unpack_trits_2bit(buf, shapes):
    v = np.frombuffer(buf, np.uint8)
    d = np.stack([(v >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[: trit_count(shapes)]
    return (d.astype(np.int16) - 1).astype(np.int8)


def rans_layout(shapes):
    """(stream start of each tensor and the end, row length of each tensor and 1 for the padding)."""
    starts = np.concatenate([[0], np.cumsum([math.prod(s) for s in shapes])]).astype(np.int32)
    return starts, np.array([max(1, s[-1]) for s in shapes] + [1], np.int32)


def rans_neighbours(T, lanes, t0, t1, starts, cols):
    """(context base, flat index of the left neighbour, of the one above) of stream rows [t0, t1), for digits
    (trit + 1) held in D (T, lanes) flattened with one extra cell holding 1 (the zero trit's digit) at the end, where
    lane l holds stream positions [l*T, (l+1)*T). The context of a digit is base + 3 * above + left: 9 per tensor,
    from the digit to the left in its weight row and the one above in its column (that extra cell when the neighbour
    lies outside the row, the tensor or the lane); the padding past the end counts as one more tensor, of rows of 1.
    Both neighbours come from earlier rows, so the decoder knows them when it needs them."""
    t, lane = np.arange(t0, t1, dtype=np.int32)[:, None], np.arange(lanes, dtype=np.int32)[None, :]
    pos, outside = lane * np.int32(T) + t, np.int32(T * lanes)
    k = (np.searchsorted(starts, pos, side="right") - 1).astype(np.int32)
    c, rel = cols[k], pos - starts[k]
    left = np.where((rel % c != 0) & (t > 0), (t - 1) * lanes + lane, outside)
    above = np.where((rel >= c) & (t >= c), (t - c) * lanes + lane, outside)
    return 9 * k, left, above


def rans_frequencies(counts):
    """Static frequencies (contexts, 3) summing to 2^RANS_PROB_BITS: every digit seen in a context gets >= 1 and
    the most frequent one takes the rounding remainder."""
    total = 1 << RANS_PROB_BITS
    seen = counts.sum(1, keepdims=True)
    freq = np.where(counts > 0, np.maximum(1, counts * total // np.maximum(seen, 1)), 0)
    freq[np.arange(len(freq)), freq.argmax(1)] += total - freq.sum(1)
    return freq


def rans_encode(idx, freq):
    """(words, final lane states) of the symbols idx (T, lanes) = context * 3 + digit: every lane is a rANS coder
    (ryg_rans with 16-bit renormalisation: states stay below 2^32, so uint32 arithmetic is exact) and all lanes step
    together, from the last row to the first. The words come out reversed, in the order the decoder reads them."""
    f_of = freq.reshape(-1).astype(np.uint32)
    c_of = (np.cumsum(freq, 1) - freq).reshape(-1).astype(np.uint32)
    last_of = ((freq.reshape(-1).astype(np.int64) << (32 - RANS_PROB_BITS)) - 1).astype(np.uint32)  # <= 2^32 - 1
    x, out, bits = np.full(idx.shape[1], RANS_LOW, np.uint32), [], np.uint32(RANS_PROB_BITS)
    for t in range(idx.shape[0] - 1, -1, -1):
        f, c = f_of[idx[t]], c_of[idx[t]]
        emit = x > last_of[idx[t]]  # the state would leave [2^16, 2^32) after coding this symbol
        if emit.any():
            out.append((x[emit] & np.uint32(0xFFFF)).astype(np.uint16))
            x = np.where(emit, x >> np.uint32(16), x)
        q, r = np.divmod(x, f)
        x = (q << bits) + r + c
    return (np.concatenate(out)[::-1] if out else np.zeros(0, np.uint16)), x


def pack_trits_rans(trits, shapes):
    """Interleaved rANS of the trits under static per-context frequencies (rans_neighbours): within ~0.1% of that
    context model's entropy. Bytes: lane and context counts (uint32), the frequencies of digits 0 and 2 per context
    (uint16; digit 1 has the rest), the final lane states (uint32), then the 16-bit words."""
    n = trits.size
    lanes = int(min(RANS_LANES, max(1, n // RANS_LANE_TRITS)))
    T = -(-n // lanes)
    starts, cols = rans_layout(shapes)
    D = np.ones(lanes * T + 1, np.uint8)
    D[:n] = trits.reshape(-1) + 1
    D[:-1] = D[:-1].reshape(lanes, T).T.reshape(-1)
    idx = np.zeros((T, lanes), np.int32)
    for a in range(0, T, RANS_BLOCK):  # in blocks: the temporaries of 51M positions at once would take gigabytes
        b = min(T, a + RANS_BLOCK)
        base, left, above = rans_neighbours(T, lanes, a, b, starts, cols)
        idx[a:b] = (base + 3 * D[above] + D[left]) * 3 + D[a * lanes : b * lanes].reshape(-1, lanes)
    contexts = 9 * (len(shapes) + 1)
    freq = rans_frequencies(np.bincount(idx.reshape(-1), minlength=3 * contexts).reshape(contexts, 3))
    words, x = rans_encode(idx, freq)
    return (struct.pack("<II", lanes, contexts) + freq[:, [0, 2]].astype("<u2").tobytes()
            + x.astype("<u4").tobytes() + words.astype("<u2").tobytes())


def rans_decode(x, words, freq, T, starts, cols):
    """Digits (T * lanes + 1, as rans_neighbours lays them out) of rans_encode's words; every row's contexts come
    from the rows already decoded. Tables indexed by context << bits | slot give the digit, its frequency and
    slot - its cumulative frequency, so one step is a handful of numpy calls on `lanes` numbers."""
    lanes, bits = len(x), RANS_PROB_BITS
    cum = np.cumsum(freq, 1) - freq
    digit_of = np.repeat(np.tile(np.arange(3, dtype=np.uint8), len(freq)), freq.reshape(-1))
    slot = np.tile(np.arange(1 << bits, dtype=np.int64), len(freq))
    row = np.repeat(np.arange(len(freq)), 1 << bits)
    f_of = freq[row, digit_of].astype(np.uint32)
    b_of = (slot - cum[row, digit_of]).astype(np.uint32)
    D, pos = np.ones(T * lanes + 1, np.uint8), 0
    shift, mask = np.uint32(bits), np.uint32((1 << bits) - 1)
    for t in range(T):
        if t % RANS_BLOCK == 0:
            base, left, above = rans_neighbours(T, lanes, t, min(T, t + RANS_BLOCK), starts, cols)
            base = base << bits
        j = t % RANS_BLOCK
        k = (base[j] + ((3 * D[above[j]] + D[left[j]]).astype(np.int32) << bits)) | (x & mask).astype(np.int32)
        D[t * lanes : (t + 1) * lanes] = digit_of[k]
        x = f_of[k] * (x >> shift) + b_of[k]
        low = x < RANS_LOW
        n = int(np.count_nonzero(low))
        if n:
            if pos + n > len(words):
                raise ArtifactError("the rANS trit stream is truncated")
            x[low] = (x[low] << np.uint32(16)) | words[pos : pos + n][::-1]
            pos += n
    if pos != len(words) or (x != RANS_LOW).any():
        raise ArtifactError("the rANS trit stream does not end in its initial state (corrupt)")
    return D


def unpack_trits_rans(buf, shapes):
    n = trit_count(shapes)
    starts, cols = rans_layout(shapes)
    lanes, contexts = struct.unpack("<II", buf[:8])
    if contexts != 9 * (len(shapes) + 1) or lanes < 1 or len(buf) < 8 + 4 * contexts + 4 * lanes:
        raise ArtifactError(f"the rANS trit stream does not fit the table ({lanes} lanes, {contexts} contexts)")
    f02 = np.frombuffer(buf, "<u2", 2 * contexts, 8).reshape(contexts, 2).astype(np.int64)
    freq = np.stack([f02[:, 0], (1 << RANS_PROB_BITS) - f02.sum(1), f02[:, 1]], 1)
    if (freq[:, 1] < 0).any():
        raise ArtifactError("the rANS frequency table is corrupt")
    x = np.frombuffer(buf, "<u4", lanes, 8 + 4 * contexts).astype(np.uint32)
    words = np.frombuffer(buf, "<u2", offset=8 + 4 * contexts + 4 * lanes).astype(np.uint32)
    T = -(-n // lanes)
    D = rans_decode(x, words, freq, T, starts, cols)
    return (D[:-1].reshape(T, lanes).T.reshape(-1)[:n].astype(np.int16) - 1).astype(np.int8)


TRIT_PACKERS = {"base3": (pack_trits_base3, unpack_trits_base3), "2bit": (pack_trits_2bit, unpack_trits_2bit),
                "rans": (pack_trits_rans, unpack_trits_rans)}


def fp16_planes(x):
    """fp16 values as two byte planes, all high bytes then all low bytes: the high byte (sign, exponent, top of the
    mantissa) repeats across neighbouring scales, which brotli finds better once it is not interleaved with the
    near-random low byte (-7% on absmean scales at q11, -18% at q5)."""
    b = np.ascontiguousarray(x, np.float16).view(np.uint8).reshape(-1, 2)
    return b[:, 1].tobytes() + b[:, 0].tobytes()


def from_fp16_planes(buf):
    b = np.frombuffer(buf, np.uint8).reshape(2, -1)
    return np.ascontiguousarray(b[::-1].T).view(np.float16).reshape(-1)


def fp8_e4m3_table():
    """float32 value of each of the 256 float8_e4m3fn codes (no infinities; 0x7f and 0xff are NaN)."""
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exp, man = (code >> 3) & 0xF, code & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[[0x7F, 0xFF]] = np.nan
    return val.astype(np.float32)


FP8_VALUES = fp8_e4m3_table()


def to_fp8_e4m3(x):
    """Round-to-nearest-even float8_e4m3fn codes of x, |x| <= 448 (torch's cast for in-range values)."""
    pos = FP8_VALUES[:0x7F].astype(np.float64)  # codes 0..126 are increasing
    a = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(pos, a), 1, len(pos) - 1)
    lo = hi - 1
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return (pick | np.where(np.signbit(x) & (pick > 0), 0x80, 0)).astype(np.uint8)


INT_SCALE_MIN = 2.0**-24  # the smallest fp16 subnormal: an all-zero row still gets a scale
INT_BITS = {"int8": 8, "int6": 6, "int5": 5, "int4": 4}
def int_rows_quantize(w, bits):
    """numpy: train_gpt.py's int_rows_quantize (codes as float, per-row fp16 scale (rows, 1) as float32)."""
    qmax = 2 ** (bits - 1) - 1
    rows = np.asarray(w, np.float32).reshape(w.shape[0], -1)
    scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True) / np.float32(qmax), np.float32(INT_SCALE_MIN))
    scale = scale.astype(np.float16).astype(np.float32)
    return np.clip(np.round(rows / scale), -qmax, qmax), scale


def encode_float(t, kind):
    """train_gpt.py's float formats, in numpy: fp16; fp8 e4m3 or per-row int codes (one signed byte each), after
    the per-row fp16 scales. t: numpy float32."""
    t = np.asarray(t, np.float32)
    if kind == "fp16":
        return {"kind": "fp16"}, t.astype(np.float16).tobytes()
    rows = t.reshape(t.shape[0], -1)
    if kind == "fp8":
        scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True) / np.float32(FP8_MAX), np.float32(1e-12)).astype(np.float16)
        return {"kind": "fp8", "rows": rows.shape[0]}, scale.tobytes() + to_fp8_e4m3(rows / scale.astype(np.float32)).tobytes()
    q, scale = int_rows_quantize(rows, INT_BITS[kind])
    return {"kind": kind, "rows": rows.shape[0]}, scale.astype(np.float16).tobytes() + q.astype(np.int8).tobytes()


def decode_float(meta, buf, shape):
    if meta["kind"] == "fp16":
        return np.frombuffer(buf, np.float16).astype(np.float32).reshape(shape)
    if meta["kind"] not in ("fp8", *INT_BITS):
        raise ArtifactError(f"tensor {meta['name']} is stored as {meta['kind']!r}, a format this train_gpt_mlx.py "
                            f"does not know (it reads fp16, fp8, {', '.join(INT_BITS)})")
    rows = meta["rows"]
    scale = np.frombuffer(buf[: 2 * rows], np.float16).astype(np.float32).reshape(rows, 1)
    if meta["kind"] == "fp8":
        q = FP8_VALUES[np.frombuffer(buf[2 * rows :], np.uint8)]
    else:
        q = np.frombuffer(buf[2 * rows :], np.int8).astype(np.float32)
    return (q.reshape(rows, -1) * scale).reshape(shape)


def float_format(name, p, h):
    """EXPORT_EMBED for the token embedding, EXPORT_FLOAT for the other float matrices; vectors, gains and scalars
    stay fp16 (train_gpt.py's rule)."""
    if p.ndim != 2 or min(p.shape) < FLOAT_MATRIX_MIN:
        return "fp16"
    return h.export_embed if name == "tok_emb.weight" else h.export_float


def serialize_model(model, h, trit_packing="base3"):
    """train_gpt.py's payload, byte for byte: magic, header length, JSON header (formats and tensor table), each
    float tensor's bytes in table order, the trits of all ternary tensors as one stream, their fp16 scales as byte
    planes."""
    ternary = ternary_names(model)
    table, chunks, trits, scales, offset = [], [], [], [], 0
    for name, p in state_dict(model).items():
        entry = {"name": name, "shape": list(p.shape)}
        if name in ternary:
            t, s = ternary_quantize(p, ternary[name].group_size)
            trits.append(np.array(t).astype(np.int8).reshape(-1))
            scales.append(np.array(s).astype(np.float16).reshape(-1))
            entry.update(kind="ternary", group_size=ternary[name].group_size)
        else:
            meta, data = encode_float(np.array(p.astype(mx.float32)), float_format(name, p, h))
            entry.update(meta, offset=offset, nbytes=len(data))
            chunks.append(data)
            offset += len(data)
        table.append(entry)
    shapes = [tuple(e["shape"]) for e in table if e["kind"] == "ternary"]
    chunks.append(TRIT_PACKERS[trit_packing][0](np.concatenate(trits or [np.zeros(0, np.int8)]), shapes))
    chunks.append(fp16_planes(np.concatenate(scales or [np.zeros(0, np.float16)])))
    header = {"trit_packing": trit_packing, "trits": [offset, len(chunks[-2])], "scale_layout": "planes",
              "scales": [offset + len(chunks[-2]), len(chunks[-1])], "tensors": table}
    body = b"".join(chunks)
    header["sha256"] = payload_sha256(header, body)  # as train_gpt.py: brotli has no checksum of its own
    header = json.dumps(header, separators=(",", ":")).encode()
    return ARTIFACT_MAGIC + struct.pack("<I", len(header)) + header + body


def payload_sha256(header, body):
    table = json.dumps({k: v for k, v in header.items() if k != "sha256"}, separators=(",", ":")).encode()
    return hashlib.sha256(table + body).hexdigest()


def read_header(payload):
    """(header, start of the body) of a payload, or ArtifactError for anything this loader cannot read."""
    if payload[:4] != ARTIFACT_MAGIC[:4]:
        raise ArtifactError("bad magic; not a train_gpt.py ternary artifact")
    if payload[4:5] != ARTIFACT_MAGIC[4:]:
        raise ArtifactError(f"artifact format version {payload[4]}; this train_gpt_mlx.py reads version {ARTIFACT_MAGIC[4]}")
    if len(payload) < 9:
        raise ArtifactError(f"payload of {len(payload)} bytes is shorter than its 9-byte preamble")
    (hlen,) = struct.unpack("<I", payload[5:9])
    if 9 + hlen > len(payload):
        raise ArtifactError(f"header of {hlen} bytes runs past the end of the {len(payload)}-byte payload")
    try:
        header = json.loads(payload[9 : 9 + hlen])
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ArtifactError("unreadable header")
    if "sha256" in header and payload_sha256(header, payload[9 + hlen :]) != header["sha256"]:  # older: none
        raise ArtifactError("the payload does not match its sha256 checksum (a corrupt, truncated or bit-flipped file)")
    if header.get("trit_packing") not in TRIT_PACKERS:
        raise ArtifactError(f"unknown trit packing {header.get('trit_packing')!r} (this train_gpt_mlx.py reads "
                            f"{', '.join(TRIT_PACKERS)})")
    hybrid = [t["name"] for t in header.get("tensors", []) if t.get("hybrid")]
    if hybrid:
        raise ArtifactError(f"block matrices in an int format (HYBRID_INT: {hybrid[0]}, ...): not ported to "
                            "train_gpt_mlx.py, which would make them ternary; score it with train_gpt.py")
    if header.get("scale_layout") == "log8":
        raise ArtifactError("ternary scales stored as 'log8' (SCALE_FORMAT=log8): its quantizer is not ported to "
                            "train_gpt_mlx.py, which would score other weights; score it with train_gpt.py")
    if header.get("scale_layout") != "planes":
        raise ArtifactError(f"unknown scale layout {header.get('scale_layout')!r} (this train_gpt_mlx.py reads planes)")
    end = 9 + hlen + header["scales"][0] + header["scales"][1]
    if len(payload) != end:
        raise ArtifactError(f"payload is {len(payload)} bytes, its header describes {end}")
    return header, 9 + hlen


def deserialize_state(payload):
    """State dict of numpy fp32 arrays from a payload; ternary weights come back as masters that requantize exactly.
    Every format train_gpt.py writes is read, whatever this run's EXPORT_* knobs."""
    header, body = read_header(payload)
    state, ternary = {}, []
    for t in header["tensors"]:
        if t["kind"] == "ternary":
            ternary.append(t)
        else:
            state[t["name"]] = decode_float(t, payload[body + t["offset"] : body + t["offset"] + t["nbytes"]], tuple(t["shape"]))
    shapes = [tuple(t["shape"]) for t in ternary]
    (t_off, t_len), (s_off, s_len) = header["trits"], header["scales"]
    trits = TRIT_PACKERS[header["trit_packing"]][1](payload[body + t_off : body + t_off + t_len], shapes)
    scales = from_fp16_planes(payload[body + s_off : body + s_off + s_len]).astype(np.float32)
    at, at_scale = 0, 0
    for t, shape in zip(ternary, shapes):
        n, groups = math.prod(shape), math.prod(shape) // t["group_size"]
        scale = scales[at_scale : at_scale + groups].reshape(shape[0], -1)
        state[t["name"]] = ternary_master_from_export(trits[at : at + n].reshape(shape), scale, t["group_size"])
        at, at_scale = at + n, at_scale + groups
    return {t["name"]: state[t["name"]] for t in header["tensors"]}


def compress_model(model, h, log=print):
    """(packing, brotli blob). Each trit packing is tried at a fast quality; only the smallest pays for the final
    quality."""
    import brotli

    t0 = time.perf_counter()
    payloads = {packing: serialize_model(model, h, packing) for packing in TRIT_PACKERS}
    trial_quality = min(5, h.brotli_quality)
    trial = {p: len(brotli.compress(b, quality=trial_quality, lgwin=24)) for p, b in payloads.items()}
    packing = min(trial, key=trial.get)
    t1 = time.perf_counter()
    blob = brotli.compress(payloads[packing], quality=h.brotli_quality, lgwin=24)
    header = read_header(payloads[packing])[0]
    trits = sum(math.prod(t["shape"]) for t in header["tensors"] if t["kind"] == "ternary")
    log(
        "export " + " ".join(f"q{trial_quality}_{p}:{n}" for p, n in trial.items())
        + f" chosen:{packing} q{h.brotli_quality}_bytes:{len(blob)} trits:{trits} "
        f"trit_section_bits:{8 * header['trits'][1] / max(trits, 1):.4f} scale_section_bytes:{header['scales'][1]} "
        f"pack_seconds:{t1 - t0:.1f} seconds:{time.perf_counter() - t1:.1f}"
    )
    return packing, blob


def load_artifact(path):
    """State dict of the artifact at `path`; every reason it cannot be read is an ArtifactError naming the file."""
    import brotli

    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror})") from None
    try:
        return deserialize_state(brotli.decompress(blob))
    except brotli.error as e:
        raise ArtifactError(f"{path}: not a brotli stream ({e})") from None
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError, struct.error) as e:  # a header that lies about its body
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {e})") from None


def write_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_writable_file(knob, path):
    """ConfigError naming the knob unless a file can be written at `path`: not a folder, in an existing folder that
    takes new files (write_atomic writes beside it), and not a file someone made read-only to protect it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{knob}={path} is a directory; it names the file to write")
    if not p.parent.is_dir():
        raise ConfigError(f"{knob}={path}: the folder {p.parent} does not exist")
    if p.exists() and not p.stat().st_mode & 0o222:
        raise ConfigError(f"{knob}={path} is read-only; it would be replaced at the end of the run")
    probe_folder(knob, path, p.parent)


def probe_folder(knob, value, folder):
    """Creates and removes a file in `folder`: the one test that also holds for root and read-only mounts."""
    probe = Path(folder) / f".probe{os.getpid()}"
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{knob}={value}: cannot create files in {folder} ({e.strerror})") from None


def check_outputs(h):
    """Every path the run will write, checked at start: a path that fails only at export loses the trained model."""
    try:
        os.makedirs(h.log_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"LOG_DIR={h.log_dir}: cannot create it ({e.strerror})") from None
    probe_folder("LOG_DIR", h.log_dir, h.log_dir)
    check_writable_file("ARTIFACT_PATH", h.artifact_path)


def export_artifact(model, h, log):
    """Writes the artifact atomically; returns True (and keeps the blob beside it) when over the cap."""
    packing, blob = compress_model(model, h, log)
    code = code_bytes()
    total = code + len(blob)
    log(f"artifact packing:{packing} model_bytes:{len(blob)} code_bytes:{code} total_bytes:{total} cap:{h.artifact_cap_bytes}")
    if total > h.artifact_cap_bytes:
        kept = f"{h.artifact_path}.over_cap"
        write_atomic(kept, blob)
        log(f"ERROR artifact over cap by {total - h.artifact_cap_bytes} bytes; blob kept as {kept}, {h.artifact_path} untouched")
        return True
    write_atomic(h.artifact_path, blob)
    log(f"artifact_written path:{h.artifact_path}")
    return False


def code_bytes():
    """This file's size. A submission scored by train_gpt.py counts train_gpt.py's bytes instead."""
    return Path(__file__).stat().st_size


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights: the run stops and writes no model."""


def refuse_nonfinite(model, path):
    """Raises before a non-finite model reaches `path` (train_gpt.py's check)."""
    bad = [n for n, p in tree_flatten(model.parameters()) if not mx.all(mx.isfinite(p)).item()]
    if bad:
        raise DivergenceError(f"the trained weights are not finite ({len(bad)} tensors: {', '.join(bad[:4])}"
                              f"{', ...' if len(bad) > 4 else ''}); refusing to write {path}, and any file "
                              "already there is left untouched")


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


class Logger:
    """logs/<RUN_ID>.txt holds exactly one run: an existing log is refused at start, never appended to (as in
    train_gpt.py, whose Logger says why)."""

    def __init__(self, h):
        os.makedirs(h.log_dir, exist_ok=True)
        path = os.path.join(h.log_dir, f"{h.run_id}.txt")
        try:
            self.file = open(path, "x", buffering=1)
        except FileExistsError:
            raise ConfigError(f"{path} already exists: a log holds one run. Pick another RUN_ID, or move the file") from None

    def __call__(self, msg):
        print(msg, flush=True)
        self.file.write(msg + "\n")

    def error(self, e):
        """The `error:` line that ends a failed run's log (stderr has it, or the traceback, too)."""
        known = (ConfigError, DataError, ArtifactError, DivergenceError)
        msg = str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}".rstrip(": ")  # KeyboardInterrupt has none
        try:
            self.file.write("error: " + " ".join(msg.split()) + "\n")
        except OSError:  # a full disk must not hide the error being reported
            pass


def setup_device(h):
    if h.device == "cpu":
        mx.set_default_device(mx.cpu)
    return mx.default_device()


def check_batch_shape(h):
    per_micro = h.train_batch_tokens / h.grad_accum_steps
    if per_micro != int(per_micro) or int(per_micro) % h.train_seq_len:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} must split into WORLD_SIZE=1 x "
            f"GRAD_ACCUM_STEPS={h.grad_accum_steps} micro-batches of whole TRAIN_SEQ_LEN={h.train_seq_len} sequences"
        )


def make_grad_fn(model, use_compile):
    """(loss, grads) of one micro-batch; mx.compile'd when asked. The model's state is the compiled step's implicit
    input and output: nn.value_and_grad leaves its traced parameters in the model, and without outputs= those
    placeholders stayed there, so the second compiled call failed ("an array without a primitive")."""
    grad_fn = nn.value_and_grad(model, lambda x, y: model(x, y))
    if use_compile:
        grad_fn = mx.compile(grad_fn, inputs=model.state, outputs=model.state)
    return grad_fn


def train_step(model, grad_fn, loader, optimizers, h, step, elapsed):
    """One optimizer step over GRAD_ACCUM_STEPS micro-batches; returns the mean loss (an mx scalar)."""
    if h.fp_phase:
        model.quant_mix.set(quant_mix(step, elapsed, h))
    micro = loader.next_batch()
    total, grads = 0.0, None
    for x, y in micro:
        loss, g = grad_fn(x, y)
        g = dict(tree_flatten(g))
        grads = g if grads is None else {k: grads[k] + v for k, v in g.items()}
        total = total + loss
    n = len(micro)
    grads = {k: v / n for k, v in grads.items()}
    if h.grad_clip_norm:
        grads, _ = optim.clip_grad_norm(grads, h.grad_clip_norm)
    optimizers.step(model, grads, step, elapsed)
    return total / n


def train(model, optimizers, h, train_pattern, val, log, use_compile):
    """The timed loop: stops at ITERATIONS or when the clock passes MAX_WALLCLOCK_SECONDS (evaluation excluded)."""
    val_tokens, luts = val
    loader = TokenLoader(train_pattern, h)
    grad_fn = make_grad_fn(model, use_compile)
    step, train_seconds, stop = 0, 0.0, False
    t_start = time.perf_counter()
    while not stop:
        if h.fp_phase:
            if model.quant_mix.value == 0 and quant_mix(step, train_seconds, h) > 0:
                log(f"qat_start step:{step}")
        loss = train_step(model, grad_fn, loader, optimizers, h, step, train_seconds)
        mx.eval(loss, model.parameters(), optimizers.state())
        step += 1
        train_seconds = time.perf_counter() - t_start
        stop = step >= h.iterations or (h.max_wallclock_seconds and train_seconds >= h.max_wallclock_seconds)
        if step % h.train_log_every == 0 or stop or step <= 5:
            train_loss = loss.item()
            tok_s = step * h.train_batch_tokens / train_seconds
            left = (h.iterations - step) * train_seconds / step
            if h.max_wallclock_seconds:
                left = min(left, h.max_wallclock_seconds - train_seconds)
            log(
                f"step:{step}/{h.iterations} train_loss:{train_loss:.4f} lr_mult:{lr_multiplier(step, train_seconds, h):.3f} "
                f"tok/s:{tok_s:.0f} step_ms:{1000 * train_seconds / step:.1f} "
                f"elapsed:{train_seconds:.1f}s remaining:{max(left, 0):.1f}s"
            )
            if not math.isfinite(train_loss):  # checked where the loss is read anyway, as in train_gpt.py
                raise DivergenceError(f"training diverged at step {step}: train_loss:{train_loss}; no model is "
                                      "written (lower the learning rates, or set GRAD_CLIP_NORM)")
        if h.val_loss_every and step % h.val_loss_every == 0 and not stop:
            t_val = time.perf_counter()
            vl, vb = evaluate(model, val_tokens, luts, h)
            log(f"step:{step} val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_seconds:{time.perf_counter() - t_val:.1f}")
            t_start += time.perf_counter() - t_val  # evaluation does not eat the training budget
    peak_mem = mx.get_peak_memory() / 2**20
    log(f"train_done steps:{step} train_seconds:{train_seconds:.1f} tok/s:{step * h.train_batch_tokens / train_seconds:.0f} peak_mem_mib:{peak_mem:.0f}")


def export_and_score(model, h, val, log):
    """Pre-export score, artifact, then the score of a fresh model loaded from the file on disk.
    Returns False when over the cap."""
    refuse_nonfinite(model, h.artifact_path)
    val_tokens, luts = val
    t_eval = time.perf_counter()
    pre_loss, pre_bpb = evaluate(model, val_tokens, luts, h)
    log(f"pre_export val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} eval_seconds:{time.perf_counter() - t_eval:.1f}")
    if export_artifact(model, h, log):
        return False
    t_rt = time.perf_counter()
    fresh = GPT(h)
    load_state(fresh, load_artifact(h.artifact_path))
    rt_loss, rt_bpb = evaluate(fresh, val_tokens, luts, h)
    log(
        f"final_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} gap_bpb:{rt_bpb - pre_bpb:+.4f} "
        f"eval_seconds:{time.perf_counter() - t_rt:.1f}"
    )
    return True


def run(h, device, log):
    use_compile = h.compile == "1" or (h.compile == "auto" and device == mx.gpu)
    log(f"run_id:{h.run_id} world_size:1 device:{device.type.name} mlx:{mx.__version__} compile:{use_compile}")
    log("config " + " ".join(f"{h.env_names()[k]}={v}" for k, v in h.as_dict().items()))

    mx.random.seed(h.seed)
    np.random.seed(h.seed)
    sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
    val_tokens = load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.vocab_size, h.max_val_tokens)
    val = (val_tokens, build_byte_luts(sp, h.vocab_size))
    train_pattern = os.path.join(h.data_path, "fineweb_train_*.bin")
    log(f"data train_shards:{len(shard_files(train_pattern))} val_tokens:{len(val_tokens) - 1}")
    check_data(h, log)

    model = GPT(h)
    mx.eval(model.parameters())
    total_params, ternary_params = count_params(model)
    log(f"model params:{total_params} ternary:{ternary_params} attention:mlx_sdpa")
    optimizers = Optimizers(model, h)
    if h.fp_phase:
        model.quant_mix = QuantMix(model)  # before the step is compiled, which must see the blending layers
    train(model, optimizers, h, train_pattern, val, log, use_compile)
    if h.fp_phase:
        model.quant_mix.finish()  # a run that stopped inside the ramp still exports (and scores) quantized weights
    if not export_and_score(model, h, val, log):
        log(f"error: code + model is over ARTIFACT_CAP_BYTES={h.artifact_cap_bytes}; nothing was scored")
        sys.exit(1)


def main():
    h = Hyperparameters()
    check_batch_shape(h)
    check_outputs(h)
    device = setup_device(h)
    log = Logger(h)
    try:
        run(h, device, log)
    except (Exception, KeyboardInterrupt) as e:
        log.error(e)  # a failed run's log ends with its cause, never just stops
        raise


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except DivergenceError as e:  # the run itself failed; its inputs were fine
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
