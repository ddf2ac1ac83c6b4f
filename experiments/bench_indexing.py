"""Indexing and search speed of a folder of images: images/s and per-query latency on a 10,000-image gallery.

Draws ``--images`` synthetic person images (``tipr.data.synthetic``, 500
identities) at the model's input size into a temporary folder (or ``--folder``,
kept and reused), indexes them with ``tipr.search.build_index`` and times:

- indexing: scan + decode + resize + encode, in images/s; then a second run
  with nothing changed, which only scans the folder and loads the gallery;
- search: latency of one query (tokenize + encode the caption, score every
  gallery image, ``topk``) averaged over ``--queries`` captions asked one at a
  time, the same captions asked in one batch (per query), and the ranking
  alone (scores + ``topk`` of a precomputed caption feature).

The model is the synthetic job's (``experiments/synthetic.yaml``: its backbone,
image size and text length; random weights, which do not change the speed)
or a trained one (``--model``: a pretrained folder, a hub id or a ``.ckpt`` file).
Only the inference API is used (a ``TIPRModel`` + ``TIPRProcessor``, no Lightning).

    python experiments/bench_indexing.py [--model outputs/.../pretrained] [--images 10000] [--device cuda] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from tipr.data.synthetic import describe, draw_person, sample_person
from tipr.methods.sen import SENModel
from tipr.model import TIPRModel
from tipr.pretrained import load_pretrained
from tipr.processing import TIPRProcessor
from tipr.search import build_index, search

CONFIG = Path(__file__).with_name("synthetic.yaml")


def load_model(
    source: str | None, backbone: str | None = None, image_size: list[int] | None = None
) -> tuple[TIPRModel, TIPRProcessor]:
    """A trained model (pretrained folder, hub id or ``.ckpt``), or random weights: the synthetic job's
    backbone, or ``backbone`` (JSON config dict)."""
    if source:
        return load_pretrained(source)
    config = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    model = SENModel.from_backbone(
        json.loads(backbone) if backbone else config["model"]["backbone"],
        num_classes=1,
        image_size=tuple(image_size or config["data"]["image_size"]),
        text_length=config["data"]["text_length"],
    ).eval()
    return model, TIPRProcessor.for_model(model)


def write_images(folder: Path, count: int, image_size: tuple[int, int]) -> None:
    """``count`` JPEGs of 500 synthetic identities at ``image_size`` (H, W), 100 per sub-folder; existing ones are kept."""
    rng = np.random.default_rng(0)
    persons = [sample_person(rng) for _ in range(500)]
    for i in range(count):
        path = folder / f"{i // 100:03d}" / f"{i:05d}.jpg"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_person(persons[i % len(persons)], np.random.default_rng([1, i]), image_size).save(path, quality=92)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model: pretrained folder, hub id or .ckpt file "
                        "(default: the synthetic job's model, random weights)")
    parser.add_argument("--backbone", help="without --model: a JSON dict of CLIPConfig arguments (random weights of that shape)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="without --model: the model's input size")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--folder", help="keep the images here (default: a temporary folder, deleted at the end)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()

    device = torch.device(args.device)
    model, processor = load_model(args.model, args.backbone, args.image_size)
    model = model.to(device)
    image_size = processor.image_size
    rng = np.random.default_rng(2)
    queries = [describe(sample_person(rng), rng) for _ in range(args.queries)]
    with tempfile.TemporaryDirectory(prefix="tipr-bench-indexing-") as tmp:
        folder = Path(args.folder or Path(tmp) / "images")
        start = time.perf_counter()
        write_images(folder, args.images, image_size)
        print(f"{args.images:,} images of {image_size[0]}x{image_size[1]} in {folder} ({time.perf_counter() - start:.1f} s)")
        out = Path(tmp) / "bench.gallery"
        kwargs = {"batch_size": args.batch_size, "num_workers": args.workers, "progress": False}
        seconds, (gallery, _) = timed(lambda: build_index(model, processor, folder, out, **kwargs), device)
        print(f"index: {len(gallery) / seconds:,.0f} images/s ({len(gallery):,} images in {seconds:.1f} s, "
              f"batch {args.batch_size}, {args.workers} workers, {device})")
        seconds, (_, again) = timed(lambda: build_index(model, processor, folder, out, **kwargs), device)
        print(f"index again, nothing changed: {seconds:.2f} s (encoded {len(again.encoded)})")

        features = gallery.features.to(device)  # (N, D), for the ranking alone
        for q in queries[:3]:  # warm-up
            search(model, processor, gallery, q, args.top_k)
        single = [timed(lambda: search(model, processor, gallery, q, args.top_k), device)[0] for q in queries]
        batched, _ = timed(lambda: search(model, processor, gallery, queries, args.top_k), device)
        with torch.inference_mode():
            text = torch.nn.functional.normalize(model.encode_text(processor.tokenize(queries[:1]).to(device)), dim=-1)
        ranking = [timed(lambda: torch.topk(text @ features.T, args.top_k, dim=1)[0].tolist(), device)[0]
                   for _ in queries]
        n = len(gallery)
        print(f"search {n:,} images, top {args.top_k}, {device}:")
        print(f"  one query at a time: {1e3 * np.mean(single):.2f} ms/query (median {1e3 * np.median(single):.2f})")
        print(f"  {len(queries)} queries in one batch: {1e3 * batched / len(queries):.2f} ms/query ({1e3 * batched:.1f} ms)")
        print(f"  ranking alone (scores + topk): {1e3 * np.mean(ranking):.3f} ms/query")


if __name__ == "__main__":
    main()
