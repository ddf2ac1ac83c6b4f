"""Image transforms of the training recipe, with torchvision ``transforms.v2`` on uint8 tensors.

Training: resize to ``image_size`` (H, W), horizontal flip (0.5), pad 10 + random
crop back to ``image_size``, random erasing (probability 0.5, area 0.02 to 0.4),
then CLIP normalisation. Evaluation: resize + normalisation.

Everything up to normalisation runs on ``uint8`` tensors, which is several times
cheaper than on floats or PIL images. Random erasing therefore fills the box
with the CLIP mean *pixel* before normalisation, which becomes 0 after it: the
box holds the mean, as the recipe says. (The reference code erases after
normalising with ``value=mean``, i.e. it fills with ``mean`` in normalised units,
a light grey; the difference is a constant fill level.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["CLIP_MEAN", "CLIP_STD", "build_eval_transform", "build_train_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_normalised_float() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]


def build_train_transform(
    image_size: Sequence[int] = (384, 128),
    *,
    flip: bool = True,
    pad_crop: bool = True,
    padding: int = 10,
    random_erasing: bool = True,
    erasing_prob: float = 0.5,
    erasing_scale: tuple[float, float] = (0.02, 0.4),
) -> v2.Compose:
    """uint8 ``(3, h, w)`` image -> float32 ``(3, H, W)`` CLIP-normalised, augmented."""
    size = tuple(int(s) for s in image_size)
    steps: list = [v2.Resize(size, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if pad_crop and padding > 0:
        steps.append(v2.RandomCrop(size, padding=padding))  # = Pad(padding) + RandomCrop(size), zero fill
    if random_erasing:
        mean_pixel = [round(255 * m) for m in CLIP_MEAN]
        steps.append(v2.RandomErasing(p=erasing_prob, scale=erasing_scale, value=mean_pixel))
    return v2.Compose(steps + _to_normalised_float())


def build_eval_transform(image_size: Sequence[int] = (384, 128)) -> v2.Compose:
    """uint8 ``(3, h, w)`` image -> float32 ``(3, H, W)`` CLIP-normalised."""
    size = tuple(int(s) for s in image_size)
    return v2.Compose([v2.Resize(size, antialias=True), *_to_normalised_float()])
