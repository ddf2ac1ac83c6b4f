"""Exactness and input checks of tipr.metrics.retrieval_ranks against a plain brute-force reference."""

import pytest
import torch

from tipr.metrics import functional as metrics_functional
from tipr.metrics import retrieval_ranks
from tipr.metrics.counting import sparse_nonzero


def brute_force(similarity, query_pids, gallery_pids, ks=(1, 5, 10)):
    """Full sort of every row and a Python loop per query, pessimistic ties.

    Rows are sorted by descending similarity; within equal similarities the
    non-relevant items come first (a tie never helps the query). Queries
    without any relevant item are left out.
    """
    first_ranks, aps, inps = [], [], []
    for row, pid in zip(similarity.double(), query_pids.tolist()):
        relevant = gallery_pids == pid
        if not relevant.any():
            continue
        by_relevance = torch.argsort(relevant.int(), stable=True)  # non-relevant first
        order = by_relevance[torch.argsort(-row[by_relevance], stable=True)]
        ranks = [position + 1 for position, item in enumerate(order.tolist()) if relevant[item]]
        first_ranks.append(ranks[0])
        aps.append(sum((m + 1) / rank for m, rank in enumerate(ranks)) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
    result = {f"R{k}": 100.0 * sum(r <= k for r in first_ranks) / len(first_ranks) for k in ks}
    result["mAP"] = 100.0 * sum(aps) / len(aps)
    result["mINP"] = 100.0 * sum(inps) / len(inps)
    return result


def assert_matches(result, expected):
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].dtype == torch.float32 and result[name].dim() == 0
        assert result[name].item() == pytest.approx(value, rel=1e-6, abs=1e-5), name


def make_identities(generator, num_queries):
    """Gallery: identities 0..11 with 1 to 6 items each (3 with a single item) plus
    distractor identities 100..104 that no query has; queries drawn from 0..11."""
    counts = torch.randint(1, 7, (12,), generator=generator)
    counts[:3] = 1
    gallery_pids = torch.cat([torch.arange(12).repeat_interleave(counts), torch.arange(100, 105)])
    gallery_pids = gallery_pids[torch.randperm(gallery_pids.numel(), generator=generator)]
    query_pids = torch.cat([torch.arange(12), torch.randint(0, 12, (num_queries - 12,), generator=generator)])
    return query_pids[torch.randperm(num_queries, generator=generator)], gallery_pids


def test_hand_computed_example():
    gallery_pids = torch.tensor([1, 0, 2, 1])
    query_pids = torch.tensor([0, 1, 1])
    similarity = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # pid 0: its item (0.8) follows 0.9 -> rank 2; AP 1/2, INP 1/2
            [0.2, 0.7, 0.3, 0.6],  # pid 1: 0.7, [0.6], 0.3, [0.2] -> ranks 2, 4; AP (1/2 + 2/4) / 2, INP 2/4
            [0.5, 0.5, 0.9, 0.5],  # pid 1: ties at 0.5, pessimistic: 0.9, 0.5, [0.5], [0.5] -> ranks 3, 4
        ]
    )
    original = similarity.clone()
    result = retrieval_ranks(similarity, query_pids, gallery_pids, ks=(1, 2, 3))
    ap = [1 / 2, (1 / 2 + 2 / 4) / 2, (1 / 3 + 2 / 4) / 2]
    inp = [1 / 2, 2 / 4, 2 / 4]
    assert_matches(
        result,
        {"R1": 0.0, "R2": 200 / 3, "R3": 100.0, "mAP": 100 * sum(ap) / 3, "mINP": 100 * sum(inp) / 3},
    )
    assert torch.equal(similarity, original)  # the input is not modified


