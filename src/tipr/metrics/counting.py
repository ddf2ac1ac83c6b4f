"""The rank counter behind :func:`tipr.metrics.retrieval_ranks`: ranks of relevant items by counting.

The rank of a relevant item is ``1 + #{items ranked before it}``. Per block of
query rows, :class:`RelevantRankCounter` puts every similarity in one of ``M``
equal-width bins with monotone element-wise float operations, counts the bins
with ``bincount``, and compares exactly only the few items that share a bin with
a relevant one. The counts are exact: binning only decides which comparisons can
be skipped. Ties are pessimistic (see :mod:`tipr.metrics.functional`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Most bins per query row; fewer make the histogram fit the cache, more leave
#: fewer gallery items sharing a bin with a relevant one.
MAX_BINS = 4096

class Buffer:
    """A work tensor allocated on first use and reused (leading rows sliced) across blocks."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self._tensor: Tensor | None = None

    def __call__(self, rows: int) -> Tensor:
        if self._tensor is None:
            self._tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._tensor[:rows]


class RelevantRankCounter:
    """Ranks of the relevant items of a few queries, by counting (see module docstring)."""

    def __init__(self, num_gallery: int, max_rows: int, dtype: torch.dtype, device: torch.device):
        # M equal-width bins per row: about 4 gallery items per bin on average,
        # so few items share a bin with a relevant one; at most MAX_BINS keeps
        # the per-row histogram in the cache.
        self.num_bins = max(16, min(MAX_BINS, num_gallery // 4))
        self._binned = Buffer((max_rows, num_gallery), dtype, device)
        self._bin = Buffer((max_rows, num_gallery), torch.int32, device)

    def __call__(self, sim: Tensor, relevant: Tensor, valid: Tensor, n: Tensor) -> Tensor:
        """Pessimistic 1-based rank of each relevant item.

        Args:
            sim: (c, G) similarities of some queries, contiguous, finite.
            relevant: (c, K) gallery column of each relevant item (padding repeats a valid one).
            valid: (c, K) which entries of ``relevant`` are real.
            n: (c,) number of relevant items per query (>= 1).

        Returns:
            (c, K) long ranks, ordered by ascending similarity of the relevant
            item; entries where ``valid`` is False are meaningless.
        """
        rows, num_gallery = sim.shape
        width = relevant.shape[1]
        device = sim.device
        num_bins = self.num_bins
        bins_per_row = num_bins + 1
        binned, bin_index = self._binned(rows), self._bin(rows)

        # 1. the relevant similarities, sorted ascending; padding -> +inf at the end
        threshold = sim.gather(1, relevant).masked_fill_(~valid, float("inf"))
        threshold, order = threshold.sort(dim=1)  # (c, K)
        relevant = relevant.gather(1, order)

        # 2. bin of every similarity: M equal-width bins over the sub-block's
        # range, so the items spread over the bins as their similarities do (a
        # bin holding most items would serialise the histogram's increments).
        # Each step is a separate, correctly rounded, non-decreasing operation,
        # so s > t implies bin(s) >= bin(t): a higher bin always means a strictly
        # higher similarity. Any finite positive scale keeps this true.
        low, high = torch.aminmax(sim)
        finfo = torch.finfo(sim.dtype)
        span = high.double() - low.double()
        scale = (num_bins / span.clamp(min=finfo.tiny)).clamp(min=finfo.tiny, max=finfo.max).to(sim.dtype)
        torch.sub(sim, low, out=binned)
        binned.mul_(scale).clamp_(0, num_bins)
        bin_index.copy_(binned)  # truncation == floor on values >= 0
        row_offset = torch.arange(rows, dtype=torch.int32, device=device)[:, None] * bins_per_row
        bin_index.add_(row_offset)  # (c, G): bins of row r are r * B ... r * B + B - 1
        histogram = torch.bincount(bin_index.view(-1), minlength=rows * bins_per_row).view(rows, bins_per_row)
        threshold_bin = bin_index.gather(1, relevant).long()  # (c, K), absolute bin ids
        at_or_below = histogram.cumsum(1).gather(1, threshold_bin - row_offset)
        above = num_gallery - at_or_below  # items in a strictly higher bin: s > u_j

        # 3. items sharing a bin with a relevant item: compare exactly. The
        # relevant items of one bin are consecutive in j (a run); a table maps a
        # bin to the flat slot r * K + j of its run's first item, and the run
        # length is kept at that slot.
        first_in_run = valid.clone()
        first_in_run[:, 1:] &= threshold_bin[:, 1:] != threshold_bin[:, :-1]
        runs = first_in_run.view(-1).nonzero().squeeze(1)  # flat slots, ascending
        run_length = torch.zeros(rows * width, dtype=torch.long, device=device)
        run_length[runs] = torch.bincount(first_in_run.view(-1).cumsum(0)[valid.view(-1)] - 1)
        longest_run = int(run_length.max())
        first_slot = torch.full((rows * bins_per_row,), -1, dtype=torch.int32, device=device)
        first_slot[threshold_bin.view(-1)[runs]] = runs.to(torch.int32)
        candidates = sparse_nonzero((first_slot >= 0).index_select(0, bin_index.view(-1)))  # flat positions
        threshold_flat = threshold.view(-1)
        same_bin_at_or_above = torch.zeros(rows * width, dtype=torch.long, device=device)
        block = max(1, rows * num_gallery // 4)  # bounds the temporaries when most similarities tie
        for begin in range(0, candidates.numel(), block):
            flat = candidates[begin : begin + block]
            value = sim.view(-1).index_select(0, flat)
            first = first_slot.index_select(0, bin_index.view(-1).index_select(0, flat)).long()
            length = run_length.index_select(0, first)
            for t in range(longest_run):  # usually 1: one relevant item per shared bin
                inside = length > t
                at = torch.where(inside, first + t, first)  # slot of the run's t-th relevant item
                hit = inside & (value >= threshold_flat.index_select(0, at))
                same_bin_at_or_above.scatter_add_(0, at, hit.long())
        at_or_above_threshold = above + same_bin_at_or_above.view(rows, width)  # s >= u_j, relevant included

        # relevant items with s >= u_j (the padding is +inf, never below a real threshold)
        relevant_at_or_above = n[:, None] - torch.searchsorted(threshold, threshold)
        position = torch.arange(width, device=device)
        # rank of the j-th lowest = its place among the relevant items (n - j)
        # + the non-relevant items with s >= u_j (pessimistic ties)
        return (n[:, None] - position) + at_or_above_threshold - relevant_at_or_above


def sparse_nonzero(mask: Tensor) -> Tensor:
    """Positions of the True entries of a flat bool tensor, ascending, for masks that are mostly False.

    ``nonzero`` costs about a nanosecond per entry on CPU; read as 8-byte words,
    the mask has 8 times fewer entries to scan, and only the few non-zero words
    are looked into byte by byte.
    """
    head = mask.numel() - mask.numel() % 8
    if mask.storage_offset() % 8:
        return mask.nonzero().squeeze(1)
    words = mask[:head].view(torch.int64)  # (N / 8,)
    hit_words = words.nonzero().squeeze(1)
    within = mask[:head].view(-1, 8).index_select(0, hit_words).nonzero()  # (m, 2): word row, byte
    positions = hit_words.index_select(0, within[:, 0]) * 8 + within[:, 1]
    if head == mask.numel():
        return positions
    return torch.cat([positions, mask[head:].nonzero().squeeze(1) + head])
