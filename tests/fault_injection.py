"""Callbacks that inject faults into a `tipr fit` run, for tests/test_resume.py (put tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAfterStep(Callback):
    """SIGKILL the process right after optimiser step ``step``: no cleanup, no checkpoint, as a preempted job."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
