"""The CLIP backbone: Hugging Face ``CLIPModel`` with a non-square patch grid.

``build_clip`` returns a ``transformers.CLIPModel`` (never a fork of the CLIP
code) from one of three sources:

- a named preset (``"tiny"``): a small randomly initialised CLIP for tests and
  the synthetic benchmark, with the real CLIP vocabulary (49,408 ids, start
  49406, end 49407) so the shipped tokenizer's ids fit;
- a ``dict`` of ``CLIPConfig`` arguments (``{"vision_config": {...},
  "text_config": {...}, "projection_dim": 512}``): random weights of any shape;
- a local checkpoint folder or a Hugging Face hub id
  (``"openai/clip-vit-base-patch16"``): pretrained weights, loaded the standard
  way (``from_pretrained``). A local folder never touches the network.

Person images are not square (384 x 128 in the paper). ``set_image_size``
resizes the pretrained position table once, at construction, from CLIP's
square grid (14 x 14 for ViT-B/16 at 224) to the new grid (24 x 8), bilinear
as the reference code (bicubic on request), keeping the CLS position, and swaps in :class:`GridVisionEmbeddings`, which
adds that table as is: no interpolation ever runs in a training step.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tipr.model.hub import HubUnreachableError, from_cache_or_hub

CLIP_VOCAB_SIZE = 49408
CLIP_SOT_TOKEN_ID = 49406
CLIP_EOT_TOKEN_ID = 49407

#: Randomly initialised CLIP shapes selectable by name (``backbone="tiny"``).
#: The text context (``max_position_embeddings``) is set to ``text_length``.
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 32,
        },
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "projection_dim": 64,
    },
}

_TEXT_DEFAULTS = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "bos_token_id": CLIP_SOT_TOKEN_ID,
    "eos_token_id": CLIP_EOT_TOKEN_ID,
    "pad_token_id": 0,
}


def clip_config(backbone: str | Mapping[str, Any], text_length: int = 77):
    """The ``CLIPConfig`` for a preset name or a dict of ``CLIPConfig`` arguments."""
    from transformers import CLIPConfig

    if isinstance(backbone, str):
        if backbone not in BACKBONE_PRESETS:
            raise ValueError(f"unknown backbone preset {backbone!r}; presets: {sorted(BACKBONE_PRESETS)}")
        kwargs = copy.deepcopy(BACKBONE_PRESETS[backbone])
        kwargs["text_config"] = {**_TEXT_DEFAULTS, "max_position_embeddings": text_length, **kwargs["text_config"]}
    else:
        kwargs = copy.deepcopy(dict(backbone))
        unknown = set(kwargs) - set(CLIPConfig().to_dict())
        if unknown and kwargs.get("model_type") != "clip":  # a serialised config may carry extra keys
            raise ValueError(f"backbone config has unknown CLIPConfig keys {sorted(unknown)}")
        kwargs["text_config"] = {**_TEXT_DEFAULTS, **(kwargs.get("text_config") or {})}
    return CLIPConfig.from_dict(kwargs)


def build_clip(backbone: str | Mapping[str, Any], text_length: int = 77):
    """A ``CLIPModel`` (fp32 weights, SDPA attention) from a preset, a config dict, a folder or a hub id."""
    from transformers import CLIPModel

    if not isinstance(backbone, (str, Mapping)) or not backbone:
        raise TypeError(f"backbone must be a preset name, a CLIP folder, a hub id or a config dict, got {backbone!r}")
    if isinstance(backbone, Mapping) or backbone in BACKBONE_PRESETS:
        config = clip_config(backbone, text_length)
        _check_text_length(config, text_length)
        model = CLIPModel._from_config(config, attn_implementation="sdpa")
    else:
        folder = Path(backbone).expanduser()
        is_folder = folder.is_dir()
        if not is_folder and (backbone.startswith((".", "/", "~")) or folder.exists()):
            raise FileNotFoundError(f"backbone {backbone!r}: expected a CLIP checkpoint folder, found none")
        expected = f"expected a preset {sorted(BACKBONE_PRESETS)}, a local CLIP checkpoint folder or a Hugging Face hub id"
        load = functools.partial(CLIPModel.from_pretrained, str(folder) if is_folder else backbone,
                                 dtype=torch.float32, attn_implementation="sdpa")
        try:
            if is_folder:
                model = load(local_files_only=True)
            else:  # the local cache, else one probe of the hub before the download (no 30 s of retries offline)
                model = from_cache_or_hub(lambda local: load(local_files_only=local), f"model.backbone={backbone!r} ({expected})",
                                          "give a local CLIP folder or a config")
        except HubUnreachableError:
            raise
        except OSError as err:
            raise OSError(f"could not load the CLIP backbone model.backbone={backbone!r} ({expected}): {err}") from err
    _check_text_length(model.config, text_length)
    # The losses use a fixed temperature; CLIP's learnable logit scale stays out of the optimiser.
    model.logit_scale.requires_grad_(False)
    return model


def _check_text_length(config, text_length: int) -> None:
    context = config.text_config.max_position_embeddings
    if text_length > context:
        raise ValueError(f"text_length {text_length} is longer than the text encoder's context ({context} positions)")


def eot_token_id(config) -> int:
    """The end-of-text id whose first occurrence marks the pooled text position.

    OpenAI CLIP pools at the highest token id (``argmax`` over the ids), and its
    BPE puts ``<|endoftext|>`` last: id ``vocab_size - 1`` (49407 for the 49,408
    ids of the released models). Old hub configs say ``eos_token_id=2`` (or none);
    transformers then pools at the highest id, so that case maps to
    ``vocab_size - 1``, whatever the vocabulary size. Otherwise the config's
    ``eos_token_id`` (``tipr convert`` writes ``vocab_size - 1`` there). We always
    pool at the first end-of-text token.
    """
    text = config.text_config
    eos = text.eos_token_id
    return int(text.vocab_size) - 1 if eos in (None, 2) else int(eos)


#: How a pretrained position table may be resized: the reference code's bilinear, or bicubic.
POSITION_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_position_embedding(
    table: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize a ViT position table ``(1 + h*w, D)`` to ``(1 + H*W, D)``, CLS row kept.

    The patch rows are laid out as an ``old_grid`` (square when not given) and
    resampled to ``new_grid`` with ``interpolation`` (``"bilinear"``, the reference
    code's, or ``"bicubic"``; ``align_corners=False``, no anti-aliasing, as
    ``F.interpolate`` does by default). Same grid: returned unchanged.
    """
    if interpolation not in POSITION_INTERPOLATIONS:
        raise ValueError(
            f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {interpolation!r}"
        )
    from timm.layers import resample_abs_pos_embed

    num_patches = table.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"position table with {num_patches} patch rows is not a square grid; give old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"position table has {num_patches} patch rows, not {old_grid[0]}x{old_grid[1]}")
    if tuple(old_grid) == tuple(new_grid):
        return table
    resized = resample_abs_pos_embed(
        table[None], new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=1,
        interpolation=interpolation, antialias=False,
    )
    return resized[0]


