"""``TIPRModule``: the one LightningModule that trains any method of :mod:`tipr.methods`.

It owns what training needs and a method does not: the optimiser (the method's
parameter groups) and the warm-up + cosine schedule, logging, the retrieval
metrics, the non-finite watch, and checkpoints that carry the model's config and
tokenizer. The method is one nested option, ``--model.method`` (``sen``,
``irra``, then ``--model.method.<field>``). When fit ends it writes the best
checkpoint's weights as a pretrained folder, ``<run folder>/pretrained`` (read it
with ``TIPRModel.from_pretrained`` and ``TIPRProcessor.from_pretrained``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from tipr.metrics import RetrievalRanks
from tipr.model.backbone import BACKBONE_PRESETS
from tipr.model.config import MethodConfig
from tipr.pretrained import CHECKPOINT_CONFIG_KEY, CHECKPOINT_PROCESSOR_KEY
from tipr.training import recipe
from tipr.training.checkpointing import export_pretrained, newest_checkpoint, run_folder
from tipr.training.nonfinite import NonFiniteWatch


def method_config(method: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """``method`` as a :class:`MethodConfig`. A dict (a checkpoint's hyperparameters) is
    ``{"name": <method>, <field>: value, ...}`` or LightningCLI's ``{"class_path": ..., "init_args": {...}}``."""
    if isinstance(method, MethodConfig):
        return method
    from tipr.methods import all_specs, method_spec

    if isinstance(method, Mapping) and "class_path" in method:
        name = str(method["class_path"]).rsplit(".", 1)[-1]
        spec = next((s for s in all_specs() if s.config_class.__name__ == name), None)
        if spec is None:
            raise ValueError(f"model.method: {method['class_path']!r} is not a registered method's config")
        return spec.config_class.from_dict(method.get("init_args") or {}, source="model.method")
    if not isinstance(method, Mapping) or "name" not in method:
        raise TypeError(f"model.method must be a method config (SENConfig, IRRAConfig, ...) or a dict with "
                        f"its 'name', got {method!r}")
    values = dict(method)
    spec = method_spec(values.pop("name"), source="model.method")
    return spec.config_class.from_dict(values, source="model.method")


class TIPRModule(pl.LightningModule):
    """Training and evaluation of one method (``method``) around a CLIP backbone.

    Args:
        num_classes, image_size, text_length: linked from the data module by the CLI.
        method: the method and its settings: ``SENConfig()``, ``IRRAConfig()``... (on
            the command line ``--model.method=sen|irra`` and ``--model.method.<field>``).
        backbone: a preset (``"tiny"``), a local CLIP folder or hub id (pretrained; the
            papers use ``openai/clip-vit-base-patch16``), or a dict of ``CLIPConfig``
            arguments. Checkpoints store it as its full config.
        init_from: a pretrained tipr folder or hub id (``tipr fit``'s ``<log_dir>/pretrained``,
            ``tipr convert``) to start from instead of ``backbone``: its CLIP weights, and each
            head of the same name whose shapes fit ``method`` (the others start fresh).
            ``tipr test --model.init_from=<folder>`` evaluates it.
        position_interpolation: how CLIP's square position table is resized to the
            image grid: ``bilinear`` (the reference) or ``bicubic``.
        reference_fp16_weights: the reference's precision: fp16 linear, convolution
            and attention weights (so fp16 Adam state) under fp16 autocast. Needs
            ``trainer.precision=32-true``. Off (default, with ``bf16-mixed``): fp32 weights.
        lr, lr_factor, bias_lr_factor, weight_decay, adam_eps: Adam (betas 0.9, 0.999):
            ``lr`` for CLIP, ``lr * lr_factor`` for the method's boosted modules, ``lr *
            bias_lr_factor`` and no decay for biases (the method's ``parameter_groups``).
        warmup_epochs, warmup_factor: linear warm-up, then cosine decay to the end of the run.
        gradient_checkpointing: recompute encoder activations in backward (saves memory).
        image_to_text: also compute image-to-text metrics (``i2t_*``).
        nonfinite_check_interval: every this many steps (and before any checkpoint) stop
            with an error if a loss term or the gradient norm was NaN or infinite.

    Under DDP the data module's batch is the global batch, split across ranks; the
    module turns on the model's cross-rank gather, so the batch-level losses see it whole.
    """

    def __init__(
        self,
        num_classes: int,
        method: MethodConfig,
        backbone: str | dict[str, Any] = "openai/clip-vit-base-patch16",
        init_from: str | None = None,
        image_size: tuple[int, int] = (384, 128),
        text_length: int = 77,
        position_interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        reference_fp16_weights: bool = False,
        lr: float = 1e-5,
        lr_factor: float = 5.0,
        bias_lr_factor: float = 2.0,
        weight_decay: float = 4e-5,
        adam_eps: float = 1e-3,
        warmup_epochs: float = 5.0,
        warmup_factor: float = 0.1,
        gradient_checkpointing: bool = False,
        image_to_text: bool = False,
        nonfinite_check_interval: int = 10,
    ):
        super().__init__()
        config = method_config(method)
        method = {"name": config.name, **config.to_dict()}  # what save_hyperparameters records: plain values
        self.save_hyperparameters()
        from tipr.methods import spec_of_config

        encoder = {"image_size": tuple(image_size), "text_length": text_length,
                   "position_interpolation": position_interpolation, "reference_fp16_weights": reference_fp16_weights}
        model_class = spec_of_config(config).model_class
        if init_from:
            self.network = recipe.start_from_pretrained(init_from, model_class, num_classes, config, encoder)
        else:
            self.network = model_class.from_backbone(backbone, num_classes, config, **encoder)
        if gradient_checkpointing:
            clip, kwargs = self.network.clip, {"use_reentrant": False}
            if hasattr(clip, "activation_checkpointing_enable"):
                clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5
                clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.network.parameter_groups(lr, lr_factor, bias_lr_factor, weight_decay)  # names a prefix matching nothing
        if nonfinite_check_interval < 1:
            raise ValueError(f"model.nonfinite_check_interval must be >= 1 step, got {nonfinite_check_interval}")
        active = [name for name, weight in config.loss_weights.items() if weight > 0]
        self.nonfinite = NonFiniteWatch([*active, "loss", "grad_norm"])
        # "skip": a partial evaluation (limit_val_batches) leaves out queries whose person is not
        # in the gallery part seen, with a warning; a full evaluation has none.
        self.val_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self.test_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self._processor = None  # the TIPRProcessor, built on first use or read from a checkpoint
        self._schedule: tuple[int, float] | None = None  # (total steps, warm-up steps), set at on_train_start
        self._data_checked = False  # the data module's token tables and labels fit the network

    @property
    def method_name(self) -> str:
        """What tables and logs call the method (``SEN``, ``IRRA``)."""
        return self.network.config.display_name

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
        """The LR multiplier of optimiser step ``step`` (:func:`~tipr.training.recipe.warmup_cosine_factor`)."""
        hp = self.hparams
        if self._schedule is None:  # before on_train_start: only step 0 is asked for
            return hp.warmup_factor if hp.warmup_epochs > 0 else 1.0
        return recipe.warmup_cosine_factor(step, *self._schedule, hp.warmup_factor)

    def on_train_start(self) -> None:
        trainer = self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        if not math.isfinite(per_epoch) or per_epoch <= 0:
            per_epoch = total / max(1, trainer.max_epochs or 1)
        self._schedule = (total, self.hparams.warmup_epochs * per_epoch)

    def setup(self, stage: str) -> None:
        # The model's per-sample data needs (SEN's masking noise, IRRA's masked captions) are drawn in the loader.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and hasattr(datamodule, "sample_fields"):
            datamodule.sample_fields = self.network.sample_fields()

    def on_fit_start(self) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        self.network.gather_across_ranks = self.trainer.world_size > 1
        rank_zero_info(f"tipr: training {self.method_name} (model.method={self.network.method}), "
                       f"{sum(p.numel() for p in self.network.parameters()):,} parameters")
        self._data_checked = recipe.check_training_data(self.network, self.trainer.datamodule)
        precision = str(self.trainer.precision)
        if self.hparams.reference_fp16_weights and precision not in ("32-true", "32"):
            raise ValueError(f"model.reference_fp16_weights=true runs its own fp16 autocast over fp16 weights; "
                             f"expected trainer.precision=32-true, got {precision!r}")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size, trainer = batch["pixel_values"].shape[0], self.trainer
        if any(name not in batch for name in self.network.batch_fields):
            batch = self.draw_sample_fields(batch)
        inputs = {name: batch[name] for name in self.network.batch_fields}
        # Inputs were validated once at fit start (check_training_data): no host sync per step here.
        losses = self.network(**inputs, check_inputs=not self._data_checked)
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

    def draw_sample_fields(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with the method's per-sample fields drawn here, for a data module that does not
        draw them in its loader (``TIPRDataModule`` does). Each row's generator is seeded from
        (global step, rank, row), so a resumed run draws the same; under DDP the rows differ from a
        one-process run's (the loader's per-sample seeds do not)."""
        draw = self.network.sample_fields()
        missing = [name for name in self.network.batch_fields if name not in batch]
        rows = []
        if draw is not None:
            for i in range(batch["pixel_values"].shape[0]):
                sample = {k: v[i].cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
                seed = (self.global_step * 1_000_003 + self.global_rank) * 65_537 + i
                rows.append(draw(sample, torch.Generator().manual_seed(seed)))
        drawn = {k: torch.stack([row[k] for row in rows]).to(self.device) for k in (rows[0] if rows else {})}
        still = [name for name in missing if name not in drawn]
        if still:
            raise KeyError(f"the training batch lacks {still}, which {self.method_name} needs (its batch_fields "
                           f"{self.network.batch_fields}); batches hold {sorted(batch)}")
        return {**batch, **drawn}

    def on_before_optimizer_step(self, optimizer) -> None:
        if str(self.trainer.precision) == "16-mixed":
            return  # the grad scaler skips non-finite steps by design; the loss terms are still watched
        norm = recipe.gradient_norm(self.parameters())
        if norm is not None:
            self.nonfinite.update(norm[None], self.global_step, offset=len(self.nonfinite.names) - 1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.nonfinite_check_interval == 0:
            self.nonfinite.raise_if_tripped(newest_checkpoint(self.trainer))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The Adam parameter groups of the method's recipe (:meth:`tipr.model.TIPRModel.parameter_groups`)."""
        hp = self.hparams
        return self.network.parameter_groups(hp.lr, hp.lr_factor, hp.bias_lr_factor, hp.weight_decay)

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
        if "pixel_values" in batch:
            ranks.update_gallery(self.network.encode_image(batch["pixel_values"]).float(), batch["pids"], batch["index"])
        else:
            ranks.update_queries(self.network.encode_text(batch["input_ids"]).float(), batch["pids"], batch["index"])

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
        from tipr.model.config import config_dict

        if self.nonfinite.tripped_at is not None:  # never write weights a non-finite step may have touched
            self.nonfinite.raise_if_tripped(newest_checkpoint(self.trainer))
        # The backbone as its config (rebuilding never downloads or reads init_from), the model's config and the
        # tokenizer when it is not the shipped one: enough to rebuild model and processor without Lightning.
        if checkpoint.get("hyper_parameters") is not None:
            checkpoint["hyper_parameters"].update(backbone=self.network.clip.config.to_dict(), init_from=None)
        checkpoint[CHECKPOINT_CONFIG_KEY] = config_dict(self.network.encoder_config, self.network.config)
        checkpoint[CHECKPOINT_PROCESSOR_KEY] = {"tokenizer_files": self.processor.tokenizer_payload()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tipr.processing import TIPRProcessor

        files = (checkpoint.get(CHECKPOINT_PROCESSOR_KEY) or {}).get("tokenizer_files")
        if files:
            self._processor = TIPRProcessor.from_payload(files, self.network.image_size, self.network.text_length)

    def on_fit_end(self) -> None:
        # Only runs that keep something (a logger or a checkpoint callback) leave a pretrained folder.
        trainer = self.trainer
        if trainer.loggers or trainer.checkpoint_callbacks:
            folder = run_folder(trainer)  # a collective under DDP: every rank asks
            if trainer.is_global_zero:
                export_pretrained(trainer, self.network, self.processor, folder / "pretrained")
