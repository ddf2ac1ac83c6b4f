"""The tiny model and benchmark every test builds from, in one place (``from tiny import Tiny``)."""

from __future__ import annotations

import torch


class Tiny:
    """The tiny test model: the ``"tiny"`` CLIP preset (patch 8) at 32 x 16 pixels (a 4 x 2 grid), 16 text positions."""

    image_size = (32, 16)
    text_length = 16
    num_classes = 4
    #: 6 training, 2 validation and 3 test identities, 2 images of each, 2 captions per image.
    synthetic = {"num_train_ids": 6, "num_val_ids": 2, "num_test_ids": 3, "images_per_id": 2,
                 "captions_per_image": 2, "image_size": (64, 32)}

    @classmethod
    def network(cls, init_seed: int = 0, **settings):
        """A fresh ``SENModel`` (random weights from ``init_seed``); ``settings`` override SENConfig fields."""
        from tipr.model import SENModel

        torch.manual_seed(init_seed)
        options = {"num_classes": cls.num_classes, "image_size": cls.image_size, "text_length": cls.text_length}
        return SENModel.from_backbone("tiny", **{**options, **settings})

    @classmethod
    def module(cls, init_seed: int = 0, **kwargs):
        """A fresh ``TIPRModule``; ``kwargs`` override its arguments."""
        from tipr.model import TIPRModule

        torch.manual_seed(init_seed)
        options = {"num_classes": cls.num_classes, "backbone": "tiny", "image_size": cls.image_size,
                   "text_length": cls.text_length}
        return TIPRModule(**{**options, **kwargs})

    @classmethod
    def data(cls, root, **kwargs):
        """A ``TIPRDataModule`` of the tiny synthetic benchmark under ``root`` (global batch 8, no workers)."""
        from tipr.data import TIPRDataModule

        options = {"dataset": "synthetic", "root": str(root), "image_size": cls.image_size, "batch_size": 8,
                   "num_workers": 0, "text_length": cls.text_length, "synthetic": dict(cls.synthetic)}
        return TIPRDataModule(**{**options, **kwargs})
