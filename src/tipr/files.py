"""Writing files and folders atomically: built beside their target, then renamed into place.

A reader (another process, a later run, a run restarted after a crash) sees
either the previous file or folder or the complete new one, never a half-written
one:

- :func:`atomic_write` yields an open file ``.<name>.<pid>.<random>.partial`` in
  the target's folder; when the ``with`` block ends without error the file is
  flushed, ``fsync``-ed and renamed over the target (``os.replace``, atomic on
  POSIX and Windows); on an error it is deleted and the target left as it was.
- :func:`atomic_folder` does the same for a folder: it yields a fresh empty
  folder beside the target and :func:`replace_folder` moves it into place.
  A non-empty folder cannot be replaced in one rename, so the old one is first
  renamed aside and deleted after: for a moment there is no folder at all, but
  never a mixture of old and new files.

The temporary names are unique per writer (process id and a random part), so
two processes writing the same target never write into each other's file; the
last to finish wins. They start with a dot, so globs such as ``*.pt`` skip them.
New files and folders get the usual permissions (``0o666`` / ``0o777`` less the
umask), as ``open`` and ``mkdir`` give.

No torch and no Lightning here: cheap to import from anywhere in tipr.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_folder", "atomic_write", "replace_folder"]

_ATTEMPTS = 100  # unique names to try before giving up (a clash needs the same pid and 32 random bits)


def _beside(target: Path, suffix: str) -> Path:
    """A fresh name next to ``target``: ``.<name>.<pid>.<8 hex digits><suffix>``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable; best effort (folders cannot be opened on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` when the ``with`` block succeeds.

    ``mode``: ``"wb"`` (bytes) or ``"w"`` (text, in ``encoding``, default UTF-8).
    The folder of ``path`` must exist. On any exception (or ``KeyboardInterrupt``)
    inside the block the temporary file is deleted, ``path`` is left as it was and
    the exception propagates::

        with atomic_write("photos.gallery") as f:
            torch.save(payload, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for attempt in range(_ATTEMPTS):
        partial = _beside(target, ".partial")
        try:
            fd = os.open(partial, flags, 0o666)  # the umask applies, as for open(path, "w")
            break
        except FileExistsError:
            if attempt == _ATTEMPTS - 1:
                raise
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def replace_folder(partial: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``partial`` to ``target`` (same file system), replacing a folder there.

    An existing ``target`` is renamed aside (``.<name>.<pid>.<random>.old``), then
    ``partial`` renamed to ``target``, then the old folder deleted. If that rename
    fails (another process created ``target`` in between) the old folder is put
    back when ``target`` is still free, and the ``OSError`` propagates; ``partial``
    is left for the caller. Returns ``target`` as a ``Path``.
    """
    partial, target = Path(partial), Path(target)
    if not partial.is_dir():
        raise NotADirectoryError(f"cannot move {partial} to {target}: {partial} is not a folder")
    old = None
    if target.is_symlink() or target.exists():
        if target.is_symlink() or not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a folder; expected a folder to replace, or nothing")
        old = _beside(target, ".old")
        os.rename(target, old)
    try:
        os.rename(partial, target)
    except OSError:
        if old is not None:
            try:
                os.rename(old, target)
                old = None
            except OSError:
                pass  # someone else's folder is there now; ours is deleted below
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(target.parent)
    return target


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``target``; move it to ``target`` when the ``with`` block succeeds.

    The folder of ``target`` must exist. On an exception inside the block, or
    when :func:`replace_folder` fails, the partial folder is deleted and the
    exception propagates; ``target`` is then as it was (or what another process
    put there)::

        with atomic_folder("data/synthetic") as folder:
            generate_synthetic(folder, config)
    """
    target = Path(target)
    for attempt in range(_ATTEMPTS):
        partial = _beside(target, ".partial")
        try:
            partial.mkdir()  # 0o777 less the umask
            break
        except FileExistsError:
            if attempt == _ATTEMPTS - 1:
                raise
    try:
        yield partial
        replace_folder(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # nothing left there after a successful move
