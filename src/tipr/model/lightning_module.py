"""``TIPRModule``: the thin LightningModule around :class:`tipr.model.SENNetwork`.

It owns what training needs and the network does not: the optimiser and its
parameter groups, the warm-up + cosine schedule, logging, and the retrieval
metrics. Every constructor argument is a flat value, so LightningCLI exposes it
as ``--model.<name>`` (``--model.mask_ratio=0.6``, ``--model.tir_weight=5``).

Notebook use::

    module = TIPRModule.load_from_checkpoint("best.ckpt")   # no data, no download
    text = module.encode_captions(["a woman in a white blouse and blue jeans"])
    images = module.encode_images(pixels)                   # (N, 3, H, W), normalised
    scores = module.similarity(text, images)                # (1, N) cosine
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from tipr.model.backbone import BACKBONE_PRESETS
from tipr.model.network import LOSS_NAMES, SENNetwork
from tipr.model.nonfinite import NonFiniteWatch

#: Modules trained at ``lr * lr_factor`` in the reference: the ID classifier and
#: the TIR cross-attention and transformer (prefixes of ``SENNetwork`` parameter names).
REFERENCE_BOOSTED_MODULES = ("classifier", "restoration.cross_attn", "restoration.transformer")
#: Boosted modules whose biases also take ``lr * lr_factor`` (no weight decay) in the reference:
#: its classifier rule runs after its bias rule, the cross-modal rule before it.
REFERENCE_BOOSTED_BIAS_MODULES = ("classifier",)


def noise_seed(seed: int, epoch: int, batch_idx: int) -> int:
    """The seed of the TIR masking noise of one training batch: a function of (seed, epoch, batch) only."""
    return (int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(batch_idx) & 0x7FFF_FFFF_FFFF_FFFF


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: float, warmup_factor: float) -> float:
    """LR multiplier: linear warm-up from ``warmup_factor`` to 1, then cosine decay to 0.

    ``f = warmup_factor (1 - s/w) + s/w`` for ``s < w``, else
    ``f = 0.5 (1 + cos(pi (s - w) / (T - w)))``: the reference's per-epoch curve,
    stepped per iteration (``s`` in optimiser steps, ``w`` warm-up steps, ``T`` total).
    """
    if step < warmup_steps:
        t = step / warmup_steps
        return warmup_factor * (1 - t) + t
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TIPRModule(pl.LightningModule):
    """SEN training, evaluation and inference.

    Args:
        num_classes: training identities (linked from the data module by the CLI).
        backbone: a preset name (``"tiny"``: small random CLIP), a local CLIP
            checkpoint folder or a hub id (pretrained; the paper uses
            ``openai/clip-vit-base-patch16`` and ``openai/clip-vit-large-patch14``),
            or a dict of ``transformers.CLIPConfig`` arguments (random weights).
            Saved checkpoints store the backbone as its full config, so
            ``load_from_checkpoint`` never needs the original weights or network.
        image_size: input ``(H, W)`` (linked from the data module).
        text_length: token positions per caption (linked from the data module).
        sdm_weight, id_weight, tri_weight, tir_weight, itc_weight: loss weights
            (reference 1, 1, 10, 10, 0); 0 turns a loss off.
        temperature: tau of SDM/ITC. margin: triplet margin.
        mask_ratio: share of patches hidden in TIR (reference 0.7).
        tir_depth: transformer blocks of the TIR decoder. tir_residual: add the
            cross-attention output to the decoder tokens (reference: replace).
        tir_text_padding_mask: TIR ignores the caption positions after the
            end-of-text token. A departure from the reference, which attends to
            all of them (off in ``experiments/sen_*.yaml``).
        position_interpolation: resizing of the pretrained position table to the
            image grid: ``"bilinear"`` (the reference) or ``"bicubic"`` (a departure).
        reference_fp16_weights: the reference's precision: linear, convolution and
            attention weights in fp16 (norms and embeddings fp32), hence fp16 Adam
            state, run under fp16 autocast without loss scaling. Needs
            ``trainer.precision=32-true`` (the module runs its own autocast). Off
            (tipr's default, with ``bf16-mixed``): fp32 weights and optimiser state.
        lr: base learning rate (CLIP weights). lr_factor: multiplier for
            ``boosted_modules``. bias_lr_factor: multiplier for every bias, which
            also gets no weight decay. weight_decay: for everything else.
        boosted_modules: ``SENNetwork`` parameter-name prefixes trained at
            ``lr * lr_factor`` (reference: ID classifier, TIR cross-attention, TIR transformer).
        boosted_bias_modules: prefixes whose biases take ``lr * lr_factor`` (no
            weight decay) instead of ``lr * bias_lr_factor``. Reference:
            ``["classifier"]`` (its classifier rule runs after its bias rule);
            ``[]`` gives every bias the bias rate, a departure.
        adam_eps: Adam epsilon (reference 1e-3; betas 0.9, 0.999).
        warmup_epochs, warmup_factor: linear warm-up length and start factor; the
            cosine decay ends at ``trainer.max_epochs`` (or ``max_steps``).
        gradient_checkpointing: recompute encoder activations in backward (saves memory).
        image_to_text: also compute image-to-text retrieval metrics (``i2t_*``).
        nonfinite_check_interval: every this many steps (and before writing any
            checkpoint) the run checks, in one host sync, whether a loss term or
            the gradient norm was NaN or infinite since the last check, and stops
            with an error naming the step, the terms and the last checkpoint.
        seed: seed of the TIR masking noise; batch ``i`` of epoch ``e`` draws its
            noise from ``(seed, e, i)`` for the whole global batch (each rank takes
            its rows), so runs are reproducible, resumable and independent of the
            number of processes.

    Under DDP the data module's batch is the global batch, split across ranks;
    the network computes the batch-level losses over all ranks' features (see
    :mod:`tipr.model.distributed`), so ``N`` processes train the recipe of one.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | dict[str, Any] = "openai/clip-vit-base-patch16",
        image_size: tuple[int, int] = (384, 128),
        text_length: int = 77,
        sdm_weight: float = 1.0,
        id_weight: float = 1.0,
        tri_weight: float = 10.0,
        tir_weight: float = 10.0,
        itc_weight: float = 0.0,
        temperature: float = 0.02,
        margin: float = 0.05,
        mask_ratio: float = 0.7,
        tir_depth: int = 4,
        tir_residual: bool = False,
        tir_text_padding_mask: bool = False,
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

        self.network = SENNetwork(
            backbone,
            num_classes=num_classes,
            image_size=tuple(image_size),
            text_length=text_length,
            loss_weights={
                "sdm": sdm_weight, "id": id_weight, "tri": tri_weight, "tir": tir_weight, "itc": itc_weight,
            },
            temperature=temperature,
            margin=margin,
            mask_ratio=mask_ratio,
            tir_depth=tir_depth,
            tir_residual=tir_residual,
            tir_text_padding_mask=tir_text_padding_mask,
            position_interpolation=position_interpolation,
            reference_fp16_weights=reference_fp16_weights,
        )
        if gradient_checkpointing:
            clip = self.network.clip
            kwargs = {"use_reentrant": False}
            if hasattr(clip, "activation_checkpointing_enable"):
                clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5
                clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.boosted_modules = self._check_boosted(boosted_modules)
        self.boosted_bias_modules = self._check_boosted(boosted_bias_modules)
        self._noise_generator: torch.Generator | None = None
        self._schedule: tuple[int, float] | None = None  # (total steps, warm-up steps), set at on_train_start
        self._data_checked = False  # the data module's token tables and labels fit the network
        if nonfinite_check_interval < 1:
            raise ValueError(f"nonfinite_check_interval must be >= 1 step, got {nonfinite_check_interval}")
        active = [name for name in LOSS_NAMES if self.network.loss_weights[name] > 0]
        self.nonfinite = NonFiniteWatch([*active, "loss", "grad_norm"])
        # "skip": a partial evaluation (limit_val_batches) leaves out queries whose person is not
        # in the gallery part seen, with a warning; a full evaluation has none.
        self.val_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self.test_ranks = RetrievalRanks(image_to_text=image_to_text, empty_target_action="skip")
        self._tokenizer = None

    @staticmethod
    def _matches(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def _check_boosted(self, prefixes: Sequence[str]) -> tuple[str, ...]:
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        names = [name for name, _ in self.network.named_parameters()]
        disabled = {"classifier": self.network.classifier is None, "restoration": self.network.restoration is None}
        for prefix in prefixes:
            if any(n == prefix or n.startswith(prefix + ".") for n in names):
                continue
            if disabled.get(prefix.split(".")[0]):
                continue  # a head whose loss is off
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"boosted module {prefix!r} matches no parameter of the network; expected a prefix of "
                f"parameter names such as {REFERENCE_BOOSTED_MODULES} (top-level modules: {tops})"
            )
        return tuple(prefixes)

    # ------------------------------------------------------------ training
    def lr_factor(self, step: int) -> float:
        """The LR multiplier of optimiser step ``step`` (:func:`warmup_cosine_factor` over the run's steps)."""
        hp = self.hparams
        if self._schedule is None:  # before on_train_start: only step 0 is asked for
            return hp.warmup_factor if hp.warmup_epochs > 0 else 1.0
        total, warmup = self._schedule
        return warmup_cosine_factor(step, total, warmup, hp.warmup_factor)

    def on_train_start(self) -> None:
        trainer = self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        if not math.isfinite(per_epoch) or per_epoch <= 0:
            per_epoch = total / max(1, trainer.max_epochs or 1)
        self._schedule = (total, self.hparams.warmup_epochs * per_epoch)

    def check_training_data(self, datamodule) -> bool:
        """Validate a :class:`~tipr.data.TIPRDataModule`'s caption token tables and training labels once.

        Every token table must fit the text encoder (ids inside its vocabulary, an
        end-of-text token per caption) and the labels the ID classifier, which
        lets the training steps skip the per-batch checks (host syncs). Returns
        False for other data modules, whose batches stay checked per step.
        """
        tables = getattr(datamodule, "caption_tokens", None)
        train_set = getattr(datamodule, "train_set", None)
        if not callable(tables) or train_set is None:
            return False
        for split, entry in tables().items():
            for kind, token_ids in entry.items():
                try:
                    self.network.check_token_ids(token_ids)
                except ValueError as e:
                    raise ValueError(
                        f"{getattr(datamodule, 'dataset', 'the data')} {split} captions ({kind}) do not fit "
                        f"model.backbone's text encoder: {e}; expected the backbone's own tokenizer (data.tokenizer)"
                    ) from e
        classes = self.network.classifier.out_features if self.network.classifier is not None else None
        if classes is not None and len(train_set.labels) and int(train_set.labels.max()) >= classes:
            raise ValueError(f"training labels reach {int(train_set.labels.max())} but model.num_classes={classes}")
        return True

    def on_fit_start(self) -> None:
        self._data_checked = self.check_training_data(self.trainer.datamodule)
        precision = str(self.trainer.precision)
        if self.hparams.reference_fp16_weights and precision not in ("32-true", "32"):
            raise ValueError(
                f"model.reference_fp16_weights=true runs its own fp16 autocast over fp16 weights; "
                f"expected trainer.precision=32-true, got {precision!r}"
            )

    def tir_noise(
        self, batch_size: int, epoch: int, batch_idx: int, world_size: int = 1, rank: int = 0
    ) -> torch.Tensor | None:
        """Rank ``rank``'s rows ``(batch_size, N)`` of the global batch's TIR masking noise (None without TIR).

        The noise of the whole global batch (``world_size * batch_size`` rows) is drawn
        from :func:`noise_seed` ``(seed, epoch, batch_idx)``, so it does not depend on
        the number of processes.
        """
        if self.network.restoration is None:
            return None
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
        self._noise_generator.manual_seed(noise_seed(self.hparams.seed, epoch, batch_idx))
        num_patches = self.network.embeddings.num_patches
        noise = torch.rand(world_size * batch_size, num_patches, generator=self._noise_generator, device=self.device)
        return noise[rank * batch_size : (rank + 1) * batch_size]  # (B / W, N)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size = batch["images"].shape[0]
        trainer = self.trainer
        noise = self.tir_noise(batch_size, self.current_epoch, batch_idx, trainer.world_size, trainer.global_rank)
        # Inputs were validated once at fit start (check_training_data): no host sync per step here.
        losses = self.network(batch["images"], batch["token_ids"], batch["pids"], noise=noise,
                              check_inputs=not self._data_checked)
        # Logged: the global batch's losses. The batch-level terms are equal on every rank;
        # the per-sample ones are rank means, averaged here in one collective (no host sync).
        names = self.nonfinite.names[:-1]  # the loss terms and the total
        values = torch.stack([losses[name].detach().float() for name in names])
        if self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        self.nonfinite.update(values, self.global_step)  # a NaN on any rank reaches every rank's mean
        logged = dict(zip(names, values))
        self.log("train/loss", logged.pop("loss"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}_loss": value for name, value in logged.items()}, batch_size=batch_size)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        if str(self.trainer.precision) == "16-mixed":
            return  # the grad scaler skips non-finite steps by design; the loss terms are still watched
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused pass
            if total_norm is not None:
                norm = total_norm(grads).float()
            else:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.nonfinite.update(norm[None], self.global_step, offset=len(self.nonfinite.names) - 1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.nonfinite_check_interval == 0:
            self.nonfinite.raise_if_tripped(self._last_checkpoint())

    def _last_checkpoint(self) -> str | None:
        """The newest checkpoint file this run wrote (``last.ckpt`` or the best one), if any."""
        from tipr.checkpointing import LastCheckpoint

        paths = [c.path for c in self.trainer.callbacks if isinstance(c, LastCheckpoint)] + [
            getattr(c, attr, None) for c in self.trainer.checkpoint_callbacks for attr in ("last_model_path", "best_model_path")
        ]
        existing = [Path(p) for p in paths if p and Path(p).is_file()]
        return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Adam groups: base (lr, wd), boosted (lr * lr_factor, wd), bias (lr * bias_lr_factor, no wd),
        boosted_bias (lr * lr_factor, no wd: the biases of ``boosted_bias_modules``)."""
        hp = self.hparams
        groups: dict[str, dict[str, Any]] = {
            "base": {"params": [], "lr": hp.lr, "weight_decay": hp.weight_decay},
            "boosted": {"params": [], "lr": hp.lr * hp.lr_factor, "weight_decay": hp.weight_decay},
            "bias": {"params": [], "lr": hp.lr * hp.bias_lr_factor, "weight_decay": 0.0},
            "boosted_bias": {"params": [], "lr": hp.lr * hp.lr_factor, "weight_decay": 0.0},
        }
        for name, param in self.network.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("bias"):
                key = "boosted_bias" if self._matches(name, self.boosted_bias_modules) else "bias"
            elif self._matches(name, self.boosted_modules):
                key = "boosted"
            else:
                key = "base"
            groups[key]["params"].append(param)
        return [{"name": key, **group} for key, group in groups.items() if group["params"]]

    def configure_optimizers(self):
        hp = self.hparams
        # The fused kernel updates all tensors at once: on CPU about 9x faster than
        # the per-tensor loop, which matters for CLIP's 49408-row token table.
        devices = {p.device.type for p in self.network.parameters()}
        fused = devices <= {"cpu", "cuda"}
        optimizer = torch.optim.Adam(
            self.parameter_groups(), betas=(0.9, 0.999), eps=hp.adam_eps, fused=fused or None
        )
        # The curve's length is read when training starts (on_train_start), not here: asking the trainer
        # for its step count now would set up the training loader before a resumed run's loop state
        # (and the loader's position) is restored.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------- evaluation
    def _evaluate(self, ranks, batch: dict[str, torch.Tensor]) -> None:
        if "images" in batch:
            ranks.update_gallery(self.network.encode_image(batch["images"]).float(), batch["pids"], batch["index"])
        elif "token_ids" in batch:
            ranks.update_queries(self.network.encode_text(batch["token_ids"]).float(), batch["pids"], batch["index"])
        else:
            raise KeyError(f"evaluation batch has neither 'images' nor 'token_ids' (keys: {sorted(batch)})")

    def _log_ranks(self, ranks, stage: str) -> None:
        if self.trainer.sanity_checking:  # a few batches of each loader: ranks would mean nothing
            ranks.reset()
            return
        results = ranks.compute()
        self.log_dict({f"{stage}/{name}": value for name, value in results.items()})
        ranks.reset()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.val_ranks, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_ranks(self.val_ranks, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.test_ranks, batch)

    def on_test_epoch_end(self) -> None:
        self._log_ranks(self.test_ranks, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Global features of an image batch (``image_features``) or a caption batch (``text_features``)."""
        out = {key: batch[key] for key in ("pids", "index") if key in batch}
        if "images" in batch:
            out["image_features"] = self.network.encode_image(batch["images"]).float()
        else:
            out["text_features"] = self.network.encode_text(batch["token_ids"]).float()
        return out

    # ---------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write weights that a non-finite step may have touched.
        if self.nonfinite.tripped_at is not None:
            self.nonfinite.raise_if_tripped(self._last_checkpoint())
        # Store the backbone as its config: rebuilding never downloads or needs the original weights.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams["backbone"] = self.network.clip.config.to_dict()

    @classmethod
    def from_reference_checkpoint(cls, path: str | Path, **kwargs: Any) -> TIPRModule:
        """A module from an IRRA/SEN checkpoint or OpenAI CLIP weights (see :mod:`tipr.convert`).

        ``kwargs`` go to :func:`tipr.convert.load_reference_checkpoint` (``image_size``,
        ``text_length``, ``num_classes`` and any constructor argument). The
        :class:`tipr.convert.ConversionReport` (heads left freshly initialised,
        source keys not used) is kept as ``module.conversion_report``.
        """
        from tipr.convert import load_reference_checkpoint

        module, report = load_reference_checkpoint(path, module_class=cls, **kwargs)
        module.conversion_report = report
        return module

    # ------------------------------------------------------- notebook API
    @property
    def tokenizer(self):
        """The CLIP tokenizer (the backbone folder's own if it has one, else the shipped one)."""
        if self._tokenizer is None:
            from tipr.tokenization import load_tokenizer

            backbone = self.hparams.backbone
            self._tokenizer = load_tokenizer(
                backbone if isinstance(backbone, str) and backbone not in BACKBONE_PRESETS else None
            )
        return self._tokenizer

    @torch.inference_mode()
    def encode_captions(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features ``(N, D)`` of raw captions (tokenized like the training data)."""
        from tipr.tokenization import tokenize

        if len(captions) == 0:
            return torch.zeros(0, self.network.embed_dim, device=self.device)
        was_training = self.training
        self.eval()
        try:
            token_ids = tokenize(captions, self.tokenizer, context_length=self.hparams.text_length)
            chunks = [
                self.network.encode_text(chunk.to(self.device)).float()
                for chunk in token_ids.split(batch_size)
            ]
        finally:
            self.train(was_training)
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image features ``(N, D)`` of ``(N, 3, H, W)`` images, normalised as for evaluation."""
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.network.encode_image(chunk.to(self.device)).float() for chunk in images.split(batch_size)
            ]
        finally:
            self.train(was_training)
        return F.normalize(torch.cat(chunks), dim=-1)

    def similarity(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(Nq, Ng)`` of captions (rows) against images (columns)."""
        return self.network.similarity(text_features, image_features)
