"""OpenAI-layout CLIP weights -> Hugging Face ``CLIPModel`` names and config, as a pure function.

OpenAI's ``clip`` package (TorchScript archives included), ``open_clip`` and the
IRRA/SEN code (under ``base_model.``) store a ViT CLIP in this layout:

==========================================  ===================================================
OpenAI layout                                Hugging Face ``CLIPModel``
==========================================  ===================================================
``visual.conv1.weight`` (W, 3, P, P)         ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding`` (W,)              ``vision_model.embeddings.class_embedding``
``visual.positional_embedding`` (1 + N, W)   ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``       ``vision_model.pre_layrnorm`` / ``post_layernorm``
``visual.proj`` (W, E), used as ``x @ proj``  ``visual_projection.weight`` = ``proj.T`` (E, W)
``token_embedding.weight`` (V, Wt)           ``text_model.embeddings.token_embedding.weight``
``positional_embedding`` (context, Wt)       ``text_model.embeddings.position_embedding.weight``
``ln_final``                                 ``text_model.final_layer_norm``
``text_projection`` (Wt, E)                  ``text_projection.weight`` = ``text_projection.T``
``...resblocks.N.attn.in_proj_*`` (3W, ...)  ``...layers.N.self_attn.{q,k,v}_proj.*`` (rows split in 3)
``...resblocks.N.attn.out_proj``             ``...layers.N.self_attn.out_proj``
``...resblocks.N.ln_1`` / ``ln_2``           ``...layers.N.layer_norm1`` / ``layer_norm2``
``...resblocks.N.mlp.c_fc`` / ``c_proj``     ``...layers.N.mlp.fc1`` / ``fc2``
==========================================  ===================================================

(``visual.transformer.resblocks`` are the vision blocks, ``transformer.resblocks``
the text blocks.) What the weights do not say is fixed by OpenAI's architecture:
``width // 64`` heads unless given (``vision_heads``, ``text_heads``: a checkpoint's
tensors fit any head count that divides the width, and cannot show which one it
was trained with), QuickGELU, LayerNorm eps 1e-5, a causal text mask and
pooling at the end-of-text token, the highest id (``argmax``): for a vocabulary
of V ids (``token_embedding.weight``) end-of-text is V - 1 and start-of-text
V - 2 (49407 and 49406 for OpenAI's 49,408), written into the config's
``eos_token_id`` / ``bos_token_id``. Every shape (widths, layers, MLP sizes,
patch, vocabulary, context, embedding) is read off the tensors.

The vision position table is used as is when it has ``1 + (H/P)(W/P)`` rows for
the requested ``image_size`` (an IRRA/SEN checkpoint trained at 384 x 128: 24 x
8 patches), resized once (:func:`tipr.model.resize_position_embedding`) when it
is a square OpenAI table (197 = 1 + 14 x 14 for ViT-B/16 at 224), and refused
otherwise. ``logit_scale`` is copied when present (IRRA drops it; tipr does not
use it either).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tipr.model.backbone import resize_position_embedding

OPENAI_HEAD_WIDTH = 64  #: OpenAI CLIP has ``width // 64`` attention heads; the weights do not record it.


class HeadCountError(ValueError):
    """Heads that do not divide their width: ``option`` (``"vision_heads"``...) given as ``heads``, or
    (``given`` False) OpenAI's ``width // 64`` for a width that is no multiple of 64."""

    def __init__(self, option: str, heads: int, width: int, what: str, given: bool = True):
        self.option, self.heads, self.width, self.what, self.given = option, heads, width, what, given
        divisors = ", ".join(str(d) for d in range(1, width + 1) if width % d == 0)
        self.hint = f"(heads must divide the width; {width}'s divisors: {divisors})"
        super().__init__(f"{option}={heads} does not divide the {what} width {width} {self.hint}" if given else
                         f"the {what} width {width} is no multiple of 64: width // 64 = {heads} heads do not divide "
                         f"it; give {option} (--{option}) {self.hint}")


