"""Session 22: the step's attention (q [64,6,1024,128], k/v [64,2,1024,128], causal, bf16) through each SDPA backend,
forward and forward+backward, GQA native and with k/v expanded to 6 heads."""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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
    B, H, KV, T, D = 64, 6, 2, 1024, 128
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for expand in (False, True):
            def fwd():
                kk, vv = (k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)) if expand else (k, v)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)

            def step():
                fwd().backward(g)
            try:
                with torch.no_grad():
                    tf = bench(fwd)
                tb = bench(step)
                print(f"{name:9s} expand={expand}: fwd {tf:.1f} us, fwd+bwd {tb:.1f} us", flush=True)
            except Exception as e:
                print(f"{name:9s} expand={expand}: FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)


if __name__ == "__main__":
    main()
