#!/usr/bin/env bash
# session 19 call 6 (401 s, at 8226c42, the machine of call 5 still warm; its /tmp/b held no sweep, so the sweep
# began again at xsaqk, now with the kernels' cos/sin tables, then re-scored it with the env's LoRA pass).
GPUS=0 CALL_SECONDS=470 bash scripts/sweep_device.sh scripts/sweeps/recipe_s19.toml s19 2>&1 | tail -12
