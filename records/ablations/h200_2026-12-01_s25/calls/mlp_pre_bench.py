"""Session 25: can MLP_KERNEL's input-gradient GEMM (EPI 1: c = g @ Wdown times 2 sqrt(aux)) hide its aux read?
Session 22's persistent TMA kernel: fwd 447 us, this GEMM 576-595 us, cuBLAS alone 424 / 436 us. Variants of where
aux is read: PRE 0 after the K loop by TMA (train_gpt.py's kernel), PRE 1 by TMA before the K loop, PRE 2 by pointer
loads issued before the K loop (the registers wait only at the epilogue's use).
Usage: python3 .bench/mlp_pre_bench.py [--small] (small + TRITON_INTERPRET=1: correctness on the CPU, fp16)."""
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def kernel(a, b, c, aux, auxp, M, iters, tiles, num_n, progs, ITERS: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
           BT: tl.constexpr, EPI: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, GROUP: tl.constexpr, PRE: tl.constexpr):
    per_group, num_m = GROUP * num_n, tiles // num_n
    for t in tl.range(0, ITERS if ITERS > 0 else iters, flatten=True):
        tile = tl.minimum(tl.program_id(0) + t * progs, tiles - 1)
        first = tile // per_group * GROUP
        rows = tl.minimum(num_m - first, GROUP)
        om, on = (first + tile % per_group % rows) * BM, tile % per_group // rows * BN
        if EPI == 1:
            if PRE == 1:
                x0 = aux.load([om, on])
                x1 = aux.load([om, on + BN // 2])
            if PRE == 2:
                r = om + tl.arange(0, BM)
                cols = on + tl.arange(0, BN // 2)
                ptr = auxp + r[:, None] * N + cols[None, :]
                x0 = tl.load(ptr, mask=r[:, None] < M, other=0.0)
                x1 = tl.load(ptr + BN // 2, mask=r[:, None] < M, other=0.0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            w = b.load([on, k]).T if BT else b.load([k, on])
            if IEEE:
                acc = tl.dot(a.load([om, k]), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a.load([om, k]), w, acc)
        h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        if EPI == 0:
            h0, h1 = tl.maximum(h0, 0.0) * tl.maximum(h0, 0.0), tl.maximum(h1, 0.0) * tl.maximum(h1, 0.0)
        else:
            if PRE == 0:
                x0 = aux.load([om, on])
                x1 = aux.load([om, on + BN // 2])
            h0 = h0 * 2.0 * tl.sqrt(x0.to(tl.float32))
            h1 = h1 * 2.0 * tl.sqrt(x1.to(tl.float32))
        c.store([om, on], h0.to(c.dtype))
        c.store([om, on + BN // 2], h1.to(c.dtype))


def run(x, w, epi, aux=None, pre=0, bm=128, bn=256, bk=64, warps=8, stages=3, sms=None):
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.size(epi)
    c = x.new_empty(M, N)
    tiles = -(-M // bm) * (N // bn)
    interpreted = x.device.type == "cpu"
    sms = sms or (3 if interpreted else torch.cuda.get_device_properties(x.device).multi_processor_count)
    iters = -(-tiles // sms)
    progs = -(-tiles // iters)
    desc = lambda t: TensorDescriptor.from_tensor(t, [bm, bn // 2])
    auxt = c if aux is None else aux.contiguous()
    kernel[(progs,)](TensorDescriptor.from_tensor(x, [bm, bk]),
                     TensorDescriptor.from_tensor(w, [bn, bk] if epi == 0 else [bk, bn]), desc(c), desc(auxt), auxt,
                     M, iters, tiles, N // bn, progs, ITERS=iters if interpreted else 0, K=K, N=N, BT=epi == 0,
                     EPI=epi, IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk, GROUP=8, PRE=pre,
                     num_warps=warps, num_stages=stages)
    return c


def bench(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    small = "--small" in sys.argv
    dev = "cpu" if small else "cuda"
    dt = torch.float16 if small else torch.bfloat16
    M, D, H = (200, 64, 512) if small else (65536, 768, 3072)
    torch.manual_seed(0)
    x = torch.randn(M, D, device=dev).to(dt)
    wu = (torch.randn(H, D, device=dev) * D ** -0.5).to(dt)
    wd = (torch.randn(D, H, device=dev) * H ** -0.5).to(dt)
    g = torch.randn(M, D, device=dev).to(dt)
    ref_a = F.relu(x.float() @ wu.float().t()).square()
    a = ref_a.to(dt)
    ref_gh = (g.float() @ wd.float()) * 2 * F.relu(x.float() @ wu.float().t())
    tiles = [(64, 128, 32, 4, 1)] if small else [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5)]
    if not small:
        print(f"cuBLAS mm {bench(lambda: x @ wu.t()):.1f} us; dgrad mm {bench(lambda: g @ wd):.1f} us", flush=True)
    for rnd in range(2):  # two rounds: the spread between them is the bench's noise
        for bm, bn, bk, warps, stages in tiles:
            for pre in (0, 1, 2):
                cfg = dict(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages)
                try:
                    fg = run(g, wd, 1, a, pre=pre, **cfg)
                    eg = ((fg.float() - ref_gh).abs().max() / ref_gh.abs().max()).item()
                    line = f"round {rnd} {cfg} pre {pre} bwd_err {eg:.2e}"
                    if not small:
                        line += f" bwd {bench(lambda: run(g, wd, 1, a, pre=pre, **cfg)):.1f} us"
                        if pre == 0:
                            line += f" fwd {bench(lambda: run(x, wu, 0, **cfg)):.1f} us"
                    print(line, flush=True)
                except Exception as e:  # a config the compiler refuses: say so, go on
                    print(f"round {rnd} {cfg} pre {pre} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
