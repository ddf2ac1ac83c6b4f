"""Files of a pretrained folder: finding them (local folder or hub id), loading weights strictly, its model card."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def pretrained_files(
    name_or_path: str | Path,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> dict[str, Path]:
    """Local paths of ``filenames`` from a folder, or downloaded from a hub id.

    A value that exists on disk, looks like a path (starts with ``.``, ``/`` or
    ``~``) or cannot be a hub id (``outputs/run/pretrained``) is a folder and never
    touches the network; a missing file names the
    folder and the file.
    """
    text = str(name_or_path)
    folder = Path(text).expanduser()
    if folder.exists() or text.startswith((".", "/", "~")) or not _hub_id(text):
        if not folder.is_dir():
            what = "no such folder" if not folder.exists() else "not a folder"
            raise FileNotFoundError(f"{text}: {what}; expected a pretrained folder (with {', '.join(filenames)})")
        missing = [name for name in filenames if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"pretrained folder {text} lacks {', '.join(missing)}; expected a folder written by "
                f"save_pretrained, 'tipr fit' (<log_dir>/pretrained) or 'tipr convert'"
            )
        return {name: folder / name for name in filenames}
    from huggingface_hub import hf_hub_download

    def fetch(local: bool) -> dict[str, Path]:
        return {name: Path(hf_hub_download(text, name, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local, token=token)) for name in filenames}

    if local_files_only:
        try:
            return fetch(local=True)
        except Exception as e:
            raise OSError(f"the hub model {text!r} is not in the local cache ({list(filenames)}): {e}") from e
    try:
        return from_cache_or_hub(fetch, f"the hub model {text!r}", "expected a pretrained folder or a reachable hub id")
    except HubUnreachableError:
        raise
    except Exception as e:  # unknown repo, missing file: name what was asked for
        raise OSError(f"could not fetch {list(filenames)} of the hub model {text!r}: {type(e).__name__}: {e}") from e


def _hub_id(text: str) -> bool:
    """Whether ``text`` can be a hub id (``name`` or ``namespace/name``); anything else is a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def load_weights(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load a safetensors file into ``model`` (see :func:`load_state`), then move it to ``map_location``."""
    from safetensors.torch import load_file

    load_state(model, load_file(str(path)), str(path))
    model.to(map_location)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` where every name and shape must match; errors name ``source``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                   f"shapes differ for {wrong[:3]}" if wrong else ""]
        raise ValueError(
            f"{source}: the weights do not fit the network its config describes: "
            + "; ".join(d for d in details if d)
        )
    model.load_state_dict(state, strict=True)


class HubUnreachableError(OSError):
    """A model that is not in the local cache, and a hub that cannot be reached."""


def from_cache_or_hub(load: Callable[[bool], T], what: str, hint: str) -> T:
    """``load(True)`` (local files only: a folder, or the Hugging Face cache); when that fails, ``load(False)``
    if the hub can be reached, else a :class:`HubUnreachableError` at once naming ``what`` and ``hint`` (:func:`hub_unreachable`)."""
    try:
        return load(True)
    except Exception:
        pass
    offline = hub_unreachable()
    if offline:
        raise HubUnreachableError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached ({offline}); {hint}")
    return load(False)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (``HF_HUB_OFFLINE``, no route, no name service), or None.

    One request, no retries: ``huggingface_hub`` retries a failed download with
    back-off (about 30 s in all) before it gives up, so a model that is not in the
    local cache is looked up here first and the error comes at once.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # httpx's connection and timeout errors; the hub's own errors mean it answered
        if type(e).__module__.split(".")[0].startswith("httpx") or isinstance(e, OSError):
            return f"{constants.ENDPOINT}: {type(e).__name__}: {e}"
    return None


#: The model card of a pretrained folder (the Hugging Face hub shows it as the model's page).
CARD_FILE = "README.md"


def model_card_text(model, card_data, model_id: str | None = None) -> str:
    """A pretrained folder's ``README.md``: ``card_data``'s YAML front matter and what the model is.

    Everything comes from ``model`` (the method's name and description, the
    backbone's shape, image size, text length, embedding width, loss weights), so
    no method is named here. ``model_id``: the hub id the card is uploaded to
    (the load lines then name it); a local folder otherwise.
    """
    from importlib import import_module

    from tipr.methods import METHODS

    config, clip = model.config, model.clip.config
    vision, text = clip.vision_config, clip.text_config
    name = config.display_name or config.name
    doc = (import_module(METHODS[config.name]).__doc__ or "").strip().splitlines() if config.name in METHODS else []
    method = doc[0].rstrip(".") if doc and doc[0].startswith(name) else name  # "SEN (authors, venue): what it does"
    height, width = model.image_size
    weights = ", ".join(f"{term} {weight:g}" for term, weight in config.loss_weights.items() if weight)
    source, cli = (json.dumps(model_id), model_id) if model_id else ("folder", "<folder>")
    lines = [
        f"# {name} text-to-image person retrieval model (tipr)",
        "",
        "A text-to-image person retrieval model saved by tipr: a CLIP dual encoder that ranks images of people",
        "by how well they match a text description (cosine similarity of the text and image embeddings).",
        "",
        f"- Method: {method} (`model_type: {config.name}` in `config.json`, loaded as `{type(model).__name__}`)",
        f"- Backbone: CLIP ViT, vision encoder {vision.num_hidden_layers} layers x {vision.hidden_size} "
        f"({vision.num_attention_heads} heads, patch {vision.patch_size}), text encoder {text.num_hidden_layers} "
        f"layers x {text.hidden_size} ({text.num_attention_heads} heads)",
        f"- Image size: {height} x {width} (height x width), {height // vision.patch_size} x "
        f"{width // vision.patch_size} patches",
        f"- Text length: {model.text_length} tokens",
        f"- Embedding dimension: {model.embed_dim}",
    ]
    if weights:
        lines.append(f"- Training loss weights: {weights}")
    if model.num_classes:
        lines.append(f"- ID classifier: {model.num_classes} training identities (training only; retrieval does not use it)")
    where = (f"`{model_id}` is downloaded once into the hub cache, then read from there" if model_id else
             "`folder` (`<folder>` on the command line) is the path of this folder, read offline")
    lines += [
        "- Files: `config.json` (encoder and method config), `model.safetensors` (weights), the tokenizer files",
        "  and `processor_config.json` (image and text preprocessing)",
        "",
        "## Loading",
        "",
        f"With tipr installed; {where}:",
        "",
        "```python",
        "from PIL import Image",
        "from tipr.model import TIPRModel",
        "from tipr.processing import TIPRProcessor",
        "",
        f"model = TIPRModel.from_pretrained({source})  # {type(model).__name__}, in eval mode",
        f"processor = TIPRProcessor.from_pretrained({source})",
        'inputs = processor(text=["a woman in a red coat with a black backpack"], images=[Image.open("person.jpg")])',
        'scores = model.similarity(model.encode_text(inputs["input_ids"]), model.encode_image(inputs["pixel_values"]))',
        "```",
        "",
        "From the command line:",
        "",
        "```bash",
        f"tipr index --model {cli} --images photos/ --out photos.gallery",
        f'tipr search --model {cli} --gallery photos.gallery --query "a woman in a red coat" --top_k 10',
        "```",
    ]
    from huggingface_hub import ModelCardData

    data = ModelCardData(**{**card_data.to_dict(), "tags": sorted({*(card_data.tags or []), config.name})})
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def is_tipr_card(path: Path) -> bool:
    """Whether ``path`` is a model card tipr (or ``huggingface_hub``'s mixin for tipr) wrote: front matter
    with ``library_name: tipr``. Such a card describes the weights beside it and is rewritten with them."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    front = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return "\nlibrary_name: tipr\n" in front + "\n"