def test_perfect_and_worst_retrieval():
    pids = torch.tensor([0, 0, 1, 2])
    perfect = (pids[:, None] == pids[None, :]).float()
    assert_matches(retrieval_ranks(perfect, pids, pids), {"R1": 100, "R5": 100, "R10": 100, "mAP": 100, "mINP": 100})
    # a constant similarity ties everything: every relevant item goes behind all others
    result = retrieval_ranks(torch.zeros(4, 4), pids, pids, ks=(3, 4))
    assert result["R3"].item() == pytest.approx(50.0)  # pid 1 and 2: rank 4; pid 0: ranks 3, 4
    assert_matches(result, brute_force(torch.zeros(4, 4), pids, pids, ks=(3, 4)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties, also among relevant items
def test_random_similarity_matches_brute_force(seed, decimals):
    generator = torch.Generator().manual_seed(seed)
    query_pids, gallery_pids = make_identities(generator, num_queries=40)
    similarity = torch.randn(40, gallery_pids.numel(), generator=generator, dtype=torch.float64)
    if decimals is not None:
        similarity = similarity.round(decimals=decimals)
    expected = brute_force(similarity, query_pids, gallery_pids)
    for chunk_size in (1, 7, None):
        assert_matches(retrieval_ranks(similarity, query_pids, gallery_pids, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("count_threads", [1, 3])
def test_many_bins_and_counting_sub_blocks_match_brute_force(monkeypatch, count_threads):
    # a larger gallery (more bins than items per bin), counting in sub-blocks of
    # 3 queries, shared among `count_threads` threads
    generator = torch.Generator().manual_seed(7)
    gallery_pids = torch.randint(0, 30, (400,), generator=generator)
    query_pids = gallery_pids[torch.randint(0, 400, (50,), generator=generator)]
    similarity = torch.rand(50, 400, generator=generator).round(decimals=2)  # float32, ties
    monkeypatch.setitem(metrics_functional.COUNT_BLOCK_ENTRIES, "cpu", 3 * 400)
    monkeypatch.setattr(metrics_functional, "CPU_COUNT_THREADS", count_threads)
    expected = brute_force(similarity, query_pids, gallery_pids, ks=(1, 3, 20))
    for chunk_size in (8, None):
        result = retrieval_ranks(similarity, query_pids, gallery_pids, ks=(1, 3, 20), chunk_size=chunk_size)
        assert_matches(result, expected)


def test_sparse_nonzero_equals_nonzero():
    generator = torch.Generator().manual_seed(5)
    for size in (0, 7, 8, 64, 1001):
        mask = torch.rand(size, generator=generator) < 0.05
        mask[size // 2 : size // 2 + 1] = True
        assert torch.equal(sparse_nonzero(mask), mask.nonzero().squeeze(1))
    offset = torch.zeros(20, dtype=torch.bool)
    offset[[3, 9, 19]] = True
    assert torch.equal(sparse_nonzero(offset[3:]), torch.tensor([0, 6, 16]))


def test_deterministic_mode_and_uninitialised_buffers():
    # deterministic mode fills every torch.empty with NaN: a read of an unwritten work buffer would show
    generator = torch.Generator().manual_seed(9)
    query_pids, gallery_pids = make_identities(generator, num_queries=20)
    similarity = torch.randn(20, gallery_pids.numel(), generator=generator).round(decimals=1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        result = retrieval_ranks(similarity, query_pids, gallery_pids, chunk_size=6)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_matches(result, brute_force(similarity, query_pids, gallery_pids))


def test_thread_setting_is_restored(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    query_pids, gallery_pids = make_identities(generator, num_queries=15)
    similarity = torch.randn(15, gallery_pids.numel(), generator=generator)
    expected = brute_force(similarity, query_pids, gallery_pids)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for count_threads in (1, None):
            monkeypatch.setattr(metrics_functional, "CPU_COUNT_THREADS", count_threads)
            assert_matches(retrieval_ranks(similarity, query_pids, gallery_pids, chunk_size=4), expected)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e30])
def test_extreme_similarity_ranges(scale):
    generator = torch.Generator().manual_seed(3)
    query_pids, gallery_pids = make_identities(generator, num_queries=20)
    similarity = torch.randn(20, gallery_pids.numel(), generator=generator).round(decimals=1) * scale
    assert_matches(retrieval_ranks(similarity, query_pids, gallery_pids), brute_force(similarity, query_pids, gallery_pids))


def test_features_match_brute_force_with_exact_ties():
    # every feature has four entries +-1 among 8: norm 2, so the normalised
    # entries are +-0.5 and every cosine is an exact multiple of 1/4: many exact ties
    generator = torch.Generator().manual_seed(11)
    query_pids, gallery_pids = make_identities(generator, num_queries=30)

    def features(n):
        x = torch.zeros(n, 8)
        support = torch.rand(n, 8, generator=generator).argsort(dim=1)[:, :4]
        signs = torch.randint(0, 2, (n, 4), generator=generator).float() * 2 - 1
        return x.scatter_(1, support, signs) * 3.0  # the scale must not matter

    queries, gallery = features(30), features(gallery_pids.numel())
    exact_similarity = (queries / 6) @ (gallery / 6).T
    expected = brute_force(exact_similarity, query_pids, gallery_pids)
    result = retrieval_ranks(
        query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery, chunk_size=4
    )
    assert_matches(result, expected)
    # half-precision features are accepted (computed in float32)
    half = retrieval_ranks(
        query_pids=query_pids,
        gallery_pids=gallery_pids,
        query_features=queries.bfloat16(),
        gallery_features=gallery.bfloat16(),
    )
    assert_matches(half, expected)


def test_features_equal_their_cosine_similarity_matrix():
    generator = torch.Generator().manual_seed(5)
    query_pids, gallery_pids = make_identities(generator, num_queries=25)
    queries = torch.randn(25, 16, generator=generator, dtype=torch.float64)
    gallery = torch.randn(gallery_pids.numel(), 16, generator=generator, dtype=torch.float64)
    similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    from_features = retrieval_ranks(
        query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery
    )
    assert_matches(from_features, brute_force(similarity, query_pids, gallery_pids))


def test_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(2)
    query_pids, gallery_pids = make_identities(generator, num_queries=33)
    queries, gallery = torch.randn(33, 12, generator=generator), torch.randn(gallery_pids.numel(), 12, generator=generator)
    kwargs = dict(query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery)
    reference = retrieval_ranks(**kwargs, chunk_size=33)
    for other in (retrieval_ranks(**kwargs, chunk_size=1), retrieval_ranks(**kwargs, max_chunk_bytes=1000)):
        assert all(torch.equal(other[name], reference[name]) for name in reference)


def test_queries_without_relevant_item():
    similarity = torch.tensor([[0.9, 0.1], [0.3, 0.8], [0.5, 0.4]])
    query_pids, gallery_pids = torch.tensor([0, 7, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"1 of 3 queries have no relevant gallery item.*row 1 \(pid 7\)"):
        retrieval_ranks(similarity, query_pids, gallery_pids)
    with pytest.warns(UserWarning, match="1 of 3 queries have no relevant gallery item"):
        skipped = retrieval_ranks(similarity, query_pids, gallery_pids, empty_target_action="skip")
    kept = torch.tensor([0, 2])
    assert_matches(skipped, brute_force(similarity[kept], query_pids[kept], gallery_pids))
    with pytest.raises(ValueError, match="3 of 3 queries"):
        retrieval_ranks(similarity, torch.tensor([5, 6, 7]), gallery_pids, empty_target_action="skip")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(similarity=torch.rand(3, 4), query_pids=torch.arange(2), gallery_pids=torch.arange(4)),
         ValueError, "query_pids has 2 entries but there are 3 queries"),
        (dict(similarity=torch.rand(3, 4), query_pids=torch.arange(3), gallery_pids=torch.arange(5)),
         ValueError, "gallery_pids has 5 entries but there are 4 gallery items"),
        (dict(query_features=torch.rand(3, 8), gallery_features=torch.rand(4, 8), query_pids=torch.arange(3),
              gallery_pids=torch.arange(3)),
         ValueError, "gallery_pids has 3 entries but there are 4 gallery items"),
        (dict(query_features=torch.rand(3, 8), gallery_features=torch.rand(4, 6), query_pids=torch.arange(3),
              gallery_pids=torch.arange(4)),
         ValueError, "query_features have dimension 8 but gallery_features have 6"),
        (dict(similarity=torch.rand(0, 4), query_pids=torch.arange(0), gallery_pids=torch.arange(4)),
         ValueError, "no queries"),
        (dict(query_features=torch.rand(3, 8), gallery_features=torch.rand(0, 8), query_pids=torch.arange(3),
              gallery_pids=torch.arange(0)),
         ValueError, "gallery is empty"),
        (dict(query_features=torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), gallery_features=torch.rand(2, 2),
              query_pids=torch.arange(2), gallery_pids=torch.arange(2)),
         ValueError, r"query_features has NaN or infinite values in 1 of 2 rows, e.g. rows \[1\]"),
        (dict(query_features=torch.rand(2, 2), gallery_features=torch.tensor([[1.0, float("inf")], [0.0, 1.0]]),
              query_pids=torch.arange(2), gallery_pids=torch.arange(2)),
         ValueError, r"gallery_features has NaN or infinite values .* rows \[0\]"),
        (dict(similarity=torch.tensor([[0.1, 0.2], [float("nan"), 0.3]]), query_pids=torch.arange(2),
              gallery_pids=torch.arange(2)),
         ValueError, r"similarity has NaN or infinite values, e.g. in rows \[1\]"),
        (dict(similarity=torch.rand(2, 2), query_features=torch.rand(2, 2), query_pids=torch.arange(2),
              gallery_pids=torch.arange(2)),
         ValueError, "not both"),
        (dict(query_pids=torch.arange(2), gallery_pids=torch.arange(2)), ValueError, "give a `similarity` matrix"),
        (dict(query_features=torch.rand(2, 2), query_pids=torch.arange(2), gallery_pids=torch.arange(2)),
         ValueError, "gallery_features is missing"),
        (dict(similarity=torch.rand(2, 2), query_pids=torch.tensor([0.0, 1.0]), gallery_pids=torch.arange(2)),
         TypeError, "query_pids must hold integer identities"),
        (dict(similarity=torch.rand(2, 2), query_pids=torch.arange(2)), ValueError, "gallery_pids is missing"),
        (dict(similarity=torch.rand(2), query_pids=torch.arange(2), gallery_pids=torch.arange(2)),
         ValueError, r"similarity must be a 2-D tensor \(Q, G\), got shape \(2,\)"),
        (dict(similarity=torch.rand(2, 2), query_pids=torch.arange(2), gallery_pids=torch.arange(2), ks=(0, 5)),
         ValueError, "ks must be a non-empty sequence of positive ints"),
        (dict(similarity=torch.rand(2, 2), query_pids=torch.arange(2), gallery_pids=torch.arange(2), chunk_size=0),
         ValueError, "chunk_size must be a positive int"),
        (dict(similarity=torch.rand(2, 2), query_pids=torch.arange(2), gallery_pids=torch.arange(2),
              empty_target_action="neg"),
         ValueError, "empty_target_action must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        retrieval_ranks(**kwargs)
