"""Indexing a folder of images into a gallery folder (:mod:`tipr.search.gallery`), incrementally and resumably.

Every ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` file under the folder
(recursively, extension case ignored) is encoded once, with the processor's
evaluation transform, in a ``DataLoader`` whose worker processes decode the
images. Indexing again into the same gallery encodes only files that are new or
whose size or modification time changed (into new shards), and marks the rows
of files that are gone deleted; untouched shards are not rewritten. A file that
cannot be read (corrupt, truncated, not an image, unreadable folder) is left out
and listed with its reason; it is tried again next time.

A run is planned (:func:`plan_index`), encoded into :class:`~tipr.search.writer.ShardSink`
shards, and committed (:func:`finish_index`). A run killed at any moment leaves
the last committed gallery plus the shards it had finished; the same command
run again takes those over and encodes only the rest. ``tipr index --devices N``
runs the same three steps on N processes (:mod:`tipr.training.predict`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tipr.data.datasets import read_image
from tipr.search.gallery import MANIFEST, GalleryError, GalleryIndex, model_identity
from tipr.search.writer import ShardSink, commit, gallery_lock

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "IndexPlan", "IndexReport", "build_index", "finish_index",
           "plan_index", "scan_images"]

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
    dropped: list[str]  # entries of the existing gallery whose file is gone (or now unreadable)
    failed: dict[str, str]  # files that could not be read (relative path -> reason); not in the index
    previous_root: str | None = None  # the folder the existing gallery indexed, when it was another one
    resumed: int = 0  # rows an interrupted run had encoded, taken over before planning

    def summary(self) -> str:
        """A few lines for people: counts, then every unreadable file with its reason."""
        lines = []
        if self.previous_root is not None:
            lines.append(f"the gallery indexed {self.previous_root} before; entries are matched by relative path")
        if self.resumed:
            lines.append(f"resumed: took over {_count(self.resumed, 'image')} an interrupted run had encoded")
        new = len(self.encoded) - self.reencoded
        lines.append(
            f"{self.folder}: {_count(self.found, 'image file')}; encoded {len(self.encoded)} "
            f"({new} new, {self.reencoded} changed), kept {self.kept} unchanged"
        )
        if self.dropped:
            lines.append(f"dropped {_count(len(self.dropped), 'entry', 'entries')} whose file is gone or unreadable")
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


@dataclass
class IndexPlan:
    """What a run will do: decided once (on rank 0), then shared by every process that encodes."""

    root: str  # the image folder, absolute
    out: str  # the gallery folder
    identity: dict[str, Any]  # the model's (model_identity)
    dtype: str
    files: dict[str, tuple[int, int]]  # every image file: (size, mtime_ns)
    failed: dict[str, str]  # what the scan could not look at
    todo: list[str]  # files to encode, sorted
    kept: int
    reencoded: int
    dropped: list[str]
    previous_root: str | None = None
    resumed: int = 0
    previous: set[str] = field(default_factory=set)  # paths the gallery held before this run

    def shard(self, rank: int, world_size: int) -> list[str]:
        """The files process ``rank`` of ``world_size`` encodes: a contiguous block of ``todo``."""
        per = -(-len(self.todo) // world_size)
        return self.todo[rank * per:(rank + 1) * per]


def check_out(out: str | os.PathLike) -> Path:
    """``out`` if a gallery can be written there: a gallery folder, an empty or new one; else a GalleryError."""
    out = Path(out)
    if out.is_file():
        raise GalleryError(f"--out {out} is a file (a format-1 gallery, or not a gallery); tipr index writes "
                           f"gallery folders now: give a new --out folder ('tipr search' still reads {out})")
    if out.is_dir() and not (out / MANIFEST).exists() and any(
            not (f.name.startswith(("journal-", ".")) or f.name.endswith(".npy")) for f in out.iterdir()):
        raise GalleryError(f"--out {out} is a folder that is not a tipr gallery (no {MANIFEST}); "
                           f"not writing into it: choose a new folder")
    return out


def plan_index(identity: dict[str, Any], folder: str | os.PathLike, out: str | os.PathLike,
               dtype: str = "float32") -> IndexPlan:
    """Plan indexing ``folder`` into the gallery folder ``out`` (created if missing) by the model of ``identity``.

    Takes over the shards an interrupted run left first (a commit), then compares
    the folder with the gallery. Refuses a format-1 file, a folder that is not a
    gallery, and a gallery of another model, naming them. The caller holds :func:`gallery_lock`.
    """
    out = check_out(out)
    root = str(Path(folder).resolve())
    files, failed = scan_images(folder)
    previous, resumed = None, 0
    if (out / MANIFEST).exists():
        previous = GalleryIndex.load(out)
        previous.check_model(identity)
    previous_root = previous.root if previous is not None and previous.root != root else None
    if previous is None or any(out.glob("journal-*.json")):  # a new gallery starts empty, and readable
        before = len(previous) if previous is not None else 0
        previous = commit(out, root=root, model=identity, dim=identity["embed_dim"], dtype=dtype)
        previous.check_model(identity)
        resumed = len(previous) - before
    old = previous.entries()
    todo = [p for p, stat in files.items() if p not in old or old[p][:2] != stat]
    return IndexPlan(
        root=root, out=str(out), identity=identity, dtype=previous.dtype,
        files=files, failed=failed, todo=todo, kept=len(files) - len(todo), reencoded=sum(p in old for p in todo),
        dropped=[p for p in old if p not in files], resumed=resumed,
        previous_root=previous_root, previous=set(old),
    )


def encode_into(sink: ShardSink, encoder: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                paths: Sequence[str], files: dict[str, tuple[int, int]], device: torch.device,
                on_batch: Callable[[int], Any] = lambda n: None) -> None:
    """Encode every batch of ``loader`` (an :class:`ImageFiles` over ``paths``) into ``sink``."""
    half = device.type == "cuda"
    for batch in loader:
        ok = torch.tensor([not error for error in batch["error"]])
        features = None
        if ok.any():
            images = batch["pixel_values"][ok].to(device, non_blocking=True)  # (b, 3, H, W)
            with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=half):
                features = torch.nn.functional.normalize(encoder(images).float(), dim=-1)
        record_batch(sink, batch, paths, files, features)
        on_batch(len(ok))


def record_batch(sink: ShardSink, batch: dict[str, Any], paths: Sequence[str], files: dict[str, tuple[int, int]],
                 features: torch.Tensor | None) -> None:
    """Write one loaded batch to ``sink``: its unreadable files as failures, and ``features`` (one row per
    readable image, in batch order; None when there is none) with each file's size and mtime."""
    names = []
    for i, error in zip(batch["index"].tolist(), batch["error"]):
        if error:
            sink.fail(paths[i], error)
        else:
            names.append(paths[i])
    if names:
        sink.add(names, np.asarray([files[p] for p in names], np.int64), features.cpu().numpy())


