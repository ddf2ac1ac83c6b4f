"""The CLIP tokenizer, shipped with the package so tokenization works offline.

``load_tokenizer()`` returns a Hugging Face ``CLIPTokenizer`` built from the
``vocab.json`` / ``merges.txt`` in ``tipr/assets/clip_bpe`` (generated from the
original CLIP merge list by ``tools/build_clip_tokenizer.py``). A user whose
backbone is a local Hugging Face checkpoint folder with its own tokenizer files
gets that folder's tokenizer instead.

``tokenize()`` turns a batch of captions into the fixed-length id tensor the
text encoder reads, exactly as OpenAI CLIP's ``tokenize`` does: lower-cased,
``<|startoftext|>`` + BPE + ``<|endoftext|>``, cut to ``context_length`` with the
end token kept last, zero-padded.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
#: Files that make up a tokenizer in a checkpoint folder (some may be absent).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
#: A folder holding one of these has a tokenizer of its own.
_DEFINING_FILES = ("tokenizer.json", "vocab.json")

# ftfy.fix_text, which OpenAI CLIP applies before BPE, changes a few characters
# that matter for captions; these are the ones the Rust normaliser leaves alone.
_FTFY_LIKE = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
        **{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)},  # full-width ASCII
        "\u3000": " ",
    }
)
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """CLIP's ``basic_clean`` + ``whitespace_clean`` without the ftfy dependency."""
    text = html.unescape(html.unescape(text)).translate(_FTFY_LIKE)
    return _WHITESPACE.sub(" ", text).strip()


def load_tokenizer(name_or_path: str | Path | None = None):
    """Return a Hugging Face CLIP tokenizer.

    Args:
        name_or_path: ``None`` for the tokenizer shipped with ``tipr`` (the
            original CLIP BPE, which every OpenAI CLIP checkpoint uses), or a
            local checkpoint folder. A folder that holds tokenizer files
            (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) is used as
            is; any other value (a hub id such as ``openai/clip-vit-base-patch16``,
            a folder with weights only) falls back to the shipped tokenizer,
            which is the same BPE, so no network access is ever needed.
    """
    if name_or_path is not None:
        folder = Path(name_or_path)
        if folder.is_dir() and any((folder / f).is_file() for f in _DEFINING_FILES):
            return _load_folder(str(folder.resolve()))
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"tokenizer {str(name_or_path)!r}: expected a checkpoint folder, got a file")
    return _shipped_tokenizer()


@lru_cache(maxsize=1)
def _shipped_tokenizer():
    return _load_folder(str(resources.files("tipr").joinpath("assets/clip_bpe")))


def _load_folder(folder: str):
    import json

    from transformers import AutoTokenizer, CLIPTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = Path(folder, "tokenizer_config.json")
    if config.is_file():
        # The class tokenizer_config.json names, loaded directly: AutoTokenizer would read a tipr folder's
        # config.json (model_type sen / irra, unknown to transformers) and warn on every load.
        name = json.loads(config.read_text()).get("tokenizer_class")
        cls = tokenizer_class_from_name(name) if isinstance(name, str) else None
        if cls is not None:
            return cls.from_pretrained(folder, local_files_only=True)
    if config.is_file() or Path(folder, "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenizer_files(tokenizer) -> list[Path]:
    """The files a tokenizer from ``load_tokenizer`` was read from (to fingerprint it)."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []


def tokenize(captions: Sequence[str], tokenizer=None, context_length: int = 77) -> torch.Tensor:
    """Tokenize a batch of captions into a ``(N, context_length)`` LongTensor.

    Each row is ``<|startoftext|>`` + BPE ids + ``<|endoftext|>`` followed by
    zeros. Captions longer than ``context_length`` are cut and the end token is
    kept last, as in OpenAI CLIP (and IRRA/SEN), so the text encoder's
    end-of-text feature always exists.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a sequence of captions, got a single str; wrap it in a list")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (start and end token), got {context_length}")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")
    tokenizer = load_tokenizer() if tokenizer is None else tokenizer
    encoded = tokenizer(
        [clean_caption(c) for c in captions],
        add_special_tokens=False,
        return_attention_mask=False,
    )["input_ids"]
    sot = tokenizer.convert_tokens_to_ids(SOT_TOKEN)
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    out = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        ids = [sot, *ids[: context_length - 2], eot]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
