"""Identity-aware sampling: batch composition, and DDP correctness simulated with 2 and 3 ranks."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tipr.data.samplers import IdentitySampler, identity_batches


def uneven_pids(num_ids=60, seed=0):
    """Identities with 1 to 7 samples each, in shuffled order."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(num_ids) * 3 + 100, rng.integers(1, 8, num_ids))  # non-contiguous numbers
    return pids[rng.permutation(pids.size)]


def test_plan_uses_each_sample_once_with_at_most_two_per_identity():
    pids = uneven_pids()
    batches = identity_batches(pids, batch_size=16, max_per_identity=2, seed=3)
    assert batches.shape == (pids.size // 16, 16)
    assert np.unique(batches).size == batches.size  # no sample twice
    counts = [np.unique(pids[b], return_counts=True)[1] for b in batches]
    assert max(c.max() for c in counts) <= 2
    # Identities contribute 1 or 2 samples, so batches hold positive pairs.
    assert all((c == 2).sum() >= 4 for c in counts)
    # Deterministic in the seed, different across seeds.
    assert np.array_equal(batches, identity_batches(pids, 16, 2, seed=3))
    assert not np.array_equal(batches, identity_batches(pids, 16, 2, seed=4))


def test_plan_with_one_sample_per_identity_and_too_few_identities():
    assert identity_batches(np.arange(10), 4, 1, seed=0).shape == (2, 4)
    # Two identities cannot fill a batch of 8 with at most 2 each: the tail is still batched, nothing repeats.
    batches = identity_batches(np.array([0] * 9 + [1] * 9), 8, 2, seed=0)
    assert batches.shape == (2, 8) and np.unique(batches).size == 16


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_cover_the_plan_and_have_equal_batch_counts(world):
    pids = uneven_pids(num_ids=80, seed=world)
    batch = 12
    samplers = [IdentitySampler(pids, batch, num_replicas=world, rank=r, seed=7) for r in range(world)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        # Equal length on every rank, and what __len__ promised.
        assert len({len(x) for x in per_rank}) == 1
        assert all(len(x) == len(s) == s.num_batches * batch for x, s in zip(per_rank, samplers))
        assert samplers[0].num_batches == (pids.size // batch) // world
        # Disjoint ...
        flat = np.concatenate(per_rank)
        assert np.unique(flat).size == flat.size
        # ... and together exactly the epoch plan (the same plan on every rank).
        plan = samplers[0].plan()
        assert all(np.array_equal(plan, s.plan()) for s in samplers)
        assert sorted(flat.tolist()) == sorted(plan.reshape(-1).tolist())
        # Each rank's consecutive batch_size chunks are whole plan batches.
        for r, x in enumerate(per_rank):
            assert np.array_equal(np.asarray(x).reshape(-1, batch), plan[r::world])
            for chunk in np.asarray(x).reshape(-1, batch):
                assert np.unique(pids[chunk], return_counts=True)[1].max() <= 2
    # A new epoch gives a new order.
    samplers[0].set_epoch(0)
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first


def test_dataloader_batches_follow_the_plan():
    pids = uneven_pids(num_ids=40)
    dataset = TensorDataset(torch.arange(pids.size), torch.as_tensor(pids))
    sampler = IdentitySampler(torch.as_tensor(pids), 8, num_replicas=2, rank=1, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, drop_last=True)
    batches = [b[0].numpy() for b in loader]
    assert len(loader) == len(batches) == sampler.num_batches
    assert np.array_equal(np.stack(batches), sampler.plan()[1::2])


def test_lightning_keeps_the_sampler_under_ddp():
    """With use_distributed_sampler=True, Lightning wraps plain samplers but must leave ours alone."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import RunningStage

    trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    connector = trainer._data_connector
    pids = uneven_pids(num_ids=40)
    dataset = TensorDataset(torch.arange(pids.size))
    ours = DataLoader(dataset, batch_size=8, sampler=IdentitySampler(pids, 8, num_replicas=2, rank=0), drop_last=True)
    assert connector._prepare_dataloader(ours, shuffle=True, mode=RunningStage.TRAINING) is ours
    plain = DataLoader(dataset, batch_size=8, shuffle=True)
    wrapped = connector._prepare_dataloader(plain, shuffle=True, mode=RunningStage.TRAINING)
    assert isinstance(wrapped.sampler, DistributedSampler) and wrapped is not plain  # the check is live


def test_reads_world_from_torch_distributed_and_rejects_tiny_datasets():
    sampler = IdentitySampler(np.arange(20) // 2, 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    with pytest.raises(ValueError, match="fewer than one batch of 8 per rank on 3 ranks"):
        IdentitySampler(np.arange(20), 8, num_replicas=3, rank=0)
