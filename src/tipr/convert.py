"""Import checkpoints trained with the public IRRA/SEN code, and plain OpenAI CLIP weights.

The IRRA code (and SEN, built on it) saves ``torch.save({"model": state_dict,
"optimizer": ..., "epoch": ...})``; its CLIP backbone sits under ``base_model.``
in OpenAI's layout, next to the ID classifier (``classifier.*``), SEN's
text-guided restoration (TIR) head and heads tipr has no counterpart for
(IRRA's MLM cross-modal modules, SEN's unused ``cross_attn_TextImage``,
``cross_attn_Image``, ``norm_3``, ``norm_5``). OpenAI's ``clip`` package
(TorchScript archives included) and ``open_clip`` use the backbone's layout
without the prefix. This module maps the backbone onto the Hugging Face
``CLIPModel`` inside :class:`tipr.model.SENNetwork`:

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
``width // 64`` heads, QuickGELU, LayerNorm eps 1e-5, a causal text mask and
pooling at the end-of-text token, the highest id (``argmax``): for a vocabulary
of V ids (``token_embedding.weight``) end-of-text is V - 1 and start-of-text
V - 2 (49407 and 49406 for OpenAI's 49,408), written into the config's
``eos_token_id`` / ``bos_token_id``. Every shape (widths, layers, MLP sizes,
patch, vocabulary, context, embedding) is read off the tensors.

SEN's TIR head (top level of the state dict, all ``E`` wide) maps onto
``SENNetwork.restoration`` (:class:`tipr.model.restoration.TextGuidedRestoration`):

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

The TIR depth is the number of blocks in the file (``tir_depth`` defaults to
it; another depth leaves the head freshly initialised), its heads ``E // 64``
as the reference's. ``decoder_pos_embed`` is the reference's fixed sine-cosine
table; tipr builds the same table (:func:`tipr.model.restoration.sincos_position_table`)
as a non-persistent buffer, so the conversion checks that the two agree (within
1e-4; a different table leaves the head freshly initialised, with the reason)
instead of copying it, and a converted checkpoint reloads with the right table.

The vision position table is used as is when it has ``1 + (H/P)(W/P)`` rows
for the requested ``image_size`` (an IRRA/SEN checkpoint trained at 384 x 128:
24 x 8 patches), resized once (:func:`tipr.model.resize_position_embedding`'s
default) when it is a square OpenAI table (197 = 1 + 14 x 14 for ViT-B/16 at
224), and refused otherwise. ``logit_scale`` is copied when present (IRRA drops
it; tipr does not use it either).

    tipr convert --ckpt best.pth --out sen.ckpt           # then TIPRModule.load_from_checkpoint("sen.ckpt")
    tipr convert --ckpt ViT-B-16.pt --out clip.ckpt --num-classes 11003
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tipr.model.backbone import resize_position_embedding

if TYPE_CHECKING:
    from tipr.model.lightning_module import TIPRModule

#: Where IRRA/SEN checkpoints keep the CLIP backbone (their ``self.base_model``).
REFERENCE_PREFIX = "base_model."
#: OpenAI CLIP has ``width // 64`` attention heads; the weights do not record it.
OPENAI_HEAD_WIDTH = 64

_EXPECTED_FILE = (
    "expected a torch.save'd IRRA/SEN checkpoint ({'model': state dict}), a CLIP state dict in OpenAI's layout "
    "(keys such as 'visual.conv1.weight', optionally under 'base_model.' or 'module.') or an OpenAI CLIP "
    "TorchScript archive"
)
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


#: SEN's text-guided restoration (TIR) head, at the top level of its state dict ->
#: ``SENNetwork.restoration`` (:class:`tipr.model.restoration.TextGuidedRestoration`).
_TIR_KEYS = {
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
_TIR_TABLE = "decoder_pos_embed"
_TIR_BLOCKS = "cross_modal_transformer_mae.resblocks."
_TIR_LAYERS = "transformer."
#: Inside a TIR block: an OpenAI residual block -> a timm ``Block`` (the same q, k, v row order).
_TIR_BLOCK_KEYS = {
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
#: A table equal to tipr's within this is the same fixed table (a different one differs by O(1)).
_TABLE_ATOL = 1e-4


# --------------------------------------------------------------- pure mapping
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
) -> ConvertedCLIP:
    """Map the OpenAI-layout CLIP under ``prefix`` (``""`` or ``"base_model."``) to Hugging Face names.

    Keys outside ``prefix`` are ignored (the caller owns them). Raises ``ValueError``
    when the shapes cannot be read off the tensors, and one ``ValueError`` listing
    every missing or misshapen tensor (expected vs found shape) otherwise.
    """
    config, grid = _infer_config(state_dict, prefix, image_size)
    problems = _shape_problems(state_dict, prefix, config, grid, image_size)
    if problems:
        raise ValueError(_mismatch_message(problems, config, grid))
    return _map_clip(state_dict, prefix, config, grid)


def _square_side(num_patches: int) -> int | None:
    side = math.isqrt(num_patches) if num_patches > 0 else 0
    return side if side and side * side == num_patches else None


def _num_blocks(state_dict: Mapping[str, torch.Tensor], blocks: str) -> int:
    pattern = re.compile(re.escape(blocks) + r"(\d+)\.")
    found = [int(m.group(1)) for key in state_dict if (m := pattern.match(key))]
    return max(found) + 1 if found else 0


def _infer_config(
    state_dict: Mapping[str, torch.Tensor], prefix: str, image_size: tuple[int, int]
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``CLIPConfig`` arguments from the tensor shapes, and the ``(H/P, W/P)`` patch grid."""
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

    def tower(blocks: str, hidden: int) -> dict[str, int]:
        fc = state_dict.get(f"{prefix}{blocks}0.mlp.c_fc.weight")
        return {
            "hidden_size": hidden,
            # OpenAI's MLP ratio when the tensor is missing (then reported as missing).
            "intermediate_size": fc.shape[0] if fc is not None and fc.dim() else 4 * hidden,
            "num_hidden_layers": _num_blocks(state_dict, prefix + blocks),
            "num_attention_heads": hidden // OPENAI_HEAD_WIDTH,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }

    config = {
        "vision_config": {
            **tower(_VISION_BLOCKS, width),
            "patch_size": patch,
            "num_channels": channels,
            # Sizes the square table CLIPModel builds before tipr fits it to the grid: the
            # pretraining resolution for a square source table, else one that holds the grid.
            "image_size": patch * (side or max(grid)),
        },
        "text_config": {
            **tower(_TEXT_BLOCKS, tokens[1]),
            "vocab_size": tokens[0],
            # OpenAI's BPE puts start- and end-of-text last; it pools at the highest id (argmax).
            "bos_token_id": tokens[0] - 2,
            "eos_token_id": tokens[0] - 1,
            "max_position_embeddings": text_table[0],
        },
        "projection_dim": proj[1],
    }
    return config, grid


def _block_shapes(width: int, hidden: int) -> dict[str, tuple[int, ...]]:
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
        block = _block_shapes(tower["hidden_size"], tower["intermediate_size"])
        for i in range(tower["num_hidden_layers"]):
            shapes.update({f"{blocks}{i}.{key}": shape for key, shape in block.items()})
    return shapes


def _shape_problems(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    config: dict[str, Any],
    grid: tuple[int, int],
    image_size: tuple[int, int],
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


def _describe(config: dict[str, Any], grid: tuple[int, int]) -> str:
    vision, text = config["vision_config"], config["text_config"]
    return (
        f"ViT CLIP: vision {vision['hidden_size']} wide x {vision['num_hidden_layers']} layers, patch "
        f"{vision['patch_size']}, grid {grid[0]}x{grid[1]}; text {text['hidden_size']} wide x "
        f"{text['num_hidden_layers']} layers, context {text['max_position_embeddings']}, vocabulary "
        f"{text['vocab_size']} (end-of-text {text['eos_token_id']}); embedding {config['projection_dim']}"
    )


def _mismatch_message(problems: list[str], config: dict[str, Any], grid: tuple[int, int]) -> str:
    return (
        f"{len(problems)} tensor(s) do not fit the model the checkpoint's shapes describe "
        f"({_describe(config, grid)}):\n" + "\n".join(f"  {line}" for line in problems)
    )


def _map_clip(
    state_dict: Mapping[str, torch.Tensor], prefix: str, config: dict[str, Any], grid: tuple[int, int]
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
        table = resize_position_embedding(table, grid)
        notes.append(f"vision position table resized from the square {side}x{side} grid to {grid[0]}x{grid[1]}")
    hf[_HF_VISION_TABLE] = table
    unused = sorted(key for key in state_dict if key.startswith(prefix) and key not in used)
    return ConvertedCLIP(config=config, state_dict=hf, unused=unused, notes=notes)


# ------------------------------------------------------------------- files
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict in ``path``: a ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoint,
    a bare state dict, or a TorchScript archive; a ``module.`` (DDP) prefix is stripped.

    Files are read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, never arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {_EXPECTED_FILE}")
    if _is_torchscript(path):  # OpenAI's published CLIP files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as err:  # foreign bytes fail in the unpickler in many ways (IndexError, EOFError...)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = ""
            if "Weights only load failed" in str(err):
                hint = (
                    ". It holds pickled Python objects besides tensors; if you trust the file, keep just the "
                    "weights: torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)"
                )
            raise ValueError(
                f"{path}: not a checkpoint torch.load can read ({reason}); {_EXPECTED_FILE}{hint}"
            ) from err
        state = _unwrap(checkpoint, path)
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _unwrap(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and "pytorch-lightning_version" in checkpoint:
        raise ValueError(f"{path}: already a Lightning checkpoint; load it with TIPRModule.load_from_checkpoint")
    for wrapper in ("model", "state_dict"):  # IRRA/SEN, open_clip training checkpoints
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}; {_EXPECTED_FILE}")
    if not checkpoint:
        raise ValueError(f"{path}: holds an empty state dict; {_EXPECTED_FILE}")
    foreign = [
        key for key, value in checkpoint.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if foreign:
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor), but {len(foreign)} entries are not tensors "
            f"(e.g. {foreign[:5]}); {_EXPECTED_FILE}"
        )
    return dict(checkpoint)


# ----------------------------------------------------------------- report
def _group_keys(keys: Sequence[str]) -> list[str]:
    """``cross_attn.* (4)``-style groups by top-level module (under ``base_model.``: second level)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] + "." == REFERENCE_PREFIX and len(parts) > 2 else 1
        groups.setdefault(".".join(parts[:depth]), []).append(key)
    return [members[0] if len(members) == 1 else f"{head}.* ({len(members)})" for head, members in groups.items()]


@dataclass
class ConversionReport:
    """What a conversion did, for people: ``print(report)``.

    Attributes:
        source: the converted file.
        layout: how the CLIP weights were stored there.
        backbone: the CLIP read off the tensor shapes.
        loaded: the tipr modules that got the source's weights.
        reinitialised: tipr module -> why it kept its fresh initialisation.
        unused: source keys that were not loaded (sorted).
        notes: changes made on the way (a resized position table).
    """

    source: Path
    layout: str
    backbone: str
    loaded: list[str]
    reinitialised: dict[str, str]
    unused: list[str]
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"converted {self.source} ({self.layout})", f"  backbone: {self.backbone}"]
        lines.append(f"  loaded: {', '.join(self.loaded)}")
        lines += [f"  note: {note}" for note in self.notes]
        for name, reason in self.reinitialised.items():
            lines.append(f"  re-initialised: {name} ({reason})")
        groups = ", ".join(_group_keys(self.unused)) or "none"
        lines.append(f"  unused source keys ({len(self.unused)}): {groups}")
        return "\n".join(lines)


# ------------------------------------------------------------------ module
def _classifier_problems(state_dict: Mapping[str, torch.Tensor], embed_dim: int) -> list[str]:
    weight, bias = state_dict.get("classifier.weight"), state_dict.get("classifier.bias")
    if weight is None and bias is None:
        return []
    present = weight if weight is not None else bias
    rows = present.shape[0] if present.dim() else 0
    problems = []
    for key, tensor, expected in (("classifier.weight", weight, (rows, embed_dim)), ("classifier.bias", bias, (rows,))):
        if tensor is None:
            problems.append(f"{key}: missing, expected {expected}")
        elif tuple(tensor.shape) != expected:
            problems.append(f"{key}: expected {expected}, found {tuple(tensor.shape)}")
    return problems


def _tir_modules() -> set[str]:
    return {key.split(".")[0] for key in _TIR_KEYS} | {_TIR_TABLE, _TIR_BLOCKS.split(".")[0]}


def _has_tir(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the source holds (some of) SEN's TIR head."""
    modules = _tir_modules()
    return any(key.split(".")[0] in modules for key in state_dict)


def _tir_shapes(config: dict[str, Any], grid: tuple[int, int], depth: int) -> dict[str, tuple[int, ...]]:
    """Every TIR tensor of the reference and its shape: all ``D`` wide (the projection width)."""
    dim, patch = config["projection_dim"], config["vision_config"]["patch_size"]
    pixels = patch * patch * config["vision_config"]["num_channels"]
    shapes = {key: (dim,) for key in _TIR_KEYS if key.startswith("norm_")}
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
        _TIR_TABLE: (1, 1 + grid[0] * grid[1], dim),
    })
    block = _block_shapes(dim, 4 * dim)  # OpenAI's Transformer: MLP ratio 4
    for i in range(depth):
        shapes.update({f"{_TIR_BLOCKS}{i}.{key}": shape for key, shape in block.items()})
    return shapes


