"""Session 21: can a Triton GEMM with relu^2 in its epilogue beat cuBLAS + inductor's relu^2 kernel on the MLP's
up GEMM (x[M,768] @ Wup[3072,768]^T) and the down GEMM's dgrad (g[M,768] @ Wdown[768,3072], times 2 sqrt(a))?
Usage: python3 .bench/mlp_gemm_bench.py [--small] (small + TRITON_INTERPRET=1: correctness on the CPU)."""
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def mlp_gemm_kernel(a, b, c, aux, M, N, sbk, sbn, K: tl.constexpr, EPI: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), N // BN
    per_group = GROUP * num_n
    first = (pid // per_group) * GROUP
    rows = tl.minimum(num_m - first, GROUP)
    pm = first + (pid % per_group) % rows
    pn = (pid % per_group) // rows
    m = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    n = pn * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    inside = (m < M)[:, None]
    ap = a + m[:, None] * K + k[None, :]
    bp = b + k[:, None] * sbk + n[None, :] * sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(ap, mask=inside, other=0.0), tl.load(bp), acc)
        ap += BK
        bp += BK * sbk
    out = m[:, None] * N + n[None, :]
    if EPI == 0:
        r = tl.maximum(acc, 0.0)
        acc = r * r
    else:
        acc = acc * 2.0 * tl.sqrt(tl.load(aux + out, mask=inside, other=0.0).to(tl.float32))
    tl.store(c + out, acc.to(c.dtype.element_ty), mask=inside)


def run(x, w, epi, aux=None, transposed_w=True, BM=128, BN=256, BK=64, GROUP=8, warps=8, stages=3):
    M, K = x.shape
    N = w.shape[0] if transposed_w else w.shape[1]
    sbk, sbn = (1, K) if transposed_w else (N, 1)
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BM) * (N // BN),)
    mlp_gemm_kernel[grid](x, w, c, aux if aux is not None else c, M, N, sbk, sbn, K=K, EPI=epi, BM=BM, BN=BN, BK=BK,
                          GROUP=GROUP, num_warps=warps, num_stages=stages)
    return c


def bench(fn, n=30):
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
    M, D, H = (96, 64, 256) if small else (65536, 768, 3072)
    torch.manual_seed(0)
    x = torch.randn(M, D, device=dev).bfloat16()
    wu = (torch.randn(H, D, device=dev) * D ** -0.5).bfloat16()
    wd = (torch.randn(D, H, device=dev) * H ** -0.5).bfloat16()
    g = torch.randn(M, D, device=dev).bfloat16()
    ref_a = F.relu(x.float() @ wu.float().t()).square()
    ref_gh = (g.float() @ wd.float()) * 2 * F.relu(x.float() @ wu.float().t())
    cfgs = [dict(BM=32, BN=64, BK=32, warps=4, stages=1)] if small else [
        dict(BM=128, BN=256, BK=64, warps=8, stages=3), dict(BM=128, BN=256, BK=64, warps=8, stages=4),
        dict(BM=128, BN=128, BK=64, warps=4, stages=4), dict(BM=128, BN=128, BK=64, warps=8, stages=4),
        dict(BM=256, BN=128, BK=64, warps=8, stages=3), dict(BM=128, BN=256, BK=32, warps=8, stages=5),
        dict(BM=128, BN=128, BK=128, warps=8, stages=3)]
    for cfg in cfgs:
        a = run(x, wu, 0, **cfg)
        gh = run(g, wd, 1, aux=a, transposed_w=False, **cfg)
        ea = ((a.float() - ref_a).abs().max() / ref_a.abs().max()).item()
        eg = ((gh.float() - ref_gh).abs().max() / ref_gh.abs().max()).item()
        line = f"{cfg} fwd_err {ea:.2e} bwd_err {eg:.2e}"
        if not small:
            tf = bench(lambda: run(x, wu, 0, **cfg))
            tb = bench(lambda: run(g, wd, 1, aux=a, transposed_w=False, **cfg))
            line += f" fwd {tf:.1f} us bwd {tb:.1f} us ({2 * M * D * H / tf / 1e6:.0f} TFLOP/s fwd)"
        print(line, flush=True)
    if small:
        return
    up = torch.compile(lambda x, w: F.relu(F.linear(x, w)).square())
    dn = torch.compile(lambda g, w, h: (g @ w) * 2 * F.relu(h))
    h = F.linear(x, wu)
    print(f"cuBLAS mm alone {bench(lambda: F.linear(x, wu)):.1f} us; dgrad mm alone {bench(lambda: g @ wd):.1f} us")
    print(f"compiled up+relu2 {bench(lambda: up(x, wu)):.1f} us; compiled dgrad*2relu(h) {bench(lambda: dn(g, wd, h)):.1f} us")


if __name__ == "__main__":
    main()
