"""Ternary-weight GPT trainer for the Parameter Golf challenge.

One self-contained file: config, data, quantization, layers, model, optimizer, evaluation, export, main.
Weights of every hidden matrix are ternary ({-1, 0, +1} x per-group scale, BitNet b1.58 style); the
artifact packs them at 1.6 bits each, so more parameters fit under the 16,000,000-byte cap than at int6/int8.
Every knob is an environment variable read by `Hyperparameters`. Launch: `torchrun --nproc_per_node=8 train_gpt.py`.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import glob
import hashlib
import importlib
import io
import json
import math
import os
import queue
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


COMPILE_MODES = {"default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"}  # last two: CUDA graphs
HYBRID_NAMES = ("q", "k", "v", "proj", "up", "down")  # the block matrices HYBRID_FAMILIES may name
POS = (lambda v: v > 0, "must be > 0")
NONNEG = (lambda v: v >= 0, "must be >= 0")
UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
UNIT_OPEN = (lambda v: 0 <= v < 1, "must be in [0, 1)")
# TTT_MODE=lora: what TTT_LORA_TARGETS may name -> the module adapted (a path in each block, or the model's head).
# "attn" and "mlp" are bypasses, as the int6 records run them: from the block's normalized input to its attention
# or MLP output, MODEL_DIM wide, beside the ternary matrices rather than on one of them
LORA_TARGETS = {"q": "mixer.q", "k": "mixer.k", "v": "mixer.v", "proj": "mixer.proj", "up": "mlp.up",
                "down": "mlp.down", "head": "embed_out", "attn": "mixer", "mlp": "mlp"}
LORA_TARGET_LIST = (lambda v: v and set(v.split(",")) <= set(LORA_TARGETS), f"must be a comma list of {sorted(LORA_TARGETS)}")


class Hyperparameters:
    # data and run
    data_path = Knob("DATA_PATH", "./data/datasets/fineweb10B_sp8192")
    tokenizer_path = Knob("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model")
    vocab_size = Knob("VOCAB_SIZE", 8192, check=POS)
    run_id = Knob("RUN_ID", "ternary")
    log_dir = Knob("LOG_DIR", "logs")
    seed = Knob("SEED", 1337)
    device = Knob("DEVICE", "auto", choices={"auto", "cuda", "cpu"})
    compile = Knob("COMPILE", "auto", choices={"auto", "1", "0"})
    compile_mode = Knob("COMPILE_MODE", "default", choices=COMPILE_MODES)  # torch.compile's mode for the model
    combo_kernels = Knob("COMBO_KERNELS", False)  # inductor launches independent small kernels as one
    world_size = Knob("WORLD_SIZE", 1, check=POS)  # these three are set by torchrun
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
    warmdown_shape = Knob("WARMDOWN_SHAPE", "linear", choices={"linear", "cosine"})  # LR from 1 down to WARMDOWN_MIN_LR
    warmdown_min_lr = Knob("WARMDOWN_MIN_LR", 0.0, check=UNIT_OPEN)  # LR multiplier at the end of the warmdown
    compile_warmup_steps = Knob("COMPILE_WARMUP_STEPS", 10, check=NONNEG)
    train_sync_every = Knob("TRAIN_SYNC_EVERY", 8, check=POS)  # TrainClock's reads (GPU syncs): 8 ran 808K tok/s, 1 777-798K (H200, s8)
    train_log_every = Knob("TRAIN_LOG_EVERY", 25, check=POS)
    # evaluation
    val_loss_every = Knob("VAL_LOSS_EVERY", 0, check=NONNEG)
    val_batch_tokens = Knob("VAL_BATCH_TOKENS", 131072, check=POS)
    max_val_tokens = Knob("MAX_VAL_TOKENS", 0, check=NONNEG)
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
    ttt_mode = Knob("TTT_MODE", "sgd", choices={"sgd", "lora"})  # sgd: TTT_SCOPE on stream chunks; lora: per document
    ttt_lora_rank = Knob("TTT_LORA_RANK", 8, check=POS)
    ttt_lora_lr = Knob("TTT_LORA_LR", 0.003, check=POS)  # AdamW, fresh for each batch of spans
    ttt_lora_beta1 = Knob("TTT_LORA_BETA1", 0.0, check=UNIT_OPEN)  # no momentum, with WD 0.5: 0.0009-0.0016 more gain than Adam's 0.9 / 0 (two H200 proxy checkpoints, s9-s10)
    ttt_lora_beta2 = Knob("TTT_LORA_BETA2", 0.999, check=UNIT_OPEN)
    ttt_lora_wd = Knob("TTT_LORA_WD", 0.5, check=NONNEG)  # decoupled: each step scales the adapters by 1 - lr * wd
    ttt_lora_targets = Knob("TTT_LORA_TARGETS", "q,v,head", check=LORA_TARGET_LIST)
    ttt_lora_chunk = Knob("TTT_LORA_CHUNK", 256, check=POS)  # scored tokens of a document between two updates
    ttt_lora_docs = Knob("TTT_LORA_DOCS", 64, check=POS)  # documents adapted side by side, one batch row each
    ttt_lora_span = Knob("TTT_LORA_SPAN", 0, check=NONNEG)  # fresh adapters every SPAN targets of a document; 0: never
    ttt_lora_global = Knob("TTT_LORA_GLOBAL", False)  # plus one adapter a rank's spans share, never reset: the split's domain
    ttt_lora_global_lr = Knob("TTT_LORA_GLOBAL_LR", 0.001, check=POS)  # its own AdamW (TTT_LORA_BETA1/2, TTT_LORA_WD)
    ttt_lora_warm_a = Knob("TTT_LORA_WARM_A", False)  # a batch of spans starts from the last batch's A, row for row (B at 0)
    ttt_lora_bucket = Knob("TTT_LORA_BUCKET", False)  # pad each chunk step's batch to 128 tokens and 8 rows (few shapes)
    ttt_lora_no_cudnn = Knob("TTT_LORA_NO_CUDNN", False)  # the pass's attention on SDPA's other kernels (no per-shape plans)
    ttt_lora_global_rank = Knob("TTT_LORA_GLOBAL_RANK", 0, check=NONNEG)  # 0: TTT_LORA_RANK. It sees every scored token
    ttt_lora_global_targets = Knob("TTT_LORA_GLOBAL_TARGETS", "", check=(lambda v: not v or LORA_TARGET_LIST[0](v), LORA_TARGET_LIST[1]))  # "": TTT_LORA_TARGETS
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
    mlp_mult = Knob("MLP_MULT", 4.0, check=POS)  # 4 with FP_PHASE: 1.2999/1.2985 (two seeds) vs 3 without: 1.3126 (H200 proxy, s8)
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
    # the training loss by FusedSoftcapCrossEntropy: head GEMM, softcap, cross-entropy (+ z-loss) and their gradients
    # in one pass, chunk by chunk; session 16: a step of 80.88 ms against 80.98 (H200), no gain, so off
    fused_loss = Knob("FUSED_LOSS", False)
    ce_kernel = Knob("CE_KERNEL", False)  # the training loss's softcap and cross-entropy in two Triton kernels
    mlp_kernel = Knob("MLP_KERNEL", False)  # the dense MLP's relu^2 and its derivative in Triton GEMMs' epilogues
    tied_embed_init_std = Knob("TIED_EMBED_INIT_STD", 0.02, check=POS)
    attn_impl = Knob("ATTN_IMPL", "auto", choices={"auto", "sdpa", "fa3", "fa2"})
    # q, k and v as one GEMM of output width (NUM_HEADS + 2 NUM_KV_HEADS) x head dim, forward and both backward
    # GEMMs alike, meant for the thin k/v weight gradients (K = the batch's tokens). The same outputs and gradients up
    # to GEMM rounding (tests); session 17: a step of 82.54 ms against 81.68 (H200), slower, so off
    fused_qkv = Knob("FUSED_QKV", False)
    bos_id = Knob("BOS_ID", 1, check=NONNEG)  # document-start token of the shards (SmearGate masks it)
    # architecture family: each feature is off by default and costs nothing when off
    skc_enabled = Knob("SKC_ENABLED", False)  # SKC token mixer in the layers SKC_PATTERN marks S
    skc_pattern = Knob("SKC_PATTERN", "AS", check=(lambda v: v and set(v) <= {"A", "S"}, "must be a string of A and S"))
    skc_chunk = Knob("SKC_CHUNK", 64, check=POS)
    parallel_residual = Knob("PARALLEL_RESIDUAL", False)
    shared_blocks = Knob("SHARED_BLOCKS", False)  # SHARED_BLOCK_COUNT blocks reused cyclically across depth
    shared_block_count = Knob("SHARED_BLOCK_COUNT", 5, check=POS)
    depth_recur = Knob("DEPTH_RECUR", False)  # layers [RECUR_START, RECUR_END) run twice from RECUR_FROM_FRAC on
    recur_start = Knob("RECUR_START", 3, check=NONNEG)
    recur_end = Knob("RECUR_END", 6, check=POS)
    recur_from_frac = Knob("RECUR_FROM_FRAC", 0.5, check=UNIT_OPEN)
    capsules_enabled = Knob("CAPSULES_ENABLED", False)  # Koopman capsule bank read at CAPSULE_LAYER
    capsule_count = Knob("CAPSULE_COUNT", 4, check=POS)
    capsule_dim = Knob("CAPSULE_DIM", 64, check=POS)
    capsule_rank = Knob("CAPSULE_RANK", 4, check=POS)
    capsule_chunk = Knob("CAPSULE_CHUNK", 64, check=POS)
    capsule_layer = Knob("CAPSULE_LAYER", 4, check=NONNEG)
    capsule_consistency = Knob("CAPSULE_CONSISTENCY", 0.01, check=NONNEG)
    capsule_max_decay = Knob("CAPSULE_MAX_DECAY", 0.995, check=UNIT_OPEN)
    feedback_enabled = Knob("FEEDBACK_ENABLED", False)  # FEEDBACK_PASSES passes, later ones see a sketch of the last
    feedback_passes = Knob("FEEDBACK_PASSES", 2, check=(lambda v: v >= 2, "must be >= 2"))
    feedback_halt_tol = Knob("FEEDBACK_HALT_TOL", 0.0, check=NONNEG)  # eval only; 0: always run every pass
    engram_enabled = Knob("ENGRAM_ENABLED", False)  # hashed n-gram embeddings injected at ENGRAM_LAYER
    engram_orders = Knob("ENGRAM_ORDERS", "2,3", check=(lambda v: all(o.strip().isdigit() and int(o) >= 1 for o in v.split(",")), "must be a comma list of n-gram orders >= 1"))
    engram_heads = Knob("ENGRAM_HEADS", 2, check=POS)
    engram_buckets = Knob("ENGRAM_BUCKETS", 2048, check=POS)
    engram_dim = Knob("ENGRAM_DIM", 32, check=POS)
    engram_layer = Knob("ENGRAM_LAYER", 0, check=NONNEG)
    engram_scale = Knob("ENGRAM_SCALE", 1.0, check=POS)
    moe_enabled = Knob("MOE_ENABLED", False)  # MLP split into MOE_EXPERTS top-k routed ternary experts
    moe_experts = Knob("MOE_EXPERTS", 3, check=POS)  # 3 splits 2,304 (MLP_MULT=3) or 3,072 hidden units into 128-groups
    moe_top_k = Knob("MOE_TOP_K", 1, check=POS)
    moe_balance = Knob("MOE_BALANCE", 0.01, check=NONNEG)
    xsa_enabled = Knob("XSA_ENABLED", True)  # exclusive self-attention
    xsa_kernel = Knob("XSA_KERNEL", False)  # XSA in two Triton kernels (forward, backward) instead of inductor's
    qk_norm_kernel = Knob("QK_NORM_KERNEL", False)  # q's and k's RMSNorm, gain and RoPE in two Triton kernels
    value_residual = Knob("VALUE_RESIDUAL", True)
    attn_gate = Knob("ATTN_GATE", False)  # each head's attention output times a sigmoid gate read from the layer input
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
    muon_row_norm = Knob("MUON_ROW_NORM", True)  # rows of the update at one RMS: 1.2733 vs 1.2750 mean of 2 seeds (s26)
    muon_batched = Knob("MUON_BATCHED", True)  # same-shape matrices orthogonalized together: 8% faster step (s7)
    muon_fused = Knob("MUON_FUSED", False)  # MUON_BATCHED's momentum, Nesterov sum, stack and Newton-Schulz: one graph
    muon_wd = Knob("MUON_WD", 0.04, check=NONNEG)  # decoupled, scaled by the scheduled lr: 0.04 scored 1.2952 vs 1.2994 at 0 (H200 proxy, s9, one seed)
    adam_beta1 = Knob("ADAM_BETA1", 0.9, check=UNIT_OPEN)
    adam_beta2 = Knob("ADAM_BETA2", 0.95, check=UNIT_OPEN)
    adam_eps = Knob("ADAM_EPS", 1e-8, check=POS)
    adam_wd = Knob("ADAM_WD", 0.0, check=NONNEG)
    grad_clip_norm = Knob("GRAD_CLIP_NORM", 0.0, check=NONNEG)  # 0: off
    fp_phase = Knob("FP_PHASE", True)  # latent weights unquantized until QAT_START_FRAC, then ternary: the s8 winner with MLP_MULT=4
    qat_start_frac = Knob("QAT_START_FRAC", 0.3, check=UNIT_OPEN)
    qat_ramp_frac = Knob("QAT_RAMP_FRAC", 0.1, check=UNIT_OPEN)  # 0: switch at once; else blend in over this fraction
    # training's ternary forward matmuls in e4m3, 1x128 block scales (sm90); s12: 33% fewer tok/s and 0.019 worse
    fp8_matmul = Knob("FP8_MATMUL", False)
    fp8_dgrad = Knob("FP8_DGRAD", False)  # with FP8_MATMUL: their input gradients in e4m3 too (the weight's stay bf16)
    fp8_wgrad = Knob("FP8_WGRAD", False)  # with FP8_DGRAD: the weight gradients in e4m3 too (blocks of 128 tokens)
    # export
    artifact_path = Knob("ARTIFACT_PATH", "final_model.ternary.ptz")
    artifact_cap_bytes = Knob("ARTIFACT_CAP_BYTES", 16_000_000, check=POS)
    export_float = Knob("EXPORT_FLOAT", "int8", choices={"fp16", "fp8", "int8", "int6", "int5", "int4"})  # float matrices
    export_embed = Knob("EXPORT_EMBED", "int8", choices={"fp16", "fp8", "int8", "int6", "int5", "int4"})  # tok_emb
    embed_qat = Knob("EMBED_QAT", False)  # train through EXPORT_EMBED's int rounding of tok_emb (straight-through)
    scale_format = Knob("SCALE_FORMAT", "fp16", choices={"fp16", "log8"})  # ternary group scales, in training too
    # hybrid precision: the HYBRID_FAMILIES matrices of the blocks train (QAT) and export as per-row int, not ternary
    hybrid_int = Knob("HYBRID_INT", False)
    hybrid_families = Knob("HYBRID_FAMILIES", "q,k,v,proj", check=(lambda v: set(v.split(",")) <= set(HYBRID_NAMES), "must be a comma list of q, k, v, proj, up, down"))
    hybrid_bits = Knob("HYBRID_BITS", 6, choices={4, 5, 6, 8})
    brotli_quality = Knob("BROTLI_QUALITY", 11, check=(lambda v: 0 <= v <= 11, "must be in [0, 11]"))
    # checkpoint: score one trained model under other post-training settings without training it again
    checkpoint_save = Knob("CHECKPOINT_SAVE", False)  # write the float weights after training
    eval_from_checkpoint = Knob("EVAL_FROM_CHECKPOINT", False)  # no training: load them, then calibrate/T/export/score
    checkpoint_path = Knob("CHECKPOINT_PATH", "final_model.float.pt")

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        for attr, knob in vars(Hyperparameters).items():
            if isinstance(knob, Knob):
                setattr(self, attr, knob.read(environ))
        self._check_shapes()
        self._check_export()

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
        if self.eval_stride > self.train_seq_len:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride} must be <= TRAIN_SEQ_LEN={self.train_seq_len}")
        if self.checkpoint_save and self.eval_from_checkpoint:
            raise ConfigError("CHECKPOINT_SAVE=1 with EVAL_FROM_CHECKPOINT=1: a run that loads a checkpoint trains nothing to save")
        if self.ttt_enabled and self.ttt_scope == "capsule_bank" and not self.capsules_enabled:
            raise ConfigError("TTT_SCOPE=capsule_bank needs CAPSULES_ENABLED=1")
        if self.ttt_enabled and self.ttt_mode == "lora":
            self._check_lora()
        elif self.ttt_lora_global:
            raise ConfigError("TTT_LORA_GLOBAL=1 adds to LoRA TTT's adapters: it needs TTT_ENABLED=1 TTT_MODE=lora")
        if self.ttt_lora_warm_a and not (self.ttt_enabled and self.ttt_mode == "lora"):
            raise ConfigError("TTT_LORA_WARM_A=1 warm-starts LoRA TTT's adapters: it needs TTT_ENABLED=1 TTT_MODE=lora")
        if (self.ttt_lora_global_rank or self.ttt_lora_global_targets) and not self.ttt_lora_global:
            raise ConfigError("TTT_LORA_GLOBAL_RANK / TTT_LORA_GLOBAL_TARGETS shape the shared adapter: set TTT_LORA_GLOBAL=1")
        if self.capsules_enabled and self.eval_doc_isolated:
            raise ConfigError("EVAL_DOC_ISOLATED with CAPSULES_ENABLED: the capsule state is carried across windows")
        if self.capsules_enabled and self.eval_stride not in (0, self.train_seq_len):
            raise ConfigError("EVAL_STRIDE with CAPSULES_ENABLED: the capsule state is carried across disjoint "
                              "windows only; overlapping windows would feed it the same tokens twice")
        if self.fp_phase and self.qat_start_frac + self.qat_ramp_frac >= 1:
            raise ConfigError(f"QAT_START_FRAC={self.qat_start_frac} + QAT_RAMP_FRAC={self.qat_ramp_frac} must be < 1: "
                              "the run has to end on the ternary quantizer it exports")
        if self.fp_phase and self.ternary_calib and self.calib_at_frac < self.qat_start_frac + self.qat_ramp_frac:
            raise ConfigError(f"CALIB_AT_FRAC={self.calib_at_frac} comes before the quantizer is fully on "
                              f"(QAT_START_FRAC + QAT_RAMP_FRAC = {self.qat_start_frac + self.qat_ramp_frac})")
        n = self.num_layers
        if self.depth_recur and not self.recur_start < self.recur_end <= n:
            raise ConfigError(f"RECUR_START={self.recur_start} < RECUR_END={self.recur_end} <= NUM_LAYERS={n} must hold")
        if self.capsules_enabled:
            if self.capsule_layer >= n:
                raise ConfigError(f"CAPSULE_LAYER={self.capsule_layer} must be < NUM_LAYERS={n}")
            if self.capsule_state_dim & (self.capsule_state_dim - 1):
                raise ConfigError(f"CAPSULE_COUNT*CAPSULE_DIM={self.capsule_state_dim} must be a power of 2 (Hadamard)")
        if self.engram_enabled:
            if self.engram_layer >= n:
                raise ConfigError(f"ENGRAM_LAYER={self.engram_layer} must be < NUM_LAYERS={n}")
            if self.engram_heads * max(self.engram_order_list) > len(ENGRAM_PRIMES):
                raise ConfigError(f"ENGRAM_HEADS x max(ENGRAM_ORDERS) must be <= {len(ENGRAM_PRIMES)} (distinct primes)")
        if self.moe_enabled:
            if self.moe_top_k > self.moe_experts:
                raise ConfigError(f"MOE_TOP_K={self.moe_top_k} must be <= MOE_EXPERTS={self.moe_experts}")
            if self.mlp_hidden % (self.moe_experts * self.group_size):
                raise ConfigError(f"MLP hidden {self.mlp_hidden} must split into MOE_EXPERTS={self.moe_experts} "
                                  f"experts of whole GROUP_SIZE={self.group_size} groups")
        self._check_ternary_widths()

    def _check_ternary_widths(self):
        """Every TernaryLinear's input width is whole GROUP_SIZE groups, or the model refuses to build minutes into a
        sweep. The widths: MODEL_DIM (attention q/k/v/proj, SKC, MLP up, capsule encode, feedback adapters), the MLP
        hidden width (MLP down), and the capsule read and EngramHash projection inputs when those are on."""
        exact = self.mlp_mult * self.model_dim
        if abs(exact - self.mlp_hidden) > 1e-6:
            raise ConfigError(f"MLP_MULT={self.mlp_mult} x MODEL_DIM={self.model_dim} = {exact:g} is not a whole "
                              "number of hidden units")
        if self.bos_id >= self.vocab_size:
            raise ConfigError(f"BOS_ID={self.bos_id} must be < VOCAB_SIZE={self.vocab_size}")
        widths = {"MODEL_DIM": self.model_dim, "the MLP hidden width MLP_MULT x MODEL_DIM": self.mlp_hidden}
        if self.capsules_enabled:
            widths["the capsule state width CAPSULE_COUNT x CAPSULE_DIM"] = self.capsule_state_dim
        if self.engram_enabled:
            widths["the EngramHash width len(ENGRAM_ORDERS) x ENGRAM_HEADS x ENGRAM_DIM"] = (
                len(self.engram_order_list) * self.engram_heads * self.engram_dim)
        for what, width in widths.items():
            if width % self.group_size:
                raise ConfigError(f"GROUP_SIZE={self.group_size} does not divide {what}={width}: every ternary "
                                  "matrix's input width must be whole groups")

    def _check_lora(self):
        if self.ttt_lora_chunk > self.train_seq_len:
            raise ConfigError(f"TTT_LORA_CHUNK={self.ttt_lora_chunk} must be <= TRAIN_SEQ_LEN={self.train_seq_len}: "
                              "a chunk is scored in one window")
        if "head" in f"{self.ttt_lora_targets},{self.lora_global_targets}".split(",") and self.embed_dim in (0, self.model_dim):
            raise ConfigError("TTT_LORA_TARGETS=head (or TTT_LORA_GLOBAL_TARGETS) adapts the embedding's output projection; EMBED_DIM "
                              f"{self.embed_dim} has none")
        for knob, on in (("CAPSULES_ENABLED", self.capsules_enabled), ("EVAL_ENGRAM", self.eval_engram)):
            if on:
                raise ConfigError(f"TTT_MODE=lora with {knob}=1: not supported (documents are adapted side by side)")

    def _check_export(self):  # and the training precision knobs' dependencies
        if self.xsa_kernel and not self.xsa_enabled:
            raise ConfigError("XSA_KERNEL=1 runs XSA in Triton kernels: it needs XSA_ENABLED=1")
        if self.ce_kernel and self.fused_loss:
            raise ConfigError("CE_KERNEL=1 with FUSED_LOSS=1: both replace the training loss's cross-entropy; pick one")
        if self.mlp_kernel and (self.mlp_act != "relu2" or self.moe_enabled or self.fp8_matmul):
            raise ConfigError("MLP_KERNEL=1 fuses relu^2 into the dense MLP's GEMMs: it needs MLP_ACT=relu2, "
                              "MOE_ENABLED=0 and FP8_MATMUL=0")
        if self.mlp_kernel and (self.model_dim % MLP_TILES[0][2] or self.mlp_hidden % MLP_TILES[0][1]):
            raise ConfigError(f"MLP_KERNEL=1 tiles MODEL_DIM={self.model_dim} in {MLP_TILES[0][2]}s and the MLP hidden "
                              f"width {self.mlp_hidden} in {MLP_TILES[0][1]}s (MLP_TILES)")
        if self.muon_fused and not self.muon_batched:
            raise ConfigError("MUON_FUSED=1 compiles MUON_BATCHED's update of same-shape matrices: it needs MUON_BATCHED=1")
        if self.fused_qkv and self.fp8_matmul:
            raise ConfigError("FUSED_QKV=1 with FP8_MATMUL=1: the fused q/k/v GEMM is F.linear, it would bypass the e4m3 "
                              "matmul that FP8_MATMUL puts on each layer")
        if self.fp8_dgrad and not self.fp8_matmul:
            raise ConfigError("FP8_DGRAD=1 puts FP8_MATMUL's input gradients in e4m3: it needs FP8_MATMUL=1")
        if self.fp8_wgrad and not self.fp8_dgrad:
            raise ConfigError("FP8_WGRAD=1 puts FP8_DGRAD's weight gradients in e4m3 too: it needs FP8_DGRAD=1")
        if self.fp8_wgrad and self.train_seq_len % FP8_BLOCK:
            raise ConfigError(f"FP8_WGRAD=1 needs TRAIN_SEQ_LEN={self.train_seq_len} in whole blocks of {FP8_BLOCK} tokens")
        if self.hybrid_int and self.ternary_calib:
            raise ConfigError("HYBRID_INT=1 with TERNARY_CALIB=1: calibration would turn the int matrices ternary again")
        if self.scale_format == "log8" and self.ternary_calib:
            raise ConfigError("SCALE_FORMAT=log8 with TERNARY_CALIB=1: calibration rounds its scales to fp16")
        if self.embed_qat and self.export_embed not in INT_BITS:
            raise ConfigError(f"EMBED_QAT=1 trains through an int format: set EXPORT_EMBED to one of {', '.join(INT_BITS)} "
                              f"(it is {self.export_embed})")

    @property
    def lora_global_targets(self):
        return (self.ttt_lora_global_targets or self.ttt_lora_targets) if self.ttt_lora_global else ""

    @property
    def lora_global_rank(self):
        return (self.ttt_lora_global_rank or self.ttt_lora_rank) if self.ttt_lora_global else 0

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    @property
    def rope_rotated(self):  # the default ROPE_DIMS on a narrower head: all of it
        return min(self.rope_dims or self.head_dim, self.head_dim)

    @property
    def eval_batch_seqs(self):
        return max(1, self.val_batch_tokens // self.train_seq_len)

    @property
    def mlp_hidden(self):
        return int(round(self.mlp_mult * self.model_dim))

    @property
    def capsule_state_dim(self):
        return self.capsule_count * self.capsule_dim

    @property
    def engram_order_list(self):
        return [int(o) for o in self.engram_orders.split(",")]

    def as_dict(self):
        return {k: getattr(self, k) for k, v in vars(Hyperparameters).items() if isinstance(v, Knob)}

    def env_names(self):
        return {k: v.name for k, v in vars(Hyperparameters).items() if isinstance(v, Knob)}

    def by_env_name(self):
        return {self.env_names()[k]: v for k, v in self.as_dict().items()}


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


def token_range_error(path, tokens, vocab_size):
    """The first token id >= vocab_size in `tokens` (an array or a memory map) as a message naming the file, or
    None; one vectorised max on the common path."""
    if not len(tokens) or int(tokens.max()) < vocab_size:
        return None
    bad = int(np.argmax(tokens >= vocab_size))
    return f"{path}: token id {int(tokens[bad])} at position {bad} >= VOCAB_SIZE={vocab_size}"


def load_shard(path, vocab_size):
    ntok = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=ntok, offset=HEADER_BYTES)
    error = token_range_error(path, tokens, vocab_size)
    if error:
        raise DataError(error)
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
    return token_range_error(path, tokens, vocab_size)


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


def training_prefix(pattern, n_tokens, vocab_size):
    """The first n_tokens targets (n_tokens + 1 tokens) of the first training shard: what the post-training
    searches (calibration, temperature) fit on, so that they never read validation."""
    return load_shard(shard_files(pattern)[0], vocab_size)[: n_tokens + 1]


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


class DistributedTokenLoader:
    """Each step's span of the stream is cut into world*accum pieces of micro+1 tokens; piece a*world+rank feeds
    micro-step a on this rank. Ranks read disjoint pieces, and (world=2, accum=1) sees the same pieces as
    (world=1, accum=2). A thread prepares the next steps in pinned memory; each batch gets a fresh pinned buffer,
    and PyTorch's pinned allocator does not reuse a block until the non-blocking copy from it has finished."""

    def __init__(self, pattern, h, rank, world, device, prefetch=2):
        per_step = h.train_batch_tokens // (world * h.grad_accum_steps)
        self.micro, self.seq = per_step, h.train_seq_len
        self.accum, self.rank, self.world, self.device = h.grad_accum_steps, rank, world, device
        self.stream = TokenStream(shard_files(pattern), h.vocab_size, h.seed)
        self.pin = device.type == "cuda"
        self.queue, self.stop = queue.Queue(maxsize=prefetch), threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)
        self.thread.start()

    def _step_tokens(self):
        pieces = self.stream.take(self.world * self.accum * (self.micro + 1)).reshape(-1, self.micro + 1)
        mine = torch.from_numpy(pieces[self.rank :: self.world].astype(np.int64))
        return mine.pin_memory() if self.pin else mine

    def _produce(self):
        try:
            while not self.stop.is_set():
                item = self._step_tokens()
                while not self.stop.is_set():
                    with contextlib.suppress(queue.Full):
                        self.queue.put(item, timeout=0.1)
                        break
        except BaseException as e:  # surfaced in next_batch on the training thread
            self.queue.put(e)

    def next_batch(self):
        """List of (inputs, targets) per micro-step, each (micro/seq, seq) int64 on the device."""
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        item = item.to(self.device, non_blocking=True)
        return [(p[:-1].view(-1, self.seq), p[1:].view(-1, self.seq)) for p in item]

    def close(self):
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------------

