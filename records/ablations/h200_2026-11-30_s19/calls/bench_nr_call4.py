"""(as call 4 ran it, at c065d75: the kernels took inv_freq and computed sin and cos)\nAd-hoc (session 19): QK_NORM_KERNEL's op alone on q's and k's shapes, against the trainer's compiled path, at
several NORM_ROPE_TOKENS and num_warps. Medians of 30 after 5 warmup, CUDA events."""
import statistics, sys
import torch, torch.nn.functional as F
sys.path[:0] = ['.', 'scripts']
import train_gpt as tg

def timed(fn, n=30):
    ts = []
    for i in range(5 + n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        if i >= 5: ts.append(s.elapsed_time(e))
    return statistics.median(ts)

tg.norm_rope_kernels()
rot = tg.Rotary(128, 64, 10000.0).cuda()
inv = rot.inv_freq
def ref(x, gain):
    return rot(F.rms_norm(x, (128,)) * gain.to(x.dtype)[:, None])
cref = torch.compile(ref, dynamic=False)
launch = tg.launch_head_blocks
for H in (6, 2):
    x = torch.randn(64, 1024, H, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    gain = torch.full((H,), 1.5, device='cuda', requires_grad=True)
    go = torch.randn_like(x)
    mb = 2 * x.numel() * 2 / 1e6
    def run(f):
        fw = timed(lambda: f(x.detach(), gain.detach()))
        def both():
            o = f(x, gain); torch.autograd.grad(o, (x, gain), go)
        return fw, timed(both)
    fw, bo = run(cref)
    print(f"H{H} compiled fwd_ms:{fw:.4f} fwdbwd_ms:{bo:.4f} fwd_gbs:{mb / fw:.0f}", flush=True)
    op = lambda a, g: torch.ops.ternary_golf.norm_rope(a, g, inv)
    for tokens in (8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            tg.NORM_ROPE_TOKENS = (tokens, tokens)
            tg.launch_head_blocks = lambda *a, _w=warps, **k: launch(*a, num_warps=_w, **k)
            try:
                fw, bo = run(op)
                print(f"H{H} kernel BT{tokens} warps{warps} fwd_ms:{fw:.4f} fwdbwd_ms:{bo:.4f} fwd_gbs:{mb / fw:.0f}", flush=True)
            except Exception as e:
                print(f"H{H} kernel BT{tokens} warps{warps} failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    tg.launch_head_blocks = launch
