"""Checkpoints that survive faults: atomic writes, a fresh ``last.ckpt``, and resuming into the same run folder.

- :class:`AtomicCheckpointIO` writes every checkpoint to a partial file in
  the same folder and renames it into place (:func:`tipr.files.atomic_write`),
  so a process killed while saving leaves the previous file intact.
- :class:`LastCheckpoint` keeps ``last.ckpt`` fresh: at the end of every
  training epoch and every ``every_n_minutes`` of training (or every
  ``every_n_train_steps``), so a killed run loses at most that much work.
- :func:`run_folder` is the run's own folder, where its checkpoints, config,
  results and pretrained folder go: ``<save_dir>/<name>/version_N`` for the CSV
  logger, ``<save_dir>/<project>/<run id>`` for W&B (whose ``trainer.log_dir`` is
  the ``save_dir`` every run shares).
- :func:`resume_version` finds the run folder (``version_N``, or a W&B run id)
  a checkpoint belongs to, so a resumed ``tipr fit`` logs into the same folder and
  its best-checkpoint callback keeps the best-so-far of the first part.
- :func:`export_pretrained` writes the best checkpoint's network and processor
  as a pretrained folder, ``<run folder>/pretrained``, when fit ends.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tipr.files import atomic_folder, atomic_write

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "export_pretrained", "newest_checkpoint", "resume_version", "run_folder"]

_VERSION = re.compile(r"^version_(\d+)$")


def run_folder(trainer) -> Path:
    """This run's folder: the one ``ModelCheckpoint`` puts ``checkpoints/`` in when no ``dirpath`` is given.

    ``<save_dir>/<name>/<version>`` of the first logger: ``version_N`` under the CSV
    logger's name, the run id under a W&B project; ``default_root_dir`` without a
    logger. A collective under DDP (rank 0's answer is broadcast), as ``trainer.log_dir`` is.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    else:
        folder = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(folder))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint next to its target and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":  # remote stores have their own transactions
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            torch.save(checkpoint, f)


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` at every training-epoch end and every ``every_n_minutes`` (or ``every_n_train_steps``).

    The file goes to the best-checkpoint callback's folder (``<run folder>/checkpoints/``
    unless ``--checkpoint.dirpath`` says otherwise), where ``--ckpt_path last`` finds it.

    Args:
        every_n_minutes: wall-clock minutes of training between saves inside an epoch
            (``None`` or 0: only at epoch ends, and every ``every_n_train_steps``).
        every_n_train_steps: also save every this many optimiser steps (``None`` or 0: off).
    """

    FILENAME = "last.ckpt"
    TIME_CHECK_STEPS = 10

    def __init__(self, every_n_minutes: float | None = 30.0, every_n_train_steps: int | None = None):
        if every_n_minutes is not None and every_n_minutes < 0:
            raise ValueError(f"last_checkpoint.every_n_minutes must be >= 0 (or null), got {every_n_minutes}")
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"last_checkpoint.every_n_train_steps must be >= 0 (or null), got {every_n_train_steps}")
        self.every_n_seconds = 60.0 * every_n_minutes if every_n_minutes else None
        self.every_n_train_steps = every_n_train_steps or None
        self._saved_at = time.monotonic()
        self.path: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        best = trainer.checkpoint_callback
        folder = best.dirpath if best is not None and best.dirpath else run_folder(trainer) / "checkpoints"
        self.path = Path(folder) / self.FILENAME

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        due = bool(self.every_n_train_steps) and trainer.global_step % self.every_n_train_steps == 0
        # The clock is read every TIME_CHECK_STEPS steps: under DDP agreeing on it is a collective.
        if self.every_n_seconds is not None and not due and trainer.global_step % self.TIME_CHECK_STEPS == 0:
            elapsed = time.monotonic() - self._saved_at >= self.every_n_seconds
            due = trainer.strategy.broadcast(elapsed)  # every rank must take part in the save
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer) -> None:
        """Write ``last.ckpt`` now (a collective under DDP; rank 0 writes)."""
        trainer.save_checkpoint(self.path, weights_only=False)  # all state: resuming needs it
        self._saved_at = time.monotonic()


def resume_version(
    ckpt_path: str, log_root: str | os.PathLike, hpc_dir: str | os.PathLike | None = None, *, numbered: bool = True
) -> tuple[str, int | str] | None:
    """``(checkpoint, version)`` when ``ckpt_path`` resumes a run folder under ``log_root``, else None.

    ``numbered`` (the CSV logger): run folders are ``version_N`` and the version is
    ``N``; ``ckpt_path="last"`` picks the highest ``N`` that has ``checkpoints/last.ckpt``.
    Otherwise (W&B: ``<project>/<run id>``) any folder holding ``checkpoints/`` is a
    run, its name the version, and ``"last"`` picks the newest ``last.ckpt``. An
    ``hpc_ckpt_*.ckpt`` in ``hpc_dir`` newer than that wins (Lightning writes it when
    SLURM signals a requeue; it belongs to the newest run). A path inside a run
    folder gives that folder's version.
    """
    root = Path(log_root)

    def version_of(folder: Path) -> int | str | None:
        if numbered:
            m = _VERSION.match(folder.name)
            return int(m.group(1)) if m else None
        return folder.name if (folder / "checkpoints").is_dir() else None

    if ckpt_path == "last":
        found = [
            ((d / "checkpoints" / "last.ckpt").stat().st_mtime if not numbered else version, version, d / "checkpoints" / "last.ckpt")
            for d in (root.iterdir() if root.is_dir() else [])
            if (version := version_of(d)) is not None and (d / "checkpoints" / "last.ckpt").is_file()
        ]
        if not found:
            return None
        _, version, path = max(found)
        hpc = sorted(Path(hpc_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime) if hpc_dir else []
        if hpc and hpc[-1].stat().st_mtime > path.stat().st_mtime:
            path = hpc[-1]
        return str(path), version
    path = Path(ckpt_path).resolve()
    for parent in path.parents:
        if parent.parent == root.resolve() and (version := version_of(parent)) is not None:
            return str(path), version
    return None


def newest_checkpoint(trainer) -> str | None:
    """The newest checkpoint file this run wrote (``last.ckpt`` or the best one), if any."""
    paths = [c.path for c in trainer.callbacks if isinstance(c, LastCheckpoint)] + [
        getattr(c, attr, None) for c in trainer.checkpoint_callbacks for attr in ("last_model_path", "best_model_path")
    ]
    existing = [Path(p) for p in paths if p and Path(p).is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


def export_pretrained(trainer, network, processor, folder: str | Path) -> Path:
    """Write ``folder`` (``<run folder>/pretrained``): the best checkpoint's network (the current one when
    no checkpoint callback chose a best) and the processor, for ``TIPRModel.from_pretrained``.

    Called on one rank: it runs no collective (:func:`run_folder` is one under DDP, so the
    caller asks for it on every rank)."""
    from tipr.pretrained import load_lightning_checkpoint, save_pretrained

    folder = Path(folder)
    best = getattr(trainer.checkpoint_callback, "best_model_path", None)
    if best and Path(best).is_file():
        network, _ = load_lightning_checkpoint(best)
    # Written beside the target and renamed into place: an interrupted export leaves no half folder.
    folder.parent.mkdir(parents=True, exist_ok=True)  # a run folder no logger has written to yet
    with atomic_folder(folder) as partial:
        save_pretrained(network, processor, partial)
    return folder
