"""XSA alone, forward and forward + backward, on one GPU: exclusive_self_attention torch.compile'd as the trainer
compiles the model (dynamic=False, default mode) against XSA_KERNEL's Triton op, at each block size asked for.

    python3 scripts/bench_xsa.py [--batch 64] [--seq 1024] [--heads 6] [--kv-heads 2] [--head-dim 128]
                                 [--iters 50] [--tokens 32/16,16/16,64/32]

y is bf16 in the layout cuDNN's attention gives the trainer (SDPA's output transposed to (B, T, H, D), not
contiguous), v bf16 (B, T, Hkv, D) contiguous. --tokens: XSA_TOKENS pairs (forward/backward tokens a program).
--allow-cpu: tiny shapes on the CPU, the kernels under TRITON_INTERPRET=1, uncompiled (for tests).
Prints one line per variant, after 5 warmup iterations (compile included), the medians of --iters:
    bench_xsa variant:compiled fwd_ms:... fwdbwd_ms:... fwd_gbs:... max_out_err:... max_gy_err:... max_gv_err:...
    bench_xsa variant:kernel_32/16 fwd_ms:... ...
the errors being each variant's output and gradients against float64's, in units of the float64 values' largest.
fwd_gbs counts the forward's bytes (y and v read, the output written) once.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

if not torch.cuda.is_available():  # Triton reads it when it first defines a kernel: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

WARMUP = 5
CPU_SHAPES = {"batch": 2, "seq": 40, "heads": 6, "kv_heads": 2, "head_dim": 24, "iters": 1}  # --allow-cpu's


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, help_ in (("batch", "sequences (default 64)"), ("seq", "TRAIN_SEQ_LEN (default 1024)"),
                        ("heads", "NUM_HEADS (default 6)"), ("kv-heads", "NUM_KV_HEADS (default 2)"),
                        ("head-dim", "head dim (default 128)"), ("iters", "timed iterations (default 50)")):
        p.add_argument(f"--{name}", type=int, help=help_)
    p.add_argument("--tokens", default="32/16,16/16,64/32", help="XSA_TOKENS pairs to time, forward/backward")
    p.add_argument("--allow-cpu", action="store_true", help="tiny shapes on the CPU, interpreted: for tests")
    args = p.parse_args(argv)
    gpu = {"batch": 64, "seq": 1024, "heads": 6, "kv_heads": 2, "head_dim": 128, "iters": 50}
    cpu = args.allow_cpu and not torch.cuda.is_available()
    for k, v in (CPU_SHAPES if cpu else gpu).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    try:
        pairs = [tuple(int(n) for n in pair.split("/")) for pair in args.tokens.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: pairs like 32/16, comma-separated")
    args.tokens = pairs
    if any(min(pair) < 1 or any(n & (n - 1) for n in pair) for pair in args.tokens):
        p.error(f"--tokens {args.tokens}: each pair two powers of two (Triton's block sizes)")
    if not torch.cuda.is_available() and not args.allow_cpu:
        p.error("no CUDA device (--allow-cpu runs tiny shapes, interpreted)")
    return args


def inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(args.batch, n, args.seq, args.head_dim, generator=g).to(device, dtype)
               for n in (args.heads, args.kv_heads, args.kv_heads))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.kv_heads != args.heads)
    y = y.transpose(1, 2).detach().requires_grad_()  # (B, T, H, D) in the attention's own layout
    v = v.transpose(1, 2).contiguous().requires_grad_()
    go = torch.randn(y.shape, generator=g).to(device, dtype)
    return y, v, go


def errors(result, reference):
    return [float((a.detach().double() - b).abs().max() / b.abs().max()) for a, b in zip(result, reference)]


def timed(fn, args, device):
    """Median ms of fn() over args.iters after WARMUP calls."""
    times = []
    for i in range(WARMUP + args.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            if i >= WARMUP:
                times.append(start.elapsed_time(end))
        else:
            fn()
            times.append(0.0)
    return statistics.median(times)


def measure(name, xsa, y, v, go, reference, args, device):
    def forward():
        with torch.no_grad():
            return xsa(y, v)

    def both():
        out = xsa(y, v)
        return (out, *torch.autograd.grad(out, (y, v), go))

    fwd_ms, both_ms = timed(forward, args, device), timed(both, args, device)
    moved = 2 * y.numel() * y.element_size() + v.numel() * v.element_size()
    gbs = moved / fwd_ms / 1e6 if fwd_ms else 0.0
    err = errors(both(), reference)
    print(f"bench_xsa variant:{name} fwd_ms:{fwd_ms:.4f} fwdbwd_ms:{both_ms:.4f} fwd_gbs:{gbs:.0f} "
          f"max_out_err:{err[0]:.2e} max_gy_err:{err[1]:.2e} max_gv_err:{err[2]:.2e}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tg.xsa_kernels()
    y, v, go = inputs(args, device)
    y64, v64 = (t.detach().double().requires_grad_() for t in (y, v))
    out64 = tg.exclusive_self_attention(y64, v64)
    reference = (out64.detach(), *torch.autograd.grad(out64, (y64, v64), go.double()))
    print(f"bench_xsa shape:B{args.batch}xT{args.seq}xH{args.heads}xHkv{args.kv_heads}xD{args.head_dim} "
          f"dtype:{str(y.dtype).replace('torch.', '')} device:{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    plain = tg.exclusive_self_attention
    if device.type == "cuda":
        plain = torch.compile(plain, dynamic=False)
    measure("compiled" if device.type == "cuda" else "eager", plain, y, v, go, reference, args, device)
    before = tg.XSA_TOKENS
    try:
        for pair in args.tokens:
            tg.XSA_TOKENS = pair
            measure(f"kernel_{pair[0]}/{pair[1]}", torch.ops.ternary_golf.xsa, y, v, go, reference, args, device)
    finally:
        tg.XSA_TOKENS = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
