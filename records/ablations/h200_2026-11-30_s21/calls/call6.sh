#!/usr/bin/env bash
# session 21 call 6 (at 97fae6b; train_gpt.py as at c969e87)
bash scripts/sweep_device.sh scripts/sweeps/recipe_s21c.toml s21c
