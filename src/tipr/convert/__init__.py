"""Import checkpoints trained with the authors' code of IRRA and SEN, and plain OpenAI CLIP weights.

An IRRA or SEN ``best.pth`` (``{"model": state_dict}``: the CLIP backbone in
OpenAI's layout under ``base_model.``, the ID classifier, the method's heads)
or an OpenAI CLIP file becomes a tipr model of that method (``IRRAModel``,
``SENModel``) with the same weights; every size (widths, layers, patch,
vocabulary, context, head depths) is read off the tensors. Attention head
counts are not in the tensors: they are OpenAI's width / 64 unless given
(``vision_heads``, ``text_heads``, ``restoration_heads``), and the report says
which values were read, given or assumed.

- :mod:`tipr.convert.openai_clip`: the OpenAI -> Hugging Face ``CLIPModel``
  mapping and config inference (pure: state dict in, state dict out);
- each method's ``tipr/methods/<name>/convert.py``: its heads' table;
- :mod:`tipr.convert.reference`: reading the files, telling the method and
  building the model, with a :class:`ConversionReport` of the heads left
  freshly initialised and the source keys not used;
- :mod:`tipr.convert.command`: ``tipr convert``, which writes a pretrained
  folder (``config.json``, ``model.safetensors``, the tokenizer,
  ``processor_config.json``) that ``TIPRModel.from_pretrained``,
  ``TIPRProcessor.from_pretrained``, :func:`tipr.pretrained.load_pretrained`
  and ``tipr index`` / ``tipr search --model`` read offline::

    tipr convert --checkpoint sen_cuhk/best.pth --out sen_cuhk      # then tipr index/search --model sen_cuhk
    tipr convert --checkpoint ViT-B-16.pt --out clip_b16 --num_classes 11003

In Python::

    from tipr.convert import load_reference_checkpoint
    from tipr.pretrained import save_pretrained
    from tipr.processing import TIPRProcessor

    model, report = load_reference_checkpoint("best.pth", image_size=(384, 128))
    print(report)
    save_pretrained(model, TIPRProcessor.for_model(model), "sen_cuhk")

Nothing here imports Lightning.
"""

from tipr.convert.openai_clip import ConvertedCLIP, HeadCountError, convert_openai_clip_state_dict, infer_clip_config
from tipr.convert.reference import (
    REFERENCE_PREFIX,
    ConversionReport,
    HeadConversion,
    load_reference_checkpoint,
    read_state_dict,
)

__all__ = [
    "REFERENCE_PREFIX",
    "ConversionReport",
    "ConvertedCLIP",
    "HeadConversion",
    "HeadCountError",
    "convert_openai_clip_state_dict",
    "infer_clip_config",
    "load_reference_checkpoint",
    "read_state_dict",
]
