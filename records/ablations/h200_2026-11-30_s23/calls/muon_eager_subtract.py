"""Session 23's A/B helper: runs scripts/profile_step.py with MUON_FUSED's parameter step as it was at 7130363 (one
eager add a matrix, Muon.apply_updates), so that the same checkout profiles both. Usage: python3 .bench/muon_eager_subtract.py ARGS"""
import runpy
import sys

sys.path[:0] = [".", "scripts"]
import train_gpt as tg  # noqa: E402

# call 6 ran this line without staticmethod(), so its eager runs failed (a TypeError); call 7 ran it as it is here
tg.FusedMuon.apply_updates = staticmethod(tg.Muon.apply_updates)
sys.argv = ["profile_step.py", *sys.argv[1:]]
runpy.run_path("scripts/profile_step.py", run_name="__main__")
