"""IRRA's checkpoints from the authors' code: its heads -> ``IRRAModel``.

Every IRRA head sits at the top level of the state dict, ``E`` wide (the CLIP
embedding), and maps one to one:

===============================================  ==============================================
IRRA                                             tipr ``IRRAModel``
===============================================  ==============================================
``cross_attn`` (MultiheadAttention)              ``cross_attn`` (the same module)
``cross_modal_transformer.resblocks.N``          ``cross_modal_transformer.N`` (timm ``Block``)
``...N.attn.in_proj_*`` / ``out_proj``           ``...N.attn.qkv`` / ``proj`` (same q, k, v rows)
``...N.ln_1`` / ``ln_2``                         ``...N.norm1`` / ``norm2``
``...N.mlp.c_fc`` / ``c_proj``                   ``...N.mlp.fc1`` / ``fc2``
``ln_pre_t`` / ``ln_pre_i`` / ``ln_post``        the same
``mlm_head.{dense, ln, fc}``                     the same (``fc``: vocabulary x E)
===============================================  ==============================================

The depth is the number of blocks in the file. The heads (of ``cross_attn`` and the
blocks) are not in the tensors: ``E // 64``, as the reference's code, the only count
``IRRAModel`` builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tipr.convert.openai_clip import OPENAI_TO_TIMM_BLOCK, block_shapes, num_blocks
from tipr.convert.reference import HeadConversion, assumed_heads

BLOCKS = "cross_modal_transformer.resblocks."
_LAYERS = "cross_modal_transformer."
#: IRRA's heads outside the blocks, under the same names in tipr.
SAME_NAMES = (
    "cross_attn.in_proj_weight", "cross_attn.in_proj_bias", "cross_attn.out_proj.weight", "cross_attn.out_proj.bias",
    "ln_pre_t.weight", "ln_pre_t.bias", "ln_pre_i.weight", "ln_pre_i.bias", "ln_post.weight", "ln_post.bias",
    "mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.ln.weight", "mlm_head.ln.bias",
    "mlm_head.fc.weight", "mlm_head.fc.bias",
)


def _shapes(config: dict[str, Any], depth: int) -> dict[str, tuple[int, ...]]:
    dim, vocab = config["projection_dim"], config["text_config"]["vocab_size"]
    shapes = {key: (dim,) for key in SAME_NAMES if key.startswith(("ln_", "mlm_head.ln", "mlm_head.dense.bias"))}
    shapes.update({
        "cross_attn.in_proj_weight": (3 * dim, dim),
        "cross_attn.in_proj_bias": (3 * dim,),
        "cross_attn.out_proj.weight": (dim, dim),
        "cross_attn.out_proj.bias": (dim,),
        "mlm_head.dense.weight": (dim, dim),
        "mlm_head.fc.weight": (vocab, dim),
        "mlm_head.fc.bias": (vocab,),
    })
    block = block_shapes(dim, 4 * dim)  # OpenAI's Transformer: MLP ratio 4
    for i in range(depth):
        shapes.update({f"{BLOCKS}{i}.{key}": shape for key, shape in block.items()})
    return shapes


def reference_settings(
    state_dict: Mapping[str, torch.Tensor], config: dict[str, Any], grid: tuple[int, int]
) -> tuple[dict[str, Any], list[str]]:
    """IRRA settings read off the source (``cross_modal_depth``) and its missing or misshapen head tensors."""
    depth = num_blocks(state_dict, BLOCKS)
    problems = []
    for key, expected in _shapes(config, depth).items():
        tensor = state_dict.get(key)
        if tensor is None:
            problems.append(f"{key}: missing, expected {expected}")
        elif tuple(tensor.shape) != expected:
            hint = " (the text vocabulary)" if key.startswith("mlm_head.fc") else ""
            problems.append(f"{key}: expected {expected}{hint}, found {tuple(tensor.shape)}")
    if depth == 0:
        problems.append(f"{BLOCKS}0.*: missing, no cross-modal block found")
    return ({"cross_modal_depth": depth} if depth else {}), problems


def convert_heads(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> HeadConversion:
    """Load IRRA's cross-attention, cross-modal transformer, layer norms and MLM head into ``model``."""
    depth, built = num_blocks(state_dict, BLOCKS), len(model.cross_modal_transformer)
    heads = model.cross_attn.num_heads
    architecture = {"cross-modal depth": (built, "cross_modal_depth (a fresh head)"),
                    "cross-modal heads": (heads, assumed_heads("embedding width", "IRRA's rule", None))}
    if built != depth:
        reason = f"the source's has {depth} blocks, cross_modal_depth is {built}"
        return HeadConversion(reinitialised={"cross-modal MLM head": reason}, architecture=architecture)
    architecture["cross-modal depth"] = (depth, f"read off {BLOCKS}0..{depth - 1}")
    weights = {key: state_dict[key].float() for key in SAME_NAMES}
    used = set(SAME_NAMES)
    for i in range(depth):
        for old, new in OPENAI_TO_TIMM_BLOCK.items():
            weights[f"{_LAYERS}{i}.{new}"] = state_dict[f"{BLOCKS}{i}.{old}"].float()
            used.add(f"{BLOCKS}{i}.{old}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:  # every name above is one of IRRAModel's
        raise RuntimeError(f"IRRA conversion table names no IRRAModel parameter: {unexpected}")
    return HeadConversion(loaded=[f"cross-modal MLM head (cross_attn, {depth} blocks, ln_pre_t/i, ln_post, "
                                  f"mlm_head)"], used=used, architecture=architecture)
