"""tipr.search.ann: exact blocked top-k against a numpy reference, and FAISS search with exact re-scoring."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tipr.search import ann
from tipr.search.ann import (
    AnnIndexError,
    AnnInfo,
    AnnUnavailableError,
    ann_search,
    build_ann,
    choose_index,
    exact_search,
    load_ann,
    save_ann,
    timed_build,
)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(q, x, k, deleted=()):
    """Brute force: full float64 score matrix, a stable argsort (ties by smallest id)."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    s[:, list(deleted)] = -np.inf
    k = min(k, x.shape[0] - len(set(deleted)))
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def split(x, sizes):
    return [x[a:b] for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))]


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    x = unit(rng, 200, 16)
    return unit(rng, 9, 16), x, split(x, [37, 0, 101, 5, 57])


def check(got, want):
    assert got[1].dtype == np.int64 and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)


# ----------------------------------------------------------------------------- exact_search


def test_exact_matches_argsort_over_uneven_blocks(small):
    q, x, blocks = small
    for k in (1, 10, 200):
        check(exact_search(q, blocks, k), reference(q, x, k))


def test_exact_k_larger_than_gallery(small):
    q, x, blocks = small
    scores, ids = exact_search(q, blocks, 1000)
    assert ids.shape == (9, 200)
    check((scores, ids), reference(q, x, 200))
    assert exact_search(q, [x[:0]], 5)[1].shape == (9, 0)


def test_exact_float16_blocks(small):
    q, x, _ = small
    x16 = x.astype(np.float16)
    check(exact_search(q, split(x16, [150, 50]), 20), reference(q, x16.astype(np.float32), 20))


def test_exact_deleted_never_returned(small):
    q, x, blocks = small
    deleted = np.unique(np.concatenate([reference(q, x, 3)[1].ravel(), [0, 37, 199]]))
    scores, ids = exact_search(q, blocks, 15, deleted=deleted, block_rows=16)
    assert not np.isin(ids, deleted).any()
    check((scores, ids), reference(q, x, 15, deleted))
    # unsorted input is accepted; deleting all but 4 rows clamps k to 4
    keep = np.array([3, 50, 120, 160])
    rest = np.setdiff1d(np.arange(200), keep)[::-1]
    assert set(exact_search(q, blocks, 10, deleted=rest)[1].ravel()) == set(keep)


def test_exact_chunking_gives_identical_results(small):
    q, x, blocks = small
    whole = exact_search(q, [x], 25)
    for rows in (1, 7, 64, 10**6):
        part = exact_search(q, blocks, 25, block_rows=rows)
        np.testing.assert_array_equal(part[1], whole[1])
        np.testing.assert_allclose(part[0], whole[0], atol=1e-6)


def test_exact_many_queries_in_batches(small):
    _, x, blocks = small
    q = unit(np.random.default_rng(3), 70, 16)
    check(exact_search(q, blocks, 12, block_rows=2**20), reference(q, x, 12))  # 32 queries at a time


def test_exact_ties_by_smallest_id():
    rng = np.random.default_rng(2)
    x = np.repeat(unit(rng, 1, 8), 20, axis=0)  # 20 identical rows: all scores tie
    q = unit(rng, 3, 8)
    for rows in (3, 7, 100):
        scores, ids = exact_search(q, split(x, [6, 14]), 5, block_rows=rows)
        np.testing.assert_array_equal(ids, np.tile(np.arange(5), (3, 1)))
    scores, ids = exact_search(q, [x], 5, deleted=[1, 2])
    np.testing.assert_array_equal(ids[0], [0, 3, 4, 5, 6])


def test_exact_over_memmaps(small, tmp_path):
    q, x, blocks = small
    maps = []
    for i, block in enumerate(blocks):
        np.save(tmp_path / f"{i}.npy", block)
        maps.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(exact_search(q, maps, 10, block_rows=30), reference(q, x, 10))


def test_exact_rejects_bad_input(small):
    q, x, blocks = small
    with pytest.raises(ValueError, match="block 1"):
        exact_search(q, [x, x[:, :8]], 3)
    with pytest.raises(ValueError, match="k and block_rows must be"):
        exact_search(q, blocks, 0)


