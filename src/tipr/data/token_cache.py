"""Caption token tables, computed once per benchmark and cached on disk.

Every caption is tokenized, and every training caption also pruned and
tokenized, in one batched pass; the result is saved under a key made of the
annotation file's content, the tokenizer's files, the text length, the tagger
and the pruning code and tipr's version, so a change to any of them rebuilds it.
Several processes that start together (two runs, the nodes of one DDP run on a
shared file system) compute it once: the first takes a lock file beside it, the
others wait and read what it wrote. The file is written under a temporary name
and renamed into place (:func:`tipr.files.atomic_write`), so it is never seen half-written.
"""

from __future__ import annotations

import hashlib
import warnings
from importlib import resources
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from tipr.messages import rank_zero_info

from tipr.data.benchmarks import Benchmark
from tipr.data.pruning import TAGGER_ASSET, prune_captions
from tipr.files import atomic_write
from tipr.tokenization import load_tokenizer, tokenize, tokenizer_files

CACHE_VERSION = 2  # 2: the key includes tipr's version; entries are checked against the benchmark
Tokens = dict[str, dict[str, torch.Tensor]]


def cache_key(benchmark: Benchmark, tokenizer: str | None, text_length: int) -> str:
    """SHA-256 over everything the token tables depend on."""
    from tipr import __version__

    h = hashlib.sha256(f"tipr-tokens-v{CACHE_VERSION} tipr={__version__} text_length={text_length}\n".encode())
    with open(benchmark.annotation, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    loaded = load_tokenizer(tokenizer)
    h.update(f"{type(loaded).__name__} {len(loaded)}\n".encode())
    for path in tokenizer_files(loaded):
        h.update(path.name.encode() + path.read_bytes())
    h.update(resources.files("tipr").joinpath(TAGGER_ASSET).read_bytes())
    h.update(resources.files("tipr.data").joinpath("pruning.py").read_bytes())
    return h.hexdigest()


def compute_tokens(benchmark: Benchmark, tokenizer: str | None, text_length: int) -> Tokens:
    """``{split: {"tokens": int32 (N, L), "pruned": int32 (N, L) (train only)}}``."""
    loaded = load_tokenizer(tokenizer)
    out = {}
    for name, split in benchmark.splits.items():
        entry = {"tokens": tokenize(split.captions, loaded, text_length).to(torch.int32)}
        if name == "train":
            entry["pruned"] = tokenize(prune_captions(split.captions), loaded, text_length).to(torch.int32)
        out[name] = entry
    return out


def read_cache(path: Path, key: str, benchmark: Benchmark, text_length: int) -> Tokens | None:
    """The cached tokens if ``path`` holds this key's cache in the expected layout, else None (logged)."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: recompute and overwrite
        rank_zero_info(f"ignoring unreadable token cache {path} ({type(e).__name__}: {e}); rebuilding it")
        return None
    splits = cached.get("splits") if isinstance(cached, dict) else None
    expected = {name: len(split.captions) for name, split in benchmark.splits.items()}
    fits = (
        cached.get("key") == key
        and isinstance(splits, dict)
        and set(splits) == set(expected)
        and all(
            isinstance(splits[name].get(kind), torch.Tensor)
            and splits[name][kind].dtype == torch.int32
            and tuple(splits[name][kind].shape) == (rows, text_length)
            for name, rows in expected.items()
            for kind in (("tokens", "pruned") if name == "train" else ("tokens",))
        )
    )
    if not fits:
        rank_zero_info(f"token cache {path} was written for other data or by another tipr version; rebuilding it")
        return None
    return splits


def caption_tokens(
    benchmark: Benchmark, tokenizer: str | None, text_length: int, folder: Path,
    own_folder: bool = False, lock_timeout: float = 3600.0, name: str = "benchmark",
) -> Tokens:
    """The token tables of ``benchmark``, from the cache in ``folder`` if possible (else computed and saved).

    ``own_folder``: the folder was chosen by the user (``data.cache_dir``), so failing to
    write there is an error; otherwise (next to the data) it is a warning and the
    tables are computed without a cache. ``name``: the dataset, in the log line.
    """
    key = cache_key(benchmark, tokenizer, text_length)
    path = Path(folder) / f"tokens-{key[:20]}.pt"
    tokens = read_cache(path, key, benchmark, text_length)
    if tokens is not None:
        return tokens
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock", timeout=lock_timeout)
        lock.acquire()
    except OSError as e:
        if own_folder:
            raise OSError(f"cannot write the token cache to cache_dir={folder}: {e}") from e
        warnings.warn(f"cannot write the token cache next to the data ({path}: {e}); set cache_dir to keep it between runs")
        return compute_tokens(benchmark, tokenizer, text_length)
    except Timeout as e:
        raise TimeoutError(
            f"waited {lock_timeout:.0f} s for another process to write the token cache {path} "
            f"(lock {path}.lock); if no other run is using it, delete the lock file"
        ) from e
    try:
        tokens = read_cache(path, key, benchmark, text_length)  # written by another process while this one waited
        if tokens is None:
            rank_zero_info(f"{name}: tokenizing and pruning captions once (cache: {path})")
            tokens = compute_tokens(benchmark, tokenizer, text_length)
            with atomic_write(path) as f:
                torch.save({"key": key, "splits": tokens}, f)
    finally:
        lock.release()
    return tokens
