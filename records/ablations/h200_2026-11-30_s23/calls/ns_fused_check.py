"""Session 23: MUON_FUSED's compiled update on the GPU. Call 1 found inductor (torch 2.11) failing on
nesterov_newton_schulz (AssertionError in Scheduler.reorder_loops_by_dep_pair). This compiles three forms for the
env model's shape groups and times each against BatchedMuon's eager foreach + stack + compiled Newton-Schulz:
  A: nesterov_newton_schulz as it is; B: the same with inductor's loop_ordering_after_fusion off;
  C: per-matrix in-place momentum (no foreach) then the stack, default options."""
import sys
import time

import torch

sys.path[:0] = ["."]
import train_gpt as tg  # noqa: E402

torch._dynamo.config.recompile_limit = 64
dev = torch.device("cuda")
SHAPES = {(768, 768): 20, (256, 768): 21, (3072, 768): 10, (768, 3072): 10, (768, 256): 1}
g = torch.Generator(device=dev).manual_seed(0)
sets = {s: ([torch.randn(s, device=dev, generator=g) * 0.01 for _ in range(n)],
            [torch.randn(s, device=dev, generator=g) * 0.01 for _ in range(n)]) for s, n in SHAPES.items()}
ns = torch.compile(tg.newton_schulz, dynamic=False, fullgraph=True)
mom = torch.full((), 0.95, device=dev)


def eager(bufs, grads, m, steps, dtype):
    torch._foreach_mul_(bufs, 0.95)
    torch._foreach_add_(bufs, grads)
    return ns(torch.stack(torch._foreach_add(grads, bufs, alpha=0.95)), steps, dtype)


def loop_form(bufs, grads, m, steps, dtype):
    for b, gr in zip(bufs, grads):
        b.mul_(m).add_(gr)
    return tg.newton_schulz(torch.stack([gr + m * b for b, gr in zip(bufs, grads)]), steps, dtype)


forms = {"eager": eager,
         "A": torch.compile(tg.nesterov_newton_schulz, dynamic=False, fullgraph=True),
         "B": torch.compile(tg.nesterov_newton_schulz, dynamic=False, fullgraph=True,
                            options={"loop_ordering_after_fusion": False}),
         "C": torch.compile(loop_form, dynamic=False, fullgraph=True)}
ref = {}
for name, fn in forms.items():
    state = {s: ([b.clone() for b in bufs], grads) for s, (bufs, grads) in sets.items()}
    try:
        t0 = time.time()
        outs = {s: fn(bufs, grads, mom, 5, torch.bfloat16) for s, (bufs, grads) in state.items()}
        torch.cuda.synchronize()
        compile_s = time.time() - t0
    except Exception as e:  # noqa: BLE001 - report and go on to the next form
        print(f"form {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        continue
    if name == "eager":
        ref = {s: (o.float(), [b.clone() for b in state[s][0]]) for s, o in outs.items()}
    diff = max((outs[s].float() - ref[s][0]).abs().max().item() for s in outs)
    bdiff = max(max((b - rb).abs().max().item() for b, rb in zip(state[s][0], ref[s][1])) for s in outs)
    for _ in range(5):
        for s, (bufs, grads) in state.items():
            fn(bufs, grads, mom, 5, torch.bfloat16)
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            for s, (bufs, grads) in state.items():
                fn(bufs, grads, mom, 5, torch.bfloat16)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 20)
    print(f"form {name}: ok compile {compile_s:.1f}s  ms/step (all shapes) min {min(times):.3f} "
          f"median {sorted(times)[2]:.3f}  max|update - eager| {diff:.2e}  max|buf - eager| {bdiff:.2e}", flush=True)
