"""Searching your own images: gallery index (incremental, failures, model check), search, contact sheets, CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import tipr.search.indexing as indexing_module
from tipr.commands import main
from tipr.data.datasets import read_image
from tipr.methods.sen import SENConfig, SENModel
from tipr.pretrained import load_pretrained, save_pretrained
from tipr.processing import TIPRProcessor
from tipr.render import line_height, load_font, to_tile, wrap_text
from tipr.training import TIPRDataModule, TIPRModule
from tipr.search import (
    GalleryError,
    GalleryIndex,
    IndexReport,
    SearchHit,
    build_index,
    contact_sheet,
    model_fingerprint,
    search,
)

IMAGE_SIZE = (32, 16)
TEXT_LENGTH = 32
NUM_IDS = 8


@dataclass
class Trained:
    model: SENModel  # loaded back from the pretrained folder, as the commands do
    processor: TIPRProcessor
    folder: Path  # its pretrained folder
    ckpt: Path  # the Lightning checkpoint it came from: the same weights
    other: Path  # a pretrained folder of the same model with one weight nudged: another fingerprint
    other_ckpt: Path  # the same nudge in a Lightning checkpoint
    image_dir: Path  # the synthetic benchmark's imgs/
    images: list[str]  # one training image per identity, relative to image_dir
    captions: list[str]  # a training caption of each of those images
    spare: Path  # a test-split image (an identity never trained on)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A tiny SEN model trained in-process on 8 synthetic identities (30 epochs of 4 steps, about 2 s on one thread).

    The training only spreads the features out (each caption's 8 scores span 0.1
    or more), so that the ranking checks below compare distinct scores. No test
    asserts what it learnt: its last bits, and so its ranking, depend on the CPU
    kernels torch picks (ATEN_CPU_CAPABILITY=default/avx2/avx512 differ).
    The search tests check exact relations instead: a hit's score is the
    model's cosine similarity of the caption and that image encoded on its own,
    and the hits are the brute-force top-k of those scores.
    """
    root = tmp_path_factory.mktemp("search")
    pl.seed_everything(0, verbose=False)
    data = TIPRDataModule(
        "synthetic", str(root / "data"), image_size=IMAGE_SIZE, batch_size=8, num_workers=0, text_length=TEXT_LENGTH,
        prune_prob=0.0, synthetic={"num_train_ids": NUM_IDS, "num_val_ids": 0, "num_test_ids": 1, "images_per_id": 1,
                                   "captions_per_image": 2, "image_size": (64, 32)},
    )
    module = TIPRModule(
        num_classes=data.num_classes, backbone="tiny", image_size=IMAGE_SIZE, text_length=TEXT_LENGTH, lr=1.5e-3,
        adam_eps=1e-8, warmup_epochs=0.5, method=SENConfig(restoration_weight=0.0),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=30, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["network.clip.text_projection.weight"] += 1e-3
    torch.save(checkpoint, root / "other.ckpt")

    model, processor = load_pretrained(ckpt)
    save_pretrained(model, processor, root / "pretrained")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.clip.text_projection.weight += 1e-3
    save_pretrained(other, processor, root / "other")

    benchmark = data.benchmark
    train = benchmark.split("train")
    first_caption = {int(img): c for c, img in reversed(list(enumerate(train.caption_images)))}
    model, processor = load_pretrained(root / "pretrained")
    return Trained(
        model=model,
        processor=processor,
        folder=root / "pretrained",
        ckpt=ckpt,
        other=root / "other",
        other_ckpt=root / "other.ckpt",
        image_dir=Path(benchmark.image_dir),
        images=[str(p) for p in train.image_paths],
        captions=[train.captions[first_caption[i]] for i in range(len(train.image_paths))],
        spare=Path(benchmark.image_dir) / str(benchmark.split("test").image_paths[0]),
    )


def gallery_names(count: int = NUM_IDS) -> list[str]:
    """Where identity i's image goes in the photo folder: nested folders, mixed extension case, a PNG."""
    names = [f"id{i}.jpg" for i in range(count)]
    names[1] = "street/id1.JPG"
    names[2] = "street/night/id2.png"
    return names


@pytest.fixture
def photos(trained, tmp_path) -> Path:
    """A folder of the 8 identities' images, plus a corrupt JPEG and a file that is no image."""
    folder = tmp_path / "photos"
    for source, name in zip(trained.images, gallery_names()):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".png":
            Image.open(trained.image_dir / source).save(target)
        else:
            shutil.copyfile(trained.image_dir / source, target)
    (folder / "broken.jpg").write_bytes(os.urandom(2000))
    (folder / "notes.txt").write_text("not an image")
    return folder


#: Scores of one model computed two ways (other batch sizes, other kernels) differ by a few float32 ulps;
#: two gallery images whose scores are closer than this may come in either order.
TIE = 1e-5


@torch.inference_mode()
def brute_force_scores(trained: Trained, folder: Path, paths: list[str], queries: list[str]) -> torch.Tensor:
    """``(Q, N)`` cosine similarities of each query and each image under ``folder``, encoded from scratch."""
    model, processor = trained.model, trained.processor
    pixels = processor.preprocess([folder / path for path in paths])
    return model.similarity(model.encode_text(processor.tokenize(queries)), model.encode_image(pixels))


def assert_brute_force_top_k(hits: list[list[tuple[int, float, str]]], scores: torch.Tensor, paths: list[str], k: int,
                             score_tol: float = TIE) -> None:
    """Each row of ``(rank, score, path)`` hits is the top ``k`` of that query's row of brute-force ``scores``.

    Ranks run from 1, scores fall, each score is the brute-force score of its
    image (within ``score_tol``), no image is shown twice, and no image left out
    scores more than ``TIE`` above the last one shown. Only the order of images
    whose scores lie within ``TIE`` of each other is left open.
    """
    assert len(hits) == scores.shape[0]
    for q, row in enumerate(hits):
        assert [rank for rank, _, _ in row] == list(range(1, min(k, len(paths)) + 1)), q
        shown = [path for _, _, path in row]
        assert len(set(shown)) == len(shown), q
        assert [score for _, score, _ in row] == sorted((score for _, score, _ in row), reverse=True), q
        for _, score, path in row:
            assert score == pytest.approx(float(scores[q, paths.index(path)]), abs=score_tol), (q, path)
        left_out = [float(scores[q, j]) for j, path in enumerate(paths) if path not in shown]
        assert max(left_out, default=-2.0) <= float(scores[q, paths.index(shown[-1])]) + TIE, (q, row)


def as_rows(hits: list[list[SearchHit]]) -> list[list[tuple[int, float, str]]]:
    return [[(hit.rank, hit.score, hit.path) for hit in row] for row in hits]


def printed_hits(out: str, queries: list[str]) -> list[list[tuple[int, float, str]]]:
    """The ``rank  score  path`` lines ``tipr search`` prints under each ``query i: text`` line."""
    lines = out.splitlines()
    rows = []
    for q, query in enumerate(queries, start=1):
        start = lines.index(f"query {q}: {query}") + 1
        row = []
        for line in lines[start:]:
            if not line.strip()[:1].isdigit():
                break
            rank, score, path = line.split(maxsplit=2)
            row.append((int(rank), float(score), path))
        rows.append(row)
    return rows


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def index_quietly(trained: Trained, photos: Path, out: Path) -> tuple[GalleryIndex, IndexReport]:
    return build_index(trained.model, trained.processor, photos, out, checkpoint=trained.folder, num_workers=0,
                       progress=False)


def test_index_then_search_a_pretrained_folder_through_the_cli(trained, photos, tmp_path, capsys):
    gallery_file = tmp_path / "photos.gallery"
    code, out, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", gallery_file,
                         "--batch_size", 3, "--num_workers", 1, "--device", "cpu")
    assert code == 0, err
    assert f"{photos}: 9 image files; encoded 8 (8 new, 0 changed), kept 0 unchanged" in out
    assert "1 file could not be read and is not in the index:\n  broken.jpg: UnidentifiedImageError" in out
    assert f"wrote {gallery_file}: 8 images" in out

    queries = [trained.captions[2], trained.captions[5]]
    code, out, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file,
                         "--query", queries[0], "--query", queries[1], "--top_k", 3, "--device", "cpu")
    assert code == 0, err
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2 * 3
    # What it prints is the brute-force top 3 of each query (scores printed to 4 decimals).
    paths = sorted(gallery_names())
    expected = brute_force_scores(trained, photos, paths, queries)
    assert_brute_force_top_k(printed_hits(out, queries), expected, paths, k=3, score_tol=5e-5 + TIE)


