#!/usr/bin/env bash
# session 21 call 2 (at eecc433)
bash scripts/sweep_device.sh scripts/sweeps/recipe_s21.toml s21
