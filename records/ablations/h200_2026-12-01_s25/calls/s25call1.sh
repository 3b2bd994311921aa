#!/usr/bin/env bash
# session 25 call 1 (nvidia-h200): MLP_KERNEL's input-gradient GEMM with its aux read after the K loop (train_gpt.py's
# kernel), by TMA before it, or by pointer loads issued before it (.bench/mlp_pre_bench.py), three tile configs, two rounds.
P=$OUT/s25c1; mkdir -p $P
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee $P/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $P/gpu.txt
timeout 400 python3 .bench/mlp_pre_bench.py 2>&1 | tee $P/mlp_pre_bench.txt
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee -a $P/gpu.txt
