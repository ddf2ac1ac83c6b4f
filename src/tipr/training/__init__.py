"""Training with Lightning: the one method-agnostic ``TIPRModule``, ``TIPRDataModule``, callbacks, checkpoints.

This is the only package (besides the CLI, :mod:`tipr.cli`) that imports
Lightning; models, data, metrics and search work without it.

- :mod:`~tipr.training.module`: ``TIPRModule`` (the method's parameter groups, the
  schedule, logging, metrics, export of ``<log_dir>/pretrained``);
- :mod:`~tipr.training.datamodule`: ``TIPRDataModule`` for the three benchmarks and the synthetic one;
- :mod:`~tipr.training.recipe`: the LR curve, the gradient norm, the one-time data check, ``init_from``;
- :mod:`~tipr.training.checkpointing`: atomic checkpoints, ``last.ckpt``, resuming into the same run folder;
- :mod:`~tipr.training.nonfinite`: stopping on a NaN without a host sync per step;
- :mod:`~tipr.training.panels`: retrieval and method panels for W&B.
"""

from tipr.lazy import lazy_exports

_EXPORTS = {
    "TIPRModule": "module",
    "TIPRDataModule": "datamodule",
    "DATASETS": "datamodule",
    "RetrievalPanels": "panels",
    "NonFiniteLossError": "nonfinite",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
