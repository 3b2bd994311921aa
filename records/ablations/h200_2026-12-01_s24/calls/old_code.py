"""Session 24's A/B helper: runs scripts/profile_step.py with train_gpt.py as it was at 3a4b7f6 (.bench/
train_gpt_3a4b7f6.py: Newton-Schulz's a x as a pointwise pass, Muon's decay as its own foreach op), so that the same
checkout profiles both. Usage: python3 .bench/old_code.py ARGS (in call 1 it lay in .bench, git-ignored, beside
`git show 3a4b7f6:train_gpt.py > .bench/train_gpt_3a4b7f6.py`)"""
import importlib.util
import runpy
import sys

sys.path[:0] = [".", "scripts"]
spec = importlib.util.spec_from_file_location("train_gpt", ".bench/train_gpt_3a4b7f6.py")
tg = importlib.util.module_from_spec(spec)
sys.modules["train_gpt"] = tg
spec.loader.exec_module(tg)
print("old_code: train_gpt from", tg.__file__, flush=True)
sys.argv = ["profile_step.py", *sys.argv[1:]]
runpy.run_path("scripts/profile_step.py", run_name="__main__")
