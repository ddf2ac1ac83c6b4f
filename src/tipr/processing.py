"""``TIPRProcessor``: the tokenizer and the evaluation transform of a model, saved with it.

In the manner of ``CLIPProcessor``::

    processor = TIPRProcessor.from_pretrained(folder)
    inputs = processor(text=["a man in a red jacket"], images=[Image.open("a.jpg")])
    inputs["input_ids"]     # (1, text_length) int64, zero-padded CLIP ids
    inputs["pixel_values"]  # (1, 3, H, W) float32, resized and CLIP-normalised

A pretrained folder holds the tokenizer's files and ``processor_config.json``;
the tokenizer a model was trained with (a backbone folder's own, or the CLIP BPE
shipped with tipr) is the one it is used with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tipr.model.hub import pretrained_files
from tipr.tokenization import TOKENIZER_FILES, load_tokenizer, tokenize

PROCESSOR_FILE = "processor_config.json"
#: Tokenizer files a pretrained folder holds (written by the tokenizer's own ``save_pretrained``).
SAVED_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class TIPRProcessor:
    """Captions to token ids and images to model input.

    Args:
        tokenizer: a Hugging Face CLIP tokenizer; ``None`` for the one shipped with tipr.
        image_size: the model's input ``(H, W)``.
        text_length: token positions per caption.
    """

    def __init__(self, tokenizer=None, image_size: Sequence[int] = (384, 128), text_length: int = 77):
        from tipr.data.transforms import build_eval_transform

        self.tokenizer = load_tokenizer() if tokenizer is None else tokenizer
        self.image_size = tuple(int(s) for s in image_size)
        self.text_length = int(text_length)
        self.transform = build_eval_transform(self.image_size)

    @classmethod
    def for_model(cls, model, tokenizer=None) -> TIPRProcessor:
        """The processor of a :class:`~tipr.model.TIPRModel` (its image size and text length)."""
        return cls(tokenizer, model.encoder_config.image_size, model.encoder_config.text_length)

    def __repr__(self) -> str:
        return (f"TIPRProcessor(tokenizer={type(self.tokenizer).__name__}({len(self.tokenizer)} ids), "
                f"image_size={self.image_size}, text_length={self.text_length})")

    # ---------------------------------------------------------------- inputs
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """``(N, text_length)`` int64 CLIP ids (see :func:`tipr.tokenization.tokenize`)."""
        return tokenize(captions, self.tokenizer, self.text_length)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 model input from PIL images, uint8 ``(3, h, w)`` tensors or file paths."""
        from tipr.data.datasets import read_image

        pixels = []
        for i, image in enumerate(images):
            if isinstance(image, (str, Path)):
                image = read_image(image)
            elif hasattr(image, "convert"):  # a PIL image
                image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            elif not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3):
                raise TypeError(
                    f"image {i} is {type(image).__name__}; expected a PIL image, a file path or a uint8 (3, H, W) tensor"
                )
            pixels.append(self.transform(image))
        if not pixels:
            return torch.zeros(0, 3, *self.image_size)
        return torch.stack(pixels)

    def __call__(self, text: Sequence[str] | None = None, images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids": ...}`` for ``text``, ``{"pixel_values": ...}`` for ``images``, or both."""
        if text is None and images is None:
            raise ValueError("TIPRProcessor needs text=[...] or images=[...] (or both)")
        if isinstance(text, str):
            text = [text]
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            out["input_ids"] = self.tokenize(text)
        if images is not None:
            out["pixel_values"] = self.preprocess(images if isinstance(images, (list, tuple)) else [images])
        return out

    # ------------------------------------------------------------- pretrained
    def to_dict(self) -> dict[str, Any]:
        return {"processor_class": type(self).__name__, "image_size": list(self.image_size),
                "text_length": self.text_length}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the tokenizer's files and ``processor_config.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        (folder / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **hub_kwargs: Any) -> TIPRProcessor:
        """The processor saved in a pretrained folder (or a hub id; ``hub_kwargs`` as for
        :meth:`tipr.model.TIPRModel.from_pretrained`)."""
        files = pretrained_files(name_or_path, (PROCESSOR_FILE, *SAVED_TOKENIZER_FILES), **hub_kwargs)
        path = files[PROCESSOR_FILE]
        try:
            values = json.loads(path.read_text())
            image_size, text_length = values["image_size"], values["text_length"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected a JSON object with image_size and text_length ({e})") from e
        return cls(load_tokenizer(path.parent), image_size, text_length)

    # ------------------------------------------- inside a Lightning checkpoint
    def tokenizer_payload(self) -> dict[str, str] | None:
        """The tokenizer's files as ``{name: text}`` when it is not the shipped one (else None),
        so a checkpoint can carry the tokenizer a model was trained with. Written once, then reused
        (every checkpoint of a run asks for it)."""
        if not hasattr(self, "_payload"):
            self._payload = None
            if self.tokenizer is not load_tokenizer():
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    self.tokenizer.save_pretrained(tmp)
                    self._payload = {name: (Path(tmp) / name).read_text() for name in TOKENIZER_FILES
                                     if (Path(tmp) / name).is_file()}
        return self._payload

    @classmethod
    def from_payload(cls, tokenizer_files: dict[str, str] | None, image_size, text_length) -> TIPRProcessor:
        """The processor a checkpoint described (see :meth:`tokenizer_payload`)."""
        if not tokenizer_files:
            return cls(None, image_size, text_length)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, text in tokenizer_files.items():
                if name not in TOKENIZER_FILES:
                    raise ValueError(f"checkpoint tokenizer file {name!r} is not one of {TOKENIZER_FILES}")
                (Path(tmp) / name).write_text(text)
            tokenizer = load_tokenizer(tmp)
        return cls(tokenizer, image_size, text_length)
