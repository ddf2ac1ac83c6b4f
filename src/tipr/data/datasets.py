"""Torch datasets over a benchmark split: training pairs, gallery images, query captions.

Captions arrive already tokenized (and pruned) as tensors, so the per-sample
work is: decode one image, run the transform, index a row of a token table.
Paths and labels are stored as numpy arrays / tensors, not Python lists of
objects, so forked loader workers do not copy them page by page.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

__all__ = ["GalleryImages", "QueryCaptions", "TrainPairs", "read_image"]


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 ``(3, H, W)`` RGB tensor; errors name the file.

    Pillow decodes (torchvision's decoders are deprecated since 0.29); grey,
    palette and RGBA images are converted to RGB.
    """
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))  # writable (H, W, 3) uint8
    except Exception as e:  # FileNotFoundError, UnidentifiedImageError, truncated files (OSError), ...
        raise RuntimeError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W), a view of the decoded pixels


class _Images:
    """Image paths under one folder, stored compactly."""

    def __init__(self, image_dir: str | os.PathLike, paths: Sequence[str]):
        self.image_dir = str(image_dir)
        self.paths = np.asarray(paths, dtype=np.str_)

    def load(self, i: int) -> torch.Tensor:
        return read_image(os.path.join(self.image_dir, str(self.paths[i])))


class TrainPairs(Dataset):
    """One sample per (image, caption) pair of the training split.

    With probability ``prune_prob`` a sample's caption is replaced by its pruned
    form (both tokenized beforehand).

    ``sample_fields``: the method's per-sample fields (``(sample, generator) ->
    {name: tensor}``, e.g. IRRA's masked caption), drawn after pruning from a
    generator of the sample's own.

    Randomness: indexed by ``(i, seed)`` (what a sampler built with
    ``sample_seeds=True`` yields), sample ``i``'s augmentation, pruning and
    ``sample_fields`` draws come from ``seed`` alone, so they do not depend on the loader worker, the
    number of workers or processes, or where a resumed run restarted; the
    process's global random state is left as it was. Indexed by ``i`` alone, the
    draws use the loader worker's random state (seeded by Lightning's
    ``seed_everything(workers=True)``).

    Returns ``{"pixel_values": float32 (3, H, W), "input_ids": int64 (L,), "pids": int64 label, "index": int}``
    and the ``sample_fields``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        image_paths: Sequence[str],
        caption_images: torch.Tensor,
        labels: torch.Tensor,
        tokens: torch.Tensor,
        pruned_tokens: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prune_prob: float = 0.0,
        seed: int = 0,
        sample_fields: Callable[[dict, torch.Generator], dict] | None = None,
    ):
        n = len(caption_images)
        if tokens.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"{n} captions but {tokens.shape[0]} token rows and {labels.shape[0]} labels")
        if not 0.0 <= prune_prob <= 1.0:
            raise ValueError(f"prune_prob must be in [0, 1], got {prune_prob}")
        if prune_prob > 0 and (pruned_tokens is None or pruned_tokens.shape != tokens.shape):
            raise ValueError("prune_prob > 0 needs pruned_tokens of the same shape as tokens")
        self.images = _Images(image_dir, image_paths)
        self.caption_images = torch.as_tensor(caption_images, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.tokens = tokens
        self.pruned_tokens = pruned_tokens
        self.transform = transform
        self.prune_prob = float(prune_prob)
        self.seed = int(seed)
        self.sample_fields = sample_fields
        self._rng: random.Random | None = None
        self._rng_seed: int | None = None

    def __len__(self) -> int:
        return len(self.caption_images)

    def _generator(self) -> random.Random:
        info = get_worker_info()
        seed = info.seed if info is not None else self.seed
        if seed != self._rng_seed:  # new worker (or new epoch without persistent workers)
            self._rng, self._rng_seed = random.Random(seed), seed
        return self._rng

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        i, seed = item if isinstance(item, tuple) else (item, None)
        image = self.images.load(int(self.caption_images[i]))
        if seed is None:
            if self.transform is not None:
                image = self.transform(image)
            rng = self._generator()
            pruned = self.prune_prob > 0 and rng.random() < self.prune_prob
            fields_seed = rng.getrandbits(63)
        else:
            if self.transform is not None:
                with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
                    torch.manual_seed(seed)
                    image = self.transform(image)
            rng = random.Random(seed)
            pruned = self.prune_prob > 0 and rng.random() < self.prune_prob
            fields_seed = rng.getrandbits(63)
        tokens = (self.pruned_tokens if pruned else self.tokens)[i]
        sample = {"pixel_values": image, "input_ids": tokens.long(), "pids": self.labels[i], "index": i}
        if self.sample_fields is not None:
            sample.update(self.sample_fields(sample, torch.Generator().manual_seed(fields_seed)))
        return sample


class GalleryImages(Dataset):
    """Evaluation gallery: ``{"pixel_values": float32 (3, H, W), "pids": int64, "index": int}``."""

    def __init__(self, image_dir: str | os.PathLike, image_paths: Sequence[str], pids, transform=None):
        if len(image_paths) != len(pids):
            raise ValueError(f"{len(image_paths)} images but {len(pids)} identities")
        self.images = _Images(image_dir, image_paths)
        self.pids = torch.as_tensor(np.asarray(pids), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, i: int) -> dict:
        image = self.images.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return {"pixel_values": image, "pids": self.pids[i], "index": i}


class QueryCaptions(Dataset):
    """Evaluation queries: ``{"input_ids": int64 (L,), "pids": int64, "index": int}``."""

    def __init__(self, tokens: torch.Tensor, pids):
        if tokens.shape[0] != len(pids):
            raise ValueError(f"{tokens.shape[0]} token rows but {len(pids)} identities")
        self.tokens = tokens
        self.pids = torch.as_tensor(np.asarray(pids), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i].long(), "pids": self.pids[i], "index": i}