def test_index_then_search_with_an_irra_model(trained, photos, tmp_path, capsys):
    """Search knows no method: an IRRA pretrained folder indexes and searches like a SEN one."""
    from tiny import Tiny

    from tipr.methods.irra import IRRAModel

    irra = Tiny.network(method="irra", image_size=IMAGE_SIZE, text_length=TEXT_LENGTH).eval()
    folder = tmp_path / "irra"
    save_pretrained(irra, TIPRProcessor.for_model(irra), folder)
    gallery_file = tmp_path / "irra.gallery"
    code, out, err = run(capsys, "index", "--model", folder, "--images", photos, "--out", gallery_file,
                         "--num_workers", 0, "--device", "cpu")
    assert code == 0, err
    queries = [trained.captions[1]]
    code, out, err = run(capsys, "search", "--model", folder, "--gallery", gallery_file, "--query", queries[0],
                         "--top_k", 4, "--device", "cpu")
    assert code == 0, err
    model, processor = load_pretrained(folder)
    assert type(model) is IRRAModel
    paths = sorted(gallery_names())
    expected = brute_force_scores(Trained(**{**trained.__dict__, "model": model, "processor": processor}),
                                  photos, paths, queries)
    assert_brute_force_top_k(printed_hits(out, queries), expected, paths, k=4, score_tol=5e-5 + TIE)


