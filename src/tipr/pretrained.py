"""Loading a trained model for inference, from a pretrained folder or a Lightning checkpoint.

``load_pretrained(source)`` returns ``(model, TIPRProcessor)``, the model being
the method its config names (``SENModel``, ``IRRAModel``...), from

- a pretrained folder (``save_pretrained``, ``tipr fit``'s ``<log_dir>/pretrained``,
  ``tipr convert``) or a Hugging Face hub id;
- a Lightning checkpoint file of ``TIPRModule`` (``.ckpt``), read with
  ``torch.load`` alone: Lightning is not imported.

``save_pretrained(model, processor, folder)`` writes both into one folder and
``push_to_hub(model, processor, repo_id)`` uploads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tipr.model.base import TIPRModel
from tipr.model.config import EncoderConfig, MethodConfig, parse_config
from tipr.model.hub import load_state
from tipr.processing import TIPRProcessor

#: Keys ``TIPRModule.on_save_checkpoint`` adds to a Lightning checkpoint (``sen_config``: tipr 0.2).
CHECKPOINT_CONFIG_KEY = "tipr_config"
LEGACY_CONFIG_KEY = "sen_config"
CHECKPOINT_PROCESSOR_KEY = "tipr_processor"
#: The ``TIPRModule`` attribute that holds the network (its state-dict prefix).
NETWORK_PREFIX = "network."


def save_pretrained(model: TIPRModel, processor: TIPRProcessor, folder: str | Path, *, model_id: str | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors``, the tokenizer, ``processor_config.json`` and the model
    card ``README.md`` (what the model is, how to load it; its load lines name ``model_id``, a hub id, if given)."""
    folder = Path(folder)
    model.save_pretrained(folder, model_card_kwargs={"model_id": model_id} if model_id else None)
    processor.save_pretrained(folder)
    return folder


def load_pretrained(source: str | Path, map_location: str | torch.device = "cpu") -> tuple[TIPRModel, TIPRProcessor]:
    """``(model, processor)`` from a pretrained folder, a hub id or a ``TIPRModule`` ``.ckpt`` file.

    The model is in eval mode on ``map_location``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return load_lightning_checkpoint(path, map_location)
    return TIPRModel.from_pretrained(source, map_location=map_location), TIPRProcessor.from_pretrained(source)


def load_lightning_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TIPRModel, TIPRProcessor]:
    """The network and processor of a ``TIPRModule`` checkpoint, without Lightning."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, damaged, or pickled objects beyond tensors and containers
        raise ValueError(f"{path} is not a loadable tipr checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint of TIPRModule (no 'state_dict')")
    encoder, config = checkpoint_config(checkpoint, str(path))
    from tipr.methods import spec_of_config

    state = {k[len(NETWORK_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NETWORK_PREFIX)}
    model = spec_of_config(config).model_class(encoder, config)
    load_state(model, state, str(path))
    processor_info = checkpoint.get(CHECKPOINT_PROCESSOR_KEY) or {}
    processor = TIPRProcessor.from_payload(
        processor_info.get("tokenizer_files"), encoder.image_size, encoder.text_length
    )
    return model.to(map_location).eval(), processor


def checkpoint_config(checkpoint: Mapping[str, Any], source: str) -> tuple[EncoderConfig, MethodConfig]:
    """The configs a ``TIPRModule`` checkpoint stored (tipr 0.2: its SEN config, or for 0.1 its hyperparameters)."""
    if CHECKPOINT_CONFIG_KEY in checkpoint:
        return parse_config(checkpoint[CHECKPOINT_CONFIG_KEY], source)
    if LEGACY_CONFIG_KEY in checkpoint:
        return parse_config(checkpoint[LEGACY_CONFIG_KEY], source)
    hp = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hp.get("backbone"), Mapping):
        raise ValueError(f"{source}: neither a tipr model config nor hyperparameters with a backbone config")
    # tipr 0.1: flat SEN hyperparameters.
    old = {"tri_weight": "triplet_weight", "tir_weight": "restoration_weight", "tir_depth": "restoration_depth",
           "tir_residual": "restoration_residual", "tir_text_padding_mask": "restoration_text_padding_mask"}
    hp = {old.get(k, k): v for k, v in hp.items()}
    flat = {"format": "tipr-sen", "clip": dict(hp["backbone"]), "num_classes": hp["num_classes"],
            "loss_weights": {name: float(hp.get(f"{name}_weight", 0.0))
                             for name in ("sdm", "id", "triplet", "restoration", "itc")}}
    for name in ("image_size", "text_length", "temperature", "margin", "mask_ratio", "restoration_depth",
                 "restoration_residual", "restoration_text_padding_mask", "position_interpolation",
                 "reference_fp16_weights"):
        if name in hp:
            flat[name] = hp[name]
    return parse_config(flat, source)


def push_to_hub(model: TIPRModel, processor: TIPRProcessor, repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload tipr model and processor") -> str:
    """Upload a pretrained folder (model and processor) to the Hugging Face hub; returns the commit URL.

    ``model.push_to_hub`` uploads the model alone; this uploads what
    ``load_pretrained(repo_id)`` needs.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, processor, tmp, model_id=repo_id)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message))
