"""Where one training step's GPU time goes: the step exactly as train_gpt.py runs it, under torch.profiler, on one GPU.

    DATA_PATH=... VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=262144 GRAD_ACCUM_STEPS=2 FP_PHASE=1 MLP_MULT=4 \\
        python3 scripts/profile_step.py --out prof/          # every knob from the env, as the trainer reads it
    options: --warmup N (compile + autotune steps, default 8), --steps N (profiled, default 5), --timed N (timed
    without the profiler, default 20), --top N (rows of the op table, default 40), --quant-mix Q (FP_PHASE's blend,
    default 1: the ternary phase most of a run trains in), --trace (also write a chrome trace), --shapes (also write
    profile_shapes.txt: the op table by op and input shapes, e.g. each GEMM's), --gaps (also write profile_gaps.md:
    the GPU's idle gaps within the step, by the kernels around them and by the CPU ops that ran meanwhile),
    --steady (profile the steps synchronized as training is, every TRAIN_SYNC_EVERY steps, not after each),
    --allow-cpu (run on the CPU, uncompiled, with 1/1/2 steps: for tests)

Builds the model, FP-phase blend, compile, optimizers and compiled Newton-Schulz like `fit`, runs the warmup steps
through train_gpt.train_step, times --timed steps (the timing line carries the GPU's clocks, power and temperature
from nvidia-smi, read right after them), then writes to --out: profile_table.txt (the profiler's op table sorted by device
time) and profile_breakdown.md (every kernel bucketed by name: matmul, attention, optimizer, triton, reductions,
memcpy, nccl, other; each bucket's heaviest kernel names; per-region totals forward+backward / optimizer; the GPU
idle gap within the step, split into the latency between back-to-back kernels and longer gaps; the kernels
launched per step, how many of them run under 10 us, and which of those launch most). On the CPU there are no
kernels, so the CPU ops (self time) are bucketed instead, through the same code.
Steps run from step 0 with elapsed 0, so graph phases (DEPTH_RECUR) are as at the start of a run.
"""
import argparse
import bisect
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict, namedtuple
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

STEP, OPT = "profile_step/step", "profile_step/optimizer"  # record_function regions this script adds
REGIONS = {"fwd_bwd": "forward+backward (incl. batch copy, grad clip)", "optimizer": "optimizer step"}

# GPU kernels: (bucket, name fragments), first match wins. Inductor's triton kernels first (their names carry the
# fused ops' names, e.g. triton_poi_fused__to_copy_mul_0), then attention before matmul (flash kernels carry
# cutlass / sm90 in their names). Names are lower-cased.
KERNEL_BUCKETS = [
    ("matmul", ("triton_tem",)),  # inductor's matmul templates
    # XSA_KERNEL's, QK_NORM_KERNEL's and CE_KERNEL's Triton kernels too
    ("reductions/norm", ("triton_red", "triton_per", "xsa_", "norm_rope_", "softcap_ce_")),
    ("triton fused elementwise", ("triton_",)),
    ("memcpy/memset", ("memcpy", "memset")),
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "xmma")),
    ("reductions/norm", ("reduce", "norm", "softmax", "cross_entropy", "nll_loss")),
    ("elementwise (eager)", ("elementwise", "foreach")),
]
# CPU ops (the no-CUDA fallback), by their aten name without "aten::" and a trailing "_".
ATEN_MEMCPY = {"copy", "_to_copy", "to", "fill", "zero", "clone", "contiguous", "empty", "zeros", "empty_like",
               "zeros_like", "ones_like", "full", "empty_strided", "new_zeros", "new_empty", "new_empty_strided"}
ATEN_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "einsum"}
ATEN_REDUCE = ("sum", "mean", "norm", "softmax", "amax", "max", "min", "nll_loss", "cross_entropy", "std", "var")
ATEN_ELEMENTWISE = {"add", "mul", "sub", "div", "where", "sign", "abs", "clamp", "clamp_min", "clamp_max", "round",
                    "lerp", "pow", "sqrt", "rsqrt", "exp", "tanh", "sigmoid", "relu", "gelu", "neg", "silu", "rsub",
                    "reciprocal", "addcmul", "addcdiv", "square", "cos", "sin", "eq", "ne", "gt", "lt", "ge", "le",
                    "maximum", "minimum", "threshold_backward", "gelu_backward", "silu_backward", "sigmoid_backward",
                    "tanh_backward", "cat", "embedding", "embedding_dense_backward", "index", "gather", "scatter",
                    "index_add", "masked_fill", "floor", "ceil", "log", "erf"}
