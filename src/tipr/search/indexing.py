"""Indexing a folder of images into a :class:`~tipr.search.GalleryIndex`, incrementally.

Every ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` file under the folder
(recursively, extension case ignored) is encoded once, with the processor's
evaluation transform, in a ``DataLoader`` with worker processes. Indexing again
into the same gallery file encodes only files that are new or whose size or
modification time changed, and drops the entries of files that are gone. A file
that cannot be read (corrupt, truncated, not an image, unreadable folder) is
left out of the index and listed with its reason; it is tried again next time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tipr.data.datasets import read_image
from tipr.search.gallery import GalleryError, GalleryIndex, model_identity

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "IndexReport", "build_index", "scan_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


@dataclass
class IndexReport:
    """What one :func:`build_index` run did."""

    folder: str
    found: int  # image files found under the folder
    encoded: list[str]  # files encoded in this run (new or changed), relative paths
    reencoded: int  # of those, files already indexed whose size or mtime changed
    kept: int  # unchanged entries taken over from the existing gallery
    dropped: list[str]  # entries of the existing gallery whose file is gone
    failed: dict[str, str]  # files that could not be read (relative path -> reason); not in the index
    previous_root: str | None = None  # the folder the existing gallery indexed, when it was another one

    def summary(self) -> str:
        """A few lines for people: counts, then every unreadable file with its reason."""
        lines = []
        if self.previous_root is not None:
            lines.append(f"the gallery indexed {self.previous_root} before; entries are matched by relative path")
        new = len(self.encoded) - self.reencoded
        lines.append(
            f"{self.folder}: {_count(self.found, 'image file')}; encoded {len(self.encoded)} "
            f"({new} new, {self.reencoded} changed), kept {self.kept} unchanged"
        )
        if self.dropped:
            lines.append(f"dropped {_count(len(self.dropped), 'entry', 'entries')} whose file is gone")
        if self.failed:
            verb = "is" if len(self.failed) == 1 else "are"
            lines.append(f"{_count(len(self.failed), 'file')} could not be read and {verb} not in the index:")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def scan_images(folder: str | os.PathLike) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Image files under ``folder``, recursively: ``({relative POSIX path: (size, mtime_ns)}, {path: reason})``.

    The second dict holds what could not even be looked at (a broken link, an
    unreadable sub-folder), so nothing under the folder goes unmentioned.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist or is not a folder")
    found: dict[str, tuple[int, int]] = {}
    failed: dict[str, str] = {}

    def unreadable_folder(error: OSError) -> None:
        failed[Path(error.filename).relative_to(root).as_posix() + "/"] = f"{type(error).__name__}: {error.strerror}"

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            relative = Path(full).relative_to(root).as_posix()
            try:
                stat = os.stat(full)
            except OSError as e:
                failed[relative] = f"{type(e).__name__}: {e.strerror}"
                continue
            found[relative] = (stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items())), failed


class ImageFiles(Dataset):
    """Images to index: ``{"pixel_values": float32 (3, H, W), "error": str, "index": int}``.

    ``transform`` turns a uint8 ``(3, h, w)`` image into model input of
    ``image_size`` (the processor's evaluation transform). A file that cannot be
    read gives a zero image and the reason in ``error`` (empty when read), so one
    bad file neither stops the loader nor gets lost.
    """

    def __init__(self, root: str, paths: Sequence[str], transform: Callable, image_size: Sequence[int]):
        self.root = root
        self.paths = np.asarray(paths, dtype=np.str_)  # no per-object pages for forked workers to copy
        self.transform = transform
        self.image_size = tuple(int(s) for s in image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image, error = self.transform(read_image(os.path.join(self.root, str(self.paths[i])))), ""
        except Exception as e:  # read_image wraps decoder errors and names the file; the reason is its cause
            cause = e.__cause__ or e
            image, error = torch.zeros(3, *self.image_size), f"{type(cause).__name__}: {cause}"
        return {"pixel_values": image, "error": error, "index": i}


def build_index(
    model: TIPRModel,
    processor: TIPRProcessor,
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[GalleryIndex, IndexReport]:
    """Encode the images under ``folder`` into a gallery, saved to ``out`` when given: ``(gallery, report)``.

    If ``out`` already holds a gallery of the same model, only new and changed
    files are encoded and entries of vanished files dropped; a gallery of
    another model, or a file that is not a gallery, is an error (nothing is
    overwritten). ``checkpoint`` names where the model came from, in the gallery
    and in errors. Images are encoded on the model's device; ``num_workers``
    loader processes decode them (default ``min(4, CPUs)``). The :class:`IndexReport`
    says what this run did, including every file that could not be read (also in
    ``gallery.failed``, which is saved); ``report.summary()`` is what ``tipr index`` prints.
    """
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    from tqdm import tqdm

    root = str(Path(folder).resolve())
    files, failed = scan_images(folder)
    identity = model_identity(model, checkpoint)
    previous = None
    if out is not None and Path(out).is_dir():
        raise IsADirectoryError(f"gallery output {out} is a folder; expected a file path")
    if out is not None and Path(out).exists():
        try:
            previous = GalleryIndex.load(out)
        except GalleryError as e:
            raise GalleryError(f"{e}; not overwriting it: choose another output file") from e
        previous.check_model(identity)
    old_rows = {path: i for i, path in enumerate(previous.paths)} if previous is not None else {}
    old_stats = list(zip(previous.sizes.tolist(), previous.mtimes.tolist())) if previous is not None else []

    def unchanged(path: str) -> bool:
        return files[path] == old_stats[old_rows[path]]

    kept = [path for path in files if path in old_rows and unchanged(path)]
    todo = [path for path in files if path not in old_rows or not unchanged(path)]
    dropped = [path for path in old_rows if path not in files]

    dim = identity["embed_dim"]
    features = torch.zeros(len(todo), dim)
    read = torch.zeros(len(todo), dtype=torch.bool)
    if todo:
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        device = next(model.parameters()).device
        dataset = ImageFiles(root, todo, processor.transform, processor.image_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
        with tqdm(total=len(todo), unit="img", desc="indexing", disable=not progress, file=sys.stderr) as bar:
            for batch in loader:
                ok = torch.tensor([not error for error in batch["error"]])  # (B,)
                for i, error in zip(batch["index"].tolist(), batch["error"]):
                    if error:
                        failed[todo[i]] = error
                if ok.any():
                    images = batch["pixel_values"][ok].to(device, non_blocking=True)  # (b, 3, H, W)
                    with torch.inference_mode():
                        encoded = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
                    features[batch["index"][ok]] = encoded.cpu()
                    read[batch["index"][ok]] = True
                bar.update(len(ok))

    encoded = [path for path, ok in zip(todo, read.tolist()) if ok]
    reused = previous.features[[old_rows[path] for path in kept]] if kept else torch.zeros(0, dim)
    unsorted = kept + encoded
    order = sorted(range(len(unsorted)), key=unsorted.__getitem__)
    paths = [unsorted[i] for i in order]
    stats = torch.tensor([files[path] for path in paths], dtype=torch.int64).reshape(-1, 2)  # (N, 2): size, mtime
    failed = dict(sorted(failed.items()))
    gallery = GalleryIndex(
        root=root,
        paths=paths,
        features=torch.cat([reused, features[read]])[order],  # (N, D), rows in path order
        sizes=stats[:, 0].clone(),
        mtimes=stats[:, 1].clone(),
        model=identity,
        failed=failed,
    )
    report = IndexReport(
        folder=root,
        found=len(files),
        encoded=encoded,
        reencoded=sum(path in old_rows for path in encoded),
        kept=len(kept),
        dropped=dropped,
        failed=dict(failed),
        previous_root=previous.root if previous is not None and previous.root != root else None,
    )
    if out is not None:
        gallery.save(out)
    return gallery, report
