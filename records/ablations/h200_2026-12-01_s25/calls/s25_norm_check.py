"""Session 25, call 5: on the device's torch (2.11), is `rms_norm` (F.rms_norm with autocast off) the same computation as
63b043f's bare F.rms_norm? One eager forward + backward of the default model (the env's kernels) under bf16 autocast,
old and new, same init and batch: loss and gradients compared bitwise; then each compiled, fwd+bwd timed."""
import importlib.util
import sys
import time

import torch

sys.path.insert(0, ".")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


new, old = load("tg_new", "train_gpt.py"), load("tg_old", ".bench/train_gpt_63b043f.py")
print("torch", torch.__version__, "AutocastCUDA rms_norm kernel:",
      "AutocastCUDA" in torch._C._dispatch_dump("aten::rms_norm"), flush=True)
ENV = {"VOCAB_SIZE": "8192", "NUM_HEADS": "6", "NUM_KV_HEADS": "2", "ROPE_DIMS": "64", "LOGIT_SOFTCAP": "15",
       "MLP_MULT": "4", "XSA_KERNEL": "1", "QK_NORM_KERNEL": "1", "CE_KERNEL": "1", "MLP_KERNEL": "1"}
gen = torch.Generator().manual_seed(0)
idx = torch.randint(0, 8192, (16, 1025), generator=gen).cuda()
x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def build(tg):
    torch.manual_seed(0)
    return tg.GPT(tg.Hyperparameters(ENV)).cuda()


def step(m, fn):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


runs = {}
for name, tg in (("new", new), ("old", old)):
    m = build(tg)
    runs[name] = step(m, m)
(ln, gn), (lo, go) = runs["new"], runs["old"]
diff = max((gn[k].float() - go[k].float()).abs().max().item() for k in go)
print(f"eager: loss new {ln.item():.6f} old {lo.item():.6f} bitwise {torch.equal(ln, lo)}; "
      f"grads {len(gn)} / {len(go)}, all bitwise {all(torch.equal(gn[k], go[k]) for k in go)}, max diff {diff:.3e}",
      flush=True)
for name, tg in (("new", new), ("old", old), ("new", new)):
    m = build(tg)
    fn = torch.compile(m)
    t0 = time.perf_counter()
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        step(m, fn)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(30):
        m.zero_grad(set_to_none=True)
        loss, _ = step(m, fn)
    torch.cuda.synchronize()
    print(f"compiled {name}: compile+3 steps {t1 - t0:.1f} s, fwd+bwd {(time.perf_counter() - t1) / 30 * 1e3:.2f} ms "
          f"(16,384 tokens), loss {loss.item():.6f}", flush=True)
