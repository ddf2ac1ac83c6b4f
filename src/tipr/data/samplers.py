"""Identity-aware batch sampling ("each identity contributes 1 or 2 samples"), correct under DDP.

Every epoch, all ranks build the same plan from ``seed + epoch``: each
identity's samples are shuffled and cut into chunks of at most
``max_per_identity``; the chunks are shuffled and packed into batches of exactly
``batch_size`` in which no identity appears twice (a chunk whose identity is
already in the batch waits for the next one; a chunk that does not fit is split).
Most batches thus hold a positive pair for SDM and plenty of negatives for the
triplet loss. Rank ``r`` of ``W`` takes plan batches ``r, r + W, r + 2W, ...``
and every rank stops after the same number of batches, so ranks never share a
sample and never wait for each other at the end of an epoch.

:class:`IdentitySampler` is a :class:`torch.utils.data.DistributedSampler`, so
Lightning (``use_distributed_sampler=True``) leaves it in place instead of
wrapping it, and calls :meth:`set_epoch` before every epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["IdentitySampler", "identity_batches"]


def identity_batches(pids: Sequence[int] | np.ndarray, batch_size: int, max_per_identity: int, seed: int) -> np.ndarray:
    """The epoch plan: ``(len(pids) // batch_size, batch_size)`` sample indices, each used at most once.

    Batches are packed so that an identity contributes at most ``max_per_identity``
    samples to a batch; only if the last few chunks cannot be packed that way
    (very few identities left) are they packed without the rule, so the number
    of batches is always ``len(pids) // batch_size``.
    """
    pids = np.asarray(pids)
    n = pids.size
    if batch_size < 1 or max_per_identity < 1:
        raise ValueError(f"batch_size and max_per_identity must be >= 1, got {batch_size}, {max_per_identity}")
    rng = np.random.default_rng(seed)
    # Shuffle samples, then group them by identity (stable sort keeps the shuffled order inside a group).
    order = rng.permutation(n)
    order = order[np.argsort(pids[order], kind="stable")]
    sorted_pids = pids[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    rank_in_group = np.arange(n) - np.repeat(group_starts, np.diff(np.r_[group_starts, n]))
    # Chunks of at most max_per_identity consecutive samples of one identity, in random order.
    bounds = np.r_[np.flatnonzero(rank_in_group % max_per_identity == 0), n]
    chunks = [
        (int(sorted_pids[bounds[c]]), order[bounds[c] : bounds[c + 1]].tolist())
        for c in rng.permutation(bounds.size - 1)
    ]

    queue = deque(chunks)
    batches: list[list[int]] = []
    batch: list[int] = []
    seen: set[int] = set()
    waiting: list[tuple[int, list[int]]] = []
    while queue:
        pid, idx = queue.popleft()
        if pid in seen:
            waiting.append((pid, idx))
            continue
        room = batch_size - len(batch)
        batch.extend(idx[:room])
        seen.add(pid)
        if len(idx) > room:
            waiting.append((pid, idx[room:]))
        if len(batch) == batch_size:
            batches.append(batch)
            batch, seen = [], set()
            queue.extendleft(reversed(waiting))  # waiting chunks go first into the next batch
            waiting = []
    # Tail: what could not be packed with distinct identities.
    rest = batch + [i for _, idx in waiting for i in idx]
    while len(batches) < n // batch_size:
        batches.append(rest[:batch_size])
        rest = rest[batch_size:]
    return np.asarray(batches, dtype=np.int64).reshape(-1, batch_size)


def _default_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class IdentitySampler(DistributedSampler):
    """Yields this rank's share of the identity-aware epoch plan, batch after batch.

    Use it with ``DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)``:
    consecutive ``batch_size`` indices form one plan batch.

    Args:
        pids: identity label of every sample of the dataset.
        batch_size: samples per batch *on each rank*.
        max_per_identity: most samples one identity puts in a batch (2 in the recipe).
        num_replicas, rank: the process group's size and this process's rank;
            read from ``torch.distributed`` when ``None`` (1 and 0 without it).
        seed: the plan of epoch ``e`` depends on ``seed + e`` only (same on all ranks).
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        max_per_identity: int = 2,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        world, this = _default_world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this if rank is None else rank
        self.pids = np.asarray(pids.cpu() if isinstance(pids, torch.Tensor) else pids, dtype=np.int64)
        super().__init__(self.pids, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = int(batch_size)
        self.max_per_identity = int(max_per_identity)
        self.num_batches = (len(self.pids) // self.batch_size) // self.num_replicas
        if self.num_batches == 0:
            raise ValueError(
                f"{len(self.pids)} samples make fewer than one batch of {self.batch_size} per rank on "
                f"{self.num_replicas} ranks; lower batch_size"
            )
        self.num_samples = self.num_batches * self.batch_size  # per rank
        self.total_size = self.num_samples * self.num_replicas

    def plan(self) -> np.ndarray:
        """This epoch's plan for all ranks: ``(num_batches * num_replicas, batch_size)``."""
        batches = identity_batches(self.pids, self.batch_size, self.max_per_identity, self.seed + self.epoch)
        return batches[: self.num_batches * self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        mine = self.plan()[self.rank :: self.num_replicas]  # (num_batches, batch_size)
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples
