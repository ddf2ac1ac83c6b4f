"""SEN's checkpoints from the authors' code: the TIR head -> ``SENModel.restoration``.

SEN keeps the head at the top level of its state dict, every tensor ``E`` wide
(the CLIP embedding). It maps onto :class:`tipr.methods.sen.restoration.TextGuidedRestoration`:

=============================================  ================================================
SEN                                            tipr ``restoration.``
=============================================  ================================================
``norm_1`` (visible image tokens)              ``image_norm``
``decoder_embed`` (E, E)                       ``decoder_embed``
``mask_token`` (1, 1, E)                       ``mask_token``
``norm_2`` (text) / ``norm_4`` (queries)       ``text_norm`` / ``query_norm``
``cross_attn_Text`` (MultiheadAttention)       ``cross_attn`` (the same module)
``norm_6`` / ``norm_7``                        ``pre_norm`` / ``post_norm``
``cross_modal_transformer_mae.resblocks.N``    ``transformer.N`` (timm ``Block``)
``...N.attn.in_proj_*`` / ``out_proj``         ``...N.attn.qkv`` / ``proj`` (same q, k, v rows)
``...N.ln_1`` / ``ln_2``                       ``...N.norm1`` / ``norm2``
``...N.mlp.c_fc`` / ``c_proj``                 ``...N.mlp.fc1`` / ``fc2``
``decoder_pred`` (P*P*3, E)                    ``pixel_head``
``decoder_pos_embed`` (1, 1 + N, E)            ``pos_embed`` (checked, not copied)
=============================================  ================================================

The depth is the number of blocks in the file. The heads cannot be read off the
tensors (any count dividing ``E`` fits): ``restoration_heads`` when given (the
source's count), else ``E // 64``, as the reference's code. ``decoder_pos_embed``
is the reference's fixed sine-cosine table; tipr builds the same table
(:func:`tipr.methods.sen.restoration.sincos_position_table`) as a non-persistent
buffer, so the conversion checks that the two agree (within 1e-4) instead of
copying it, and a converted model reloads with the right table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tipr.convert.openai_clip import OPENAI_TO_TIMM_BLOCK, block_shapes, num_blocks
from tipr.convert.reference import HeadConversion, assumed_heads

#: SEN's TIR head outside its blocks -> ``TextGuidedRestoration`` names.
TIR_KEYS = {
    "norm_1.weight": "image_norm.weight",
    "norm_1.bias": "image_norm.bias",
    "decoder_embed.weight": "decoder_embed.weight",
    "decoder_embed.bias": "decoder_embed.bias",
    "mask_token": "mask_token",
    "norm_2.weight": "text_norm.weight",
    "norm_2.bias": "text_norm.bias",
    "norm_4.weight": "query_norm.weight",
    "norm_4.bias": "query_norm.bias",
    "cross_attn_Text.in_proj_weight": "cross_attn.in_proj_weight",
    "cross_attn_Text.in_proj_bias": "cross_attn.in_proj_bias",
    "cross_attn_Text.out_proj.weight": "cross_attn.out_proj.weight",
    "cross_attn_Text.out_proj.bias": "cross_attn.out_proj.bias",
    "norm_6.weight": "pre_norm.weight",
    "norm_6.bias": "pre_norm.bias",
    "norm_7.weight": "post_norm.weight",
    "norm_7.bias": "post_norm.bias",
    "decoder_pred.weight": "pixel_head.weight",
    "decoder_pred.bias": "pixel_head.bias",
}
#: The reference's fixed sine-cosine table (``requires_grad=False``); checked, not loaded.
TIR_TABLE = "decoder_pos_embed"
TIR_BLOCKS = "cross_modal_transformer_mae.resblocks."
_TIR_LAYERS = "transformer."
#: A table equal to tipr's within this is the same fixed table (a different one differs by O(1)).
_TABLE_ATOL = 1e-4
#: The top-level modules of SEN's TIR head.
TIR_MODULES = frozenset({key.split(".")[0] for key in TIR_KEYS} | {TIR_TABLE, TIR_BLOCKS.split(".")[0]})


def tir_depth(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The number of TIR blocks when the source holds (some of) SEN's TIR head, else None."""
    if not any(key.split(".")[0] in TIR_MODULES for key in state_dict):
        return None
    return num_blocks(state_dict, TIR_BLOCKS)


