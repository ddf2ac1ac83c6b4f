"""The gallery: image features of a folder, memory-mapped, with what incremental indexing and the model check need.

Gallery format 2 is a folder (``photos.gallery/``)::

    manifest.json                  what is in the gallery (below); the commit point of every write
    <shard>.features.npy           float32 or float16 (n, D), L2-normalised image features
    <shard>.meta.npy               structured (n,): "path" (UTF-8 bytes, POSIX, relative to root),
                                   "size" (int64 bytes), "mtime_ns" (int64), per row of the shard
    deleted-<token>.npy            int64, sorted: the rows (global ids) no longer in the gallery
    journal-<writer>.json          shards a running (or killed) indexing process wrote, not yet in the manifest
    ann-<token>.faiss              optional approximate index over rows [0, ann.rows) (:mod:`tipr.search.ann`)

``manifest.json``: ``{"format": "tipr-gallery", "version": 2, "root": the indexed folder, absolute,
"model": {"fingerprint", "fingerprint_version", "weights_fingerprint", "checkpoint", "image_size", "text_length",
"embed_dim", "architecture"} (:mod:`tipr.search.identity`; galleries of tipr before issue 21 have no
"fingerprint_version", "weights_fingerprint" or "architecture", and are refused: index them again),
"dim": D, "dtype": "float32" | "float16", "shards": [{"name", "rows"}], "rows": rows in all shards,
"live": rows not deleted, "deleted": file name or null, "failed": {relative path: reason} (files that
could not be read at the last run; not in the gallery), "ann": {"file", "rows", "factory", ...} or null}``.

Row ``i`` of the gallery is row ``i - offset`` of the shard it falls in (shards in
manifest order), a global id that stays fixed until the gallery is compacted.
A file that changed is encoded into a new shard and its old row marked deleted;
a shard is never written twice. Files are written under fresh names and the
manifest renamed into place last (:func:`tipr.files.atomic_write`), so a reader
sees the old gallery or the new one, whatever moment a writer is killed at
(:mod:`tipr.search.writer`). Every file is read with ``numpy.load(allow_pickle=False)``
or as JSON: nothing in a gallery is unpickled.

Format 1, a single ``torch.save`` file of a dict (``"paths"``, ``"features"``,
``"sizes"``, ``"mtimes"``, ``"root"``, ``"model"``, ``"failed"``), is still read
(``torch.load(weights_only=True)``: tensors and plain containers only) for search;
``tipr index`` writes format 2 only, into a folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tipr.search.identity import describe_model, model_fingerprint, model_identity

__all__ = [
    "GALLERY_FORMAT", "GALLERY_VERSION", "MANIFEST", "GalleryError", "GalleryIndex", "Shard", "meta_array",
    "model_fingerprint", "model_identity",
]

GALLERY_FORMAT = "tipr-gallery"
GALLERY_VERSION = 2
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")


class GalleryError(ValueError):
    """A gallery that is not one, is damaged, or belongs to another model."""


def meta_array(paths: list[str], sizes, mtimes) -> np.ndarray:
    """The per-row metadata of a shard: a structured array of path (UTF-8 bytes), size, mtime_ns."""
    encoded = [p.encode("utf-8") for p in paths]
    width = max((len(p) for p in encoded), default=1) or 1
    meta = np.zeros(len(encoded), dtype=[("path", f"S{width}"), ("size", "<i8"), ("mtime_ns", "<i8")])
    meta["path"], meta["size"], meta["mtime_ns"] = encoded, sizes, mtimes
    return meta


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GalleryError(f"gallery file {path} cannot be read: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Shard:
    """One shard of a gallery: ``features`` ``(n, D)`` and ``meta`` ``(n,)`` (memory-mapped when on disk)."""

    name: str
    features: np.ndarray
    meta: np.ndarray
    offset: int  # global id of its first row

    def __len__(self) -> int:
        return len(self.meta)


class GalleryIndex:
    """An opened gallery (:meth:`load`): memory-mapped shards, the deleted rows, the model that encoded it.

    ``len(gallery)`` counts live rows. :attr:`live` are their global ids, :attr:`paths`
    their relative paths, :attr:`features` their features as one float32 tensor
    (read into memory: for a small gallery; search reads the shards chunk by chunk).
    """

    def __init__(self, *, root: str, model: dict[str, Any], dim: int, shards: list[Shard],
                 deleted: np.ndarray | None = None, failed: dict[str, str] | None = None,
                 file: str | None = None, ann: dict[str, Any] | None = None, dtype: str = "float32"):
        self.root, self.model, self.dim, self.shards, self.dtype = root, dict(model), int(dim), shards, dtype
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.failed = dict(failed or {})
        self.file, self.ann = file, ann

    def __len__(self) -> int:
        return self.rows - len(self.deleted)

    def __repr__(self) -> str:
        return f"GalleryIndex({self.name!r}, {len(self)} images under {self.root}, {len(self.shards)} shards)"

    @property
    def name(self) -> str:
        """The gallery folder (or format-1 file), or a description of an unsaved gallery, for messages."""
        return self.file or f"the unsaved gallery of {self.root}"

    @property
    def rows(self) -> int:
        """Rows in all shards, deleted ones included: global ids are ``0 .. rows - 1``."""
        return sum(len(s) for s in self.shards)

    @property
    def blocks(self) -> list[np.ndarray]:
        """The shards' feature arrays, in global row order."""
        return [s.features for s in self.shards]

    @cached_property
    def live(self) -> np.ndarray:
        """Global ids of the rows not deleted, ascending (int64)."""
        keep = np.ones(self.rows, dtype=bool)
        keep[self.deleted] = False
        return np.flatnonzero(keep)

    def _meta(self, field: str) -> np.ndarray:
        """One metadata column over all shards, read once per opened gallery (prefix searches reuse it)."""
        cache = self.__dict__.setdefault("_columns", {})
        if field not in cache:
            parts = [np.asarray(s.meta[field]) for s in self.shards]
            cache[field] = np.concatenate(parts) if parts else np.zeros(0, np.int64 if field != "path" else "S1")
        return cache[field]

    @cached_property
    def paths(self) -> list[str]:
        """Relative paths of the live rows, in global row order."""
        return [p.decode("utf-8") for p in self._meta("path")[self.live].tolist()]

    @cached_property
    def features(self) -> torch.Tensor:
        """Features of the live rows ``(len, D)`` float32, read into memory."""
        return torch.from_numpy(self.gather(self.live))

    def path(self, row: int) -> str:
        """The relative path of global row ``row``."""
        shard = self.shards[self._shard_of(np.asarray([row]))[0]]
        return bytes(shard.meta["path"][row - shard.offset]).decode("utf-8")

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.asarray([s.offset for s in self.shards], np.int64)

    def _shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._offsets, rows, side="right") - 1

    def gather(self, rows) -> np.ndarray:
        """Features of global ids ``rows`` as float32 ``(len(rows), D)``, in that order."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), np.float32)
        which = self._shard_of(rows)
        for s in np.unique(which):
            take = np.flatnonzero(which == s)
            shard = self.shards[s]
            local = rows[take] - shard.offset
            order = np.argsort(local, kind="stable")  # memmaps read fastest in file order
            out[take[order]] = shard.features[local[order]]
        return out

    def entries(self) -> dict[str, tuple[int, int, int]]:
        """``{path: (size, mtime_ns, global id)}`` of the live rows: what incremental indexing compares."""
        live = self.live
        paths = self._meta("path")[live].tolist()
        sizes, mtimes = self._meta("size")[live].tolist(), self._meta("mtime_ns")[live].tolist()
        return {p.decode("utf-8"): (s, m, int(r)) for p, s, m, r in zip(paths, sizes, mtimes, live.tolist())}

    def under(self, prefix: str) -> np.ndarray:
        """Global ids of the live rows whose path starts with ``prefix`` (a sub-folder: ``"cam1/"``, ``"2026-12-01/"``)."""
        prefix = prefix.lstrip("/")
        if not prefix:
            return self.live
        match = np.char.startswith(self._meta("path"), prefix.encode("utf-8"))
        return self.live[match[self.live]]

    def outside(self, prefix: str) -> np.ndarray:
        """Sorted global ids a ``prefix`` search skips (deleted, or not under it); kept for the last 32 prefixes,
        so query after query on one sub-folder (``tipr serve``) does not match every path again."""
        cache = self.__dict__.setdefault("_outside", {})
        if prefix not in cache:
            keep = np.zeros(self.rows, bool)
            keep[self.under(prefix)] = True
            if len(cache) >= 32:
                cache.pop(next(iter(cache)))
            cache[prefix] = np.flatnonzero(~keep)
        return cache[prefix]

    def check_model(self, identity: dict[str, Any]) -> None:
        """Raise :class:`GalleryError` naming both models unless ``identity`` (:func:`model_identity`) is the gallery's.

        A gallery whose identity has a fingerprint but no ``"fingerprint_version"``
        (written before fingerprints covered the architecture, :mod:`tipr.search.identity`)
        is refused whatever the model: its weights-only fingerprint cannot tell the
        same weights run with other head counts apart. The message says whether the
        weights match (:func:`~tipr.search.identity.legacy_fingerprint`) and to index again.
        """
        given = identity["checkpoint"] or "the model given"
        again = (f"index the images again with {given} into a new gallery folder (or delete {self.name} "
                 f"and index into it again)")
        recorded = self.model.get("fingerprint")
        if recorded and self.model.get("fingerprint_version") is None and identity["fingerprint"]:
            same = recorded == identity.get("weights_fingerprint")
            raise GalleryError(
                f"gallery {self.name} was indexed by an older tipr, whose model fingerprint covers the weights "
                f"only, not the architecture (attention heads...), so it cannot show that a model encodes images "
                f"as the gallery's did: {describe_model(self.model)}; the model given is "
                f"{describe_model(identity)}, {'with the same' if same else 'with other'} weights. To search "
                f"these images, {again}"
            )
        if identity["fingerprint"] != recorded:
            weights = self.model.get("weights_fingerprint")
            same = weights is not None and weights == identity.get("weights_fingerprint")
            raise GalleryError(
                f"gallery {self.name} was indexed with another model: {describe_model(self.model)}; "
                f"the model given is {describe_model(identity)}"
                f"{' (the same weights, another architecture)' if same else ''}. Use the gallery's model, or {again}"
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> GalleryIndex:
        """Open a gallery folder (format 2) or a format-1 file; anything else is a :class:`GalleryError` naming it."""
        path = Path(path)
        if path.is_dir():
            return _load_folder(path)
        if not path.is_file():
            raise FileNotFoundError(f"gallery {path} does not exist (build one with 'tipr index')")
        return _load_version_1(path)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a gallery folder, checked for format and version."""
    file = folder / MANIFEST
    if not file.is_file():
        raise GalleryError(f"{folder} is not a tipr gallery folder (no {MANIFEST}; build one with 'tipr index')")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GalleryError(f"gallery manifest {file} cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != GALLERY_FORMAT:
        raise GalleryError(f"{file} is not a tipr gallery manifest (expected 'format': {GALLERY_FORMAT!r})")
    if manifest.get("version") != GALLERY_VERSION:
        raise GalleryError(f"{file} is gallery format version {manifest.get('version')!r}; "
                           f"this tipr reads version {GALLERY_VERSION}")
    return manifest


def open_shard(folder: Path, name: str, rows: int, dim: int, dtype: str, offset: int) -> Shard:
    """A shard's two files, memory-mapped and checked against what the manifest or a journal says."""
    features, meta = _load_npy(folder / f"{name}.features.npy"), _load_npy(folder / f"{name}.meta.npy")
    if features.shape != (rows, dim) or features.dtype != np.dtype(dtype):
        raise GalleryError(f"gallery file {folder / name}.features.npy is damaged: {features.dtype} "
                           f"{features.shape}, expected {dtype} {(rows, dim)}")
    if meta.shape != (rows,) or meta.dtype.names != ("path", "size", "mtime_ns"):
        raise GalleryError(f"gallery file {folder / name}.meta.npy is damaged: {meta.dtype} {meta.shape}, "
                           f"expected {rows} rows of (path, size, mtime_ns)")
    return Shard(name, features, meta, offset)


def _load_folder(folder: Path) -> GalleryIndex:
    manifest = read_manifest(folder)
    try:
        dim, dtype = int(manifest["dim"]), str(manifest["dtype"])
        shards, offset = [], 0
        for entry in manifest["shards"]:
            shards.append(open_shard(folder, entry["name"], int(entry["rows"]), dim, dtype, offset))
            offset += int(entry["rows"])
        deleted = _load_npy(folder / manifest["deleted"]) if manifest["deleted"] else None
        gallery = GalleryIndex(root=str(manifest["root"]), model=manifest["model"], dim=dim, shards=shards,
                               deleted=None if deleted is None else np.array(deleted), failed=manifest["failed"],
                               file=str(folder), ann=manifest.get("ann"), dtype=dtype)
    except KeyError as e:
        raise GalleryError(f"gallery manifest {folder / MANIFEST} is damaged: no {e.args[0]!r} entry") from e
    bad = gallery.deleted[(gallery.deleted < 0) | (gallery.deleted >= offset)]
    if len(bad) or len(np.unique(gallery.deleted)) != len(gallery.deleted) or len(gallery) != manifest.get("live"):
        raise GalleryError(f"gallery {folder} is damaged: its deleted rows do not fit its {offset} rows "
                           f"and {manifest.get('live')} live ones")
    return gallery


def _load_version_1(path: Path) -> GalleryIndex:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, disallowed globals of other torch files, ...
        raise GalleryError(f"{path} is not a tipr gallery (not a folder, and cannot be read as a "
                           f"format-1 gallery file: {type(e).__name__})") from e
    if not isinstance(data, dict) or data.get("format") != GALLERY_FORMAT or data.get("version") != 1:
        raise GalleryError(f"{path} is not a tipr gallery (expected a gallery folder, or a format-1 file: "
                           f"a dict with 'format': {GALLERY_FORMAT!r}, 'version': 1; build one with 'tipr index')")
    try:
        features = data["features"].float().numpy()
        n, paths = len(data["paths"]), list(data["paths"])
        if features.shape[0] != n or tuple(data["sizes"].shape) != (n,) or tuple(data["mtimes"].shape) != (n,):
            raise GalleryError(f"gallery file {path} is damaged: {n} paths but features of shape {features.shape}")
        meta = meta_array(paths, data["sizes"].numpy(), data["mtimes"].numpy())
        return GalleryIndex(root=str(data["root"]), model=dict(data["model"]), dim=features.shape[1],
                            shards=[Shard("version-1", features, meta, 0)], failed=dict(data["failed"]),
                            file=str(path))
    except KeyError as e:
        raise GalleryError(f"gallery file {path} is damaged: no {e.args[0]!r} entry") from e
