"""Session 21's A/B helper: runs scripts/profile_step.py with Muon.step's loop as it was before 440bd24 (a scaling
and a copy kernel per matrix), so that the same checkout profiles both. Usage: python3 .bench/muon_old_step.py ARGS"""
import runpy
import sys

import torch

sys.path[:0] = [".", "scripts"]
import train_gpt as tg  # noqa: E402


@torch.no_grad()
def old_step(self):
    for group in self.param_groups:
        lr = group["lr"]
        ns_dtype = torch.bfloat16 if group["params"][0].is_cuda else torch.float32
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        for p, update in zip(params, self.updates(params, group, ns_dtype)):
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])  # no sparse_decay here: the default has no MoE
            p.add_(update.to(p.dtype), alpha=-lr)


tg.Muon.step = old_step
sys.argv = ["profile_step.py", *sys.argv[1:]]
runpy.run_path("scripts/profile_step.py", run_name="__main__")