def finish_index(plan: IndexPlan, *, compact: bool | None = None) -> tuple[GalleryIndex, IndexReport]:
    """Commit what every process of the run wrote: ``(gallery, report)``."""
    gallery = commit(plan.out, root=plan.root, model=plan.identity, dim=plan.identity["embed_dim"],
                     dtype=plan.dtype, failed=dict(plan.failed), drop=plan.dropped, compact=compact)
    unreadable = [p for p in gallery.failed if p in plan.previous]  # changed and unreadable now: the commit dropped it
    report = IndexReport(
        folder=plan.root, found=len(plan.files), encoded=[p for p in plan.todo if p not in gallery.failed],
        reencoded=sum(p in plan.previous and p not in gallery.failed for p in plan.todo), kept=plan.kept,
        dropped=plan.dropped + unreadable, failed=dict(gallery.failed), previous_root=plan.previous_root,
        resumed=plan.resumed,
    )
    return gallery, report


def build_index(
    model: TIPRModel,
    processor: TIPRProcessor,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    dtype: str = "float32",
    shard_rows: int = 1024,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    compact: bool | None = None,
) -> tuple[GalleryIndex, IndexReport]:
    """Encode the images under ``folder`` into the gallery folder ``out``: ``(gallery, report)``.

    If ``out`` already holds a gallery of the same model, only new and changed
    files are encoded and rows of vanished files marked deleted; a gallery of
    another model, or a file or folder that is not a gallery, is an error (nothing
    is overwritten). ``checkpoint`` names where the model came from, in the
    gallery and in errors. Images are encoded on the model's device (float16
    autocast on CUDA) by ``encoder`` (default ``model.encode_image``; an
    :class:`~tipr.search.onnx.OnnxImageEncoder` runs them through ONNX Runtime);
    ``num_workers`` loader processes decode them (default ``min(4, CPUs)``).
    Features are stored as ``dtype`` (``"float32"`` or ``"float16"``), every
    ``shard_rows`` rows a shard: what a killed run loses at most. ``compact``: see
    :func:`~tipr.search.writer.commit`. ``report.summary()`` is what ``tipr index``
    prints, including every file that could not be read (also in ``gallery.failed``).
    """
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    from tqdm import tqdm

    identity = model_identity(model, checkpoint)
    with gallery_lock(check_out(out)):
        plan = plan_index(identity, folder, out, dtype)
        sink = ShardSink(out, fingerprint=identity["fingerprint"], dim=identity["embed_dim"], dtype=plan.dtype,
                         shard_rows=shard_rows)
        if plan.todo:
            workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
            device = next(model.parameters()).device
            dataset = ImageFiles(plan.root, plan.todo, processor.transform, processor.image_size)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
            with tqdm(total=len(plan.todo), unit="img", desc="indexing", disable=not progress, file=sys.stderr) as bar:
                encode_into(sink, encoder or model.encode_image, loader, plan.todo, plan.files, device, bar.update)
        sink.close()
        return finish_index(plan, compact=compact)


#: ``tipr index`` rebuilds the ANN index (by default) when more than this fraction of rows is not in it.
ANN_REBUILD_UNCOVERED = 0.2


def maybe_build_ann(out: str | os.PathLike, ann: bool | None = None, factory: str | None = None) -> dict | None:
    """Build the gallery's approximate index (:mod:`tipr.search.ann`) and record it: its manifest entry, or None.

    ``ann``: True builds (or rebuilds) it; False never; None when the gallery has
    :data:`~tipr.search.query.ANN_MIN_ROWS` rows or more and the index is missing
    or misses more than :data:`ANN_REBUILD_UNCOVERED` of them. ``factory``: a FAISS
    index factory string (default: :func:`~tipr.search.ann.choose_index` by size).
    """
    from tipr.search.query import ANN_MIN_ROWS
    from tipr.search.writer import set_ann, token

    if ann is False:
        return None
    gallery = GalleryIndex.load(out)
    if ann is None:
        covered = gallery.ann["rows"] if gallery.ann else 0
        if len(gallery) < ANN_MIN_ROWS or gallery.rows - covered <= ANN_REBUILD_UNCOVERED * gallery.rows:
            return None
    from tipr.search.ann import save_ann, timed_build

    with gallery_lock(out):
        index, info = timed_build(gallery.blocks, gallery.dim, factory=factory)
        name = f"ann-{token()}.faiss"
        save_ann(index, Path(out) / name)
        entry = {"file": name, **info.to_dict()}
        set_ann(out, entry)
    return entry
