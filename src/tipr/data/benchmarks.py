"""Readers for the three person-description benchmarks, in their public formats.

Each benchmark lives in ``<root>/<NAME>/`` with an ``imgs/`` folder and one JSON
list of entries, one entry per image::

    CUHK-PEDES  reid_raw.json                      split, captions, file_path, processed_tokens, id (1-based)
    ICFG-PEDES  ICFG-PEDES.json / ICFG_PEDES.json  split, captions, file_path, id (0-based), no val split
    RSTPReid    data_captions.json                 split, captions, img_path, id (0-based)

Paths are relative to ``imgs/``. :func:`read_benchmark` validates the whole
file (nothing is skipped: any bad entry raises an error that names the file,
the entry and what was expected; all missing images are reported at once) and
returns a :class:`Benchmark`: one :class:`Split` per split, in the common form
the data module uses. Identity numbers are kept as the benchmark writes them;
:attr:`Benchmark.train_labels` maps the training ones to contiguous labels
``0..num_classes-1`` (sorted by identity number).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BENCHMARKS",
    "PUBLIC_COUNTS",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkFormat",
    "Split",
    "find_annotation",
    "read_benchmark",
    "read_benchmark_folder",
    "split_table",
]

IMAGE_DIR = "imgs"


class BenchmarkError(ValueError):
    """A benchmark annotation file is malformed (the message names the file and the entry)."""


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one benchmark writes its annotation file."""

    name: str
    annotation_files: tuple[str, ...]  # accepted names, first is the canonical one
    path_key: str  # "file_path" or "img_path"
    splits: tuple[str, ...]
    id_base: int  # what the first identity number is in the public release (documentation only)

    @property
    def required_keys(self) -> tuple[str, ...]:
        return ("split", "captions", self.path_key, "id")


BENCHMARKS: dict[str, BenchmarkFormat] = {
    f.name: f
    for f in (
        BenchmarkFormat("CUHK-PEDES", ("reid_raw.json",), "file_path", ("train", "val", "test"), 1),
        BenchmarkFormat("ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", ("train", "test"), 0),
        BenchmarkFormat("RSTPReid", ("data_captions.json",), "img_path", ("train", "val", "test"), 0),
    )
}

# (identities, images, captions) per split in the public releases, to check a local copy against.
PUBLIC_COUNTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "CUHK-PEDES": {"train": (11003, 34054, 68126), "val": (1000, 3078, 6158), "test": (1000, 3074, 6156)},
    "ICFG-PEDES": {"train": (3102, 34674, 34674), "test": (1000, 19848, 19848)},
    "RSTPReid": {"train": (3701, 18505, 37010), "val": (200, 1000, 2000), "test": (200, 1000, 2000)},
}


@dataclass(frozen=True, eq=False)
class Split:
    """One split in the common form: images with identities, captions pointing at images.

    Attributes:
        image_paths: image paths relative to the benchmark's ``imgs/`` folder.
        image_pids: ``(num_images,)`` int64 identity numbers as in the annotation file.
        captions: every caption of the split, image by image, in file order.
        caption_images: ``(num_captions,)`` int64 index into ``image_paths`` of each caption's image.

    A training sample is one (image, caption) pair, i.e. one caption; evaluation
    uses the images as the gallery and the captions as the queries.
    """

    image_paths: tuple[str, ...]
    image_pids: np.ndarray
    captions: tuple[str, ...]
    caption_images: np.ndarray

    @property
    def caption_pids(self) -> np.ndarray:
        """``(num_captions,)`` identity number of each caption."""
        return self.image_pids[self.caption_images]

    @property
    def num_ids(self) -> int:
        return int(np.unique(self.image_pids).size)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)


@dataclass(frozen=True, eq=False)
class Benchmark:
    """A benchmark read from disk: its format, where it lives, and its splits."""

    format: BenchmarkFormat
    folder: Path
    annotation: Path
    splits: dict[str, Split] = field(repr=False)

    @property
    def image_dir(self) -> Path:
        return self.folder / IMAGE_DIR

    @property
    def train_ids(self) -> np.ndarray:
        """Sorted distinct training identity numbers; label ``k`` is ``train_ids[k]``."""
        return np.unique(self.split("train").image_pids)

    @property
    def num_classes(self) -> int:
        """Number of training identities (the ID classifier's width)."""
        return int(self.train_ids.size)

    @property
    def train_labels(self) -> np.ndarray:
        """``(num_train_images,)`` contiguous label ``0..num_classes-1`` of each training image."""
        return np.searchsorted(self.train_ids, self.split("train").image_pids)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"{self.annotation} has no {name!r} split; it has {sorted(self.splits)}")
        return self.splits[name]


def find_annotation(folder: str | os.PathLike, fmt: BenchmarkFormat) -> Path:
    """The annotation file of ``fmt`` in ``folder``; raises ``FileNotFoundError`` naming what was looked for."""
    folder = Path(folder)
    if not folder.is_dir():
        parent = folder.parent
        hint = "" if parent.is_dir() else f" (and its parent {parent} does not exist either)"
        raise FileNotFoundError(
            f"{fmt.name} folder {folder} does not exist{hint}; expected {folder}/{fmt.annotation_files[0]} "
            f"and {folder}/{IMAGE_DIR}/ (set the data root so that <root>/{fmt.name}/ holds them)"
        )
    for name in fmt.annotation_files:
        if (folder / name).is_file():
            return folder / name
    expected = " or ".join(str(folder / n) for n in fmt.annotation_files)
    raise FileNotFoundError(f"{fmt.name} annotation file not found: expected {expected}")


