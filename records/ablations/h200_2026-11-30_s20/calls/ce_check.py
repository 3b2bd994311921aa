"""Session 20: CE_KERNEL on the GPU. (1) The op against the compiled torch path on 65536 x 8192 bf16 logits (cap 15):
loss and gradient differences, fwd+bwd time. (2) The env's model (bf16 autocast, eager) with CE_KERNEL 0 and 1:
loss and gradient differences."""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import train_gpt as tg  # noqa: E402

dev, cap = torch.device("cuda"), 15.0
torch.manual_seed(0)
tg.softcap_ce_kernels()
x = (torch.randn(65536, 8192, device=dev) * 6).bfloat16().requires_grad_()
t = torch.randint(0, 8192, (65536,), device=dev)


def ref(x, t):
    z = x.float()
    return F.cross_entropy(cap * torch.tanh(z / cap), t)


def ker(x, t):
    return torch.ops.ternary_golf.softcap_ce(x, t, cap)[0].mean()


ref_c = torch.compile(ref, dynamic=False)
for name, f in (("compiled", ref_c), ("kernel", ker), ("compiled", ref_c), ("kernel", ker)):
    for _ in range(3):
        g, = torch.autograd.grad(f(x, t), x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        loss = f(x, t)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(20):
        g, = torch.autograd.grad(f(x, t), x)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"op {name} fwd_ms:{(t1 - t0) / 20 * 1e3:.3f} fwdbwd_ms:{(t2 - t1) / 20 * 1e3:.3f} loss:{loss.item():.6f}")
l1 = ref(x, t)
g1, = torch.autograd.grad(l1, x)
l2 = ker(x, t)
g2, = torch.autograd.grad(l2, x)
print(f"op loss_diff:{(l1 - l2).abs().item():.3e} grad_maxdiff_rel:{((g1.float() - g2.float()).abs().max() / g1.float().abs().max()).item():.3e}")

h0 = tg.Hyperparameters(dict(os.environ))
idx = torch.randint(0, 8192, (16, 1024), device=dev)
tgt = torch.randint(0, 8192, (16, 1024), device=dev)
runs = []
for k in ("0", "1"):
    h = tg.Hyperparameters({**os.environ, "CE_KERNEL": k})
    torch.manual_seed(0)
    m = tg.GPT(h).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(idx, tgt)
    loss.backward()
    runs.append((loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}))
worst = max(((a - runs[1][1][n]).norm() / a.norm().clamp_min(1e-12)).item() for n, a in runs[0][1].items())
print(f"model loss0:{runs[0][0]:.6f} loss1:{runs[1][0]:.6f} grads:{len(runs[0][1])} worst_rel_grad_diff:{worst:.3e}")
