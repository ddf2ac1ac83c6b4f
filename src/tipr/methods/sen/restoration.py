"""Text-guided image restoration (TIR), the training-only head of SEN.

The image is turned to grayscale and most of its patches are hidden before the
shared CLIP vision encoder (MAE-style). The decoder puts a learned mask token
at every hidden position, adds a fixed 2-D sine-cosine position table, and
lets every token attend to the caption's token features; with no residual
connection (the reference default) what reaches the pixel head is made of text
features only, mixed by an attention pattern that the visible patches and the
positions steer. Restoring the colour of the hidden patches therefore needs the
caption's colour and attribute words, which ties words to image regions.

This module holds the helpers (grayscale, masking, patchify) and the decoder,
:class:`TextGuidedRestoration`; :class:`tipr.methods.sen.SENModel` runs the
encoder part and the loss (:func:`tipr.model.losses.masked_patch_mse`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tipr.model.blocks import clip_blocks, default_heads, init_clip_transformer

GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """``0.2989 R + 0.5870 G + 0.1140 B`` repeated to 3 channels: ``(B, 3, H, W) -> (B, 3, H, W)``.

    Applied to the model's (normalised) input, as in SEN.
    """
    weights = images.new_tensor(GRAYSCALE_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)``, patches in row-major grid order, pixels as ``(p, p, C)``."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C) -> (B, C, H, W)``."""
    b, n, k = patches.shape
    p = patch_size
    c = k // (p * p)
    gh, gw = grid_size
    x = patches.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, H/p, p, W/p, p)
    return x.reshape(b, c, gh * p, gw * p)


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """How many patches the encoder sees: ``int((N + 1) * (1 - mask_ratio)) - 1``.

    The SEN reference masks the token sequence *with* CLS (length N + 1) and
    always keeps CLS, so 0.7 on a 24 x 8 grid keeps int(193 * 0.3) - 1 = 56 patches.
    """
    return max(0, min(num_patches, int((num_patches + 1) * (1 - mask_ratio)) - 1))


