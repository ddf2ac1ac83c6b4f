"""Writing the synthetic benchmark: its config, the files in a public benchmark format, and a PNG of samples."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tipr.data.benchmarks import BENCHMARKS, read_benchmark_folder
from tipr.data.synthetic.attributes import distinct_persons
from tipr.data.synthetic.captions import describe
from tipr.data.synthetic.painters import draw_person
from tipr.files import atomic_folder

__all__ = ["GENERATOR_VERSION", "META_FILE", "SyntheticConfig", "ensure_synthetic", "generate_synthetic", "save_sample_grid"]

GENERATOR_VERSION = 1
META_FILE = "synthetic.json"


@dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic benchmark is made of (recorded in ``synthetic.json``).

    Args:
        num_train_ids: training identities.
        num_val_ids: validation identities, disjoint from test (0: no val split,
            validation then uses test; the ICFG-PEDES format has none whatever this says).
        num_test_ids: test identities.
        images_per_id: images of each identity.
        captions_per_image: captions of each image.
        image_size: (height, width) of the images.
        seed: generator seed: the same config writes the same bytes (the data
            module's own ``seed`` does not change the benchmark).
        format: the benchmark format written, and read back.
    """

    num_train_ids: int = 500
    num_val_ids: int = 100
    num_test_ids: int = 100
    images_per_id: int = 4
    captions_per_image: int = 2
    image_size: tuple[int, int] = (128, 64)
    seed: int = 0
    format: Literal["CUHK-PEDES", "ICFG-PEDES", "RSTPReid"] = "CUHK-PEDES"

    def __post_init__(self):
        # Messages name the field as the data module's option (data.synthetic.<field>) ends.
        if self.format not in BENCHMARKS:
            raise ValueError(f"synthetic.format must be one of {sorted(BENCHMARKS)}, got {self.format!r}")
        low = [f"{name}={getattr(self, name)}" for name in ("num_train_ids", "num_test_ids", "images_per_id", "captions_per_image")
               if getattr(self, name) < 1] + ([f"num_val_ids={self.num_val_ids}"] if self.num_val_ids < 0 else [])
        if low:
            raise ValueError(f"synthetic.{', synthetic.'.join(low)}: the synthetic benchmark needs >= 1 train/test identity, "
                             "image and caption (and >= 0 val ids)")
        size = tuple(self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"synthetic.image_size must be (height, width) with positive values, got {self.image_size!r}")
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))

    def meta(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **asdict(self), "image_size": list(self.image_size)}


_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def generate_synthetic(out_dir: str | os.PathLike, config: SyntheticConfig | None = None, **overrides) -> Path:
    """Write the synthetic benchmark to ``out_dir`` (``imgs/`` + the annotation file + ``synthetic.json``).

    ``overrides`` are :class:`SyntheticConfig` fields. Returns ``out_dir``.
    """
    config = SyntheticConfig(**{**(asdict(config) if config else {}), **overrides})
    fmt = BENCHMARKS[config.format]
    annotation_file, path_key, id_base, has_val = fmt.annotation_files[0], fmt.path_key, fmt.id_base, "val" in fmt.splits
    out = Path(out_dir)
    splits = [("train", config.num_train_ids), ("val", config.num_val_ids if has_val else 0), ("test", config.num_test_ids)]
    persons = distinct_persons(sum(n for _, n in splits), np.random.default_rng([config.seed, 0]))
    entries, pid = [], 0
    for split, count in splits:
        (out / "imgs" / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            person = persons[pid]
            for k in range(config.images_per_id):
                rng = np.random.default_rng([config.seed, 1, pid, k])  # this image's variation and captions
                path = f"{split}/{pid + id_base:05d}_{k}.jpg"
                draw_person(person, rng, config.image_size).save(out / "imgs" / path, quality=92)
                captions = [describe(person, rng) for _ in range(config.captions_per_image)]
                entry = {"split": split, "captions": captions, path_key: path, "id": pid + id_base}
                if config.format == "CUHK-PEDES":
                    entry["processed_tokens"] = [_WORD.findall(c.lower()) for c in captions]
                entries.append(entry)
            pid += 1
    with open(out / annotation_file, "w") as f:
        json.dump(entries, f)
    with open(out / META_FILE, "w") as f:
        json.dump(config.meta(), f, indent=1)
    return out


def ensure_synthetic(out_dir: str | os.PathLike, config: SyntheticConfig | None = None) -> Path:
    """Generate the synthetic benchmark in ``out_dir`` unless it is already there with the same config.

    A folder generated with another config (its ``synthetic.json`` differs) is
    replaced; a folder that exists without ``synthetic.json`` is not ours and is
    left alone (error). Generation goes to a temporary folder renamed into place
    (:func:`tipr.files.atomic_folder`), so concurrent processes never read a half-written dataset.
    """
    config = config or SyntheticConfig()
    out = Path(out_dir)
    meta = out / META_FILE
    if meta.is_file():
        if _generated_with(meta, config):
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but holds no {META_FILE}: not a tipr synthetic benchmark; choose another root")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(out) as partial:
            generate_synthetic(partial, config)
    except OSError:
        if _generated_with(meta, config):  # another process generated the same benchmark meanwhile
            return out
        raise
    return out


def _generated_with(meta: Path, config: SyntheticConfig) -> bool:
    """Whether ``meta`` (a ``synthetic.json``) records ``config``; False when it cannot be read as JSON."""
    try:
        return json.loads(meta.read_text()) == config.meta()
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return False


def save_sample_grid(folder: str | os.PathLike, png: str | os.PathLike, *, num_ids: int = 8, images_per_id: int = 2, split: str = "train",
                     format: str = "CUHK-PEDES", scale: int = 2, ids_per_row: int = 2) -> Path:
    """Save a PNG of the first ``num_ids`` identities of ``split``: their images, each with its first caption under it.

    The dataset is read back with the benchmark reader, so the picture shows
    exactly what the data module trains on. Drawn with :func:`tipr.render.image_grid`:
    ``ids_per_row`` identities a row, images scaled up ``scale`` times (nearest
    neighbour), captions ("id <id> #<image>: ...") wrapped under their image.
    """
    from tipr.render import image_grid  # torch and torchvision: only when a grid is drawn

    data = read_benchmark_folder(folder, format).split(split)
    first_caption = {int(img): c for c, img in reversed(list(enumerate(data.caption_images)))}
    tiles, captions = [], []
    for pid in list(dict.fromkeys(data.image_pids.tolist()))[:num_ids]:
        for k, i in enumerate(np.flatnonzero(data.image_pids == pid)[:images_per_id]):
            with Image.open(Path(folder, "imgs", data.image_paths[i])) as im:
                tiles.append(im.convert("RGB"))
            captions.append(f"id {pid} #{k + 1}: {data.captions[first_caption[int(i)]]}")
    if not tiles:
        raise ValueError(f"{folder}: split {split!r} has no images to show (num_ids={num_ids}, images_per_id={images_per_id})")
    per_row = images_per_id * ids_per_row
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    texts = [captions[i:i + per_row] for i in range(0, len(captions), per_row)]
    size = (tiles[0].height * scale, tiles[0].width * scale)
    sheet = image_grid(rows, texts, tile_size=size, resample=Image.Resampling.NEAREST)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return Path(png)
