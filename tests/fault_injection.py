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


class KillAtEvent(Callback):
    """SIGKILL the process at the ``event``-th moment of the run (counting from 1), any kind of moment:

    - ``batch``: after an optimiser step (``on_train_batch_end``);
    - ``val_batch``: inside validation (``on_validation_batch_end``);
    - ``val_end``: validation done, the best checkpoint not yet saved (this callback's
      ``on_validation_end`` runs before ModelCheckpoint's: Lightning puts checkpoint callbacks last);
    - ``epoch_end``: the epoch's hooks started, ``last.ckpt`` not yet written (this callback
      runs before LastCheckpoint);
    - ``rename``: a checkpoint or the pretrained folder fully written under its temporary
      name, not yet renamed into place (``os.replace`` / ``os.rename`` in ``tipr.files``).

    ``log_file``: a file to which each moment is appended as it passes (``kind epoch step``),
    so a test can enumerate them from an uninterrupted run.
    """

    def __init__(self, event: int = 0, log_file: str | None = None):
        self.event, self.log_file, self.count = event, log_file, 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        import tipr.files

        if stage != "fit":
            return
        real_replace, real_rename = tipr.files.os.replace, tipr.files.os.rename
        self._trainer = trainer

        def replace(src, dst):
            self._moment("rename")
            return real_replace(src, dst)

        def rename(src, dst):
            self._moment("rename")
            return real_rename(src, dst)

        tipr.files.os.replace, tipr.files.os.rename = replace, rename

    def _moment(self, kind: str) -> None:
        self.count += 1
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{self.count} {kind} {self._trainer.current_epoch} {self._trainer.global_step}\n")
        if self.count == self.event:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._moment("batch")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._moment("val_batch")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._moment("val_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._moment("epoch_end")
