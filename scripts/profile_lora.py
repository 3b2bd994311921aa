"""Where a LoRA TTT pass's time goes (issue 14): the pass as train_gpt.py's final evaluation runs it
(lora_ttt_evaluate on an uncompiled model), timed, then under torch.profiler, on one GPU.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=8192 <the run's TTT_LORA_* knobs> \\
        python3 scripts/profile_lora.py --out prof/
    options: --top N (rows of the op table, default 40), --trace (also write a chrome trace), --allow-cpu (run on
    the CPU: for tests), --steps K --skip W (profile only chunk steps W .. W+K-1 of the third pass)

TTT_ENABLED=1 and TTT_MODE=lora are implied; every other knob comes from the environment as the trainer reads it.
With EVAL_FROM_CHECKPOINT=1 CHECKPOINT_PATH=... the model is that checkpoint; without, it is the model as
initialised, whose pass meets the same shapes and kernels (its scores mean nothing then). The pass runs three
times: cold (what a final evaluation pays, cuDNN's plans and the allocator's first blocks included), warm, and warm
under the profiler: the whole pass, or with --steps K only K of its chunk steps after the first --skip W (a whole
pass under the profiler outlasted the 187 s session 14 gave it on an H200: its CPU events are too many). Writes to
--out lora_table.txt (the profiler's op table by device time) and lora_breakdown.md:
the pass's kernels bucketed as profile_step.py buckets a training step's, AdamW's steps as the optimizer region,
the kernels each chunk step launches (on the CPU: its ops, nested ones included), and the pass's wall time against
the union of its kernels. A pass whose GPU idles for much of its wall is bound by the host (eager launches, reads
back from the GPU); one that stays busy is bound by its kernels.
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import profile_step as ps  # noqa: E402
from lora_shapes import pass_shapes  # noqa: E402
import train_gpt as tg  # noqa: E402

REGIONS = {"fwd_bwd": "forward+backward (scoring, adapters' gradients, batch copies)", "optimizer": "AdamW steps"}


def progress(msg):
    print(f"profile_lora {msg}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--top", type=int, default=40, help="rows of the profiler's op table")
    p.add_argument("--out", default=".", help="folder for lora_table.txt, lora_breakdown.md, the trace")
    p.add_argument("--trace", action="store_true", help="also export a chrome trace (lora_trace.json)")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (tests)")
    p.add_argument("--steps", type=int, default=0, help="chunk steps to profile (0: the whole pass)")
    p.add_argument("--skip", type=int, default=10, help="with --steps: chunk steps before them (at least 1)")
    args = p.parse_args(argv)
    if args.steps < 0 or (args.steps and args.skip < 1):
        p.error(f"--steps {args.steps} --skip {args.skip}: --steps must be >= 0 and --skip >= 1 with it (the "
                "profiler warms up on the step before the first it records)")
    return args


def counted(model):
    """The model's chunk steps (token_nll calls), counted in a list: the step count of the pass."""
    calls, real = [], model.token_nll
    model.token_nll = lambda *a, **k: calls.append(1) or real(*a, **k)  # an instance attribute: the class is as it was
    return calls


def regioned_optimizers():
    """train_gpt.lora_optimizer patched, while the context lasts, to put its optimizers' step() in profile_step's
    optimizer region."""
    real = tg.lora_optimizer

    def wrapped(params, lr, h):
        opt = real(params, lr, h)
        opt.step = ps.with_region(opt.step, ps.OPT)
        return opt
    return mock.patch.object(tg, "lora_optimizer", wrapped)


def stepped(model, prof, skip, n, device):
    """model.token_nll wrapped for a pass whose chunk steps skip .. skip+n-1 alone are profiled: before each call
    the profiler steps (its schedule records only those), and each of them runs in profile_step's STEP region,
    which the next call closes after a synchronize, so a region holds its step's kernels and nothing else.
    Returns a function that restores the model."""
    real, calls, open_region = model.token_nll, [0], []

    def call(*a, **k):
        i = calls[0]
        calls[0] += 1
        if skip <= i <= skip + n:  # a recorded step starts or the last one ends: wait for the GPU at the boundary
            tg.sync(device)
        if open_region:
            open_region.pop().__exit__(None, None, None)
        prof.step()
        if skip <= i < skip + n:
            region = record_function(ps.STEP)
            region.__enter__()
            open_region.append(region)
        return real(*a, **k)

    def restore():
        model.token_nll = real
    model.token_nll = call
    return restore


def profiled(model, val, h, device, lines, steps, skip, activities):
    """The third pass under the profiler: whole (steps 0, one STEP region) or only chunk steps skip .. skip+steps-1
    (a schedule that records just those)."""
    if not steps:
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            one_pass(model, val, h, device, lines, region=True)
        return prof
    schedule = torch.profiler.schedule(wait=skip, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False) as prof:
        restore = stepped(model, prof, skip, steps, device)
        try:
            one_pass(model, val, h, device, lines)
        finally:
            restore()
    return prof