# ----------------------------------------------------------------------------- ANN


@pytest.fixture(scope="module")
def gallery():
    """20,000 x 64 unit rows; 100 queries, each with 10 planted neighbours at cosine 0.75-0.9."""
    rng = np.random.default_rng(0)
    x = unit(rng, 20_000, 64)
    q = unit(rng, 100, 64)
    planted = rng.choice(len(x), (len(q), 10), replace=False)
    for qi, rows in zip(q, planted):
        c = rng.uniform(0.75, 0.9, (10, 1)).astype(np.float32)
        noise = x[rows] - (x[rows] @ qi)[:, None] * qi
        x[rows] = c * qi + np.sqrt(1 - c * c) * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return q, x, planted


@pytest.fixture(scope="module")
def index(gallery):
    _, x, _ = gallery
    return build_ann(split(x, [8000, 12000]), 64, factory="IVF128,PQ16x4fs", seed=0, threads=2)


def recall(got, want):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want)])


def check_exact_scores(q, x, scores, ids):
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q.astype(np.float64), x[ids].astype(np.float64)), atol=1e-6)


def test_ann_recall_and_exact_scores(gallery, index):
    q, x, planted = gallery
    blocks = split(x, [5000, 15000])
    exact = exact_search(q, blocks, 10)
    assert recall(exact[1], planted) == 1.0  # the planted rows are the true top 10
    scores, ids = ann_search(index, q, 10, blocks=blocks)
    assert ids.shape == (100, 10) and index.ntotal == 20_000
    assert recall(ids, exact[1]) >= 0.95
    check_exact_scores(q, x, scores, ids)
    assert (np.diff(scores, axis=1) <= 0).all()
    # with every list probed, the re-scored candidates hold the exact answer
    check(ann_search(index, q, 10, blocks=blocks, nprobe=128), exact)


def test_ann_finds_rows_appended_after_the_build(gallery, index):
    q, x, _ = gallery
    rng = np.random.default_rng(5)
    extra = unit(rng, 300, 64)
    extra[:100] = q  # each query's own vector appended: the new best match
    blocks = [x, extra]
    scores, ids = ann_search(index, q, 10, blocks=blocks)
    np.testing.assert_array_equal(ids[:, 0], 20_000 + np.arange(100))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    full = np.concatenate(blocks)
    check_exact_scores(q, full, scores, ids)
    assert recall(ids, exact_search(q, blocks, 10)[1]) >= 0.95
    with pytest.raises(AnnIndexError, match="covers 20000 rows"):
        ann_search(index, q, 10, blocks=[x[:100]])


def test_ann_over_float16_memmaps(gallery, index, tmp_path):
    q, x, planted = gallery
    maps = []
    for i, block in enumerate(split(x.astype(np.float16), [7000, 13000])):
        np.save(tmp_path / f"{i}.npy", block)
        maps.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    scores, ids = ann_search(index, q, 10, blocks=maps)
    check_exact_scores(q, np.concatenate(maps).astype(np.float32), scores, ids)  # scores of the stored float16 rows
    assert recall(ids, planted) >= 0.95
    with pytest.raises(AnnIndexError, match="dimension 64"):
        ann_search(index, q[:, :32], 10, blocks=[x[:, :32]])


def test_ann_deleted_never_returned(gallery, index):
    q, x, planted = gallery
    deleted = np.sort(planted[:, :5].ravel())
    scores, ids = ann_search(index, q, 10, blocks=[x], deleted=deleted)
    assert not np.isin(ids, deleted).any()
    assert recall(ids[:, :5], planted[:, 5:]) >= 0.95  # the near neighbours left are found, best first
    check_exact_scores(q, x, scores, ids)
    # all but 5 rows deleted: the candidates cannot fill k, the answer falls back to exact
    keep = np.array([11, 4000, 9000, 15000, 19999])
    rest = np.setdiff1d(np.arange(20_000), keep)
    check(ann_search(index, q[:4], 10, blocks=[x], deleted=rest), exact_search(q[:4], [x], 10, deleted=rest))


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "HNSW16", "PCA32,IVF32,Flat", "PQ16x4fs"])
def test_ann_other_index_types(gallery, factory):
    q, x, planted = gallery
    blocks = [x[:12000]]
    near = [p[p < 12000] for p in planted]
    built = build_ann(blocks, 64, factory=factory)
    scores, ids = ann_search(built, q, 10, blocks=blocks, deleted=[int(p[0]) for p in near if len(p)])
    check_exact_scores(q, x, scores, ids)
    assert np.mean([len(set(i) & set(p[1:])) / max(1, len(p) - 1) for i, p in zip(ids, near)]) >= 0.9


