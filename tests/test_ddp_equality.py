"""N processes train the recipe of one: same global batches, same losses, same weights (2-process gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_equality_run import LOSS_KEYS, STEPS, data_module

RUNNER = Path(__file__).with_name("ddp_equality_run.py")


def _run(devices: int, root: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--devices", str(devices), "--root", str(root), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_processes_train_the_same_losses_and_weights_as_one(tmp_path):
    """From the same weights and global batches (8 = 2 x 4), the logged SDM, ID, triplet, TIR and
    total losses of each of the first 3 steps, and every weight after them, equal one process's
    within 1e-5. Also checks that the run is not trivially equal: the weights moved."""
    data_module(str(tmp_path)).prepare_data()  # write the benchmark and token cache once, before both runs
    single = _run(1, tmp_path, tmp_path / "single.pt")
    double = _run(2, tmp_path, tmp_path / "double.pt")
    assert (single["world_size"], double["world_size"]) == (1, 2)
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    for step, (one, two) in enumerate(zip(single["losses"], double["losses"])):
        for key in LOSS_KEYS:
            assert two[key] == pytest.approx(one[key], abs=1e-5), f"step {step}: {key}"
    assert set(single["weights"]) == set(double["weights"])
    worst = max((single["weights"][k] - double["weights"][k]).abs().max().item() for k in single["weights"])
    assert worst < 1e-5
    # Not the equality of an untouched model: the three steps moved the weights far more than that.
    moved = max((single["weights"][k] - single["initial"][k]).abs().max().item() for k in single["weights"])
    assert moved > 1e-3