SCALE_EPS = 1e-4


def ternary_quantize(w, group_size):
    """(trits in {-1,0,1} as float, per-group scale) for a 2-D weight, groups along the input dim.
    The scale is absmean of the group rounded to fp16, so the exported fp16 scales are exactly the ones trained."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group_size, group_size)
    scale = g.abs().mean(dim=-1, keepdim=True).clamp_min(SCALE_EPS).half().float()
    trits = (g / scale).round().clamp_(-1, 1)
    return trits.reshape(rows, cols), scale.squeeze(-1)


INT_SCALE_MIN = 2.0**-24  # the smallest fp16 subnormal: an all-zero row still gets a scale
INT_BITS = {"int8": 8, "int6": 6, "int5": 5, "int4": 4}


def int_rows_quantize(w, bits):
    """(codes as float, per-row scale (rows, 1)) of w viewed as rows along dim 0: symmetric, scale = max|row| /
    (2^(bits-1) - 1) rounded to fp16, codes rounded half to even. The int export formats store exactly this, and
    EMBED_QAT trains through it."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.float().reshape(w.shape[0], -1)
    scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(INT_SCALE_MIN).half().float()
    return (rows / scale).round().clamp_(-qmax, qmax), scale


LOG8_STEPS = 16  # SCALE_FORMAT=log8 codes per octave: neighbouring scales differ by 2^(1/16), 4.4%
LOG8_FACTORS = np.exp2(-np.arange(256) / LOG8_STEPS).astype(np.float32)  # scale = row base x LOG8_FACTORS[code]
LOG8_BOUNDS = np.exp2(-(np.arange(255)[::-1] + 0.5) / LOG8_STEPS).astype(np.float32)  # ascending midpoints


def log8_codes(absmean, bounds):
    """SCALE_FORMAT=log8: (codes (rows, groups), base (rows, 1)) of positive per-group values (rows, groups): base is
    the row's largest value rounded to fp16, the code counts the midpoints between steps of 2^(-1/16) that lie above
    value / base (so the largest group has code 0, and code 255 is the floor). bounds: LOG8_BOUNDS as a tensor."""
    base = absmean.amax(dim=1, keepdim=True).half().float()
    return 255 - torch.bucketize(absmean / base, bounds, right=True), base


def ternary_quantize_log8(w, group_size, bounds, factors):
    """ternary_quantize with SCALE_FORMAT=log8 scales: the group absmean rounded to the nearest step of its row's
    log grid, base x 2^(-code/16) in fp32, which is exactly what the artifact's base and code give back.
    bounds, factors: LOG8_BOUNDS, LOG8_FACTORS as tensors on w's device."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group_size, group_size)
    codes, base = log8_codes(g.abs().mean(dim=-1).clamp_min(SCALE_EPS), bounds)
    scale = base * factors[codes]
    trits = (g / scale.unsqueeze(-1)).round().clamp_(-1, 1)
    return trits.reshape(rows, cols), scale


def dequantize_ternary(trits, scale, group_size):
    rows, cols = trits.shape
    return (trits.reshape(rows, -1, group_size) * scale.unsqueeze(-1)).reshape(rows, cols)


def ternary_master_from_export(trits, scale, group_size):
    """A float weight that ternary_quantize maps back to exactly (trits, scale): the non-zero entries of a
    group get magnitude scale/f (f = their fraction), so the group's absmean is scale again."""
    rows, cols = trits.shape
    t = trits.float().reshape(rows, -1, group_size)
    frac = t.abs().mean(dim=-1, keepdim=True)
    mag = torch.where(frac > 0, scale.float().unsqueeze(-1) / frac.clamp_min(1.0 / group_size), 0.0)
    return (t * mag).reshape(rows, cols)


class TernaryLinear(nn.Module):
    """y = x @ (trits * scale)^T with a straight-through estimator: the fp32 master weight gets the gradient of
    the quantized one. No bias."""

    ternary = True  # what the artifact stores as trits (IntQATLinear, a matrix in the same place, is not)

    def __init__(self, in_features, out_features, group_size, zero_init=False):
        super().__init__()
        if in_features % group_size:
            raise ConfigError(
                f"TernaryLinear({in_features}->{out_features}): in_features is not divisible by GROUP_SIZE={group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=in_features**-0.5)

    def quantize(self):
        """(trits, scale) of the current weight: what the forward uses and what the artifact stores."""
        return ternary_quantize(self.weight.detach(), self.group_size)

    def dequantized(self):
        """The stored weight as floats: what quantize() gives back, multiplied out."""
        return dequantize_ternary(*self.quantize(), self.group_size)

    def quantized_weight(self):
        w = self.weight
        return w + (self.dequantized() - w).detach()

    matmul = staticmethod(F.linear)  # FP8_MATMUL puts FP8Matmul.apply on a training model's layers

    def forward(self, x):
        return self.matmul(x, self.quantized_weight().to(x.dtype))


CALIB_SCALES = (0.9, 0.95, 1.05, 1.1)
CALIB_THRESHOLDS = (0.4, 0.45, 0.55, 0.6)


class CalibratedTernaryLinear(TernaryLinear):
    """TERNARY_CALIB: a TernaryLinear whose buffer calib = (threshold, scale multiplier) replaces the fixed rule:
    an entry is non-zero when |w| > threshold x the group's absmean (0.5: round to nearest, the default), and the
    stored scale is multiplier x absmean. (0.5, 1) is exactly TernaryLinear. The buffer is not saved: the artifact
    holds the trits and scales it produced, and a plain TernaryLinear reloads those exactly."""

    def quantize(self):
        threshold, mult = self.calib[0], self.calib[1]
        rows, cols = self.weight.shape
        g = self.weight.detach().float().reshape(rows, cols // self.group_size, self.group_size)
        base = g.abs().mean(dim=-1, keepdim=True).clamp_min(SCALE_EPS).half().float()
        trits = torch.sign(g) * ((g / base).abs() > threshold)
        scale = (base * mult).half().float()
        return trits.reshape(rows, cols), scale.squeeze(-1)


class Log8TernaryLinear(TernaryLinear):
    """SCALE_FORMAT=log8: a TernaryLinear whose group scales live on a per-row log grid of 8-bit codes, in training
    and in the artifact alike (about 4 bits per group after brotli instead of 10)."""

    def quantize(self):
        return ternary_quantize_log8(self.weight.detach(), self.group_size, self.log8_bounds, self.log8_factors)

    def quantized_weight(self):
        # exactly the quantized value (w - w.detach() is 0) with w's gradient: log8 scales use the whole fp32
        # mantissa, so w + (wq - w) would round away from wq, and a reloaded model would score differently
        w = self.weight
        return self.dequantized() + (w - w.detach())


def enable_log8_scales(model):
    """Turns every TernaryLinear into a Log8TernaryLinear, with its grid tables as buffers that follow the module to
    its device (not saved: they are constants)."""
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.__class__ = Log8TernaryLinear
            m.register_buffer("log8_bounds", torch.from_numpy(LOG8_BOUNDS).to(m.weight.device), persistent=False)
            m.register_buffer("log8_factors", torch.from_numpy(LOG8_FACTORS).to(m.weight.device), persistent=False)


class IntQATLinear(TernaryLinear):
    """HYBRID_INT: a block matrix trained through per-row int rounding (int_rows_quantize at HYBRID_BITS) instead of
    ternary, and stored in that int format: it answers where ternary pays for its bytes. Optimizer and TTT treat it
    as the TernaryLinear it replaces."""

    ternary = False

    def quantize(self):
        return int_rows_quantize(self.weight.detach(), self.bits)

    def dequantized(self):
        q, scale = self.quantize()
        return q * scale

    def quantized_weight(self):
        w = self.weight
        return self.dequantized() + (w - w.detach())  # exactly the stored value, with w's gradient


def enable_int_linear(model, h):
    """HYBRID_INT: the HYBRID_FAMILIES matrices of the blocks become IntQATLinears (after every other class swap)."""
    families = set(h.hybrid_families.split(","))
    for name, m in model.named_modules():
        if isinstance(m, TernaryLinear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in families:
            m.__class__ = IntQATLinear
            m.bits = h.hybrid_bits


def enable_calibration(model):
    """Turns every TernaryLinear of the model into a CalibratedTernaryLinear at (0.5, 1). Swapping the class here
    keeps the layers that build TernaryLinears unaware of calibration."""
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.__class__ = CalibratedTernaryLinear
            m.register_buffer("calib", torch.tensor([0.5, 1.0], device=m.weight.device), persistent=False)


class FPPhaseLinear:
    """FP_PHASE: mixed into a layer's own quantizer class (mixed_class), whose buffer quant_mix q blends the
    latent weight w with the layer's quantized weight wq, ternary or int (HYBRID_INT) alike. The forward uses
    w + q (wq - w): q = 0 is the unquantized latent weight, q = 1 exactly the plain TernaryLinear (same float ops),
    and the gradient reaches w straight through at any q. q is a tensor filled in place, so the compiled graph is
    one for every q: the switch costs no recompile. The buffer is not saved: artifacts hold quantized weights."""

    def quantized_weight(self):
        w = self.weight
        return w + (self.quant_mix * (self.dequantized() - w)).detach()


MIXED_CLASSES = {}  # (mixin, quantizer class) -> their class, made once, so that every layer of a kind shares it


def mixed_class(mixin, cls):
    """The class of `mixin` over quantizer class `cls`, which remembers `cls` as `plain` to switch back to."""
    if (mixin, cls) not in MIXED_CLASSES:
        MIXED_CLASSES[mixin, cls] = type(f"{mixin.__name__.removesuffix('Linear')}{cls.__name__}", (mixin, cls),
                                         {"plain": cls})
    return MIXED_CLASSES[mixin, cls]


class FrozenQuantLinear:
    """Mixed in by frozen_weights: the layer's quantized weight, computed once, from the buffer `frozen`."""

    def quantized_weight(self):
        return self.frozen


@contextlib.contextmanager
def frozen_weights(model):
    """Every TernaryLinear quantizes its weight once for the duration, not at each forward (a dozen eager kernels a
    matrix, and LoRA TTT runs uncompiled); the same numbers bit for bit. Classes and buffers come back after."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    for m in layers:
        with torch.no_grad():
            m.register_buffer("frozen", m.quantized_weight(), persistent=False)
        m.__class__ = mixed_class(FrozenQuantLinear, type(m))
    try:
        yield model
    finally:
        for m in layers:
            m.__class__ = m.plain
            del m.frozen


class QuantMix:
    """FP_PHASE: gives every TernaryLinear of a model (whatever its quantizer) the FP-phase blend, q = 1 until set,
    and sets their q. The buffers are filled only when q changes, so the steps in between launch nothing and never
    synchronize. finish() puts the quantizer classes back, so that what is exported and scored after training is
    exactly the quantized model."""

    def __init__(self, model):
        self.layers, self.value = [m for m in model.modules() if isinstance(m, TernaryLinear)], 1.0
        for m in self.layers:
            m.__class__ = mixed_class(FPPhaseLinear, type(m))
            m.register_buffer("quant_mix", torch.ones((), device=m.weight.device), persistent=False)

    def finish(self):
        self.set(1.0)
        for m in self.layers:
            m.__class__ = m.plain

    def set(self, value):
        if value != self.value:
            for m in self.layers:
                m.quant_mix.fill_(value)
            self.value = value


FP8_BLOCK = 128  # FP8_MATMUL: the columns one e4m3 scale covers, in activations and weights alike (cuBLAS's 1x128)


def fp8_blocks(x):
    """(e4m3 tensor, fp32 dequantization scales) of a 2-D tensor: each row's blocks of FP8_BLOCK columns scaled so
    that their absmax is e4m3's largest value. A ternary weight (trits x one scale per group of 128) comes back
    exactly: its nonzero entries all become +-448."""
    g = x.detach().float().unflatten(-1, (-1, FP8_BLOCK))
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    return (g * (FP8_MAX / amax)).to(torch.float8_e4m3fn).flatten(-2), (amax / FP8_MAX).squeeze(-1)


def fp8_dequantize(q, scales):
    return (q.float().unflatten(-1, (-1, FP8_BLOCK)) * scales[..., None]).flatten(-2)


def fp8_matmul(x, w):
    """x @ w.T in bf16 from e4m3 operands at 1x128 block scales: cuBLAS's blockwise-scaled GEMM on CUDA (sm90,
    CUDA >= 12.9; both scale tensors outer-dim-major, as it wants them), its float emulation elsewhere."""
    (xq, xs), (wq, ws) = fp8_blocks(x), fp8_blocks(w)
    if x.is_cuda:
        return scaled_mm_op()(xq, xs, wq, ws)
    return (fp8_dequantize(xq, xs) @ fp8_dequantize(wq, ws).t()).to(torch.bfloat16)


def scaled_mm_op():
    """FP8_MATMUL's GEMM as a custom op, registered once per process, so that torch.compile calls it as it is
    rather than lowering _scaled_mm, whose blockwise scales inductor's own kernels may not read."""
    if not hasattr(torch.ops.ternary_golf, "scaled_mm_1x128"):
        @torch.library.custom_op("ternary_golf::scaled_mm_1x128", mutates_args=())
        def scaled_mm_1x128(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
            return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t().contiguous(),
                                    out_dtype=torch.bfloat16)

        @scaled_mm_1x128.register_fake
        def _(xq, xs, wq, ws):
            return xq.new_empty((xq.size(0), wq.size(0)), dtype=torch.bfloat16)
    return torch.ops.ternary_golf.scaled_mm_1x128


class FP8Matmul(torch.autograd.Function):
    """FP8_MATMUL: F.linear(x, w) with the forward's product in e4m3 (fp8_matmul) and the backward in bf16, as
    under autocast: the gradients are the bf16 path's, at the activations the FP8 forward produced."""

    blocked = ("in_features",)  # the layer's sides that must be whole blocks of FP8_BLOCK

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        y = fp8_matmul(x.reshape(-1, x.size(-1)), w).view(*x.shape[:-1], w.size(0))
        return y if torch.is_autocast_enabled() else y.to(x.dtype)  # autocast's F.linear gives bf16 too

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.to(torch.bfloat16)
        gx = g @ w.to(torch.bfloat16)
        gw = g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        return gx.to(x.dtype), gw.to(w.dtype)


class FP8DgradMatmul(FP8Matmul):
    """FP8_DGRAD: FP8Matmul whose input gradient gy @ w is an e4m3 product too, gy in blocks of 128 outputs and w
    transposed into blocks of 128 rows (its trits are then rounded relative to each block's largest scale)."""

    blocked = ("in_features", "out_features")

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.to(torch.bfloat16)
        gw = g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        gx = fp8_matmul(g.reshape(-1, g.size(-1)), w.t().contiguous()).view(*g.shape[:-1], w.size(1))
        return gx.to(x.dtype), gw.to(w.dtype)


class FP8WgradMatmul(FP8DgradMatmul):
    """FP8_WGRAD: FP8DgradMatmul whose weight gradient gy.T @ x is an e4m3 product too, both operands transposed
    into blocks of 128 tokens (TRAIN_SEQ_LEN is whole blocks, so every micro-batch is): all three GEMMs in e4m3."""

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.to(torch.bfloat16).reshape(-1, gy.size(-1))
        gw = fp8_matmul(g.t().contiguous(), x.reshape(-1, x.size(-1)).t().contiguous())
        gx = fp8_matmul(g, w.t().contiguous()).view(*gy.shape[:-1], w.size(1))
        return gx.to(x.dtype), gw.to(w.dtype)


def set_fp8_matmuls(model, function):
    """FP8_MATMUL: the ternary layers (not HYBRID_INT's) multiply with `function` (FP8Matmul; FP8DgradMatmul with
    FP8_DGRAD, FP8WgradMatmul with FP8_WGRAD: training) or with F.linear again (None: what is scored and exported).
    A layer whose sides that the function blocks are not whole blocks of FP8_BLOCK is a ConfigError."""
    for name, m in model.named_modules():
        if not (isinstance(m, TernaryLinear) and m.ternary):
            continue
        if function is None:
            m.__dict__.pop("matmul", None)
            continue
        if any(getattr(m, side) % FP8_BLOCK for side in function.blocked):
            raise ConfigError(f"FP8_MATMUL=1: {name} is {m.in_features}->{m.out_features}, not blocks of {FP8_BLOCK}")
        m.matmul = function.apply


def check_fp8_matmul(device):
    """FP8_MATMUL on CUDA, before training: cuBLAS's blockwise GEMM against its emulation on a random problem, so
    that a GPU or torch without it (or a layout it reads differently) stops the run at start."""
    g = torch.Generator().manual_seed(0)  # not the device's generator: the run's random stream stays as without it
    x, w = torch.randn(256, 512, generator=g).to(device), torch.randn(384, 512, generator=g).to(device)
    try:
        got = fp8_matmul(x, w).float().cpu()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise ConfigError(f"FP8_MATMUL=1 needs blockwise-scaled FP8 GEMMs (sm90, CUDA >= 12.9): {e}") from None
    want = fp8_matmul(x.cpu(), w.cpu()).float()
    err = float((got - want).abs().max() / want.abs().max())
    if not err < 1e-2:
        raise ConfigError(f"FP8_MATMUL=1: the GPU's FP8 GEMM is off its emulation by {err:.3g} (max, relative)")


# ---------------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------------


def rms_norm(x, weight=None):
    """F.rms_norm over the last dim, in x's dtype whatever autocast's policy. torch 2.12 and later run rms_norm in
    fp32 under CUDA autocast: the embedding's norm would turn the bf16 residual stream fp32, and every norm's output
    with it, twice the bytes of each norm and residual add. torch 2.11, where every figure was measured, has no
    such rule, so there this changes nothing."""
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),), None if weight is None else weight.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


class Rotary(nn.Module):
    """RoPE on the first `dims` channels of each head (partial RoPE); the rest pass through unrotated."""

    def __init__(self, head_dim, dims, base):
        super().__init__()
        self.dims = dims or head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, seq_len, device):
        """cos and sin of every position's angles, each (T, dims / 2) in fp32."""
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq)
        return freqs.cos(), freqs.sin()

    def forward(self, x):  # x: (B, T, H, D)
        cos, sin = (f[None, :, None, :].to(x.dtype) for f in self.tables(x.size(1), x.device))
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.numel() else rotated


