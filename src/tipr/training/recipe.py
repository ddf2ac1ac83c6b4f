"""The training recipe's pieces that are not the model: the LR curve, the gradient norm,
the one-time check of the training data, and starting from a pretrained folder.

Plain functions of a :class:`~tipr.model.TIPRModel`, used by :class:`~tipr.training.TIPRModule`;
the parameter groups are the method's own (:meth:`~tipr.model.TIPRModel.parameter_groups`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tipr.model.base import TIPRModel
from tipr.model.config import MethodConfig


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: float, warmup_factor: float) -> float:
    """LR multiplier: linear warm-up from ``warmup_factor`` to 1, then cosine decay to 0.

    ``f = warmup_factor (1 - s/w) + s/w`` for ``s < w``, else
    ``f = 0.5 (1 + cos(pi (s - w) / (T - w)))``: the reference's per-epoch curve,
    stepped per iteration (``s`` in optimiser steps, ``w`` warm-up steps, ``T`` total).
    torch's ``LinearLR`` + ``CosineAnnealingLR`` do not express it exactly: the
    warm-up length ``w`` is fractional in general, and ``CosineAnnealingLR`` updates
    the rate recursively, which drifts from the closed form over a run.
    """
    if step < warmup_steps:
        t = step / warmup_steps
        return warmup_factor * (1 - t) + t
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_training_data(network: TIPRModel, datamodule) -> bool:
    """Validate a :class:`~tipr.data.TIPRDataModule`'s caption token tables and training labels once.

    Every token table must fit the text encoder (ids inside its vocabulary, an
    end-of-text token per caption) and the labels the ID classifier, which lets
    the training steps skip the per-batch checks (host syncs). Returns False for
    other data modules, whose batches stay checked per step.
    """
    tables = getattr(datamodule, "caption_tokens", None)
    train_set = getattr(datamodule, "train_set", None)
    if not callable(tables) or train_set is None:
        return False
    for split, entry in tables().items():
        for kind, token_ids in entry.items():
            try:
                network.check_token_ids(token_ids)
            except ValueError as e:
                raise ValueError(
                    f"{getattr(datamodule, 'dataset', 'the data')} {split} captions ({kind}) do not fit "
                    f"model.backbone's text encoder: {e}; expected the backbone's own tokenizer (data.tokenizer)"
                ) from e
    classes = network.num_classes if network.classifier is not None else None
    if classes is not None and len(train_set.labels) and int(train_set.labels.max()) >= classes:
        raise ValueError(f"training labels reach {int(train_set.labels.max())} but model.num_classes={classes}")
    return True


def gradient_norm(parameters) -> torch.Tensor | None:
    """The global L2 norm of the gradients (one fused pass on torch >= 2.6), without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(grads).float()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def start_from_pretrained(source: str, model_class: type[TIPRModel], num_classes: int, config: MethodConfig,
                          encoder: dict[str, Any]) -> TIPRModel:
    """A ``model_class`` with ``config`` around the CLIP of a pretrained tipr model (any method), with each
    of its heads whose names and shapes fit taken whole (the others fresh)."""
    pretrained = TIPRModel.from_pretrained(source)
    expected = (pretrained.encoder_config.image_size, pretrained.encoder_config.text_length)
    if (tuple(encoder["image_size"]), encoder["text_length"]) != expected:
        raise ValueError(
            f"model.init_from={source!r} was built for image_size {expected[0]} and text_length {expected[1]}; "
            f"got {tuple(encoder['image_size'])} and {encoder['text_length']} (set data.image_size / data.text_length)"
        )
    # fp32 first: the network casts itself to the reference's fp16 when its own settings say so.
    network = model_class.from_backbone(pretrained.clip.float(), num_classes, config, **encoder).train()
    own = network.state_dict()
    heads = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("clip.")}
    for module in {k.split(".")[0] for k in own if not k.startswith("clip.")}:  # a head is taken whole or not at all
        mine = {k for k in own if k.split(".")[0] == module}
        if all(k in heads and heads[k].shape == own[k].shape for k in mine):
            network.load_state_dict({k: heads[k] for k in mine}, strict=False)
    return network
