"""The training loss's head alone, forward + backward, on one GPU: the plain path (F.linear, the fp32 softcap and
F.cross_entropy, as GPT.logits and GPT.forward compute it) against FUSED_LOSS's FusedSoftcapCrossEntropy, each
torch.compile'd as the trainer compiles the model (dynamic=False, default mode) and run under its bf16 autocast.

    python3 scripts/bench_loss.py [--tokens 65536] [--dim 256] [--vocab 8192] [--cap 20] [--iters 30] [--chunk N]

--tokens is one micro-batch (TRAIN_BATCH_TOKENS / GRAD_ACCUM_STEPS on one GPU). --dim is the head's input width:
EMBED_DIM (256 by default: the head multiplies embed_out's output), MODEL_DIM only with EMBED_DIM=0. x is bf16 as
embed_out gives it under autocast, the weight the tied embedding's fp32 parameter. --chunk: the fused function's
rows per chunk (default train_gpt.FUSED_LOSS_CHUNK). --allow-cpu: tiny shapes on the CPU, uncompiled (for tests).
Prints one line per variant, after 5 warmup iterations (compile included), the median of --iters:
    bench_loss variant:plain ms:3.210 peak_mib:...
    bench_loss variant:fused ms:2.100 peak_mib:... max_loss_diff:... max_gx_diff:... max_gw_diff:...
the differences being the fused variant's loss and gradients against the plain one's, in fp32.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

WARMUP = 5
CPU_SHAPES = {"tokens": 300, "dim": 32, "vocab": 256, "iters": 2, "chunk": 128}  # --allow-cpu's defaults


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="rows of the head's input (default 65536)")
    p.add_argument("--dim", type=int, help="the head's input width, EMBED_DIM (default 256)")
    p.add_argument("--vocab", type=int, help="VOCAB_SIZE (default 8192)")
    p.add_argument("--cap", type=float, default=20.0, help="LOGIT_SOFTCAP, 0: off (default 20)")
    p.add_argument("--iters", type=int, help="timed iterations (default 30)")
    p.add_argument("--chunk", type=int, help=f"the fused function's rows per chunk (default {tg.FUSED_LOSS_CHUNK})")
    p.add_argument("--allow-cpu", action="store_true", help="tiny shapes on the CPU, uncompiled: for tests")
    args = p.parse_args(argv)
    gpu = {"tokens": 65536, "dim": 256, "vocab": 8192, "iters": 30, "chunk": tg.FUSED_LOSS_CHUNK}
    defaults = CPU_SHAPES if args.allow_cpu and not torch.cuda.is_available() else gpu
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def plain_loss(x, weight, targets, cap, chunk):
    """GPT.logits + GPT.forward's cross-entropy (chunk unused)."""
    logits = F.linear(x, weight.to(x.dtype)).float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets)


def fused_loss(x, weight, targets, cap, chunk):
    return tg.FusedSoftcapCrossEntropy.apply(x, weight, targets, cap, 0.0, chunk)


def run(fn, inputs, args, device):
    """(median ms of forward + backward, peak MiB allocated, (loss, grad x, grad weight) of the last iteration)."""
    x, weight, targets = inputs
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(WARMUP + args.iters):
        tg.sync(device)
        t0 = time.perf_counter()
        with tg.autocast(device):
            loss = fn(x, weight, targets, args.cap, args.chunk)
        gx, gw = torch.autograd.grad(loss, (x, weight))
        tg.sync(device)
        if i >= WARMUP:
            times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return statistics.median(times), peak, (loss.detach(), gx, gw)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device; bench_loss.py times the GPU's loss. Pass --allow-cpu to run on the CPU anyway",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_ = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, device=device) * 3 / args.dim**0.5).requires_grad_()  # logits ~3
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    results = {}
    for name, fn in (("plain", plain_loss), ("fused", fused_loss)):
        if compile_:
            fn = torch.compile(fn, dynamic=False)
        ms, peak, results[name] = run(fn, (x, weight, targets), args, device)
        line = f"bench_loss variant:{name} ms:{ms:.3f} peak_mib:{peak:.0f}"
        if name == "fused":
            diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(results["fused"], results["plain"])]
            line += " max_loss_diff:{:.3g} max_gx_diff:{:.3g} max_gw_diff:{:.3g}".format(*diffs)
        print(line, flush=True)
    print(f"bench_loss tokens:{args.tokens} dim:{args.dim} vocab:{args.vocab} cap:{args.cap} chunk:{args.chunk} "
          f"iters:{args.iters} compile:{int(compile_)} device:{device} "
          f"max_gx:{results['plain'][1].float().abs().max().item():.3g} "
          f"max_gw:{results['plain'][2].abs().max().item():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
