"""MLP_KERNEL's session-21 pointer kernel, copied verbatim from 7fd8dfd's train_gpt.py (for .bench/mlp_old_kernel.py)."""
import torch

from train_gpt import *  # noqa: F401,F403

MLP_TILES = ((128, 256, 64, 8, 3), (128, 256, 32, 8, 5))
MLP_GROUP = 8  # MLP_KERNEL: row blocks that walk one column block of the output together (their rows stay in L2)


def relu2_gemm_triton_kernel():
    """MLP_KERNEL's Triton GEMM c = a @ b, with b a (K, N) view given by its strides (W^T for the up GEMM, W for the
    down GEMM's input gradient), and an epilogue in fp32 registers: EPI 0 writes relu(c)^2, EPI 1 writes c times
    relu^2's derivative 2 relu(h), read as 2 sqrt(aux) from the stored aux = relu(h)^2, so h is never stored. It
    replaces inductor's relu^2 and its backward: two passes over the (tokens, hidden) activations, 4.6 ms of session
    21's step. The MLP's other GEMMs stay cuBLAS's."""
    import triton
    import triton.language as tl

    @triton.jit
    def relu2_gemm_kernel(a, b, c, aux, M, N, sbk, sbn, K: tl.constexpr, EPI: tl.constexpr, IEEE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        pid, per_group = tl.program_id(0), GROUP * (N // BN)
        first = pid // per_group * GROUP
        rows = tl.minimum(tl.cdiv(M, BM) - first, GROUP)
        m = ((first + pid % per_group % rows) * BM + tl.arange(0, BM)).to(tl.int64)
        n = pid % per_group // rows * BN + tl.arange(0, BN)
        k, inside = tl.arange(0, BK), (m < M)[:, None]
        ap, bp = a + m[:, None] * K + k[None, :], b + k[:, None] * sbk + n[None, :] * sbn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            if IEEE:  # fp32 operands (the tests'): exact products, not tf32's
                acc = tl.dot(tl.load(ap, mask=inside, other=0.0), tl.load(bp), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.load(ap, mask=inside, other=0.0), tl.load(bp), acc)
            ap += BK
            bp += BK * sbk
        out = m[:, None] * N + n[None, :]
        if EPI == 0:
            acc = tl.maximum(acc, 0.0) * tl.maximum(acc, 0.0)
        else:
            acc = acc * 2.0 * tl.sqrt(tl.load(aux + out, mask=inside, other=0.0).to(tl.float32))
        tl.store(c + out, acc.to(c.dtype.element_ty), mask=inside)

    return relu2_gemm_kernel


def mlp_kernels():
    """MLP_KERNEL: the custom ops ternary_golf::relu2_mlp(x (M, D), w_up (H, D), w_down (D, H)) -> (x w_up^T relu^2'd
    (a), then a w_down^T) and its backward, which writes the input, up and down gradients from a alone, registered
    once a process; Relu2MLP is their autograd. On the CPU only under TRITON_INTERPRET=1 (tests), whose bf16 dot is
    wrong (Triton 3.5): fp32 and fp16 there."""
    if hasattr(torch.ops.ternary_golf, "relu2_mlp"):
        return
    kernel = relu2_gemm_triton_kernel()

    def gemm(x, w, epi, aux):  # epi 0: x @ w^T, w (N, K); epi 1: x @ w, w (K, N); then the epilogue
        x, w = x.contiguous(), w.contiguous()
        (M, K), N = x.shape, w.size(epi)
        bm, bn, bk, warps, stages = MLP_TILES[epi]
        c = x.new_empty(M, N)
        kernel[(-(-M // bm) * (N // bn),)](x, w, c, aux.contiguous(), M, N, *((1, K) if epi == 0 else (N, 1)), K=K,
                                           EPI=epi, IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk,
                                           GROUP=MLP_GROUP, num_warps=warps, num_stages=stages)
        return c

    @torch.library.custom_op("ternary_golf::relu2_mlp", mutates_args=())
    def relu2_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = gemm(x, w_up, 0, x)  # epilogue 0 reads no aux
        return a @ w_down.t(), a

    @torch.library.custom_op("ternary_golf::relu2_mlp_backward", mutates_args=())
    def relu2_mlp_backward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor,
                           g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g_h = gemm(g, w_down, 1, a)
        return g_h @ w_up, g_h.t() @ x, g.t() @ a

    relu2_mlp.register_fake(lambda x, w_up, w_down: (x.new_empty(x.size(0), w_down.size(0)),
                                                     x.new_empty(x.size(0), w_up.size(0))))
    relu2_mlp_backward.register_fake(lambda x, w_up, w_down, a, g: tuple(map(empty_contiguous, (x, w_up, w_down))))
