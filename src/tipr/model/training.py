"""The training recipe's pieces that are not the network: parameter groups, the LR curve,
the TIR masking noise, and the one-time check of the training data.

Plain functions of a :class:`~tipr.model.SENModel`, used by :class:`~tipr.model.TIPRModule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tipr.model.sen import SENModel

#: Modules trained at ``lr * lr_factor`` in the reference: the ID classifier and
#: the TIR cross-attention and transformer (prefixes of ``SENModel`` parameter names).
REFERENCE_BOOSTED_MODULES = ("classifier", "restoration.cross_attn", "restoration.transformer")
#: Boosted modules whose biases also take ``lr * lr_factor`` (no weight decay) in the reference:
#: its classifier rule runs after its bias rule, the cross-modal rule before it.
REFERENCE_BOOSTED_BIAS_MODULES = ("classifier",)


def noise_seed(seed: int, epoch: int, batch_idx: int) -> int:
    """The seed of the TIR masking noise of one training batch: a function of (seed, epoch, batch) only."""
    return (int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(batch_idx) & 0x7FFF_FFFF_FFFF_FFFF


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


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_prefixes(network: SENModel, prefixes: Sequence[str] | str, option: str) -> tuple[str, ...]:
    """``prefixes`` as a tuple, each a prefix of some parameter name (or a head whose loss is off)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    names = [name for name, _ in network.named_parameters()]
    disabled = {"classifier": network.classifier is None, "restoration": network.restoration is None}
    for prefix in prefixes:
        if any(_matches(n, [prefix]) for n in names) or disabled.get(prefix.split(".")[0]):
            continue
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(
            f"{option}: {prefix!r} matches no parameter of the network; expected a prefix of "
            f"parameter names such as {REFERENCE_BOOSTED_MODULES} (top-level modules: {tops})"
        )
    return tuple(prefixes)


def parameter_groups(
    network: SENModel,
    lr: float,
    lr_factor: float,
    bias_lr_factor: float,
    weight_decay: float,
    boosted_modules: Sequence[str],
    boosted_bias_modules: Sequence[str],
) -> list[dict[str, Any]]:
    """Adam groups: base (lr, wd), boosted (lr * lr_factor, wd), bias (lr * bias_lr_factor, no wd),
    boosted_bias (lr * lr_factor, no wd: the biases of ``boosted_bias_modules``)."""
    groups: dict[str, dict[str, Any]] = {
        "base": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "boosted": {"params": [], "lr": lr * lr_factor, "weight_decay": weight_decay},
        "bias": {"params": [], "lr": lr * bias_lr_factor, "weight_decay": 0.0},
        "boosted_bias": {"params": [], "lr": lr * lr_factor, "weight_decay": 0.0},
    }
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias"):
            key = "boosted_bias" if _matches(name, boosted_bias_modules) else "bias"
        elif _matches(name, boosted_modules):
            key = "boosted"
        else:
            key = "base"
        groups[key]["params"].append(param)
    return [{"name": key, **group} for key, group in groups.items() if group["params"]]


def restoration_noise(
    network: SENModel, generator: torch.Generator, seed: int, epoch: int, batch_idx: int,
    batch_size: int, world_size: int = 1, rank: int = 0,
) -> torch.Tensor | None:
    """Rank ``rank``'s rows ``(batch_size, N)`` of the global batch's TIR masking noise (None without TIR).

    The noise of the whole global batch (``world_size * batch_size`` rows) is drawn
    from :func:`noise_seed` ``(seed, epoch, batch_idx)``, so it does not depend on
    the number of processes.
    """
    if network.restoration is None:
        return None
    generator.manual_seed(noise_seed(seed, epoch, batch_idx))
    num_patches = network.embeddings.num_patches
    noise = torch.rand(world_size * batch_size, num_patches, generator=generator, device=generator.device)
    return noise[rank * batch_size : (rank + 1) * batch_size]  # (B / W, N)


def check_training_data(network: SENModel, datamodule) -> bool:
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
    classes = network.classifier.out_features if network.classifier is not None else None
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