FLASH_MODULES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}  # FlashAttention-3, -2


def resolve_attention(impl):
    """(name, flash_attn_func or None). 'auto' takes FlashAttention-3, then -2, else SDPA."""
    for name, module in FLASH_MODULES.items():
        if impl in ("auto", name):
            try:
                return name, importlib.import_module(module).flash_attn_func
            except ImportError:
                if impl == name:
                    raise ConfigError(f"ATTN_IMPL={name} but {module} is not importable") from None
    return "sdpa", None


def causal_attention(q, k, v, flash):
    """q: (B, T, H, D); k, v: (B, T, Hkv, D). Returns (B, T, H, D)."""
    if flash is not None and q.is_cuda:
        out = flash(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=k.size(2) != q.size(2)
    )
    return y.transpose(1, 2)


def exclusive_self_attention(y, v):
    """XSA: drop from each head's output its component along the token's own value vector, so attention carries
    what the other positions say (the residual stream already holds the token itself). y: (B,T,H,D), v: (B,T,Hkv,D).
    Each kv head's value is normalized once and broadcast over its group of query heads, not repeated per head."""
    vn = F.normalize(v.float(), dim=-1).to(y.dtype).unsqueeze(3)  # (B, T, Hkv, 1, D)
    g = y.unflatten(2, (v.size(2), -1))  # (B, T, Hkv, H / Hkv, D): query head h reads kv head h // (H / Hkv)
    return (g - (g * vn).sum(dim=-1, keepdim=True) * vn).flatten(2, 3)


XSA_TOKENS = (32, 16)  # XSA_KERNEL: the tokens one program takes, forward and backward


