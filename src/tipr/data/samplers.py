"""Training samplers: epoch plans of *global* batches, sliced per rank under DDP.

Each sampler builds the epoch's plan, an ``(steps, batch_size)`` array of
sample indices whose rows are the *global* batches, as a pure function of
``(seed, epoch)``; every rank builds the same plan, and rank ``r`` of ``W``
yields the contiguous slice ``[r * B / W, (r + 1) * B / W)`` of every row. So
all ranks yield the same number of batches, equal to the one-process number of
steps, and together (gathered in rank order) they see exactly the one-process
batch: the LR schedule, the number of optimiser steps and the batch
composition do not depend on ``W``. ``B`` must be divisible by ``W``.

Three plans:

* :func:`reference_identity_batches` (``sampler="identity"``, the default): the
  SEN/IRRA ``RandomIdentitySampler`` with SEN's random group size. Per epoch,
  every identity draws ``k`` uniformly from ``{1, ..., num_instance}``, its
  shuffled samples are cut into groups of exactly ``k`` (fewer than ``k``
  samples: ``k`` draws with replacement; a shorter remainder is dropped); while
  at least ``B / num_instance`` identities still have groups, that many distinct
  ones are drawn at random and one group of each is appended to a single
  stream, which is cut into consecutive batches of ``B``. A batch thus spans
  about one and a half such rounds: on CUHK-PEDES (11,003 identities, ~6
  samples each, ``B = 128``, ``num_instance = 2``) it holds ~96 identities,
  about half of its samples have a positive of the same identity in it, and an
  identity can appear more than ``num_instance`` times. Departure: the stream's
  last partial batch is dropped (the reference keeps it, ``drop_last=False``),
  so every rank gets equal slices. The number of batches can differ by one or
  two between epochs (it depends on the ``k`` draws); Lightning counts the
  first epoch's for the LR schedule and an epoch simply ends with its plan.
* :func:`identity_batches` (``sampler="packed_identities"``): batches of
  distinct identities with at most ``num_instance`` samples each, every sample
  used once per epoch. Not the reference: nearly every sample has an in-batch
  positive, a different SDM/triplet regime.
* :func:`random_batches` (``sampler="random"``): a random permutation cut into batches.

The samplers are :class:`torch.utils.data.DistributedSampler` subclasses, so
Lightning (``use_distributed_sampler=True``) leaves them in place instead of
wrapping them in its own, and calls :meth:`~GlobalBatchSampler.set_epoch`
before every epoch.

For exact, worker- and process-count-independent randomness, a sampler built
with ``sample_seeds=True`` yields ``(index, seed)`` pairs: each plan position
gets its own seed, drawn from ``(seed, epoch)``, which the dataset uses for
that sample's augmentation and pruning draw (:class:`tipr.data.datasets.TrainPairs`).
:meth:`~GlobalBatchSampler.resume_at` starts an epoch after its first batches,
for a run resumed in the middle of an epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from tipr.model.distributed import world_and_rank

__all__ = [
    "GlobalBatchSampler",
    "IdentitySampler",
    "PackedIdentitySampler",
    "RandomOrderSampler",
    "SAMPLERS",
    "identity_batches",
    "local_batch_size",
    "random_batches",
    "reference_identity_batches",
]

Seed = int | Sequence[int]


def _rng(seed: Seed) -> np.random.Generator:
    values = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    return np.random.default_rng([int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in values])


def _check_batch(batch_size: int, num_instance: int = 1) -> None:
    if batch_size < 1 or num_instance < 1:
        raise ValueError(f"data.batch_size and data.num_instance must be >= 1, got {batch_size} and {num_instance}")


def reference_identity_batches(
    pids: Sequence[int] | np.ndarray, batch_size: int, num_instance: int, seed: Seed
) -> np.ndarray:
    """The reference's identity plan (see the module docstring): ``(steps, batch_size)`` sample indices.

    ``seed`` is anything :func:`numpy.random.default_rng` takes, e.g. ``(seed, epoch)``.
    Raises ``ValueError`` if ``batch_size`` is not a multiple of ``num_instance``,
    if there are fewer than ``batch_size / num_instance`` identities, or if the
    stream is shorter than one batch.
    """
    _check_batch(batch_size, num_instance)
    if batch_size % num_instance:
        raise ValueError(
            f"sampler 'identity': data.batch_size={batch_size} is not a multiple of data.num_instance={num_instance}"
        )
    per_round = batch_size // num_instance  # distinct identities drawn per round
    pids = np.asarray(pids)
    _, inv = np.unique(pids, return_inverse=True)
    inv = inv.reshape(-1)
    count = np.bincount(inv)
    num_ids = count.size
    if num_ids < per_round:
        raise ValueError(
            f"sampler 'identity': the training set has {num_ids} identities, fewer than "
            f"data.batch_size / data.num_instance = {batch_size} / {num_instance} = {per_round} drawn per round, "
            f"so it cannot fill a batch; lower data.batch_size or raise data.num_instance"
        )
    rng = _rng(seed)
    # Samples shuffled, then grouped by identity (stable sort keeps the shuffled order inside an identity).
    order = rng.permutation(pids.size)
    order = order[np.argsort(inv[order], kind="stable")]
    first = np.r_[0, np.cumsum(count)[:-1]]
    k = rng.integers(1, num_instance + 1, size=num_ids)  # group size of each identity this epoch
    groups = np.where(count >= k, count // k, 1)  # fewer than k samples: one group drawn with replacement
    kept = groups * k
    owner = np.repeat(np.arange(num_ids), kept)
    kept_first = np.r_[0, np.cumsum(kept)[:-1]]
    j = np.arange(owner.size) - kept_first[owner]
    drawn = (rng.random(owner.size) * count[owner]).astype(np.int64)
    j = np.where(count[owner] < k[owner], drawn, j)
    grouped = order[first[owner] + j]  # identity i's groups: grouped[kept_first[i] + g*k[i] : ... + k[i]]

    # Rounds: per_round distinct identities among those with groups left, one group each.
    used = np.zeros(num_ids, dtype=np.int64)
    alive = np.ones(num_ids, dtype=bool)
    available = np.arange(num_ids)
    picks, group_index = [], []
    while available.size >= per_round:
        chosen = available[rng.choice(available.size, per_round, replace=False)]
        picks.append(chosen)
        group_index.append(used[chosen].copy())
        used[chosen] += 1
        done = used[chosen] == groups[chosen]
        if done.any():
            alive[chosen[done]] = False
            available = available[alive[available]]
    chosen = np.concatenate(picks)
    size = k[chosen]
    starts = kept_first[chosen] + np.concatenate(group_index) * size
    offsets = np.r_[0, np.cumsum(size)[:-1]]
    stream = grouped[np.repeat(starts - offsets, size) + np.arange(size.sum())]
    steps = stream.size // batch_size  # the last partial batch is dropped (reference: kept)
    if steps == 0:
        raise ValueError(
            f"sampler 'identity': the epoch's stream has {stream.size} samples, fewer than one batch of "
            f"data.batch_size={batch_size}; lower data.batch_size"
        )
    return stream[: steps * batch_size].reshape(steps, batch_size).astype(np.int64)


def identity_batches(pids: Sequence[int] | np.ndarray, batch_size: int, num_instance: int, seed: Seed) -> np.ndarray:
    """The packed plan: ``(len(pids) // batch_size, batch_size)`` sample indices, each used at most once.

    Each identity's shuffled samples are cut into chunks of at most
    ``num_instance``; the chunks are shuffled and packed into batches in which no
    identity appears twice (a chunk whose identity is already in the batch waits
    for the next one; a chunk that does not fit is split). Only if the last few
    chunks cannot be packed that way (very few identities left) are they packed
    without the rule, so the number of batches is always ``len(pids) // batch_size``.
    Not the reference's sampler: nearly every sample has an in-batch positive.
    """
    _check_batch(batch_size, num_instance)
    pids = np.asarray(pids)
    n = pids.size
    if n < batch_size:
        raise ValueError(f"sampler 'packed_identities': {n} samples make no batch of data.batch_size={batch_size}")
    rng = _rng(seed)
    # Shuffle samples, then group them by identity (stable sort keeps the shuffled order inside a group).
    order = rng.permutation(n)
    order = order[np.argsort(pids[order], kind="stable")]
    sorted_pids = pids[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    rank_in_group = np.arange(n) - np.repeat(group_starts, np.diff(np.r_[group_starts, n]))
    # Chunks of at most num_instance consecutive samples of one identity, in random order.
    bounds = np.r_[np.flatnonzero(rank_in_group % num_instance == 0), n]
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


def random_batches(num_samples: int, batch_size: int, seed: Seed) -> np.ndarray:
    """A random permutation of ``range(num_samples)`` cut into ``(num_samples // batch_size, batch_size)``."""
    _check_batch(batch_size)
    if num_samples < batch_size:
        raise ValueError(f"sampler 'random': {num_samples} samples make no batch of data.batch_size={batch_size}")
    steps = num_samples // batch_size
    return _rng(seed).permutation(num_samples)[: steps * batch_size].reshape(steps, batch_size).astype(np.int64)


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share ``B / W`` of the global batch; ``ValueError`` naming the options if ``W`` does not divide ``B``."""
    if world_size < 1 or batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the number of processes, "
            f"{world_size} (trainer.devices x trainer.num_nodes)"
        )
    return batch_size // world_size


class GlobalBatchSampler(DistributedSampler):
    """Yields this rank's slice of every global batch of the epoch's plan, batch after batch.

    Use it with ``DataLoader(dataset, batch_size=sampler.local_batch_size,
    sampler=sampler, drop_last=True)``: consecutive ``B / W`` indices form this
    rank's part of one global batch. Subclasses define :meth:`build_plan`.

    Args:
        pids: identity label of every sample of the dataset (only its length
            matters to the random plan).
        batch_size: the *global* batch ``B``, summed over ranks.
        num_replicas, rank: the process group's size ``W`` and this process's rank;
            read from ``torch.distributed`` when ``None`` (1 and 0 without it).
        seed: the plan of epoch ``e`` is a function of ``(seed, e)`` only (the same on all ranks).
        sample_seeds: yield ``(index, sample seed)`` pairs instead of indices (see the module docstring).
    """

    name = ""

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        sample_seeds: bool = False,
    ):
        world, this = world_and_rank()
        num_replicas = world if num_replicas is None else int(num_replicas)
        rank = this if rank is None else int(rank)
        self.pids = np.asarray(pids.cpu() if isinstance(pids, torch.Tensor) else pids, dtype=np.int64).reshape(-1)
        super().__init__(range(self.pids.size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size = int(batch_size)
        self.local_batch_size = local_batch_size(self.batch_size, self.num_replicas)
        self.sample_seeds = bool(sample_seeds)
        self._cache: tuple[int, np.ndarray] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, global batches already trained)
        self.plan()  # validates the options on construction (epoch 0)

    def build_plan(self, seed: Seed) -> np.ndarray:
        """The global plan ``(steps, batch_size)`` for ``seed = (self.seed, epoch)``."""
        raise NotImplementedError

    def plan(self) -> np.ndarray:
        """This epoch's global batches, the same on every rank: ``(num_batches, batch_size)``."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.build_plan((self.seed, self.epoch)))
        return self._cache[1]

    @property
    def num_batches(self) -> int:
        """Batches this epoch, on every rank (the one-process number of steps)."""
        return len(self.plan())

    def local_plan(self) -> np.ndarray:
        """This rank's slice of each global batch: ``(num_batches, batch_size / num_replicas)``."""
        lo = self.rank * self.local_batch_size
        return self.plan()[:, lo : lo + self.local_batch_size]

    def seeds(self) -> np.ndarray:
        """One seed per position of this epoch's plan, ``(num_batches, batch_size)``, from ``(seed, epoch)``."""
        return _rng((self.seed, self.epoch, 1)).integers(0, 2**62, size=self.plan().shape)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` start at global batch ``batches_done`` (once)."""
        self._resume = (int(epoch), int(batches_done))

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        lo = self.rank * self.local_batch_size
        mine = slice(lo, lo + self.local_batch_size)
        indices = self.plan()[start:, mine].reshape(-1).tolist()
        if not self.sample_seeds:
            return iter(indices)
        return zip(indices, self.seeds()[start:, mine].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_batches * self.local_batch_size


class IdentitySampler(GlobalBatchSampler):
    """The reference's identity sampler (``sampler="identity"``): :func:`reference_identity_batches`.

    ``num_instance``: the largest group one identity contributes per round (2 in the recipe).
    """

    name = "identity"

    def __init__(self, pids, batch_size: int, num_instance: int = 2, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, sample_seeds: bool = False):
        self.num_instance = int(num_instance)
        super().__init__(pids, batch_size, num_replicas, rank, seed, sample_seeds)

    def build_plan(self, seed: Seed) -> np.ndarray:
        return reference_identity_batches(self.pids, self.batch_size, self.num_instance, seed)


class PackedIdentitySampler(IdentitySampler):
    """Distinct identities per batch, at most ``num_instance`` samples each, every sample once
    (``sampler="packed_identities"``, :func:`identity_batches`; not the reference)."""

    name = "packed_identities"

    def build_plan(self, seed: Seed) -> np.ndarray:
        return identity_batches(self.pids, self.batch_size, self.num_instance, seed)


class RandomOrderSampler(GlobalBatchSampler):
    """A random permutation per epoch cut into global batches (``sampler="random"``, :func:`random_batches`)."""

    name = "random"

    def __init__(self, pids, batch_size: int, num_instance: int = 2, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, sample_seeds: bool = False):
        super().__init__(pids, batch_size, num_replicas, rank, seed, sample_seeds)  # num_instance: unused

    def build_plan(self, seed: Seed) -> np.ndarray:
        return random_batches(self.pids.size, self.batch_size, seed)


#: ``TIPRDataModule(sampler=...)`` names and their classes (same constructor signature).
SAMPLERS: dict[str, type[GlobalBatchSampler]] = {
    cls.name: cls for cls in (IdentitySampler, PackedIdentitySampler, RandomOrderSampler)
}