OPTIMIZER_BUCKET = "optimizer (Muon Newton-Schulz, Adam)"  # every kernel launched inside an optimizer step
TOP_NAMES = 8  # kernel names listed per bucket in the breakdown
SHORT_KERNEL_US, SHORT_GAP_US = 10, 5  # launch_stats: a kernel this short is launch-bound; a gap this short, latency
TOP_SHORT = 20  # the breakdown's rows of the most launched short kernels
GAP_US, GAP_ROWS = 20, 25  # --gaps: the idle gaps listed are at least this long; rows per table
Span = namedtuple("Span", "start end")  # step_windows' merged window, as a profiler time range reads
STEP_START = "(step start)"  # idle_gaps: the gap before a step's first kernel


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=None, help="compile/autotune steps (default 8; CPU 1)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5; CPU 1)")
    p.add_argument("--timed", type=int, default=None, help="steps timed without the profiler (default 20; CPU 2)")
    p.add_argument("--top", type=int, default=40, help="rows of the profiler's op table")
    p.add_argument("--quant-mix", type=float, default=1.0, help="FP_PHASE blend q (1: ternary, 0: unquantized)")
    p.add_argument("--out", default=".", help="folder for profile_table.txt, profile_breakdown.md, the trace")
    p.add_argument("--trace", action="store_true", help="also export a chrome trace (profile_trace.json)")
    p.add_argument("--shapes", action="store_true",
                   help="record input shapes and write profile_shapes.txt, the op table by op and shapes")
    p.add_argument("--gaps", action="store_true",
                   help=f"also write profile_gaps.md: the GPU's idle gaps of at least {GAP_US} us, by the kernels "
                        "around them and by the CPU ops that ran meanwhile")
    p.add_argument("--steady", action="store_true",
                   help="profile the steps synchronized as training is (every TRAIN_SYNC_EVERY), not after each: "
                        "the steady state's idle time; per-step figures are then the window's over --steps")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (tests)")
    a = p.parse_args(argv)
    for k in ("warmup", "steps", "timed", "top"):
        if getattr(a, k) is not None and getattr(a, k) < (0 if k == "warmup" else 1):
            p.error(f"--{k} must be >= {0 if k == 'warmup' else 1}")
    if not 0.0 <= a.quant_mix <= 1.0:
        p.error("--quant-mix must be in [0, 1]")
    return a


def progress(msg):
    print(f"profile_step {msg}", flush=True)


class FixedMixSchedule(tg.TrainingSchedule):
    """The trainer's schedule with FP_PHASE's blend held at --quant-mix: train_step sets q from the schedule every
    step, and at step 0 the real schedule says 0 (before QAT_START_FRAC)."""

    def __init__(self, h, q):
        super().__init__(h)
        self.q = q

    def quant_mix(self, step, elapsed):
        return self.q


def with_region(fn, name):
    """fn wrapped in a profiler region: kernels launched inside it are attributed to that region."""
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapped


def build(h, device, q):
    """Model, compiled model and optimizers as `fit` builds them (single process: no DDP)."""
    torch.manual_seed(h.seed)
    base = tg.GPT(h).to(device)
    use_compile = device.type == "cuda" and h.compile != "0"
    model, optimizers = tg.training_model(base, h, 1, device, use_compile)
    if h.fp_phase:
        base.quant_mix.set(q)
    for opt in optimizers:
        opt.step = with_region(opt.step, OPT)  # an instance attribute: train_gpt.py is untouched
    return base, model, optimizers, use_compile


def run_steps(n, ctx, first, region=False, steady=False):
    """n train_gpt.train_step calls, synchronized as train() reads its clock: after every TRAIN_SYNC_EVERY-th step
    (default every step) and after the last; in the profiled region after every step, whose window ends there,
    unless steady. Returns the next step index."""
    base, model, optimizers, h, loader, schedule, device = ctx
    every = 1 if region and not steady else h.train_sync_every
    for k, s in enumerate(range(first, first + n), 1):
        with record_function(STEP) if region else contextlib.nullcontext():
            tg.train_step(model, base, loader, optimizers, h, schedule, s, 0.0)
            if k % every == 0 or k == n:
                tg.sync(device)
    return first + n


def ancestors(evt):
    while evt is not None:
        yield evt
        evt = evt.cpu_parent


def region_of(evt):
    return "optimizer" if any(e.name == OPT for e in ancestors(evt)) else "fwd_bwd"


def bucket(name, region):
    if region == "optimizer":
        return OPTIMIZER_BUCKET
    low = name.lower()
    if low.startswith("aten::"):
        op = low[len("aten::"):].rstrip("_") or low
        if op in ATEN_MEMCPY:
            return "memcpy/memset"
        if "attention" in op:
            return "attention"
        if op in ATEN_MATMUL:
            return "matmul"
        if any(f in op for f in ATEN_REDUCE):
            return "reductions/norm"
        return "elementwise (eager)" if op in ATEN_ELEMENTWISE else "other"
    for b, frags in KERNEL_BUCKETS:
        if any(f in low for f in frags):
            return b
    return "other"


def is_annotation(e):
    return getattr(e, "is_user_annotation", False) or e.name in (STEP, OPT) or e.name.startswith("Optimizer.")


def is_optimizer_annotation(e):
    return e.name == OPT or e.name.startswith("Optimizer.step")


def device_items(events):
    """(name, start_us, end_us, time_us, region) of every GPU kernel, memcpy and memset. A kernel belongs to the
    optimizer when it starts inside the GPU-side span of an optimizer annotation (this script's region, or torch's
    own Optimizer.step#...): one stream runs the step's kernels in launch order, so the span holds exactly the
    optimizer's kernels, and the idle time between them shows as the span's excess over their sum. (Linking a
    kernel to its launching op found none on the H200 of 2026-11-29: kernels launched from compiled code have no
    op ancestry there.)"""
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    opt_spans = sorted((e.time_range.start, e.time_range.end) for e in gpu if is_optimizer_annotation(e))
    items = []
    for e in gpu:
        if is_annotation(e):
            continue
        t0, t1 = e.time_range.start, e.time_range.end
        region = "optimizer" if any(s0 <= t0 < s1 for s0, s1 in opt_spans) else "fwd_bwd"
        items.append((e.name, t0, t1, t1 - t0, region))
    return items


def cpu_items(events):
    """The CPU fallback: every op inside a step region with its self time (no double counting of nested ops)."""
    items = []
    for e in events:
        if e.device_type != DeviceType.CPU or is_annotation(e) or not any(a.name == STEP for a in ancestors(e)):
            continue
        items.append((e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total, region_of(e)))
    return items


def profiled_items(events, on_gpu):
    """device_items on a GPU; on the CPU, which has no kernels, cpu_items."""
    return device_items(events) if on_gpu else cpu_items(events)


def union_us(spans):
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def window_items(items, w):
    """The items (kernels, or CPU ops) that start within window w, in start order."""
    return sorted((i for i in items if w.start <= i[1] < w.end), key=lambda i: i[1])


def busy_us(items, windows):
    """The union of the items' time, each clipped to its window, over the windows."""
    return sum(union_us([(max(t0, w.start), min(t1, w.end)) for _, t0, t1, _, _ in items
                         if t0 < w.end and t1 > w.start]) for w in windows)


def launch_stats(items, windows):
    """{"kernels": count, "short_kernels": count, "short_kernels_us", "short_gaps_us"} of the kernels within the
    windows: those under SHORT_KERNEL_US (launch-bound work), and the idle gaps under SHORT_GAP_US between one kernel's
    end and the next one's start (the GPU's own latency between back-to-back kernels, which only fewer kernels or a
    CUDA graph shorten). The rest of a window's idle time is longer gaps: the CPU behind the GPU, or syncs.
    "short_names": {(name, region): [launches, us]} of the short kernels, where fewer launches would come from."""
    stats = dict.fromkeys(("kernels", "short_kernels", "short_kernels_us", "short_gaps_us"), 0.0)
    stats["short_names"] = defaultdict(lambda: [0, 0.0])
    for w in windows:
        end = None
        for name, t0, t1, us, region in window_items(items, w):
            stats["kernels"] += 1
            if us < SHORT_KERNEL_US:
                stats["short_kernels"] += 1
                stats["short_kernels_us"] += us
                stats["short_names"][(name, region)][0] += 1
                stats["short_names"][(name, region)][1] += us
            if end is not None and 0 < t0 - end < SHORT_GAP_US:
                stats["short_gaps_us"] += t0 - end
            end = t1 if end is None else max(end, t1)
    return stats


def idle_gaps(items, windows, min_us):
    """[(start_us, end_us, before, after)] of the GPU's idle gaps of at least min_us within each step window, in time
    order: from the window's start (before = STEP_START) or the end of the kernels so far to the next kernel's start.
    `before` is the kernel that ended last before the gap, `after` the one that ends it."""
    gaps = []
    for w in windows:
        end, before = w.start, STEP_START
        for name, t0, t1, _, _ in window_items(items, w):
            if t0 - end >= min_us:
                gaps.append((end, t0, before, name))
            if t1 > end:
                end, before = t1, name
    return gaps


def cpu_ops_during(events, gaps, depth):
    """{name: us} of the gaps' time that each CPU op `depth` levels below the top (annotations skipped, on any
    thread: the forward's and the autograd engine's) overlaps; a nested op is named "outer > inner". Where the CPU
    was while the GPU waited."""
    spans = sorted((g[0], g[1]) for g in gaps)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    out = defaultdict(float)
    for e in events:
        if e.device_type != DeviceType.CPU or is_annotation(e):
            continue
        chain = [a.name for a in ancestors(e) if not is_annotation(a)][::-1]
        if len(chain) != depth + 1:
            continue
        t0, t1 = e.time_range.start, e.time_range.end
        for k in range(bisect.bisect_right(ends, t0), bisect.bisect_left(starts, t1)):
            out[" > ".join(n[:60] for n in chain)] += min(t1, ends[k]) - max(t0, starts[k])
    return out


