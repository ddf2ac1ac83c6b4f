"""Reading checkpoints of the methods' authors' code and OpenAI CLIP files into a tipr model.

The IRRA code (and SEN, built on it) saves ``torch.save({"model": state_dict,
"optimizer": ..., "epoch": ...})``; its CLIP backbone sits under ``base_model.``
in OpenAI's layout (:mod:`tipr.convert.openai_clip`), next to the ID classifier
(``classifier.*``) and the method's own heads. The method is told by its keys
(each method's ``reference_markers``, :func:`tipr.methods.detect_reference_method`),
and the method's conversion table maps its heads (``tipr/methods/<name>/convert.py``).
OpenAI's ``clip`` package (TorchScript archives included) and ``open_clip`` use
the backbone's layout without the prefix; such a file has no heads and becomes
the ``method`` asked for (SEN by default) with fresh heads.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tipr.convert.openai_clip import (
    HeadCountError,
    clip_shape_problems,
    convert_openai_clip_state_dict,
    describe_clip,
    head_count,
    infer_clip_config,
    mismatch_message,
)
from tipr.model.config import EncoderConfig

#: Where IRRA/SEN checkpoints keep the CLIP backbone (their ``self.base_model``).
REFERENCE_PREFIX = "base_model."

_EXPECTED_FILE = (
    "expected a torch.save'd IRRA/SEN checkpoint ({'model': state dict}), a CLIP state dict in OpenAI's layout "
    "(keys such as 'visual.conv1.weight', optionally under 'base_model.' or 'module.') or an OpenAI CLIP "
    "TorchScript archive"
)
#: :class:`EncoderConfig` fields the loader sets itself (the others may be ``settings``).
_OWN_FIELDS = ("clip", "num_classes", "image_size", "text_length")
#: The method of a file without heads (a bare CLIP) when none is asked for.
DEFAULT_METHOD = "sen"


@dataclass
class HeadConversion:
    """What a method's ``convert_heads`` did: modules loaded (for people), modules left fresh
    (name -> why), the source keys it used, and its heads' shapes (name -> (value, where from))."""

    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    architecture: dict[str, tuple[Any, str]] = field(default_factory=dict)