def test_a_lightning_checkpoint_is_the_same_model_as_its_pretrained_folder(trained, photos, tmp_path, capsys):
    """Indexed from the .ckpt, searched with the folder: one fingerprint, one ranking."""
    gallery_file = tmp_path / "photos.gallery"
    code, _, err = run(capsys, "index", "--model", trained.ckpt, "--images", photos, "--out", gallery_file,
                       "--num_workers", 0, "--device", "cpu")
    assert code == 0, err
    gallery = GalleryIndex.load(gallery_file)
    assert gallery.model["checkpoint"] == str(trained.ckpt.resolve())
    assert gallery.model["fingerprint"] == model_fingerprint(trained.model)
    assert torch.allclose(gallery.features, index_quietly(trained, photos, tmp_path / "fresh")[0].features, atol=TIE)
    code, out, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--query",
                         trained.captions[4], "--top_k", 2, "--device", "cpu")
    assert code == 0, err
    expected = brute_force_scores(trained, photos, gallery.paths, trained.captions[4:5])
    assert_brute_force_top_k(printed_hits(out, trained.captions[4:5]), expected, gallery.paths, k=2,
                             score_tol=5e-5 + TIE)


def test_search_options_from_a_config_file(trained, photos, tmp_path, capsys):
    gallery_file = tmp_path / "photos.gallery"
    index_quietly(trained, photos, gallery_file)
    queries = [trained.captions[1], trained.captions[6]]
    config = tmp_path / "search.yaml"
    config.write_text(
        f"model: {trained.folder}\ngallery: {gallery_file}\nquery:\n  - {queries[0]}\n  - {queries[1]}\n"
        f"top_k: 3\ndevice: cpu\n"
    )
    code, out, err = run(capsys, "search", "--config", config)
    assert code == 0, err
    expected = brute_force_scores(trained, photos, sorted(gallery_names()), queries)
    assert_brute_force_top_k(printed_hits(out, queries), expected, sorted(gallery_names()), k=3, score_tol=5e-5 + TIE)
    code, out, err = run(capsys, "search", "--config", config, "--top_k", 2)  # the command line wins
    assert code == 0, err
    assert [len(row) for row in printed_hits(out, queries)] == [2, 2]


