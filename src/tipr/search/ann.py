"""Search primitives for large galleries: exact blocked top-k, and a FAISS index with exact re-scoring.

A gallery is a sequence of *blocks*: ``(n_i, D)`` float32 or float16 arrays of
L2-normalised rows (e.g. ``np.load(mmap_mode="r")`` shards); a row's global id
is its block's offset plus its row. No gallery folder format is known here.

- :func:`exact_search`: exact top-k cosine, ``block_rows`` rows at a time
  (torch matmul + ``torch.topk`` per chunk, merged into a running top-k).
- :func:`build_ann`, :func:`save_ann`, :func:`load_ann`, :func:`ann_search`:
  FAISS proposes candidates, re-scored exactly from the blocks (every score
  returned is the true cosine); rows appended after the build (ids ``>=
  index.ntotal``) are searched exactly and merged. :func:`choose_index` picks
  the index; :class:`AnnInfo` describes one for a JSON file.

Ties: best score first, then smallest global id, whatever the chunking. FAISS
(``pip install "tipr[ann]"``) is imported inside the functions that use it;
without it they raise :class:`AnnUnavailableError`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import faiss

__all__ = [
    "EXACT_BELOW", "AnnIndexError", "AnnInfo", "AnnUnavailableError", "ann_search", "build_ann",
    "choose_index", "default_nprobe", "exact_search", "load_ann", "save_ann", "timed_build",
]

EXACT_BELOW = 100_000  # choose_index: galleries smaller than this get an exact ("Flat") index


class AnnUnavailableError(ImportError):
    """FAISS is not installed."""


class AnnIndexError(RuntimeError):
    """An index file that cannot be read or does not match the gallery."""


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise AnnUnavailableError('approximate search needs FAISS: pip install "tipr[ann]"') from error
    return faiss


def _offsets(blocks: Sequence[np.ndarray], d: int | None = None) -> np.ndarray:
    """Start row of each block and the total, ``(len(blocks) + 1,)`` int64; checks shapes and dtypes."""
    sizes = []
    for i, block in enumerate(blocks):
        if block.ndim != 2 or (d is not None and block.shape[1] != d):
            raise ValueError(f"block {i} has shape {block.shape}, expected (rows, {d if d is not None else 'D'})")
        if block.dtype not in (np.float32, np.float16):
            raise ValueError(f"block {i} has dtype {block.dtype}, expected float32 or float16")
        d = block.shape[1]
        sizes.append(block.shape[0])
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def _as_queries(queries: Any) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries must be (Q, D), got shape {q.shape}")
    return q


def _as_deleted(deleted: Any) -> np.ndarray:
    d = np.asarray([] if deleted is None else deleted, dtype=np.int64).ravel()
    return np.unique(d) if d.size > 1 and not (d[1:] > d[:-1]).all() else d  # tolerate unsorted input, repeats


def _tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 tensor over ``rows``: no copy for a contiguous float32 (mem)map, a converted copy otherwise."""
    with warnings.catch_warnings():  # read-only memmaps: never written to
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def _gather(blocks: Sequence[np.ndarray], offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of sorted global ``ids`` as a float32 ``(len(ids), D)`` array (fancy indexing of each block)."""
    out = np.empty((len(ids), blocks[0].shape[1] if len(blocks) else 0), np.float32)
    cuts = np.searchsorted(ids, offsets)
    for b, block in enumerate(blocks):
        lo, hi = cuts[b], cuts[b + 1]
        if hi > lo:
            out[lo:hi] = block[ids[lo:hi] - offsets[b]]
    return out


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of each row by (score desc, id asc)."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along rows, except that ties at the k-th value keep the lowest columns."""
    values, index = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    if values.shape[1] > k:  # a tie crosses the cut iff the (k+1)-th value equals the k-th (rare)
        for r in (values[:, k] == values[:, k - 1]).nonzero().flatten().tolist():
            kth = values[r, k - 1]
            t = int((values[r, :k] == kth).sum())  # the tied ones sit at the end of the sorted row
            index[r, k - t:k] = (scores[r] == kth).nonzero().flatten()[:t]
        values, index = values[:, :k], index[:, :k]
    return values, index


def _empty(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64)


def _exact(q: np.ndarray, blocks: Sequence[np.ndarray], k: int, deleted: np.ndarray, block_rows: int,
           start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over global rows ``[start, N)`` (``k`` already clamped to the live rows there)."""
    offsets = _offsets(blocks, q.shape[1])
    if k <= 0 or len(q) == 0:
        return _empty(q)
    query_rows = max(1, (1 << 25) // block_rows)  # the (queries, block_rows) score buffer stays under 128 MiB
    parts_s, parts_i = [], []
    with torch.inference_mode():
        for q0 in range(0, len(q), query_rows):
            qt = torch.from_numpy(q[q0:q0 + query_rows])
            run_s, run_i = _empty(q[q0:q0 + query_rows])
            for b, block in enumerate(blocks):
                first = max(0, start - int(offsets[b]))
                for s in range(first, block.shape[0], block_rows):
                    g0 = int(offsets[b]) + s
                    chunk = block[s:s + block_rows]
                    scores = qt @ _tensor(chunk).T  # (q, c)
                    lo, hi = np.searchsorted(deleted, [g0, g0 + len(chunk)])
                    if hi > lo:
                        scores[:, torch.from_numpy(deleted[lo:hi] - g0)] = -math.inf
                    values, index = _chunk_topk(scores, min(k, len(chunk)))
                    run_s, run_i = _order(np.concatenate([run_s, values.numpy()], 1),
                                          np.concatenate([run_i, index.numpy() + g0], 1), k)
            parts_s.append(run_s)
            parts_i.append(run_i)
    return np.concatenate(parts_s), np.concatenate(parts_i)


def _live(n: int, deleted: np.ndarray, start: int = 0) -> int:
    """Rows in ``[start, n)`` not deleted."""
    lo, hi = np.searchsorted(deleted, [start, n])
    return n - start - int(hi - lo)


def exact_search(queries: np.ndarray, blocks: Sequence[np.ndarray], k: int, *, deleted: np.ndarray | None = None,
                 block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine of ``queries`` ``(Q, D)`` over the rows of ``blocks``: ``(scores, ids)``.

    Both sides L2-normalised (scores are dot products). Blocks are read
    ``block_rows`` rows at a time (float16 converted chunk by chunk), queries
    ``2**25 // block_rows`` at a time: memory is about ``block_rows * (D + Q)``
    floats, never ``Q * N``. Ids in ``deleted`` (sorted int64; unsorted is sorted)
    are never returned. Returns float32 scores and int64 ids ``(Q, min(k, live
    rows))``, best first, ties by smallest id.
    """
    if k < 1 or block_rows < 1:
        raise ValueError(f"k and block_rows must be >= 1, got k={k}, block_rows={block_rows}")
    q, deleted = _as_queries(queries), _as_deleted(deleted)
    n = int(_offsets(blocks, q.shape[1])[-1])
    return _exact(q, blocks, min(k, _live(n, deleted)), deleted, block_rows)


def default_nprobe(nlist: int) -> int:
    """Inverted lists visited per query by default: three quarters of them (see :func:`choose_index`)."""
    return max(1, 3 * nlist // 4)


def choose_index(n: int, d: int) -> str:
    """A FAISS ``index_factory`` string for ``n`` rows of dimension ``d`` (inner product, re-scored exactly).

    ``n < EXACT_BELOW`` (100k): ``"Flat"``. Exact search of 100k x 512 rows is
    one 200 MB matmul, ~17 ms for one query and ~1 ms a query in batches on 2
    cores: interactive already, with no approximation, build or second file.

    Larger: ``"IVF{nlist},PQ{m}x4fs"``: ``nlist`` the power of two nearest
    ``sqrt(n)``, 4-bit fast-scan PQ codes of ``m = d / 4`` sub-vectors (``d / 8``
    bytes a row), ``nprobe`` 3/4 of the lists. The codes only propose candidates
    (exact re-scoring makes their error harmless), so the cheapest scan wins.
    ``experiments/bench_search.py``, 2 shared cores, 1M x 512 rows, 10 targets a
    query at cosine 0.3-0.5 in isotropic noise (the worst case for a partition:
    recall is bounded by the lists probed, not by the codes):

    - ``IVF1024,PQ128x4fs``: build 12 s, 72 MiB (features: 1953 MiB); recall@10
      0.76 / 0.92 / 0.98 / 1.0 at nprobe 256 / 512 / 768 / 1024 (0.3 / 0.5 /
      0.7 / 0.8 ms a query in batches); one query 5.2 ms p50, 100 in 70 ms;
    - exact: 9.8 ms a query in batches, one query 157 ms, 100 in 1.05 s;
    - ``IVF1024,SQ8``: build 15-24 s, 498 MiB, the same recall (0.92 at 512)
      but 11-17 ms a query, one query 21 ms;
    - at 200k rows, ``HNSW32``: 50 s to build, 464 MB, recall 0.61 at efSearch
      256 (2.6 ms a query); ``IVF,PQ64`` (8-bit): 63 s to train.
    Clustered (real) features need fewer probes: pass a smaller ``nprobe``.
    """
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 rows and d >= 1, got n={n}, d={d}")
    if n < EXACT_BELOW:
        return "Flat"
    nlist = 1 << max(4, round(math.log2(math.sqrt(n))))
    m = next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)  # sub-vectors must split d evenly
    return f"IVF{nlist},PQ{m}x4fs"


def _ivf(index: faiss.Index):
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def build_ann(blocks: Sequence[np.ndarray], d: int, *, factory: str | None = None, train_rows: int | None = None,
              seed: int = 0, threads: int | None = None, add_rows: int = 65536) -> faiss.Index:
    """A FAISS index (inner product) over every row of ``blocks``, ids = global row ids.

    ``factory`` defaults to :func:`choose_index`. Training uses ``train_rows``
    rows drawn with ``seed`` (default 64 per inverted list, at least 20,000);
    rows are added ``add_rows`` at a time (memory: the index plus one chunk).
    ``index.ntotal`` = rows covered (:func:`ann_search` searches later rows
    exactly). ``threads``: FAISS OpenMP threads for the build, restored after.
    IVF indexes get ``nprobe = default_nprobe(nlist)``.
    """
    faiss = _faiss()
    offsets = _offsets(blocks, d)
    n = int(offsets[-1])
    factory = factory or choose_index(n, d)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or previous)
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = _ivf(index)
        if not index.is_trained:
            if ivf is not None:
                ivf.cp.seed = seed  # the k-means seed
            train_rows = train_rows or max(20_000, 64 * (ivf.nlist if ivf is not None else 0))
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, train_rows, replace=False)) if train_rows < n else np.arange(n)
            if len(sample) == 0:
                raise ValueError(f"cannot train a {factory!r} index on an empty gallery")
            index.train(_gather(blocks, offsets, sample))
        for block in blocks:
            for s in range(0, block.shape[0], add_rows):
                index.add(np.ascontiguousarray(block[s:s + add_rows], dtype=np.float32))
        if ivf is not None:
            ivf.nprobe = default_nprobe(ivf.nlist)
    finally:
        faiss.omp_set_num_threads(previous)
    return index


