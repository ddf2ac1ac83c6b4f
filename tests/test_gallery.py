"""Gallery format 2: resuming a killed run, incremental updates, untouched shards, compaction, old files, safety.

The model is a tiny random one (features need not mean anything here: these
tests compare galleries with each other, path by path). The photos are random
images written as JPEG and PNG files under sub-folders.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import Tiny

from tipr.pretrained import save_pretrained
from tipr.processing import TIPRProcessor
from tipr.search import GalleryError, GalleryIndex, build_index, search, search_features, write_gallery
from tipr.search import identity
from tipr.search.gallery import MANIFEST
from tipr.search.identity import legacy_fingerprint, model_fingerprint, model_identity
from tipr.search.writer import gallery_lock

#: Features of one image computed in other batches may differ in the last float32 bits.
ATOL = 1e-6
COUNT = 9


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    model = Tiny.network(init_seed=3).eval()
    folder = tmp_path_factory.mktemp("model") / "pretrained"
    processor = TIPRProcessor.for_model(model)
    save_pretrained(model, processor, folder)
    return model, processor, folder


def write_photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for i in range(COUNT):
        write_photo(folder / f"cam{i % 2}" / f"p{i}.{'png' if i == 4 else 'jpg'}", seed=i)
    return folder


def index(network, photos: Path, out: Path, **options):
    model, processor, folder = network
    return build_index(model, processor, photos, out, checkpoint=folder, num_workers=0, progress=False,
                       **{"batch_size": 2, "shard_rows": 2, **options})


def features_by_path(gallery: GalleryIndex) -> dict[str, np.ndarray]:
    return dict(zip(gallery.paths, gallery.features.numpy()))


def assert_same_gallery(got: GalleryIndex, expected: GalleryIndex) -> None:
    """The same images with the same features (within ATOL), whatever the shard layout."""
    a, b = features_by_path(got), features_by_path(expected)
    assert sorted(a) == sorted(b)
    worst = max(float(np.abs(a[p] - b[p]).max()) for p in a)
    assert worst <= ATOL, worst
    assert got.failed == expected.failed


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.npy")}


#: Kill ``tipr index`` just before its k-th rename of a finished file into place (os.replace).
#: 9 readable images, 2 rows a shard: rename 1 is the new empty gallery's manifest; each shard is
#: 3 renames (features, meta, its journal): 2-4, 5-7, 8-10, 11-13, and the last row's 14-16; the
#: closing journal is 17 and the final manifest 18. So these kill before anything is committed,
#: mid-shard, between two shards, after the last shard and before the commit.
KILL_BEFORE_RENAME = (1, 3, 5, 9, 17, 18)
JOURNAL_RENAMES = {4: 2, 7: 2, 10: 2, 13: 2, 16: 1}  # rename -> rows it puts on record


KILLED_RUN = """
import os, signal, sys
import tipr.files
count, real = 0, os.replace
def replace(src, dst):
    global count
    count += 1
    if count == {k}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
