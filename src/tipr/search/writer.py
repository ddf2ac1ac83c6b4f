"""Writing a gallery folder (format in :mod:`tipr.search.gallery`): shards, journals, commits, compaction.

A process that encodes images writes them through a :class:`ShardSink`: every
``shard_rows`` rows become a new shard (two ``.npy`` files, each written under a
temporary name and renamed into place), then the sink's journal
(``journal-<writer>.json``) is rewritten the same way to list it. Nothing a reader
sees has changed yet. :func:`commit` then folds every journal into a new
manifest: the journals' shards are appended, rows whose path a later row
supersedes (a file that changed) or that the caller drops (a file that is gone)
are marked deleted, and ``manifest.json`` is renamed into place. Only then are
the journals and the files no manifest names (what a killed writer left) removed.

So a writer killed at any moment leaves the last committed gallery, readable,
plus journals whose shards the next :func:`commit` takes over: running the same
``tipr index`` again encodes only what no shard holds. Several processes (the
ranks of ``tipr index --devices N``) each write their own sink; one commits.

A commit compacts (rewrites every live row into new shards, in path order,
dropping the deleted ones and the approximate index, whose row ids change)
when more than :data:`COMPACT_DELETED` of the rows are deleted or there are more
than :data:`COMPACT_SHARDS` shards, or when asked. Untouched shards are otherwise
never rewritten.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tipr.files import atomic_write
from tipr.search.gallery import (
    DTYPES, GALLERY_FORMAT, GALLERY_VERSION, MANIFEST, GalleryError, GalleryIndex, meta_array, open_shard,
    read_manifest,
)

__all__ = ["COMPACT_DELETED", "COMPACT_SHARDS", "ShardSink", "commit", "gallery_lock", "set_ann", "token", "write_gallery"]

JOURNAL_FORMAT = "tipr-gallery-journal"
#: A commit compacts when more than this fraction of the rows is deleted ...
COMPACT_DELETED = 0.25
#: ... or when the gallery has more shards than this.
COMPACT_SHARDS = 256
#: Rows per shard when compacting or writing given features.
COMPACT_ROWS = 65536
_OWN_FILES = re.compile(r"^(?:.+\.(?:features|meta)\.npy|deleted-.+\.npy|journal-.+\.json|ann-.+\.faiss)$")


def token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def gallery_lock(folder: str | os.PathLike):
    """The lock one writer of ``folder`` holds (``filelock``; freed by the OS when a process dies).
    Acquiring it fails at once, naming the folder, while another ``tipr index`` writes there."""
    from filelock import FileLock, Timeout

    class GalleryLock(FileLock):
        def acquire(self, *args, **kwargs):
            try:
                return super().acquire(*args, **{"timeout": 0, **kwargs})
            except Timeout as e:
                raise GalleryError(f"another process is writing gallery {folder} (it holds {self.lock_file}); "
                                   f"wait for it to finish") from e

    Path(folder).mkdir(parents=True, exist_ok=True)
    return GalleryLock(str(Path(folder) / ".lock"))


class ShardSink:
    """Rows one process encodes, written as shards of ``shard_rows`` rows plus this sink's journal.

    ``fingerprint``, ``dim``, ``dtype``: of the gallery the rows are for (a journal
    of another model is refused at commit). :meth:`add` takes paths, ``(size, mtime_ns)``
    and float32 L2-normalised features; :meth:`fail` records a file that could not
    be read; :meth:`close` writes what is buffered. ``rank`` only shapes the names.
    """

    def __init__(self, folder: str | os.PathLike, *, fingerprint: str | None, dim: int, dtype: str = "float32",
                 shard_rows: int = 1024, rank: int = 0):
        if dtype not in DTYPES or shard_rows < 1:
            raise ValueError(f"dtype must be one of {DTYPES} and shard_rows >= 1, got {dtype!r} and {shard_rows}")
        self.folder, self.dim, self.dtype, self.shard_rows = Path(folder), int(dim), dtype, int(shard_rows)
        self.name = f"r{rank}-{token()}"
        self.journal = {"format": JOURNAL_FORMAT, "fingerprint": fingerprint, "dim": self.dim, "dtype": dtype,
                        "shards": [], "failed": {}}
        self._paths: list[str] = []
        self._stats: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self.written = 0  # rows written to shards so far

    def add(self, paths: Sequence[str], stats: np.ndarray, features: np.ndarray) -> None:
        """Buffer rows: ``stats`` int64 ``(n, 2)`` size and mtime_ns, ``features`` float32 ``(n, D)``."""
        if len(paths) == 0:
            return
        self._paths += list(paths)
        self._stats.append(np.asarray(stats, np.int64).reshape(-1, 2))
        self._features.append(np.asarray(features, np.float32).reshape(-1, self.dim))
        while len(self._paths) >= self.shard_rows:
            self._write(self.shard_rows)

    def fail(self, path: str, reason: str) -> None:
        self.journal["failed"][path] = reason

    def flush(self) -> None:
        """Write the buffered rows as a last (shorter) shard."""
        if self._paths:
            self._write(len(self._paths))

    def close(self) -> None:
        """:meth:`flush`, then write the journal (also when it lists no shard)."""
        self.flush()
        self._save_journal()

    def _write(self, n: int) -> None:
        stats, features = np.concatenate(self._stats), np.concatenate(self._features)
        name = f"{self.name}-{len(self.journal['shards']):05d}"
        _save_npy(self.folder / f"{name}.features.npy", features[:n].astype(self.dtype))
        _save_npy(self.folder / f"{name}.meta.npy", meta_array(self._paths[:n], stats[:n, 0], stats[:n, 1]))
        self.journal["shards"].append({"name": name, "rows": n})
        self._save_journal()
        self._paths, self._stats, self._features = self._paths[n:], [stats[n:]], [features[n:]]
        self.written += n

    def _save_journal(self) -> None:
        with atomic_write(self.folder / f"journal-{self.name}.json", "w") as f:
            json.dump(self.journal, f)


def _journals(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for file in sorted(folder.glob("journal-*.json")):
        try:
            journal = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:  # journals are renamed into place: never half-written
            raise GalleryError(f"gallery journal {file} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(journal, dict) or journal.get("format") != JOURNAL_FORMAT:
            raise GalleryError(f"{file} is not a tipr gallery journal")
        out.append((file, journal))
    return out


def commit(
    folder: str | os.PathLike, *, root: str, model: dict[str, Any], dim: int, dtype: str = "float32",
    drop: Sequence[str] = (), failed: dict[str, str] | None = None, compact: bool | None = None,
) -> GalleryIndex:
    """Fold the journals of ``folder`` into a new manifest, drop the rows of ``drop`` (paths), return the gallery.

    ``root`` is the indexed folder from now on; ``model``, ``dim``, ``dtype`` describe
    a new gallery, an existing one keeps its own (the caller checks the model first). ``failed`` replaces the
    recorded unreadable files (None keeps them), plus those the journals list.
    ``compact``: True always, False never, None by the thresholds above.
    The caller holds :func:`gallery_lock`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder) if (folder / MANIFEST).exists() else None
    if manifest is not None:
        model, dim, dtype = manifest["model"], int(manifest["dim"]), manifest["dtype"]
        previous = GalleryIndex.load(folder)
        shards, deleted = list(previous.shards), set(previous.deleted.tolist())
        recorded_failed, ann = dict(manifest["failed"]), manifest.get("ann")
    else:
        shards, deleted, recorded_failed, ann = [], set(), {}, None
    failed = dict(recorded_failed if failed is None else failed)
    journals = _journals(folder)
    drop = list(drop)
    for file, journal in journals:
        if (journal["fingerprint"], journal["dim"], journal["dtype"]) != (model.get("fingerprint"), dim, dtype):
            raise GalleryError(f"gallery journal {file} holds rows of another model or shape "
                               f"(fingerprint {journal['fingerprint']}, {journal['dim']} {journal['dtype']}); "
                               f"the gallery's is {model.get('fingerprint')}, {dim} {dtype}: delete the journal")
        for entry in journal["shards"]:
            offset = sum(len(s) for s in shards)
            shards.append(open_shard(folder, entry["name"], int(entry["rows"]), dim, dtype, offset))
        failed.update(journal["failed"])
        drop = [*drop, *journal["failed"]]  # tried again and unreadable now: an older row is stale
    draft = GalleryIndex(root=root, model=model, dim=dim, shards=shards, dtype=dtype)
    paths = draft._meta("path")
    if len(paths):  # a path's last row wins: earlier rows of it are superseded
        seen_last = len(paths) - 1 - np.unique(paths[::-1], return_index=True)[1]
        superseded = np.ones(len(paths), bool)
        superseded[seen_last] = False
        deleted.update(np.flatnonzero(superseded).tolist())
        if drop:
            deleted.update(np.flatnonzero(np.isin(paths, [p.encode("utf-8") for p in drop])).tolist())
    if failed:  # a file encoded since it failed is no longer unreadable
        live = np.setdiff1d(np.arange(len(paths)), np.fromiter(deleted, np.int64, len(deleted)))
        for path in paths[live].tolist():
            failed.pop(path.decode("utf-8"), None)
    gallery = GalleryIndex(root=root, model=model, dim=dim, shards=shards, failed=dict(sorted(failed.items())),
                           deleted=np.asarray(sorted(deleted), np.int64), ann=ann, dtype=dtype)
    rows = gallery.rows
    if compact or (compact is None and rows and (len(deleted) > COMPACT_DELETED * rows or len(shards) > COMPACT_SHARDS)):
        gallery = _compacted(folder, gallery)
    _write_manifest(folder, gallery)
    for file, _ in journals:
        file.unlink(missing_ok=True)
    _remove_unreferenced(folder, gallery)
    return GalleryIndex.load(folder)