def head_count(width: int, given: int | None, option: str, what: str) -> int:
    """``given``, else OpenAI's ``width // 64`` (at least 1); :class:`HeadCountError` unless it divides ``width``."""
    heads = max(1, width // OPENAI_HEAD_WIDTH) if given is None else int(given)
    if heads < 1 or width % heads:
        raise HeadCountError(option, heads, width, what, given=given is not None)
    return heads
#: Inside a residual block of a head: an OpenAI block -> a timm ``Block`` (the same q, k, v row
#: order), as :func:`tipr.model.blocks.clip_blocks` builds it.
OPENAI_TO_TIMM_BLOCK = {
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
}

_VISION_BLOCKS = "visual.transformer.resblocks."
_TEXT_BLOCKS = "transformer.resblocks."
_HF_LAYERS = {_VISION_BLOCKS: "vision_model.encoder.layers.", _TEXT_BLOCKS: "text_model.encoder.layers."}

#: OpenAI names outside the residual blocks -> Hugging Face names. ``visual.proj`` and
#: ``text_projection`` are transposed; the vision position table is handled on its own.
_GLOBAL_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = ("visual.proj", "text_projection")
_OPTIONAL = ("logit_scale",)
_VISION_TABLE = "visual.positional_embedding"
_HF_VISION_TABLE = "vision_model.embeddings.position_embedding.weight"

#: Inside a residual block, OpenAI -> Hugging Face (``attn.in_proj_*`` is split into q, k, v).
_BLOCK_KEYS = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
}