tipr.files.os.replace = replace
from tipr.commands import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("k", KILL_BEFORE_RENAME)
def test_a_killed_index_run_reruns_to_the_uninterrupted_gallery(network, photos, tmp_path, k):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    expected, _ = index(network, photos, tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    argv = ["index", "--model", str(network[2]), "--images", str(photos), "--out", str(out), "--num_workers", "0",
            "--batch_size", "2", "--shard_rows", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(k=k, argv=argv)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    if k > 1:  # from the first commit on, the killed run leaves a readable gallery: here still the empty one
        assert len(GalleryIndex.load(out)) == 0
    resumed, report = index(network, photos, out)
    assert_same_gallery(resumed, expected)
    on_record = sum(rows for rename, rows in JOURNAL_RENAMES.items() if rename < k)
    assert report.resumed == on_record and len(report.encoded) == COUNT - on_record  # nothing encoded twice
    assert not list(out.glob("journal-*")) and not list(out.glob(".*.partial"))
    names = {f"{s.name}.{kind}.npy" for s in resumed.shards for kind in ("features", "meta")}
    assert {p.name for p in out.glob("*.npy")} == names  # what the killed run left half-written is gone


def test_reindexing_a_changed_folder_equals_a_fresh_index_and_keeps_untouched_shards(network, photos, tmp_path):
    out = tmp_path / "g"
    first, _ = index(network, photos, out, shard_rows=4)
    before = file_hashes(out)
    (photos / "cam1" / "p1.jpg").unlink()
    write_photo(photos / "cam2" / "new.jpg", seed=100)
    write_photo(photos / "cam0" / "p2.jpg", seed=200)  # changed content
    changed = photos / "cam0" / "p2.jpg"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    second, report = index(network, photos, out, shard_rows=4)
    assert (len(report.encoded), report.reencoded, report.kept, report.dropped) == (2, 1, 7, ["cam1/p1.jpg"])
    assert_same_gallery(second, index(network, photos, tmp_path / "fresh")[0])
    after = file_hashes(out)
    assert all(after[name] == digest for name, digest in before.items())  # no untouched shard rewritten
    assert len(second.shards) == len(first.shards) + 1 and len(second.deleted) == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["rows"], manifest["live"]) == (COUNT + 2, COUNT)
    assert np.array_equal(np.load(out / manifest["deleted"], allow_pickle=False), second.deleted)


def test_compaction_drops_deleted_rows_and_keeps_every_feature(network, photos, tmp_path):
    out = tmp_path / "g"
    index(network, photos, out)
    kept = features_by_path(GalleryIndex.load(out))
    for i in (0, 1, 3):  # a third of the rows: over the 25% threshold
        next(photos.rglob(f"p{i}.*")).unlink()
    compacted, report = index(network, photos, out)
    assert report.dropped and len(compacted.deleted) == 0 and len(compacted.shards) == 1
    assert compacted.paths == sorted(compacted.paths) == sorted(set(kept) - {"cam0/p0.jpg", "cam1/p1.jpg", "cam1/p3.jpg"})
    assert all(np.array_equal(kept[p], f) for p, f in features_by_path(compacted).items())  # copied, not re-encoded
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        f"{compacted.shards[0].name}.{kind}.npy" for kind in ("features", "meta"))


def test_float16_storage_and_a_version_1_file(network, photos, tmp_path):
    model, processor, _ = network
    full, _ = index(network, photos, tmp_path / "g32")
    half, _ = index(network, photos, tmp_path / "g16", dtype="float16")
    assert half.shards[0].features.dtype == np.float16 and half.dtype == "float16"
    assert torch.allclose(half.features, full.features, atol=2e-3)
    # A format-1 file as tipr 0.2 wrote it still loads (tensors and plain containers only) and searches the same.
    v1 = tmp_path / "old.gallery"
    torch.save({"format": "tipr-gallery", "version": 1, "root": full.root, "paths": full.paths,
                "features": full.features, "sizes": torch.zeros(COUNT, dtype=torch.int64),
                "mtimes": torch.zeros(COUNT, dtype=torch.int64), "model": full.model, "failed": {}}, v1)
    old = GalleryIndex.load(v1)
    query = ["a person in a red coat", "a man with a bag"]
    for a, b in zip(search(model, processor, old, query, top_k=4), search(model, processor, full, query, top_k=4)):
        assert [(h.path, h.row, h.rank) for h in a] == [(h.path, h.row, h.rank) for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=ATOL)  # one block vs five: other sums
    with pytest.raises(GalleryError, match="is a file .* give a new --out folder"):
        index(network, photos, v1)


def test_nothing_in_a_gallery_is_unpickled_and_damage_is_named(network, photos, tmp_path):
    out = tmp_path / "g"
    gallery, _ = index(network, photos, out)
    shard = out / f"{gallery.shards[0].name}.meta.npy"
    marker = tmp_path / "unpickled"

    class Evil:  # unpickling it creates the marker file
        def __reduce__(self):
            return open, (str(marker), "w")

    np.save(shard, np.array([Evil(), None], dtype=object), allow_pickle=True)
    with pytest.raises(GalleryError, match=f"{shard} cannot be read: ValueError"):
        GalleryIndex.load(out)
    assert not marker.exists()
    features = out / f"{gallery.shards[1].name}.features.npy"
    np.save(features, np.zeros((3, 5), np.float32))
    shutil.copyfile(out / f"{gallery.shards[2].name}.meta.npy", shard)
    with pytest.raises(GalleryError, match=f"{shard} is damaged|{features} is damaged"):
        GalleryIndex.load(out)


