"""``SENModel``: the SEN network as plain PyTorch, shareable with ``from_pretrained``.

A Hugging Face CLIP dual encoder, the ID classifier, the text-guided image
restoration (TIR) head and the losses. ``encode_image`` / ``encode_text`` give
the global features retrieval uses; ``forward(images, token_ids, pids)`` gives
the training losses as a :class:`SENOutput`.

``save_pretrained(folder)`` writes ``config.json`` (:class:`SENConfig`) and
``model.safetensors``; ``from_pretrained(folder or hub id)`` reads them back
(strictly: a missing or unexpected weight is an error naming it);
``push_to_hub`` uploads them (``huggingface_hub``'s ``PyTorchModelHubMixin``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers.utils import ModelOutput

from tipr.model.backbone import build_clip, eot_token_id, set_image_size
from tipr.model.config import SENConfig
from tipr.model.distributed import all_gather_no_grad, all_gather_with_grad
from tipr.model.hub import CONFIG_FILE, WEIGHTS_FILE, load_weights, pretrained_files
from tipr.model.losses import (
    hardest_negative_triplet_loss,
    identity_classifier,
    identity_loss,
    itc_loss,
    masked_patch_mse,
    sdm_loss,
)
from tipr.model.restoration import (
    TextGuidedRestoration,
    num_visible_patches,
    patchify,
    random_patch_masking,
    to_grayscale,
)


@dataclass
class SENOutput(ModelOutput):
    """The training losses of one batch: the weighted total and each active term (unweighted).

    A term whose weight is 0 is ``None`` and absent from the dict view
    (``output.keys()``); ``output["loss"]`` and ``output.loss`` are the same tensor.
    """

    loss: torch.Tensor | None = None
    sdm: torch.Tensor | None = None
    id: torch.Tensor | None = None
    triplet: torch.Tensor | None = None
    itc: torch.Tensor | None = None
    restoration: torch.Tensor | None = None


class SENModel(nn.Module, PyTorchModelHubMixin, library_name="tipr", tags=["text-to-image-person-retrieval"]):
    """CLIP dual encoder + TIR head + losses (SEN).

    Args:
        config: the network's shape and loss settings (:class:`SENConfig`).
        clip: a ready ``transformers.CLIPModel`` whose config is ``config.clip``
            (pretrained weights); built from ``config.clip`` with random weights
            when None. :meth:`from_backbone` builds one from a preset, a folder or
            a hub id.

    ``config.reference_fp16_weights`` stores the weights of every linear,
    convolution and attention projection in fp16 (layer norms, embeddings and the
    TIR mask token stay fp32) and runs under fp16 autocast, as the reference's
    ``convert_weights``; the optimiser's state is then fp16 too.

    Under ``torch.distributed`` with ``W`` processes, :meth:`forward` computes the
    batch-level losses (SDM, triplet, ITC) over the features of all ranks
    (:mod:`tipr.model.distributed`), so ``W`` processes with ``B / W`` samples
    each train the same loss as one process with ``B``.
    """

    def __init__(self, config: SENConfig, clip: nn.Module | None = None):
        super().__init__()
        self.clip = build_clip(config.clip, config.text_length) if clip is None else clip
        self.config = replace(config, clip=self.clip.config.to_dict())
        self.loss_weights = dict(config.loss_weights)
        self.image_size = config.image_size
        self.text_length = int(config.text_length)
        context = self.clip.config.text_config.max_position_embeddings
        if not 1 < self.text_length <= context:
            raise ValueError(f"text_length must be in 2..{context} (the text encoder's context), got {self.text_length}")
        set_image_size(self.clip, self.image_size, interpolation=config.position_interpolation)
        self.eot_token_id = eot_token_id(self.clip.config)
        self.vocab_size = self.clip.config.text_config.vocab_size
        self.embed_dim = self.clip.config.projection_dim
        self.temperature = config.temperature
        self.margin = config.margin
        self.mask_ratio = config.mask_ratio

        self.classifier = None
        if self.loss_weights["id"] > 0:
            self.classifier = identity_classifier(self.embed_dim, config.num_classes)
        self.restoration = None
        if self.loss_weights["restoration"] > 0:
            self.num_visible = num_visible_patches(self.embeddings.num_patches, self.mask_ratio)
            # Any mask_ratio in (0, 1) hides at least one patch (CLS counts in the kept length);
            # a high one can leave none visible.
            grid, n = self.embeddings.grid_size, self.embeddings.num_patches
            if self.num_visible < 1:
                raise ValueError(
                    f"mask_ratio {self.mask_ratio} leaves no visible patch of the {grid} grid ({n} patches: "
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
        self.reference_fp16_weights = bool(config.reference_fp16_weights)
        if self.reference_fp16_weights:
            cast_to_reference_fp16(self)
        self.train()  # CLIPModel.from_pretrained returns the backbone in eval mode

    @classmethod
    def from_backbone(cls, backbone: str | Mapping[str, Any] | nn.Module, num_classes: int, **settings: Any) -> SENModel:
        """A network around a CLIP backbone: a preset name (``"tiny"``), a dict of ``CLIPConfig``
        arguments (random weights), a local CLIP folder or a hub id (pretrained weights, see
        :func:`tipr.model.backbone.build_clip`), or a ready ``CLIPModel``.

        ``settings`` are the other :class:`SENConfig` fields (``image_size``, ``loss_weights``, ...).
        """
        text_length = int(settings.get("text_length", 77))
        clip = backbone if isinstance(backbone, nn.Module) else build_clip(backbone, text_length)
        return cls(SENConfig(clip=clip.config.to_dict(), num_classes=num_classes, **settings), clip=clip)

    # ------------------------------------------------------------ pretrained
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        self.config.save(save_directory / CONFIG_FILE)
        save_model(self, str(save_directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
    ) -> SENModel:
        """The model a :meth:`save_pretrained` (or ``tipr fit`` / ``tipr convert``) wrote.

        Args:
            pretrained_model_name_or_path: a local folder (never touches the network)
                or a Hugging Face hub id (downloaded to the hub cache).
            revision, cache_dir, local_files_only, token: for hub ids, as in ``huggingface_hub``.
            map_location: device of the returned weights.

        Every weight of the file must match the network built from its config (names
        and shapes); the model is returned in eval mode.
        """
        files = pretrained_files(
            pretrained_model_name_or_path, (CONFIG_FILE, WEIGHTS_FILE), revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        )
        model = cls(SENConfig.load(files[CONFIG_FILE]))
        load_weights(model, files[WEIGHTS_FILE], map_location)
        return model.eval()

    def precision_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """fp16 autocast with ``reference_fp16_weights`` (the fp16 weights meet fp32 norms), else nothing."""
        if self.reference_fp16_weights:
            return torch.autocast(device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    @property
    def embeddings(self):
        """The vision embeddings (:class:`tipr.model.backbone.GridVisionEmbeddings`) inside ``clip``."""
        return self.clip.vision_model.embeddings

    # ------------------------------------------------------------------ inputs
    def check_token_ids(self, token_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem if ``token_ids`` cannot be encoded."""
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token_ids must be an integer (B, L) tensor, got {token_ids.dtype} {tuple(token_ids.shape)}"
            )
        if token_ids.shape[1] > self.text_length:
            raise ValueError(
                f"token_ids have {token_ids.shape[1]} positions, more than the text context ({self.text_length})"
            )
        # One host sync for both checks.
        has_eot = (token_ids == self.eot_token_id).any(dim=1)
        bad = torch.stack([~has_eot.all(), (token_ids.min() < 0) | (token_ids.max() >= self.vocab_size)]).tolist()
        if bad[0]:
            row = int((~has_eot).nonzero()[0])
            raise ValueError(f"token_ids row {row} has no end-of-text token (id {self.eot_token_id})")
        if bad[1]:
            raise ValueError(
                f"token_ids hold ids outside 0..{self.vocab_size - 1}: min {int(token_ids.min())}, "
                f"max {int(token_ids.max())}"
            )

    # ---------------------------------------------------------------- encoders
    def image_tokens(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token features ``(B, 1 + K, D)``: CLS + patches after post-norm and projection.

        ``ids_keep`` ``(B, K)`` runs the encoder on those patches only (K = N when None).
        """
        vision = self.clip.vision_model
        x = self.embeddings(images)  # (B, 1 + N, W), positions added
        if ids_keep is not None:
            width = x.shape[-1]
            kept = torch.gather(x[:, 1:], 1, ids_keep[..., None].expand(-1, -1, width))  # (B, K, W)
            x = torch.cat([x[:, :1], kept], dim=1)  # (B, 1 + K, W)
        x = vision.pre_layrnorm(x)
        x = vision.encoder(inputs_embeds=x).last_hidden_state
        return self.clip.visual_projection(vision.post_layernorm(x))  # (B, 1 + K, D)

    def text_tokens(self, token_ids: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features ``(B, L, D)`` (final norm + projection) and the end-of-text position ``(B,)``.

        ``check``: validate ``token_ids`` first (:meth:`check_token_ids`, one host sync).
        """
        if check:
            self.check_token_ids(token_ids)
        hidden = self.clip.text_model(input_ids=token_ids).last_hidden_state  # (B, L, W), final-normed
        eot = (token_ids == self.eot_token_id).int().argmax(dim=1)  # first end-of-text token
        return self.clip.text_projection(hidden), eot

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image features ``(B, D)``: the CLS output after post-norm and projection."""
        with self.precision_context(images.device):
            return self.image_tokens(images)[:, 0]

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Global text features ``(B, D)``: the first end-of-text output after final norm and projection."""
        with self.precision_context(token_ids.device):
            tokens, eot = self.text_tokens(token_ids)
            return tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]

    # -------------------------------------------------------------------- TIR
    def restore(
        self,
        images: torch.Tensor,
        text_tokens: torch.Tensor,
        eot: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run text-guided restoration: grayscale, mask, encode the visible patches, decode.

        Args:
            images: ``(B, 3, H, W)`` colour input (normalised as for the model).
            text_tokens: ``(B, L, D)`` caption token features; eot: ``(B,)`` end positions.
            noise: ``(B, N)`` masking noise (fresh uniform noise when None); the
                lowest-noise patches stay visible.

        Returns:
            dict with ``prediction`` and ``target`` ``(B, N, p*p*3)`` and ``mask`` ``(B, N)``.
        """
        if self.restoration is None:
            raise RuntimeError("this network was built without the TIR head (restoration weight 0)")
        self.embeddings.check_pixels(images)
        b, n = images.shape[0], self.embeddings.num_patches
        if noise is None:
            noise = torch.rand(b, n, device=images.device)
        ids_keep, ids_restore, mask = random_patch_masking(noise, self.num_visible)
        visible = self.image_tokens(to_grayscale(images), ids_keep)  # (B, 1 + K, D)
        positions = torch.arange(text_tokens.shape[1], device=eot.device)
        padding = positions[None, :] > eot[:, None]  # (B, L), True after end-of-text
        prediction = self.restoration(visible, ids_restore, text_tokens, padding)
        target = patchify(images, self.embeddings.patch_size)
        return {"prediction": prediction, "target": target, "mask": mask}

    # ----------------------------------------------------------------- losses
    def forward(
        self,
        images: torch.Tensor,
        token_ids: torch.Tensor,
        pids: torch.Tensor,
        noise: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> SENOutput:
        """Training losses for a batch of paired images and captions.

        Args:
            images: ``(B, 3, H, W)``; token_ids: ``(B, L)`` zero-padded CLIP ids;
            pids: ``(B,)`` identity labels ``0 .. num_classes - 1``.
            noise: ``(B, N)`` TIR masking noise (see :meth:`restore`); fresh when None.
            check_inputs: validate the token ids and identity labels (a host sync); a
                trainer whose data were validated once turns it off for speed.

        Under ``torch.distributed`` the batch-level losses (``sdm``, ``triplet``, ``itc``)
        are computed over the gathered global batch (equal on every rank) and the
        per-sample ones (``id``, ``restoration``) are this rank's means; DDP's gradient
        average then gives the one-process gradient of the global batch.

        Returns:
            :class:`SENOutput`: ``loss`` (the weighted sum) and the unweighted value of each
            loss with weight > 0.
        """
        with self.precision_context(images.device):
            return self._losses(images, token_ids, pids, noise, check_inputs)

    def _losses(self, images, token_ids, pids, noise, check_inputs) -> SENOutput:
        if pids.shape != (images.shape[0],) or token_ids.shape[0] != images.shape[0]:
            raise ValueError(
                f"batch sizes differ: images {tuple(images.shape)}, token_ids {tuple(token_ids.shape)}, "
                f"pids {tuple(pids.shape)}"
            )
        if self.classifier is not None and check_inputs:
            low, high = torch.stack([pids.min(), pids.max()]).tolist()
            if low < 0 or high >= self.classifier.out_features:
                raise ValueError(
                    f"pids range {low}..{high} does not fit the ID classifier's {self.classifier.out_features} "
                    f"classes (expected 0..{self.classifier.out_features - 1})"
                )
        w = self.loss_weights
        image_features = self.encode_image(images).float()  # (B, D)
        text_tokens, eot = self.text_tokens(token_ids, check=check_inputs)  # (B, L, D), (B,)
        text_features = text_tokens[torch.arange(text_tokens.shape[0], device=eot.device), eot].float()  # (B, D)

        losses: dict[str, torch.Tensor] = {}
        if w["sdm"] > 0 or w["triplet"] > 0 or w["itc"] > 0:  # batch-level: over every rank's samples
            all_images, all_texts = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
            all_pids = all_gather_no_grad(pids)
        if w["sdm"] > 0:
            losses["sdm"] = sdm_loss(all_images, all_texts, all_pids, self.temperature)
        if w["id"] > 0:
            losses["id"] = identity_loss(self.classifier(image_features), self.classifier(text_features), pids)
        if w["triplet"] > 0:
            losses["triplet"] = hardest_negative_triplet_loss(all_images, all_texts, all_pids, self.margin)
        if w["itc"] > 0:
            losses["itc"] = itc_loss(all_images, all_texts, self.temperature)
        if w["restoration"] > 0:
            restored = self.restore(images, text_tokens, eot, noise)
            losses["restoration"] = masked_patch_mse(restored["prediction"], restored["target"], restored["mask"])
        return SENOutput(loss=sum(w[name] * value for name, value in losses.items()), **losses)

    def similarity(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(Nq, Ng)`` of text queries against gallery images."""
        return F.normalize(text_features.float(), dim=-1) @ F.normalize(image_features.float(), dim=-1).t()


def cast_to_reference_fp16(module: nn.Module) -> None:
    """The reference's (OpenAI CLIP's) ``convert_weights``, in place: linear, convolution and
    attention-projection weights and biases to fp16; layer norms, embeddings and loose
    parameters (CLS embedding, TIR mask token) stay fp32."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.half()
        elif isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                param = getattr(m, name, None)
                if param is not None:
                    param.data = param.data.half()
