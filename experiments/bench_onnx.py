"""CPU image-encoder speed: PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, side by side.

Exports a model's image encoder with ``tipr.search.onnx.export_image_encoder``
(fp32, and dynamic int8 of the MatMul weights) into a temporary folder, then
encodes one fixed seeded batch (standard normal pixels, as normalised images
are) with each of

- torch fp32: ``model.encode_image`` under ``torch.inference_mode``;
- ONNX Runtime fp32 and int8: ``tipr.search.onnx.OnnxImageEncoder``, CPU provider;

and prints for each the images/s over ``--batches`` timed batches after one
warm-up batch, the speed-up over torch and the min cosine similarity of its
features against torch's on that batch (its max abs difference too). Only the
encoder is timed: no image decoding, resizing or gallery writing.

The model is ViT-B/16-shaped (the vision tower of OpenAI's ViT-B/16, width 768,
12 layers, patch 16, projection 512; a small text tower, unused here) with random
weights at 384 x 128, the person-retrieval input size (24 x 8 patches); random
weights do not change the speed. ``--backbone`` gives another shape (a JSON dict
of ``CLIPConfig`` arguments, or a preset name such as ``tiny``), ``--model`` a
trained model instead (a pretrained folder, hub id or ``.ckpt``; its reference fp16
weights, if any, are cast to fp32 as the export does). torch and onnxruntime
both run on ``--threads`` threads; the load average is printed before and after,
since another process on the CPU slows every figure.

    python experiments/bench_onnx.py                 # ViT-B/16 at 384x128, batch 16, 2 threads (about 1.5 min on 2 cores)
    python experiments/bench_onnx.py --model outputs/synthetic/.../pretrained --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from tipr.methods.sen import SENModel
from tipr.model import TIPRModel
from tipr.pretrained import load_pretrained
from tipr.search.onnx import OnnxImageEncoder, export_image_encoder

#: OpenAI CLIP ViT-B/16's vision tower and projection; the text tower is kept small (only images are encoded).
VIT_B16 = {
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
    "projection_dim": 512,
}


def build_model(args: argparse.Namespace) -> TIPRModel:
    """The model to time, in eval mode, fp32, on CPU."""
    if args.model:
        model, _ = load_pretrained(args.model, map_location="cpu")
    else:
        backbone = VIT_B16 if args.backbone is None else (
            json.loads(args.backbone) if args.backbone.lstrip().startswith("{") else args.backbone)
        torch.manual_seed(0)
        model = SENModel.from_backbone(backbone, num_classes=1, image_size=tuple(args.image_size), text_length=77)
    if model.reference_fp16_weights:
        model = model.float()
        model.reference_fp16_weights = False
    return model.eval()


def timed(fn, pixels: torch.Tensor, batches: int) -> tuple[float, torch.Tensor]:
    """``(images/s, features)``: one warm-up call (its features returned), then ``batches`` timed calls."""
    features = fn(pixels)
    start = time.perf_counter()
    for _ in range(batches):
        fn(pixels)
    return batches * len(pixels) / (time.perf_counter() - start), features


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model: pretrained folder, hub id or .ckpt (default: random weights)")
    parser.add_argument("--backbone", help="without --model: a JSON dict of CLIPConfig arguments or a preset name "
                        "(default: ViT-B/16's vision tower)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[384, 128],
                        help="without --model: the input size (default 384 128)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per variant, after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    args = parser.parse_args()

    print(f"before: {load()}")
    torch.set_num_threads(args.threads)
    model = build_model(args)
    height, width = (int(s) for s in model.encoder_config.image_size)
    vision = model.clip.config.vision_config
    params = sum(p.numel() for p in model.clip.vision_model.parameters()) / 1e6
    print(f"model: {args.model or 'random weights'}, vision width {vision.hidden_size}, {vision.num_hidden_layers} "
          f"layers, patch {vision.patch_size} ({params:.1f} M parameters), {height}x{width} input, embed dim "
          f"{int(model.embed_dim)}; batch {args.batch_size}, {args.batches} timed batches after 1 warm-up, "
          f"{args.threads} threads, torch {torch.__version__}")
    pixels = torch.randn(args.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory(prefix="tipr-bench-onnx-") as tmp:
        start = time.perf_counter()
        written = export_image_encoder(model, tmp)
        sizes = ", ".join(f"{p} {written[p].stat().st_size / 1e6:.1f} MB" for p in ("fp32", "int8"))
        print(f"export (fp32 + int8): {time.perf_counter() - start:.1f} s ({sizes})")

        with torch.inference_mode():
            torch_speed, expected = timed(model.encode_image, pixels, args.batches)
        rows = [("torch fp32", torch_speed, None, None)]
        for precision in ("fp32", "int8"):
            encoder = OnnxImageEncoder(written[precision], threads=args.threads)
            speed, got = timed(encoder, pixels, args.batches)
            cosine = float(F.cosine_similarity(got, expected, dim=-1).min())
            rows.append((f"onnxruntime {precision}", speed, cosine, float((got - expected).abs().max())))
            del encoder

    print(f"{'':18s} {'images/s':>9s} {'ms/image':>9s} {'vs torch':>9s} {'min cosine':>11s} {'max abs diff':>13s}")
    for name, speed, cosine, diff in rows:
        print(f"{name:18s} {speed:9.2f} {1000 / speed:9.1f} {speed / torch_speed:8.2f}x "
              f"{'-' if cosine is None else f'{cosine:.6f}':>11s} {'-' if diff is None else f'{diff:.2e}':>13s}")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
