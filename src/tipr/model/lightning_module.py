"""``TIPRModule``: the LightningModule that trains a :class:`tipr.model.SENModel`.

It owns what training needs and the network does not: optimiser groups and the
warm-up + cosine schedule (:mod:`tipr.model.training`), logging, the retrieval
metrics, and checkpoints that carry the network's config and tokenizer. Every
constructor argument is a flat value, so LightningCLI exposes it as
``--model.<name>``. When fit ends it writes the best checkpoint's weights as a
pretrained folder, ``<log_dir>/pretrained`` (read it with
``SENModel.from_pretrained`` and ``TIPRProcessor.from_pretrained``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from tipr.model import training
from tipr.model.backbone import BACKBONE_PRESETS
from tipr.model.config import LOSS_NAMES
from tipr.model.nonfinite import NonFiniteWatch
from tipr.model.sen import SENModel
from tipr.model.training import REFERENCE_BOOSTED_BIAS_MODULES, REFERENCE_BOOSTED_MODULES


class TIPRModule(pl.LightningModule):
    """SEN training and evaluation.

    Args:
        num_classes, image_size, text_length: linked from the data module by the CLI.
        backbone: a preset (``"tiny"``), a local CLIP folder or hub id (pretrained; the
            paper uses ``openai/clip-vit-base-patch16``), or a dict of ``CLIPConfig``
            arguments. Checkpoints store it as its full config.
        init_from: a pretrained SEN folder or hub id (``tipr fit``'s ``<log_dir>/pretrained``,
            ``tipr convert``) to start from instead of ``backbone``: its CLIP weights, and its
            ID classifier and TIR head where their shapes fit this module's settings (the
            others start fresh). ``tipr test --model.init_from=<folder>`` evaluates it.
        sdm_weight, id_weight, triplet_weight, restoration_weight, itc_weight: loss
            weights (reference 1, 1, 10, 10, 0); 0 turns a loss off.
        temperature, margin, mask_ratio, restoration_depth, restoration_residual,
        position_interpolation: the network (:class:`tipr.model.SENConfig`).
        restoration_text_padding_mask: TIR ignores caption positions after the
            end-of-text token. A departure: the reference attends to all of them.
        reference_fp16_weights: the reference's precision: fp16 linear, convolution
            and attention weights (so fp16 Adam state) under fp16 autocast. Needs
            ``trainer.precision=32-true``. Off (default, with ``bf16-mixed``): fp32 weights.
        lr, lr_factor, bias_lr_factor, weight_decay, adam_eps: Adam (betas 0.9, 0.999):
            ``lr`` for CLIP, ``lr * lr_factor`` for ``boosted_modules``, ``lr *
            bias_lr_factor`` and no decay for biases.
        boosted_modules: parameter-name prefixes at ``lr * lr_factor`` (reference: ID
            classifier, TIR cross-attention and transformer).
        boosted_bias_modules: prefixes whose biases take ``lr * lr_factor`` with no
            decay (reference ``["classifier"]``; ``[]``, a departure, gives them the bias rate).
        warmup_epochs, warmup_factor: linear warm-up, then cosine decay to the end of the run.
        gradient_checkpointing: recompute encoder activations in backward (saves memory).
        image_to_text: also compute image-to-text metrics (``i2t_*``).
        nonfinite_check_interval: every this many steps (and before any checkpoint) stop
            with an error if a loss term or the gradient norm was NaN or infinite.
        seed: seed of the TIR masking noise, drawn per (epoch, batch) for the global batch.

    Under DDP the data module's batch is the global batch, split across ranks; the
    network computes the batch-level losses over all ranks' features.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | dict[str, Any] = "openai/clip-vit-base-patch16",
        init_from: str | None = None,
        image_size: tuple[int, int] = (384, 128),
        text_length: int = 77,
        sdm_weight: float = 1.0,
        id_weight: float = 1.0,
        triplet_weight: float = 10.0,
        restoration_weight: float = 10.0,
        itc_weight: float = 0.0,
        temperature: float = 0.02,
        margin: float = 0.05,
        mask_ratio: float = 0.7,
        restoration_depth: int = 4,
        restoration_residual: bool = False,
        restoration_text_padding_mask: bool = False,
        position_interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        reference_fp16_weights: bool = False,
        lr: float = 1e-5,
        lr_factor: float = 5.0,
        bias_lr_factor: float = 2.0,
        weight_decay: float = 4e-5,
        boosted_modules: Sequence[str] = REFERENCE_BOOSTED_MODULES,
        boosted_bias_modules: Sequence[str] = REFERENCE_BOOSTED_BIAS_MODULES,
        adam_eps: float = 1e-3,
        warmup_epochs: float = 5.0,
        warmup_factor: float = 0.1,
        gradient_checkpointing: bool = False,
        image_to_text: bool = False,
        nonfinite_check_interval: int = 10,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        from tipr.metrics import RetrievalRanks
        from tipr.pretrained import config_settings, start_from_pretrained

        if init_from:
            self.network = start_from_pretrained(init_from, num_classes, config_settings(self.hparams))
        else:
            self.network = SENModel.from_backbone(backbone, num_classes, **config_settings(self.hparams))
        if gradient_checkpointing:
            clip, kwargs = self.network.clip, {"use_reentrant": False}
            if hasattr(clip, "activation_checkpointing_enable"):
                clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5
                clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.boosted_modules = training.check_prefixes(self.network, boosted_modules, "model.boosted_modules")
        self.boosted_bias_modules = training.check_prefixes(
            self.network, boosted_bias_modules, "model.boosted_bias_modules"
        )
        if nonfinite_check_interval < 1:
            raise ValueError(f"model.nonfinite_check_interval must be >= 1 step, got {nonfinite_check_interval}")
        active = [name for name in LOSS_NAMES if self.network.loss_weights[name] > 0]
        self.nonfinite = NonFiniteWatch([*active, "loss", "grad_norm"])
        # "skip": a partial evaluation (limit_val_batches) leaves out queries whose person is not
        # in the gallery part seen, with a warning; a full evaluation has none.
        self.val_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self.test_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self._processor = None  # the TIPRProcessor, built on first use or read from a checkpoint
        self._noise_generator: torch.Generator | None = None
        self._schedule: tuple[int, float] | None = None  # (total steps, warm-up steps), set at on_train_start
        self._data_checked = False  # the data module's token tables and labels fit the network

    @property
    def processor(self):
        """The :class:`~tipr.processing.TIPRProcessor` of the training data: the backbone folder's tokenizer if it has one."""
        if self._processor is None:
            from tipr.processing import TIPRProcessor
            from tipr.tokenization import load_tokenizer

            backbone, init_from = self.hparams.backbone, self.hparams.init_from
            if init_from:
                tokenizer = TIPRProcessor.from_pretrained(init_from).tokenizer
            else:
                folder = backbone if isinstance(backbone, str) and backbone not in BACKBONE_PRESETS else None
                tokenizer = load_tokenizer(folder)
            self._processor = TIPRProcessor.for_model(self.network, tokenizer)
        return self._processor

    # ------------------------------------------------------------ training
    def lr_factor(self, step: int) -> float:
        """The LR multiplier of optimiser step ``step`` (:func:`~tipr.model.training.warmup_cosine_factor`)."""
        hp = self.hparams
        if self._schedule is None:  # before on_train_start: only step 0 is asked for
            return hp.warmup_factor if hp.warmup_epochs > 0 else 1.0
        return training.warmup_cosine_factor(step, *self._schedule, hp.warmup_factor)

    def on_train_start(self) -> None:
        trainer = self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        if not math.isfinite(per_epoch) or per_epoch <= 0:
            per_epoch = total / max(1, trainer.max_epochs or 1)
        self._schedule = (total, self.hparams.warmup_epochs * per_epoch)

    def on_fit_start(self) -> None:
        self._data_checked = training.check_training_data(self.network, self.trainer.datamodule)
        precision = str(self.trainer.precision)
        if self.hparams.reference_fp16_weights and precision not in ("32-true", "32"):
            raise ValueError(f"model.reference_fp16_weights=true runs its own fp16 autocast over fp16 weights; "
                             f"expected trainer.precision=32-true, got {precision!r}")

    def restoration_noise(self, batch_size: int, epoch: int, batch_idx: int, world_size: int = 1, rank: int = 0):
        """This rank's rows of the global batch's TIR masking noise (:func:`~tipr.model.training.restoration_noise`)."""
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
        return training.restoration_noise(self.network, self._noise_generator, self.hparams.seed, epoch, batch_idx,
                                          batch_size, world_size, rank)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size, trainer = batch["images"].shape[0], self.trainer
        noise = self.restoration_noise(batch_size, self.current_epoch, batch_idx, trainer.world_size, trainer.global_rank)
        # Inputs were validated once at fit start (check_training_data): no host sync per step here.
        losses = self.network(batch["images"], batch["token_ids"], batch["pids"], noise=noise,
                              check_inputs=not self._data_checked)
        # Logged: the global batch's losses. The batch-level terms are equal on every rank;
        # the per-sample ones are rank means, averaged here in one collective (no host sync).
        names = self.nonfinite.names[:-1]  # the loss terms and the total
        values = torch.stack([losses[name].detach().float() for name in names])
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")
        self.nonfinite.update(values, self.global_step)  # a NaN on any rank reaches every rank's mean
        logged = dict(zip(names, values))
        self.log("train/loss", logged.pop("loss"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}_loss": value for name, value in logged.items()}, batch_size=batch_size)
        return losses.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if str(self.trainer.precision) == "16-mixed":
            return  # the grad scaler skips non-finite steps by design; the loss terms are still watched
        norm = training.gradient_norm(self.parameters())
        if norm is not None:
            self.nonfinite.update(norm[None], self.global_step, offset=len(self.nonfinite.names) - 1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.nonfinite_check_interval == 0:
            from tipr.checkpointing import newest_checkpoint

            self.nonfinite.raise_if_tripped(newest_checkpoint(self.trainer))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The Adam parameter groups (:func:`~tipr.model.training.parameter_groups`)."""
        hp = self.hparams
        return training.parameter_groups(self.network, hp.lr, hp.lr_factor, hp.bias_lr_factor, hp.weight_decay,
                                         self.boosted_modules, self.boosted_bias_modules)

    def configure_optimizers(self):
        # The fused kernel updates all tensors at once: on CPU about 9x faster than the per-tensor loop.
        fused = {p.device.type for p in self.network.parameters()} <= {"cpu", "cuda"}
        optimizer = torch.optim.Adam(self.parameter_groups(), betas=(0.9, 0.999), eps=self.hparams.adam_eps,
                                     fused=fused or None)
        # The curve's length is read at on_train_start, not here: asking the trainer for its step count now
        # would set up the training loader before a resumed run's loop state is restored.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------- evaluation
    def _evaluate(self, ranks, batch: dict[str, torch.Tensor]) -> None:
        if "images" in batch:
            ranks.update_gallery(self.network.encode_image(batch["images"]).float(), batch["pids"], batch["index"])
        else:
            ranks.update_queries(self.network.encode_text(batch["token_ids"]).float(), batch["pids"], batch["index"])

    def _log_ranks(self, ranks, stage: str) -> None:
        if not self.trainer.sanity_checking:  # a few batches of each loader: ranks would mean nothing
            self.log_dict({f"{stage}/{name}": value for name, value in ranks.compute().items()})
        ranks.reset()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.val_ranks, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_ranks(self.val_ranks, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.test_ranks, batch)

    def on_test_epoch_end(self) -> None:
        self._log_ranks(self.test_ranks, "test")

    # ---------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tipr.checkpointing import newest_checkpoint
        from tipr.pretrained import CHECKPOINT_CONFIG_KEY, CHECKPOINT_PROCESSOR_KEY

        if self.nonfinite.tripped_at is not None:  # never write weights a non-finite step may have touched
            self.nonfinite.raise_if_tripped(newest_checkpoint(self.trainer))
        # The backbone as its config (rebuilding never downloads or reads init_from), the network's config and the
        # tokenizer when it is not the shipped one: enough to rebuild model and processor without Lightning.
        if checkpoint.get("hyper_parameters") is not None:
            checkpoint["hyper_parameters"].update(backbone=self.network.clip.config.to_dict(), init_from=None)
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.network.config.to_dict()
        checkpoint[CHECKPOINT_PROCESSOR_KEY] = {"tokenizer_files": self.processor.tokenizer_payload()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tipr.pretrained import CHECKPOINT_PROCESSOR_KEY
        from tipr.processing import TIPRProcessor

        files = (checkpoint.get(CHECKPOINT_PROCESSOR_KEY) or {}).get("tokenizer_files")
        if files:
            self._processor = TIPRProcessor.from_payload(files, self.network.image_size, self.network.text_length)

    def on_fit_end(self) -> None:
        # Only runs that keep something (a logger or a checkpoint callback) leave a pretrained folder.
        trainer = self.trainer
        if trainer.loggers or trainer.checkpoint_callbacks:
            from tipr.checkpointing import export_pretrained

            log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
            if trainer.is_global_zero:
                export_pretrained(trainer, self.network, self.processor, Path(log_dir) / "pretrained")
