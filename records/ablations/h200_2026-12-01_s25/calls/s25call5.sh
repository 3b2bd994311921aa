#!/usr/bin/env bash
# session 25 call 5 (nvidia-h200): .bench/s25_norm_check.py, the rms_norm helper against 63b043f on the device's torch.
P=$OUT/s25c5; mkdir -p $P
timeout 260 python3 .bench/s25_norm_check.py 2>&1 | tee $P/norm_check.txt
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee -a $P/norm_check.txt
