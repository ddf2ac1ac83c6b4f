"""Image features through ONNX Runtime on CPU: export a model's image encoder, run it (fp32 or int8).

Indexing a gallery on a machine without a GPU is bound by the image encoder.
ONNX Runtime runs the same network faster on CPU than PyTorch does, and its
dynamic int8 quantization faster still at a small, measured cost (ViT-B/16 at
384 x 128 on 2 threads: ``experiments/bench_onnx.py``). ``tipr export-onnx``
writes, by default into the pretrained folder itself::

    image_encoder.onnx       fp32, input "pixel_values" (B, 3, H, W), output "image_features" (B, D)
    image_encoder.int8.onnx  the same with int8 MatMul weights (per output channel), activations
                             quantized at run time (onnxruntime.quantization.quantize_dynamic)
    image_encoder.json       what was exported: the model fingerprint, image size, embed dim,
                             opset, tool versions, the files

The features are those of :meth:`tipr.model.TIPRModel.encode_image`, un-normalised
(a model with the reference's fp16 weights is exported computing in fp32).
An export belongs to one model: the JSON and each ``.onnx`` file (its metadata,
``tipr.fingerprint``) record the model's :func:`~tipr.search.gallery.model_fingerprint`,
and :meth:`OnnxImageEncoder.from_folder` refuses another model, naming both. Every
file is written beside its target and renamed into place (the JSON last); a
half-finished export fails the check rather than pass it.

``onnx`` and ``onnxruntime`` are optional (``pip install "tipr[onnx]"``) and imported
on use; without them the functions raise :class:`OnnxUnavailableError` saying so.
The export uses PyTorch's TorchScript exporter (``dynamo=False``), which needs no
``onnxscript``. No Lightning here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch import nn

from tipr.files import atomic_write
from tipr.search.gallery import model_fingerprint

if TYPE_CHECKING:
    from tipr.model import TIPRModel

__all__ = [
    "ONNX_FILES", "ONNX_INFO_FILE", "OnnxImageEncoder", "OnnxUnavailableError", "export_image_encoder",
    "export_onnx", "parity",
]

#: ``precision -> file name`` of an export.
ONNX_FILES = {"fp32": "image_encoder.onnx", "int8": "image_encoder.int8.onnx"}
ONNX_INFO_FILE = "image_encoder.json"
ONNX_FORMAT = "tipr-onnx-image-encoder"
ONNX_VERSION = 1
OPSET = 17  # LayerNormalization is one op from 17 on; onnxruntime >= 1.18 runs it
INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_features"
FINGERPRINT_KEY = "tipr.fingerprint"  # in each .onnx file's metadata_props
#: The int8 recipe: only MatMul weights (the patch convolution stays fp32), one scale per output
#: channel. On ViT-B/16 it is as fast as the alternatives (all ops, per-tensor) within
#: measurement noise and the closest to fp32 (min cosine 0.99985 on random weights).
QUANTIZATION = {"weight_type": "QInt8", "per_channel": True, "op_types_to_quantize": ["MatMul"]}
#: The min cosine (vs torch) under which ``tipr export-onnx`` warns.
PARITY_FLOOR = 0.999
EXPORT_COMMAND = "tipr export-onnx --model <the model's pretrained folder> --out {folder}"


class OnnxUnavailableError(ImportError):
    """``onnx`` or ``onnxruntime`` is not installed."""


def _require(name: str):
    """Import ``name`` (``"onnx"``, ``"onnxruntime"``, ...), or raise :class:`OnnxUnavailableError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise OnnxUnavailableError(
            f"ONNX export and inference need the onnx and onnxruntime packages ({e}): pip install \"tipr[onnx]\""
        ) from e


class _ImageEncoder(nn.Module):
    """``model.encode_image`` as a module's forward, the graph the exporter traces."""

    def __init__(self, model: TIPRModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


def _fp32_cpu(model: TIPRModel) -> TIPRModel:
    """``model`` if it is an fp32 model on CPU, else a copy that is (fp16 weights run in fp32)."""
    params = list(model.parameters())
    if not model.reference_fp16_weights and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return model
    copied = copy.deepcopy(model).to("cpu", torch.float32)
    copied.reference_fp16_weights = False
    return copied


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module`` in eval mode inside the block; afterwards each submodule's own mode again
    (``module.train(was_training)`` would also switch submodules kept in the other mode)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet():
    """Silence what the exporter and quantizer say on every run: the tracer's constant shape
    checks (H, W are fixed by the model), the legacy exporter's deprecation, the quantizer's
    advice to pre-process (no speed gain measured on ViT-B/16)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        logging.disable(previous)


def _onnx_bytes(model: TIPRModel, fingerprint: str, opset: int) -> bytes:
    """The fp32 ONNX model of ``model.encode_image``, batch axis dynamic, ``fingerprint`` in its metadata."""
    onnx = _require("onnx")
    network = _fp32_cpu(model)
    height, width = (int(s) for s in network.encoder_config.image_size)
    example = torch.zeros(2, 3, height, width)  # 2: no size-1 broadcast is folded into the graph
    buffer = io.BytesIO()
    # The exporter sets its module's mode back with .train(), over every submodule: _eval_mode restores each.
    with _eval_mode(network), _quiet(), torch.no_grad():
        torch.onnx.export(
            _ImageEncoder(network).eval(), (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {FINGERPRINT_KEY: fingerprint})
    proto.doc_string = f"tipr image encoder of model {fingerprint}: {INPUT_NAME} (B, 3, {height}, {width}) -> " \
                       f"{OUTPUT_NAME} (B, {int(model.embed_dim)}), un-normalised"
    return proto.SerializeToString()


def _quantize(source: Path, target: Path) -> None:
    """Write the int8 model of ``source`` to ``target`` (built under a temporary name, then renamed)."""
    _require("onnx")
    quantization = _require("onnxruntime.quantization")
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        with _quiet():
            quantization.quantize_dynamic(
                source, partial, weight_type=getattr(quantization.QuantType, QUANTIZATION["weight_type"]),
                per_channel=QUANTIZATION["per_channel"], op_types_to_quantize=QUANTIZATION["op_types_to_quantize"],
            )
        with open(partial, "rb") as f:  # on disk before it replaces the target, as atomic_write does
            os.fsync(f.fileno())
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)


def export_image_encoder(
    model: TIPRModel, folder: str | os.PathLike, quantize: bool = True, *, checkpoint: str | None = None,
    opset: int = OPSET,
) -> dict[str, Path]:
    """Export ``model.encode_image`` to ONNX in ``folder`` (created if missing): ``{"fp32": ..., "int8": ..., "json": ...}``.

    ``quantize``: also write the int8 model. ``checkpoint``: where the model came
    from, recorded for messages only. The model is left as it was (mode, device, weights).
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    written = {"fp32": folder / ONNX_FILES["fp32"]}
    with atomic_write(written["fp32"]) as f:
        f.write(_onnx_bytes(model, fingerprint, opset))
    if quantize:
        written["int8"] = folder / ONNX_FILES["int8"]
        _quantize(written["fp32"], written["int8"])
    info = {
        "format": ONNX_FORMAT, "version": ONNX_VERSION, "fingerprint": fingerprint, "checkpoint": checkpoint,
        "image_size": [int(s) for s in model.encoder_config.image_size], "embed_dim": int(model.embed_dim),
        "input": INPUT_NAME, "output": OUTPUT_NAME, "opset": opset,
        "files": {precision: path.name for precision, path in written.items()},
        "quantization": dict(QUANTIZATION) if quantize else None,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    written["json"] = folder / ONNX_INFO_FILE
    with atomic_write(written["json"], "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    if not quantize:  # an int8 file of an earlier export: the JSON no longer lists it
        (folder / ONNX_FILES["int8"]).unlink(missing_ok=True)
    return written


class OnnxImageEncoder:
    """An exported image encoder in an ONNX Runtime CPU session; called like ``model.encode_image``.

    ``threads``: intra-op threads (default ``torch.get_num_threads()``). Attributes:
    ``path``, ``fingerprint`` (from the file's metadata, None if it has none),
    ``image_size`` ``(H, W)``, ``embed_dim``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.threads = options.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types: a damaged or foreign file
            raise ValueError(f"{self.path} cannot be opened by onnxruntime: {type(e).__name__}: {e}") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ValueError(f"{self.path} is not a tipr image encoder: inputs {[i.name for i in inputs]}, "
                             f"outputs {[o.name for o in outputs]} (expected {INPUT_NAME!r} -> {OUTPUT_NAME!r})")
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        if len(shape_in) != 4 or not all(isinstance(s, int) for s in shape_in[1:]) or shape_in[1] != 3 \
                or len(shape_out) != 2 or not isinstance(shape_out[1], int):
            raise ValueError(f"{self.path} is not a tipr image encoder: {INPUT_NAME} {shape_in} -> {OUTPUT_NAME} "
                             f"{shape_out} (expected (B, 3, H, W) -> (B, D), H, W and D fixed)")
        self.image_size = (int(inputs[0].shape[2]), int(inputs[0].shape[3]))
        self.embed_dim = int(outputs[0].shape[1])
        self.fingerprint = self.session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"OnnxImageEncoder({str(self.path)!r}, image {h}x{w}, embed_dim {self.embed_dim}, threads {self.threads})"

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Float32 features ``(B, D)`` of ``(B, 3, H, W)`` pixels, on the input's device."""
        expected = (3, *self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=pixel_values.device)
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(features).to(pixel_values.device)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, model_fingerprint: str, precision: str = "fp32", threads: int | None = None
    ) -> OnnxImageEncoder:
        """The export in ``folder`` (see :func:`export_image_encoder`) of the model whose fingerprint is given.

        Raises ``FileNotFoundError`` when there is no export, ``ValueError`` when it is of
        another model (naming the file and both fingerprints) or lacks ``precision``;
        each says the command that exports again.
        """
        if precision not in ONNX_FILES:
            raise ValueError(f"precision must be one of {sorted(ONNX_FILES)}, got {precision!r}")
        folder = Path(folder)
        again = EXPORT_COMMAND.format(folder=folder)
        info_file = folder / ONNX_INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(f"{info_file}: no ONNX export of the image encoder here; write one with: {again}")
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{info_file} is not readable JSON ({e}); export again with: {again}") from e
        if not isinstance(info, dict) or info.get("format") != ONNX_FORMAT:
            raise ValueError(f"{info_file} does not describe a tipr ONNX export; export again with: {again}")

        def refuse(file: Path, theirs: Any) -> ValueError:
            return ValueError(f"{file} was exported from another model (fingerprint {theirs}); the model given has "
                              f"fingerprint {model_fingerprint}. Export this model again with: {again}")

        if info.get("fingerprint") != model_fingerprint:
            raise refuse(info_file, info.get("fingerprint"))
        name = (info.get("files") or {}).get(precision)
        if name is None:
            raise ValueError(f"{info_file}: the export has no {precision} model (exported with --int8 false?); "
                             f"export again with: {again}")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: the {precision} model {info_file.name} lists is missing; "
                                    f"export again with: {again}")
        encoder = cls(folder / name, threads=threads)
        if encoder.fingerprint != model_fingerprint:  # a file replaced after the JSON was written
            raise refuse(encoder.path, encoder.fingerprint)
        return encoder


def parity(model: TIPRModel, encoder: OnnxImageEncoder, batch_size: int = 8, seed: int = 0) -> tuple[float, float]:
    """``(min cosine, max abs diff)`` of ``encoder``'s features against ``model.encode_image`` on a
    seeded random batch (standard normal pixels, as normalised images are)."""
    height, width = (int(s) for s in model.encoder_config.image_size)
    pixels = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    with _eval_mode(model), torch.inference_mode():
        expected = model.encode_image(pixels.to(device)).float().cpu()
    got = encoder(pixels)
    return float(F.cosine_similarity(got, expected, dim=-1).min()), float((got - expected).abs().max())


def export_onnx(model: str, out: str | None = None, int8: bool = True, threads: PositiveInt | None = None) -> int:
    """Export a trained model's image encoder to ONNX (fp32, and int8) for fast CPU indexing.

    Writes image_encoder.onnx, image_encoder.int8.onnx and image_encoder.json, and prints
    each file with its parity against PyTorch (min cosine and max abs difference of the
    features of a fixed random batch of 8). Exit codes: 0 written; 1 a bad model, folder
    or missing onnx/onnxruntime.

    Args:
        model: the trained model: a pretrained folder, a Hugging Face hub id or a TIPRModule checkpoint (.ckpt).
        out: folder to write (default: the pretrained folder itself; required for a hub id or a .ckpt).
        int8: also write the int8 model (--int8 false, or --no_int8, writes fp32 only).
        threads: onnxruntime threads for the parity check (default: torch's).
    """
    from tipr.pretrained import load_pretrained

    source = Path(model).expanduser()
    if out is None and not source.is_dir():
        raise ValueError(f"--model {model} is not a local folder: give --out, the folder to write the ONNX files to")
    folder = Path(out).expanduser() if out is not None else source
    try:
        network, _ = load_pretrained(model, map_location="cpu")
    except (OSError, ValueError) as e:
        raise (OSError if isinstance(e, OSError) else ValueError)(f"--model: {e}") from e
    checkpoint = str(source.resolve()) if source.exists() else model
    try:
        written = export_image_encoder(network, folder, quantize=int8, checkpoint=checkpoint)
        for precision in ("fp32", "int8"):
            if precision in written:
                path = written[precision]
                cosine, diff = parity(network, OnnxImageEncoder(path, threads=threads))
                print(f"wrote {path} ({precision}, {path.stat().st_size / 1e6:.1f} MB): "
                      f"min cosine vs torch {cosine:.6f}, max abs diff {diff:.2e}")
                if cosine < PARITY_FLOOR:
                    print(f"note: {precision} min cosine {cosine:.6f} is under {PARITY_FLOOR}: "
                          f"its features differ from torch's more than expected", file=sys.stderr)
    except OnnxUnavailableError as e:
        print(f"tipr export-onnx: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written['json']}")
    return 0