def test_a_second_writer_is_refused_while_one_writes(network, photos, tmp_path):
    out = tmp_path / "g"
    with gallery_lock(out):
        with pytest.raises(GalleryError, match=f"another process is writing gallery {out}"):
            index(network, photos, out)


def test_a_gallery_from_given_features_searches_exactly_with_sub_folder_filters(tmp_path):
    rng = np.random.default_rng(0)
    paths = [f"cam{i % 3}/2026-12-0{i % 2 + 1}/{i:04d}.jpg" for i in range(500)]
    features = rng.standard_normal((500, 32)).astype(np.float32)
    gallery = write_gallery(tmp_path / "given", paths, features, shard_rows=128)
    assert len(gallery.shards) == 4 and gallery.paths == paths
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    queries = rng.standard_normal((7, 32)).astype(np.float32)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T  # (7, 500)
    for prefix in (None, "cam1/", "cam2/2026-12-01/"):
        allowed = [i for i, p in enumerate(paths) if prefix is None or p.startswith(prefix)]
        hits = search_features(gallery, queries, top_k=5, prefix=prefix)
        for q, row in enumerate(hits):
            best = sorted(allowed, key=lambda i: -scores[q, i])[:5]
            assert [hit.row for hit in row] == best and [hit.path for hit in row] == [paths[i] for i in best]
            assert np.allclose([hit.score for hit in row], scores[q, best], atol=1e-6)
            assert [hit.rank for hit in row] == [1, 2, 3, 4, 5]
    with pytest.raises(GalleryError, match="holds no image under 'cam9/'"):
        search_features(gallery, queries, prefix="cam9/")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_gallery(tmp_path / "given", paths, features)
    with pytest.raises(ValueError, match="500 unique paths and features of shape"):
        write_gallery(tmp_path / "bad", paths, features[:10])


