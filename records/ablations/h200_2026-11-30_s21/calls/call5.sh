#!/usr/bin/env bash
# session 21 call 5 (at fefd8f7; train_gpt.py as at c969e87)
bash scripts/sweep_device.sh scripts/sweeps/recipe_s21b.toml s21b
