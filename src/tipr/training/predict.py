"""``tipr index --devices N``: indexing on many GPUs, CPU processes or nodes through Lightning's prediction loop.

The run is the one :func:`tipr.search.build_index` does, split over processes:

1. rank 0 takes the gallery's lock and plans (:func:`~tipr.search.indexing.plan_index`:
   it also takes over what an interrupted run left), then broadcasts the plan;
2. each rank encodes its contiguous block of the files to encode
   (``Trainer.predict``; loader workers decode, float16 autocast on GPU) and its
   :class:`GalleryShardWriter` (a ``BasePredictionWriter``) writes its own shards
   and journal;
3. after a barrier rank 0 commits every journal into the manifest
   (:func:`~tipr.search.indexing.finish_index`).

Lightning's launchers start the processes: ``--devices N`` on one machine
(``strategy="ddp"``: N GPUs, or N gloo processes on CPU), ``torchrun`` or SLURM
(``srun tipr index ... --devices 4 --num_nodes 2``) across machines. The gallery
folder must be on a file system every node sees. Search never imports this module.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from tipr.search.gallery import model_identity
from tipr.search.indexing import ImageFiles, check_out, finish_index, plan_index, record_batch
from tipr.search.writer import ShardSink, gallery_lock

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["GalleryShardWriter", "ImageEncoderModule", "ImagesToIndex", "index_on_devices"]


class ImageEncoderModule(pl.LightningModule):
    """``predict_step``: L2-normalised float32 features of a batch's readable images (None if it has none)."""

    def __init__(self, model: TIPRModel):
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        ok = torch.tensor([not error for error in batch["error"]], device=batch["pixel_values"].device)
        if not ok.any():
            return None
        return torch.nn.functional.normalize(self.model.encode_image(batch["pixel_values"][ok]).float(), dim=-1)


class ImagesToIndex(pl.LightningDataModule):
    """The files this rank encodes: the plan is made on rank 0 and broadcast in :meth:`setup`."""

    def __init__(self, identity: dict[str, Any], processor: TIPRProcessor, folder: str, out: str, *,
                 dtype: str, batch_size: int, num_workers: int, shard_rows: int):
        super().__init__()
        self.identity, self.processor, self.folder, self.out = identity, processor, folder, out
        self.dtype, self.batch_size, self.num_workers, self.shard_rows = dtype, batch_size, num_workers, shard_rows
        self.lock = None
        self.plan = self.sink = None
        self.paths: list[str] = []

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        plan = None
        if self.trainer.global_rank == 0:
            try:
                self.lock = gallery_lock(check_out(self.out))
                self.lock.acquire()
                plan = plan_index(self.identity, self.folder, self.out, self.dtype)
            except (OSError, ValueError) as e:  # another model's gallery, a missing folder...: every rank stops
                plan = e
        plan = strategy.broadcast(plan, src=0)
        if isinstance(plan, Exception):
            if self.trainer.global_rank == 0:
                raise plan
            raise SystemExit(1)  # rank 0 says why
        self.plan = plan
        self.paths = self.plan.shard(self.trainer.global_rank, self.trainer.world_size)
        self.sink = ShardSink(self.out, fingerprint=self.identity["fingerprint"], dim=self.identity["embed_dim"],
                              dtype=self.plan.dtype, shard_rows=self.shard_rows, rank=self.trainer.global_rank)

    def predict_dataloader(self) -> DataLoader:
        dataset = ImageFiles(self.plan.root, self.paths, self.processor.transform, self.processor.image_size)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())


class GalleryShardWriter(BasePredictionWriter):
    """Each rank's predictions into its :class:`~tipr.search.writer.ShardSink`; rank 0 commits at the end.

    Rank 0 shows a progress bar of images/s and the time left (its own rate times the world size).
    """

    def __init__(self, data: ImagesToIndex, progress: bool = True):
        super().__init__(write_interval="batch")
        self.data, self.progress, self.bar, self.result = data, progress, None, None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from tqdm import tqdm

        enabled = self.progress and trainer.global_rank == 0
        self.bar = tqdm(total=len(self.data.plan.todo), unit="img", desc="indexing", disable=not enabled,
                        file=sys.stderr)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        record_batch(self.data.sink, batch, self.data.paths, self.data.plan.files, prediction)
        self.bar.update(min(len(batch["error"]) * trainer.world_size, self.bar.total - self.bar.n))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data.sink.close()
        self.bar.close()
        trainer.strategy.barrier("tipr-index-written")
        if trainer.global_rank == 0:
            self.result = finish_index(self.data.plan)


def index_on_devices(
    model: TIPRModel, processor: TIPRProcessor, folder: str, out: str, *, checkpoint: str | None = None,
    devices: int | str = 1, num_nodes: int = 1, accelerator: str = "auto", batch_size: int = 64,
    num_workers: int | None = None, dtype: str = "float32", shard_rows: int = 1024, progress: bool = True,
):
    """:func:`tipr.search.build_index` on ``devices`` x ``num_nodes`` processes: ``(gallery, report)`` on
    rank 0, None on the other ranks (which print nothing)."""
    identity = model_identity(model, checkpoint)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    data = ImagesToIndex(identity, processor, folder, out, dtype=dtype, batch_size=batch_size,
                         num_workers=workers, shard_rows=shard_rows)
    writer = GalleryShardWriter(data, progress)
    several = num_nodes > 1 or devices == -1 or (str(devices).isdigit() and int(devices) > 1)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp" if several else "auto",
        precision="16-mixed" if gpu else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer],
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Total length of `DataLoader` across ranks is zero.*")
            trainer.predict(ImageEncoderModule(model).eval(), datamodule=data, return_predictions=False)
    finally:
        if data.lock is not None:
            data.lock.release()
    return writer.result if trainer.global_rank == 0 else None