def test_two_processes_index_the_same_gallery_as_one(network, photos, tmp_path):
    """``tipr index --devices 2 --accelerator cpu``: Lightning's prediction loop on 2 gloo processes,
    each rank its own shards, rank 0 committing them, equals the one-process run."""
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    expected, _ = index(network, photos, tmp_path / "one")
    out = tmp_path / "two"
    command = [sys.executable, "-m", "tipr.commands", "index", "--model", str(network[2]), "--images", str(photos),
               "--out", str(out), "--devices", "2", "--accelerator", "cpu", "--num_workers", "0",
               "--batch_size", "2", "--shard_rows", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "encoded 9 (9 new, 0 changed)" in result.stdout and "broken.jpg: " in result.stdout
    assert result.stdout.count("wrote ") == 1  # rank 1 prints nothing
    two = GalleryIndex.load(out)
    assert_same_gallery(two, expected)
    ranks = {s.name.split("-")[0] for s in two.shards}
    assert ranks == {"r0", "r1"}  # both processes wrote shards
    # An error found while planning (here: another model's gallery) stops every rank, said once.
    other = tmp_path / "other"
    model = Tiny.network(init_seed=4)
    save_pretrained(model, TIPRProcessor.for_model(model), other)
    command[command.index("--model") + 1] = str(other)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stderr.count(f"gallery {out} was indexed with another model") == 1
    assert_same_gallery(GalleryIndex.load(out), expected)


def test_index_with_the_onnx_backend_matches_torch(network, photos, tmp_path, capsys):
    """``tipr index --backend onnx`` (fp32, int8) after ``tipr export-onnx``: the torch gallery's
    images, fp32 features within 1e-4 (measured 1e-6), int8 at cosine 0.999 or more (measured 0.9999)."""
    from tipr.commands import main

    folder = tmp_path / "pretrained"
    shutil.copytree(network[2], folder)
    expected = features_by_path(index(network, photos, tmp_path / "torch")[0])
    assert main(["export-onnx", "--model", str(folder)]) == 0
    for precision, check in (("fp32", lambda a, b: np.abs(a - b).max() < 1e-4), ("int8", lambda a, b: a @ b >= 0.999)):
        out = tmp_path / precision
        code = main(["index", "--model", str(folder), "--images", str(photos), "--out", str(out), "--backend", "onnx",
                     "--onnx_precision", precision, "--num_workers", "0"])
        assert code == 0, capsys.readouterr().err
        got = features_by_path(GalleryIndex.load(out))
        assert sorted(got) == sorted(expected) and all(check(got[p], expected[p]) for p in got), precision
    code = main(["index", "--model", str(network[2]), "--images", str(photos), "--out", str(tmp_path / "none"),
                 "--backend", "onnx"])
    assert code == 1 and "no ONNX export of the image encoder here; write one with: tipr export-onnx" in capsys.readouterr().err


def test_an_ann_index_in_the_gallery_proposes_and_exact_scores_decide(tmp_path):
    """``maybe_build_ann`` (``tipr index --ann true``) records a FAISS index in the manifest; search
    through it returns true cosines, finds the planted neighbours, and finds rows added after it."""
    from tipr.search.indexing import maybe_build_ann
    from tipr.search.writer import ShardSink, commit

    rng = np.random.default_rng(1)
    n, d = 20_000, 32
    features = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((20, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    planted = rng.choice(n, (20, 5), replace=False)
    features[planted] = queries[:, None, :] + 0.5 * rng.standard_normal((20, 5, d)) / np.sqrt(d)
    out = tmp_path / "g"
    write_gallery(out, [f"cam{i % 4}/{i}.jpg" for i in range(n)], features, shard_rows=4096)
    info = maybe_build_ann(out, True, factory="IVF64,SQ8")
    gallery = GalleryIndex.load(out)
    assert gallery.ann == info and info["rows"] == n and (out / info["file"]).is_file()
    assert maybe_build_ann(out, None) is None  # under ANN_MIN_ROWS: no index is built by default
    exact = search_features(gallery, queries, top_k=5, exact=True)
    approx = search_features(gallery, queries, top_k=5, exact=False)
    unit = gallery.gather(np.arange(n))
    for e_row, a_row, q in zip(exact, approx, queries):
        assert {h.row for h in e_row} == {h.row for h in a_row}  # the planted neighbours stand out
        assert np.allclose([h.score for h in a_row], unit[[h.row for h in a_row]] @ q, atol=1e-6)
    # Rows added after the index was built are searched exactly and merged.
    sink = ShardSink(out, fingerprint=None, dim=d)
    sink.add(["late/0.jpg"], np.zeros((1, 2), np.int64), queries[:1])
    sink.close()
    commit(out, root=gallery.root, model=gallery.model, dim=d)
    later = GalleryIndex.load(out)
    assert later.ann == info and later.rows == n + 1
    (best, *_), = search_features(later, queries[:1], top_k=3, exact=False)
    assert (best.path, best.row) == ("late/0.jpg", n) and best.score == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------ the fingerprint covers the architecture
def weights_only_fingerprint(model) -> str:
    """``model_fingerprint`` as tipr computed it before issue 21 (galleries written then record it), verbatim."""
    state = model.clip.state_dict()
    size = [int(s) for s in model.encoder_config.image_size]
    h = hashlib.sha256(f"tipr-model image_size={size} text_length={int(model.encoder_config.text_length)}\n".encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def with_vision_heads(model, heads: int):
    """The same model, the same weights, with ``heads`` vision attention heads (the tiny preset has 4)."""
    encoder = copy.deepcopy(model.encoder_config)
    encoder.clip["vision_config"]["num_attention_heads"] = heads
    other = type(model)(encoder, model.config)
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_the_same_weights_with_other_heads_are_another_model(network, photos, tmp_path):
    model, processor, folder = network
    other = with_vision_heads(model, 2)
    assert weights_only_fingerprint(other) == weights_only_fingerprint(model) == legacy_fingerprint(model)
    assert model_fingerprint(other) != model_fingerprint(model)
    images = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (other.encode_image(images) - model.encode_image(images)).abs().max() > 1e-3  # it encodes otherwise
    out = tmp_path / "g"
    gallery, _ = index(network, photos, out)
    recorded = gallery.model
    assert (recorded["fingerprint"], recorded["fingerprint_version"]) == (model_fingerprint(model), 2)
    assert recorded["weights_fingerprint"] == weights_only_fingerprint(model)
    assert recorded["architecture"]["vision"]["num_attention_heads"] == 4 == recorded["architecture"]["text"][
        "num_attention_heads"]
    assert GalleryIndex.load(out).model == recorded  # as the manifest keeps it
    before = file_hashes(out)
    with pytest.raises(GalleryError) as refused:
        search(other, processor, GalleryIndex.load(out), "a person")
    message = str(refused.value)
    assert (f"gallery {out} was indexed with another model: {folder.resolve()} (fingerprint "
            f"{recorded['fingerprint'][:12]}, image 32x16, text length 16; vision 64 wide x 2 layers, heads 4, "
            f"text 64 wide x 2 layers, heads 4); the model given is an unnamed model (fingerprint "
            f"{model_fingerprint(other)[:12]}, image 32x16, text length 16; vision 64 wide x 2 layers, heads 2, "
            f"text 64 wide x 2 layers, heads 4) (the same weights, another architecture)") in message
    with pytest.raises(GalleryError, match="was indexed with another model"):
        build_index(other, processor, photos, out, num_workers=0, progress=False)
    assert file_hashes(out) == before
    assert len(search(model, processor, GalleryIndex.load(out), "a person", top_k=3)[0]) == 3


def test_the_fingerprint_hashes_the_weights_once_per_model(monkeypatch):
    model = Tiny.network(init_seed=5)
    real, weight_hashes = hashlib.sha256, []

    def counting(data=b""):
        weight_hashes.extend([1] if data.startswith(b"tipr-model image_size=") else [])
        return real(data)

    monkeypatch.setattr(identity.hashlib, "sha256", counting)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first and model_identity(model)["fingerprint"] == first
    assert len(weight_hashes) == 1
    with torch.no_grad():
        model.clip.visual_projection.weight[0, 0] += 1e-3  # changed in place: hashed again
    assert model_fingerprint(model) != first and len(weight_hashes) == 2


def test_a_gallery_with_a_weights_only_fingerprint_is_refused_saying_to_index_again(network, photos, tmp_path):
    model, processor, folder = network
    out = tmp_path / "old.gallery"
    index(network, photos, out)
    manifest = json.loads((out / MANIFEST).read_text())  # made as tipr wrote it before issue 21
    manifest["model"] = {"fingerprint": weights_only_fingerprint(model), "checkpoint": str(folder.resolve()),
                         "image_size": [32, 16], "text_length": 16, "embed_dim": 64}
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = file_hashes(out)
    for given, weights in ((model, "the same"), (with_vision_heads(model, 2), "the same"),
                           (Tiny.network(init_seed=4).eval(), "other")):
        with pytest.raises(GalleryError) as refused:
            search(given, processor, GalleryIndex.load(out), "a person")
        message = str(refused.value)
        assert message.startswith(
            f"gallery {out} was indexed by an older tipr, whose model fingerprint covers the weights only, not the "
            f"architecture (attention heads...), so it cannot show that a model encodes images as the gallery's did: "
            f"{folder.resolve()} (fingerprint {weights_only_fingerprint(model)[:12]}, image 32x16, text length 16); "
            f"the model given is an unnamed model (fingerprint {model_fingerprint(given)[:12]}")
        assert message.endswith(
            f"with {weights} weights. To search these images, index the images again with the model given into a "
            f"new gallery folder (or delete {out} and index into it again)")
    with pytest.raises(GalleryError, match="indexed by an older tipr"):
        index(network, photos, out)  # not extended either: its rows' model cannot be told
    assert file_hashes(out) == before
    fresh, _ = index(network, photos, tmp_path / "new.gallery")
    assert len(search(model, processor, fresh, "a person", top_k=2)[0]) == 2
