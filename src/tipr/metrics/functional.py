"""Exact rank metrics for text-to-image person retrieval, as pure functions.

``retrieval_ranks`` returns Rank-k (CMC), mAP and mINP in percent, the metrics of
the person-retrieval benchmarks (CUHK-PEDES, ICFG-PEDES, RSTPReid):

- Rank-k: 1 if an item of the query's identity is among the top k, averaged over
  queries.
- AP: mean over the relevant items (same identity as the query) of the precision
  at each one's rank, ``m / rank_m`` for the m-th best relevant item; mAP is the
  mean over queries.
- INP: ``num_relevant / rank_of_the_last_relevant_item``; mINP is the mean over
  queries.

How it differs from the usual implementation (sort every row of the full
queries x gallery matrix, then loop over queries in Python): all three metrics
only need the ranks of the relevant items, and the rank of a relevant item is a
count, ``rank = 1 + #{items ranked before it}``. So queries are processed in
chunks (peak memory grows with ``chunk x gallery``, never ``queries x gallery``)
and, per chunk, items are counted instead of sorted:

1. gather the similarities of each query's relevant items (a few per query) and
   sort only those, ``u_1 <= ... <= u_n``;
2. put every similarity in one of ``M`` equal-width bins spanning the block's
   range, with a chain of monotone element-wise float operations, and count the
   bins with ``bincount``;
3. an item in a higher bin than ``u_j`` has a strictly higher similarity, one in
   a lower bin a strictly lower one; only the few items that share a bin with a
   relevant item are compared exactly (``s >= u_j``).

The counts are exact: the binning only decides which comparisons can be skipped.
Everything runs on the device of the inputs; only a few sizes per block (how
many relevant items, how many candidates) are read back, never the data.

Ties (pessimistic): a gallery item whose similarity equals that of a relevant
item is ranked *before* it when it is not relevant, so a tie never helps the
query. Relevant items with equal similarity take consecutive ranks (which of them
comes first changes no metric). With continuous features ties are practically
absent and the numbers equal those of a full ``argsort``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from tipr.metrics.counting import Buffer, RelevantRankCounter

__all__ = ["retrieval_ranks"]

#: Default size in bytes of one block of similarities (chunk x gallery) when
#: ``chunk_size`` is not given.
DEFAULT_MAX_CHUNK_BYTES = {"cpu": 64 * 2**20}
DEFAULT_MAX_CHUNK_BYTES_ACCELERATOR = 256 * 2**20

#: The counting passes over a block run on sub-blocks of at most this many
#: entries: on CPU small enough that their temporaries (~13 bytes per entry)
#: stay in the cache, which is several times faster than streaming a large block
#: through memory several times. The matrix product prefers larger blocks, so
#: the two are sized separately.
COUNT_BLOCK_ENTRIES = {"cpu": 2**21}
COUNT_BLOCK_ENTRIES_ACCELERATOR = 2**24

#: Counting on CPU: the sub-blocks are shared among this many Python threads,
#: each running torch ops with one intra-op thread (ops release the GIL). The
#: passes are short and cache-resident, where intra-op parallelism spends more
#: on thread barriers than it saves (on a busy 2-core machine it made the
#: counting several times slower); independent sub-blocks per thread scale
#: instead. ``None``: as many threads as ``torch.get_num_threads()``.
CPU_COUNT_THREADS: int | None = None

_EMPTY_TARGET_ACTIONS = ("error", "skip")


def retrieval_ranks(
    similarity: Tensor | None = None,
    query_pids: Tensor | None = None,
    gallery_pids: Tensor | None = None,
    *,
    query_features: Tensor | None = None,
    gallery_features: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    max_chunk_bytes: int | None = None,
    empty_target_action: str = "error",
) -> dict[str, Tensor]:
    """Rank-k, mAP and mINP (in percent) of a retrieval, computed exactly.

    Give either a similarity matrix ``similarity`` (Q, G) or the features
    ``query_features`` (Q, D) and ``gallery_features`` (G, D); features are
    L2-normalised here and compared by cosine similarity, one chunk of queries
    at a time, so the full (Q, G) matrix never exists.

    Args:
        similarity: (Q, G) float similarity of every query to every gallery item
            (higher is more similar). Finite values only.
        query_pids: (Q,) integer identity of each query.
        gallery_pids: (G,) integer identity of each gallery item. A gallery item
            is relevant to a query when the identities are equal.
        query_features: (Q, D) query embeddings (instead of ``similarity``).
        gallery_features: (G, D) gallery embeddings (instead of ``similarity``).
        ks: the k of each Rank-k to report.
        chunk_size: queries per block of similarities; default: as many as fit
            ``max_chunk_bytes``.
        max_chunk_bytes: size of one block of similarities (chunk x gallery x
            4 bytes in float32), used to pick ``chunk_size``. Default 64 MiB on
            CPU, 256 MiB on accelerators. Peak working memory is about this plus
            13 bytes per entry of a counting sub-block (at most 2**21 entries on
            CPU, 2**24 elsewhere; up to ~30 bytes when most similarities tie)
            per counting thread (on CPU, ``torch.get_num_threads()`` of them).
        empty_target_action: what to do with a query whose identity has no item
            in the gallery (its AP and INP are undefined): ``"error"`` (default)
            raises a ``ValueError`` naming those queries, ``"skip"`` leaves them
            out of every metric and warns with their number.

    Returns:
        dict with ``R{k}`` for each k in ``ks``, ``mAP`` and ``mINP``: 0-dim
        float32 tensors in percent, on the device of the inputs.

    Ties are pessimistic: a non-relevant item with the same similarity as a
    relevant one is ranked before it (see the module docstring).

    Example:
        >>> sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.3]])
        >>> out = retrieval_ranks(sim, torch.tensor([0, 1]), torch.tensor([1, 0, 1]))
        >>> {k: round(v.item(), 2) for k, v in out.items()}
        {'R1': 0.0, 'R5': 100.0, 'R10': 100.0, 'mAP': 54.17, 'mINP': 58.33}
    """
    ks = _check_ks(ks)
    if empty_target_action not in _EMPTY_TARGET_ACTIONS:
        raise ValueError(
            f"empty_target_action must be one of {_EMPTY_TARGET_ACTIONS}, got {empty_target_action!r}"
        )
    block_of, num_queries, num_gallery, device, dtype = _similarity_source(
        similarity, query_features, gallery_features
    )
    query_pids = _check_pids("query_pids", query_pids, num_queries, "queries", device)
    gallery_pids = _check_pids("gallery_pids", gallery_pids, num_gallery, "gallery items", device)

    # Relevant items of every query: the gallery sorted by identity, and for each
    # query where its identity's run starts and how long it is.
    sorted_pids, gallery_order = torch.sort(gallery_pids, stable=True)
    identities, counts = torch.unique_consecutive(sorted_pids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    identity = torch.searchsorted(identities, query_pids).clamp_(max=identities.numel() - 1)
    num_relevant = torch.where(identities[identity] == query_pids, counts[identity], 0)
    run_start = starts[identity]

    keep = num_relevant > 0
    num_empty = int((~keep).sum())
    if num_empty:
        rows = (~keep).nonzero().flatten()[:5]
        shown = ", ".join(f"row {r} (pid {p})" for r, p in zip(rows.tolist(), query_pids[rows].tolist()))
        message = (
            f"{num_empty} of {num_queries} queries have no relevant gallery item (no gallery item "
            f"has their identity), e.g. {shown}; their AP and INP are undefined"
        )
        if empty_target_action == "error" or num_empty == num_queries:
            raise ValueError(
                message + ". Check that queries and gallery come from the same split, or pass "
                "empty_target_action='skip' to leave such queries out."
            )
        warnings.warn(message + "; they are left out of every metric (empty_target_action='skip').", stacklevel=2)
    query_rows = keep.nonzero().flatten() if num_empty else None
    num_kept = num_queries - num_empty

    itemsize = torch.finfo(dtype).bits // 8
    if chunk_size is None:
        if max_chunk_bytes is None:
            max_chunk_bytes = DEFAULT_MAX_CHUNK_BYTES.get(device.type, DEFAULT_MAX_CHUNK_BYTES_ACCELERATOR)
        chunk_size = max(1, int(max_chunk_bytes) // (num_gallery * itemsize))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    chunk_size = min(chunk_size, num_kept)
    count_entries = COUNT_BLOCK_ENTRIES.get(device.type, COUNT_BLOCK_ENTRIES_ACCELERATOR)
    count_rows = max(1, min(chunk_size, count_entries // num_gallery))

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    first_rank = torch.empty(num_kept, dtype=torch.long, device=device)
    average_precision = torch.empty(num_kept, dtype=acc_dtype, device=device)
    inverse_negative_penalty = torch.empty(num_kept, dtype=acc_dtype, device=device)
    block_buffer = Buffer((chunk_size, num_gallery), dtype, device)
    workers = 1
    if device.type == "cpu":
        workers = max(1, min(CPU_COUNT_THREADS or torch.get_num_threads(), -(-num_kept // count_rows)))
    counters = [RelevantRankCounter(num_gallery, count_rows, dtype, device) for _ in range(workers)]

    def count(counter: RelevantRankCounter, block: Tensor, block_begin: int, spans: list[tuple[int, int]]) -> None:
        """Ranks of the queries of each ``begin:end`` span (kept-query positions) from their rows of ``block``."""
        for begin, end in spans:
            sim = block[begin - block_begin : end - block_begin]  # contiguous rows
            rows = slice(begin, end) if query_rows is None else query_rows[begin:end]
            n = num_relevant[rows]
            width = int(n.max())
            position = torch.arange(width, device=device)
            valid = position < n[:, None]  # (c, K)
            nth_relevant = torch.minimum(position, n[:, None] - 1)  # padding repeats the last one
            relevant = gallery_order[run_start[rows, None] + nth_relevant]  # (c, K) gallery columns
            ranks = counter(sim, relevant, valid, n).to(acc_dtype)  # (c, K), by ascending similarity
            # the j-th lowest relevant similarity belongs to the (n - j)-th best relevant item
            nth = (n[:, None] - position).to(acc_dtype)
            average_precision[begin:end] = torch.where(valid, nth / ranks, 0).sum(1) / n.to(acc_dtype)
            inverse_negative_penalty[begin:end] = n.to(acc_dtype) / ranks[:, 0]
            first_rank[begin:end] = ranks.gather(1, (n - 1)[:, None]).squeeze(1).long()

    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
        for block_begin in range(0, num_kept, chunk_size):
            block_end = min(block_begin + chunk_size, num_kept)
            block_rows = None if query_rows is None else query_rows[block_begin:block_end]
            block = block_of(block_begin, block_end, block_rows, block_buffer)  # (C, G)
            spans = [(begin, min(begin + count_rows, block_end)) for begin in range(block_begin, block_end, count_rows)]
            with _intra_op_threads(1 if device.type == "cpu" else None):
                if pool is None:
                    count(counters[0], block, block_begin, spans)
                else:  # worker w takes spans w, w + workers, ...; list() re-raises a worker's exception
                    list(pool.map(count, counters, [block] * workers, [block_begin] * workers,
                                  [spans[w::workers] for w in range(workers)]))

    result = {f"R{k}": (first_rank <= k).to(acc_dtype).mean() * 100 for k in ks}
    result["mAP"] = average_precision.mean() * 100
    result["mINP"] = inverse_negative_penalty.mean() * 100
    return {name: value.to(torch.float32) for name, value in result.items()}


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the body with at most ``threads`` intra-op threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is None or previous <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _similarity_source(
    similarity: Tensor | None, query_features: Tensor | None, gallery_features: Tensor | None
) -> tuple[Callable[..., Tensor], int, int, torch.device, torch.dtype]:
    """Validate the inputs and return a function giving the similarity rows of a chunk."""
    has_features = query_features is not None or gallery_features is not None
    if similarity is not None and has_features:
        raise ValueError("give either `similarity` or `query_features` and `gallery_features`, not both")
    if similarity is None and not has_features:
        raise ValueError("give a `similarity` matrix (Q, G) or `query_features` (Q, D) and `gallery_features` (G, D)")

    if similarity is not None:
        if not isinstance(similarity, Tensor) or similarity.dim() != 2:
            raise ValueError(f"similarity must be a 2-D tensor (Q, G), got {_describe(similarity)}")
        if not similarity.is_floating_point():
            raise TypeError(f"similarity must be a float tensor, got dtype {similarity.dtype}")
        num_queries, num_gallery = similarity.shape
        _check_not_empty(num_queries, num_gallery)
        dtype = torch.promote_types(similarity.dtype, torch.float32)

        def block_of(begin: int, end: int, rows: Tensor | None, buffer: Callable[[int], Tensor]) -> Tensor:
            block = similarity[begin:end] if rows is None else similarity.index_select(0, rows)
            block = block.to(dtype).contiguous()
            if not _all_finite(block):
                bad = (~torch.isfinite(block)).any(1).nonzero().flatten()[:5]
                raise ValueError(
                    f"similarity has NaN or infinite values, e.g. in rows "
                    f"{(bad + begin if rows is None else rows[bad]).tolist()}; "
                    "expected finite similarities"
                )
            return block

        return block_of, num_queries, num_gallery, similarity.device, dtype

    if query_features is None or gallery_features is None:
        missing = "query_features" if query_features is None else "gallery_features"
        raise ValueError(f"{missing} is missing: give both query_features and gallery_features")
    _check_features("query_features", query_features)
    _check_features("gallery_features", gallery_features)
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"query_features have dimension {query_features.shape[1]} but gallery_features have "
            f"{gallery_features.shape[1]}; both must embed into the same space"
        )
    if query_features.device != gallery_features.device:
        raise ValueError(
            f"query_features are on {query_features.device} but gallery_features on {gallery_features.device}"
        )
    _check_not_empty(query_features.shape[0], gallery_features.shape[0])
    dtype = torch.promote_types(torch.promote_types(query_features.dtype, gallery_features.dtype), torch.float32)
    queries = F.normalize(query_features.detach().to(dtype), dim=1)
    gallery_t = F.normalize(gallery_features.detach().to(dtype), dim=1).t()  # (D, G)

    def block_of(begin: int, end: int, rows: Tensor | None, buffer: Callable[[int], Tensor]) -> Tensor:
        block = queries[begin:end] if rows is None else queries.index_select(0, rows)
        return torch.mm(block, gallery_t, out=buffer(end - begin))  # (C, G)

    return block_of, query_features.shape[0], gallery_features.shape[0], query_features.device, dtype


def _check_features(name: str, features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {_describe(features)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {features.dtype}")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature dimensions (shape {tuple(features.shape)})")
    if not _all_finite(features):
        bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or infinite values in {bad.numel()} of {features.shape[0]} rows, "
            f"e.g. rows {bad[:5].tolist()}; expected finite embeddings"
        )


def _all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN or infinity: one reduction pass, no (N, D) temporary (min/max propagate NaN)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_not_empty(num_queries: int, num_gallery: int) -> None:
    if num_queries == 0:
        raise ValueError("there are no queries (0 rows); retrieval metrics need at least one query")
    if num_gallery == 0:
        raise ValueError("the gallery is empty (0 items); retrieval metrics need at least one gallery item")


def _check_pids(name: str, pids: Tensor | None, expected: int, what: str, device: torch.device) -> Tensor:
    if pids is None:
        raise ValueError(f"{name} is missing: give the identity of each of the {expected} {what}")
    pids = torch.as_tensor(pids)
    if pids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(pids.shape)}")
    if pids.is_floating_point() or pids.is_complex() or pids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer identities, got dtype {pids.dtype}")
    if pids.numel() != expected:
        raise ValueError(f"{name} has {pids.numel()} entries but there are {expected} {what}")
    return pids.to(device=device, dtype=torch.long)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__
