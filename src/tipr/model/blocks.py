"""Building blocks the methods' heads share: OpenAI-CLIP-style transformer blocks and their initialisation.

SEN's restoration decoder and IRRA's cross-modal transformer are both stacks
of OpenAI CLIP residual blocks (pre-norm attention and a 4x QuickGELU MLP,
LayerNorm eps 1e-5, no attention mask) behind a cross-attention without a
residual connection, initialised as CLIP initialises its transformer.
"""

from __future__ import annotations

from functools import partial

from torch import nn


def clip_blocks(dim: int, depth: int, num_heads: int) -> nn.Sequential:
    """``depth`` timm ``Block``\\ s computing OpenAI CLIP's ``ResidualAttentionBlock``: QuickGELU,
    MLP ratio 4, qkv bias, LayerNorm eps 1e-5 (timm's default eps is 1e-6).

    Parameter names: ``N.norm1``, ``N.attn.qkv`` (q, k, v rows stacked as
    ``in_proj_weight``), ``N.attn.proj``, ``N.norm2``, ``N.mlp.fc1``, ``N.mlp.fc2``.
    """
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import Block

    if dim % num_heads:
        raise ValueError(f"transformer width {dim} is not divisible by num_heads {num_heads}")
    return nn.Sequential(*[
        Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, act_layer=QuickGELU,
              norm_layer=partial(nn.LayerNorm, eps=1e-5))
        for _ in range(depth)
    ])


def default_heads(dim: int) -> int:
    """The references' head count: ``dim // 64`` (at least 1)."""
    return max(1, dim // 64)


def init_clip_transformer(blocks: nn.Sequential, cross_attn: nn.MultiheadAttention, dim: int) -> None:
    """CLIP's transformer initialisation, as IRRA and SEN apply it to their heads (in place):
    attention in-projections N(0, dim^-1/2), out-projections and MLP outputs
    N(0, dim^-1/2 (2 depth)^-1/2), MLP inputs N(0, (2 dim)^-1/2); the cross-attention's
    biases zero. Other biases keep their defaults."""
    depth = len(blocks)
    attn_std = dim**-0.5
    proj_std = attn_std * (2 * max(depth, 1)) ** -0.5
    fc_std = (2 * dim) ** -0.5
    nn.init.normal_(cross_attn.in_proj_weight, std=attn_std)
    nn.init.zeros_(cross_attn.in_proj_bias)
    nn.init.normal_(cross_attn.out_proj.weight, std=proj_std)
    nn.init.zeros_(cross_attn.out_proj.bias)
    for block in blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