def random_patch_masking(
    noise: torch.Tensor, num_visible: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking from per-patch noise ``(B, N)``: the lowest-noise patches stay visible.

    Returns:
        ids_keep: ``(B, num_visible)`` indices of the visible patches (in shuffle order).
        ids_restore: ``(B, N)`` position of each grid patch in the shuffled order.
        mask: ``(B, N)`` float, 1 for hidden patches, 0 for visible ones, in grid order.
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    mask = (ids_restore >= num_visible).to(noise.dtype)
    return ids_keep, ids_restore, mask


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(pos * w), cos(pos * w)]`` with ``w_k = 10000^(-k / (dim/2))``, ``k < dim/2``: ``(M, dim)``."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega  # (dim/2,), float32
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_position_table(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine table ``(1 + H*W, dim)`` with a zero row for CLS: SEN's ``decoder_pos_embed``.

    The reference's layout (MAE's ``get_2d_sincos_pos_embed`` for an ``(H, W)``
    grid), in its float32 arithmetic: row ``1 + i*W + j`` (grid row i, column j) is
    ``[sin(j w), cos(j w), sin(i w), cos(i w)]``, the column first, with
    ``w_k = 10000^(-k / (dim/4))``, ``k < dim/4``. A checkpoint of the reference
    code therefore fits the decoder as it was trained (``tipr convert`` checks
    that its stored table equals this one).
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine position table needs a width divisible by 4, got {dim}")
    height, width = (int(s) for s in grid_size)
    rows = np.arange(height, dtype=np.float32)
    cols = np.arange(width, dtype=np.float32)
    col_grid, row_grid = np.meshgrid(cols, rows)  # (H, W) each, "xy" indexing: the column first
    table = np.concatenate([_sincos_1d(dim // 2, col_grid), _sincos_1d(dim // 2, row_grid)], axis=1)
    table = np.concatenate([np.zeros((1, dim), dtype=table.dtype), table], axis=0)  # (1 + H*W, dim)
    return torch.from_numpy(table).float()


class TextGuidedRestoration(nn.Module):
    """The TIR decoder: visible image tokens + caption tokens -> pixels of every patch.

    Layers (names matter for the optimiser's 5x groups): ``image_norm``,
    ``decoder_embed`` (projection width -> projection width), ``mask_token``,
    fixed ``pos_embed``; ``query_norm`` and ``text_norm`` feed ``cross_attn``
    (queries: decoder tokens; keys/values: caption token features); ``pre_norm``,
    ``transformer`` (``depth`` timm ``Block``\\ s: pre-norm, QuickGELU, LayerNorm eps
    1e-5, the same function as OpenAI CLIP's residual blocks), ``post_norm``,
    ``pixel_head`` (linear to ``p*p*3`` values per patch). Each maps one to one
    onto a module of the reference (see :mod:`tipr.methods.sen.convert`).

    Args:
        dim: projection width of the dual encoder (512 for ViT-B/16).
        patch_size: p; grid_size: ``(H/p, W/p)``.
        depth: transformer blocks (reference: 4).
        num_heads: heads of the cross-attention and the blocks; default ``dim // 64``
            as the reference (8 for 512 wide; at least 1).
        residual: add the cross-attention output to the decoder tokens instead of
            replacing them (the reference replaces them).
        text_padding_mask: hide the caption positions after the end-of-text token
            from the cross-attention (the reference attends over the padding too).
    """

    def __init__(
        self,
        dim: int,
        patch_size: int,
        grid_size: tuple[int, int],
        depth: int = 4,
        num_heads: int | None = None,
        residual: bool = False,
        text_padding_mask: bool = False,
    ):
        super().__init__()
        num_heads = num_heads or default_heads(dim)
        if dim % num_heads:
            raise ValueError(f"TIR width {dim} is not divisible by num_heads {num_heads}")
        self.patch_size = patch_size
        self.grid_size = tuple(grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.residual = residual
        self.text_padding_mask = text_padding_mask

        self.image_norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_position_table(self.grid_size, dim)[None], persistent=False)
        self.query_norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.pre_norm = nn.LayerNorm(dim)
        self.transformer = clip_blocks(dim, depth, num_heads)
        self.post_norm = nn.LayerNorm(dim)
        self.pixel_head = nn.Linear(dim, patch_size * patch_size * 3)
        init_clip_transformer(self.transformer, self.cross_attn, dim)  # as the reference inits this head

    def forward(
        self,
        visible_tokens: torch.Tensor,
        ids_restore: torch.Tensor,
        text_tokens: torch.Tensor,
        text_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict every patch.

        Args:
            visible_tokens: ``(B, 1 + K, D)`` encoder output (CLS + K visible patches,
                after the vision norm and projection), visible patches in shuffle order.
            ids_restore: ``(B, N)`` from :func:`random_patch_masking`.
            text_tokens: ``(B, L, D)`` caption token features (text norm + projection).
            text_padding: ``(B, L)`` bool, True after the end-of-text token; used
                when ``text_padding_mask`` is on.

        Returns:
            ``(B, N, p*p*3)`` predicted pixels, grid order, CLS dropped.
        """
        x = self.decoder_embed(self.image_norm(visible_tokens))  # (B, 1 + K, D)
        b, n = ids_restore.shape
        d = x.shape[-1]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - 1), d)  # (B, N - K, D)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, D), shuffle order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, d))  # (B, N, D), grid order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, D)

        text = self.text_norm(text_tokens)  # (B, L, D)
        padding = text_padding if self.text_padding_mask else None
        guided, _ = self.cross_attn(self.query_norm(x), text, text, key_padding_mask=padding, need_weights=False)
        x = x + guided if self.residual else guided  # (B, 1 + N, D)

        x = self.transformer(self.pre_norm(x))
        return self.pixel_head(self.post_norm(x))[:, 1:]  # (B, N, p*p*3)