def xsa_triton_kernels():
    """XSA_KERNEL's two Triton kernels, (forward, backward). A program takes XSA_TOKENS tokens of one kv head: it
    reads their v and the y of that kv head's group of query heads once, in fp32 registers, and writes the output
    (or the gradients of y and v). Inductor splits XSA's forward into a reduction and an elementwise pass, and the
    two with the backward took 3.2 ms of session 17's 81.7 ms step. Each kernel (norm_rope's too) repeats its first
    lines, the block's indices: Triton's interpreter, which the tests run them in, cannot call a nested jit helper."""
    import triton
    import triton.language as tl

    @triton.jit
    def xsa_forward_kernel(y, v, out, T, H_KV, syb, syt, syh, svb, svt, svh,
                           G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
        blocks = tl.cdiv(T, BT)
        bj, tb = tl.program_id(0) // blocks, tl.program_id(0) % blocks
        b, j = (bj // H_KV).to(tl.int64), bj % H_KV
        t, d = tb * BT + tl.arange(0, BT), tl.arange(0, BD)
        mask = (t < T)[:, None] & (d < D)[None, :]
        vv = tl.load(v + b * svb + t[:, None] * svt + j * svh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        vn = vv / tl.maximum(tl.sqrt(tl.sum(vv * vv, 1)), 1e-12)[:, None]
        for i in tl.static_range(G):
            g = tl.load(y + b * syb + t[:, None] * syt + (j * G + i) * syh + d[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32)
            o = g - tl.sum(g * vn, 1)[:, None] * vn
            tl.store(out + ((b * T + t[:, None]) * H_KV * G + j * G + i) * D + d[None, :], o, mask=mask)

    @triton.jit
    def xsa_backward_kernel(y, v, go, gy, gv, T, H_KV, syb, syt, syh, svb, svt, svh, sob, sot, soh,
                            G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
        blocks = tl.cdiv(T, BT)
        bj, tb = tl.program_id(0) // blocks, tl.program_id(0) % blocks
        b, j = (bj // H_KV).to(tl.int64), bj % H_KV
        t, d = tb * BT + tl.arange(0, BT), tl.arange(0, BD)
        mask = (t < T)[:, None] & (d < D)[None, :]
        vv = tl.load(v + b * svb + t[:, None] * svt + j * svh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(vv * vv, 1))
        vn = vv / tl.maximum(norm, 1e-12)[:, None]
        g_vn = tl.zeros([BT, BD], dtype=tl.float32)  # the gradient at vn, summed over the group's heads
        for i in tl.static_range(G):
            q = j * G + i  # the query head
            g = tl.load(y + b * syb + t[:, None] * syt + q * syh + d[None, :], mask=mask, other=0.0).to(tl.float32)
            o = tl.load(go + b * sob + t[:, None] * sot + q * soh + d[None, :], mask=mask, other=0.0).to(tl.float32)
            s, r = tl.sum(g * vn, 1)[:, None], tl.sum(o * vn, 1)[:, None]
            tl.store(gy + ((b * T + t[:, None]) * H_KV * G + q) * D + d[None, :], o - r * vn, mask=mask)
            g_vn -= s * o + r * g
        # through vn = v / max(|v|, eps): vn's own direction drops out unless the norm was clamped
        along = tl.where(norm > 1e-12, tl.sum(vn * g_vn, 1), 0.0)[:, None]
        g_v = (g_vn - along * vn) / tl.maximum(norm, 1e-12)[:, None]
        tl.store(gv + ((b * T + t[:, None]) * H_KV + j) * D + d[None, :], g_v, mask=mask)

    return xsa_forward_kernel, xsa_backward_kernel


def empty_contiguous(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def launch_head_blocks(kernel, tokens, heads, inputs, outputs, *scalars, **constexprs):
    """Runs one of XSA_KERNEL's or QK_NORM_KERNEL's Triton kernels, a program to each block of `tokens` tokens of
    one sequence and one of `heads` heads. Its arguments: the inputs, the outputs (contiguous), T, heads, the
    scalars, the first three strides of each (B, T, heads, D) input (made unit-stride along D here), then the
    constexprs with D, BD (D's power of two) and BT."""
    inputs = [x if x.dim() < 4 or x.stride(-1) == 1 else x.contiguous() for x in inputs]
    B, T, _, D = inputs[0].shape
    strides = [s for x in inputs if x.dim() == 4 for s in x.stride()[:3]]
    # one flat grid, a sequence-and-head's token blocks side by side: CUDA caps a grid's second axis at 65535 blocks
    kernel[(-(-T // tokens) * B * heads,)](*inputs, *outputs, T, heads, *scalars, *strides, D=D,
                                           BD=1 << (D - 1).bit_length(), BT=tokens, **constexprs)


def xsa_kernels():
    """XSA_KERNEL: exclusive_self_attention as the custom op ternary_golf::xsa, with its backward, registered once a
    process (torch.compile calls it as it is). On the CPU only under TRITON_INTERPRET=1 (tests)."""
    if hasattr(torch.ops.ternary_golf, "xsa"):
        return
    forward, backward = xsa_triton_kernels()

    @torch.library.custom_op("ternary_golf::xsa", mutates_args=())
    def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = empty_contiguous(y)
        launch_head_blocks(forward, XSA_TOKENS[0], v.size(2), (y, v), (out,), G=y.size(2) // v.size(2))
        return out

    @torch.library.custom_op("ternary_golf::xsa_backward", mutates_args=())
    def xsa_backward(y: torch.Tensor, v: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gy, gv = empty_contiguous(y), empty_contiguous(v)
        launch_head_blocks(backward, XSA_TOKENS[1], v.size(2), (y, v, go), (gy, gv), G=y.size(2) // v.size(2))
        return gy, gv

    xsa.register_fake(lambda y, v: empty_contiguous(y))
    xsa_backward.register_fake(lambda y, v, go: (empty_contiguous(y), empty_contiguous(v)))
    xsa.register_autograd(lambda ctx, go: xsa_backward(*ctx.saved_tensors, go),
                          setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


NORM_ROPE_TOKENS = (32, 32)  # QK_NORM_KERNEL: the tokens one program takes, forward and backward
NORM_ROPE_WARPS = (4, 4)  # and the warps that run it


def norm_rope_triton_kernels():
    """QK_NORM_KERNEL's two Triton kernels, (forward, backward). A program takes NORM_ROPE_TOKENS tokens of one head:
    F.rms_norm of each row, times the head's gain, then Rotary's rotation of its first 2 * HALF channels (channel d
    with d + HALF), in fp32 registers. The backward also writes each program's share of the gain's gradient.
    The angles' cos and sin come as (T, HALF) tables: session 19's kernels computed them for each element, and
    that arithmetic made them slower than inductor's code (9.5 ms of the step against about 6)."""
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_forward_kernel(x, gain, cos, sin, out, T, H, eps, sxb, sxt, sxh,
                                 D: tl.constexpr, BD: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr):
        blocks = tl.cdiv(T, BT)
        bh, tb = tl.program_id(0) // blocks, tl.program_id(0) % blocks
        b, h = (bh // H).to(tl.int64), bh % H
        t, d = tb * BT + tl.arange(0, BT), tl.arange(0, BD)
        mask = (t < T)[:, None] & (d < D)[None, :]
        partner = tl.where(d < HALF, d + HALF, tl.where(d < 2 * HALF, d - HALF, d))  # itself past the rotated ones
        rows = x + b * sxb + t[:, None] * sxt + h * sxh
        xv = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)[:, None] * tl.load(gain + h).to(tl.float32)
        at, rotated = t[:, None] * HALF + (d % HALF)[None, :], mask & (d < 2 * HALF)[None, :]
        c, s = tl.load(cos + at, mask=rotated, other=1.0), tl.load(sin + at, mask=rotated, other=0.0)
        o = (xv * c + tl.where(d < HALF, -1.0, 1.0)[None, :] * xp * s) * scale  # unrotated lanes: c 1, s 0
        tl.store(out + ((b * T + t[:, None]) * H + h) * D + d[None, :], o, mask=mask)

    @triton.jit
    def norm_rope_backward_kernel(x, gain, cos, sin, go, gx, g_gain, T, H, eps, sxb, sxt, sxh, sob, sot, soh,
                                  D: tl.constexpr, BD: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr):
        blocks = tl.cdiv(T, BT)
        bh, tb = tl.program_id(0) // blocks, tl.program_id(0) % blocks
        b, h = (bh // H).to(tl.int64), bh % H
        t, d = tb * BT + tl.arange(0, BT), tl.arange(0, BD)
        mask = (t < T)[:, None] & (d < D)[None, :]
        partner = tl.where(d < HALF, d + HALF, tl.where(d < 2 * HALF, d - HALF, d))
        xv = tl.load(x + b * sxb + t[:, None] * sxt + h * sxh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        rows = go + b * sob + t[:, None] * sot + h * soh
        o = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        op = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        at, rotated = t[:, None] * HALF + (d % HALF)[None, :], mask & (d < 2 * HALF)[None, :]
        c, s = tl.load(cos + at, mask=rotated, other=1.0), tl.load(sin + at, mask=rotated, other=0.0)
        g_y = o * c - tl.where(d < HALF, -1.0, 1.0)[None, :] * op * s  # the rotation's transpose
        r = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)[:, None]
        x_hat = xv * r
        tl.store(g_gain + tl.program_id(0), tl.sum(tl.sum(g_y * x_hat, 1), 0))  # this program's share
        g_hat = g_y * tl.load(gain + h).to(tl.float32)
        g_x = r * (g_hat - x_hat * (tl.sum(g_hat * x_hat, 1) / D)[:, None])
        tl.store(gx + ((b * T + t[:, None]) * H + h) * D + d[None, :], g_x, mask=mask)

    return norm_rope_forward_kernel, norm_rope_backward_kernel


def norm_rope_kernels():
    """QK_NORM_KERNEL: q's and k's RMSNorm, gain and RoPE as the custom op ternary_golf::norm_rope(x, gain, cos, sin),
    cos and sin Rotary.tables of x's length, with its backward, registered once a process. eps is F.rms_norm's
    default for x's dtype. On the CPU only under TRITON_INTERPRET=1 (tests)."""
    if hasattr(torch.ops.ternary_golf, "norm_rope"):
        return
    forward, backward = norm_rope_triton_kernels()

    def launch(kernel, i, x, inputs, outputs):
        cos = inputs[2]
        if cos.shape != (x.size(1), cos.size(1)) or not cos.is_contiguous():  # the kernels index rows t * HALF
            raise ValueError(f"norm_rope: cos/sin tables {tuple(cos.shape)} for {x.size(1)} tokens; want (T, HALF)")
        launch_head_blocks(kernel, NORM_ROPE_TOKENS[i], x.size(2), inputs, outputs, torch.finfo(x.dtype).eps,
                           HALF=cos.size(1), num_warps=NORM_ROPE_WARPS[i])

    @torch.library.custom_op("ternary_golf::norm_rope", mutates_args=())
    def norm_rope(x: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = empty_contiguous(x)
        launch(forward, 0, x, (x, gain, cos, sin), (out,))
        return out

    @torch.library.custom_op("ternary_golf::norm_rope_backward", mutates_args=())
    def norm_rope_backward(x: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gx = empty_contiguous(x)
        blocks = -(-x.size(1) // NORM_ROPE_TOKENS[1])
        shares = x.new_empty(x.size(0), x.size(2), blocks, dtype=torch.float32)  # one a program
        launch(backward, 1, x, (x, gain, cos, sin, go), (gx, shares))
        return gx, shares.sum((0, 2)).to(gain.dtype)

    norm_rope.register_fake(lambda x, gain, cos, sin: empty_contiguous(x))
    norm_rope_backward.register_fake(lambda x, gain, cos, sin, go: (empty_contiguous(x), empty_contiguous(gain)))
    norm_rope.register_autograd(lambda ctx, go: (*norm_rope_backward(*ctx.saved_tensors, go), None, None),
                                setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def has_forward_hooks(modules):
    """Whether a module has forward hooks (LoRA TTT's adapters), which only its own call runs: a fused path that skips
    the call (FUSED_QKV, MLP_KERNEL) would drop them silently. Training's model has none, and dynamo guards on the
    empty dicts: one graph."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class CausalSelfAttention(nn.Module):
    def __init__(self, h, flash):
        super().__init__()
        d, hd = h.model_dim, h.head_dim
        self.h, self.num_heads, self.num_kv_heads, self.head_dim, self.flash = h, h.num_heads, h.num_kv_heads, hd, flash
        self.q = TernaryLinear(d, h.num_heads * hd, h.group_size)
        self.k = TernaryLinear(d, h.num_kv_heads * hd, h.group_size)
        self.v = TernaryLinear(d, h.num_kv_heads * hd, h.group_size)
        self.proj = TernaryLinear(h.num_heads * hd, d, h.group_size, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.rotary = Rotary(hd, h.rope_rotated, h.rope_base)
        if h.value_residual:
            self.value_mix = nn.Parameter(torch.tensor(0.5))
        if h.attn_gate:
            self.head_gate = nn.Parameter(torch.zeros(h.num_heads, d))  # sigmoid(0): every head at half, proj at 0
        if h.xsa_kernel:
            xsa_kernels()
        if h.qk_norm_kernel:
            norm_rope_kernels()
            self.register_buffer("k_gain", torch.ones(h.num_kv_heads), persistent=False)  # k is normed without one

    def qkv(self, x):
        """FUSED_QKV: (q, k, v) = x @ [Wq; Wk; Wv]^T in one GEMM, each W the layer's own quantized_weight() (whatever
        its quantizer, FP-phase blend or frozen copy), so the gradient reaches each latent weight straight through and
        the three parameters stay separate for the optimizer and the export."""
        layers = (self.q, self.k, self.v)
        if has_forward_hooks(layers):
            return tuple(m(x) for m in layers)
        # cast, then cat: the cast is elementwise, so the bits are the same either way, each weight is cast as
        # TernaryLinear.forward casts it, and with bf16 x the cat copies half of fp32's bytes (with fp32 x under
        # autocast the casts are no-ops and F.linear casts the one cat weight); inductor fuses all of it anyway
        w = torch.cat([m.quantized_weight().to(x.dtype) for m in layers])
        return F.linear(x, w).split([m.out_features for m in layers], dim=-1)

    def forward(self, x, v_first=None):
        """(output, this layer's values before mixing: the first attention layer's feed the value residual)."""
        h = self.h
        B, T, _ = x.shape
        if h.fused_qkv:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS heads
        v_own = v
        if h.value_residual:
            # ResFormer: later layers add a learned share of the first attention layer's values. The first layer
            # (v_first None) mixes in its own, a plain rescale, so that its parameter is in the graph as DDP wants.
            v = v + self.value_mix.to(v.dtype) * (v if v_first is None else v_first)
        # qk-norm keeps ternary-scale drift out of the attention logits; q_gain sets their temperature
        if h.qk_norm_kernel:
            norm_rope, tables = torch.ops.ternary_golf.norm_rope, self.rotary.tables(T, x.device)
            q, k = norm_rope(q, self.q_gain, *tables), norm_rope(k, self.k_gain, *tables)
        else:
            q = rms_norm(q) * self.q_gain.to(q.dtype)[:, None]
            k = rms_norm(k)
            q, k = self.rotary(q), self.rotary(k)
        y = causal_attention(q, k, v, self.flash)
        if h.xsa_enabled:
            y = torch.ops.ternary_golf.xsa(y, v) if h.xsa_kernel else exclusive_self_attention(y, v)
        if h.attn_gate:
            y = self.gate_heads(x, y)
        return self.proj(y.reshape(B, T, -1)), v_own

    def gate_heads(self, x, y):
        """ATTN_GATE (gated attention, Qiu et al. 2025): head j's output times sigmoid(g_j . x_t), a gate read from the
        token's own layer input. A head can go quiet for a token without parking its attention on a sink token,
        and the gate adds a nonlinearity between the value and output projections. 6 x 768 floats a layer."""
        return y * torch.sigmoid(F.linear(x, self.head_gate.to(x.dtype)))[..., None]


def chunked_decay_scan(u, decay, chunk):
    """s_t = decay * s_{t-1} + u_t per channel, s_{-1} = 0, for u (B, T, N) and decay (N,) in (0, 1).
    Inside a chunk the scan is one product with the decay matrix decay^(t-s) (s <= t); between chunks the last
    state is carried. Any T works: the tail is zero-padded to whole chunks and cut off again."""
    B, T, N = u.shape
    pad = (-T) % chunk
    if pad:
        u = F.pad(u, (0, 0, 0, pad))
    n = u.size(1) // chunk
    u = u.view(B, n, chunk, N)
    t = torch.arange(chunk, device=u.device)
    lag = (t[:, None] - t[None, :]).float()
    log_decay = torch.log(decay.float())
    matrix = torch.exp(lag.clamp_min(0)[..., None] * log_decay) * (lag >= 0)[..., None].float()  # (C, C, N)
    intra = torch.einsum("tsn,bksn->bktn", matrix.to(u.dtype), u).float()
    carry = torch.exp((t + 1).float()[:, None] * log_decay)  # decay^(t+1): how much of the entering state is left
    state, out = u.new_zeros(B, N, dtype=torch.float32), []
    for c in range(n):
        y = intra[:, c] + carry * state[:, None]
        out.append(y)
        state = y[:, -1]
    return torch.stack(out, dim=1).view(B, n * chunk, N)[:, :T]


class SKCMixer(nn.Module):
    """SKC token mixer: a causal linear recurrence in a learned spectral basis. W_in rotates the input into the
    basis, each basis channel decays at its own learned rate (timescales initialised log-spaced from 1 token to
    the sequence length), s_t = a * s_{t-1} + (1 - a) * u_t, and a SiLU gate of the input selects what to read:
    out = W_out(s * silu(W_gate x)). Linear in T, no attention matrix."""

    def __init__(self, h):
        super().__init__()
        d, self.chunk = h.model_dim, h.skc_chunk
        self.inp = TernaryLinear(d, d, h.group_size)
        self.gate = TernaryLinear(d, d, h.group_size)
        self.out = TernaryLinear(d, d, h.group_size, zero_init=True)
        timescale = torch.logspace(0, math.log10(max(h.train_seq_len, 2)), d)
        decay = torch.exp(-1.0 / timescale).clamp(0.05, 0.9995)
        self.decay_logit = nn.Parameter(torch.log(decay / (1 - decay)))

    def forward(self, x, v_first=None):
        decay = torch.sigmoid(self.decay_logit.float())
        u = self.inp(x).float() * (1 - decay)
        s = chunked_decay_scan(u, decay, self.chunk)
        return self.out(s.to(x.dtype) * F.silu(self.gate(x))), None


# MLP_KERNEL: (BM, BN, BK, warps, stages) of the up GEMM and the down GEMM's input gradient (the first's BN, BK the
# largest: the config checks them). s22 on an H200 (.bench/mlp_tma_bench.py): 447-448 and 576-595 us against the
# pointer kernel's (s21) 497 and 658-694 us and cuBLAS + inductor's 609 and 708 us; cuBLAS alone (no relu^2) 428, 442
MLP_TILES = ((128, 256, 64, 8, 3), (128, 256, 64, 8, 3))
MLP_GROUP = 8  # MLP_KERNEL: row blocks that walk one column block of the output together (their rows stay in L2)


def relu2_gemm_triton_kernel():
    """MLP_KERNEL's Triton GEMM c = a @ b^T (BT: b (N, K), the up GEMM's W) or a @ b (b (K, N), the down GEMM's W in
    its input gradient), with an epilogue in fp32 registers: EPI 0 writes relu(c)^2, EPI 1 writes c times relu^2's
    derivative 2 relu(h), read as 2 sqrt(aux) from the stored aux = relu(h)^2, so h is never stored. Persistent
    (each program walks tiles `progs` apart; flattened, a tile's epilogue overlaps the next one's loads), TMA loads
    and stores (which pad or clip the rows past M), the epilogue on two column halves (fewer live registers). Loop
    trips: `iters`, or the constexpr ITERS under the interpreter, which wants python ints there."""
    import triton
    import triton.language as tl

    @triton.jit
    def relu2_gemm_kernel(a, b, c, aux, iters, tiles, num_n, progs, ITERS: tl.constexpr, K: tl.constexpr,
                          BT: tl.constexpr, EPI: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        per_group, num_m = GROUP * num_n, tiles // num_n
        for t in tl.range(0, ITERS if ITERS > 0 else iters, flatten=True):  # (an assigned bound is a tensor there)
            tile = tl.minimum(tl.program_id(0) + t * progs, tiles - 1)  # spare programs of the last round redo it
            first = tile // per_group * GROUP
            rows = tl.minimum(num_m - first, GROUP)
            om, on = (first + tile % per_group % rows) * BM, tile % per_group // rows * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                w = b.load([on, k]).T if BT else b.load([k, on])
                if IEEE:  # fp32 operands (the tests'): exact products, not tf32's
                    acc = tl.dot(a.load([om, k]), w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.load([om, k]), w, acc)
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            if EPI == 0:
                h0, h1 = tl.maximum(h0, 0.0) * tl.maximum(h0, 0.0), tl.maximum(h1, 0.0) * tl.maximum(h1, 0.0)
            else:
                h0 = h0 * 2.0 * tl.sqrt(aux.load([om, on]).to(tl.float32))
                h1 = h1 * 2.0 * tl.sqrt(aux.load([om, on + BN // 2]).to(tl.float32))
            c.store([om, on], h0.to(c.dtype))
            c.store([om, on + BN // 2], h1.to(c.dtype))

    return relu2_gemm_kernel


def mlp_kernels():
    """MLP_KERNEL: the custom ops ternary_golf::relu2_mlp(x (M, D), w_up (H, D), w_down (D, H)) -> (x w_up^T relu^2'd
    (a), then a w_down^T) and its backward, which writes the input, up and down gradients from a alone, registered
    once a process; Relu2MLP is their autograd. On the CPU only under TRITON_INTERPRET=1 (tests), whose bf16 dot is
    wrong (Triton 3.5): fp32 and fp16 there; 3 programs there, so that they walk several tiles."""
    if hasattr(torch.ops.ternary_golf, "relu2_mlp"):
        return
    from triton.tools.tensor_descriptor import TensorDescriptor
    kernel = relu2_gemm_triton_kernel()

    def gemm(x, w, epi, aux):  # epi 0: x @ w^T, w (N, K); epi 1: x @ w, w (K, N); then the epilogue
        x, w = x.contiguous(), w.contiguous()
        (M, K), N = x.shape, w.size(epi)
        bm, bn, bk, warps, stages = MLP_TILES[epi]
        c = x.new_empty(M, N)
        tiles = -(-M // bm) * (N // bn)
        interpreted = x.device.type == "cpu"  # (Triton runs on the CPU only under its interpreter)
        sms = 3 if interpreted else torch.cuda.get_device_properties(x.device).multi_processor_count
        iters = -(-tiles // sms)
        progs = -(-tiles // iters)  # as few spare programs in the last round as the trips allow
        desc = functools.partial(TensorDescriptor.from_tensor, block_shape=[bm, bn // 2])
        kernel[(progs,)](TensorDescriptor.from_tensor(x, [bm, bk]),
                         TensorDescriptor.from_tensor(w, [bn, bk] if epi == 0 else [bk, bn]), desc(c),
                         desc(c if aux is None else aux.contiguous()),  # epilogue 0 reads no aux
                         iters, tiles, N // bn, progs, ITERS=iters if interpreted else 0, K=K, BT=epi == 0, EPI=epi,
                         IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk, GROUP=MLP_GROUP, num_warps=warps,
                         num_stages=stages)
        return c

    @torch.library.custom_op("ternary_golf::relu2_mlp", mutates_args=())
    def relu2_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = gemm(x, w_up, 0, None)
        return a @ w_down.t(), a

    @torch.library.custom_op("ternary_golf::relu2_mlp_backward", mutates_args=())
    def relu2_mlp_backward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor,
                           g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g_h = gemm(g, w_down, 1, a)
        return g_h @ w_up, g_h.t() @ x, g.t() @ a

    relu2_mlp.register_fake(lambda x, w_up, w_down: (x.new_empty(x.size(0), w_down.size(0)),
                                                     x.new_empty(x.size(0), w_up.size(0))))
    relu2_mlp_backward.register_fake(lambda x, w_up, w_down, a, g: tuple(map(empty_contiguous, (x, w_up, w_down))))


class Relu2MLP(torch.autograd.Function):
    """MLP_KERNEL's autograd over its two ops: the output alone is differentiable, so that autograd never builds a
    zero gradient for the (tokens, hidden) activations a, which the backward reads instead of h."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        out, a = torch.ops.ternary_golf.relu2_mlp(x, w_up, w_down)
        ctx.save_for_backward(x, w_up, w_down, a)
        return out

    @staticmethod
    def backward(ctx, g):
        return torch.ops.ternary_golf.relu2_mlp_backward(*ctx.saved_tensors, g)


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h
        self.up = TernaryLinear(h.model_dim, h.mlp_hidden, h.group_size)
        self.down = TernaryLinear(h.mlp_hidden, h.model_dim, h.group_size, zero_init=True)
        self.leaky = h.mlp_act == "leaky_relu2"
        if h.mlp_kernel:
            mlp_kernels()

    def activation(self, x):
        u = self.up(x)
        return (F.leaky_relu(u, 0.5) if self.leaky else F.relu(u)).square()

    def forward(self, x):
        if self.h.mlp_kernel:
            return self.kernel_forward(x)
        return self.down(self.activation(x))

    def kernel_forward(self, x):
        """MLP_KERNEL: the MLP through Relu2MLP, on x in autocast's dtype as F.linear would take it, and each layer's
        quantized weight (whatever its quantizer) cast alike, so the gradients reach the latent weights straight
        through. Modules with forward hooks (LoRA TTT's adapters) keep their own calls: only those run the hooks."""
        if has_forward_hooks((self.up, self.down)):
            return self.down(self.activation(x))
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w_up, w_down = (m.quantized_weight().to(x.dtype) for m in (self.up, self.down))
        return Relu2MLP.apply(x.flatten(0, -2), w_up, w_down).view(*x.shape[:-1], -1)


class MoEMLP(MLP):
    """Ternary mixture of experts: the MLP's hidden units split into MOE_EXPERTS experts (so the parameter count
    is the dense MLP's), a router picks the top-k per token. Every expert runs on every token and the routing
    weights (zero where not routed) scale its hidden units: the dense MLP's FLOPs, static shapes for compile,
    and an expert that no token chose gets an exactly-zero gradient. At k = 1 the weight is the router
    probability itself (no renormalisation, so the router still learns); at k > 1 the chosen ones are
    renormalised. Returns (output, Switch load-balancing loss)."""

    def __init__(self, h):
        super().__init__(h)
        self.experts, self.top_k = h.moe_experts, h.moe_top_k
        self.router = nn.Parameter(torch.randn(h.moe_experts, h.model_dim) * 0.02)
        self.up.weight.sparse_decay = self.down.weight.sparse_decay = True  # Muon: idle experts are not decayed

    def forward(self, x):
        probs = torch.softmax(F.linear(x.float(), self.router.float()), dim=-1)  # (B, T, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        routed = torch.zeros_like(probs).scatter(-1, top_i, 1.0 / self.top_k)
        balance = self.experts * (routed.flatten(0, -2).mean(0) * probs.flatten(0, -2).mean(0)).sum()
        u = self.activation(x)
        u = (u.unflatten(-1, (self.experts, -1)) * weights.to(u.dtype)[..., None]).flatten(-2)
        return self.down(u), balance


class SmearGate(nn.Module):
    """x_t += sigmoid(w . x_t + b) * x_{t-1} on the embeddings: a cheap bigram path. The gate is zero where
    token t starts a document (BOS), so no token borrows from the previous document; position 0 of a window
    has no previous token and is left alone."""

    def __init__(self, h):
        super().__init__()
        self.bos_id = h.bos_id
        self.weight = nn.Parameter(torch.zeros(h.model_dim))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, x, idx):
        gate = torch.sigmoid(x[:, 1:] @ self.weight.to(x.dtype) + self.bias.to(x.dtype))
        gate = gate * (idx[:, 1:] != self.bos_id).to(x.dtype)
        return torch.cat((x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]), dim=1)


ENGRAM_PRIMES = (1000003, 1000033, 1000037, 1000039, 1000081, 1000099, 1000117, 1000121,
                 999983, 999979, 999961, 999959, 999953, 999931, 999917, 999907)


class EngramHash(nn.Module):
    """Hashed n-gram embeddings. For each order n and head j, the last n tokens (t-n+1..t, nothing after t) hash
    with head j's own primes into ENGRAM_BUCKETS rows of that (order, head)'s table; the vectors are concatenated,
    normalised, projected to the model width and added through a context-aware sigmoid gate bounded by
    ENGRAM_SCALE. The tables are float parameters of the artifact and count toward the cap."""

    def __init__(self, h):
        super().__init__()
        self.orders, self.heads, self.buckets, self.scale = h.engram_order_list, h.engram_heads, h.engram_buckets, h.engram_scale
        n_tables = len(self.orders) * self.heads
        self.table = nn.Embedding(n_tables * self.buckets, h.engram_dim)
        nn.init.normal_(self.table.weight, std=1.0)
        self.proj = TernaryLinear(n_tables * h.engram_dim, h.model_dim, h.group_size, zero_init=True)
        self.gate = nn.Parameter(torch.zeros(h.model_dim))
        self.gate_bias = nn.Parameter(torch.zeros(()))

    def bucket_ids(self, idx):
        """(B, T, n_tables) row ids into the shared table; tokens before the window hash as 0 (real ones as id+1)."""
        ids, k = [], 0
        for n in self.orders:
            shifted = [F.pad(idx + 1, (lag, 0))[:, : idx.size(1)] for lag in range(n)]
            for j in range(self.heads):
                primes = ENGRAM_PRIMES[j * max(self.orders) : j * max(self.orders) + n]
                key = sum(s * p for s, p in zip(shifted, primes))
                ids.append(key % self.buckets + k * self.buckets)
                k += 1
        return torch.stack(ids, dim=-1)

    def forward(self, x, idx):
        e = self.table(self.bucket_ids(idx)).flatten(-2)
        e = F.rms_norm(e, (e.size(-1),)).to(x.dtype)
        gate = torch.sigmoid(rms_norm(x) @ self.gate.to(x.dtype) + self.gate_bias.to(x.dtype))
        return self.scale * gate[..., None] * self.proj(e)


def hadamard(n):
    """Orthonormal Sylvester Hadamard matrix, n a power of two."""
    m = torch.ones(1, 1)
    while m.size(0) < n:
        m = torch.cat((torch.cat((m, m), 1), torch.cat((m, -m), 1)), 0)
    return m / math.sqrt(n)


class CapsuleBank(nn.Module):
    """Koopman capsules: CAPSULE_COUNT state vectors of width CAPSULE_DIM (S in all) that summarise the past chunk
    by chunk. Chunk c's mean hidden state is encoded into an observation o_c, and the state evolves linearly:
    s_c = A s_{c-1} + o_c with A = H (diag(D) + U V^T) H^T (H Hadamard; |D| < 1 is restored after every optimizer
    step by clamp_dynamics). Every token of chunk c reads s_{c-1}, the state of earlier chunks only, so the bank
    is strictly causal; the read starts closed (cold-start gate tanh(g), g = 0) and opens as it becomes useful.
    The state can be passed in and is returned, so evaluation carries it from one window to the next.
    Consistency loss: the Koopman operator should also predict the next observation, o_{c+1} ~ A o_c."""

    def __init__(self, h):
        super().__init__()
        S, self.chunk, self.max_decay = h.capsule_state_dim, h.capsule_chunk, h.capsule_max_decay
        self.encode = TernaryLinear(h.model_dim, S, h.group_size)
        self.read = TernaryLinear(S, h.model_dim, h.group_size)
        self.diag = nn.Parameter(torch.linspace(0.5, h.capsule_max_decay, S))
        self.u = nn.Parameter(torch.randn(S, h.capsule_rank) * 0.01)
        self.v = nn.Parameter(torch.randn(S, h.capsule_rank) * 0.01)
        self.gate = nn.Parameter(torch.zeros(()))
        self.register_buffer("rotation", hadamard(S), persistent=False)

    def dynamics(self):
        return self.rotation @ (torch.diag(self.diag) + self.u @ self.v.T) @ self.rotation.T

    @torch.no_grad()
    def clamp_dynamics(self):
        self.diag.clamp_(-self.max_decay, self.max_decay)

    def forward(self, x, state=None):
        """x (B, T, d) -> (update (B, T, d), consistency loss, final state (B, S), state each token read (B, T, S))."""
        B, T, _ = x.shape
        pad = (-T) % self.chunk
        valid = F.pad(x.new_ones(B, T, 1), (0, 0, 0, pad)).view(B, -1, self.chunk, 1)
        pooled = (F.pad(x, (0, 0, 0, pad)).view(B, -1, self.chunk, x.size(-1)) * valid).sum(2) / valid.sum(2)
        obs = F.rms_norm(self.encode(pooled).float(), (self.rotation.size(0),))  # (B, chunks, S)
        A = self.dynamics()
        s = obs.new_zeros(B, A.size(0)) if state is None else state.float()
        read = []
        for c in range(obs.size(1)):
            read.append(s)
            s = s @ A.T + obs[:, c]
        per_token = torch.stack(read, dim=1).repeat_interleave(self.chunk, dim=1)[:, :T]
        update = torch.tanh(self.gate).to(x.dtype) * self.read(F.rms_norm(per_token, (per_token.size(-1),)).to(x.dtype))
        consistency = (obs[:, 1:] - obs[:, :-1] @ A.T).square().mean() if obs.size(1) > 1 else obs.new_zeros(())
        return update, consistency, s, per_token


class FeedbackAdapters(nn.Module):
    """Feedback passes: pass 1 is blind; pass p > 1 re-runs the stack with, at every layer, a gated adapter of a
    sketch of pass p-1. The sketch at t is the running mean of the previous pass's final hidden states over
    positions <= t (a prefix summary: pooling the whole window would leak the future). Gates start at 0, so a
    fresh model's later passes repeat pass 1."""

    def __init__(self, h):
        super().__init__()
        self.adapters = nn.ModuleList(
            [TernaryLinear(h.model_dim, h.model_dim, h.group_size) for _ in range(h.feedback_passes - 1)]
        )
        self.gates = nn.Parameter(torch.zeros(h.feedback_passes - 1, h.num_layers, h.model_dim))

    @staticmethod
    def sketch(x):
        n = torch.arange(1, x.size(1) + 1, device=x.device, dtype=torch.float32)
        return (x.float().cumsum(dim=1) / n[:, None]).to(x.dtype)

    def forward(self, p, x):
        return self.adapters[p](self.sketch(x))


def build_mixer(h, flash, j):
    """Token mixer of physical block j: SKC where SKC_PATTERN (repeated to depth) says S, attention elsewhere."""
    if h.skc_enabled:
        if h.skc_pattern[j % len(h.skc_pattern)] == "S":
            return SKCMixer(h)
    return CausalSelfAttention(h, flash)


class Block(nn.Module):
    """Pre-norm residual block: a token mixer (attention, or SKC) then an MLP (dense, or MoE). With
    PARALLEL_RESIDUAL both lanes read the same normalised input and their zero-initialised output projections
    merge into the stream together. The residual scales are per layer and passed in, so SHARED_BLOCKS can reuse
    one block at several depths. Returns (x, the mixer's values, auxiliary loss)."""

    def __init__(self, h, mixer):
        super().__init__()
        self.h = h
        self.mixer_norm, self.mixer = RMSNorm(h.model_dim), mixer
        if not h.parallel_residual:
            self.mlp_norm = RMSNorm(h.model_dim)
        if h.moe_enabled:
            self.mlp = MoEMLP(h)
        else:
            self.mlp = MLP(h)

    def forward(self, x, scales, v_first=None):
        h = self.h
        aux = 0.0
        scales = scales.to(x.dtype)
        n = self.mixer_norm(x)
        mixed, v = self.mixer(n, v_first)
        if not h.parallel_residual:
            x = x + scales[0] * mixed
            n = self.mlp_norm(x)
        if h.moe_enabled:
            out, aux = self.mlp(n)
        else:
            out = self.mlp(n)
        if h.parallel_residual:
            return x + scales[0] * mixed + scales[1] * out, v, aux
        return x + scales[1] * out, v, aux


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------


# FUSED_LOSS: rows of tokens per chunk. Big enough that a chunk's three GEMMs (16384 rows by 8192 logits at the
# default vocabulary) fill an H100, small enough that its fp32 logits are 512 MiB, not a 65536-token batch's 2 GiB
FUSED_LOSS_CHUNK = 16384


class FusedSoftcapCrossEntropy(torch.autograd.Function):
    """FUSED_LOSS: mean cross-entropy (+ z_loss * mean lse^2) of the logits cap * tanh(x @ weight.T / cap) (no cap at
    0) against targets, x (N, D). The forward computes the gradients too, a chunk of rows at a time, so the (N, V)
    logits are never whole nor kept for the backward, which only scales them by the loss's gradient (Liger's fused
    linear cross-entropy). The GEMMs run in the dtype F.linear gives (bf16 under autocast), the rest in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap, z_loss, chunk=FUSED_LOSS_CHUNK):
        n, w = x.size(0), weight.to(x.dtype)  # cast once for every chunk's GEMM
        vocab = torch.arange(weight.size(0), device=x.device)
        loss, gxs, gw = 0.0, [], torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, n, chunk):
            xc, tc = x[i : i + chunk], targets[i : i + chunk]
            logits = F.linear(xc, w)  # under autocast the plain path's bf16 GEMM
            z = logits.float()
            if cap:
                t = torch.tanh(z / cap)
                z = cap * t
            lse = torch.logsumexp(z, dim=-1)
            loss = loss + (lse - z.gather(1, tc[:, None])[:, 0] + z_loss * lse.square()).sum()
            # d/dz of lse - z[target] + z_loss * lse^2: softmax(z) (1 + 2 z_loss lse) - onehot(target)
            onehot = vocab == tc[:, None]
            gz = torch.exp(z - lse[:, None]) * (1 + 2 * z_loss * lse[:, None]) - onehot.float()
            if cap:
                gz = gz * (1 - t * t)  # through cap * tanh(l / cap)
            gl = (gz / n).to(logits.dtype)
            gxs.append(gl @ weight.to(gl.dtype))
            gw = gw + (gl.t() @ xc.to(gl.dtype)).float()  # chunks summed in fp32
        ctx.save_for_backward(torch.cat(gxs).to(x.dtype), gw.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, g):
        gx, gw = ctx.saved_tensors
        return gx * g, gw * g, None, None, None, None


CE_BLOCK = 4096  # CE_KERNEL: the logits a program reads at a time (a row of V logits in cdiv(V, CE_BLOCK) blocks)
CE_WARPS = 8  # and the warps that read them


def softcap_ce_triton_kernels():
    """CE_KERNEL's two Triton kernels, (forward, backward). A program takes one row of logits, z = cap * tanh(x / cap)
    (x itself at cap 0) in fp32. The forward reads the row once (an online logsumexp over blocks) and writes its lse
    and nll = lse - z[target]. The backward reads it once more and writes the gradient g_nll (softmax - onehot) +
    g_lse softmax, through the cap. Inductor's code for the 65536 x 8192 logits took 2.3 ms of session 19's step, in
    two looped reductions. The special-function units bound these kernels, so an element costs one exp and one
    reciprocal for tanh (written with exp, which Triton's interpreter, the tests', has; it saturates to +-1 for large
    |x|) and one exp for the softmax: the running max is the block's, not each lane's. That tanh is written out
    three times, as the other kernels repeat their first lines: the interpreter cannot call a nested jit helper."""
    import triton
    import triton.language as tl

    @triton.jit
    def softcap_ce_forward_kernel(x, targets, nll, lse, cap, V: tl.constexpr, CAP: tl.constexpr, BV: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base, cols = x + row * V, tl.arange(0, BV)
        m, s = tl.full([], -1e30, tl.float32), tl.full([], 0.0, tl.float32)  # the row's running max, sum of exp(z - m)
        for start in range(0, V, BV):
            inside = start + cols < V
            z = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            if CAP:
                z = cap * (2.0 / (1.0 + tl.exp(z * (-2.0 / cap))) - 1.0)  # one exp and one reciprocal an element
            z = tl.where(inside, z, -1e30)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        row_lse = m + tl.log(s)
        zt = tl.load(base + tl.load(targets + row)).to(tl.float32)
        if CAP:
            zt = cap * (2.0 / (1.0 + tl.exp(zt * (-2.0 / cap))) - 1.0)
        tl.store(lse + row, row_lse)
        tl.store(nll + row, row_lse - zt)

    @triton.jit
    def softcap_ce_backward_kernel(x, targets, lse, g_nll, g_lse, gx, cap, V: tl.constexpr, CAP: tl.constexpr,
                                   BV: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base, cols = x + row * V, tl.arange(0, BV)
        row_lse, target = tl.load(lse + row), tl.load(targets + row)
        gn, gl = tl.load(g_nll + row), tl.load(g_lse + row)
        for start in range(0, V, BV):
            inside = start + cols < V
            z = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            t = z
            if CAP:
                t = 2.0 / (1.0 + tl.exp(z * (-2.0 / cap))) - 1.0
                z = cap * t
            g = tl.exp(z - row_lse) * (gn + gl) - tl.where(start + cols == target, gn, 0.0)
            if CAP:
                g = g * (1.0 - t * t)  # through cap * tanh(x / cap)
            tl.store(gx + row * V + start + cols, g, mask=inside)

    return softcap_ce_forward_kernel, softcap_ce_backward_kernel


def softcap_ce_kernels():
    """CE_KERNEL: the custom op ternary_golf::softcap_ce(logits (N, V), targets (N,), cap) -> (nll, lse), each (N,)
    fp32, of the capped logits (cap 0: uncapped), with its backward, registered once a process. The targets must
    lie in [0, V): the kernel reads the target's logit unchecked. On the CPU only under TRITON_INTERPRET=1 (tests)."""
    if hasattr(torch.ops.ternary_golf, "softcap_ce"):
        return
    forward, backward = softcap_ce_triton_kernels()

    def launch(kernel, logits, targets, cap, *rest):  # a program a row: the kernels index row * V
        n, v = logits.shape
        kernel[(n,)](logits.contiguous(), targets.contiguous(), *rest, cap, V=v, CAP=cap > 0,
                     BV=min(CE_BLOCK, 1 << (v - 1).bit_length()), num_warps=CE_WARPS)

    def row_stats(logits):  # (nll, lse), each (N,) fp32: the op's outputs, real and fake alike
        return tuple(logits.new_empty(logits.size(0), dtype=torch.float32) for _ in range(2))

    @torch.library.custom_op("ternary_golf::softcap_ce", mutates_args=())
    def softcap_ce(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
        nll, lse = row_stats(logits)
        launch(forward, logits, targets, cap, nll, lse)
        return nll, lse

    @torch.library.custom_op("ternary_golf::softcap_ce_backward", mutates_args=())
    def softcap_ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, cap: float,
                            g_nll: torch.Tensor, g_lse: torch.Tensor) -> torch.Tensor:
        gx = empty_contiguous(logits)
        launch(backward, logits, targets, cap, lse, g_nll.float().contiguous(), g_lse.float().contiguous(), gx)
        return gx

    def backward_rule(ctx, g_nll, g_lse):
        logits, targets, lse = ctx.saved_tensors
        g_nll = torch.zeros_like(lse) if g_nll is None else g_nll  # an output the loss did not use
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        return softcap_ce_backward(logits, targets, lse, ctx.cap, g_nll, g_lse), None, None

    def save(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.cap = inputs[2]

    softcap_ce.register_fake(lambda logits, targets, cap: row_stats(logits))
    softcap_ce_backward.register_fake(lambda logits, targets, lse, cap, g_nll, g_lse: empty_contiguous(logits))
    softcap_ce.register_autograd(backward_rule, setup_context=save)


class GPT(nn.Module):
    """U-Net transformer: the first half of the layers push their outputs, the second half pops them in reverse
    and adds them with learned per-channel weights. The embedding is tied and factored through EMBED_DIM.
    The architecture-family features (SKC mixers, shared blocks, depth recurrence, capsules, feedback passes,
    EngramHash, MoE, SmearGate, ...) hook in here, each behind its own flag."""

    def __init__(self, h):
        super().__init__()
        self.h = h
        self.attn_backend, flash = resolve_attention(h.attn_impl)
        d, e = h.model_dim, h.embed_dim or h.model_dim
        self.logit_softcap, self.z_loss = h.logit_softcap, h.z_loss
        self.tok_emb = nn.Embedding(h.vocab_size, e)
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.embed_in = nn.Linear(e, d, bias=False) if e != d else None
        self.embed_out = nn.Linear(d, e, bias=False) if e != d else None
        n_blocks = h.num_layers
        if h.shared_blocks:
            n_blocks = min(h.shared_block_count, h.num_layers)
        self.blocks = nn.ModuleList([Block(h, build_mixer(h, flash, j)) for j in range(n_blocks)])
        self.num_encoder = h.num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(self.num_encoder, d))  # odd depth: last layer has no skip
        scale_init = 1.0
        if h.layer_scale:
            scale_init = h.layer_scale_init  # damped residual branches: each layer starts as a small correction
        self.layer_scales = nn.Parameter(torch.full((h.num_layers, 2, d), scale_init))  # (mixer, MLP) per layer
        self.final_norm = RMSNorm(d)
        if h.smear_gate:
            self.smear = SmearGate(h)
        if h.engram_enabled:
            self.engram = EngramHash(h)
        if h.capsules_enabled:
            self.capsules = CapsuleBank(h)
        if h.feedback_enabled:
            self.feedback = FeedbackAdapters(h)
        if h.ce_kernel:
            softcap_ce_kernels()
        if h.temperature_search:
            self.register_buffer("logit_temperature", torch.ones(()))  # set after training, travels in the artifact
        if h.ternary_calib:
            enable_calibration(self)
        if h.scale_format == "log8":
            enable_log8_scales(self)
        if h.hybrid_int:
            enable_int_linear(self, h)

    def layer_order(self, recur):
        """(layer, first visit) in execution order. Layer i runs block i mod len(blocks) (shared blocks reuse them);
        with depth recurrence on, layers [RECUR_START, RECUR_END) run a second time right after the first."""
        h = self.h
        order = [(i, True) for i in range(h.num_layers)]
        if h.depth_recur:
            if recur:
                again = [(i, False) for i in range(h.recur_start, h.recur_end)]
                order = order[: h.recur_end] + again + order[h.recur_end :]
        return order

    def embedding_weight(self):
        """EMBED_QAT: the token embedding rounded as EXPORT_EMBED stores it, with a straight-through gradient, so the
        model that trains and scores before export is the one the artifact holds."""
        w = self.tok_emb.weight
        q, scale = int_rows_quantize(w.detach(), INT_BITS[self.h.export_embed])
        return w + (q * scale - w).detach()

    def embed(self, idx):
        h = self.h
        if h.embed_qat:
            x = F.embedding(idx, self.embedding_weight())
        else:
            x = self.tok_emb(idx)
        if self.embed_in is not None:
            x = self.embed_in(x)
        x = rms_norm(x)
        if h.smear_gate:
            x = self.smear(x, idx)
        return x

    def run_layers(self, x, idx, state=None, recur=True, feedback=None):
        """One pass through the stack: (x, auxiliary loss, capsule state after the window, capsule state each token
        read). `feedback` is (pass index, adapter output) on passes after the first."""
        h = self.h
        skips, aux, v_first, read = [], 0.0, None, None
        for i, first in self.layer_order(recur):
            if h.engram_enabled:
                if i == h.engram_layer and first:
                    x = x + self.engram(x, idx)
            if h.feedback_enabled:
                if feedback is not None:
                    x = x + self.feedback.gates[feedback[0], i].to(x.dtype) * feedback[1]
            if h.capsules_enabled:
                if i == h.capsule_layer and first:
                    update, consistency, state, read = self.capsules(x, state)
                    x = x + update
                    aux = aux + h.capsule_consistency * consistency
            if i >= self.num_encoder and first and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x, v, block_aux = self.blocks[i % len(self.blocks)](x, self.layer_scales[i], v_first)
            if h.value_residual:
                if v_first is None:
                    v_first = v
            if h.moe_enabled:
                aux = aux + h.moe_balance * block_aux / h.num_layers
            if i < self.num_encoder and first:
                skips.append(x)
        return x, aux, state, read

    def feedback_passes(self, x0, idx, x, aux, state_in, state, read, recur):
        """Passes 2..FEEDBACK_PASSES on top of pass 1's (x, aux, state, read). At evaluation with FEEDBACK_HALT_TOL > 0,
        a token keeps the output of the first pass after which its signal (the capsule state it read, else its
        sketch) moved by less than the tolerance, relative to its norm. The decision at t uses position t's prefix
        quantities only, so halting is causal; the loop stops early once every token has halted."""
        h = self.h
        halting = h.feedback_halt_tol > 0 and not self.training
        signal = read if read is not None else FeedbackAdapters.sketch(x)
        halted = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        for p in range(h.feedback_passes - 1):
            x_new, aux_p, state, read_p = self.run_layers(x0, idx, state_in, recur, (p, self.feedback(p, x)))
            x_new, aux = self.final_norm(x_new), aux + aux_p
            if not halting:
                x = x_new
                continue
            new_signal = read_p if read_p is not None else FeedbackAdapters.sketch(x_new)
            x = torch.where(halted[..., None], x, x_new)
            change = (new_signal - signal).float().norm(dim=-1) / (new_signal.float().norm(dim=-1) + 1e-6)
            halted, signal = halted | (change < h.feedback_halt_tol), new_signal
            if bool(halted.all()):
                break
        return x, aux, state

    def head_inputs(self, idx, state=None, recur=True):
        """(the LM head's input: final hidden states, through embed_out if any; the head's weight; auxiliary loss;
        capsule state after the window). The logits are x @ weight.T: logits() and FUSED_LOSS both start here."""
        h = self.h
        x0 = self.embed(idx)
        x, aux, new_state, read = self.run_layers(x0, idx, state, recur)
        x = self.final_norm(x)
        if h.feedback_enabled:
            x, aux, new_state = self.feedback_passes(x0, idx, x, aux, state, new_state, read, recur)
        if self.embed_out is not None:
            x = self.embed_out(x)
        weight = self.tok_emb.weight
        if h.embed_qat:
            weight = self.embedding_weight()
        return x, weight, aux, new_state

    def logits(self, idx, state=None, recur=True):
        """(logits fp32, auxiliary loss, capsule state after the window)."""
        x, weight, aux, state = self.head_inputs(idx, state, recur)
        logits = F.linear(x, weight.to(x.dtype)).float()
        if self.logit_softcap:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits, aux, state

    def forward(self, idx, targets, recur=True):
        """Training objective: mean cross-entropy (+ z-loss) + the features' auxiliary losses."""
        h = self.h
        if h.fused_loss:
            x, weight, aux, _ = self.head_inputs(idx, recur=recur)
            loss = FusedSoftcapCrossEntropy.apply(x.flatten(0, -2), weight, targets.reshape(-1), self.logit_softcap,
                                                  self.z_loss)
            return loss + aux
        if h.ce_kernel:
            return self.kernel_loss(idx, targets, recur)
        logits, aux, _ = self.logits(idx, recur=recur)
        logits = logits.view(-1, self.tok_emb.num_embeddings)
        loss = F.cross_entropy(logits, targets.reshape(-1))
        if self.z_loss:
            loss = loss + self.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        return loss + aux

    def kernel_loss(self, idx, targets, recur):
        """CE_KERNEL: forward's objective with the capped cross-entropy (and the lse for z-loss) from the Triton op,
        which reads the head GEMM's logits as they come (bf16 under autocast)."""
        x, weight, aux, _ = self.head_inputs(idx, recur=recur)
        logits = F.linear(x, weight.to(x.dtype)).flatten(0, -2)
        nll, lse = torch.ops.ternary_golf.softcap_ce(logits, targets.reshape(-1), float(self.logit_softcap))
        loss = nll.mean()
        if self.z_loss:
            loss = loss + self.z_loss * lse.square().mean()
        return loss + aux

    def scored_logits(self, idx, state=None):
        """(logits as evaluation scores them (the fitted temperature applied), capsule state after the window)."""
        h = self.h
        logits, _, state = self.logits(idx, state)
        if h.temperature_search:
            logits = logits / self.logit_temperature
        return logits, state

    def token_nll(self, idx, targets, state=None):
        """(per-token negative log-likelihood in nats (B, T) fp32, capsule state after the window)."""
        logits, state = self.scored_logits(idx, state)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="none").view_as(targets)
        return nll, state


def count_params(model):
    ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, TernaryLinear) and m.ternary)
    total = sum(p.numel() for p in model.parameters())
    return total, ternary


# ---------------------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g, steps, dtype=torch.bfloat16):
    """Approximate U V^T of g = U S V^T with a quintic Newton-Schulz iteration (Muon's orthogonalization). g is a
    matrix, or a stack of same-shape matrices (MUON_BATCHED), each orthogonalized on its own."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    eye = torch.eye(x.size(-2), dtype=dtype, device=x.device)
    for _ in range(steps):
        s = x @ x.mT
        # a x + (b s + c s^2) x as one product: a joins the small (rows x rows) factor, so the GEMM writes the next x
        # itself, not a pointwise pass over x and the product (session 24)
        x = (a * eye + b * s + c * s @ s) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalized by Newton-Schulz, for 2-D weights. Gradients are
    already averaged across ranks by DDP (the sharding below relies on every rank holding the same gradients), so
    every rank applies the same update. With several ranks each one
    orthogonalizes only its share of the matrices (and keeps only their momentum), and one all-reduce hands
    every rank every update."""

    def __init__(self, params, lr, momentum, backend_steps, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.orthogonalize = newton_schulz

    def compile_newton_schulz(self):
        """Newton-Schulz compiled once per matrix shape (static shapes): raise dynamo's per-function recompile
        limit to the number of shapes, or the later ones would silently run eagerly."""
        shapes = {tuple(p.shape) for g in self.param_groups for p in g["params"]}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(shapes))
        self.orthogonalize = torch.compile(newton_schulz, dynamic=False, fullgraph=True)

    @staticmethod
    def scale(update, p):
        # an RMS of 1/sqrt(fan_in) for the orthogonalized update, whatever the matrix's aspect ratio; wide and square
        # matrices (factor 1) skip the pass over the update
        factor = max(1.0, p.size(0) / p.size(1)) ** 0.5
        return update if factor == 1 else update * factor

    def momentum_buffer(self, p):
        """p's momentum buffer, made (zeros) at its first step only."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    def update(self, p, group, ns_dtype):
        """The orthogonalized Nesterov-momentum update of p (advances its momentum buffer)."""
        buf = self.momentum_buffer(p)
        buf.mul_(group["momentum"]).add_(p.grad)
        update = self.orthogonalize(p.grad.add(buf, alpha=group["momentum"]), group["backend_steps"], ns_dtype)
        return self.scale(update, p)

    @staticmethod
    def share(params, owned, ns_dtype):
        """Every matrix's update on every rank, from the (index, update) pairs this rank computed: the others'
        places in one flat buffer stay zero, so a sum all-reduce gives every rank every update exactly (x + 0 = x)."""
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes), dtype=ns_dtype, device=params[0].device)
        chunks = flat.split(sizes)
        for i, update in owned:
            chunks[i].copy_(update.flatten())
        dist.all_reduce(flat)
        return [c.view_as(p) for c, p in zip(chunks, params)]

    def sharded_updates(self, params, group, ns_dtype):
        """Rank r computes the updates of matrices r, r + world, ... (and keeps only their momentum)."""
        mine = range(self.rank, len(params), self.world)
        return self.share(params, ((i, self.update(params[i], group, ns_dtype)) for i in mine), ns_dtype)

    def updates(self, params, group, ns_dtype):
        """Every matrix's update, in params' order."""
        if self.world > 1:
            return self.sharded_updates(params, group, ns_dtype)
        return (self.update(p, group, ns_dtype) for p in params)  # lazily: one update alive at a time

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ns_dtype = torch.bfloat16 if group["params"][0].is_cuda else torch.float32
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self.apply_updates(params, self.updates(params, group, ns_dtype), group)

    def apply_updates(self, params, updates, group):
        """Decay, then p <- p - lr x update. No update reads p, so the decay may come before they are made (updates
        may be lazy)."""
        if group["weight_decay"]:
            self.decay(params, group["lr"] * group["weight_decay"])
        for p, update in zip(params, updates):
            p.add_(update, alpha=-group["lr"])  # a bf16 update cast exactly inside the add, not by a copy a matrix

    @staticmethod
    def decay(params, decay):
        """p <- p (1 - decay): one foreach op for the matrices, not a kernel each (62 a step in session 20's
        profile)."""
        plain = [p for p in params if not getattr(p, "sparse_decay", False)]
        if plain:
            torch._foreach_mul_(plain, 1 - decay)
        for p in params:
            if getattr(p, "sparse_decay", False):
                # MoE experts: only rows and columns that got gradient this step (an expert nobody was routed to
                # has exactly-zero rows/columns) are decayed, so idle experts do not shrink
                g = p.grad.ne(0)
                p.mul_(1 - decay * (g.any(dim=1, keepdim=True) & g.any(dim=0, keepdim=True)))


class RowNormMuon(Muon):
    """MUON_ROW_NORM: every row of the update gets the same RMS, so no output channel's ternary scale runs away
    from the others. The overall RMS stays 1/sqrt(fan_in), so MATRIX_LR means the same as for Muon."""

    @staticmethod
    def scale(update, p):
        row_rms = update.float().pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-7
        return update / (row_rms * p.size(1) ** 0.5).to(update.dtype)


class BatchedMuon:
    """MUON_BATCHED, mixed into Muon or RowNormMuon (batched_muon_class): the matrices of one shape are
    orthogonalized together, one batched product per Newton-Schulz iteration, and their momentum advances in
    foreach ops, so a step launches a few kernels per shape instead of about ten per matrix. (The H200 profile of
    2026-11-29 saw the optimizer span 71 ms of the GPU timeline for about 2 ms of arithmetic.) With several ranks,
    rank r takes matrices r, r + world, ... of each shape, and one all-reduce hands every rank every update."""

    def updates(self, params, group, ns_dtype):
        shapes = {}
        for i, p in enumerate(params):
            shapes.setdefault(tuple(p.shape), []).append(i)
        owned = []  # (index, update) of the matrices this rank orthogonalizes
        for idx in shapes.values():
            mine = idx[self.rank :: self.world]
            if mine:
                owned += zip(mine, self.batched_update([params[i] for i in mine], group, ns_dtype).unbind(0))
        if self.world > 1:
            return self.share(params, owned, ns_dtype)
        return [u for _, u in sorted(owned, key=lambda iu: iu[0])]

    def batched_update(self, ps, group, ns_dtype):
        """The orthogonalized Nesterov updates of the same-shape matrices ps, stacked (advances their momentum)."""
        # not setdefault: its zeros_like default would be made and zero-filled at every step
        bufs = [self.momentum_buffer(p) for p in ps]
        grads = [p.grad for p in ps]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        nesterov = torch.stack(torch._foreach_add(grads, bufs, alpha=group["momentum"]))
        return self.scale(self.orthogonalize(nesterov, group["backend_steps"], ns_dtype), ps[0])


def batched_muon_class(cls):
    return type(f"Batched{cls.__name__}", (BatchedMuon, cls), {})


def subtract_updates(params, updates, lr, keep):
    """MUON_FUSED: p <- keep x p - lr x update for every matrix (keep = 1 - lr x MUON_WD: Muon's decay, in the same
    pass over p since session 24), as foreach ops that torch.compile turns into a few kernels (eagerly, one strided add
    a matrix read the transposed updates: 0.44 ms of session 23's step). The update is multiplied in fp32, as Muon's
    add does. lr and keep are 0-d tensors, so that their schedule changes no guard."""
    torch._foreach_mul_(params, keep)
    torch._foreach_sub_(params, torch._foreach_mul([u.float() for u in updates], lr))


def nesterov_newton_schulz(bufs, grads, momentum, steps, dtype):
    """MUON_FUSED: BatchedMuon's update of same-shape matrices as one function, for torch.compile to make one graph
    of (inductor fuses the foreach ops, the stack and the first cast): the momentum advances in place (bufs <-
    momentum bufs + grads), then the Nesterov sums grads + momentum bufs are stacked and orthogonalized. momentum is
    a 0-d tensor, so that its warmup changes no guard."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    return newton_schulz(torch.stack(torch._foreach_add(grads, torch._foreach_mul(bufs, momentum))), steps, dtype)


class FusedMuon:
    """MUON_FUSED, mixed over a BatchedMuon class (fused_muon_class): each shape's momentum, Nesterov sum, stack
    and Newton-Schulz in one compiled function (compile_newton_schulz), not foreach kernels, a copy and a compiled
    Newton-Schulz (session 23: the optimizer's kernels 4.18 ms a step against 4.68); then every matrix's
    p <- p - lr x update in another (subtract_updates). The momentum and lr ride in 0-d tensors refilled only when
    the schedule changes them, so steps in between launch nothing for them and no guard sees them."""

    fused, subtract = staticmethod(nesterov_newton_schulz), staticmethod(subtract_updates)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalars = {}  # (id(param group), key) -> (value, its 0-d tensor): not in param_groups, nor in state_dict

    def compile_newton_schulz(self):
        super().compile_newton_schulz()  # (raises dynamo's recompile limit to the number of shapes)
        # inductor's loop reordering fails on this graph (torch 2.11, CUDA: an AssertionError in
        # reorder_loops_by_dep_pair, session 23), so it is off for this one compile
        self.fused = torch.compile(nesterov_newton_schulz, dynamic=False, fullgraph=True,
                                   options={"loop_ordering_after_fusion": False})
        self.subtract = torch.compile(subtract_updates, dynamic=False, fullgraph=True)

    def group_scalar(self, group, key, value, device):
        """value, the group's `key`, as a 0-d tensor, refilled only when the value changes."""
        held, tensor = self.scalars.get((id(group), key), (None, None))
        if held != value:
            tensor = torch.empty((), device=device) if tensor is None else tensor
            self.scalars[id(group), key] = (value, tensor.fill_(value))
        return tensor

    def batched_update(self, ps, group, ns_dtype):
        bufs = [self.momentum_buffer(p) for p in ps]
        momentum = self.group_scalar(group, "momentum", group["momentum"], ps[0].device)
        return self.scale(self.fused(bufs, [p.grad for p in ps], momentum, group["backend_steps"], ns_dtype), ps[0])

    def apply_updates(self, params, updates, group):
        """The decay rides in subtract_updates (keep), except with MoE's sparsely decayed experts: then Muon.decay
        decays every matrix first, as it would, and keep is 1."""
        decay, device = group["lr"] * group["weight_decay"], params[0].device
        if decay and any(getattr(p, "sparse_decay", False) for p in params):
            self.decay(params, decay)
            decay = 0.0
        lr, keep = (self.group_scalar(group, k, v, device) for k, v in (("lr", group["lr"]), ("keep", 1 - decay)))
        self.subtract(params, list(updates), lr, keep)


def fused_muon_class(cls):
    return type(f"Fused{cls.__name__}", (FusedMuon, cls), {})


def optimizer_rules(h):
    """(parameter name glob, group) for every parameter the model can have. Groups: matrices (Muon: the ternary
    weights and the embedding projections), tables (Adam at EMBED_LR: embedding tables), scalars (Adam at
    SCALAR_LR: norms, gains, scales, gates, decays, router, capsule dynamics). A feature adds its rules under its
    own flag; a parameter that no rule, or two rules, name stops build_optimizers, so none lands anywhere by default."""
    rules = [("tok_emb.weight", "tables"), ("embed_in.weight", "matrices"), ("embed_out.weight", "matrices"),
             ("blocks.*.mixer.[qkv].weight", "matrices"), ("blocks.*.mixer.proj.weight", "matrices"),
             ("blocks.*.mixer.q_gain", "scalars"), ("blocks.*.mlp.up.weight", "matrices"),
             ("blocks.*.mlp.down.weight", "matrices"), ("blocks.*.mixer_norm.weight", "scalars"),
             ("blocks.*.mlp_norm.weight", "scalars"), ("final_norm.weight", "scalars"), ("skip_weights", "scalars"),
             ("layer_scales", "scalars")]
    if h.value_residual:
        rules += [("blocks.*.mixer.value_mix", "scalars")]
    if h.attn_gate:
        rules += [("blocks.*.mixer.head_gate", "scalars")]
    if h.smear_gate:
        rules += [("smear.weight", "scalars"), ("smear.bias", "scalars")]
    if h.skc_enabled:
        rules += [("blocks.*.mixer.inp.weight", "matrices"), ("blocks.*.mixer.gate.weight", "matrices"),
                  ("blocks.*.mixer.out.weight", "matrices"), ("blocks.*.mixer.decay_logit", "scalars")]
    if h.moe_enabled:
        rules += [("blocks.*.mlp.router", "scalars")]
    if h.engram_enabled:
        rules += [("engram.table.weight", "tables"), ("engram.proj.weight", "matrices"), ("engram.gate", "scalars"),
                  ("engram.gate_bias", "scalars")]
    if h.capsules_enabled:
        rules += [("capsules.encode.weight", "matrices"), ("capsules.read.weight", "matrices"),
                  ("capsules.diag", "scalars"), ("capsules.u", "scalars"), ("capsules.v", "scalars"),
                  ("capsules.gate", "scalars")]
    if h.feedback_enabled:
        rules += [("feedback.adapters.*.weight", "matrices"), ("feedback.gates", "scalars")]
    return rules


def route_parameters(model, h):
    """{group: [parameters]} by optimizer_rules, each parameter named by exactly one rule."""
    rules, groups = optimizer_rules(h), {"matrices": [], "tables": [], "scalars": []}
    for name, p in model.named_parameters():
        hits = [(pattern, group) for pattern, group in rules if fnmatch.fnmatchcase(name, pattern)]
        if len(hits) != 1:
            which = f"{len(hits)} rules {[r for r, _ in hits]}" if hits else "no rule"
            raise RuntimeError(f"parameter {name} is named by {which} of optimizer_rules; it needs exactly one "
                               "(optimizer section of train_gpt.py)")
        groups[hits[0][1]].append(p)
    return groups


def build_optimizers(model, h):
    """Muon for matrices, Adam for the embedding tables and the small parameters (see optimizer_rules)."""
    groups = route_parameters(model, h)
    matrices, tables, scalars = groups["matrices"], groups["tables"], groups["scalars"]
    fused = next(model.parameters()).is_cuda
    adam = torch.optim.AdamW(
        [
            {"params": tables, "lr": h.embed_lr, "base_lr": h.embed_lr},
            {"params": scalars, "lr": h.scalar_lr, "base_lr": h.scalar_lr},
        ],
        betas=(h.adam_beta1, h.adam_beta2), eps=h.adam_eps, weight_decay=h.adam_wd, fused=fused,
    )
    muon_class = Muon
    if h.muon_row_norm:
        muon_class = RowNormMuon
    if h.muon_batched:
        muon_class = batched_muon_class(muon_class)
    if h.muon_fused:
        muon_class = fused_muon_class(muon_class)
    muon = muon_class(matrices, h.matrix_lr, h.muon_momentum, h.muon_backend_steps, h.muon_wd)
    for g in muon.param_groups:
        g["base_lr"] = h.matrix_lr
    return [adam, muon]


class TrainingSchedule:
    """Every progress-driven switch of a run, queried with (step, elapsed): the LR multiplier, Muon's momentum and
    the phases. Progress is whichever of the step budget and the wall-clock budget is further along; `elapsed` is
    the slowest rank's clock (max-reduced), so every rank takes every decision at the same step. A phase is on from
    the progress in `starts`: a new phase is one line in __init__. Phases named in GRAPH_PHASES are forward
    arguments of the model (a graph each under compile), which compile_warmup compiles before the timed run."""

    GRAPH_PHASES = ("recur",)

    def __init__(self, h):
        self.h, self.starts = h, {}
        if h.depth_recur:
            self.starts["recur"] = h.recur_from_frac  # layers [RECUR_START, RECUR_END) run twice
        if h.ternary_calib:
            self.starts["calib"] = h.calib_at_frac  # < 1: calibrate then, and train on through the calibration
        if h.fp_phase:
            self.starts["qat"] = h.qat_start_frac  # the ternary quantizer blends in (quant_mix)

    def progress(self, step, elapsed):
        """Fraction of the run done."""
        h = self.h
        progress = step / h.iterations
        if h.max_wallclock_seconds:
            progress = max(progress, elapsed / h.max_wallclock_seconds)
        return progress

    def on(self, phase, step, elapsed):
        return self.progress(step, elapsed) >= self.starts[phase]

    def lr(self, step, elapsed):
        """Linear warmup over WARMUP_STEPS, then 1, then over the last WARMDOWN_FRAC of the run a warmdown (linear or
        half-cosine) from 1 to WARMDOWN_MIN_LR."""
        h = self.h
        if h.warmup_steps and step < h.warmup_steps:
            return (step + 1) / h.warmup_steps
        progress = self.progress(step, elapsed)
        if h.warmdown_frac and progress > 1 - h.warmdown_frac:
            left = max(0.0, (1 - progress) / h.warmdown_frac)  # of the warmdown: 1 at its start, 0 at the end
            if h.warmdown_shape == "cosine":
                left = 0.5 * (1 - math.cos(math.pi * left))
            return h.warmdown_min_lr + (1 - h.warmdown_min_lr) * left
        return 1.0

    def momentum(self, step):
        """Muon's momentum: linear from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over MUON_MOMENTUM_WARMUP_STEPS."""
        h = self.h
        if not h.muon_momentum_warmup_steps:
            return h.muon_momentum
        frac = min(step / h.muon_momentum_warmup_steps, 1.0)
        return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum

    def quant_mix(self, step, elapsed):
        """FP_PHASE: 0 (latent weights unquantized) before QAT_START_FRAC, then 1 (ternary), or a linear ramp from 0
        to 1 over QAT_RAMP_FRAC."""
        h = self.h
        into = self.progress(step, elapsed) - self.starts["qat"]
        if into < 0:
            return 0.0
        return min(1.0, into / h.qat_ramp_frac) if h.qat_ramp_frac else 1.0

    def forward_kwargs(self, step, elapsed):
        return {p: self.on(p, step, elapsed) for p in self.GRAPH_PHASES if p in self.starts}

    def compile_variants(self):
        """The graph phases' combinations the run reaches after step 0: they switch on in the order of their starts."""
        ordered = sorted((p for p in self.GRAPH_PHASES if p in self.starts), key=self.starts.get)
        return [{p: p in ordered[: k + 1] for p in ordered} for k in range(len(ordered))]


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------


def build_byte_luts(sp, vocab_size):
    """Per-token UTF-8 byte counts from the SentencePiece pieces.
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


def document_bounds(tokens, bos_id):
    """(first, last) target positions of each document, as arrays: a document starts at a BOS (or at the split's
    start) and owns the targets after it up to and including the next BOS, which its last token predicts. The
    documents tile the targets 1..N-1 of the split."""
    starts = np.flatnonzero(np.asarray(tokens[:-1]) == bos_id)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    return starts + 1, np.append(starts[1:], len(tokens) - 1)


def whole_split(tokens):
    """The (first, last) target positions of the split taken as one document: windows read across every BOS."""
    return np.array([1]), np.array([len(tokens) - 1])


def window_table(first, last, seq_len, stride):
    """(start, first scored offset, length) arrays of every window, document after document: within a document
    of targets first..last a window starts every `stride` tokens from the token before `first`, reads at most
    seq_len + 1 tokens and never any before that token. The first window scores all its targets; a later one
    only its last `stride`, the targets the previous window did not reach, each with at least seq_len - stride
    tokens of context (or all of the document before it). stride == seq_len: disjoint windows."""
    begin, n = first - 1, last - first + 1
    counts = 1 + -(-np.maximum(0, n - seq_len) // stride)  # until the document's last target is covered
    doc = np.repeat(np.arange(len(n)), counts)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
    offset = np.where(k == 0, 0, seq_len - stride)
    return begin[doc] + k * stride, offset, np.minimum(seq_len, n[doc] - k * stride)


def rank_share(n, rank, world):
    """[lo, hi): this rank's contiguous share of n items (windows, or the targets of the stream)."""
    return n * rank // world, n * (rank + 1) // world


def window_batch(tokens, spans, seq_len, rows):
    """(inputs, targets, mask) numpy arrays of shape (rows, seq_len); row r holds the window spans[r] = (start,
    first scored offset, length), or padding (None, or no entry). Padding and unscored targets have mask 0."""
    x = np.zeros((rows, seq_len), np.int64)
    y = np.zeros((rows, seq_len), np.int64)
    m = np.zeros((rows, seq_len), bool)
    for r, span in enumerate(spans):
        if span is None:
            continue
        a, first, n = span
        x[r, :n], y[r, :n], m[r, first:n] = tokens[a : a + n], tokens[a + 1 : a + 1 + n], True
    return x, y, m


def eval_batches(tokens, seq_len, batch_seqs, rank, world, stride=0, docs=None):
    """Yields (inputs, targets, mask) numpy batches of fixed shape (batch_seqs, seq_len) for this rank, of
    windows every `stride` tokens (0: seq_len, disjoint windows), over the whole split or, given `docs` (the
    (first, last) of document_bounds), inside each document. Every target position 1..N-1 of the split is scored
    (mask 1) in exactly one row of one batch of one rank; the rest is padding or context (causal, so tokens
    after a target cannot change its score)."""
    stride = stride or seq_len
    start, offset, length = window_table(*(docs or whole_split(tokens)), seq_len, stride)
    lo, hi = rank_share(len(start), rank, world)
    batch_seqs = max(1, min(batch_seqs, -(-len(start) // world)))  # same shape on every rank, no wasted rows
    for b in range(lo, hi, batch_seqs):
        e = min(b + batch_seqs, hi)
        yield window_batch(tokens, zip(start[b:e], offset[b:e], length[b:e]), seq_len, batch_seqs)


def eval_stream_batches(tokens, seq_len, batch_seqs, rank, world):
    """Like eval_batches (same rank shares, every target once, padding masked), but row r of consecutive
    batches walks through one contiguous run of this rank's sequences, so state left by a window (the capsule
    bank's) flows into the next window of the same text."""
    spans = list(zip(*window_table(*whole_split(tokens), seq_len, seq_len)))
    lo, hi = rank_share(len(spans), rank, world)
    rows = max(1, min(batch_seqs, hi - lo))
    per_row = -(-(hi - lo) // rows)
    for b in range(per_row):
        windows = [lo + r * per_row + b for r in range(rows)]
        ends = [min(hi, lo + (r + 1) * per_row) for r in range(rows)]
        yield window_batch(tokens, [spans[w] if w < end else None for w, end in zip(windows, ends)], seq_len, rows)


@torch.no_grad()
def evaluate(model, tokens, luts, h, rank, world, device, stride=0, docs=None):
    """(val_loss in nats/token, val_bpb) over the whole split, sharded across ranks and all-reduced, in windows
    every `stride` tokens (0: disjoint windows), inside each document when `docs` is given. BPB = total target
    NLL in bits / total UTF-8 bytes of the targets."""
    batch_seqs = h.eval_batch_seqs
    batches = functools.partial(eval_batches, stride=stride, docs=docs)
    if h.capsules_enabled:
        batches = eval_stream_batches  # the capsule state is carried from each window into the next
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    state = None
    for x, y, m in batches(tokens, h.train_seq_len, batch_seqs, rank, world):
        with autocast(device):
            nll, state = model.token_nll(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), state)
        add_scores(totals, nll, x, y, m, luts)
    model.train(was_training)
    return loss_and_bpb(totals, world)


def scoring_documents(tokens, h):
    """The documents whose windows final scores keep apart (EVAL_DOC_ISOLATED), else None: the whole split."""
    if h.eval_doc_isolated:
        return document_bounds(tokens, h.bos_id)
    return None


def add_scores(totals, nll, x, y, m, luts):
    """Adds a batch's masked NLL sum, scored-target count and target UTF-8 bytes to totals (3 float64s)."""
    mask = torch.from_numpy(m).to(totals.device)
    totals[0] += (nll.double() * mask).sum()
    totals[1] += mask.sum()
    totals[2] += float(target_bytes(x, y, luts)[m].sum())


def loss_and_bpb(totals, world):
    """(val_loss in nats/token, val_bpb) of the totals summed over every rank."""
    if world > 1:
        dist.all_reduce(totals)
    nll, ntok, nbytes = totals.tolist()
    return nll / ntok, nll / math.log(2) / nbytes


# The challenge scores FineWeb's first 50k validation documents: about 62M sp1024 tokens, at the 2.44 UTF-8 bytes per
# sp1024 token of the FineWeb-Edu sample in ../shared/data, about 151 MB of text; it gives 8 GPUs 600 s for it.
CHALLENGE_VAL_BYTES, CHALLENGE_GPUS, CHALLENGE_EVAL_SECONDS = 151e6, 8, 600.0


def challenge_eval_seconds(load_seconds, score_seconds, tokens, luts, world):
    """This run's final evaluation extrapolated to the challenge on 8 GPUs of this kind: the artifact's load once,
    and scoring at the same seconds per byte of text per GPU (world ranks shared this split) over its bytes."""
    split_bytes = float(target_bytes(tokens[:-1], tokens[1:], luts).sum())
    return load_seconds + score_seconds * world / split_bytes * CHALLENGE_VAL_BYTES / CHALLENGE_GPUS


TEMPERATURE_GRID = tuple(round(0.70 + 0.02 * i, 2) for i in range(31))  # 0.70 ... 1.30


@torch.no_grad()
def search_temperature(model, tokens, h, rank, world, device):
    """(T, {T: nll per token}): the grid temperature whose logits / T give the lowest NLL on `tokens`, which the
    caller takes from the training shards, never from validation. Every rank scores its share and the sums are
    all-reduced, so every rank picks the same T. T is rounded to what the artifact stores (fp16), so the
    reloaded model scores with exactly the value chosen here."""
    temps = torch.tensor(TEMPERATURE_GRID, dtype=torch.float32, device=device)
    totals = torch.zeros(len(temps) + 1, dtype=torch.float64, device=device)  # nll per T, then the token count
    was_training = model.training
    model.eval()
    for x, y, m in eval_batches(tokens, h.train_seq_len, h.eval_batch_seqs, rank, world):
        with autocast(device):
            logits = model.logits(torch.from_numpy(x).to(device))[0].flatten(0, 1)
        targets, mask = torch.from_numpy(y).to(device).flatten(), torch.from_numpy(m).to(device).flatten()
        for i, t in enumerate(temps):
            totals[i] += (F.cross_entropy(logits / t, targets, reduction="none").double() * mask).sum()
        totals[-1] += mask.sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    per_token = (totals[:-1] / totals[-1]).tolist()
    best = TEMPERATURE_GRID[int(np.argmin(per_token))]
    return stored_value("logit_temperature", torch.tensor(best), h).item(), dict(zip(TEMPERATURE_GRID, per_token))


def calibrate_ternary(model, tokens, h, rank, world, device, log):
    """Greedy per-tensor search of (threshold, scale multiplier) on `tokens` (training tokens; the caller never
    passes validation). Tensors go most sensitive first (|grad| x |quantized weight|, one backward pass), and for
    each the scale multipliers are tried, then the thresholds; a candidate stays only if it lowers the loss. Every
    rank scores its share of the tokens and the losses are all-reduced together with an "over budget" flag, so
    every rank runs the same evaluations and stops at the same one (CALIB_MAX_EVALS, CALIB_SECONDS); the
    results are broadcast from rank 0 at the end all the same."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, CalibratedTernaryLinear)]
    batches = [tuple(torch.from_numpy(a).to(device) for a in b)
               for b in eval_batches(tokens, h.train_seq_len, h.eval_batch_seqs, rank, world)]

    def loss(grad=False):
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, over-budget flag
        with torch.set_grad_enabled(grad):
            for x, y, m in batches:
                with autocast(device):
                    nll = (model.token_nll(x, y)[0] * m).sum()
                if grad:
                    nll.backward()
                totals[0] += nll.detach().double()
                totals[1] += m.sum()
        totals[2] = float(time.perf_counter() - t0 > h.calib_seconds)
        if world > 1:
            dist.all_reduce(totals)
        return (totals[0] / totals[1]).item(), totals[2].item() > 0

    model.zero_grad(set_to_none=True)
    best, _ = loss(grad=True)
    start, evals, over = best, 1, False
    sensitivity = torch.stack([m.weight.grad.norm() * dequantize_ternary(*m.quantize(), m.group_size).norm()
                               for m in layers]).double()
    if world > 1:
        dist.all_reduce(sensitivity)  # one order on every rank, though each saw its own share of the tokens
    order = [layers[i] for i in sensitivity.argsort(descending=True).tolist()]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m in order:
            for i, values in ((1, CALIB_SCALES), (0, CALIB_THRESHOLDS)):
                keep = m.calib[i].item()
                for v in values:
                    if over or evals >= h.calib_max_evals:
                        break
                    m.calib[i] = v
                    trial, over = loss()
                    evals += 1
                    if trial < best:
                        best, keep = trial, v
                m.calib[i] = keep
        if world > 1:
            for m in layers:
                dist.broadcast(m.calib, 0)
    model.train(was_training)
    changed = sum(not torch.equal(m.calib.cpu(), torch.tensor([0.5, 1.0])) for m in layers)
    log(f"calibration tensors:{len(layers)} changed:{changed} evals:{evals} loss_before:{start:.4f} "
        f"loss_after:{best:.4f} seconds:{time.perf_counter() - t0:.1f}")


def calibrate_on_training_tokens(model, h, train_pattern, rank, world, device, log):
    """calibrate_ternary on the first CALIB_TOKENS tokens of the first training shard (after training, or at
    CALIB_AT_FRAC of it)."""
    tokens = training_prefix(train_pattern, h.calib_tokens, h.vocab_size)
    calibrate_ternary(model, tokens, h, rank, world, device, log)


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# TTT
# ---------------------------------------------------------------------------------------------------------------


def ttt_parameters(model, scope):
    """The parameters test-time training adapts: 'all'; 'capsule_bank'; or 'safe', everything but the weight
    matrices and embedding tables (norms, scales, gates, skip weights: few values, little room to overfit)."""
    if scope == "all":
        return list(model.parameters())
    if scope == "capsule_bank":
        return list(model.capsules.parameters())
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (TernaryLinear, nn.Linear, nn.Embedding))}
    return [p for p in model.parameters() if id(p) not in matrices]


class EvalEngram:
    """An n-gram cache of the validation tokens scored so far. p_cache(v | ctx) = (c(ctx, v) + a) / (c(ctx) + a V)
    (Laplace), with contexts of EVAL_ENGRAM_ORDER - 1 tokens hashed into EVAL_ENGRAM_BUCKETS rows of a dense
    (rows, V) count table. A row's counts and its total grow together, so p_cache is a distribution even when two
    contexts share a row. The scored distribution is (1 - l) p_model + l p_cache, a mixture of two
    distributions, so still normalised. The gate l is EVAL_ENGRAM_WEIGHT x the model's entropy / ln V (trust the
    cache where the model is unsure), and 0 for a context the cache has never seen or a position whose window
    holds fewer than n - 1 tokens before it. Not a module: nothing of it is trained or exported, and it only
    ever holds tokens inserted after they were scored. Memory: rows x V x 4 bytes (1 GiB at the defaults)."""

    MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: multiply-xorshift mixing of the context

    def __init__(self, h, device):
        self.n, self.vocab, self.rows = h.eval_engram_order, h.vocab_size, h.eval_engram_buckets
        self.alpha, self.weight = h.eval_engram_alpha, h.eval_engram_weight
        self.counts = torch.zeros(self.rows, self.vocab, dtype=torch.float32, device=device)
        self.totals = torch.zeros(self.rows, dtype=torch.float32, device=device)

    def context_rows(self, x):
        """(row of the n-1 tokens ending at each position of x (..., T), whether the window holds them all)."""
        key = torch.zeros_like(x)
        for i in range(self.n - 1):
            key = (key + torch.roll(x, i, dims=-1) + 1) * self.MIX
            key = key ^ (key >> 29)
        valid = torch.arange(x.size(-1), device=x.device) >= self.n - 2
        return key % self.rows, valid.expand_as(x)

    def target_prob(self, logp, x, targets):
        """Mixed probability of `targets` (..., T) given the model's log-probs (..., T, V) at inputs x."""
        row, valid = self.context_rows(x)
        seen = self.totals[row]
        cache = (self.counts[row, targets] + self.alpha) / (seen + self.alpha * self.vocab)
        entropy = -(logp.exp() * logp).sum(-1)
        gate = self.weight * entropy / math.log(self.vocab) * (valid & (seen > 0))
        model = logp.gather(-1, targets[..., None]).squeeze(-1).exp()
        return (1 - gate) * model + gate * cache

    def insert(self, tokens):
        """Counts every n-gram of `tokens` (1-D, already scored)."""
        t = torch.as_tensor(np.asarray(tokens, np.int64), device=self.counts.device)
        if len(t) < self.n:
            return
        row, valid = self.context_rows(t[:-1])
        row, nxt = row[valid], t[1:][valid]
        ones = torch.ones(len(row), dtype=torch.float32, device=row.device)
        self.counts.view(-1).index_add_(0, row * self.vocab + nxt, ones)
        self.totals.index_add_(0, row, ones)


def stream_evaluate(model, tokens, luts, h, rank, world, device, log, cache=None):
    """(val_loss, val_bpb) of a legal score-first pass over the validation stream, for TTT and EvalEngram. Each
    rank walks its contiguous segment in chunks of TTT_CHUNK_TOKENS. A chunk is first scored under no_grad, in
    windows inside the chunk, by the model (and the cache) as they are before it; only then is the chunk used:
    inserted into the EvalEngram cache, and trained on by SGD with momentum (kept across chunks) for TTT_EPOCHS
    passes. A token is therefore never scored by a model or cache that has seen it. Past EVAL_BUDGET_SECONDS the
    adaptation stops and scoring goes on to the end. The model's EngramHash tables are restored afterwards."""
    t0 = time.perf_counter()
    params = []
    if h.ttt_enabled:
        params = ttt_parameters(model, h.ttt_scope)
        trainable = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    if h.eval_engram:
        cache = cache or EvalEngram(h, device)
    if h.engram_enabled:
        saved_table = model.engram.table.weight.detach().clone()
    seq = h.train_seq_len
    batch_seqs = h.eval_batch_seqs
    if h.capsules_enabled:
        batch_seqs = 1  # one window at a time, in stream order, so the capsule state flows through the segment
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    state, adapted, chunks = None, 0, 0
    lo, hi = rank_share(len(tokens) - 1, rank, world)  # token positions; this rank scores targets lo+1..hi
    for c in range(lo, hi, h.ttt_chunk_tokens):
        chunk = tokens[c : min(c + h.ttt_chunk_tokens, hi) + 1]
        model.eval()
        with torch.no_grad():
            for x, y, m in eval_batches(chunk, seq, batch_seqs, 0, 1, h.eval_stride, scoring_documents(chunk, h)):
                xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                with autocast(device):
                    if h.eval_engram:
                        logits, state = model.scored_logits(xt, state)
                        nll = -torch.log(cache.target_prob(logits.float().log_softmax(-1), xt, yt))
                    else:
                        nll, state = model.token_nll(xt, yt, state)
                add_scores(totals, nll, x, y, m, luts)
        chunks += 1
        if h.eval_budget_seconds and time.perf_counter() - t0 > h.eval_budget_seconds:
            continue  # over budget: score the rest as the model and cache are now
        if h.eval_engram:
            cache.insert(chunk)
        if h.ttt_enabled:
            ttt_adapt(model, opt, chunk, h, batch_seqs, device)
        adapted += 1
    model.eval()
    if h.engram_enabled:
        with torch.no_grad():
            model.engram.table.weight.copy_(saved_table)
    log(f"stream_eval ttt:{int(h.ttt_enabled)} scope:{h.ttt_scope} params:{sum(p.numel() for p in params)} "
        f"eval_engram:{int(h.eval_engram)} chunks:{chunks} adapted:{adapted} seconds:{time.perf_counter() - t0:.1f}")
    return loss_and_bpb(totals, world)


def ttt_adapt(model, opt, chunk, h, batch_seqs, device):
    """TTT_EPOCHS passes of SGD over disjoint windows of an already-scored chunk, on the masked mean NLL."""
    model.train()
    for _ in range(h.ttt_epochs):
        for x, y, m in eval_batches(chunk, h.train_seq_len, batch_seqs, 0, 1):
            with autocast(device):
                nll, _ = model.token_nll(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            mask = torch.from_numpy(m).to(device)
            loss = (nll * mask).sum() / mask.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


class LoRABank:
    """TTT_MODE=lora: low-rank adapters for a batch of documents, one pair (A, B) per target module with a slice
    per batch row, so each document adapts on its own while all of them share the forward. A module's output
    gains (x A_d^T) B_d^T on row d, added by a forward hook: the model's code and its frozen ternary weights stay
    as they are. B starts at zero, so a fresh adapter is the trained model exactly. Rows are documents sorted by
    decreasing length, so the documents still running at any step are a prefix and a shorter batch uses the
    first rows of each adapter."""

    def __init__(self, model, h, doc_first, device, shared=False):
        self.params, self.handles = [], []  # A, B of each module in turn
        rank = h.lora_global_rank if shared else h.ttt_lora_rank
        modules = lora_target_modules(model, h.lora_global_targets if shared else h.ttt_lora_targets)
        for m, a in zip(modules, lora_init(h, doc_first, modules, rank)):
            a = a.to(device).requires_grad_()
            b = torch.zeros(len(doc_first), lora_shape(m, h)[1], rank, device=device, requires_grad=True)
            self.handles.append(m.register_forward_hook(functools.partial(self.add_delta, a, b)))
            self.params += [a, b]

    @staticmethod
    def add_delta(a, b, module, inputs, out):
        """A linear's output, or the first of a mixer's (output, values) or an MoE's (output, aux loss)."""
        y = out[0] if isinstance(out, tuple) else out
        x, k = inputs[0], y.size(0)
        y = y + (x @ a[:k].mT.to(x.dtype)) @ b[:k].mT.to(x.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def warm_start(self, last_a):
        """TTT_LORA_WARM_A: each row's A from the same row of the batch before (trained on scored targets only);
        B stays at zero, so the adapter still adds nothing until its span's first step."""
        with torch.no_grad():
            for a, prev in zip(self.params[0::2], last_a):
                a.copy_(prev[: len(a)])  # batches are longest first: a later one has no more rows


def lora_shape(m, h):
    """(in, out) features of an adapter on module m: a linear's own, or MODEL_DIM both for a bypass."""
    return (m.in_features, m.out_features) if hasattr(m, "in_features") else (h.model_dim, h.model_dim)


def lora_init(h, doc_first, modules, rank=None):
    """Each module's A, stacked over the documents: drawn from a generator seeded by SEED and the document's first
    target position, so a document starts from the same adapter whatever the batching or the number of ranks."""
    per_doc = []
    for first in doc_first:
        g = torch.Generator().manual_seed(h.seed * 1_000_003 + int(first))
        per_doc.append([torch.randn(rank or h.ttt_lora_rank, d, generator=g) / math.sqrt(d)
                        for d in (lora_shape(m, h)[0] for m in modules)])
    return [torch.stack(a) for a in zip(*per_doc)]


def lora_target_modules(model, targets):
    """The modules TTT_LORA_TARGETS names, in every block that has them (a shared block is adapted once)."""
    found = []
    for name in targets.split(","):
        if name == "head":
            found.append(model.embed_out)
            continue
        for block in model.blocks:
            with contextlib.suppress(AttributeError):  # e.g. an SKC block has no attention projections
                found.append(functools.reduce(getattr, LORA_TARGETS[name].split("."), block))
    return found


def piece_counts(first, last, size):
    """How many pieces of `size` targets each run of targets first..last (inclusive) takes, the last one short."""
    return -(-(last - first + 1) // size)


def adapter_spans(first, last, h):
    """(first, last, floor) arrays of the spans one adapter each walks: the documents (first, last) cut into
    pieces of TTT_LORA_SPAN targets (0: whole documents). A span's windows may read its document back to `floor`:
    the document's BOS with EVAL_DOC_ISOLATED, else the split's start. Short spans trade the adaptation a long
    document could build for parallel rows: one 116k-token document would otherwise take 450 steps alone."""
    span = h.ttt_lora_span or int(max(last - first + 1, default=1))
    n = piece_counts(first, last, span)
    doc = np.repeat(np.arange(len(first)), n)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n) - n, n)
    start = first[doc] + k * span
    floor = first[doc] - 1 if h.eval_doc_isolated else np.zeros_like(start)
    return start, np.minimum(start + span - 1, last[doc]), floor


def lora_chunk_batch(tokens, first, last, floor, chunk, h):
    """(inputs, targets, mask, target positions) of chunk `chunk` of each span (first, last, floor): its targets
    first + chunk * C .. (at most last), read in one window that ends with them and holds up to TRAIN_SEQ_LEN
    tokens of context, none before `floor`. Rows are right-padded to the longest window; only the chunk's targets
    are masked in."""
    a = first + chunk * h.ttt_lora_chunk
    b = np.minimum(a + h.ttt_lora_chunk - 1, last)
    w = np.maximum(floor, b - h.train_seq_len)
    n = b - w
    x = np.zeros((len(a), int(n.max())), np.int64)
    y, m, pos = np.zeros_like(x), np.zeros(x.shape, bool), np.zeros_like(x)
    for r in range(len(a)):
        x[r, : n[r]], y[r, : n[r]] = tokens[w[r] : b[r]], tokens[w[r] + 1 : b[r] + 1]
        m[r, a[r] - 1 - w[r] : n[r]] = True
        pos[r, : n[r]] = np.arange(w[r] + 1, b[r] + 1)
    return x, y, m, pos


def lora_bucket_batch(batch, bank_rows, tokens=128, rows=8):
    """TTT_LORA_BUCKET: a chunk step's batch (lora_chunk_batch) padded to whole buckets of 128 tokens and of 8 rows
    (at most the bank's), all masked out. Left alone, the window length and the live rows change often (the
    proxy's pass at chunk 64 meets 49 shapes in 149 steps: scripts/lora_shapes.py), and cuDNN's attention builds
    a plan for each new shape (hundreds of ms on a GPU). The padding is on the right of the windows, which
    attention reads causally, and in rows of spans already done (each row's loss is its own mean), so every score
    and update stays what it was."""
    x = batch[0]
    n_rows = min(-(-len(x) // rows) * rows, bank_rows)
    n_cols = -(-x.shape[1] // tokens) * tokens
    return tuple(np.pad(a, ((0, n_rows - a.shape[0]), (0, n_cols - a.shape[1]))) for a in batch)


def lora_span_batches(spans, h):
    """The spans (first, last, floor) of adapter_spans in batches of TTT_LORA_DOCS, longest first: the rows of each."""
    first, last, _ = spans
    order = np.argsort(-(last - first), kind="stable")
    return [order[i : i + h.ttt_lora_docs] for i in range(0, len(order), h.ttt_lora_docs)]


def lora_step_batches(tokens, spans, rows, h):
    """(live rows, batch of lora_chunk_batch) of each chunk step of one batch of spans: step c scores chunk c of
    every span that has one, a prefix of the rows (they are longest first)."""
    first, last, floor = spans
    n_chunks = piece_counts(first[rows], last[rows], h.ttt_lora_chunk)
    for c in range(int(n_chunks.max())):
        live = rows[: int((n_chunks > c).sum())]
        batch = lora_chunk_batch(tokens, first[live], last[live], floor[live], c, h)
        if h.ttt_lora_bucket:
            batch = lora_bucket_batch(batch, len(rows))
        yield live, batch


def lora_step_tensors(batch, lo, device):
    """([x, y, mask, flat index of the scored targets, their places in the pass's NLL], how many) of a chunk step's
    batch (lora_chunk_batch), on the device. The indices and the count come from the host's arrays, and the copies
    leave pinned memory without blocking, so a step reads nothing back from the GPU: a boolean index or a count
    taken there would make the host wait for the step before it queues the next, and the pass runs eagerly, so the
    host's launches would add to the GPU's time instead of overlapping it."""
    x, y, m, pos = batch
    idx = np.flatnonzero(m)
    arrays = [torch.from_numpy(a) for a in (x, y, m, idx, pos.ravel()[idx] - lo)]
    if device.type == "cuda":
        arrays = [a.pin_memory().to(device, non_blocking=True) for a in arrays]
    return arrays, len(idx)


def lora_ttt_nll(model, tokens, h, spans, device, t0):
    """(per-target NLL, targets scored, adapted chunks) of the spans (first, last, floor) of adapter_spans, in
    target order from the first span's first target, by legal score-first LoRA TTT. Spans go TTT_LORA_DOCS at a
    time, longest first, each with fresh adapters and a fresh AdamW. A chunk of every running span is scored by
    one forward with the adapters as they are (trained on the span's earlier chunks only); that same forward's
    loss on the chunk then makes one AdamW step (TTT_EPOCHS - 1 more on the same windows), so no target is ever
    scored by an adapter that has seen it. Past EVAL_BUDGET_SECONDS scoring goes on without updates. With
    TTT_LORA_GLOBAL one more adapter (lora_shared) scores and steps with every batch's rows."""
    first, last, _ = spans
    lo = int(first[0]) if len(first) else 0
    nll_at = torch.full((int(last[-1]) - lo + 1 if len(first) else 0,), float("nan"), dtype=torch.float64, device=device)
    scored, adapted = 0, 0
    shared, shared_opts = lora_shared(model, h, device) if h.ttt_lora_global else (None, [])
    for i, rows in enumerate(lora_span_batches(spans, h)):
        bank = LoRABank(model, h, first[rows], device)
        if h.ttt_lora_warm_a and i:
            bank.warm_start(last_a)
        opts = [lora_optimizer(bank.params, h.ttt_lora_lr, h), *shared_opts]
        for live, batch in lora_step_batches(tokens, spans, rows, h):
            (x, y, m, idx, at), n_scored = lora_step_tensors(batch, lo, device)
            adapt = not (h.eval_budget_seconds and time.perf_counter() - t0 > h.eval_budget_seconds)
            for epoch in range(h.ttt_epochs if adapt else 1):
                with torch.set_grad_enabled(adapt), autocast(device):
                    nll = model.token_nll(x, y)[0].float()
                if epoch == 0:
                    nll_at[at] = nll.flatten()[idx].detach().double()
                    scored += n_scored
                if adapt:
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    ((nll * m).sum(1) / m.sum(1).clamp_min(1)).sum().backward()  # per-span means (a padded row: 0)
                    for opt in opts:
                        opt.step()
            adapted += int(adapt) * len(live)
        bank.remove()
        if h.ttt_lora_warm_a:
            last_a = bank.params[0::2]
    if h.ttt_lora_global:
        shared.remove()
    return nll_at, scored, adapted


def lora_optimizer(params, lr, h):
    """AdamW over adapters: elementwise, so each span's slice of a bank steps on its own. Fused: a few kernels a
    step for all the adapters, where foreach dispatches hundreds of ops, and the pass steps once per chunk."""
    return torch.optim.AdamW(params, lr=lr, betas=(h.ttt_lora_beta1, h.ttt_lora_beta2), weight_decay=h.ttt_lora_wd,
                             fused=True)


def lora_shared(model, h, device):
    """TTT_LORA_GLOBAL: (a one-row LoRABank whose row every batch row adds, its optimizer in a list). It lives for
    the whole split and steps on the summed loss of every running span, after the spans' own adapters score each
    chunk, so it learns the split's domain from scored targets only and carries it to later documents. Each rank
    keeps its own (ranks run different numbers of steps, so no collective): its scores depend on WORLD_SIZE. Its
    rank and targets may differ from the spans' (TTT_LORA_GLOBAL_RANK, TTT_LORA_GLOBAL_TARGETS)."""
    bank = LoRABank(model, h, np.array([-1]), device, shared=True)  # A seeded apart from any document's (first targets are > 0)
    return bank, [lora_optimizer(bank.params, h.ttt_lora_global_lr, h)]


def lora_attention_kernels():
    """TTT_LORA_NO_CUDNN: the pass's SDPA on its flash, memory-efficient or math kernels, never cuDNN's, which builds
    a plan for each new shape (hundreds of ms: a pass whose shapes keep changing pays it again and again). Where
    FlashAttention-3 or -2 is installed the model calls it directly, and this changes nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def lora_ttt_evaluate(model, tokens, luts, h, rank, world, device, log):
    """(val_loss, val_bpb) of LoRA TTT over the split: each rank adapts and scores a contiguous run of whole
    documents (those whose first target lies in its share of the targets). Every target must come back scored
    exactly once, or this raises."""
    t0 = time.perf_counter()
    first, last = document_bounds(tokens, h.bos_id)
    lo, hi = rank_share(len(tokens) - 1, rank, world)
    mine = (first > lo) & (first <= hi)
    for p in model.parameters():
        p.requires_grad_(False)  # the trained weights stay frozen: only the adapters learn
    model.eval()
    spans = adapter_spans(first[mine], last[mine], h)
    with frozen_weights(model), lora_attention_kernels() if h.ttt_lora_no_cudnn else contextlib.nullcontext():
        nll_at, scored, adapted = lora_ttt_nll(model, tokens, h, spans, device, t0)
    chunks = int(piece_counts(spans[0], spans[1], h.ttt_lora_chunk).sum())  # what a pass inside its budget adapts
    if scored != len(nll_at) or bool(torch.isnan(nll_at).any()):  # n positions, n scores, none missing: each once
        raise RuntimeError(f"LoRA TTT on rank {rank} scored {scored} times for {len(nll_at)} targets")
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    if scored:
        pos = np.arange(first[mine][0], last[mine][-1] + 1)
        totals[0], totals[1] = nll_at.sum(), scored
        totals[2] = float(target_bytes(tokens[pos - 1], tokens[pos], luts).sum())
    loss, bpb = loss_and_bpb(totals, world)
    if int(totals[1].item()) != len(tokens) - 1:
        raise RuntimeError(f"LoRA TTT scored {int(totals[1].item())} of the split's {len(tokens) - 1} targets")
    log(f"lora_ttt docs:{int(mine.sum())} span:{h.ttt_lora_span} rank:{h.ttt_lora_rank} targets:{h.ttt_lora_targets} chunk:{h.ttt_lora_chunk} "
        f"lr:{h.ttt_lora_lr} betas:{h.ttt_lora_beta1},{h.ttt_lora_beta2} wd:{h.ttt_lora_wd} global_lr:{h.ttt_lora_global_lr if h.ttt_lora_global else 0} global_rank:{h.lora_global_rank} global_targets:{h.lora_global_targets or '-'} warm_a:{int(h.ttt_lora_warm_a)} adapted_chunks:{adapted} chunks:{chunks} scored:{scored} seconds:{time.perf_counter() - t0:.1f}")
    if adapted < chunks:  # loud: a pass cut by the budget scores like plain sliding windows and looks like no gain
        log(f"lora_ttt WARNING: EVAL_BUDGET_SECONDS={h.eval_budget_seconds:g} ran out on rank {rank}: {chunks - adapted} of {chunks} chunks not adapted")
    return loss, bpb


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


def encode_fp16(t):
    return {"kind": "fp16"}, t.half().numpy().tobytes()


def decode_fp16(meta, buf, shape):
    return torch.from_numpy(np.frombuffer(buf, np.float16).astype(np.float32)).reshape(shape)


def encode_fp8(t):
    """fp8 e4m3 with a per-row fp16 scale."""
    rows = t.reshape(t.size(0), -1)
    scale = (rows.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12).half()
    q = (rows / scale.float()).to(torch.float8_e4m3fn)
    return {"kind": "fp8", "rows": rows.size(0)}, scale.numpy().tobytes() + q.view(torch.uint8).numpy().tobytes()


def decode_fp8(meta, buf, shape):
    rows = meta["rows"]
    scale = torch.from_numpy(np.frombuffer(buf[: 2 * rows], np.float16).astype(np.float32)).reshape(rows, 1)
    q = torch.from_numpy(np.frombuffer(buf[2 * rows :], np.uint8).copy()).view(torch.float8_e4m3fn).float()
    return (q.reshape(rows, -1) * scale).reshape(shape)


def encode_int_rows(t, kind):
    """int_rows_quantize's codes, one signed byte each (brotli's entropy coder takes the unused high bits back),
    after the per-row fp16 scales."""
    q, scale = int_rows_quantize(t, INT_BITS[kind])
    return {"kind": kind, "rows": q.size(0)}, scale.half().numpy().tobytes() + q.to(torch.int8).numpy().tobytes()


def decode_int_rows(meta, buf, shape):
    rows = meta["rows"]
    scale = np.frombuffer(buf[: 2 * rows], np.float16).astype(np.float32).reshape(rows, 1)
    q = np.frombuffer(buf[2 * rows :], np.int8).astype(np.float32).reshape(rows, -1)
    return torch.from_numpy(q * scale).reshape(shape)


def float_codecs(h):
    """{format: (encode, decode)} of the float formats this configuration writes and reads, each behind its guard
    so that build_submission.py --dce keeps only the configured ones."""
    codecs = {"fp16": (encode_fp16, decode_fp16)}
    if h.export_embed == "fp8" or h.export_float == "fp8":
        codecs["fp8"] = (encode_fp8, decode_fp8)
    if h.export_embed in ("int8", "int6", "int5", "int4") or h.export_float in ("int8", "int6", "int5", "int4") or h.hybrid_int:
        for kind in INT_BITS:
            codecs[kind] = (functools.partial(encode_int_rows, kind=kind), decode_int_rows)
    return codecs


def float_format(name, p, h):
    """EXPORT_EMBED for the token embedding, EXPORT_FLOAT for the other float matrices; vectors, gains and scalars
    stay fp16 (a few KB in all, and the most sensitive numbers of the model)."""
    if p.dim() != 2 or min(p.shape) < FLOAT_MATRIX_MIN:
        return "fp16"
    return h.export_embed if name == "tok_emb.weight" else h.export_float


def stored_value(name, t, h):
    """`t` as the artifact gives it back."""
    encode, decode = float_codecs(h)[float_format(name, t, h)]
    meta, buf = encode(t.detach().float().cpu())
    return decode(meta, buf, tuple(t.shape))


def ternary_modules(model):
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, TernaryLinear) and m.ternary}


def export_parts(model, h):
    """(tensor table, float tensor bytes, trits of all ternary tensors (flat int8), scale layout, scale bytes): the
    part of the payload every trit packing shares, quantized once."""
    ternary, codecs = ternary_modules(model), float_codecs(h)
    hybrid = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, TernaryLinear) and not m.ternary}
    table, chunks, trits, scales, offset = [], [], [], [], 0
    for name, p in model.state_dict().items():
        entry = {"name": name, "shape": list(p.shape)}
        if name in ternary:
            t, s = ternary[name].quantize()
            trits.append(t.to(torch.int8).cpu().numpy().reshape(-1))
            scales.append(s)
            entry.update(kind="ternary", group_size=ternary[name].group_size)
        else:
            kind = float_format(name, p, h)
            if h.hybrid_int:
                if name in hybrid:
                    kind = f"int{h.hybrid_bits}"
                    entry["hybrid"] = True  # a block matrix in an int format: a loader without HYBRID_INT must refuse it
            meta, data = codecs[kind][0](p.detach().float().cpu())
            entry.update(meta, offset=offset, nbytes=len(data))
            chunks.append(data)
            offset += len(data)
        table.append(entry)
    layout, scale_data = "planes", fp16_planes(np.concatenate([s.half().cpu().numpy().reshape(-1) for s in scales] or [[]]))
    if h.scale_format == "log8":
        layout, scale_data = "log8", log8_scale_bytes(scales)
    return table, chunks, np.concatenate(trits or [np.zeros(0, np.int8)]), layout, scale_data


def log8_scale_bytes(scales):
    """SCALE_FORMAT=log8: every tensor's row bases (fp16, as byte planes), then every group's code (uint8). The
    scales are already on their row's grid, so log8_codes gives back the codes that made them."""
    pairs = [log8_codes(s.float().cpu(), torch.from_numpy(LOG8_BOUNDS)) for s in scales]
    codes = [c.cpu().numpy().reshape(-1).astype(np.uint8) for c, _ in pairs] or [np.zeros(0, np.uint8)]
    bases = [b.cpu().numpy().reshape(-1).astype(np.float16) for _, b in pairs] or [np.zeros(0, np.float16)]
    return fp16_planes(np.concatenate(bases)) + np.concatenate(codes).tobytes()


def read_log8_scales(buf, ternary):
    """Per-group fp32 scales of a log8 scale section: base x LOG8_FACTORS[code], as the training quantizer has them."""
    rows = sum(t["shape"][0] for t in ternary)
    bases = from_fp16_planes(buf[: 2 * rows]).astype(np.float32)
    per_row = np.concatenate([[t["shape"][1] // t["group_size"]] * t["shape"][0] for t in ternary] or [[]]).astype(np.int64)
    return np.repeat(bases, per_row) * LOG8_FACTORS[np.frombuffer(buf[2 * rows :], np.uint8)]


def assemble_payload(parts, trit_packing):
    """Uncompressed payload: magic, header length, JSON header (formats and tensor table), then the bytes: each
    float tensor's in table order, then the trits of all ternary tensors packed as one stream, then their scales
    (fp16 byte planes, or SCALE_FORMAT=log8's bases and codes)."""
    table, chunks, trits, layout, scale_data = parts
    offset = sum(len(c) for c in chunks)
    shapes = [tuple(e["shape"]) for e in table if e["kind"] == "ternary"]
    trit_data = TRIT_PACKERS[trit_packing][0](trits, shapes)
    header = {"trit_packing": trit_packing, "trits": [offset, len(trit_data)], "scale_layout": layout,
              "scales": [offset + len(trit_data), len(scale_data)], "tensors": table}
    body = b"".join(chunks) + trit_data + scale_data
    # brotli has no checksum, and most flipped bits decode to other weights: the header carries a sha256 of itself
    # (without this field) and the body
    header["sha256"] = payload_sha256(header, body)
    header = json.dumps(header, separators=(",", ":")).encode()
    return ARTIFACT_MAGIC + struct.pack("<I", len(header)) + header + body


def payload_sha256(header, body):
    table = json.dumps({k: v for k, v in header.items() if k != "sha256"}, separators=(",", ":")).encode()
    return hashlib.sha256(table + body).hexdigest()


def serialize_model(model, h, trit_packing="base3"):
    return assemble_payload(export_parts(model, h), trit_packing)


def read_header(payload):
    """(header, start of the body) of a payload, or ArtifactError for anything this loader cannot read."""
    if payload[:4] != ARTIFACT_MAGIC[:4]:
        raise ArtifactError("bad magic; not a train_gpt.py ternary artifact")
    if payload[4:5] != ARTIFACT_MAGIC[4:]:
        raise ArtifactError(f"artifact format version {payload[4]}; this train_gpt.py reads version {ARTIFACT_MAGIC[4]}")
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
        raise ArtifactError(f"unknown trit packing {header.get('trit_packing')!r} (this train_gpt.py reads "
                            f"{', '.join(TRIT_PACKERS)})")
    if header.get("scale_layout") not in ("planes", "log8"):
        raise ArtifactError(f"unknown scale layout {header.get('scale_layout')!r} (this train_gpt.py reads planes, log8)")
    end = 9 + hlen + header["scales"][0] + header["scales"][1]
    if len(payload) != end:
        raise ArtifactError(f"payload is {len(payload)} bytes, its header describes {end}")
    return header, 9 + hlen


def deserialize_state(payload, h):
    """State dict of fp32 tensors from a payload; ternary weights come back as masters that requantize exactly."""
    header, body = read_header(payload)
    codecs, state, ternary = float_codecs(h), {}, []
    for t in header["tensors"]:
        hybrid = False
        if h.hybrid_int:
            families = h.hybrid_families.split(",")
            hybrid = t["name"].startswith("blocks.") and t["name"].endswith(".weight") and t["name"].split(".")[-2] in families
        if t.get("hybrid", False) != hybrid:
            raise ArtifactError(f"tensor {t['name']} is {'an int' if t.get('hybrid') else 'a ternary'} block matrix, "
                                f"which this configuration does not train that way (HYBRID_INT / HYBRID_FAMILIES)")
        if t["kind"] == "ternary":
            ternary.append(t)
        elif t["kind"] in codecs:
            buf = payload[body + t["offset"] : body + t["offset"] + t["nbytes"]]
            state[t["name"]] = codecs[t["kind"]][1](t, buf, tuple(t["shape"]))
        else:
            raise ArtifactError(f"tensor {t['name']} is stored as {t['kind']!r}, which this configuration does not "
                                f"read (it reads {', '.join(codecs)}; EXPORT_EMBED / EXPORT_FLOAT choose)")
    shapes = [tuple(t["shape"]) for t in ternary]
    (t_off, t_len), (s_off, s_len) = header["trits"], header["scales"]
    trits = TRIT_PACKERS[header["trit_packing"]][1](payload[body + t_off : body + t_off + t_len], shapes)
    buf = payload[body + s_off : body + s_off + s_len]
    if header["scale_layout"] == "planes":
        scales = from_fp16_planes(buf).astype(np.float32)
    elif h.scale_format == "log8":
        scales = read_log8_scales(buf, ternary)
    else:
        raise ArtifactError(f"ternary scales are stored as {header['scale_layout']!r}, which this configuration does "
                            f"not read (SCALE_FORMAT={h.scale_format})")
    at, at_scale = 0, 0
    for t, shape in zip(ternary, shapes):
        n, groups = math.prod(shape), math.prod(shape) // t["group_size"]
        tr = torch.from_numpy(trits[at : at + n].astype(np.float32)).reshape(shape)
        sc = torch.from_numpy(scales[at_scale : at_scale + groups]).reshape(shape[0], -1)
        state[t["name"]] = ternary_master_from_export(tr, sc, t["group_size"])
        at, at_scale = at + n, at_scale + groups
    return {t["name"]: state[t["name"]] for t in header["tensors"]}


def compress_model(model, h, log=print):
    """(packing, brotli blob). Each trit packing is tried at a fast quality; only the smallest pays for the final
    quality (q11 runs at ~0.3 MB/s on this data, too slow to run three times inside the time budget)."""
    import brotli

    t0 = time.perf_counter()
    parts = export_parts(model, h)
    payloads = {packing: assemble_payload(parts, packing) for packing in TRIT_PACKERS}
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


def load_artifact(path, h):
    """State dict of the artifact at `path`; every reason it cannot be read is an ArtifactError naming the file."""
    import brotli

    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror})") from None
    try:
        return deserialize_state(brotli.decompress(blob), h)
    except brotli.error as e:
        raise ArtifactError(f"{path}: not a brotli stream ({e})") from None
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, struct.error) as e:  # a header that lies
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {e})") from None


def write_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a half-written temp file on a full disk would only fill it further
        raise


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
    if h.checkpoint_save:
        check_writable_file("CHECKPOINT_PATH", h.checkpoint_path)


def rescue_weights(model, blob, h):
    """After a failed artifact write (a full disk): the blob, then the float weights as a checkpoint, each into the
    first of LOG_DIR and the temp folder that takes it. Returns where they went, for the error message."""
    kept = []
    for what, name, data in (("the artifact", "rescued.ternary.ptz", lambda: blob),
                             ("the float weights", "rescued.float.pt", lambda: checkpoint_bytes(model, h.ternary_calib, h))):
        for folder in (h.log_dir, tempfile.gettempdir()):
            path = os.path.join(folder, f"{h.run_id}.{name}")
            with contextlib.suppress(OSError):
                write_atomic(path, data())
                kept.append(f"{what} is kept at {path}")
                break
        else:
            kept.append(f"{what} could not be written to {h.log_dir} or {tempfile.gettempdir()} either")
    return "; ".join(kept) + " (EVAL_FROM_CHECKPOINT=1 with CHECKPOINT_PATH=<the float weights> re-exports them)"


def write_or_rescue(path, blob, model, h):
    try:
        write_atomic(path, blob)
    except OSError as e:
        raise ArtifactError(f"cannot write ARTIFACT_PATH={h.artifact_path} ({e.strerror}); "
                            + rescue_weights(model, blob, h)) from None


def export_artifact(model, h, log):
    """Writes the artifact atomically; returns True (and keeps the blob beside it) when over the cap."""
    packing, blob = compress_model(model, h, log)
    code = code_bytes()
    total = code + len(blob)
    log(f"artifact packing:{packing} model_bytes:{len(blob)} code_bytes:{code} total_bytes:{total} cap:{h.artifact_cap_bytes}")
    if total > h.artifact_cap_bytes:
        kept = f"{h.artifact_path}.over_cap"
        write_or_rescue(kept, blob, model, h)
        log(f"ERROR artifact over cap by {total - h.artifact_cap_bytes} bytes; blob kept as {kept}, {h.artifact_path} untouched")
        return True
    write_or_rescue(h.artifact_path, blob, model, h)
    log(f"artifact_written path:{h.artifact_path}")
    return False


def code_bytes():
    return Path(__file__).stat().st_size


def code_sha256():
    """sha256 of the bytes that run: this file as it is on disk. For a file that build_submission.py extracted
    that is the extracted file (its lzma self-extracting wrapper when wrapped: the exec'd text sees the
    wrapper's __file__), so a log ties its score to the exact file a record ships (build_submission.py checks)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights: the run stops and writes no model."""


def refuse_nonfinite(model, path):
    """Raises before a non-finite model reaches `path`. The weights are the same on every rank (DDP keeps them
    in step), so every rank reaches the same verdict without a collective, and all stop together."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DivergenceError(f"the trained weights are not finite ({len(bad)} tensors: {', '.join(bad[:4])}"
                              f"{', ...' if len(bad) > 4 else ''}); refusing to write {path}, and any file "
                              "already there is left untouched")


# knobs that may differ between the run that saved a checkpoint and one that scores it: what happens after training
CHECKPOINT_FREE_PREFIXES = ("EVAL_", "TEMPERATURE_", "TTT_", "CHECKPOINT_")
CHECKPOINT_FREE_KNOBS = {
    "DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "LOG_DIR", "DEVICE", "COMPILE", "COMPILE_MODE", "FP8_MATMUL",
    "FP8_DGRAD", "FP8_WGRAD", "ATTN_IMPL", "WORLD_SIZE", "RANK", "LOCAL_RANK", "VAL_BATCH_TOKENS", "MAX_VAL_TOKENS",
    "TERNARY_CALIB", "CALIB_TOKENS", "CALIB_MAX_EVALS", "CALIB_SECONDS", "ARTIFACT_PATH", "ARTIFACT_CAP_BYTES",
    "EXPORT_FLOAT", "BROTLI_QUALITY", "EXPORT_EMBED",
}


def checkpoint_bytes(model, calibrated, h):
    """The float weights, the calibrated thresholds when `calibrated`, and the run's config, as torch.save bytes."""
    calib = {n: m.calib.cpu() for n, m in model.named_modules() if calibrated and hasattr(m, "calib")}
    # logit_temperature (TEMPERATURE_SEARCH) exists only when the scoring run searches T, which it does again
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "logit_temperature"}
    buf = io.BytesIO()
    torch.save({"state": state, "calib": calib, "config": h.by_env_name()}, buf)
    return buf.getvalue()


def save_checkpoint(model, calibrated, h, log):
    """CHECKPOINT_SAVE: the trained float weights, the thresholds of an export-aligned calibration (`calibrated`:
    CALIB_AT_FRAC < 1 ran it during training) and the run's config, written atomically. Rank 0 only; no collective."""
    data = checkpoint_bytes(model, calibrated, h)
    write_atomic(h.checkpoint_path, data)
    calib = sum(calibrated and hasattr(m, "calib") for m in model.modules())
    log(f"checkpoint_saved path:{h.checkpoint_path} bytes:{len(data)} calibrated_tensors:{calib}")


def read_checkpoint(path, device):
    """The dict save_checkpoint wrote. Anything else is an ArtifactError that says so plainly: torch's own message
    suggests weights_only=False, which would unpickle arbitrary code and still not make it a checkpoint."""
    import pickle
    import zipfile

    what = f"CHECKPOINT_PATH={path} is not a checkpoint written by CHECKPOINT_SAVE=1"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ArtifactError(f"{what}: not a torch file ({os.path.getsize(path)} bytes; an artifact, a text file, "
                            "a truncated write?)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(f"{what}: it holds Python objects other than tensors and plain values") from None
    except Exception as e:
        raise ArtifactError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not (isinstance(ckpt, dict) and {"state", "calib", "config"} <= ckpt.keys()):
        raise ArtifactError(f"CHECKPOINT_PATH={path} is a torch file, but not a CHECKPOINT_SAVE=1 checkpoint (no "
                            "state, calib and config)")
    return ckpt


def load_checkpoint(model, h, device, log):
    """EVAL_FROM_CHECKPOINT: loads what CHECKPOINT_SAVE wrote into `model`. Refused unless every knob that shaped
    the trained model equals this run's, so the config line of this run still describes the model it scores.
    Returns whether the weights come with an export-aligned calibration."""
    if not os.path.exists(h.checkpoint_path):
        raise ConfigError(f"EVAL_FROM_CHECKPOINT=1 but CHECKPOINT_PATH={h.checkpoint_path} does not exist "
                          "(a training run with CHECKPOINT_SAVE=1 writes it)")
    ckpt = read_checkpoint(h.checkpoint_path, device)
    # a knob the checkpoint does not name did not exist when it was saved: that run had the knob's default behaviour
    defaults = {k.name: k.default for k in vars(Hyperparameters).values() if isinstance(k, Knob)}
    ours, theirs = h.by_env_name(), {**defaults, **ckpt["config"]}
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if ours.get(k) != theirs.get(k) and k not in CHECKPOINT_FREE_KNOBS and not k.startswith(CHECKPOINT_FREE_PREFIXES))
    if differ:
        raise ConfigError("checkpoint trained with other settings: " + ", ".join(
            f"{k}={theirs.get(k)} (this run: {ours.get(k)})" for k in differ))
    calib = ckpt["calib"]
    if calib and not h.ternary_calib:
        raise ConfigError("the checkpoint was trained through calibrated quantizers (CALIB_AT_FRAC < 1): set TERNARY_CALIB=1")
    if h.ternary_calib:
        for n, m in model.named_modules():  # GPT made them CalibratedTernaryLinears; the rest stay at (0.5, 1)
            if n in calib:
                m.calib.copy_(calib[n])
    missing, unexpected = model.load_state_dict(ckpt["state"], strict=False)
    if unexpected or set(missing) - {"logit_temperature"}:
        raise ArtifactError(f"CHECKPOINT_PATH={h.checkpoint_path} does not fit this model: missing {missing}, "
                            f"unexpected {unexpected}")
    log(f"checkpoint_loaded path:{h.checkpoint_path} trained_by:{theirs['RUN_ID']} calibrated_tensors:{len(calib)}")
    return bool(calib)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


class Logger:
    """logs/<RUN_ID>.txt holds exactly one run; rank 0 writes it. An existing log is refused rather than appended
    to or rotated aside: appending mixed two runs into one record (a crashed run read as finished, one seed's
    score under another's config), and rotating would silently rename a file a competitor may be about to
    submit. Refusing costs nothing: it happens before any data is read or any step is taken."""

    def __init__(self, h, rank, world, device):
        self.is_master, self.file = rank == 0, None
        path = os.path.join(h.log_dir, f"{h.run_id}.txt")
        if self.is_master:
            os.makedirs(h.log_dir, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.file = open(path, "x", buffering=1)  # exclusive: a concurrent launch cannot share it either
        # Only rank 0 looks at the file (another rank could see the one rank 0 has just created) and tells all.
        if max_across_ranks(float(self.is_master and self.file is None), device, world):
            raise ConfigError(f"{path} already exists: a log holds one run. Pick another RUN_ID, or move the file")

    def __call__(self, msg):
        if self.is_master:
            print(msg, flush=True)
            self.file.write(msg + "\n")

    def error(self, e):
        """The `error:` line that ends a failed run's log (stderr has it, or the traceback, too)."""
        known = (ConfigError, DataError, ArtifactError, DivergenceError)
        msg = str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}".rstrip(": ")  # KeyboardInterrupt has none
        if self.is_master:
            with contextlib.suppress(OSError):  # a full disk must not hide the error being reported
                self.file.write("error: " + " ".join(msg.split()) + "\n")


def setup_distributed(h):
    world, rank, local_rank = h.world_size, h.rank, h.local_rank
    want_cuda = h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but torch.cuda.is_available() is False")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=device if want_cuda else None)
    return rank, world, device


def check_batch_shape(h, world):
    per_micro = h.train_batch_tokens / (world * h.grad_accum_steps)
    if per_micro != int(per_micro) or int(per_micro) % h.train_seq_len:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} must split into WORLD_SIZE={world} x "
            f"GRAD_ACCUM_STEPS={h.grad_accum_steps} micro-batches of whole TRAIN_SEQ_LEN={h.train_seq_len} sequences"
        )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_across_ranks(value, device, world):
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class TrainClock:
    """The timed loop's clock: the slowest rank's seconds of training. Reading it costs a device sync (and, with
    several ranks, an all-reduce), and the GPU idles while the host then launches the next step. TRAIN_SYNC_EVERY=k
    reads it every k steps, on log steps, and on every step once the wall-clock budget could run out within k
    steps, so the run still stops on the first step past its budget; in between the schedule sees the last reading.
    Every rank reads at the same steps, so phases and the stop stay in step across ranks."""

    def __init__(self, h, device, world):
        self.h, self.device, self.world = h, device, world
        self.seconds, self.read_step, self.t0 = 0.0, 0, 0.0

    def start(self):
        sync(self.device)
        self.t0 = time.perf_counter()

    def due(self, step):
        h, k = self.h, self.h.train_sync_every
        if step % k == 0 or logs_at(step, h) or validates_at(step, h) or step >= h.iterations:
            return True
        ahead = (step - self.read_step + k) * self.seconds / self.read_step  # seconds of k more steps from now
        return bool(h.max_wallclock_seconds) and self.seconds + ahead >= h.max_wallclock_seconds

    def read(self, step):
        sync(self.device)
        self.seconds, self.read_step = max_across_ranks(time.perf_counter() - self.t0, self.device, self.world), step
        return self.seconds

    def pause(self, seconds):
        """Time spent off the clock (evaluation during training) does not count."""
        self.t0 += seconds


def logs_at(step, h):
    """Steps that log a train line (besides the last): every TRAIN_LOG_EVERY-th and the first five."""
    return step % h.train_log_every == 0 or step <= 5


def validates_at(step, h):
    """Steps after which the timed loop scores the validation split (VAL_LOSS_EVERY; 0: never), unless it stops."""
    return bool(h.val_loss_every) and step % h.val_loss_every == 0


def train_step(model, base, loader, optimizers, h, schedule, step, elapsed, forced=None):
    """One optimizer step over GRAD_ACCUM_STEPS micro-batches; returns the mean loss (a device tensor). The
    schedule sets LR, momentum and phases; `forced` overrides graph phases' forward arguments (compile warmup)."""
    mult = schedule.lr(step, elapsed)
    kwargs = {**schedule.forward_kwargs(step, elapsed), **(forced or {})}
    if h.fp_phase:
        base.quant_mix.set(schedule.quant_mix(step, elapsed))
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
            if isinstance(opt, Muon):
                g["momentum"] = schedule.momentum(step)
    micro = loader.next_batch()
    total = 0.0
    for i, (x, y) in enumerate(micro):
        last = i == len(micro) - 1
        no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync, autocast(x.device):
            loss = model(x, y, **kwargs) / len(micro)
        loss.backward()
        total = total + loss.detach()
    if h.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_([p for opt in optimizers for g in opt.param_groups for p in g["params"]], h.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if h.capsules_enabled:
        base.capsules.clamp_dynamics()  # |D| < 1 after every step
    return total


def trit_zero_frac(model):
    """Fraction of zero trits over every ternary matrix as the model quantizes them now (weight decay raises it,
    and the artifact's bytes follow it)."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    with torch.no_grad():
        zeros = sum((m.quantize()[0] == 0).sum() for m in layers)
    return float(zeros) / max(1, sum(m.weight.numel() for m in layers))


def flops_per_token(base, h):
    """Training FLOPs per token as the MFU line counts them: 6 per parameter, plus attention's 12 L d T."""
    return 6 * count_params(base)[0] + 12 * h.num_layers * h.model_dim * h.train_seq_len


def h100_mfu(tokens_per_s, flops, world):
    return tokens_per_s * flops / (989e12 * world)


def compile_warmup(model, base, optimizers, h, train_pattern, rank, world, device, log):
    """Compile and autotune on real steps, then put model, optimizers and data back where they started."""
    saved = (copy.deepcopy(base.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers])
    loader = DistributedTokenLoader(train_pattern, h, rank, world, device)
    schedule = TrainingSchedule(h)
    t0 = time.perf_counter()
    for s in range(h.compile_warmup_steps):
        train_step(model, base, loader, optimizers, h, schedule, s, 0.0)
    for forced in schedule.compile_variants():  # the later phases' graphs too, or they would compile in the timed run
        for s in range(2):
            train_step(model, base, loader, optimizers, h, schedule, s, 0.0, forced)
    sync(device)
    loader.close()
    base.load_state_dict(saved[0])
    for opt, st in zip(optimizers, saved[1]):
        opt.load_state_dict(st)
    log(f"compile_warmup steps:{h.compile_warmup_steps} seconds:{time.perf_counter() - t0:.1f} (untimed)")


def train(model, base, optimizers, h, train_pattern, val, rank, world, device, log):
    """The timed loop: stops at ITERATIONS or when the slowest rank's clock passes MAX_WALLCLOCK_SECONDS.
    Returns whether it calibrated the ternary quantizer on the way (CALIB_AT_FRAC < 1)."""
    val_tokens, luts = val
    flops = flops_per_token(base, h)
    loader = DistributedTokenLoader(train_pattern, h, rank, world, device)
    step, train_seconds, stop = 0, 0.0, False
    calibrated, schedule, clock = False, TrainingSchedule(h), TrainClock(h, device, world)
    clock.start()
    while not stop:
        if h.ternary_calib:
            if not calibrated and h.calib_at_frac < 1 and schedule.on("calib", step, train_seconds):
                calibrate_on_training_tokens(base, h, train_pattern, rank, world, device, log)
                calibrated = True  # the rest of the run trains through the calibrated quantizer
        if h.fp_phase:
            if base.quant_mix.value == 0 and schedule.quant_mix(step, train_seconds) > 0:
                log(f"qat_start step:{step}")
        loss = train_step(model, base, loader, optimizers, h, schedule, step, train_seconds)
        step += 1
        if clock.due(step):
            train_seconds = clock.read(step)
        stop = step >= h.iterations or (h.max_wallclock_seconds and train_seconds >= h.max_wallclock_seconds)
        if stop or logs_at(step, h):
            if world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            train_loss = loss.item()
            tok_s = step * h.train_batch_tokens / train_seconds
            left = (h.iterations - step) * train_seconds / step
            if h.max_wallclock_seconds:
                left = min(left, h.max_wallclock_seconds - train_seconds)
            log(
                f"step:{step}/{h.iterations} train_loss:{train_loss:.4f} lr_mult:{schedule.lr(step, train_seconds):.3f} "
                f"tok/s:{tok_s:.0f} step_ms:{1000 * train_seconds / step:.1f} mfu:{h100_mfu(tok_s, flops, world):.3f} "
                f"elapsed:{train_seconds:.1f}s remaining:{max(left, 0):.1f}s"
            )
            # Checked only where the loss is read anyway (log steps, the first 5 and the last): a check every step
            # would cost a device->host sync per step. The loss is all-reduced here, so every rank stops together.
            if not math.isfinite(train_loss):
                raise DivergenceError(f"training diverged at step {step}: train_loss:{train_loss}; no model is "
                                      "written (lower the learning rates, or set GRAD_CLIP_NORM)")
        if validates_at(step, h) and not stop:
            t_val = time.perf_counter()
            vl, vb = evaluate(base, val_tokens, luts, h, rank, world, device)
            log(f"step:{step} val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_seconds:{time.perf_counter() - t_val:.1f}")
            clock.pause(time.perf_counter() - t_val)  # evaluation does not eat the training budget
    loader.close()
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    log(f"train_done steps:{step} train_seconds:{train_seconds:.1f} tok/s:{step * h.train_batch_tokens / train_seconds:.0f} peak_mem_mib:{peak_mem:.0f}")
    return calibrated


def export_and_score(base, h, val, rank, world, device, log):
    """Pre-export score, artifact (rank 0 writes; every rank learns whether it was over the cap), then the
    score of a fresh model loaded from the file on disk. Returns False when over the cap."""
    refuse_nonfinite(base, h.artifact_path)  # every rank, before anything is scored or written
    val_tokens, luts = val
    t_eval = time.perf_counter()
    docs = scoring_documents(val_tokens, h)
    pre_loss, pre_bpb = evaluate(base, val_tokens, luts, h, rank, world, device, h.eval_stride, docs)
    stride = h.eval_stride or h.train_seq_len
    log(f"pre_export val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} eval_seconds:{time.perf_counter() - t_eval:.1f} "
        f"stride:{stride} isolated:{int(h.eval_doc_isolated)}")
    over_cap = export_artifact(base, h, log) if rank == 0 else False
    if max_across_ranks(float(over_cap), device, world):
        return False
    if world > 1:
        dist.barrier()
    t_rt = time.perf_counter()
    fresh = GPT(h).to(device)
    fresh.load_state_dict(load_artifact(h.artifact_path, h))
    t_score = time.perf_counter()
    if h.ttt_enabled and h.ttt_mode == "lora":
        rt_loss, rt_bpb = lora_ttt_evaluate(fresh, val_tokens, luts, h, rank, world, device, log)
    elif h.ttt_enabled or h.eval_engram:
        rt_loss, rt_bpb = stream_evaluate(fresh, val_tokens, luts, h, rank, world, device, log)
    else:
        rt_loss, rt_bpb = evaluate(fresh, val_tokens, luts, h, rank, world, device, h.eval_stride, docs)
    t_end = time.perf_counter()
    challenge_s = challenge_eval_seconds(t_score - t_rt, t_end - t_score, val_tokens, luts, world)
    log(
        f"final_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} gap_bpb:{rt_bpb - pre_bpb:+.4f} "
        f"eval_seconds:{t_end - t_rt:.1f} stride:{stride} isolated:{int(h.eval_doc_isolated)} "
        f"challenge_eval_seconds:{challenge_s:.0f} fits:{int(challenge_s <= CHALLENGE_EVAL_SECONDS)}"
    )
    return True


def training_model(base, h, world, device, use_compile):
    """(model the steps run, optimizers) for `base`: the FP-phase blend, compile, DDP and compiled Newton-Schulz,
    as training uses them (scripts/profile_step.py builds the step it profiles with this too)."""
    if h.fp_phase:
        base.quant_mix = QuantMix(base)  # before compile and DDP, which must see the blending layers
    if h.fp8_matmul:
        function = FP8Matmul
        if h.fp8_dgrad:
            function = FP8DgradMatmul
        if h.fp8_wgrad:
            function = FP8WgradMatmul
        set_fp8_matmuls(base, function)
        if device.type == "cuda":
            check_fp8_matmul(device)
    if h.combo_kernels:
        import torch._inductor.config as inductor_config

        inductor_config.combo_kernels = True  # a step launches ~1,480 kernels, ~880 of them under 10 us (session 19)
    mode = None if h.compile_mode == "default" else h.compile_mode
    model = torch.compile(base, dynamic=False, mode=mode) if use_compile else base
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizers = build_optimizers(base, h)
    if use_compile:
        for opt in optimizers:
            if isinstance(opt, Muon):
                opt.compile_newton_schulz()
    return model, optimizers


def fit(base, h, train_pattern, val, rank, world, device, log, use_compile):
    """Compiles and wraps the model, trains it, and leaves the weights to export in `base`.
    Returns whether training calibrated the ternary quantizer on the way."""
    model, optimizers = training_model(base, h, world, device, use_compile)
    if h.compile_warmup_steps:
        compile_warmup(model, base, optimizers, h, train_pattern, rank, world, device, log)
    calibrated = train(model, base, optimizers, h, train_pattern, val, rank, world, device, log)
    if h.fp_phase:
        base.quant_mix.finish()  # a run that stopped inside the ramp still exports (and scores) quantized weights
    if h.fp8_matmul:
        set_fp8_matmuls(base, None)  # scoring and export multiply in bf16, as every evaluation path does
    log(f"trit_zero_frac:{trit_zero_frac(base):.4f}")
    return calibrated


def run(h, rank, world, device, log):
    use_compile = h.compile == "1" or (h.compile == "auto" and device.type == "cuda")
    log(f"run_id:{h.run_id} world_size:{world} device:{device} torch:{torch.__version__} compile:{use_compile}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"code sha256:{code_sha256()} gpu:{gpu.replace(' ', '_')}")
    log("config " + " ".join(f"{k}={v}" for k, v in h.by_env_name().items()))

    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
    val_tokens = load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.vocab_size, h.max_val_tokens)
    val = (val_tokens, build_byte_luts(sp, h.vocab_size))
    train_pattern = os.path.join(h.data_path, "fineweb_train_*.bin")
    log(f"data train_shards:{len(shard_files(train_pattern))} val_tokens:{len(val_tokens) - 1}")
    check_data(h, log)

    base = GPT(h).to(device)
    total_params, ternary_params = count_params(base)
    log(f"model params:{total_params} ternary:{ternary_params} attention:{base.attn_backend}")
    if h.eval_from_checkpoint:
        calibrated = load_checkpoint(base, h, device, log)
    else:
        calibrated = fit(base, h, train_pattern, val, rank, world, device, log, use_compile)
        if h.checkpoint_save:
            refuse_nonfinite(base, h.checkpoint_path)  # every rank, so all stop together
            if rank == 0:
                save_checkpoint(base, calibrated, h, log)
    if h.ternary_calib:
        if not calibrated:  # after the weights are final, before anything scores them
            calibrate_on_training_tokens(base, h, train_pattern, rank, world, device, log)
    if h.temperature_search:
        t0 = time.perf_counter()
        tokens = training_prefix(train_pattern, h.temperature_tokens, h.vocab_size)
        t, nll = search_temperature(base, tokens, h, rank, world, device)
        base.logit_temperature.fill_(t)
        log(f"temperature T:{t:.4f} train_tokens:{len(tokens) - 1} nll_at_1:{nll[1.0]:.4f} "
            f"nll_at_T:{min(nll.values()):.4f} seconds:{time.perf_counter() - t0:.1f}")
    ok = export_and_score(base, h, val, rank, world, device, log)
    if not ok:
        log(f"error: code + model is over ARTIFACT_CAP_BYTES={h.artifact_cap_bytes}; nothing was scored")
    if world > 1:
        dist.barrier()  # no rank tears its group down while another still talks to it
        dist.destroy_process_group()
        # Leave without interpreter teardown: there a gloo rank has aborted ("terminate called without an active
        # exception") after a finished run, which made torchrun fail a good run. Nothing is left to write: the
        # log is line-buffered and the artifact fsynced.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)
    if not ok:
        sys.exit(1)


def main():
    h = Hyperparameters()
    rank, world, device = setup_distributed(h)
    check_batch_shape(h, world)
    check_outputs(h)
    log = Logger(h, rank, world, device)
    try:
        run(h, rank, world, device, log)
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
