#!/usr/bin/env bash
# session 21 call 3: the Triton MLP GEMM with relu^2 epilogues against cuBLAS + inductor (.bench/mlp_gemm_bench.py)
python3 -c "import torch; print(torch.__version__, 'rms_norm AutocastCUDA kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('aten::rms_norm','AutocastCUDA'))"
CUDA_VISIBLE_DEVICES=0 timeout 250 python3 .bench/mlp_gemm_bench.py 2>&1 | grep -v Warning | tee $OUT/mlp_gemm_bench.txt
