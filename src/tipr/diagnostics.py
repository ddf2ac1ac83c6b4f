"""Does the caption really guide SEN's text-guided image restoration (TIR)? A controlled check.

A toy where colour exists only in the text: each image is a "person" whose
upper half (shirt) and lower half (trousers) are filled with two colours from a
palette of six, plus a gray texture. The palette is *isoluminant* for TIR's
grayscale transform (every colour has the same 0.2989 R + 0.5870 G + 0.1140 B in
the model's input space), so the grayscale image the encoder sees carries no
colour at all; the caption names both colours.

:func:`restoration_errors` measures, on the same images and masks, the
masked-patch restoration error with the true captions, with the captions
shuffled across the batch and with a caption that names no colour; a network
whose restoration uses the text has the first clearly lower than the other two.
``experiments/tir_text_guidance.py`` trains a tiny SEN on :class:`ColourOnlyInText`
and prints the three errors.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from tipr.model.losses import masked_patch_mse
from tipr.model.restoration import GRAYSCALE_WEIGHTS
from tipr.tokenization import tokenize

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
TEMPLATES = (
    "a person in a shirt that is {upper} and trousers that are {lower}",
    "this person wears {lower} trousers with the shirt in {upper}",
)
IMAGE_SIZE = (64, 32)  # patch 8 (tiny preset): an 8 x 4 grid
TEXT_LENGTH = 24


def isoluminant_palette(n: int = len(COLOURS), radius: float = 1.0) -> torch.Tensor:
    """``(n, 3)`` colours in the model's input space with zero grayscale value, evenly spread in hue."""
    w = torch.tensor(GRAYSCALE_WEIGHTS, dtype=torch.float64)
    u = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    u -= (u @ w) / (w @ w) * w
    u /= u.norm()
    v = torch.linalg.cross(w / w.norm(), u)
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    palette = radius * (torch.cos(angles)[:, None] * u + torch.sin(angles)[:, None] * v)
    return palette.float()


class ColourOnlyInText(Dataset):
    """Images whose colours only the caption tells; identity = (upper, lower) colour pair."""

    def __init__(self, size: int, seed: int, texture: float = 0.2, image_size: tuple[int, int] = IMAGE_SIZE):
        g = torch.Generator().manual_seed(seed)
        n = len(COLOURS)
        self.upper = torch.randint(n, (size,), generator=g)
        self.lower = torch.randint(n, (size,), generator=g)
        self.pids = self.upper * n + self.lower
        palette = isoluminant_palette()
        h, w = image_size
        images = torch.empty(size, 3, h, w)
        images[:, :, : h // 2] = palette[self.upper][:, :, None, None]
        images[:, :, h // 2 :] = palette[self.lower][:, :, None, None]
        # Gray texture (equal in R, G, B): visible after grayscale, says nothing about colour.
        images += texture * torch.randn(size, 1, h, w, generator=g)
        self.images = images
        templates = torch.randint(len(TEMPLATES), (size,), generator=g)
        captions = [
            TEMPLATES[t].format(upper=COLOURS[u], lower=COLOURS[l])
            for t, u, l in zip(templates.tolist(), self.upper.tolist(), self.lower.tolist())
        ]
        self.captions = captions
        self.token_ids = tokenize(captions, context_length=TEXT_LENGTH)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "token_ids": self.token_ids[i], "pids": self.pids[i], "index": i}


@torch.no_grad()
def restoration_errors(network, data: ColourOnlyInText, batch_size: int = 64, seed: int = 123) -> dict[str, float]:
    """Masked-patch MSE with true, shuffled and colourless captions (same images, same masks)."""
    was_training = network.training
    network.eval()
    g = torch.Generator().manual_seed(seed)
    colourless = tokenize(["a person in a shirt and trousers"], context_length=TEXT_LENGTH)
    sums = {"true captions": 0.0, "shuffled captions": 0.0, "colourless caption": 0.0, "predict zero colour": 0.0}
    batches = 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size]
        token_ids = data.token_ids[start : start + batch_size]
        b = images.shape[0]
        noise = torch.rand(b, network.embeddings.num_patches, generator=g)
        shuffled = token_ids[torch.roll(torch.arange(b), 1)]  # every caption moves to another image
        for name, ids in (("true captions", token_ids), ("shuffled captions", shuffled),
                          ("colourless caption", colourless.expand(b, -1))):
            text_tokens, eot = network.text_tokens(ids)
            out = network.restore(images, text_tokens, eot, noise=noise)
            sums[name] += float(masked_patch_mse(out["prediction"], out["target"], out["mask"]))
        sums["predict zero colour"] += float(
            masked_patch_mse(torch.zeros_like(out["target"]), out["target"], out["mask"])
        )
        batches += 1
    network.train(was_training)
    return {name: value / batches for name, value in sums.items()}


def train_tiny_sen(
    train: ColourOnlyInText, held_out: ColourOnlyInText, steps: int, batch_size: int, lr: float,
    mask_ratio: float = 0.7, seed: int = 0,
):
    """Train a tiny random SEN (reference loss weights) on ``train`` with a Lightning ``Trainer`` on CPU.

    Returns the ``TIPRModule`` and the :func:`restoration_errors` on ``held_out`` before training.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from tipr.model import TIPRModule

    pl.seed_everything(seed, verbose=False)
    module = TIPRModule(
        num_classes=len(COLOURS) ** 2, backbone="tiny", image_size=tuple(train.images.shape[2:]),
        text_length=TEXT_LENGTH, mask_ratio=mask_ratio, lr=lr, warmup_epochs=0.5,
    )
    before = restoration_errors(module.network, held_out)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True))
    return module, before
