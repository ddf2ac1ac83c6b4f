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

__all__ = ["GENERATOR_VERSION", "META_FILE", "SyntheticConfig", "SyntheticSpecError", "ensure_synthetic", "generate_synthetic",
           "save_sample_grid"]

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

    ``out_dir`` must be missing or empty (``FileExistsError`` otherwise: nothing
    is overwritten). ``overrides`` are :class:`SyntheticConfig` fields. Returns ``out_dir``.
    """
    config = SyntheticConfig(**{**(asdict(config) if config else {}), **overrides})
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: generate_synthetic writes only a new or "
                              "empty one (ensure_synthetic reuses one of the same config)")
    fmt = BENCHMARKS[config.format]
    annotation_file, path_key, id_base, has_val = fmt.annotation_files[0], fmt.path_key, fmt.id_base, "val" in fmt.splits
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


class SyntheticSpecError(FileExistsError):
    """``folder`` holds a synthetic benchmark of another spec, or one whose ``synthetic.json`` cannot be read.

    Such a folder is never deleted or replaced (other runs, galleries and
    checkpoints may read it). ``what`` says how it differs (``"num_train_ids
    500 -> 1000, format CUHK-PEDES -> ICFG-PEDES"``); ``suffix`` names the asked
    spec for a folder name (``"1000-icfg"``). The message is one line and says
    what to do; :meth:`advise` rewords it for the caller's option (``--out``,
    ``--data.root``).
    """

    def __init__(self, folder: str | os.PathLike, what: str, suffix: str, option: str | None = None,
                 example: str | os.PathLike | None = None):
        self.folder, self.what, self.suffix, self.option = Path(folder), what, suffix, option
        self.example = str(example) if example is not None else str(self.folder.with_name(f"{self.folder.name}-{suffix}"))
        where = f"give another {option} (e.g. {option}={self.example})" if option else f"write it to another folder (e.g. {self.example})"
        super().__init__(f"{self.folder} {what}; it is not replaced: {where} or delete {self.folder} to regenerate it")

    def advise(self, option: str, example: str | os.PathLike | None = None) -> SyntheticSpecError:
        """The same error, telling the user to give another ``option`` (e.g. ``option=example``)."""
        return type(self)(self.folder, self.what, self.suffix, option, example)

    def __reduce__(self):  # picklable although __init__ takes more than the message
        return type(self), (self.folder, self.what, self.suffix, self.option, self.example)


def ensure_synthetic(out_dir: str | os.PathLike, config: SyntheticConfig | None = None) -> Path:
    """Generate the synthetic benchmark in ``out_dir`` unless it is already there with the same config.

    Only a missing or empty ``out_dir`` is written. One generated with another
    config or generator version (its ``synthetic.json`` differs), or whose
    ``synthetic.json`` cannot be read, is left alone: :class:`SyntheticSpecError`
    says which fields differ; a non-empty folder without ``synthetic.json`` is
    not ours and is left alone too (``FileExistsError``). Generation goes to a
    temporary folder renamed into place (:func:`tipr.files.atomic_folder`), so
    concurrent processes never read a half-written dataset; one left by a killed
    generation is a hidden sibling (``.<name>.<pid>.<random>.partial``), never
    ``out_dir`` itself, and is ignored.
    """
    config = config or SyntheticConfig()
    out = Path(out_dir)
    meta = out / META_FILE
    if _check_existing(out, config):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(out) as partial:
            generate_synthetic(partial, config)
            # Another process may have written out_dir meanwhile: keep its folder, drop ours (raising here
            # deletes the partial). Only a folder renamed there in the instant between would be replaced.
            if _check_existing(out, config):
                raise _AlreadyThere
    except _AlreadyThere:
        return out
    except OSError:
        if _generated_with(meta, config):  # another process generated the same benchmark meanwhile
            return out
        raise
    return out


class _AlreadyThere(Exception):
    """Raised inside :func:`atomic_folder` to drop the new folder: another process wrote the same one."""


def _check_existing(out: Path, config: SyntheticConfig) -> bool:
    """True when ``out`` holds the benchmark of ``config``; False when it is missing or empty; else raises."""
    meta = out / META_FILE
    if meta.is_file():
        try:
            theirs = json.loads(meta.read_text())
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise SyntheticSpecError(out, f"holds a {META_FILE} that cannot be read ({e})", _suffix(config, asdict(config))) from None
        asked = config.meta()
        if theirs == asked:
            return True
        if not isinstance(theirs, dict):
            raise SyntheticSpecError(out, f"holds a {META_FILE} that is not a JSON object", _suffix(config, asdict(config)))
        differ = [key for key in dict.fromkeys([*asked, *theirs]) if theirs.get(key) != asked.get(key)]
        what = ", ".join(f"{key} {_shown(theirs.get(key))} -> {_shown(asked.get(key))}" for key in differ)
        raise SyntheticSpecError(out, f"holds a synthetic benchmark of another spec ({what})", _suffix(config, differ))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists but holds no {META_FILE}: not a tipr synthetic benchmark; choose another root")
    return False


def _shown(value) -> str:
    """A ``synthetic.json`` value in a message: ``[128, 64]``, ``CUHK-PEDES``, ``(none)``."""
    return "(none)" if value is None else value if isinstance(value, str) else json.dumps(value)


def _suffix(config: SyntheticConfig, keys) -> str:
    """A folder-name suffix for the fields ``keys`` of ``config``: ``"1000-icfg"``, ``"val50-128x64-seed3"``."""
    parts = {"generator_version": f"v{GENERATOR_VERSION}", "num_train_ids": str(config.num_train_ids),
             "num_val_ids": f"val{config.num_val_ids}", "num_test_ids": f"test{config.num_test_ids}",
             "images_per_id": f"{config.images_per_id}img", "captions_per_image": f"{config.captions_per_image}cap",
             "image_size": "x".join(map(str, config.image_size)), "seed": f"seed{config.seed}",
             "format": config.format.split("-")[0].lower()}
    return "-".join(parts[key] for key in parts if key in keys) or "new"


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