def test_python_api_search_is_the_brute_force_ranking_of_the_model_s_scores(trained, photos, tmp_path):
    model, processor = trained.model, trained.processor
    gallery, report = build_index(model, processor, photos, tmp_path / "g", num_workers=0, progress=False)
    assert gallery.paths == sorted(gallery_names()) and gallery.file == str(tmp_path / "g")
    assert set(gallery.failed) == {"broken.jpg"} and report.failed == gallery.failed
    assert (report.found, report.encoded, report.kept, report.dropped) == (NUM_IDS + 1, gallery.paths, 0, [])
    listing = f"1 file could not be read and is not in the index:\n  broken.jpg: {gallery.failed['broken.jpg']}"
    assert report.summary().endswith(listing)  # what 'tipr index' prints
    assert torch.allclose(gallery.features.norm(dim=1), torch.ones(NUM_IDS))
    # Row i of the gallery is the image at paths[i], encoded as the model encodes it on its own.
    pixels = processor.preprocess([photos / path for path in gallery.paths])
    with torch.inference_mode():
        alone = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    assert torch.allclose(gallery.features, alone, atol=TIE)

    expected = brute_force_scores(trained, photos, gallery.paths, trained.captions)  # (8 captions, 8 images)
    for k in (NUM_IDS, 3, 1):
        hits = search(model, processor, gallery, trained.captions, top_k=k)
        assert_brute_force_top_k(as_rows(hits), expected, gallery.paths, k)
    batched = search(model, processor, gallery, trained.captions, top_k=3, batch_size=3)  # 3 text batches
    assert_brute_force_top_k(as_rows(batched), expected, gallery.paths, k=3)
    one = search(model, processor, gallery, trained.captions[5], top_k=1)  # a single string is one query
    assert_brute_force_top_k(as_rows(one), expected[5:6], gallery.paths, k=1)


def test_a_notebook_opens_a_gallery_and_searches_a_sub_folder(trained, photos, tmp_path, capsys):
    """The Python API as a notebook uses it: open a gallery written earlier, ask a batch of queries,
    restrict them to a sub-folder (a camera, a day); the CLI's --prefix gives the same hits."""
    out = tmp_path / "photos.gallery"
    index_quietly(trained, photos, out)
    gallery = GalleryIndex.load(out)  # a later session: memory-mapped shards
    queries = trained.captions[:3]
    street = [p for p in gallery.paths if p.startswith("street/")]
    assert sorted(street) == ["street/id1.JPG", "street/night/id2.png"]
    hits = search(trained.model, trained.processor, gallery, queries, top_k=5, prefix="street/")
    assert [len(row) for row in hits] == [2, 2, 2]  # clamped to the two images under street/
    assert_brute_force_top_k(as_rows(hits), brute_force_scores(trained, photos, street, queries), street, k=2)
    night = search(trained.model, trained.processor, gallery, queries, top_k=1, prefix="street/night/")
    assert [[hit.path for hit in row] for row in night] == [["street/night/id2.png"]] * 3
    assert all(gallery.path(hit.row) == hit.path for row in hits for hit in row)
    code, printed, err = run(capsys, "search", "--model", trained.folder, "--gallery", out, "--query", queries[0],
                             "--top_k", 5, "--prefix", "street/", "--device", "cpu")
    assert code == 0 and "the 2 images under 'street/'" in err
    assert [(r, p) for r, _, p in printed_hits(printed, queries[:1])[0]] == [(h.rank, h.path) for h in hits[0]]
    with pytest.raises(GalleryError, match="holds no image under 'park/'"):
        search(trained.model, trained.processor, gallery, queries, prefix="park/")


def test_an_ann_index_built_by_tipr_index_gives_the_exact_hits(trained, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "photos.gallery"
    code, printed, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", out,
                             "--ann", "true", "--num_workers", 0, "--device", "cpu")
    assert code == 0, err
    assert "ANN index Flat over 8 rows built" in printed  # a small gallery gets FAISS's exact index
    assert GalleryIndex.load(out).ann["factory"] == "Flat"
    rows = {}
    for exact in ("true", "false"):
        code, printed, err = run(capsys, "search", "--model", trained.folder, "--gallery", out, "--query",
                                 trained.captions[3], "--top_k", 4, "--exact", exact, "--device", "cpu")
        assert code == 0, err
        rows[exact] = printed_hits(printed, trained.captions[3:4])
    assert rows["true"] == rows["false"]
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss-cpu not installed
    code, _, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", out, "--ann", "true")
    assert code == 1 and err.strip().endswith('pip install "tipr[ann]"') and "Traceback" not in err


