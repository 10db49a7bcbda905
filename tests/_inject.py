"""Faults injected into ``python -m fastjepa.train`` subprocesses (plain or under torchrun)."""

from pathlib import Path

# Runs `python -m fastjepa.train ARGS` with a NaN loss on rank RANK at optimizer step STEP:
# that step's forward passes return their loss times NaN (on that rank only).
NAN_AT = """
import runpy, sys
rank_at, step_at = int(sys.argv[1]), int(sys.argv[2])
from fastjepa.training import step as step_module
real_step = step_module.Step.step
def step(self, imgs, masks_enc, masks_pred, *, index, **kwargs):
    if (self.dist.rank, index) != (rank_at, step_at):
        return real_step(self, imgs, masks_enc, masks_pred, index=index, **kwargs)
    model, forward = self.model, self.model.forward
    model.forward = lambda *a, **k: forward(*a, **k) * float("nan")
    try:
        return real_step(self, imgs, masks_enc, masks_pred, index=index, **kwargs)
    finally:
        del model.forward
step_module.Step.step = step
sys.argv = ["fastjepa.train", *sys.argv[3:]]
runpy.run_module("fastjepa.train", run_name="__main__", alter_sys=True)
"""


def nan_at_script(tmp_path: Path, rank: int, step: int) -> list[str]:
    """The program and its first arguments: a NaN loss at ``step`` on ``rank``; append the
    arguments of ``python -m fastjepa.train``."""
    script = Path(tmp_path) / "nan_at.py"
    script.write_text(NAN_AT)
    return [str(script), str(rank), str(step)]