class GridVisionEmbeddings(nn.Module):
    """CLIP's vision embeddings (CLS + patches + positions) for a fixed ``H x W`` input.

    Drop-in replacement for ``CLIPVisionEmbeddings`` with the same parameter names
    (``class_embedding``, ``patch_embedding``, ``position_embedding``), so state
    dicts keep their keys; the position table already has ``1 + (H/p)(W/p)`` rows.
    """

    def __init__(
        self,
        class_embedding: nn.Parameter,
        patch_embedding: nn.Conv2d,
        position_embedding: torch.Tensor,
        image_size: tuple[int, int],
    ):
        super().__init__()
        self.image_size = tuple(image_size)
        self.patch_size = patch_embedding.kernel_size[0]
        self.grid_size = (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_channels = patch_embedding.in_channels
        self.embed_dim = patch_embedding.out_channels
        if position_embedding.shape != (self.num_patches + 1, self.embed_dim):
            raise ValueError(f"position table {tuple(position_embedding.shape)} does not fit grid {self.grid_size}")
        self.class_embedding = class_embedding
        self.patch_embedding = patch_embedding
        self.position_embedding = nn.Embedding(self.num_patches + 1, self.embed_dim)
        with torch.no_grad():
            self.position_embedding.weight.copy_(position_embedding)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        expected = (self.num_channels, *self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(pixel_values.shape)}"
            )

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """``(B, C, H, W)`` pixels -> ``(B, 1 + N, D)`` tokens with positions (CLS first).

        ``interpolate_pos_encoding`` (the ``CLIPVisionEmbeddings`` argument) must stay
        False: the table is never resized in a forward pass (see :func:`set_image_size`).
        """
        if interpolate_pos_encoding:
            gh, gw = self.grid_size
            h, w = self.image_size
            raise ValueError(
                f"interpolate_pos_encoding=True is not supported: the position table was resized once, at "
                f"construction, to the {gh}x{gw} patch grid of {h}x{w} images (patch size {self.patch_size}); "
                f"for another input size call tipr.model.backbone.set_image_size(model, (H, W)) first"
            )
        self.check_pixels(pixel_values)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


def set_image_size(model, image_size: tuple[int, int], interpolation: str = "bilinear") -> GridVisionEmbeddings:
    """Fit ``model``'s vision embeddings to ``image_size`` (H, W) once; returns the new module.

    ``interpolation`` resizes the position table (see :func:`resize_position_embedding`).

    Raises if H or W is not a multiple of the patch size.
    """
    embeddings = model.vision_model.embeddings
    height, width = (int(s) for s in image_size)
    patch = model.config.vision_config.patch_size
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(f"image_size {(height, width)} must be positive multiples of the patch size {patch}")
    grid = (height // patch, width // patch)
    if isinstance(embeddings, GridVisionEmbeddings):
        old_grid = embeddings.grid_size
    else:
        old_grid = None  # CLIP's square grid
    table = resize_position_embedding(embeddings.position_embedding.weight.detach(), grid, old_grid, interpolation)
    new = GridVisionEmbeddings(embeddings.class_embedding, embeddings.patch_embedding, table, (height, width))
    model.vision_model.embeddings = new
    return new
