"""``TIPRDataModule``: the LightningDataModule that feeds training and evaluation of every method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from tipr.data.benchmarks import BENCHMARKS, PUBLIC_COUNTS, Benchmark, read_benchmark, read_benchmark_folder, split_table
from tipr.data.datasets import GalleryImages, QueryCaptions, TrainPairs
from tipr.data.samplers import SAMPLERS, local_batch_size
from tipr.data.synthetic import SyntheticConfig, ensure_synthetic
from tipr.data.synthetic.writer import SyntheticSpecError
from tipr.data.token_cache import caption_tokens
from tipr.data.transforms import build_eval_transform, build_train_transform
from tipr.model.distributed import world_and_rank

__all__ = ["DATASETS", "TIPRDataModule"]

DATASETS = (*BENCHMARKS, "synthetic")


def _synthetic_config(synthetic: SyntheticConfig | Mapping) -> SyntheticConfig:
    """``data.synthetic`` as a :class:`SyntheticConfig` (a dict comes from code or a checkpoint's hyperparameters)."""
    if isinstance(synthetic, SyntheticConfig):
        return synthetic
    if not isinstance(synthetic, Mapping):
        raise TypeError(f"data.synthetic must be a SyntheticConfig or a dict of its fields, got {type(synthetic).__name__}")
    known = [f.name for f in fields(SyntheticConfig)]
    unknown = sorted(set(synthetic) - set(known))
    if unknown:
        raise ValueError(f"data.synthetic has no option {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    try:
        return SyntheticConfig(**synthetic)
    except ValueError as e:
        raise ValueError(str(e).replace("synthetic.", "data.synthetic.")) from None


class ResumableLoader(DataLoader):
    """The training loader, with the state Lightning saves in a checkpoint: the epoch and the batches done.

    Lightning stores ``state_dict()`` with every checkpoint and hands it back to
    ``load_state_dict`` when a run resumes, so the sampler restarts that epoch
    right after the last trained batch (with the same plan and the same
    per-sample seeds): a resumed run sees the batches an uninterrupted one would.
    ``batches_done`` is set by the data module (a callable).
    """

    batches_done = None
    epoch_to_run = None

    def __iter__(self):
        # Lightning makes a run's first iterator before its first set_epoch, and with worker processes an
        # iterator draws the epoch's indices at once. A run resumed from a checkpoint written at an epoch's
        # end is not "restarting" for Lightning, which then never calls load_state_dict below either: its
        # first epoch replayed epoch 0's batches. The epoch is set here, when the iterator is made. (Not in
        # train_dataloader: Lightning reads len() before this, and it must be the length an uninterrupted run
        # read at epoch 0, which fixes the steps per epoch and the LR curve.)
        epoch = self.epoch_to_run() if self.epoch_to_run is not None else None
        if epoch is not None and epoch != self.sampler.epoch:
            self.sampler.set_epoch(epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_done": int(self.batches_done() if self.batches_done else 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning creates the resumed epoch's iterator before it calls set_epoch, so set it here.
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        self.sampler.set_epoch(epoch)
        if done >= self.sampler.num_batches:  # saved at the epoch's end: the next epoch starts afresh
            self.sampler.set_epoch(epoch + 1)
        else:
            self.sampler.resume_at(epoch, done)


class TIPRDataModule(L.LightningDataModule):
    """Training pairs, identity-aware batches and evaluation sets for one benchmark.

    Training batches: ``{"pixel_values": float32 (b, 3, H, W), "input_ids": int64 (b, L),
    "pids": int64 (b,) labels 0..num_classes-1, "index": int64 (b,)}`` plus the fields
    the method draws per sample (:attr:`sample_fields`: SEN's ``noise``, IRRA's
    ``mlm_input_ids`` and ``mlm_labels``), where ``b = batch_size / W`` is this
    process's slice of the global batch (``W`` processes).
    ``val_dataloader()`` / ``test_dataloader()`` return ``[query_loader, gallery_loader]``:
    caption queries ``{"input_ids", "pids", "index"}`` and gallery images
    ``{"pixel_values", "pids", "index"}``, with the benchmark's own identity numbers and
    ``index`` = position in that evaluation set.

    Validation uses the ``val`` split; ICFG-PEDES has none, so it validates on
    ``test`` (logged at setup). ``num_classes`` reads the annotation file on
    first access (a missing folder or file fails right there, naming the path).

    Every caption is tokenized, and every training caption pruned, once at setup
    and cached in ``cache_dir`` (default ``<dataset folder>/.tipr_cache``) under
    a key made of the annotation file's content, the tokenizer's files,
    ``text_length`` and the pruning tagger, so a second run starts at once.

    Args:
        dataset: ``"CUHK-PEDES"``, ``"ICFG-PEDES"``, ``"RSTPReid"`` (read from
            ``<root>/<dataset>/``) or ``"synthetic"`` (generated on first use into
            ``<root>/synthetic/`` as ``synthetic`` says, then read with the
            reader of its format, CUHK-PEDES by default; a ``<root>/synthetic/``
            of another spec is never replaced: a ``FileExistsError`` names the
            fields that differ, and another ``root`` holds another spec).
        root: folder holding the dataset folders.
        image_size: model input (H, W).
        batch_size: the *global* training batch (128 in the recipe). With ``W``
            processes (``trainer.devices`` x ``trainer.num_nodes``) every rank
            loads ``batch_size / W`` samples of each global batch, so training
            steps and batch composition do not depend on ``W``; ``W`` must
            divide ``batch_size``.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers: loader worker processes (training and gallery loaders; the
            query loader only indexes a tensor and runs in the main process).
        text_length: token context length (77 for CLIP).
        prune_prob: probability that a training sample uses its pruned caption.
        sampler: how training batches are drawn (:mod:`tipr.data.samplers`):
            ``"identity"`` (default), the SEN/IRRA reference's identity sampler:
            every epoch each identity is cut into groups of ``k`` samples, ``k``
            drawn from 1 to ``num_instance``, and rounds of ``batch_size /
            num_instance`` random distinct identities add one group each to a
            stream cut into batches (about 96 identities per batch of 128 on
            CUHK-PEDES, about half the samples with an in-batch positive);
            unlike the reference, the stream's last partial batch is dropped.
            ``"packed_identities"``: batches of distinct identities with at most
            ``num_instance`` samples each, every sample used once per epoch; a
            departure from the reference (nearly every sample has an in-batch
            positive, a different SDM/triplet regime). ``"random"``: a random
            permutation cut into batches. All three draw each epoch's plan from
            ``(seed, epoch)`` and split global batches across ranks.
        num_instance: the identity samplers' group size: at most ``num_instance``
            samples of an identity per round (``"identity"``, reference 2) or per
            batch (``"packed_identities"``).
        flip, pad_crop, random_erasing: training augmentations of the recipe.
        tokenizer: ``None`` for the shipped CLIP tokenizer, or a local checkpoint
            folder with tokenizer files (see :func:`tipr.tokenization.load_tokenizer`).
        cache_dir: where the token cache goes (must be writable; if the default
            is not, tokens are computed in memory with a warning).
        seed: seed of the training sampler's epoch plans and of caption pruning draws.
        synthetic: the synthetic benchmark's size, image size, generator seed and
            format (``dataset="synthetic"`` only): a
            :class:`~tipr.data.synthetic.SyntheticConfig` or a dict of its fields
    """

    #: Seconds a process waits for another one that is writing the same token cache.
    cache_lock_timeout = 3600.0

    def __init__(
        self,
        dataset: Literal["CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "synthetic"] = "synthetic",
        root: str = "data",
        image_size: tuple[int, int] = (384, 128),
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        text_length: int = 77,
        prune_prob: float = 0.2,
        sampler: Literal["identity", "packed_identities", "random"] = "identity",
        num_instance: int = 2,
        flip: bool = True,
        pad_crop: bool = True,
        random_erasing: bool = True,
        tokenizer: str | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        synthetic: SyntheticConfig = SyntheticConfig(),
    ):
        super().__init__()
        synthetic_config = _synthetic_config(synthetic)
        synthetic = asdict(synthetic_config)  # what save_hyperparameters records: a plain dict, loadable with weights_only
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (height, width) with positive values, got {image_size!r}")
        if not 0.0 <= prune_prob <= 1.0:
            raise ValueError(f"prune_prob must be in [0, 1], got {prune_prob}")
        if min(batch_size, eval_batch_size, num_instance) < 1 or num_workers < 0 or text_length < 2:
            raise ValueError("batch sizes and num_instance must be >= 1, num_workers >= 0, text_length >= 2")
        if sampler == "identity" and batch_size % num_instance:
            raise ValueError(f"sampler 'identity': data.batch_size={batch_size} is not a multiple of "
                             f"data.num_instance={num_instance}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = Path(root)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.text_length = int(text_length)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.prune_prob = prune_prob
        self.sampler = sampler
        self.num_instance = num_instance
        self.augment = {"flip": flip, "pad_crop": pad_crop, "random_erasing": random_erasing}
        self.tokenizer = tokenizer
        self.cache_dir = cache_dir
        self.seed = seed
        self.synthetic = synthetic_config if dataset == "synthetic" else None
        self._benchmark: Benchmark | None = None
        self._tokens: dict[str, dict[str, torch.Tensor]] | None = None
        self.train_set: TrainPairs | None = None
        self._sample_fields = None
        self.eval_sets: dict[str, tuple[QueryCaptions, GalleryImages]] = {}

    # ------------------------------------------------------------ reading

    @property
    def folder(self) -> Path:
        """The dataset folder, ``<root>/<dataset>``."""
        return self.root / self.dataset

    @property
    def benchmark(self) -> Benchmark:
        """The benchmark, read (and validated) on first access; synthetic data is generated first if needed."""
        if self._benchmark is None:
            if self.synthetic is not None:
                try:
                    ensure_synthetic(self.folder, self.synthetic)
                except SyntheticSpecError as e:  # another spec's benchmark is there: never replaced, another root
                    raise e.advise("--data.root", self.root / f"{self.dataset}-{e.suffix}") from None
                benchmark = read_benchmark_folder(self.folder, self.synthetic.format)
                if benchmark.num_classes != self.synthetic.num_train_ids:
                    raise RuntimeError(f"{benchmark.annotation} has {benchmark.num_classes} training identities, "
                                       f"expected {self.synthetic.num_train_ids}; delete {self.folder} to regenerate it")
            else:
                benchmark = read_benchmark(self.dataset, self.root)
            reference = None if self.synthetic is not None else PUBLIC_COUNTS.get(self.dataset)
            rank_zero_info(split_table(benchmark, reference, title=self.dataset))
            self._benchmark = benchmark
        return self._benchmark

    @property
    def num_classes(self) -> int:
        """Number of training identities (the ID classifier's width)."""
        if self.synthetic is not None and self._benchmark is None:
            return self.synthetic.num_train_ids  # known without generating the data
        return self.benchmark.num_classes

    def eval_split(self, stage: str) -> str:
        """The split evaluated at ``stage`` ("validate" or "test"): validation falls back to test without val."""
        return "val" if stage == "validate" and "val" in self.benchmark.splits else "test"

    # ------------------------------------------------------------ captions

    def caption_tokens(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{split: {"tokens": int32 (N, L), "pruned": int32 (N, L) (train only)}}``, tokenized and pruned
        once and cached on disk (:func:`tipr.data.token_cache.caption_tokens`)."""
        if self._tokens is None:
            folder = Path(self.cache_dir) if self.cache_dir else self.folder / ".tipr_cache"
            self._tokens = caption_tokens(self.benchmark, self.tokenizer, self.text_length, folder,
                                          own_folder=bool(self.cache_dir), lock_timeout=self.cache_lock_timeout,
                                          name=self.dataset)
        return self._tokens

    @property
    def sample_fields(self):
        """The model's per-sample training fields (:meth:`tipr.model.TIPRModel.sample_fields`), drawn
        in the loader from each sample's seed; ``TIPRModule`` sets it before the loaders are made."""
        return self._sample_fields

    @sample_fields.setter
    def sample_fields(self, value) -> None:
        self._sample_fields = value
        if self.train_set is not None:
            self.train_set.sample_fields = value

    # ------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Once per node: generate the synthetic data if needed and fill the token cache."""
        self.caption_tokens()

    def setup(self, stage: str | None = None) -> None:
        tokens = self.caption_tokens()
        benchmark = self.benchmark
        if stage in (None, "fit") and self.train_set is None:
            train = benchmark.split("train")
            self.train_set = TrainPairs(
                benchmark.image_dir,
                train.image_paths,
                torch.from_numpy(train.caption_images),
                torch.from_numpy(benchmark.train_labels[train.caption_images]),
                tokens["train"]["tokens"],
                tokens["train"]["pruned"],
                transform=build_train_transform(self.image_size, **self.augment),
                prune_prob=self.prune_prob,
                seed=self.seed,
                sample_fields=self._sample_fields,
            )
            self.train_sampler()  # refuse now, before any work, a batch the sampler or the processes cannot split
        stages = {None: ("validate", "test"), "fit": ("validate",), "validate": ("validate",), "test": ("test",)}.get(stage, ())
        for eval_stage in stages:
            split_name = self.eval_split(eval_stage)
            if split_name in self.eval_sets:
                continue
            if eval_stage == "validate" and split_name == "test":
                rank_zero_info(f"{self.dataset} has no val split: validation uses the test split")
            split = benchmark.split(split_name)
            self.eval_sets[split_name] = (
                QueryCaptions(tokens[split_name]["tokens"], split.caption_pids),
                GalleryImages(benchmark.image_dir, split.image_paths, split.image_pids, build_eval_transform(self.image_size)),
            )

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def world(self) -> tuple[int, int]:
        """(number of processes, this process's rank): from the trainer when attached, else torch.distributed, else (1, 0)."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return world_and_rank()

    def train_dataloader(self) -> DataLoader:
        """Training batches of ``batch_size / W`` samples: this rank's slice of each global batch."""
        if self.train_set is None:
            self.setup("fit")
        sampler = self.train_sampler()
        loader = ResumableLoader(self.train_set, batch_size=sampler.local_batch_size, sampler=sampler,
                                 drop_last=True, **self._loader_options())
        loader.batches_done, loader.epoch_to_run = self._batches_done, self._epoch_to_run
        return loader

    def train_sampler(self):
        """This process's sampler of the global training batches; raises ``ValueError`` naming the option
        when the batch does not divide by the processes or the sampler cannot fill it."""
        world, rank = self.world()
        local_batch_size(self.batch_size, world)  # names the options if W does not divide batch_size
        return SAMPLERS[self.sampler](self.train_set.labels, self.batch_size, self.num_instance,
                                      num_replicas=world, rank=rank, seed=self.seed, sample_seeds=True)

    def _epoch_to_run(self) -> int | None:
        """The epoch the fit loop runs next (its processed-epochs counter, what Lightning gives ``set_epoch``)."""
        fit_loop = getattr(self.trainer, "fit_loop", None)  # None: no trainer, or a stand-in without loops
        return int(fit_loop.epoch_progress.current.processed) if fit_loop is not None else None

    def _batches_done(self) -> int:
        """Training batches completed (stepped) in the current epoch, from the trainer's progress counter."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        split_name = self.eval_split(stage)
        if split_name not in self.eval_sets:
            self.setup(stage)
        queries, gallery = self.eval_sets[split_name]
        return [
            DataLoader(queries, batch_size=self.eval_batch_size, num_workers=0),
            DataLoader(gallery, batch_size=self.eval_batch_size, **self._loader_options()),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """``[query_loader, gallery_loader]`` of the validation split."""
        return self._eval_loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        """``[query_loader, gallery_loader]`` of the test split."""
        return self._eval_loaders("test")