def assumed_heads(width: str, rule: str, option: str | None) -> str:
    """How a head count a checkpoint cannot show was chosen, for the report."""
    override = f"override with --{option}" if option else "tipr builds no other"
    return f"assumed {width} / 64 ({rule}; a checkpoint cannot show it): {override}"


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
        architecture: every architecture value the model was built with -> ``(value, how it was
            chosen)``: read off a tensor, given, or assumed (the head counts: no tensor shows them).
    """

    source: Path
    layout: str
    backbone: str
    loaded: list[str]
    reinitialised: dict[str, str]
    unused: list[str]
    notes: list[str]
    architecture: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {self.source} ({self.layout})", f"  backbone: {self.backbone}"]
        lines += ["  architecture:"] * bool(self.architecture)
        lines += [f"    {name} = {value}: {how}" for name, (value, how) in self.architecture.items()]
        lines.append(f"  loaded: {', '.join(self.loaded)}")
        lines += [f"  note: {note}" for note in self.notes]
        for name, reason in self.reinitialised.items():
            lines.append(f"  re-initialised: {name} ({reason})")
        groups = ", ".join(_group_keys(self.unused)) or "none"
        lines.append(f"  unused source keys ({len(self.unused)}): {groups}")
        return "\n".join(lines)


def _backbone_architecture(config: dict[str, Any], grid: tuple[int, int], prefix: str,
                           given: Mapping[str, int | None]) -> dict[str, tuple[Any, str]]:
    """The backbone's architecture values and where each comes from (the report's)."""
    vision, text = config["vision_config"], config["text_config"]
    entries: dict[str, tuple[Any, str]] = {}
    for name, tower, blocks, anchor in (("vision", vision, "visual.transformer.resblocks.", "visual.conv1.weight"),
                                        ("text", text, "transformer.resblocks.", "token_embedding.weight")):
        option, layers = f"{name}_heads", tower["num_hidden_layers"]
        entries[f"{name} width"] = (tower["hidden_size"], f"read off {prefix}{anchor}")
        entries[f"{name} layers"] = (layers, f"read off {prefix}{blocks}0..{layers - 1}")
        entries[f"{name} MLP"] = (tower["intermediate_size"], f"read off {prefix}{blocks}0.mlp.c_fc.weight")
        heads = tower["num_attention_heads"]
        entries[f"{name} heads"] = (heads, f"given ({option})" if given.get(option) is not None else
                                    assumed_heads("width", "OpenAI's rule", option))
        if name == "vision":
            entries["patch"] = (vision["patch_size"], f"read off {prefix}{anchor}")
            entries["patch grid"] = (f"{grid[0]}x{grid[1]}", "image_size / patch")
    entries["vocabulary"] = (text["vocab_size"], f"read off {prefix}token_embedding.weight")
    entries["end-of-text id"] = (text["eos_token_id"], "the highest id (OpenAI's argmax pooling)")
    entries["context"] = (text["max_position_embeddings"], f"read off {prefix}positional_embedding")
    entries["embedding"] = (config["projection_dim"], f"read off {prefix}visual.proj")
    entries["activation, LayerNorm eps"] = ("QuickGELU, 1e-05", "assumed (OpenAI's; a checkpoint cannot show them)")
    return entries


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
    method: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    **settings: Any,
):
    """A tipr model carrying the weights of an authors' (IRRA, SEN) checkpoint or OpenAI CLIP, and its report.

    Args:
        path: ``torch.save`` file: ``{"model": state dict}`` with the CLIP under
            ``base_model.`` (IRRA/SEN), the bare state dict, or OpenAI CLIP
            weights (state dict or TorchScript archive); ``module.`` is stripped.
        image_size: model input ``(H, W)``; the position table must fit its grid
            or be a square OpenAI table (then resized with ``position_interpolation``).
        text_length: token positions per caption; the source's context (77) when None.
        num_classes: ID classifier size; the source classifier's when None. A
            source classifier of another size is left out (re-initialised).
        method: the method to build (``"sen"``, ``"irra"``); None tells it from the
            file's heads (a bare CLIP: SEN). A method that extends the file's (SEN from an
            IRRA file) takes its CLIP and classifier and starts its own heads fresh; any
            other method's heads are an error.
        vision_heads, text_heads: the attention heads the source's vision / text tower was
            trained with. No tensor shows them (any count dividing the width fits); the
            default is OpenAI's ``width // 64``, which IRRA's and SEN's code use too.
        settings: :class:`~tipr.model.EncoderConfig` fields (``position_interpolation``,
            ``reference_fp16_weights``) and the method config's fields (``temperature``,
            ...). Head depths (SEN's ``restoration_depth``, IRRA's ``cross_modal_depth``)
            default to the file's; another value leaves that head out (re-initialised).
            SEN's ``restoration_heads`` is the source TIR head's count (default: the
            embedding width // 64, as SEN's code); IRRA's cross-modal heads are always
            the embedding width // 64 (IRRA's code; tipr's ``IRRAModel`` builds no other).

    Returns:
        ``(model, report)``: the model (train mode, fp32 unless ``reference_fp16_weights``)
        has the inferred ``CLIPConfig`` in its config, so ``model.save_pretrained``
        writes a folder that reloads offline; the method's heads are loaded too. Heads
        without matching weights keep their fresh initialisation, which the
        :class:`ConversionReport` names with the unused source keys; its ``architecture``
        lists every shape the model was built with and how it was chosen.

    Raises:
        FileNotFoundError / ValueError naming ``path``; a ``ValueError`` for tensors
        that do not fit lists every one of them with expected and found shapes; a
        :class:`~tipr.convert.openai_clip.HeadCountError` (a ``ValueError``) for a head
        count that does not divide its width, naming the setting, the value and the width.
        TypeError for a ``settings`` name that is neither an encoder nor a method field.
    """
    from tipr.methods import detect_reference_method, method_spec

    path = Path(path)
    image_size = (int(image_size[0]), int(image_size[1]))
    classes_given = num_classes is not None
    state = read_state_dict(path)
    try:
        detected = detect_reference_method(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    spec = method_spec(method or detected or DEFAULT_METHOD, source="method")
    if method is not None and detected is not None and detected != method and detected not in spec.extends:
        raise ValueError(f"{path}: holds the heads of {detected!r}, which {method!r} does not build on "
                         f"(method={method!r}); expected method={detected!r}")
    encoder_fields = {f.name for f in fields(EncoderConfig)} - set(_OWN_FIELDS)
    method_fields = {f.name for f in fields(spec.config_class)}
    unknown = sorted(set(settings) - encoder_fields - method_fields)
    if unknown:
        raise TypeError(f"load_reference_checkpoint got unknown setting(s) {unknown}; expected some of "
                        f"{sorted(encoder_fields | method_fields)}")
    encoder_settings = {k: v for k, v in settings.items() if k in encoder_fields}
    method_settings = {k: v for k, v in settings.items() if k in method_fields}
    prefix = REFERENCE_PREFIX if any(key.startswith(REFERENCE_PREFIX) for key in state) else ""
    try:
        config, grid = infer_clip_config(state, image_size, prefix, vision_heads, text_heads)
        for key, value in method_settings.items():  # every method head is the embedding wide
            if key.endswith("_heads") and value is not None:
                head_count(config["projection_dim"], value, key, "embedding")
        problems = clip_shape_problems(state, config, grid, image_size, prefix)
        problems += _classifier_problems(state, config["projection_dim"])
        read, head_problems = spec.reference_settings(state, config, grid)
        problems += head_problems
        for key, value in read.items():
            method_settings.setdefault(key, value)  # the caller's, else the source's
        if problems:
            raise ValueError(mismatch_message(problems, config, grid))
        source_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
        if num_classes is None and source_classes is None:
            raise ValueError(
                "has no ID classifier ('classifier.weight') to take the number of identities from: give "
                "num_classes (--num_classes), the training identities of the data it will be trained on"
            )
        num_classes = int(num_classes if num_classes is not None else source_classes)
        interpolation = encoder_settings.get("position_interpolation", "bilinear")
        clip = convert_openai_clip_state_dict(state, image_size, prefix, interpolation, vision_heads, text_heads)
        context = clip.config["text_config"]["max_position_embeddings"]
        encoder = EncoderConfig(
            clip=clip.config,
            num_classes=num_classes,
            image_size=image_size,
            text_length=context if text_length is None else int(text_length),
            **encoder_settings,
        )
        model = spec.model_class(encoder, spec.config_class(**method_settings))
    except HeadCountError as err:
        err.args = (f"{path}: {err}",)
        raise
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

    weights = dict(clip.state_dict)
    weights.setdefault("logit_scale", model.clip.logit_scale.detach().clone())
    model.clip.load_state_dict(weights)
    heads = HeadConversion(loaded=[f"CLIP backbone ({len(clip.state_dict)} tensors)"])
    if model.classifier is not None:
        if source_classes == num_classes:
            model.classifier.load_state_dict(
                {"weight": state["classifier.weight"].float(), "bias": state["classifier.bias"].float()}
            )
            heads.used |= {"classifier.weight", "classifier.bias"}
            heads.loaded.append(f"ID classifier ({num_classes} classes)")
        elif source_classes is None:
            heads.reinitialised["classifier"] = f"ID classifier: the source has none; {num_classes} classes"
        else:
            heads.reinitialised["classifier"] = (
                f"ID classifier: the source's has {source_classes} classes, num_classes is {num_classes}"
            )
    own = spec.convert_heads(state, model)
    heads.loaded += own.loaded
    heads.reinitialised.update(own.reinitialised)
    heads.used |= own.used
    architecture = _backbone_architecture(config, grid, prefix, {"vision_heads": vision_heads,
                                                                 "text_heads": text_heads})
    architecture["image size"] = (f"{image_size[0]}x{image_size[1]}", "the image_size asked for")
    architecture["text length"] = (encoder.text_length, "given (text_length)" if text_length else "the context")
    architecture["ID classes"] = (num_classes, "given (num_classes)" if classes_given else "read off classifier.weight")
    architecture.update(own.architecture)
    outside = [key for key in state if prefix and not key.startswith(prefix)]
    unused = sorted(key for key in [*clip.unused, *outside] if key not in heads.used)
    name = spec.config_class.display_name
    source = spec.name if detected is None else method_spec(detected).config_class.display_name
    layout = (f"{source} checkpoint, CLIP under '{REFERENCE_PREFIX}'" if prefix and detected else
              f"checkpoint with CLIP under '{REFERENCE_PREFIX}' (as {name})" if prefix else
              f"OpenAI CLIP state dict (as {name})")
    report = ConversionReport(
        source=path,
        layout=layout,
        backbone=describe_clip(config, grid),
        loaded=heads.loaded,
        reinitialised=heads.reinitialised,
        unused=unused,
        notes=clip.notes,
        architecture=architecture,
    )
    return model, report