def _compacted(folder: Path, gallery: GalleryIndex) -> GalleryIndex:
    """Every live row of ``gallery`` rewritten into new shards in path order (no deleted rows, no ANN index)."""
    entries = gallery.entries()
    order = sorted(entries)
    sink = ShardSink(folder, fingerprint=gallery.model.get("fingerprint"), dim=gallery.dim, dtype=gallery.dtype,
                     shard_rows=COMPACT_ROWS)
    for start in range(0, len(order), COMPACT_ROWS):
        chunk = order[start:start + COMPACT_ROWS]
        rows = np.asarray([entries[p][2] for p in chunk], np.int64)
        stats = np.asarray([entries[p][:2] for p in chunk], np.int64).reshape(-1, 2)
        sink.add(chunk, stats, gallery.gather(rows))
    sink.flush()
    shards, offset = [], 0
    for entry in sink.journal["shards"]:  # no journal file: the manifest written next names these shards
        shards.append(open_shard(folder, entry["name"], entry["rows"], gallery.dim, gallery.dtype, offset))
        offset += entry["rows"]
    (folder / f"journal-{sink.name}.json").unlink(missing_ok=True)
    return GalleryIndex(root=gallery.root, model=gallery.model, dim=gallery.dim, shards=shards,
                        failed=gallery.failed, dtype=gallery.dtype)


