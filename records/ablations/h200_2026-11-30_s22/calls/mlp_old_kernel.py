"""Session 22's A/B helper: runs scripts/profile_step.py with MLP_KERNEL's session-21 pointer kernel
(.bench/mlp_s21_kernel.py, copied from 7fd8dfd), so that the same checkout profiles both.
Usage: python3 .bench/mlp_old_kernel.py ARGS"""
import runpy
import sys

sys.path[:0] = [".", "scripts", ".bench"]
import mlp_s21_kernel as old  # noqa: E402
import train_gpt as tg  # noqa: E402

tg.MLP_TILES, tg.relu2_gemm_triton_kernel, tg.mlp_kernels = old.MLP_TILES, old.relu2_gemm_triton_kernel, old.mlp_kernels
if __name__ == "__main__":
    sys.argv = ["profile_step.py", *sys.argv[1:]]
    runpy.run_path("scripts/profile_step.py", run_name="__main__")
