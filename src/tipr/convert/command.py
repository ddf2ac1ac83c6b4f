"""``tipr convert``: a plain function whose signature and docstring are the options.

:mod:`tipr.commands` parses it with jsonargparse (``--num_classes 11003``,
``--image_size [384,128]``, ``--config convert.yaml``) and runs it; a raised
``OSError`` / ``ValueError`` becomes ``tipr convert: error: <message>`` and exit
code 1. Lightning is never imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt

from tipr.convert.openai_clip import HeadCountError
from tipr.convert.reference import load_reference_checkpoint
from tipr.model.hub import CONFIG_FILE

__all__ = ["convert"]


def convert(
    checkpoint: str,
    out: str,
    image_size: tuple[PositiveInt, PositiveInt] = (384, 128),
    text_length: PositiveInt | None = None,
    num_classes: PositiveInt | None = None,
    method: str | None = None,
    vision_heads: PositiveInt | None = None,
    text_heads: PositiveInt | None = None,
    restoration_heads: PositiveInt | None = None,
) -> int:
    """Turn a checkpoint of the public IRRA/SEN code or OpenAI CLIP weights into a tipr pretrained folder.

    The folder (config.json, model.safetensors, the tokenizer, processor_config.json)
    is what TIPRModel.from_pretrained / TIPRProcessor.from_pretrained and 'tipr index' /
    'tipr search --model' read, offline. Prints every architecture value and where it
    came from (read off a tensor, given, or assumed: no tensor shows a head count, so
    the heads are width / 64 unless given), the heads left freshly initialised and the
    source keys not used. Exit codes: 0 written; 1 a file or value that does not fit
    (nothing written); 2 --out would overwrite --checkpoint.

    Args:
        checkpoint: the file to convert: an IRRA/SEN best.pth ({'model': state dict}, CLIP under
            'base_model.'), or OpenAI CLIP weights (a state dict or OpenAI's TorchScript .pt).
        out: the pretrained folder to write (a new or empty folder, or a pretrained folder to overwrite).
        image_size: model input [H, W]; the checkpoint's position table must fit its patch grid
            or be square (then resized).
        text_length: token positions per caption (default: the checkpoint's text context).
        num_classes: ID classifier size (default: the checkpoint classifier's; required when it has none).
        method: the method to build (sen, irra); default: the one whose heads the checkpoint holds
            (OpenAI CLIP: sen). A method that builds on the file's (sen from an IRRA file) starts
            its own heads fresh.
        vision_heads: attention heads of the checkpoint's vision tower (default: width / 64, the
            rule of OpenAI CLIP and of IRRA's and SEN's code); must divide the width.
        text_heads: attention heads of the checkpoint's text tower (default: width / 64); must divide the width.
        restoration_heads: attention heads of a SEN checkpoint's TIR head (default: embedding width / 64,
            as SEN's code); must divide the embedding width. IRRA's cross-modal heads are always
            embedding width / 64.
    """
    from tipr.pretrained import save_pretrained
    from tipr.processing import TIPRProcessor

    source, folder = Path(checkpoint).expanduser(), Path(out).expanduser()
    if folder.resolve() == source.resolve():
        print(f"tipr convert: error: --out {out} would overwrite the checkpoint being converted", file=sys.stderr)
        return 2
    _check_out(folder, out)
    heads = {"restoration_heads": restoration_heads} if restoration_heads is not None else {}
    try:
        model, report = load_reference_checkpoint(
            source, image_size=tuple(image_size), text_length=text_length, num_classes=num_classes, method=method,
            vision_heads=vision_heads, text_heads=text_heads, **heads,
        )
    except HeadCountError as e:
        if not e.given:
            raise ValueError(f"--checkpoint {e}") from e
        raise ValueError(f"--{e.option} {e.heads}: does not divide the {e.what} width {e.width} of --checkpoint "
                         f"{checkpoint} {e.hint}") from e
    except TypeError as e:  # restoration_heads for a method without a TIR head
        if not heads or "restoration_heads" not in str(e):
            raise
        raise ValueError(f"--restoration_heads {restoration_heads}: sets the TIR head of SEN, and {checkpoint} "
                         f"converts to another method (give --method sen, or leave --restoration_heads out)") from e
    except (OSError, ValueError) as e:  # these start with the file's path
        raise type(e)(f"--checkpoint {e}") from e
    processor = TIPRProcessor.for_model(model)
    try:
        save_pretrained(model, processor, folder)
    except OSError as e:
        raise OSError(f"--out {out}: cannot write the pretrained folder: {e}") from e
    print(report)
    tokens = len(processor.tokenizer)
    if tokens != model.vocab_size:
        print(
            f"  note: the model's vocabulary has {model.vocab_size} ids, the CLIP tokenizer written with it "
            f"{tokens}: put the tokenizer it was trained with (tokenizer.json, tokenizer_config.json) into {out}"
        )
    print(f"wrote {out}: {type(model).__name__} (TIPRModel.from_pretrained / TIPRProcessor.from_pretrained, "
          f"or tipr index/search --model {out})")
    return 0


def _check_out(folder: Path, option: str) -> None:
    """``--out`` must be a new folder, an empty one, or a pretrained folder (overwritten)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {option}: is a file; expected a folder to write the pretrained model into")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise ValueError(
            f"--out {option}: a folder holding other files; expected a new or empty folder, or a pretrained "
            f"folder to overwrite"
        )