def _tir_problems(
    state_dict: Mapping[str, torch.Tensor], config: dict[str, Any], grid: tuple[int, int], depth: int
) -> list[str]:
    """One line per missing or misshapen TIR tensor, as :func:`_shape_problems`."""
    problems = []
    for key, expected in _tir_shapes(config, grid, depth).items():
        tensor = state_dict.get(key)
        if tensor is None:
            problems.append(f"{key}: missing, expected {expected}")
        elif tuple(tensor.shape) != expected:
            hint = f" (the {grid[0]}x{grid[1]} patch grid)" if key == _TIR_TABLE else ""
            problems.append(f"{key}: expected {expected}{hint}, found {tuple(tensor.shape)}")
    if depth == 0:
        problems.append(f"{_TIR_BLOCKS}0.*: missing, no TIR block found")
    return problems


def _tir_weights(state_dict: Mapping[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The TIR head under ``TextGuidedRestoration`` names (fp32), and the source keys it takes."""
    weights = {new: state_dict[old].float() for old, new in _TIR_KEYS.items()}
    used = {*_TIR_KEYS, _TIR_TABLE}
    for i in range(depth):
        for old, new in _TIR_BLOCK_KEYS.items():
            weights[f"{_TIR_LAYERS}{i}.{new}"] = state_dict[f"{_TIR_BLOCKS}{i}.{old}"].float()
            used.add(f"{_TIR_BLOCKS}{i}.{old}")
    return weights, used


def _tir_mismatch(restoration: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], depth: int) -> str | None:
    """Why the source's TIR head cannot be loaded into ``restoration`` as trained, or None."""
    if len(restoration.transformer) != depth:
        return f"the source's has {depth} blocks, tir_depth is {len(restoration.transformer)}"
    dim = restoration.decoder_embed.out_features
    if restoration.cross_attn.num_heads != dim // OPENAI_HEAD_WIDTH:
        return (
            f"the source's has {dim // OPENAI_HEAD_WIDTH} heads ({dim} // {OPENAI_HEAD_WIDTH}), this one "
            f"{restoration.cross_attn.num_heads}"
        )
    table = state_dict[_TIR_TABLE][0].float()
    difference = (table - restoration.pos_embed[0].float()).abs().max().item()
    if difference > _TABLE_ATOL:
        grid = restoration.grid_size
        return (
            f"the source's {_TIR_TABLE} is not the fixed sine-cosine table of the {grid[0]}x{grid[1]} grid "
            f"(max abs difference {difference:.3g})"
        )
    return None


def load_reference_checkpoint(
    path: str | Path,
    image_size: tuple[int, int] = (384, 128),
    text_length: int | None = None,
    num_classes: int | None = None,
    *,
    module_class: type | None = None,
    **module_kwargs: Any,
) -> tuple[TIPRModule, ConversionReport]:
    """A ``TIPRModule`` carrying the weights of an IRRA/SEN checkpoint or OpenAI CLIP, and its report.

    Args:
        path: ``torch.save`` file: ``{"model": state dict}`` with the CLIP under
            ``base_model.`` (IRRA/SEN), the bare state dict, or OpenAI CLIP
            weights (state dict or TorchScript archive); ``module.`` is stripped.
        image_size: model input ``(H, W)``; the position table must fit its grid
            or be a square OpenAI table (then resized).
        text_length: token positions per caption; the source's context (77) when None.
        num_classes: ID classifier size; the source classifier's when None. A
            source classifier of another size is left out (re-initialised).
        module_class: ``TIPRModule`` (default) or a subclass.
        module_kwargs: other ``TIPRModule`` arguments (loss weights, ``lr``...).
            ``tir_depth`` defaults to the number of TIR blocks in a SEN source;
            another depth leaves its TIR head out (re-initialised).

    Returns:
        ``(module, report)``: the module's backbone is the inferred ``CLIPConfig``
        as a dict, so its checkpoints reload offline; a SEN checkpoint's TIR head
        is loaded too. Heads without matching weights (none for a full SEN
        checkpoint) keep their fresh initialisation, which the
        :class:`ConversionReport` names with the unused source keys.

    Raises:
        FileNotFoundError / ValueError naming ``path``; a ``ValueError`` for tensors
        that do not fit lists every one of them with expected and found shapes.
    """
    if module_class is None:
        from tipr.model.lightning_module import TIPRModule as module_class

    path = Path(path)
    image_size = (int(image_size[0]), int(image_size[1]))
    state = read_state_dict(path)
    prefix = REFERENCE_PREFIX if any(key.startswith(REFERENCE_PREFIX) for key in state) else ""
    try:
        config, grid = _infer_config(state, prefix, image_size)
        problems = _shape_problems(state, prefix, config, grid, image_size)
        problems += _classifier_problems(state, config["projection_dim"])
        tir_depth = _num_blocks(state, _TIR_BLOCKS) if _has_tir(state) else None
        if tir_depth is not None:
            problems += _tir_problems(state, config, grid, tir_depth)
            module_kwargs.setdefault("tir_depth", tir_depth)  # the caller's, else the source's
        if problems:
            raise ValueError(_mismatch_message(problems, config, grid))
        source_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
        if num_classes is None and source_classes is None:
            raise ValueError(
                "has no ID classifier ('classifier.weight') to take the number of identities from: give "
                "num_classes (--num-classes), the training identities of the data it will be trained on"
            )
        num_classes = int(num_classes if num_classes is not None else source_classes)
        clip = _map_clip(state, prefix, config, grid)
        context = config["text_config"]["max_position_embeddings"]
        module = module_class(
            num_classes,
            backbone=clip.config,
            image_size=image_size,
            text_length=context if text_length is None else text_length,
            **module_kwargs,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

    network = module.network
    weights = dict(clip.state_dict)
    weights.setdefault("logit_scale", network.clip.logit_scale.detach().clone())
    network.clip.load_state_dict(weights)
    loaded = [f"CLIP backbone ({len(clip.state_dict)} tensors)"]
    reinitialised: dict[str, str] = {}
    used_outside: set[str] = set()
    if network.classifier is not None:
        if source_classes == num_classes:
            network.classifier.load_state_dict(
                {"weight": state["classifier.weight"].float(), "bias": state["classifier.bias"].float()}
            )
            used_outside |= {"classifier.weight", "classifier.bias"}
            loaded.append(f"ID classifier ({num_classes} classes)")
        elif source_classes is None:
            reinitialised["classifier"] = f"ID classifier: the source has none; {num_classes} classes"
        else:
            reinitialised["classifier"] = (
                f"ID classifier: the source's has {source_classes} classes, num_classes is {num_classes}"
            )
    if network.restoration is not None:
        mismatch = None if tir_depth is None else _tir_mismatch(network.restoration, state, tir_depth)
        if tir_depth is None:
            reinitialised["restoration"] = "TIR head: no counterpart in the source"
        elif mismatch is not None:
            reinitialised["restoration"] = f"TIR head: {mismatch}"
        else:
            tir_weights, tir_used = _tir_weights(state, tir_depth)
            network.restoration.load_state_dict(tir_weights)
            used_outside |= tir_used
            loaded.append(f"TIR head ({tir_depth} blocks; its {_TIR_TABLE} equals tipr's fixed table)")
    outside = [key for key in state if prefix and not key.startswith(prefix)]
    unused = sorted(key for key in [*clip.unused, *outside] if key not in used_outside)
    layout = (
        f"IRRA/SEN checkpoint, CLIP under '{REFERENCE_PREFIX}'" if prefix else "OpenAI CLIP state dict"
    )
    report = ConversionReport(
        source=path,
        layout=layout,
        backbone=_describe(config, grid),
        loaded=loaded,
        reinitialised=reinitialised,
        unused=unused,
        notes=clip.notes,
    )
    return module, report


def save_tipr_checkpoint(module: TIPRModule, path: str | Path) -> Path:
    """Write ``module`` as a checkpoint ``TIPRModule.load_from_checkpoint(path)`` rebuilds offline.

    The dict holds what Lightning reads back (``state_dict``, ``hyper_parameters``,
    ``pytorch-lightning_version``); the module's own ``on_save_checkpoint`` stores
    the backbone as its full config, as for a checkpoint written by a Trainer.
    """
    import lightning.pytorch as pl

    path = Path(path)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------- CLI
def convert_main(argv: list[str]) -> int:
    """``tipr convert``: an IRRA/SEN or OpenAI CLIP checkpoint -> a tipr (Lightning) checkpoint."""
    parser = argparse.ArgumentParser(
        prog="tipr convert",
        description=(
            "Turn a checkpoint of the public IRRA/SEN code ({'model': state dict}, CLIP under 'base_model.') or "
            "OpenAI CLIP weights into a tipr checkpoint that TIPRModule.load_from_checkpoint reads offline. "
            "Prints the heads left freshly initialised and the source keys not used."
        ),
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="the checkpoint to convert (.pth / .pt)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the tipr checkpoint (.ckpt)")
    parser.add_argument(
        "--image-size", nargs=2, type=int, default=(384, 128), metavar=("H", "W"),
        help="model input size; the checkpoint's position table must fit it or be square (default: 384 128)",
    )
    parser.add_argument(
        "--text-length", type=int, default=None, help="token positions per caption (default: the checkpoint's context)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None,
        help="ID classifier size (default: the checkpoint classifier's; required when it has none)",
    )
    args = parser.parse_args(argv)
    if args.out.resolve() == args.ckpt.resolve():
        print(f"tipr convert: error: --out {args.out} would overwrite the checkpoint being converted", file=sys.stderr)
        return 2
    try:
        module, report = load_reference_checkpoint(
            args.ckpt, image_size=tuple(args.image_size), text_length=args.text_length, num_classes=args.num_classes
        )
        save_tipr_checkpoint(module, args.out)
    except (OSError, ValueError) as err:
        print(f"tipr convert: error: {err}", file=sys.stderr)
        return 1
    print(report)
    print(f"wrote {args.out} (load it with TIPRModule.load_from_checkpoint)")
    return 0