def _tir_shapes(config: dict[str, Any], grid: tuple[int, int], depth: int) -> dict[str, tuple[int, ...]]:
    """Every TIR tensor of the reference and its shape: all ``E`` wide (the projection width)."""
    dim, patch = config["projection_dim"], config["vision_config"]["patch_size"]
    pixels = patch * patch * config["vision_config"]["num_channels"]
    shapes = {key: (dim,) for key in TIR_KEYS if key.startswith("norm_")}
    shapes.update({
        "decoder_embed.weight": (dim, dim),
        "decoder_embed.bias": (dim,),
        "mask_token": (1, 1, dim),
        "cross_attn_Text.in_proj_weight": (3 * dim, dim),
        "cross_attn_Text.in_proj_bias": (3 * dim,),
        "cross_attn_Text.out_proj.weight": (dim, dim),
        "cross_attn_Text.out_proj.bias": (dim,),
        "decoder_pred.weight": (pixels, dim),
        "decoder_pred.bias": (pixels,),
        TIR_TABLE: (1, 1 + grid[0] * grid[1], dim),
    })
    block = block_shapes(dim, 4 * dim)  # OpenAI's Transformer: MLP ratio 4
    for i in range(depth):
        shapes.update({f"{TIR_BLOCKS}{i}.{key}": shape for key, shape in block.items()})
    return shapes


def tir_problems(
    state_dict: Mapping[str, torch.Tensor], config: dict[str, Any], grid: tuple[int, int], depth: int
) -> list[str]:
    """One line per missing or misshapen TIR tensor (``key: expected (...), found (...)``).

    ``config`` and ``grid`` are the backbone's (:func:`~tipr.convert.openai_clip.infer_clip_config`).
    """
    problems = []
    for key, expected in _tir_shapes(config, grid, depth).items():
        tensor = state_dict.get(key)
        if tensor is None:
            problems.append(f"{key}: missing, expected {expected}")
        elif tuple(tensor.shape) != expected:
            hint = f" (the {grid[0]}x{grid[1]} patch grid)" if key == TIR_TABLE else ""
            problems.append(f"{key}: expected {expected}{hint}, found {tuple(tensor.shape)}")
    if depth == 0:
        problems.append(f"{TIR_BLOCKS}0.*: missing, no TIR block found")
    return problems


def convert_tir_state_dict(
    state_dict: Mapping[str, torch.Tensor], depth: int
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The TIR head under ``TextGuidedRestoration`` names (fp32), and the source keys it takes
    (``decoder_pos_embed`` included: it is checked by :func:`tir_mismatch`, not loaded)."""
    weights = {new: state_dict[old].float() for old, new in TIR_KEYS.items()}
    used = {*TIR_KEYS, TIR_TABLE}
    for i in range(depth):
        for old, new in OPENAI_TO_TIMM_BLOCK.items():
            weights[f"{_TIR_LAYERS}{i}.{new}"] = state_dict[f"{TIR_BLOCKS}{i}.{old}"].float()
            used.add(f"{TIR_BLOCKS}{i}.{old}")
    return weights, used


def tir_mismatch(restoration: nn.Module, state_dict: Mapping[str, torch.Tensor], depth: int) -> str | None:
    """Why the source's TIR head cannot be loaded into ``restoration`` as trained, or None.

    Its heads are the source's by definition: ``restoration_heads`` says how many the source has.
    """
    if len(restoration.transformer) != depth:
        return f"the source's has {depth} blocks, restoration_depth is {len(restoration.transformer)}"
    table = state_dict[TIR_TABLE][0].float()
    difference = (table - restoration.pos_embed[0].float()).abs().max().item()
    if difference > _TABLE_ATOL:
        grid = restoration.grid_size
        return (
            f"the source's {TIR_TABLE} is not the fixed sine-cosine table of the {grid[0]}x{grid[1]} grid "
            f"(max abs difference {difference:.3g})"
        )
    return None


# ------------------------------------------------------ the method's contract
def reference_settings(
    state_dict: Mapping[str, torch.Tensor], config: dict[str, Any], grid: tuple[int, int]
) -> tuple[dict[str, Any], list[str]]:
    """SEN settings read off the source (``restoration_depth``) and its misshapen TIR tensors."""
    depth = tir_depth(state_dict)
    if depth is None:
        return {}, []
    return {"restoration_depth": depth}, tir_problems(state_dict, config, grid, depth)


def convert_heads(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> HeadConversion:
    """Load the TIR head of a SEN source into ``model.restoration`` (else say why it stays fresh)."""
    depth, restoration = tir_depth(state_dict), model.restoration
    heads = restoration.cross_attn.num_heads
    how = ("given (restoration_heads)" if model.config.restoration_heads is not None else
           assumed_heads("embedding width", "SEN's rule", "restoration_heads"))
    architecture = {"TIR depth": (len(restoration.transformer), "restoration_depth (a fresh head)"),
                    "TIR heads": (heads, how)}
    mismatch = "no counterpart in the source" if depth is None else tir_mismatch(restoration, state_dict, depth)
    if mismatch is not None:
        return HeadConversion(reinitialised={"restoration": f"TIR head: {mismatch}"}, architecture=architecture)
    weights, used = convert_tir_state_dict(state_dict, depth)
    restoration.load_state_dict(weights)
    architecture["TIR depth"] = (depth, f"read off {TIR_BLOCKS}0..{depth - 1}")
    return HeadConversion(loaded=[f"TIR head ({depth} blocks; its {TIR_TABLE} equals tipr's fixed table)"], used=used,
                          architecture=architecture)