def save_ann(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` (FAISS's binary format) atomically: a temporary file beside ``path``, fsync, ``os.replace``."""
    faiss, path = _faiss(), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_ann(path: str | os.PathLike) -> faiss.Index:
    """An index written by :func:`save_ann`; :class:`AnnIndexError` (naming the file) if it cannot be read."""
    faiss, path = _faiss(), Path(path)
    if not path.is_file():
        raise AnnIndexError(f"ANN index {path} does not exist")
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise AnnIndexError(f"cannot read ANN index {path} (damaged or not a FAISS index): {reason}") from error


def _params(faiss, index: faiss.Index, nprobe: int | None, candidates: int, selector):
    """Search parameters for ``index``: nprobe (IVF) or efSearch (HNSW), and an id selector."""
    kwargs = {} if selector is None else {"sel": selector}
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if _ivf(inner) is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe or _ivf(inner).nprobe, **kwargs)
    elif hasattr(inner, "hnsw"):
        params = faiss.SearchParametersHNSW(efSearch=max(candidates, nprobe or inner.hnsw.efSearch), **kwargs)
    else:  # flat indexes: only an id selector (None without one: not every index takes params)
        params = faiss.SearchParameters(**kwargs) if kwargs else None
    return faiss.SearchParametersPreTransform(index_params=params) if inner is not index and params else params


def ann_search(index: faiss.Index, queries: np.ndarray, k: int, *, blocks: Sequence[np.ndarray],
               deleted: np.ndarray | None = None, candidates: int | None = None, nprobe: int | None = None,
               block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` over ``blocks`` through ``index``, with exact scores: ``(scores, ids)``.

    FAISS proposes ``candidates`` ids a query (default ``max(10 * k, 100)``;
    ``deleted`` ids excluded by an id selector, and dropped again after); their
    rows are gathered from ``blocks``, re-scored in float32 and the best ``k``
    kept. Rows the index does not cover (ids ``>= index.ntotal``) are searched
    exactly and merged; a query whose candidates cannot fill ``k`` is answered
    exactly. ``nprobe``: IVF lists to visit (default: the index's) or HNSW
    efSearch. Shapes, order and ties as :func:`exact_search`.
    """
    faiss = _faiss()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, deleted = _as_queries(queries), _as_deleted(deleted)
    offsets = _offsets(blocks, q.shape[1])
    n, covered = int(offsets[-1]), int(index.ntotal)
    if index.d != q.shape[1]:
        raise AnnIndexError(f"the index has dimension {index.d}, the queries {q.shape[1]}")
    if covered > n:
        raise AnnIndexError(f"the index covers {covered} rows but the gallery holds only {n}: rebuild it")
    k = min(k, _live(n, deleted))
    if k == 0 or len(q) == 0:
        return _empty(q)
    c = min(candidates or max(10 * k, 100), covered)
    best_s, best_i = _empty(q)
    if c > 0:
        gone = deleted[: np.searchsorted(deleted, covered)]
        keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(gone)) if len(gone) else None
        params = _params(faiss, index, nprobe, c, keep)
        try:
            _, cand = index.search(q, c, params=params)
        except RuntimeError:  # no id selector for this index: fetch more, filter below
            if params is None:
                raise
            _, cand = index.search(q, min(covered, c + min(len(gone), 9 * c)))
        cand[(cand < 0) | (cand >= covered)] = -1
        if len(gone):  # defensive: never trust the index with deletions
            cand[np.isin(cand, gone)] = -1
        scores = np.full(cand.shape, -np.inf, np.float32)
        step = max(1, block_rows // c)  # queries per re-scoring batch: at most block_rows gathered rows
        for q0 in range(0, len(q), step):
            ids = cand[q0:q0 + step]
            uniq = np.unique(ids[ids >= 0])
            if len(uniq):  # gather each distinct row once, then (q, c, D) x (q, D) in float32
                x = torch.from_numpy(_gather(blocks, offsets, uniq)[np.searchsorted(uniq, ids).clip(max=len(uniq) - 1)])
                exact = torch.bmm(x, torch.from_numpy(q[q0:q0 + step])[:, :, None])[:, :, 0].numpy()
                scores[q0:q0 + step] = np.where(ids >= 0, exact, -np.inf)
        best_s, best_i = _order(scores, cand, k)
    if n > covered:
        tail_s, tail_i = _exact(q, blocks, min(k, _live(n, deleted, covered)), deleted, block_rows, start=covered)
        best_s, best_i = _order(np.concatenate([best_s, tail_s], 1), np.concatenate([best_i, tail_i], 1), k)
    if best_s.shape[1] < k:  # fewer candidates than k for every query
        return _exact(q, blocks, k, deleted, block_rows)
    short = np.flatnonzero(~np.isfinite(best_s[:, -1]))
    if len(short):
        best_s[short], best_i[short] = _exact(q[short], blocks, k, deleted, block_rows)
    return best_s, best_i


@dataclass(frozen=True)
class AnnInfo:
    """What an index is, for a JSON file beside it: ``json.dumps(info.to_dict())`` / ``AnnInfo(**json.load(f))``."""

    factory: str
    rows: int
    dim: int
    nprobe: int | None = None
    nlist: int | None = None
    build_seconds: float | None = None
    seed: int | None = None
    metric: str = "inner_product"
    faiss_version: str | None = None

    @classmethod
    def of(cls, index: faiss.Index, factory: str, **fields: Any) -> AnnInfo:
        """The description of ``index`` built from ``factory`` (plus ``build_seconds``, ``seed``...)."""
        ivf = _ivf(index)
        return cls(factory=factory, rows=int(index.ntotal), dim=int(index.d),
                   nprobe=None if ivf is None else int(ivf.nprobe), nlist=None if ivf is None else int(ivf.nlist),
                   faiss_version=_faiss().__version__, **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timed_build(blocks: Sequence[np.ndarray], d: int, **options: Any) -> tuple[faiss.Index, AnnInfo]:
    """:func:`build_ann` plus its :class:`AnnInfo` (factory, rows, dim, nprobe, build seconds, seed)."""
    start = time.perf_counter()
    index = build_ann(blocks, d, **options)
    factory = options.get("factory") or choose_index(int(_offsets(blocks, d)[-1]), d)
    return index, AnnInfo.of(index, factory, build_seconds=round(time.perf_counter() - start, 3),
                             seed=options.get("seed", 0))
