"""``SENModel``: the SEN network and objective as plain PyTorch, shareable with ``from_pretrained``.

The shared CLIP dual encoder and ID classifier (:class:`tipr.model.TIPRModel`),
SEN's text-guided image restoration (TIR) head and its losses.
``forward(pixel_values, input_ids, pids, noise)`` gives the training losses as a
:class:`SENOutput`; ``encode_image`` / ``encode_text`` the global features retrieval uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from tipr.methods.sen.config import SENConfig
from tipr.methods.sen.restoration import (
    TextGuidedRestoration,
    num_visible_patches,
    patchify,
    random_patch_masking,
    to_grayscale,
    unpatchify,
)
from tipr.model.base import TIPRModel
from tipr.model.config import EncoderConfig
from tipr.model.losses import hardest_negative_triplet_loss, identity_loss, itc_loss, masked_patch_mse, sdm_loss


#: The caption of SEN's W&B panel of restorations (``val/tir``).
TIR_PANEL_CAPTION = "per row: masked grayscale input, restored (masked patches), colour target"


@dataclass
class SENOutput(ModelOutput):
    """The training losses of one batch: the weighted total and each computed term (unweighted).

    A term whose weight is 0 is ``None`` and absent from the dict view
    (``output.keys()``); ``output["loss"]`` and ``output.loss`` are the same tensor.
    """

    loss: torch.Tensor | None = None
    sdm: torch.Tensor | None = None
    id: torch.Tensor | None = None
    triplet: torch.Tensor | None = None
    itc: torch.Tensor | None = None
    restoration: torch.Tensor | None = None


class RestorationNoise:
    """SEN's per-sample data need: the TIR masking noise ``(N,)`` of one training sample,
    drawn in the loader from the sample's generator (the lowest-noise patches stay visible)."""

    def __init__(self, num_patches: int):
        self.num_patches = int(num_patches)

    def __call__(self, sample: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"noise": torch.rand(self.num_patches, generator=generator)}