@dataclass
class ConvertedCLIP:
    """An OpenAI-layout CLIP mapped to Hugging Face names.

    Attributes:
        config: ``CLIPConfig`` arguments (``vision_config``, ``text_config``,
            ``projection_dim``) read off the tensor shapes; a tipr ``backbone``.
        state_dict: fp32 tensors under ``CLIPModel`` names, the vision position
            table fitted to the grid (no ``logit_scale`` when the source has none).
        unused: source keys under the prefix that were not mapped.
        notes: what was changed on the way (a resized position table).
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    unused: list[str]
    notes: list[str]


def convert_openai_clip_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    image_size: tuple[int, int] = (384, 128),
    prefix: str = "",
    interpolation: str = "bilinear",
    vision_heads: int | None = None, text_heads: int | None = None,
) -> ConvertedCLIP:
    """Map the OpenAI-layout CLIP under ``prefix`` (``""`` or ``"base_model."``) to Hugging Face names.

    ``vision_heads`` / ``text_heads``: as :func:`infer_clip_config`. Keys outside ``prefix`` are
    ignored (the caller owns them). A square position table is resized to the grid of ``image_size``
    with ``interpolation`` (``"bilinear"``, the reference code's, or ``"bicubic"``). Raises
    ``ValueError`` when the shapes cannot be read off the tensors, and one ``ValueError`` listing
    every missing or misshapen tensor (expected vs found shape) otherwise.
    """
    config, grid = infer_clip_config(state_dict, image_size, prefix, vision_heads, text_heads)
    problems = clip_shape_problems(state_dict, config, grid, image_size, prefix)
    if problems:
        raise ValueError(mismatch_message(problems, config, grid))
    return _map_clip(state_dict, prefix, config, grid, interpolation)


def _square_side(num_patches: int) -> int | None:
    side = math.isqrt(num_patches) if num_patches > 0 else 0
    return side if side and side * side == num_patches else None


def num_blocks(state_dict: Mapping[str, torch.Tensor], blocks: str) -> int:
    """How many residual blocks ``<blocks>N.`` the state dict holds (the highest N + 1; 0 for none)."""
    pattern = re.compile(re.escape(blocks) + r"(\d+)\.")
    found = [int(m.group(1)) for key in state_dict if (m := pattern.match(key))]
    return max(found) + 1 if found else 0


def infer_clip_config(
    state_dict: Mapping[str, torch.Tensor], image_size: tuple[int, int], prefix: str = "",
    vision_heads: int | None = None, text_heads: int | None = None,
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``CLIPConfig`` arguments from the tensor shapes, and the ``(H/P, W/P)`` patch grid.

    The attention heads are not in the tensors: ``vision_heads`` / ``text_heads``, else
    OpenAI's ``width // 64``. Raises ``ValueError`` when the four anchor tensors that give
    the shapes are missing (naming a ResNet CLIP as such) or ``image_size`` does not fit
    the patch, and a :class:`HeadCountError` for heads that do not divide their width.
    """
    anchors = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "positional_embedding")
    missing = [prefix + key for key in anchors if prefix + key not in state_dict]
    if missing:
        if any(key.startswith(prefix + "visual.layer1.") for key in state_dict):
            raise ValueError("holds a ResNet CLIP (visual.layer1...); only ViT CLIP towers can be converted")
        sample = sorted(state_dict)[:6]
        raise ValueError(
            f"no ViT CLIP weights in OpenAI's layout: missing {missing}, which give the model's shapes "
            f"(keys found include {sample})"
        )
    conv, proj, tokens, text_table = (tuple(state_dict[prefix + key].shape) for key in anchors)
    if len(conv) != 4 or len(proj) != 2 or len(tokens) != 2 or len(text_table) != 2:
        raise ValueError(
            f"CLIP anchor tensors have unexpected ranks: {prefix}visual.conv1.weight {conv} (expected W, C, P, P), "
            f"{prefix}visual.proj {proj} (W, E), {prefix}token_embedding.weight {tokens} (V, Wt), "
            f"{prefix}positional_embedding {text_table} (context, Wt)"
        )
    width, channels, patch = conv[0], conv[1], conv[-1]
    height, image_width = (int(s) for s in image_size)
    if height <= 0 or image_width <= 0 or height % patch or image_width % patch:
        raise ValueError(f"image_size {(height, image_width)} must be positive multiples of the patch size {patch}")
    grid = (height // patch, image_width // patch)
    table = state_dict.get(prefix + _VISION_TABLE)
    side = _square_side(table.shape[0] - 1) if table is not None and table.dim() == 2 else None

    def tower(blocks: str, hidden: int, heads: int | None, option: str) -> dict[str, int]:
        fc = state_dict.get(f"{prefix}{blocks}0.mlp.c_fc.weight")
        return {
            "hidden_size": hidden,
            # OpenAI's MLP ratio when the tensor is missing (then reported as missing).
            "intermediate_size": fc.shape[0] if fc is not None and fc.dim() else 4 * hidden,
            "num_hidden_layers": num_blocks(state_dict, prefix + blocks),
            "num_attention_heads": head_count(hidden, heads, option, option.split("_")[0]),
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }

    config = {
        "vision_config": {
            **tower(_VISION_BLOCKS, width, vision_heads, "vision_heads"),
            "patch_size": patch,
            "num_channels": channels,
            # Sizes the square table CLIPModel builds before tipr fits it to the grid: the
            # pretraining resolution for a square source table, else one that holds the grid.
            "image_size": patch * (side or max(grid)),
        },
        "text_config": {
            **tower(_TEXT_BLOCKS, tokens[1], text_heads, "text_heads"),
            "vocab_size": tokens[0],
            # OpenAI's BPE puts start- and end-of-text last; it pools at the highest id (argmax).
            "bos_token_id": tokens[0] - 2,
            "eos_token_id": tokens[0] - 1,
            "max_position_embeddings": text_table[0],
        },
        "projection_dim": proj[1],
    }
    return config, grid


def block_shapes(width: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The tensors of an OpenAI ``ResidualAttentionBlock`` ``width`` wide with an MLP of ``hidden``."""
    return {
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "mlp.c_fc.weight": (hidden, width),
        "mlp.c_fc.bias": (hidden,),
        "mlp.c_proj.weight": (width, hidden),
        "mlp.c_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
    }


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every OpenAI-layout backbone tensor (but the vision position table) and its shape."""
    vision, text, embed = config["vision_config"], config["text_config"], config["projection_dim"]
    width, patch, text_width = vision["hidden_size"], vision["patch_size"], text["hidden_size"]
    shapes = {
        "visual.conv1.weight": (width, vision["num_channels"], patch, patch),
        "visual.class_embedding": (width,),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "visual.proj": (width, embed),
        "token_embedding.weight": (text["vocab_size"], text_width),
        "positional_embedding": (text["max_position_embeddings"], text_width),
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed),
        "logit_scale": (),
    }
    for blocks, tower in ((_VISION_BLOCKS, vision), (_TEXT_BLOCKS, text)):
        block = block_shapes(tower["hidden_size"], tower["intermediate_size"])
        for i in range(tower["num_hidden_layers"]):
            shapes.update({f"{blocks}{i}.{key}": shape for key, shape in block.items()})
    return shapes


def clip_shape_problems(
    state_dict: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    prefix: str = "",
) -> list[str]:
    """One line per missing or misshapen backbone tensor: ``key: expected (...), found (...)``."""
    problems = []
    for key, expected in _expected_shapes(config).items():
        tensor = state_dict.get(prefix + key)
        if tensor is None:
            if key not in _OPTIONAL:
                problems.append(f"{prefix}{key}: missing, expected {expected}")
        elif tuple(tensor.shape) != expected:
            problems.append(f"{prefix}{key}: expected {expected}, found {tuple(tensor.shape)}")
    for blocks, tower in ((_VISION_BLOCKS, "vision_config"), (_TEXT_BLOCKS, "text_config")):
        if config[tower]["num_hidden_layers"] == 0:
            problems.append(f"{prefix}{blocks}0.*: missing, no residual block found")

    width, patch = config["vision_config"]["hidden_size"], config["vision_config"]["patch_size"]
    rows = 1 + grid[0] * grid[1]
    key, table = prefix + _VISION_TABLE, state_dict.get(prefix + _VISION_TABLE)
    if table is None:
        problems.append(f"{key}: missing, expected {(rows, width)}")
    elif table.dim() != 2 or table.shape[1] != width or (
        table.shape[0] != rows and _square_side(table.shape[0] - 1) is None
    ):
        problems.append(
            f"{key}: expected {(rows, width)} (the {grid[0]}x{grid[1]} patch grid of image_size "
            f"{tuple(image_size)} with patch {patch}) or a square OpenAI table (1 + n*n, {width}), "
            f"found {tuple(table.shape)} (give the image_size it was trained at; IRRA's stride_size must "
            f"equal the patch size)"
        )
    return problems


def describe_clip(config: dict[str, Any], grid: tuple[int, int]) -> str:
    """One line for people: widths, layers, heads, patch, grid, context, vocabulary, embedding."""
    vision, text = config["vision_config"], config["text_config"]
    return (
        f"ViT CLIP: vision {vision['hidden_size']} wide x {vision['num_hidden_layers']} layers, "
        f"heads {vision['num_attention_heads']}, patch {vision['patch_size']}, grid {grid[0]}x{grid[1]}; text "
        f"{text['hidden_size']} wide x {text['num_hidden_layers']} layers, heads {text['num_attention_heads']}, "
        f"context {text['max_position_embeddings']}, vocabulary "
        f"{text['vocab_size']} (end-of-text {text['eos_token_id']}); embedding {config['projection_dim']}"
    )


def mismatch_message(problems: list[str], config: dict[str, Any], grid: tuple[int, int]) -> str:
    """The one error for every tensor that does not fit, one indented line each."""
    return (
        f"{len(problems)} tensor(s) do not fit the model the checkpoint's shapes describe "
        f"({describe_clip(config, grid)}):\n" + "\n".join(f"  {line}" for line in problems)
    )


def _map_clip(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    config: dict[str, Any],
    grid: tuple[int, int],
    interpolation: str,
) -> ConvertedCLIP:
    """The mapping itself, on a state dict whose shapes were checked."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(prefix + key)
        return state_dict[prefix + key].float()  # fp16 checkpoints (IRRA, OpenAI) become fp32

    hf: dict[str, torch.Tensor] = {}
    for key, target in _GLOBAL_KEYS.items():
        if prefix + key in state_dict:  # only the optional logit_scale can be absent here
            value = take(key)
            hf[target] = value.t().contiguous() if key in _TRANSPOSED else value
    for blocks, layers in _HF_LAYERS.items():
        tower = config["vision_config" if blocks == _VISION_BLOCKS else "text_config"]
        for i in range(tower["num_hidden_layers"]):
            source, target = f"{blocks}{i}.", f"{layers}{i}."
            for kind in ("weight", "bias"):
                # nn.MultiheadAttention stacks the q, k, v projections in that order: (3W, ...).
                for name, part in zip("qkv", take(f"{source}attn.in_proj_{kind}").chunk(3)):
                    hf[f"{target}self_attn.{name}_proj.{kind}"] = part
            for key, new in _BLOCK_KEYS.items():
                hf[target + new] = take(source + key)

    notes = []
    table = take(_VISION_TABLE)  # (1 + n, W)
    if table.shape[0] != 1 + grid[0] * grid[1]:
        side = _square_side(table.shape[0] - 1)
        table = resize_position_embedding(table, grid, interpolation=interpolation)
        notes.append(
            f"vision position table resized ({interpolation}) from the square {side}x{side} grid to {grid[0]}x{grid[1]}"
        )
    hf[_HF_VISION_TABLE] = table
    unused = sorted(key for key in state_dict if key.startswith(prefix) and key not in used)
    return ConvertedCLIP(config=config, state_dict=hf, unused=unused, notes=notes)
