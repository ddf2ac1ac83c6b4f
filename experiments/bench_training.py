"""Training throughput: samples/s and peak memory of `tipr fit` for a config.

Builds the model and data module exactly as `tipr fit` would (same config
files and overrides), trains for --warmup + --steps steps and times the last
--steps. Peak memory is the GPU's max allocated memory when training on a GPU,
else the process's peak resident set size.

    python experiments/bench_training.py --config experiments/synthetic.yaml
    python experiments/bench_training.py --config experiments/sen_base.yaml --config experiments/sen_cuhk_pedes.yaml \
        --data.root /data --trainer.precision=bf16-mixed            # on a GPU

Extra arguments are passed to the CLI (e.g. --model.backbone=..., --data.batch_size=128).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor


class ThroughputProbe(Callback):
    """Times training steps after a warm-up."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = None
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += batch["pixel_values"].shape[0]

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args, overrides = parser.parse_known_args()

    from tipr.cli import TIPRCLI
    from tipr.training import TIPRDataModule
    from tipr.training import TIPRModule

    scratch = tempfile.mkdtemp(prefix="tipr-bench-")
    cli_args = ["--trainer.logger=false", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={scratch}",
                "--checkpoint.save_last=false", "--checkpoint.save_top_k=0",
                f"--trainer.max_steps={args.warmup + args.steps}", "--trainer.enable_progress_bar=false"]
    config_args = [a for c in args.config for a in ("--config", c)]
    cli = TIPRCLI(TIPRModule, TIPRDataModule, auto_configure_optimizers=False, run=False,
                  save_config_callback=None, args=[*config_args, *cli_args, *overrides])
    probe = ThroughputProbe(args.warmup)
    # No logger here, so nothing for a config's LearningRateMonitor to write to.
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
    cli.trainer.callbacks.append(probe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if torch.cuda.is_available():
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (max allocated)"
        device = torch.cuda.get_device_name()
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        device = f"CPU ({torch.get_num_threads()} threads)"
    data = cli.datamodule
    print(f"device: {device}; method: {cli.model.network.config.display_name}; precision: {cli.trainer.precision}; batch {data.batch_size}; "
          f"image {tuple(data.image_size)}; backbone {cli.model.hparams.get('backbone')}")
    print(f"{probe.samples / probe.elapsed:.1f} samples/s over {args.steps} steps; peak memory {peak}")


if __name__ == "__main__":
    sys.exit(main())
