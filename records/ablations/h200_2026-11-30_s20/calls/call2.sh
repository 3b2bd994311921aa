#!/usr/bin/env bash
# session 20 call 2 (the machine of call 1 still warm): recipe_s20 side by side
bash scripts/sweep_device.sh scripts/sweeps/recipe_s20.toml s20 2>&1 | tail -60