def one_pass(model, val, h, device, lines, region=False):
    """Seconds of one lora_ttt_evaluate, synchronized, its log lines appended to `lines`; in a profiler region."""
    tg.sync(device)
    t0 = time.perf_counter()
    with record_function(ps.STEP) if region else contextlib.nullcontext():
        tg.lora_ttt_evaluate(model, *val, h, 0, 1, device, lines.append)
        tg.sync(device)
    return time.perf_counter() - t0


def lora_config(h):
    return (f"config: TTT_LORA_CHUNK={h.ttt_lora_chunk} TTT_LORA_SPAN={h.ttt_lora_span} "
            f"TTT_LORA_DOCS={h.ttt_lora_docs} TTT_LORA_RANK={h.ttt_lora_rank} TTT_LORA_TARGETS={h.ttt_lora_targets} "
            f"TTT_LORA_GLOBAL={int(h.ttt_lora_global)} TTT_LORA_GLOBAL_TARGETS={h.lora_global_targets or '-'} "
            f"TTT_LORA_BUCKET={int(h.ttt_lora_bucket)} TTT_LORA_NO_CUDNN={int(h.ttt_lora_no_cudnn)} "
            f"EVAL_DOC_ISOLATED={int(h.eval_doc_isolated)} TRAIN_SEQ_LEN={h.train_seq_len} "
            f"NUM_LAYERS={h.num_layers} MODEL_DIM={h.model_dim} VOCAB_SIZE={h.vocab_size}")


def load(h, device):
    """(model, (validation tokens, byte tables)): the checkpoint's model with EVAL_FROM_CHECKPOINT, else a fresh one."""
    sp = tg.load_tokenizer(h.tokenizer_path, h.vocab_size)
    tokens = tg.load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.vocab_size, h.max_val_tokens)
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(device)
    if h.eval_from_checkpoint:
        tg.load_checkpoint(model, h, device, progress)
    return model, (tokens, tg.build_byte_luts(sp, h.vocab_size))


def main(argv=None):
    args = parse_args(argv)
    h = tg.Hyperparameters({**os.environ, "TTT_ENABLED": "1", "TTT_MODE": "lora"})
    device = ps.setup(h, args.allow_cpu)
    if device is None:
        print(f"error: no CUDA device (torch.cuda.is_available()={torch.cuda.is_available()}, DEVICE={h.device}); "
              "profile_lora.py profiles the GPU pass. Pass --allow-cpu to run on the CPU anyway", file=sys.stderr)
        return 2
    on_gpu, out = device.type == "cuda", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, val = load(h, device)
    progress(f"phase:load device:{device} val_tokens:{len(val[0]) - 1} checkpoint:{int(h.eval_from_checkpoint)}")
    planned = len(pass_shapes(val[0], h))  # the pass's chunk steps, from its batching alone
    if args.steps and planned < args.skip + args.steps + 1:  # the step after the last recorded one ends its region
        raise tg.ConfigError(f"--skip {args.skip} --steps {args.steps} needs {args.skip + args.steps + 1} chunk steps; "
                             f"this pass has {planned}")
    steps, lines = counted(model), []
    with regioned_optimizers():
        cold = one_pass(model, val, h, device, lines)
        n_steps = len(steps)
        warm = one_pass(model, val, h, device, lines)
        timing = (f"cold_pass_s:{cold:.2f} warm_pass_s:{warm:.2f} chunk_steps:{n_steps} "
                  f"warm_ms_per_step:{1000 * warm / max(n_steps, 1):.1f}")
        progress(f"phase:timed {timing}")
        progress(lines[0])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        prof = profiled(model, val, h, device, lines, args.steps, args.skip, activities)
    items = ps.device_items(prof.events()) if on_gpu else ps.cpu_items(prof.events())
    regions, title = (args.steps, "LoRA TTT chunk step") if args.steps else (1, "LoRA TTT pass")
    if args.steps:
        timing += f" profiled_steps:{args.skip}-{args.skip + args.steps - 1}"
    timing += f" {'kernels' if on_gpu else 'ops'}_per_step:{len(items) / (args.steps or max(n_steps, 1)):.0f}"
    md = ps.breakdown_markdown(ps.breakdown(prof, regions, on_gpu), regions, on_gpu, timing, h, title=title,
                               config=lora_config(h), regions_named=REGIONS)
    ps.write_reports(out, "lora", ps.op_table(prof, on_gpu, args.top), md, prof if args.trace else None)
    progress(f"phase:done out:{out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (tg.ConfigError, tg.DataError, tg.ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