def test_ann_flat_index_is_exact(gallery):
    q, x, _ = gallery
    blocks = [x[:3000]]
    assert choose_index(3000, 64) == "Flat"
    flat = build_ann(blocks, 64)
    check(ann_search(flat, q, 7, blocks=blocks, candidates=50), exact_search(q, blocks, 7))


def test_save_load_round_trip(gallery, index, tmp_path):
    q, x, _ = gallery
    path = tmp_path / "gallery.faiss"
    save_ann(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.faiss"]  # no temporary file left
    loaded = load_ann(path)
    assert loaded.ntotal == index.ntotal
    for a, b in zip(ann_search(loaded, q, 10, blocks=[x]), ann_search(index, q, 10, blocks=[x])):
        np.testing.assert_array_equal(a, b)


def test_damaged_index_names_the_file(index, tmp_path):
    path = tmp_path / "gallery.faiss"
    save_ann(index, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AnnIndexError, match="gallery.faiss"):
        load_ann(path)
    path.write_bytes(b"not an index at all")
    with pytest.raises(AnnIndexError, match="gallery.faiss"):
        load_ann(path)
    with pytest.raises(AnnIndexError, match="missing.faiss"):
        load_ann(tmp_path / "missing.faiss")


def test_choose_index_by_size():
    assert choose_index(99_999, 512) == "Flat"
    assert choose_index(100_000, 512) == "IVF256,PQ128x4fs"
    assert choose_index(1_000_000, 512) == "IVF1024,PQ128x4fs"
    assert choose_index(10_000_000, 768) == "IVF4096,PQ192x4fs"
    assert choose_index(200_000, 30) == "IVF512,PQ6x4fs"


def test_info_is_json(gallery):
    _, x, _ = gallery
    built, info = timed_build([x[:5000]], 64, factory="IVF16,SQ8", seed=3)
    assert isinstance(info, AnnInfo)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["factory"] == "IVF16,SQ8" and data["rows"] == 5000 and data["dim"] == 64
    assert data["nlist"] == 16 and data["nprobe"] == ann.default_nprobe(16) and data["seed"] == 3
    assert AnnInfo(**data) == info


def test_missing_faiss(monkeypatch, small):
    q, x, blocks = small
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(AnnUnavailableError, match=r'pip install "tipr\[ann\]"'):
        build_ann(blocks, 16)
    with pytest.raises(ImportError, match=r"tipr\[ann\]"):
        load_ann("x.faiss")
    check(exact_search(q, blocks, 5), reference(q, x, 5))  # exact search needs no FAISS


def test_module_imports_without_faiss():
    code = "import sys; sys.modules['faiss'] = None; import tipr.search.ann; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_index_with_ann_true_without_faiss_stops_before_encoding(monkeypatch, tmp_path, tiny_pretrained, capsys):
    from PIL import Image

    from tipr.commands import run_command

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (16, 32), (200, 30, 30)).save(tmp_path / "photos" / "a.jpg")
    monkeypatch.setitem(sys.modules, "faiss", None)
    out = tmp_path / "photos.gallery"
    code = run_command("index", ["--model", str(tiny_pretrained), "--images", str(tmp_path / "photos"),
                                 "--out", str(out), "--ann", "true"])
    assert code == 1 and 'pip install "tipr[ann]"' in capsys.readouterr().err
    assert not out.exists()  # nothing was planned or encoded
