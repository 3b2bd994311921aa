"""scripts/profile_step.py on the CPU (--allow-cpu): the same breakdown code path as on a GPU, with CPU ops bucketed."""
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "scripts"))
import profile_step  # noqa: E402


@pytest.fixture
def tiny_env(shards, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**TINY, "DATA_PATH": str(shards), "FP_PHASE": "1"}.items():
        monkeypatch.setenv(k, v)


def test_cpu_profile_writes_table_and_breakdown(tiny_env, tmp_path, capsys):
    torch.set_num_threads(1)
    rc = profile_step.main(["--allow-cpu", "--warmup", "1", "--steps", "1", "--timed", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "phase:warmup" in out and "phase:timed" in out and "mfu:" in out
    table = (tmp_path / "profile_table.txt").read_text()
    assert "aten::" in table and len(table.splitlines()) > 5
    md = (tmp_path / "profile_breakdown.md").read_text()
    bucket_rows = md.split("| bucket |", 1)[1].split("| **total**", 1)[0]
    shares = [float(v) for v in re.findall(r"\| ([0-9.]+)% \|", bucket_rows)]
    assert shares and abs(sum(shares) - 100) < 0.5
    assert "matmul" in bucket_rows and profile_step.OPTIMIZER_BUCKET in bucket_rows
    assert "| gap (idle within the step" in md


def test_shapes_table_lists_each_gemm_with_its_operands(tiny_env, tmp_path):
    """--shapes: profile_shapes.txt holds the op table by op and input shapes, so the MLP's up projection shows as an
    mm of (tokens x model_dim) by (model_dim x hidden); without the flag no such file is written."""
    torch.set_num_threads(1)
    h = profile_step.tg.Hyperparameters()
    for flag, folder in ((["--shapes"], tmp_path / "s"), ([], tmp_path / "n")):
        rc = profile_step.main(["--allow-cpu", "--warmup", "0", "--steps", "1", "--timed", "1", "--out", str(folder)]
                               + flag)
        assert rc == 0
    table = (tmp_path / "s" / "profile_shapes.txt").read_text()
    assert "Input Shapes" in table.splitlines()[1]
    tokens = h.train_batch_tokens // h.grad_accum_steps
    up = re.compile(rf"aten::mm .*\[\[{tokens}, {h.model_dim}\], \[{h.model_dim}, {h.mlp_hidden}\]\]")
    assert any(up.search(line) for line in table.splitlines()), table
    assert not (tmp_path / "n" / "profile_shapes.txt").exists()


@pytest.mark.parametrize("every, syncs", [("1", 7), ("4", 2)])
def test_timed_steps_sync_as_train_reads_its_clock(tiny_env, monkeypatch, every, syncs):
    """7 timed steps: a synchronize after each by default; with TRAIN_SYNC_EVERY=4 after the 4th and the last."""
    monkeypatch.setenv("TRAIN_SYNC_EVERY", every)
    h = profile_step.tg.Hyperparameters()
    calls = []
    monkeypatch.setattr(profile_step.tg, "train_step", lambda *a: calls.append("step"))
    monkeypatch.setattr(profile_step.tg, "sync", lambda device: calls.append("sync"))
    assert profile_step.run_steps(7, (None, None, None, h, None, None, "cpu"), 3) == 10
    assert calls.count("step") == 7 and calls.count("sync") == syncs and calls[-1] == "sync"


@pytest.mark.parametrize("steady, syncs", [(False, 7), (True, 2)])
def test_profiled_steps_sync_after_each_unless_steady(tiny_env, monkeypatch, steady, syncs):
    """The profiled region syncs after every step, so each step's window ends there; --steady syncs as training
    does (TRAIN_SYNC_EVERY=4: after the 4th and the last), and one window spans the steps."""
    from types import SimpleNamespace as NS
    monkeypatch.setenv("TRAIN_SYNC_EVERY", "4")
    h = profile_step.tg.Hyperparameters()
    calls = []
    monkeypatch.setattr(profile_step.tg, "train_step", lambda *a: calls.append("step"))
    monkeypatch.setattr(profile_step.tg, "sync", lambda device: calls.append("sync"))
    profile_step.run_steps(7, (None, None, None, h, None, None, "cpu"), 0, region=True, steady=steady)
    assert calls.count("sync") == syncs and calls[-1] == "sync"
    steps = [NS(name=profile_step.STEP, device_type=profile_step.DeviceType.CPU, time_range=NS(start=10 * i + 3,
                                                                                               end=10 * i + 9))
             for i in range(7)]
    windows = profile_step.step_windows(steps, 7, steady)
    assert [(w.start, w.end) for w in windows] == ([(3, 69)] if steady else [(10 * i + 3, 10 * i + 9) for i in range(7)])
    with pytest.raises(RuntimeError, match="6 step regions for 7 steps"):
        profile_step.step_windows(steps[:6], 7, steady)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_cuda_it_refuses_unless_allowed(tiny_env, tmp_path, capsys):
    assert profile_step.main(["--out", str(tmp_path)]) == 2
    assert "--allow-cpu" in capsys.readouterr().err


def test_missing_shards_is_the_trainers_data_error(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "none"))
    with pytest.raises(profile_step.tg.DataError, match="no shard matches"):
        profile_step.main(["--allow-cpu", "--out", str(tmp_path)])


def test_kernel_names_bucket():
    assert profile_step.bucket("void flash::flash_fwd_kernel<cutlass::bfloat16_t, Sm90>", "fwd_bwd") == "attention"
    assert profile_step.bucket("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "fwd_bwd") == "matmul"
    assert profile_step.bucket("triton_poi_fused__to_copy_mul_0", "fwd_bwd") == "triton fused elementwise"
    assert profile_step.bucket("triton_red_fused_mean_pow_1", "fwd_bwd") == "reductions/norm"
    assert profile_step.bucket("xsa_backward_kernel", "fwd_bwd") == "reductions/norm"  # XSA_KERNEL's
    assert profile_step.bucket("norm_rope_forward_kernel", "fwd_bwd") == "reductions/norm"  # QK_NORM_KERNEL's
    assert profile_step.bucket("softcap_ce_backward_kernel", "fwd_bwd") == "reductions/norm"  # CE_KERNEL's
    assert profile_step.bucket("Memcpy HtoD (Pinned -> Device)", "fwd_bwd") == "memcpy/memset"
    assert profile_step.bucket("some_unknown_kernel", "fwd_bwd") == "other"
    assert profile_step.bucket("sm90_xmma_gemm_bf16", "optimizer") == profile_step.OPTIMIZER_BUCKET


def test_gpu_kernels_go_to_the_optimizer_by_its_gpu_span():
    """device_items on fake GPU events: a kernel that starts inside an optimizer annotation's GPU span is the
    optimizer's, any other is forward+backward; annotations themselves are not kernels; the span row counts the
    idle time inside the optimizer."""
    from types import SimpleNamespace as NS

    def ev(name, t0, t1, annotation=False):
        return NS(name=name, device_type=profile_step.DeviceType.CUDA, time_range=NS(start=t0, end=t1),
                  is_user_annotation=annotation)

    events = [ev("nvjet_fwd", 0, 10), ev("Optimizer.step#Muon.step", 12, 40, True), ev("nvjet_ns", 12, 15),
              ev("triton_poi_fused_add_0", 30, 38), ev("nvjet_next", 41, 50)]  # torch's own annotation alone
    items = profile_step.device_items(events)
    assert [(n, r) for n, _, _, _, r in items] == [("nvjet_fwd", "fwd_bwd"), ("nvjet_ns", "optimizer"),
                                                  ("triton_poi_fused_add_0", "optimizer"), ("nvjet_next", "fwd_bwd")]
    assert [us for *_, us, _ in items] == [10, 3, 8, 9]


def test_breakdown_lists_each_buckets_heaviest_kernels():
    """breakdown on fake GPU events of two steps: every bucket keeps its kernels' summed time by name, heaviest first
    and cut at top_names, and the rows of the markdown add up to each bucket's total."""
    from types import SimpleNamespace as NS

    def ev(name, t0, t1, device=profile_step.DeviceType.CUDA, annotation=False):
        return NS(name=name, device_type=device, time_range=NS(start=t0, end=t1), is_user_annotation=annotation)

    step = [ev(profile_step.STEP, 0, 100, profile_step.DeviceType.CPU),
            ev(profile_step.STEP, 100, 200, profile_step.DeviceType.CPU)]
    kernels = [ev("nvjet_a", 0, 30), ev("nvjet_b", 30, 40), ev("triton_red_fused_norm_0", 40, 45),
               ev("nvjet_a", 100, 120), ev("nvjet_c", 120, 121), ev("triton_red_fused_norm_0", 121, 130),
               ev("triton_per_fused_softmax_1", 130, 142)]
    prof = NS(events=lambda: step + kernels)
    buckets, regions, busy, wall, tops = profile_step.breakdown(prof, 2, True, top_names=2)
    assert buckets == {"matmul": 61, "reductions/norm": 26}
    assert tops == {"matmul": [("nvjet_a", 50), ("nvjet_b", 10)],
                    "reductions/norm": [("triton_red_fused_norm_0", 14), ("triton_per_fused_softmax_1", 12)]}
    assert busy == 87 and wall == 200 and regions["fwd_bwd"] == 87
    h = profile_step.tg.Hyperparameters()
    md = profile_step.breakdown_markdown((buckets, regions, busy, wall, tops), 2, True, "t", h)
    rows = md.split("heaviest kernels", 1)[1].split("The most launched", 1)[0]
    assert "| matmul | `nvjet_a` | 0.025 | 82.0% |" in rows and "`nvjet_c`" not in rows
    assert "| reductions/norm | `triton_per_fused_softmax_1` | 0.006 | 46.2% |" in rows


def test_breakdown_counts_launches_and_splits_the_idle_time():
    """launch_stats on fake GPU events of two steps: kernels under 10 us counted and summed, and of the idle time
    only the gaps under 5 us between two kernels are latency, in time order whatever the kernels' names; the first
    kernel's wait and longer gaps are not."""
    from types import SimpleNamespace as NS

    def ev(name, t0, t1, device=profile_step.DeviceType.CUDA):
        return NS(name=name, device_type=device, time_range=NS(start=t0, end=t1), is_user_annotation=False)

    step = [ev(profile_step.STEP, 0, 100, profile_step.DeviceType.CPU),
            ev(profile_step.STEP, 100, 200, profile_step.DeviceType.CPU)]
    kernels = [ev("nvjet_a", 0, 20), ev("triton_poi_b", 23, 30), ev("triton_poi_c", 50, 55),  # gaps 3 and 20
               ev("triton_poi_d", 110, 112), ev("nvjet_e", 113, 151)]  # waits 10 after the step starts, then 1
    res = profile_step.breakdown(NS(events=lambda: step + kernels), 2, True)
    regions = res[1]
    assert (regions["kernels"], regions["short_kernels"], regions["short_kernels_us"]) == (5, 3, 14)
    assert regions["short_gaps_us"] == 4 and res[2] == 72 and res[3] == 200
    md = profile_step.breakdown_markdown(res, 2, True, "t", profile_step.tg.Hyperparameters())
    assert "| gap between back-to-back kernels (under 5 us each) | 0.002 | |" in md
    assert "| longer gaps (the CPU behind the GPU, syncs) | 0.062 | |" in md
    assert "| kernels launched per step (under 10 us: count, ms) | 2 | 2, 0.007 |" in md
    assert regions["short_names"] == {("triton_poi_b", "fwd_bwd"): [1, 7], ("triton_poi_c", "fwd_bwd"): [1, 5],
                                      ("triton_poi_d", "fwd_bwd"): [1, 2]}
    short = md.split("The most launched kernels under 10 us", 1)[1]
    assert "`nvjet_a`" not in short and short.index("`triton_poi_b`") < short.index("`triton_poi_d`")
    assert "| `triton_poi_d` | fwd_bwd | 0.5 | 0.001 |" in short


def test_gaps_name_the_kernels_around_each_idle_gap_and_the_cpu_ops_meanwhile():
    """--gaps on fake events of two steps: gaps of at least 20 us only, the first from the step's start; a kernel
    that ends inside a longer one does not end the busy span; CPU ops are credited their overlap with the gaps at
    their depth below annotations, on any thread, nested ones named outer > inner."""
    from types import SimpleNamespace as NS
    CPU, CUDA = profile_step.DeviceType.CPU, profile_step.DeviceType.CUDA

    def ev(name, t0, t1, device=CUDA, parent=None):
        return NS(name=name, device_type=device, time_range=NS(start=t0, end=t1), is_user_annotation=False,
                  cpu_parent=parent)

    steps = [ev(profile_step.STEP, 0, 100, CPU), ev(profile_step.STEP, 100, 200, CPU)]
    kernels = [ev("k_a", 30, 40), ev("k_b", 45, 50), ev("k_c", 80, 90),  # waits 30 at the start; gaps 5 and 30
               ev("k_a", 105, 150), ev("k_x", 150, 170), ev("k_c", 152, 158), ev("k_d", 195, 199)]  # gap 25 after k_x
    compiled = ev("CompiledFunction", 0, 60, CPU, steps[0])
    cpu = [compiled, ev("aten::mm", 20, 40, CPU, compiled), ev("autograd::engine::evaluate_function: B", 160, 200, CPU)]
    events = steps + kernels + cpu
    items = profile_step.device_items(events)
    windows = [e.time_range for e in steps]
    gaps = profile_step.idle_gaps(items, windows, 20)
    assert gaps == [(0, 30, profile_step.STEP_START, "k_a"), (50, 80, "k_b", "k_c"), (170, 195, "k_x", "k_d")]
    assert profile_step.cpu_ops_during(events, gaps, 0) == {"CompiledFunction": 40,
                                                           "autograd::engine::evaluate_function: B": 25}
    assert profile_step.cpu_ops_during(events, gaps, 1) == {"CompiledFunction > aten::mm": 10}
    md = profile_step.gaps_markdown(events, items, windows, 2, min_us=20)
    # idle: 100 - 25 busy (k_a, k_b, k_c) + 100 - 69 (k_a to k_x, k_d) = 106 us; outside the listed gaps (85 us) are
    # 5 us after the first k_a, 10 at the first step's end, 5 before the second k_a and 1 after k_d: 21 us
    assert "1.5 gaps per step, 0.043 ms per step, of 0.053 ms of idle time per step; the other 0.011 ms" in md
    assert "| `k_b` | `k_c` | 0.5 | 0.015 | 0.05 |" in md and "| `k_x` | `k_d` | 0.5 | 0.013 | 0.07 |" in md
    assert "| `CompiledFunction > aten::mm` | 0.005 |" in md
    steady = profile_step.gaps_markdown(events, items, [NS(start=0, end=200)], 2, min_us=20, steady=True)
    assert "| `k_b` | `k_c` | 0.5 | 0.015 |\n" in steady and "mean start" not in steady


def test_gaps_flag_writes_the_gap_report(tiny_env, tmp_path):
    torch.set_num_threads(1)
    rc = profile_step.main(["--allow-cpu", "--warmup", "0", "--steps", "2", "--timed", "1", "--gaps", "--steady",
                            "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "profile_gaps.md").read_text()
    assert md.startswith("# GPU idle gaps of at least 20 us (2 profiled steps, synchronized as training is")
    assert "| kernel before | kernel after |" in md


# ---------------------------------------------------------------------------------------------------------------
# scripts/profile_lora.py: the LoRA TTT pass, profiled the same way

import profile_lora  # noqa: E402
from lora_shapes import pass_shapes  # noqa: E402


LORA_ENV = {"TTT_LORA_CHUNK": "32", "EVAL_DOC_ISOLATED": "1", "MAX_VAL_TOKENS": "2048", "TTT_LORA_GLOBAL": "1"}


@pytest.fixture
def lora_env(tiny_env, monkeypatch):
    """The tiny model's LoRA pass over 2048 validation tokens, chunk 32, with the shared adapter; one CPU thread."""
    torch.set_num_threads(1)
    for k, v in LORA_ENV.items():
        monkeypatch.setenv(k, v)


def test_lora_profile_counts_the_pass_and_puts_adamw_in_its_region(lora_env, monkeypatch, tmp_path, capsys):
    """On the CPU, with the shared adapter and buckets: the pass runs cold, warm and profiled; its chunk steps are
    the replay's (lora_shapes.py, from the batching alone), AdamW's ops are the optimizer region, and the buckets
    add up to the pass."""
    monkeypatch.setenv("TTT_LORA_BUCKET", "1")
    assert profile_lora.main(["--allow-cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    h = profile_lora.tg.Hyperparameters({**os.environ, "TTT_ENABLED": "1", "TTT_MODE": "lora"})
    tokens = profile_lora.tg.load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.vocab_size,
                                                    h.max_val_tokens)  # the split the pass read, without a model
    steps = len(pass_shapes(tokens, h))
    assert steps > 10 and f"chunk_steps:{steps} " in out and "lora_ttt docs:" in out
    md = (tmp_path / "lora_breakdown.md").read_text()
    assert md.startswith("# LoRA TTT pass profile (1 profiled pass,") and "TTT_LORA_CHUNK=32 " in md
    assert int(re.search(r" ops_per_step:(\d+)", md).group(1)) > 100  # a 2-layer step: forward, backward, AdamW
    bucket_rows = md.split("| bucket |", 1)[1].split("| **total**", 1)[0]
    shares = [float(v) for v in re.findall(r"\| ([0-9.]+)% \|", bucket_rows)]
    assert shares and abs(sum(shares) - 100) < 0.5
    adamw = re.search(r"\| AdamW steps \| ([0-9.]+) \|", md)
    assert adamw and float(adamw.group(1)) > 0 and profile_step.OPTIMIZER_BUCKET in bucket_rows
    assert "aten::" in (tmp_path / "lora_table.txt").read_text()


def test_lora_profile_refuses_a_config_the_trainer_refuses(tiny_env, monkeypatch, tmp_path):
    monkeypatch.setenv("TTT_LORA_CHUNK", "65")  # over TRAIN_SEQ_LEN=64
    with pytest.raises(profile_lora.tg.ConfigError, match="TTT_LORA_CHUNK=65"):
        profile_lora.main(["--allow-cpu", "--out", str(tmp_path)])


def test_lora_profile_of_some_steps_records_those_steps_only(lora_env):
    """profiled() with steps=3, skip=2 on the CPU: three STEP regions, every op the profiler kept lies inside them
    (the schedule recorded nothing before or after), each holds an AdamW step (the region spans the whole chunk
    step, not only its forward), and the model's token_nll is the caller's again afterwards."""
    h = profile_lora.tg.Hyperparameters({**os.environ, "TTT_ENABLED": "1", "TTT_MODE": "lora"})
    device = torch.device("cpu")
    model, val = profile_lora.load(h, device)
    calls = profile_lora.counted(model)
    counting = model.token_nll
    with profile_lora.regioned_optimizers():
        prof = profile_lora.profiled(model, val, h, device, [], 3, 2, [torch.profiler.ProfilerActivity.CPU])
    assert model.token_nll is counting and len(calls) == len(pass_shapes(val[0], h)) > 6
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    windows = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == profile_step.STEP)
    assert len(windows) == 3
    ops = [e for e in events if e.name.startswith("aten::")]
    assert ops and all(any(w0 <= e.time_range.start and e.time_range.end <= w1 for w0, w1 in windows) for e in ops)
    opt = [e.time_range.start for e in events if e.name == profile_step.OPT]
    assert all(any(w0 <= t < w1 for t in opt) for w0, w1 in windows)


def test_lora_profile_of_some_steps_writes_per_step_breakdown(lora_env, tmp_path):
    assert profile_lora.main(["--allow-cpu", "--steps", "2", "--skip", "3", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "lora_breakdown.md").read_text()
    assert md.startswith("# LoRA TTT chunk step profile (2 profiled steps,") and " profiled_steps:3-4" in md
    assert re.search(r"\| AdamW steps \| [0-9.]+ \|", md) and "| ms/step |" in md


def test_lora_profile_refuses_more_steps_than_the_pass_has(lora_env, tmp_path):
    with pytest.raises(profile_lora.tg.ConfigError, match=r"--skip 10 --steps 500 needs 511 chunk steps; this pass has"):
        profile_lora.main(["--allow-cpu", "--steps", "500", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        profile_lora.main(["--allow-cpu", "--steps", "5", "--skip", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "lora_breakdown.md").exists()


# ---------------------------------------------------------------------------------------------------------------
# scripts/bench_loss.py: the plain loss head against FUSED_LOSS's, on the CPU uncompiled

import bench_loss  # noqa: E402


def test_bench_loss_prints_a_line_per_variant_and_their_differences(capsys):
    """One line per variant in key:value form; the fused loss and gradients against the plain path's, both in bf16
    GEMMs (here without autocast): the loss to fp32 rounding, the gradients to bf16's (2 chunks, a short last one)."""
    torch.set_num_threads(1)
    assert bench_loss.main(["--allow-cpu", "--tokens", "100", "--dim", "32", "--vocab", "256", "--iters", "2",
                            "--chunk", "64"]) == 0
    plain, fused, shapes = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"bench_loss variant:plain ms:[0-9.]+ peak_mib:\d+", plain), plain
    m = re.fullmatch(r"bench_loss variant:fused ms:[0-9.]+ peak_mib:\d+ max_loss_diff:(\S+) max_gx_diff:(\S+) "
                     r"max_gw_diff:(\S+)", fused)
    assert m, fused
    loss_diff, gx_diff, gw_diff = map(float, m.groups())
    scale = dict(kv.split(":", 1) for kv in shapes.split()[1:])
    assert scale["tokens"] == "100" and scale["chunk"] == "64"
    assert loss_diff < 1e-4 and gx_diff <= 2e-2 * float(scale["max_gx"]) and gw_diff <= 2e-2 * float(scale["max_gw"])


def test_bench_loss_without_cuda_refuses_unless_allowed(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    assert bench_loss.main([]) == 2
    assert "--allow-cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# scripts/bench_xsa.py: XSA against XSA_KERNEL's op, on the CPU uncompiled and interpreted

import bench_xsa  # noqa: E402


def test_bench_xsa_prints_a_line_per_variant_and_their_errors(capsys, monkeypatch):
    """A shape line, then one key:value line for the plain function and one per XSA_TOKENS pair, each with its
    output's and gradients' error against float64's (fp32 here: to rounding), and XSA_TOKENS back as it was."""
    monkeypatch.setattr(bench_xsa.tg, "XSA_TOKENS", bench_xsa.tg.XSA_TOKENS)
    before = bench_xsa.tg.XSA_TOKENS
    assert bench_xsa.main(["--allow-cpu", "--seq", "20", "--head-dim", "24", "--tokens", "16/8,8/4"]) == 0
    shape, *lines = capsys.readouterr().out.splitlines()
    assert shape == "bench_xsa shape:B2xT20xH6xHkv2xD24 dtype:float32 device:cpu"
    assert [line.split()[1] for line in lines] == ["variant:eager", "variant:kernel_16/8", "variant:kernel_8/4"]
    for line in lines:
        m = re.fullmatch(r"bench_xsa variant:\S+ fwd_ms:[0-9.]+ fwdbwd_ms:[0-9.]+ fwd_gbs:\d+ max_out_err:(\S+) "
                         r"max_gy_err:(\S+) max_gv_err:(\S+)", line)
        assert m and max(map(float, m.groups())) < 1e-5, line
    assert bench_xsa.tg.XSA_TOKENS == before


@pytest.mark.parametrize("argv, message", [(["--tokens", "32/12"], "powers of two"), (["--tokens", "32"], "pairs"),
                                           (["--heads", "5"], "not a multiple")])
def test_bench_xsa_refuses_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench_xsa.main(["--allow-cpu", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_state_reads_nvidia_smi_for_the_profiled_gpu(monkeypatch):
    """The timing line's GPU state: nvidia-smi asked about the profiled GPU by its UUID, its six values as
    key:value pairs; a failing nvidia-smi says so instead of stopping the profile; nothing off a GPU."""
    import subprocess
    import types

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, fake_run.rc, stdout=fake_run.out, stderr="")

    monkeypatch.setattr(profile_step.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(profile_step.subprocess, "run", fake_run)
    monkeypatch.setattr(profile_step.torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="ab-12"))
    gpu = torch.device("cuda", 1)
    fake_run.rc, fake_run.out = 0, "1980, 1980, 3201, 651.25, 700.00, 45\n"
    assert profile_step.gpu_state(gpu) == ("sm_mhz:1980 sm_max_mhz:1980 mem_mhz:3201 power_w:651.25 "
                                           "power_limit_w:700.00 temp_c:45")
    assert "--id=GPU-ab-12" in calls[0] and calls[0][2].startswith("--query-gpu=clocks.sm,clocks.max.sm,")
    fake_run.rc, fake_run.out = 6, "No devices were found"
    assert profile_step.gpu_state(gpu) == "gpu_state:unavailable(nvidia-smi rc 6: No devices were found)"
    assert profile_step.gpu_state(torch.device("cpu")) == ""
    monkeypatch.setattr(profile_step.shutil, "which", lambda name: None)
    assert profile_step.gpu_state(gpu) == "gpu_state:unavailable(no nvidia-smi)"
