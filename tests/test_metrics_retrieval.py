"""RetrievalRanks: accumulation, duplicate indices, image-to-text, and a 2-process DDP run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from tipr.metrics import RetrievalRanks, retrieval_ranks

NUM_QUERIES, NUM_GALLERY, DIM = 13, 11, 6  # neither divides by the world size 2


def make_eval_set(seed=0):
    """Captions (queries) and images (gallery) of 4 identities; a caption per image plus two extra."""
    generator = torch.Generator().manual_seed(seed)
    gallery_pids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    image_of_query = torch.cat([torch.arange(NUM_GALLERY), torch.tensor([3, 5])])  # (13,)
    query_pids = gallery_pids[image_of_query]
    centres = torch.randn(4, DIM, generator=generator)
    gallery = centres[gallery_pids] + torch.randn(NUM_GALLERY, DIM, generator=generator)
    queries = centres[query_pids] + torch.randn(NUM_QUERIES, DIM, generator=generator)
    return queries, query_pids, gallery, gallery_pids, image_of_query


def expected_result(queries, query_pids, gallery, gallery_pids, image_to_text=True):
    result = retrieval_ranks(
        query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery
    )
    if image_to_text:
        swapped = retrieval_ranks(
            query_pids=gallery_pids, gallery_pids=query_pids, query_features=gallery, gallery_features=queries
        )
        result.update({f"i2t_{name}": value for name, value in swapped.items()})
    return result


def assert_equal_results(result, expected):
    assert set(result) == set(expected)
    for name in expected:
        assert torch.equal(result[name], expected[name]), (name, result[name], expected[name])


def test_batches_in_any_order_with_duplicates_equal_the_function():
    queries, query_pids, gallery, gallery_pids, _ = make_eval_set()
    metric = RetrievalRanks(image_to_text=True)
    # gallery first, shuffled, in uneven batches; some items twice (as a padding sampler would)
    order = torch.cat([torch.randperm(NUM_GALLERY, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 0])])
    for batch in order.split(4):
        metric.update_gallery(gallery[batch], gallery_pids[batch], batch)
    order = torch.cat([torch.arange(NUM_QUERIES).flip(0), torch.tensor([12])])
    for batch in order.split(5):
        metric.update_queries(queries[batch], query_pids[batch], batch)
    result = metric.compute()
    assert sorted(result) == sorted(["R1", "R5", "R10", "mAP", "mINP", "i2t_R1", "i2t_R5", "i2t_R10", "i2t_mAP", "i2t_mINP"])
    assert_equal_results(result, expected_result(queries, query_pids, gallery, gallery_pids))


def test_one_loader_of_caption_image_pairs():
    # one loader yields (caption, its image) pairs: an image with two captions comes twice
    queries, query_pids, gallery, gallery_pids, image_of_query = make_eval_set()
    metric = RetrievalRanks(ks=(1, 3))
    for batch in torch.arange(NUM_QUERIES).split(4):
        images = image_of_query[batch]
        metric.update(
            query_features=queries[batch],
            query_pids=query_pids[batch],
            query_index=batch,
            gallery_features=gallery[images],
            gallery_pids=gallery_pids[images],
            gallery_index=images,
        )
    expected = retrieval_ranks(
        query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery, ks=(1, 3)
    )
    assert_equal_results(metric.compute(), expected)


def test_compute_reflects_later_updates_and_reset():
    queries, query_pids, gallery, gallery_pids, _ = make_eval_set()
    metric = RetrievalRanks()
    metric.update_gallery(gallery, gallery_pids, torch.arange(NUM_GALLERY))
    metric.update_queries(queries[:5], query_pids[:5], torch.arange(5))
    partial = metric.compute()
    metric.update_queries(queries[5:], query_pids[5:], torch.arange(5, NUM_QUERIES))
    full = metric.compute()  # not the cached partial value
    assert_equal_results(full, expected_result(queries, query_pids, gallery, gallery_pids, image_to_text=False))
    assert not all(torch.equal(partial[name], full[name]) for name in full)
    metric.reset()
    with (
        pytest.warns(UserWarning, match="called before the ``update``"),
        pytest.raises(ValueError, match="has no query embeddings: call update_queries"),
    ):
        metric.compute()


def test_metric_bad_inputs():
    metric = RetrievalRanks()
    with pytest.raises(ValueError, match="query_pids has 2 entries but query_features has 3 rows"):
        metric.update_queries(torch.rand(3, 4), torch.arange(2), torch.arange(3))
    with pytest.raises(ValueError, match="gallery_index missing"):
        metric.update(gallery_features=torch.rand(3, 4), gallery_pids=torch.arange(3))
    with pytest.raises(ValueError, match="update\\(\\) got nothing"):
        metric.update()
    with pytest.raises(ValueError, match="2-D float tensor"):
        metric.update_gallery(torch.rand(3), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="must be a 1-D integer tensor"):
        metric.update_gallery(torch.rand(3, 4), torch.rand(3), torch.arange(3))
    metric.update_queries(torch.rand(3, 4), torch.tensor([0, 1, 1]), torch.arange(3))
    with pytest.raises(ValueError, match="has no gallery embeddings: call update_gallery"):
        metric.compute()
    metric.update_gallery(torch.rand(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))
    metric.update_gallery(torch.rand(1, 4), torch.tensor([5]), torch.tensor([1]))  # index 1 again, other identity
    with pytest.raises(ValueError, match=r"gallery index 1 was given twice with different identities \(1 and 5\)"):
        metric.compute()
    with pytest.raises(ValueError, match="empty_target_action"):
        RetrievalRanks(empty_target_action="ignore")


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        queries, query_pids, gallery, gallery_pids, _ = make_eval_set()
        metric = RetrievalRanks(image_to_text=True)
        # what Lightning does with two eval loaders: a padding DistributedSampler on each
        for features, pids, size, update in (
            (queries, query_pids, NUM_QUERIES, metric.update_queries),
            (gallery, gallery_pids, NUM_GALLERY, metric.update_gallery),
        ):
            sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
            indices = torch.tensor(list(sampler))
            assert indices.numel() == (size + 1) // 2  # the odd size was padded with a duplicate
            for batch in indices.split(3):
                update(features[batch], pids[batch], batch)
        result = metric.compute()
        torch.save({name: value.clone() for name, value in result.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    queries, query_pids, gallery, gallery_pids, _ = make_eval_set()
    expected = expected_result(queries, query_pids, gallery, gallery_pids)
    for rank in range(2):
        assert_equal_results(torch.load(tmp_path / f"rank{rank}.pt"), expected)