class SENModel(TIPRModel):
    """CLIP dual encoder + ID classifier + TIR head + SEN's losses.

    Args:
        encoder: the dual encoder (:class:`~tipr.model.EncoderConfig`).
        config: SEN's settings (:class:`SENConfig`).
        clip: a ready ``transformers.CLIPModel`` (pretrained weights), else built from ``encoder.clip``.

    The TIR head always exists (it is SEN's head); ``restoration_weight=0`` skips its loss.
    With :attr:`gather_across_ranks` on, the batch-level losses (SDM, triplet, ITC) run over
    the features of all ranks, so ``W`` processes with ``B / W`` samples each train the
    same loss as one process with ``B``; ID and TIR are this rank's means.
    """

    config_class = SENConfig
    batch_fields = ("pixel_values", "input_ids", "pids", "noise")

    def __init__(self, encoder: EncoderConfig, config: SENConfig | None = None, clip=None):
        super().__init__(encoder, config if config is not None else SENConfig(), clip)
        config = self.config
        self.num_visible = num_visible_patches(self.embeddings.num_patches, config.mask_ratio)
        # Any mask_ratio in (0, 1) hides at least one patch (CLS counts in the kept length);
        # a high one can leave none visible.
        grid, n = self.embeddings.grid_size, self.embeddings.num_patches
        if self.num_visible < 1:
            raise ValueError(
                f"mask_ratio {config.mask_ratio} leaves no visible patch of the {grid} grid ({n} patches: "
                f"int(({n} + 1) * (1 - mask_ratio)) - 1 = 0 are kept); expected a lower mask_ratio"
            )
        self.restoration = TextGuidedRestoration(
            self.embed_dim,
            self.embeddings.patch_size,
            self.embeddings.grid_size,
            depth=config.restoration_depth,
            num_heads=config.restoration_heads,
            residual=config.restoration_residual,
            text_padding_mask=config.restoration_text_padding_mask,
        )
        self.finish_init()

    # -------------------------------------------------------------------- TIR
    def restore(
        self,
        pixel_values: torch.Tensor,
        text_tokens: torch.Tensor,
        eot: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run text-guided restoration: grayscale, mask, encode the visible patches, decode.

        Args:
            pixel_values: ``(B, 3, H, W)`` colour input (normalised as for the model).
            text_tokens: ``(B, L, D)`` caption token features; eot: ``(B,)`` end positions.
            noise: ``(B, N)`` masking noise (fresh uniform noise when None); the
                lowest-noise patches stay visible.

        Returns:
            dict with ``prediction`` and ``target`` ``(B, N, p*p*3)`` and ``mask`` ``(B, N)``.
        """
        self.embeddings.check_pixels(pixel_values)
        b, n = pixel_values.shape[0], self.embeddings.num_patches
        if noise is None:
            noise = torch.rand(b, n, device=pixel_values.device)
        if noise.shape != (b, n):
            raise ValueError(f"noise must have shape (B, N) = {(b, n)}, got {tuple(noise.shape)}")
        ids_keep, ids_restore, mask = random_patch_masking(noise.to(pixel_values.device), self.num_visible)
        visible = self.image_tokens(to_grayscale(pixel_values), ids_keep)  # (B, 1 + K, D)
        positions = torch.arange(text_tokens.shape[1], device=eot.device)
        padding = positions[None, :] > eot[:, None]  # (B, L), True after end-of-text
        prediction = self.restoration(visible, ids_restore, text_tokens, padding)
        target = patchify(pixel_values, self.embeddings.patch_size)
        return {"prediction": prediction, "target": target, "mask": mask}

    # ----------------------------------------------------------------- losses
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        pids: torch.Tensor,
        noise: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> SENOutput:
        """Training losses for a batch of paired images and captions.

        Args:
            pixel_values: ``(B, 3, H, W)``; input_ids: ``(B, L)`` zero-padded CLIP ids;
            pids: ``(B,)`` identity labels ``0 .. num_classes - 1``.
            noise: ``(B, N)`` TIR masking noise (see :meth:`restore`); fresh when None.
            check_inputs: validate the token ids and identity labels (a host sync); a
                trainer whose data were validated once turns it off for speed.

        Returns:
            :class:`SENOutput`: ``loss`` (the weighted sum) and the unweighted value of each
            loss with weight > 0.
        """
        with self.precision_context(pixel_values.device):
            return self._losses(pixel_values, input_ids, pids, noise, check_inputs)

    def _losses(self, pixel_values, input_ids, pids, noise, check_inputs) -> SENOutput:
        self.check_batch(pixel_values, input_ids, pids, check_inputs)
        w, config = self.config.loss_weights, self.config
        image_features = self.encode_image(pixel_values).float()  # (B, D)
        text_tokens, eot = self.text_tokens(input_ids, check=check_inputs)  # (B, L, D), (B,)
        text_features = self.pooled(text_tokens, eot).float()  # (B, D)

        losses: dict[str, torch.Tensor] = {}
        if w["sdm"] > 0 or w["triplet"] > 0 or w["itc"] > 0:  # batch-level: over every rank's samples
            all_images, all_texts = self.gather(image_features, text_features)
            (all_pids,) = self.gather(pids, grad=False)
        if w["sdm"] > 0:
            losses["sdm"] = sdm_loss(all_images, all_texts, all_pids, config.temperature)
        if w["id"] > 0:
            losses["id"] = identity_loss(self.classifier(image_features), self.classifier(text_features), pids)
        if w["triplet"] > 0:
            losses["triplet"] = hardest_negative_triplet_loss(all_images, all_texts, all_pids, config.margin)
        if w["itc"] > 0:
            losses["itc"] = itc_loss(all_images, all_texts, config.temperature)
        if w["restoration"] > 0:
            restored = self.restore(pixel_values, text_tokens, eot, noise)
            losses["restoration"] = masked_patch_mse(restored["prediction"], restored["target"], restored["mask"])
        return SENOutput(loss=self.weighted_total(losses), **losses)

    # --------------------------------------------------------------- training
    def sample_fields(self) -> RestorationNoise:
        """Each training sample's TIR masking noise, drawn in the loader from its seed."""
        return RestorationNoise(self.embeddings.num_patches)

    @torch.no_grad()
    def image_panels(self, pixel_values, input_ids, generator):
        """``{"tir": ...}``: per image the masked grayscale input, its restoration (masked patches,
        visible ones pasted back as MAE papers show them) and the colour target."""
        noise = torch.rand(pixel_values.shape[0], self.embeddings.num_patches, generator=generator)
        with self.precision_context(pixel_values.device):
            text_tokens, eot = self.text_tokens(input_ids)
            out = self.restore(pixel_values, text_tokens, eot, noise=noise.to(pixel_values.device))
        p, grid = self.embeddings.patch_size, self.embeddings.grid_size
        masked = out["mask"][..., None].bool()  # (B, N, 1), True where hidden
        gray = patchify(to_grayscale(pixel_values), p)
        seen = unpatchify(torch.where(masked, torch.full_like(gray, -2.0), gray), p, grid)
        restored = unpatchify(torch.where(masked, out["prediction"].float(), out["target"]), p, grid)
        rows = [[seen[i], restored[i], pixel_values[i]] for i in range(pixel_values.shape[0])]
        return {"tir": (rows, ["input", "restored", "target"], TIR_PANEL_CAPTION)}