def test_gallery_folder_round_trip(trained, photos, tmp_path):
    out = tmp_path / "g" / "photos.gallery"
    built, _ = index_quietly(trained, photos, out)
    loaded = GalleryIndex.load(out)
    assert loaded.file == str(out) and len(loaded) == NUM_IDS
    assert loaded.paths == built.paths and torch.equal(loaded.features, built.features)
    stats = {path: (photos / path).stat() for path in loaded.paths}
    assert loaded.entries() == {p: (st.st_size, st.st_mtime_ns, row) for row, (p, st) in enumerate(stats.items())}
    assert loaded.model == built.model and loaded.model["checkpoint"] == str(trained.folder.resolve())
    assert loaded.model["fingerprint"] == model_fingerprint(trained.model) and loaded.root == str(photos.resolve())
    assert loaded.model["image_size"] == list(IMAGE_SIZE) and loaded.model["text_length"] == TEXT_LENGTH
    assert loaded.failed == {"broken.jpg": built.failed["broken.jpg"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["live"], manifest["deleted"]) == ("tipr-gallery", 2, 8, None)
    # The manifest and one shard's two files; no journal, no temporary file left.
    (shard,) = manifest["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "manifest.json", f"{shard['name']}.features.npy", f"{shard['name']}.meta.npy"])
    features = np.load(out / f"{shard['name']}.features.npy", allow_pickle=False)  # plain arrays: nothing unpickled
    assert features.dtype == np.float32 and torch.equal(torch.from_numpy(features), loaded.features)


def test_reindex_encodes_only_new_and_changed_files_and_drops_vanished_ones(trained, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "photos.gallery"
    first, _ = index_quietly(trained, photos, out)
    names = gallery_names()
    shutil.copyfile(trained.spare, photos / "street" / "new1.jpg")
    Image.open(photos / names[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "new2.webp")
    changed = photos / names[4]
    shutil.copyfile(trained.spare, changed)  # other content, other size
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (photos / names[6]).unlink()

    decoded = []

    def counting_read(path):
        decoded.append(Path(path).relative_to(photos).as_posix())
        return read_image(path)

    monkeypatch.setattr(indexing_module, "read_image", counting_read)
    code, out_text, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", out,
                              "--num_workers", 0, "--device", "cpu")
    assert code == 0, err
    assert sorted(decoded) == sorted(["street/new1.jpg", "new2.webp", names[4], "broken.jpg"])  # the failure is retried
    assert "encoded 3 (2 new, 1 changed), kept 6 unchanged" in out_text
    assert "dropped 1 entry whose file is gone" in out_text and "broken.jpg: UnidentifiedImageError" in out_text

    second = GalleryIndex.load(out)
    assert sorted(second.paths) == sorted(set(names) - {names[6]} | {"street/new1.jpg", "new2.webp"})
    for path in set(first.paths) & set(second.paths) - {names[4]}:  # taken over bit for bit
        assert torch.equal(second.features[second.paths.index(path)], first.features[first.paths.index(path)])
    fresh, _ = index_quietly(trained, photos, tmp_path / "fresh")  # from scratch
    assert fresh.paths == sorted(second.paths)
    order = [second.paths.index(path) for path in fresh.paths]
    assert torch.allclose(fresh.features, second.features[order], atol=TIE)  # other batches: last bits may differ

    # Nothing changed: nothing but the failure is decoded again.
    decoded.clear()
    again, report = index_quietly(trained, photos, out)
    assert decoded == ["broken.jpg"] and report.encoded == [] and report.kept == 9 and again.paths == second.paths
    assert report.failed == again.failed == second.failed and set(again.failed) == {"broken.jpg"}


def test_another_model_is_refused_naming_both(trained, photos, tmp_path, capsys):
    out = tmp_path / "photos.gallery"
    index_quietly(trained, photos, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for other in (trained.other, trained.other_ckpt):
        for command in (["search", "--gallery", out, "--query", "a person"], ["index", "--images", photos, "--out", out]):
            code, _, err = run(capsys, *command, "--model", other, "--device", "cpu")
            assert code == 1
            assert f"gallery {out} was indexed with another model: {trained.folder.resolve()}" in err
            assert f"the model given is {other.resolve()}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other_model, processor = load_pretrained(trained.other)
    with pytest.raises(GalleryError, match="another model"):
        search(other_model, processor, GalleryIndex.load(out), "a person")


def test_a_file_that_is_not_a_gallery_is_refused_by_name(trained, photos, tmp_path, capsys):
    text = tmp_path / "notes.gallery"
    text.write_text("hello")
    for not_gallery in (trained.ckpt, text):
        code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", not_gallery, "--query", "x",
                           "--device", "cpu")
        assert code == 1 and f"{not_gallery} is not a tipr gallery" in err
    torch.save({"features": torch.zeros(2, 3)}, tmp_path / "tensors.pt")
    with pytest.raises(GalleryError, match="tensors.pt is not a tipr gallery"):
        GalleryIndex.load(tmp_path / "tensors.pt")
    code, _, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", text, "--device", "cpu")
    assert code == 1 and f"--out {text} is a file" in err and "give a new --out folder" in err
    assert text.read_text() == "hello"
    other_folder = tmp_path / "docs"
    other_folder.mkdir()
    (other_folder / "thesis.tex").write_text("mine")
    code, _, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", other_folder)
    assert code == 1 and f"--out {other_folder} is a folder that is not a tipr gallery" in err
    assert sorted(p.name for p in other_folder.iterdir()) == ["thesis.tex"]
    code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", other_folder, "--query", "x")
    assert code == 1 and f"{other_folder} is not a tipr gallery folder (no manifest.json" in err
    code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", tmp_path / "missing", "--query", "x")
    assert code == 1 and f"gallery {tmp_path / 'missing'} does not exist" in err


def test_a_model_that_cannot_be_loaded_is_named_with_its_option(trained, photos, tmp_path, capsys, monkeypatch):
    for model, message in ((tmp_path / "nowhere", f"--model: {tmp_path / 'nowhere'}: no such folder; expected a pretrained folder"),
                           (tmp_path / "best.ckpt", f"--model {tmp_path / 'best.ckpt'}: no such checkpoint file"),
                           (photos / "notes.txt", f"--model: {photos / 'notes.txt'} is not a loadable tipr checkpoint")):
        code, _, err = run(capsys, "index", "--model", model, "--images", photos, "--out", tmp_path / "g",
                           "--device", "cpu")
        assert code == 1 and err.startswith("tipr index: error: ") and message in err, err
    monkeypatch.chdir(tmp_path)  # a relative path that cannot be a hub id is a folder that is not there
    code, _, err = run(capsys, "index", "--model", "outputs/run/pretrained", "--images", photos, "--out",
                       tmp_path / "g", "--device", "cpu")
    assert code == 1 and "--model: outputs/run/pretrained: no such folder; expected a pretrained folder" in err, err
    code, _, err = run(capsys, "index", "--model", trained.folder, "--images", photos, "--out", tmp_path / "g",
                       "--device", "gpu7")
    assert code == 1 and "--device 'gpu7' is not a torch device" in err
    assert not (tmp_path / "g").exists()


def test_top_k_beyond_the_gallery_is_clamped(trained, photos, tmp_path, capsys):
    gallery, _ = index_quietly(trained, photos, tmp_path / "g")
    hits = search(trained.model, trained.processor, gallery, ["a", "b"], top_k=100)
    assert [len(row) for row in hits] == [NUM_IDS, NUM_IDS]
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        search(trained.model, trained.processor, gallery, "a", top_k=0)
    code, out, err = run(capsys, "search", "--model", trained.folder, "--gallery", tmp_path / "g", "--query", "a",
                         "--top_k", 50, "--device", "cpu")
    assert code == 0 and "--top_k 50 is more than the 8 images of the gallery" in err
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == NUM_IDS
    with pytest.raises(SystemExit) as exit_info:  # a usage error
        main(["search", "--model", str(trained.folder), "--gallery", str(tmp_path / "g"), "--query", "a", "--top_k", "0"])
    assert exit_info.value.code == 2 and "top_k" in capsys.readouterr().err


def test_queries_from_a_file_and_a_contact_sheet(trained, photos, tmp_path, capsys):
    gallery_file = tmp_path / "g"
    index_quietly(trained, photos, gallery_file)
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{trained.captions[0]}\n\n   \n{trained.captions[7]}\n")
    code, out, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--queries", queries,
                         "--top_k", 3, "--out", tmp_path / "sheet.png", "--device", "cpu")
    assert code == 0, err
    assert f"query 1: {trained.captions[0]}" in out and f"query 2: {trained.captions[7]}" in out
    assert "query 3" not in out
    sheet = Image.open(tmp_path / "sheet.png")
    # Default tiles: the model's 32x16 input scaled by 4 to 128x64; 3 tiles a row, 4 px apart.
    assert sheet.width == 3 * (64 + 4) + 4 and sheet.height > 2 * (128 + 20)

    code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--queries",
                       tmp_path / "missing.txt")
    assert code == 1 and f"cannot read queries from {tmp_path / 'missing.txt'}" in err
    code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--query", "x",
                       "--out", tmp_path / "sheet")
    assert code == 1 and f"--out {tmp_path / 'sheet'}: expected an image file name" in err
    for blank in ("", "   "):  # an empty query would rank the gallery by nothing
        code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--query", "a man",
                           "--query", blank)
        assert code == 2 and "--query 2 of 2 is blank" in err
        with pytest.raises(ValueError, match="query 2 is blank"):
            search(trained.model, trained.processor, GalleryIndex.load(gallery_file), ["a man", blank])
    (tmp_path / "blank.txt").write_text("\n  \n")
    code, _, err = run(capsys, "search", "--model", trained.folder, "--gallery", gallery_file, "--queries",
                       tmp_path / "blank.txt")
    assert code == 2 and "give at least one query" in err