def read_benchmark(name: str, root: str | os.PathLike, *, check_images: bool = True) -> Benchmark:
    """Read benchmark ``name`` (a key of :data:`BENCHMARKS`) from ``<root>/<name>/``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return read_benchmark_folder(Path(root) / name, name, check_images=check_images)


def read_benchmark_folder(folder: str | os.PathLike, format: str, *, check_images: bool = True) -> Benchmark:
    """Read a folder written in the format of benchmark ``format`` (e.g. the synthetic benchmark)."""
    fmt = BENCHMARKS[format]
    annotation = find_annotation(folder, fmt)
    try:
        with open(annotation, "rb") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{annotation}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{annotation}: not valid JSON (not UTF-8 text: {e.reason})") from e
    splits = _parse_entries(entries, fmt, annotation)
    benchmark = Benchmark(fmt, Path(folder), annotation, splits)
    if check_images:
        _check_images_exist(benchmark)
    return benchmark


def _parse_entries(entries: object, fmt: BenchmarkFormat, annotation: Path) -> dict[str, Split]:
    if not isinstance(entries, list):
        raise BenchmarkError(
            f"{annotation}: expected a JSON list of entries (objects with keys {', '.join(fmt.required_keys)}), "
            f"got a {type(entries).__name__}"
        )
    if not entries:
        raise BenchmarkError(f"{annotation}: the entry list is empty")
    per_split: dict[str, tuple[list, list, list, list]] = {s: ([], [], [], []) for s in fmt.splits}
    for i, entry in enumerate(entries):
        where = f"{annotation} entry {i}"
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{where}: expected an object with keys {', '.join(fmt.required_keys)}, got {type(entry).__name__}")
        missing = [k for k in fmt.required_keys if k not in entry]
        if missing:
            raise BenchmarkError(
                f"{where}: missing key {', '.join(repr(k) for k in missing)} "
                f"(a {fmt.name} entry has keys {', '.join(fmt.required_keys)})"
            )
        split, captions, path, pid = entry["split"], entry["captions"], entry[fmt.path_key], entry["id"]
        if not isinstance(split, str):
            raise BenchmarkError(f"{where}: 'split' must be a string, got {type(split).__name__} {split!r:.60}")
        if split not in per_split:
            raise BenchmarkError(f"{where}: unknown split {split!r}; {fmt.name} splits are {', '.join(fmt.splits)}")
        if not isinstance(path, str) or not path.strip():
            raise BenchmarkError(f"{where}: {fmt.path_key!r} must be a non-empty string (a path under {IMAGE_DIR}/), got {path!r:.60}")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise BenchmarkError(f"{where} ({path}): 'id' must be a non-negative integer, got {pid!r:.60}")
        if not isinstance(captions, list) or not captions:
            raise BenchmarkError(f"{where} ({path}): 'captions' must be a non-empty list of strings, got {captions!r:.60}")
        for j, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise BenchmarkError(f"{where} ({path}): caption {j} must be a string, got {type(caption).__name__}")
            if not caption.strip():
                raise BenchmarkError(f"{where} ({path}): caption {j} is empty; expected a description of the person")
        paths, pids, texts, caption_images = per_split[split]
        caption_images.extend([len(paths)] * len(captions))
        paths.append(path)
        pids.append(pid)
        texts.extend(captions)
    splits = {}
    for name, (paths, pids, texts, caption_images) in per_split.items():
        if paths:
            splits[name] = Split(tuple(paths), np.asarray(pids, dtype=np.int64), tuple(texts), np.asarray(caption_images, dtype=np.int64))
    if "train" not in splits or "test" not in splits:
        absent = [s for s in ("train", "test") if s not in splits]
        raise BenchmarkError(f"{annotation}: no entries with split {' or '.join(repr(s) for s in absent)}")
    return splits


def _check_images_exist(benchmark: Benchmark, show: int = 5) -> None:
    missing = [
        (split, path)
        for split, data in benchmark.splits.items()
        for path in data.image_paths
        if not os.path.isfile(os.path.join(benchmark.image_dir, path))
    ]
    if missing:
        total = sum(s.num_images for s in benchmark.splits.values())
        first = ", ".join(f"{path} ({split})" for split, path in missing[:show])
        raise FileNotFoundError(
            f"{len(missing)} of {total} images listed in {benchmark.annotation} do not exist under "
            f"{benchmark.image_dir}/; first {min(show, len(missing))}: {first}"
        )


def split_table(benchmark: Benchmark, reference: dict[str, tuple[int, int, int]] | None = None, title: str | None = None) -> str:
    """A small text table of identities / images / captions per split (with the public counts if given)."""
    head = f"{title or benchmark.format.name} ({benchmark.format.name} format): {benchmark.annotation}"
    rows = [("split", "ids", "images", "captions") + (("public ids/images/captions",) if reference else ())]
    for name in benchmark.format.splits:
        if name not in benchmark.splits:
            rows.append((name, "-", "-", "-") + (("-",) if reference else ()))
            continue
        s = benchmark.splits[name]
        row = (name, f"{s.num_ids:,}", f"{s.num_images:,}", f"{s.num_captions:,}")
        if reference:
            ref = reference.get(name)
            row += ("/".join(f"{n:,}" for n in ref) if ref else "-",)
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([head, *lines])
