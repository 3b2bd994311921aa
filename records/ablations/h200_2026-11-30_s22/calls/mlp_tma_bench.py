"""Session 22: does a persistent TMA version of MLP_KERNEL's relu^2 GEMM beat session 21's pointer kernel
(fwd 497 us, bwd 658-694 us) and cuBLAS (422 / 434 us, no epilogue)? Shapes: up GEMM x[M,768] @ Wup[3072,768]^T with
relu^2 epilogue; dgrad g[M,768] @ Wdown[768,3072] times 2 sqrt(a).
Usage: python3 .bench/mlp_tma_bench.py [--small] (small + TRITON_INTERPRET=1: correctness on the CPU, fp16)."""
import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def tma_kernel(a_desc, b_desc, c_desc, aux_desc, num_m, tiles, N, ITERS: tl.constexpr, K: tl.constexpr, EPI: tl.constexpr, BT: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PROGS: tl.constexpr,
               SUB: tl.constexpr, WS: tl.constexpr, FLAT: tl.constexpr):
    per_group = GROUP * (N // BN)
    for t in tl.range(0, ITERS, flatten=FLAT, warp_specialize=WS):
        tile = tl.minimum(tl.program_id(0) + t * PROGS, tiles - 1)  # the last round's spare programs redo the last tile
        first = tile // per_group * GROUP
        rows = tl.minimum(num_m - first, GROUP)
        om = (first + tile % per_group % rows) * BM
        on = tile % per_group // rows * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(K // BK):
            if BT:
                acc = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, acc)
            else:
                acc = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([ki * BK, on]), acc)
        if SUB:
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            if EPI == 0:
                h0 = tl.maximum(h0, 0.0) * tl.maximum(h0, 0.0)
                h1 = tl.maximum(h1, 0.0) * tl.maximum(h1, 0.0)
            else:
                h0 = h0 * 2.0 * tl.sqrt(aux_desc.load([om, on]).to(tl.float32))
                h1 = h1 * 2.0 * tl.sqrt(aux_desc.load([om, on + BN // 2]).to(tl.float32))
            c_desc.store([om, on], h0.to(c_desc.dtype))
            c_desc.store([om, on + BN // 2], h1.to(c_desc.dtype))
        else:
            if EPI == 0:
                acc = tl.maximum(acc, 0.0) * tl.maximum(acc, 0.0)
            else:
                acc = acc * 2.0 * tl.sqrt(aux_desc.load([om, on]).to(tl.float32))
            c_desc.store([om, on], acc.to(c_desc.dtype))


SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4


def run(x, w, epi, aux=None, BM=128, BN=256, BK=64, GROUP=8, warps=8, stages=3, persist=True, sub=True, ws=False,
        flat=False):
    M, K = x.shape
    bt = epi == 0  # up GEMM: w (N, K); dgrad: w (K, N)
    N = w.shape[0] if bt else w.shape[1]
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cb = [BM, BN // 2] if sub else [BM, BN]
    a_d = TensorDescriptor.from_tensor(x, [BM, BK])
    b_d = TensorDescriptor.from_tensor(w, [BN, BK] if bt else [BK, BN])
    c_d = TensorDescriptor.from_tensor(c, cb)
    aux_d = TensorDescriptor.from_tensor(aux if aux is not None else c, cb)
    tiles = triton.cdiv(M, BM) * (N // BN)
    progs = min(SMS, tiles) if persist else tiles
    tma_kernel[(progs,)](a_d, b_d, c_d, aux_d, triton.cdiv(M, BM), tiles, N, triton.cdiv(tiles, progs), K=K, EPI=epi, BT=bt, BM=BM, BN=BN, BK=BK, GROUP=GROUP,
                         PROGS=progs, SUB=sub, WS=ws, FLAT=flat, num_warps=warps, num_stages=stages)
    return c


def bench(fn, n=40):
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
    if small:
        cfgs = [dict(BM=64, BN=128, BK=32, warps=4, stages=1, persist=p, sub=s) for p in (True, False)
                for s in (True, False)]
    else:
        cfgs = [dict(BM=bm, BN=bn, BK=bk, warps=w, stages=st, persist=p, sub=s, ws=ws, flat=fl)
                for (bm, bn, bk, w, st), p, s, ws, fl in itertools.product(
                    [(128, 256, 64, 8, 3), (128, 256, 32, 8, 5), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)],
                    (True, False), (True, False), (False, True), (False, True))
                if not (ws and not p) and not (fl and not p)]
    if not small:
        print(f"cuBLAS mm {bench(lambda: x @ wu.t()):.1f} us; dgrad mm {bench(lambda: g @ wd):.1f} us", flush=True)
    for cfg in cfgs:
        try:
            fa = run(x, wu, 0, **cfg)
            fg = run(g, wd, 1, a, **cfg)
            ea = ((fa.float() - ref_a).abs().max() / ref_a.abs().max()).item()
            eg = ((fg.float() - ref_gh).abs().max() / ref_gh.abs().max()).item()
            line = f"{cfg} fwd_err {ea:.2e} bwd_err {eg:.2e}"
            if not small:
                tf = bench(lambda: run(x, wu, 0, **cfg))
                tb = bench(lambda: run(g, wd, 1, a, **cfg))
                line += f" fwd {tf:.1f} us bwd {tb:.1f} us ({2 * M * D * H / tf / 1e6:.0f} TFLOP/s fwd)"
            print(line, flush=True)
        except Exception as e:  # a config the compiler refuses: say so, go on
            print(f"{cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
