"""Session 22: MLP_KERNEL's TMA op on the GPU in bf16, against fp32 formulas, for token counts that are and are not
whole row blocks (eval's batches), with the backward; and the op's time at the training shape."""
import sys
import time

import torch
import torch.nn.functional as F

sys.path[:0] = ["."]
import train_gpt as tg  # noqa: E402

tg.mlp_kernels()
torch.manual_seed(0)
for M in (65536, 1000, 129, 4096 * 3 + 7):
    x = torch.randn(M, 768, device="cuda").bfloat16().requires_grad_()
    wu = (torch.randn(3072, 768, device="cuda") / 28).bfloat16().requires_grad_()
    wd = (torch.randn(768, 3072, device="cuda") / 55).bfloat16().requires_grad_()
    g = torch.randn(M, 768, device="cuda").bfloat16()
    out = tg.Relu2MLP.apply(x, wu, wd)
    got = (out, *torch.autograd.grad(out, (x, wu, wd), g))
    leaves = [t.detach().float().requires_grad_() for t in (x, wu, wd)]
    ref = F.relu(leaves[0] @ leaves[1].t()).square() @ leaves[2].t()
    want = (ref, *torch.autograd.grad(ref, leaves, g.float()))
    errs = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    print(f"M={M}: max error / max |want| (out, dx, dw_up, dw_down): " + " ".join(f"{e:.2e}" for e in errs), flush=True)
    assert max(errs) < 2e-2, errs
x, wu, wd = (t.detach() for t in (x, wu, wd))
x = torch.randn(65536, 768, device="cuda").bfloat16()
for _ in range(5):
    torch.ops.ternary_golf.relu2_mlp(x, wu, wd)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(30):
    torch.ops.ternary_golf.relu2_mlp(x, wu, wd)
torch.cuda.synchronize()
print(f"relu2_mlp (up GEMM + relu^2, then cuBLAS down) at 65536 tokens: {(time.perf_counter() - t) / 30 * 1e6:.1f} us")
