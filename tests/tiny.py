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

    @staticmethod
    def method_config(method: str = "sen", **fields):
        """A method's config (``"sen"``, ``"irra"``) with ``fields`` overriding its defaults;
        ``loss_weights={"sdm": 1, ...}`` sets those ``<term>_weight`` fields and every other to 0."""
        from dataclasses import fields as dataclass_fields

        from tipr.methods import method_spec

        config_class = method_spec(method).config_class
        weights = fields.pop("loss_weights", None)
        if weights is not None:
            fields.update({f.name: 0.0 for f in dataclass_fields(config_class) if f.name.endswith("_weight")})
            fields.update({f"{name}_weight": value for name, value in weights.items()})
        return config_class(**fields)

    @classmethod
    def network(cls, init_seed: int = 0, method: str = "sen", **settings):
        """A fresh model of ``method`` (random weights from ``init_seed``); ``settings`` override
        EncoderConfig fields (num_classes, image_size...) and the method config's fields."""
        from dataclasses import fields

        from tipr.methods import method_spec
        from tipr.model.config import EncoderConfig

        torch.manual_seed(init_seed)
        encoder_fields = {f.name for f in fields(EncoderConfig)}
        options = {"num_classes": cls.num_classes, "image_size": cls.image_size, "text_length": cls.text_length}
        options.update({k: v for k, v in settings.items() if k in encoder_fields})
        config = cls.method_config(method, **{k: v for k, v in settings.items() if k not in encoder_fields})
        return method_spec(method).model_class.from_backbone("tiny", config=config, **options)

    @classmethod
    def module(cls, init_seed: int = 0, method: str = "sen", **kwargs):
        """A fresh ``TIPRModule`` of ``method``; ``kwargs`` override its arguments and the method
        config's fields (``triplet_weight=0``...)."""
        import inspect

        from tipr.training import TIPRModule

        torch.manual_seed(init_seed)
        options = {"num_classes": cls.num_classes, "backbone": "tiny", "image_size": cls.image_size,
                   "text_length": cls.text_length}
        arguments = set(inspect.signature(TIPRModule).parameters)
        if "method" not in kwargs:
            kwargs["method"] = cls.method_config(method, **{k: v for k, v in kwargs.items() if k not in arguments})
        return TIPRModule(**{**options, **{k: v for k, v in kwargs.items() if k in arguments}})

    @classmethod
    def data(cls, root, **kwargs):
        """A ``TIPRDataModule`` of the tiny synthetic benchmark under ``root`` (global batch 8, no workers)."""
        from tipr.training import TIPRDataModule

        options = {"dataset": "synthetic", "root": str(root), "image_size": cls.image_size, "batch_size": 8,
                   "num_workers": 0, "text_length": cls.text_length, "synthetic": dict(cls.synthetic)}
        return TIPRDataModule(**{**options, **kwargs})