def gaps_markdown(events, items, windows, steps, min_us=GAP_US, top=GAP_ROWS, steady=False):
    """--gaps: the idle gaps of at least min_us per step, summed by the kernel pair around them, and by the CPU ops
    (top level, then one level down) that ran while the GPU waited."""
    gaps = idle_gaps(items, windows, min_us)
    ms = lambda us: us / steps / 1000  # noqa: E731
    pairs = defaultdict(lambda: [0, 0.0, 0.0])
    for g0, g1, before, after in gaps:
        w = next(w for w in windows if w.start <= g0 < w.end)
        row = pairs[(before, after)]
        row[0], row[1], row[2] = row[0] + 1, row[1] + g1 - g0, row[2] + g0 - w.start
    total = sum(g1 - g0 for g0, g1, _, _ in gaps)
    idle = sum(w.end - w.start for w in windows) - busy_us(items, windows)
    how = "synchronized as training is (--steady): one window" if steady else "a synchronize after each"
    lines = [f"# GPU idle gaps of at least {min_us} us ({steps} profiled steps, {how})", "",
             f"{len(gaps) / steps:.1f} gaps per step, {ms(total):.3f} ms per step, of {ms(idle):.3f} ms of idle time "
             f"per step; the other {ms(idle - total):.3f} ms: shorter gaps, and the wait after the last kernel.", "",
             "| kernel before | kernel after | gaps/step | ms/step |" + ("" if steady else " mean start in the step (ms) |"),
             "|---|---|---:|---:|" + ("" if steady else "---:|")]  # steady: one window, no step to be placed in
    for (before, after), (n, us, at) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| `{before[:70]}` | `{after[:70]}` | {n / steps:.1f} | {ms(us):.3f} |"
                     + ("" if steady else f" {at / n / 1000:.2f} |"))
    for depth in (0, 1):
        lines += ["", f"CPU ops {'at the top level' if depth == 0 else 'one level down'} while the GPU waited "
                  "(overlap with the gaps; threads overlap, so rows can sum past the gaps):", "",
                  "| CPU op | ms/step |", "|---|---:|"]
        ops = cpu_ops_during(events, gaps, depth)
        lines += [f"| `{n[:150]}` | {ms(us):.3f} |" for n, us in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


def step_windows(events, steps, steady=False):
    """The profiled steps' CPU time ranges (each ends at its synchronize); steady: the steps ran unsynchronized, so
    one window spans them all, and per-step figures are its totals over `steps`."""
    windows = [e.time_range for e in events if e.name == STEP and e.device_type == DeviceType.CPU]
    if len(windows) != steps:
        raise RuntimeError(f"profiler gave {len(windows)} step regions for {steps} steps; nothing to break down")
    return [Span(min(w.start for w in windows), max(w.end for w in windows))] if steady else windows


def breakdown(prof, steps, on_gpu, top_names=TOP_NAMES, steady=False):
    """{bucket: us}, {region: us}, busy us within the steps, wall us of the steps, and each bucket's `top_names`
    heaviest kernel (op) names {bucket: [(name, us)]}, heaviest first: what a bucket's total is made of. On the GPU
    the region dict also holds the optimizer's span and launch_stats' counts and times (over all steps)."""
    events = prof.events()
    items = profiled_items(events, on_gpu)
    windows = step_windows(events, steps, steady)
    if not items:
        raise RuntimeError(f"profiler gave no {'kernels' if on_gpu else 'ops'} for {steps} steps; nothing to break down")
    buckets, regions, names = defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
    for name, _, _, us, region in items:
        b = bucket(name, region)
        buckets[b] += us
        regions[region] += us
        names[b][name] += us
    busy = busy_us(items, windows)  # each step's window ends at the synchronize
    wall = sum(w.end - w.start for w in windows)
    if on_gpu:  # the optimizer's GPU span, idle gaps included: launch-bound when well above its kernels' sum
        regions["optimizer_span"] = union_us([(e.time_range.start, e.time_range.end) for e in events if
                                              e.device_type == DeviceType.CUDA and is_optimizer_annotation(e)])
        regions.update(launch_stats(items, windows))
    tops = {b: sorted(n.items(), key=lambda kv: -kv[1])[:top_names] for b, n in names.items()}
    return buckets, regions, busy, wall, tops


def training_config(h):
    return (f"config: TRAIN_BATCH_TOKENS={h.train_batch_tokens} GRAD_ACCUM_STEPS={h.grad_accum_steps} "
            f"TRAIN_SEQ_LEN={h.train_seq_len} NUM_LAYERS={h.num_layers} MODEL_DIM={h.model_dim} "
            f"MLP_MULT={h.mlp_mult} VOCAB_SIZE={h.vocab_size} FP_PHASE={int(h.fp_phase)} "
            f"MUON_BATCHED={int(h.muon_batched)} TRAIN_SYNC_EVERY={h.train_sync_every}")


def breakdown_markdown(res, steps, on_gpu, timing, h, title="Training step", config=None, regions_named=REGIONS):
    """The breakdown as markdown, per profiled step (a training step here; profile_lora.py's whole pass)."""
    buckets, regions, busy, wall, tops = res
    total = sum(buckets.values())
    what = "GPU kernel time" if on_gpu else "CPU op self time (no CUDA: CPU ops bucketed)"
    unit = title.split()[-1]
    ms = lambda us: us / steps / 1000  # noqa: E731
    lines = [f"# {title} profile ({steps} profiled {unit}{'s' * (steps != 1)}, {what})", "", config or training_config(h), "",
             f"timed (no profiler): {timing}", "",
             f"| bucket | ms/{unit} | share |", "|---|---:|---:|"]
    for b, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {b} | {ms(us):.3f} | {100 * us / total:.1f}% |")
    lines.append(f"| **total** | {ms(total):.3f} | 100.0% |")
    lines += ["", f"| region | ms/{unit} | share |", "|---|---:|---:|"]
    for r, label in regions_named.items():
        lines.append(f"| {label} | {ms(regions[r]):.3f} | {100 * regions[r] / total:.1f}% |")
    if "optimizer_span" in regions:
        lines.append(f"| optimizer span on the GPU (first to last kernel, idle included) | {ms(regions['optimizer_span']):.3f} | |")
    lines += [f"| {unit} wall time (profiled, incl. synchronize) | {ms(wall):.3f} | |",
              f"| busy (union of {'kernels' if on_gpu else 'ops'} within the {unit}) | {ms(busy):.3f} | |",
              f"| gap (idle within the {unit}: launch overhead, syncs) | {ms(wall - busy):.3f} | "
              f"{100 * (wall - busy) / wall:.1f}% of wall |"]
    if "kernels" in regions:
        short_gaps = regions["short_gaps_us"]
        lines += [f"| gap between back-to-back kernels (under {SHORT_GAP_US} us each) | {ms(short_gaps):.3f} | |",
                  f"| longer gaps (the CPU behind the GPU, syncs) | {ms(wall - busy - short_gaps):.3f} | |",
                  f"| kernels launched per {unit} (under {SHORT_KERNEL_US} us: count, ms) | "
                  f"{regions['kernels'] / steps:.0f} | {regions['short_kernels'] / steps:.0f}, "
                  f"{ms(regions['short_kernels_us']):.3f} |"]
    lines += ["", f"Each bucket's heaviest {'kernels' if on_gpu else 'ops'} (names cut at 120 characters):", "",
              f"| bucket | name | ms/{unit} | share of the bucket |", "|---|---|---:|---:|"]
    for b, us_b in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines += [f"| {b} | `{n[:120]}` | {ms(us):.3f} | {100 * us / us_b:.1f}% |" for n, us in tops[b]]
    if regions.get("short_names"):
        lines += ["", f"The most launched kernels under {SHORT_KERNEL_US} us (launch-bound: where fewer launches would "
                  "come from):", "", f"| name | region | launches/{unit} | ms/{unit} |", "|---|---|---:|---:|"]
        most = sorted(regions["short_names"].items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:TOP_SHORT]
        lines += [f"| `{n[:120]}` | {r} | {k / steps:.1f} | {ms(us):.3f} |" for (n, r), (k, us) in most]
    return "\n".join(lines) + "\n"


def op_table(prof, on_gpu, top, by_shape=False):
    """The profiler's op table, heaviest first; by_shape: one row per op and input shapes (needs record_shapes), so
    that each GEMM's time shows against its (tokens x in, in x out) operands."""
    averages = prof.key_averages(group_by_input_shape=by_shape)
    for key in (("self_device_time_total", "self_cuda_time_total") if on_gpu else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=key, row_limit=top)
        except (AttributeError, KeyError, ValueError):
            continue  # older torch names the device column cuda
    return averages.table(row_limit=top)


def write_reports(out, name, table, md, trace_of=None):
    """<name>_table.txt and <name>_breakdown.md (printed too) under out, and the chrome trace of the profiler
    `trace_of` as <name>_trace.json."""
    (out / f"{name}_table.txt").write_text(table + "\n")
    print(md, flush=True)
    (out / f"{name}_breakdown.md").write_text(md)
    if trace_of is not None:
        trace_of.export_chrome_trace(str(out / f"{name}_trace.json"))


GPU_FIELDS = (("sm_mhz", "clocks.sm"), ("sm_max_mhz", "clocks.max.sm"), ("mem_mhz", "clocks.mem"),
              ("power_w", "power.draw"), ("power_limit_w", "power.limit"), ("temp_c", "temperature.gpu"))


def gpu_state(device):
    """nvidia-smi's clocks, power and temperature of the profiled GPU (found by its UUID), as key:value pairs for the
    timing line, read right after the timed steps. Machines lent under one name differ: session 22 trained the same
    step at 73.0 ms on one and 67.0 ms on another. "" off a GPU; gpu_state:unavailable(...) when nvidia-smi fails."""
    if device.type != "cuda":
        return ""
    if shutil.which("nvidia-smi") is None:
        return "gpu_state:unavailable(no nvidia-smi)"
    query = ",".join(field for _, field in GPU_FIELDS)
    try:
        uuid = torch.cuda.get_device_properties(device).uuid
        r = subprocess.run(["nvidia-smi", f"--id=GPU-{uuid}", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (AttributeError, OSError, subprocess.SubprocessError) as e:  # (a torch without the uuid property too)
        return f"gpu_state:unavailable({type(e).__name__})"
    values = [v.strip() for v in r.stdout.strip().split(",")]
    if r.returncode or len(values) != len(GPU_FIELDS):
        return f"gpu_state:unavailable(nvidia-smi rc {r.returncode}: {(r.stderr or r.stdout).strip()[:80]})"
    return " ".join(f"{key}:{value.replace(' ', '')}" for (key, _), value in zip(GPU_FIELDS, values))


def setup(h, allow_cpu):
    """The device as the trainer picks it, single process. None: no CUDA and no --allow-cpu."""
    if h.world_size != 1:
        raise tg.ConfigError(f"WORLD_SIZE={h.world_size}: profile_step.py runs one process on one GPU; unset "
                             "WORLD_SIZE and give TRAIN_BATCH_TOKENS as one GPU's share")
    tg.check_batch_shape(h, 1)
    _, _, device = tg.setup_distributed(h)  # TF32 settings as in training
    if device.type != "cuda" and not allow_cpu:
        return None
    return device


def main(argv=None):
    args = parse_args(argv)
    h = tg.Hyperparameters()
    device = setup(h, args.allow_cpu)
    if device is None:
        print(f"error: no CUDA device (torch.cuda.is_available()={torch.cuda.is_available()}, DEVICE={h.device}); "
              "profile_step.py profiles the GPU step. Pass --allow-cpu to run on the CPU anyway", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    warmup, steps, timed = [v if v is not None else (d if on_gpu else c)
                            for v, d, c in ((args.warmup, 8, 1), (args.steps, 5, 1), (args.timed, 20, 2))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pattern = os.path.join(h.data_path, "fineweb_train_*.bin")
    t0 = time.perf_counter()
    base, model, optimizers, use_compile = build(h, device, args.quant_mix)
    total_params, ternary = tg.count_params(base)
    progress(f"phase:build device:{device} compile:{use_compile} params:{total_params} ternary:{ternary} "
             f"attention:{base.attn_backend} fp_phase:{int(h.fp_phase)} quant_mix:{args.quant_mix if h.fp_phase else '-'}")
    loader = tg.DistributedTokenLoader(train_pattern, h, 0, 1, device)  # missing shards: the trainer's DataError
    try:
        ctx = (base, model, optimizers, h, loader, FixedMixSchedule(h, args.quant_mix), device)
        progress(f"phase:warmup steps:{warmup} (compile and autotune on CUDA: about a minute)")
        step = run_steps(warmup, ctx, 0)
        progress(f"phase:warmup_done seconds:{time.perf_counter() - t0:.1f}")

        # timed without the profiler, as train() times it: synchronize, then wall clock over whole steps
        tg.sync(device)
        t1 = time.perf_counter()
        step = run_steps(timed, ctx, step)
        seconds = (time.perf_counter() - t1) / timed
        tok_s = h.train_batch_tokens / seconds
        timing = (f"steps:{timed} step_ms:{1000 * seconds:.2f} tok/s:{tok_s:.0f} "
                  f"mfu:{tg.h100_mfu(tok_s, tg.flops_per_token(base, h), 1):.3f} {gpu_state(device)}").rstrip()
        progress(f"phase:timed {timing}")

        progress(f"phase:profile steps:{steps}")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with torch.profiler.profile(activities=activities, record_shapes=args.shapes) as prof:
            run_steps(steps, ctx, step, region=True, steady=args.steady)
    finally:
        loader.close()

    progress("phase:analyse")
    table = op_table(prof, on_gpu, args.top)
    print(table, flush=True)
    md = breakdown_markdown(breakdown(prof, steps, on_gpu, steady=args.steady), steps, on_gpu, timing, h)
    write_reports(out, "profile", table, md, prof if args.trace else None)
    if args.shapes:
        (out / "profile_shapes.txt").write_text(op_table(prof, on_gpu, args.top, by_shape=True) + "\n")
    if args.gaps:
        events = prof.events()
        md = gaps_markdown(events, profiled_items(events, on_gpu), step_windows(events, steps, args.steady), steps, steady=args.steady)
        (out / "profile_gaps.md").write_text(md)
    progress(f"phase:done out:{out} seconds:{time.perf_counter() - t0:.1f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (tg.ConfigError, tg.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
