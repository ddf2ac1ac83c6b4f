"""Reading IRRA/SEN checkpoints and OpenAI CLIP files into a :class:`tipr.model.SENModel`.

The IRRA code (and SEN, built on it) saves ``torch.save({"model": state_dict,
"optimizer": ..., "epoch": ...})``; its CLIP backbone sits under ``base_model.``
in OpenAI's layout (:mod:`tipr.convert.openai_clip`), next to the ID classifier
(``classifier.*``), SEN's TIR head (:mod:`tipr.convert.tir`) and heads tipr has
no counterpart for (IRRA's MLM cross-modal modules, SEN's unused
``cross_attn_TextImage``, ``cross_attn_Image``, ``norm_3``, ``norm_5``). OpenAI's
``clip`` package (TorchScript archives included) and ``open_clip`` use the
backbone's layout without the prefix.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tipr.convert.openai_clip import (
    clip_shape_problems,
    convert_openai_clip_state_dict,
    describe_clip,
    infer_clip_config,
    mismatch_message,
)
from tipr.convert.tir import TIR_TABLE, convert_tir_state_dict, tir_depth, tir_mismatch, tir_problems
from tipr.model.config import SENConfig
from tipr.model.sen import SENModel

#: Where IRRA/SEN checkpoints keep the CLIP backbone (their ``self.base_model``).
REFERENCE_PREFIX = "base_model."

_EXPECTED_FILE = (
    "expected a torch.save'd IRRA/SEN checkpoint ({'model': state dict}), a CLIP state dict in OpenAI's layout "
    "(keys such as 'visual.conv1.weight', optionally under 'base_model.' or 'module.') or an OpenAI CLIP "
    "TorchScript archive"
)
#: :class:`SENConfig` fields the loader sets itself (the others are ``settings``).
_OWN_FIELDS = ("clip", "num_classes", "image_size", "text_length")


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
    only, never arbitrary pickled objects. Errors name ``path``.
    """
    path = Path(path)
    if path.is_dir():
        what = "a tipr pretrained folder" if (path / "model.safetensors").is_file() else "a folder"
        raise ValueError(f"{path}: is {what}, not a checkpoint file; {_EXPECTED_FILE}")
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
        raise ValueError(
            f"{path}: already a tipr (Lightning) checkpoint; use it as it is (tipr index/search --model, "
            f"tipr.pretrained.load_pretrained)"
        )
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


# ------------------------------------------------------------------ loader
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


def load_reference_checkpoint(
    path: str | Path,
    image_size: tuple[int, int] = (384, 128),
    text_length: int | None = None,
    num_classes: int | None = None,
    **settings: Any,
) -> tuple[SENModel, ConversionReport]:
    """A :class:`~tipr.model.SENModel` carrying the weights of an IRRA/SEN checkpoint or OpenAI CLIP, and its report.

    Args:
        path: ``torch.save`` file: ``{"model": state dict}`` with the CLIP under
            ``base_model.`` (IRRA/SEN), the bare state dict, or OpenAI CLIP
            weights (state dict or TorchScript archive); ``module.`` is stripped.
        image_size: model input ``(H, W)``; the position table must fit its grid
            or be a square OpenAI table (then resized with ``position_interpolation``).
        text_length: token positions per caption; the source's context (77) when None.
        num_classes: ID classifier size; the source classifier's when None. A
            source classifier of another size is left out (re-initialised).
        settings: the other :class:`~tipr.model.SENConfig` fields (``loss_weights``,
            ``temperature``, ...). ``restoration_depth`` defaults to the number of TIR
            blocks in a SEN source; another depth leaves its TIR head out (re-initialised).

    Returns:
        ``(model, report)``: the model (train mode, fp32 unless ``reference_fp16_weights``)
        has the inferred ``CLIPConfig`` in its config, so ``model.save_pretrained``
        writes a folder that reloads offline; a SEN checkpoint's TIR head is loaded
        too. Heads without matching weights (none for a full SEN checkpoint) keep
        their fresh initialisation, which the :class:`ConversionReport` names with
        the unused source keys.

    Raises:
        FileNotFoundError / ValueError naming ``path``; a ``ValueError`` for tensors
        that do not fit lists every one of them with expected and found shapes.
        TypeError for a ``settings`` name that is not a ``SENConfig`` field.
    """
    allowed = {f.name for f in fields(SENConfig)} - set(_OWN_FIELDS)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise TypeError(
            f"load_reference_checkpoint got unknown setting(s) {unknown}; expected some of {sorted(allowed)}"
        )
    path = Path(path)
    image_size = (int(image_size[0]), int(image_size[1]))
    state = read_state_dict(path)
    prefix = REFERENCE_PREFIX if any(key.startswith(REFERENCE_PREFIX) for key in state) else ""
    try:
        config, grid = infer_clip_config(state, image_size, prefix)
        problems = clip_shape_problems(state, config, grid, image_size, prefix)
        problems += _classifier_problems(state, config["projection_dim"])
        depth = tir_depth(state)
        if depth is not None:
            problems += tir_problems(state, config, grid, depth)
            settings.setdefault("restoration_depth", depth)  # the caller's, else the source's
        if problems:
            raise ValueError(mismatch_message(problems, config, grid))
        source_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
        if num_classes is None and source_classes is None:
            raise ValueError(
                "has no ID classifier ('classifier.weight') to take the number of identities from: give "
                "num_classes (--num_classes), the training identities of the data it will be trained on"
            )
        num_classes = int(num_classes if num_classes is not None else source_classes)
        interpolation = settings.get("position_interpolation", "bilinear")
        clip = convert_openai_clip_state_dict(state, image_size, prefix, interpolation=interpolation)
        context = clip.config["text_config"]["max_position_embeddings"]
        model = SENModel(SENConfig(
            clip=clip.config,
            num_classes=num_classes,
            image_size=image_size,
            text_length=context if text_length is None else int(text_length),
            **settings,
        ))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

    weights = dict(clip.state_dict)
    weights.setdefault("logit_scale", model.clip.logit_scale.detach().clone())
    model.clip.load_state_dict(weights)
    loaded = [f"CLIP backbone ({len(clip.state_dict)} tensors)"]
    reinitialised: dict[str, str] = {}
    used_outside: set[str] = set()
    if model.classifier is not None:
        if source_classes == num_classes:
            model.classifier.load_state_dict(
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
    if model.restoration is not None:
        mismatch = None if depth is None else tir_mismatch(model.restoration, state, depth)
        if depth is None:
            reinitialised["restoration"] = "TIR head: no counterpart in the source"
        elif mismatch is not None:
            reinitialised["restoration"] = f"TIR head: {mismatch}"
        else:
            tir_weights, tir_used = convert_tir_state_dict(state, depth)
            model.restoration.load_state_dict(tir_weights)
            used_outside |= tir_used
            loaded.append(f"TIR head ({depth} blocks; its {TIR_TABLE} equals tipr's fixed table)")
    outside = [key for key in state if prefix and not key.startswith(prefix)]
    unused = sorted(key for key in [*clip.unused, *outside] if key not in used_outside)
    layout = f"IRRA/SEN checkpoint, CLIP under '{REFERENCE_PREFIX}'" if prefix else "OpenAI CLIP state dict"
    report = ConversionReport(
        source=path,
        layout=layout,
        backbone=describe_clip(config, grid),
        loaded=loaded,
        reinitialised=reinitialised,
        unused=unused,
        notes=clip.notes,
    )
    return model, report