def test_contact_sheet_layout_and_images_root(trained, photos, tmp_path):
    gallery, _ = build_index(trained.model, trained.processor, photos, tmp_path / "g", num_workers=0, progress=False)
    queries = ["a person in red", "a person in blue"]
    hits = search(trained.model, trained.processor, gallery, queries, top_k=4)
    moved = photos.rename(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image is found under the new root
        sheet = contact_sheet(gallery, queries, hits, images_root=moved, tile_size=(64, 32))
    tile_h, tile_w, pad = 64, 32, 4
    assert sheet.width == 4 * (tile_w + pad) + pad
    font = load_font(12)
    step = line_height(font)
    assert len(wrap_text("1. a person in red", font, sheet.width - 2 * pad)) == 1
    caption_lines = max(len(wrap_text(f"#{hit.rank} {hit.score:.3f}", font, tile_w)) for row in hits for hit in row)
    title_h, caption_h = step + pad, 2 + caption_lines * step  # one-line titles
    cell_h = title_h + tile_h + caption_h
    assert sheet.height == pad + 2 * (cell_h + pad)
    for r, row in enumerate(hits):
        for c, hit in enumerate(row):
            x, y = pad + c * (tile_w + pad), pad + r * (cell_h + pad) + title_h  # title band, then the tile
            expected = to_tile(read_image(moved / hit.path), (tile_h, tile_w)).permute(1, 2, 0).numpy().tobytes()
            assert sheet.crop((x, y, x + tile_w, y + tile_h)).tobytes() == expected, (r, c)
            band = sheet.crop((x, y + tile_h, x + tile_w, y + tile_h + caption_h)).convert("L")
            assert band.getextrema()[0] < 128, (r, c)  # the rank and score are written under the tile
        title = sheet.crop((pad, pad + r * (cell_h + pad), sheet.width - pad, pad + r * (cell_h + pad) + step))
        assert title.convert("L").getextrema()[0] < 128, r  # and the query above its row
    with pytest.warns(UserWarning, match="cannot read image"):
        contact_sheet(gallery, queries[:1], hits[:1])  # the indexed folder is gone: grey tiles


def test_a_folder_with_nothing_readable_exits_1_listing_the_failures(trained, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, "index", "--model", trained.folder, "--images", folder, "--out", tmp_path / "g",
                         "--num_workers", 0, "--device", "cpu")
    assert code == 1 and "broken.jpg: " in out and "no readable image" in err
    assert len(GalleryIndex.load(tmp_path / "g")) == 0  # the empty gallery is written all the same
    code, _, err = run(capsys, "index", "--model", trained.folder, "--images", tmp_path / "nowhere", "--out",
                       tmp_path / "g")
    assert code == 1 and f"image folder {tmp_path / 'nowhere'} does not exist" in err


def test_import_is_light():
    code = "import sys, tipr.search; print(sorted(m for m in ('lightning', 'torchvision', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_index_and_search_never_import_lightning(trained, photos, tmp_path):
    """Both commands, from a pretrained folder and from a .ckpt file, in a fresh interpreter."""
    gallery, sheet = tmp_path / "photos.gallery", tmp_path / "sheet.png"
    code = f"""
import sys
from tipr.commands import main
assert main(["index", "--model", {str(trained.ckpt)!r}, "--images", {str(photos)!r}, "--out", {str(gallery)!r},
             "--num_workers", "0", "--device", "cpu"]) == 0
assert main(["search", "--model", {str(trained.folder)!r}, "--gallery", {str(gallery)!r}, "--query", "a person",
             "--top_k", "2", "--out", {str(sheet)!r}, "--device", "cpu"]) == 0
print("lightning modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "lightning modules: []" in result.stdout
    assert len(GalleryIndex.load(gallery)) == NUM_IDS and Image.open(sheet).width == 2 * (64 + 4) + 4