def _write_manifest(folder: Path, gallery: GalleryIndex) -> None:
    deleted = None
    if len(gallery.deleted):
        deleted = f"deleted-{token()}.npy"
        _save_npy(folder / deleted, gallery.deleted)
    ann = gallery.ann
    manifest = {
        "format": GALLERY_FORMAT, "version": GALLERY_VERSION, "root": gallery.root, "model": gallery.model,
        "dim": gallery.dim, "dtype": gallery.dtype, "shards": [{"name": s.name, "rows": len(s)} for s in gallery.shards],
        "rows": gallery.rows, "live": len(gallery), "deleted": deleted, "failed": gallery.failed, "ann": ann,
    }
    with atomic_write(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def set_ann(folder: str | os.PathLike, ann: dict[str, Any] | None) -> GalleryIndex:
    """Record (or remove, with None) the approximate index in the manifest; the caller holds the lock."""
    gallery = GalleryIndex.load(folder)
    gallery.ann = ann
    _write_manifest(Path(folder), gallery)
    _remove_unreferenced(Path(folder), gallery)
    return GalleryIndex.load(folder)


def _remove_unreferenced(folder: Path, gallery: GalleryIndex) -> None:
    """Delete the gallery files no manifest names: replaced deleted-row lists and ANN indexes, compacted
    shards, and shards and temporary files of writers killed before their journal listed them."""
    manifest = read_manifest(folder)
    keep = {f"{s.name}.{kind}.npy" for s in gallery.shards for kind in ("features", "meta")}
    keep |= {manifest["deleted"], (manifest.get("ann") or {}).get("file")}
    keep |= {f.name for f in folder.glob("journal-*.json")}  # journals written since (by no one: we hold the lock)
    for file in folder.iterdir():
        partial = file.name.startswith(".") and file.name.endswith(".partial")
        if file.name not in keep and (_OWN_FILES.match(file.name) or partial) and file.is_file():
            file.unlink(missing_ok=True)


def write_gallery(
    out: str | os.PathLike, paths: Sequence[str], features, *, root: str | os.PathLike | None = None,
    model: dict[str, Any] | None = None, stats: np.ndarray | None = None, dtype: str = "float32",
    shard_rows: int = COMPACT_ROWS,
) -> GalleryIndex:
    """A gallery folder from features you already have: ``paths`` (relative, unique) and ``(N, D)`` features.

    Rows are L2-normalised here. ``root``: the folder the paths are relative to
    (default: the current folder); ``model``: the identity of the model that
    computed them (:func:`~tipr.search.model_identity`; default: none, and then
    search by features only); ``stats``: ``(N, 2)`` file size and mtime_ns (default
    zeros: ``tipr index`` would encode every file again). ``out`` must not exist
    or be an empty folder.
    """
    import torch

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: write a gallery to a new folder")
    features = features if isinstance(features, np.ndarray) else np.asarray(features)  # a memmap stays one
    if features.ndim != 2 or len(features) != len(paths) or len(set(paths)) != len(paths):
        raise ValueError(f"expected {len(paths)} unique paths and features of shape ({len(paths)}, D), "
                         f"got {len(set(paths))} unique paths and features of shape {tuple(features.shape)}")
    n, dim = features.shape
    stats = np.zeros((n, 2), np.int64) if stats is None else np.asarray(stats, np.int64)
    model = dict(model or {"fingerprint": None, "checkpoint": None, "image_size": None, "text_length": None,
                           "embed_dim": int(dim)})
    with gallery_lock(out):
        sink = ShardSink(out, fingerprint=model.get("fingerprint"), dim=dim, dtype=dtype, shard_rows=shard_rows)
        for start in range(0, n, shard_rows):  # a shard at a time: memory stays one shard, not N x D
            chunk = torch.from_numpy(np.ascontiguousarray(features[start:start + shard_rows], dtype=np.float32))
            sink.add(list(paths[start:start + shard_rows]), stats[start:start + shard_rows],
                     torch.nn.functional.normalize(chunk, dim=-1).numpy())
        sink.close()
        return commit(out, root=str(Path(root or ".").resolve()), model=model, dim=dim, dtype=dtype, compact=False)
