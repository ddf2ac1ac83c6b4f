"""The synthetic benchmark: deterministic, readable by the real readers in all three formats, learnable captions."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from tipr.data.benchmarks import read_benchmark_folder
from tipr.data.pruning import prune_captions
from tipr.data.synthetic import (
    COLOURS,
    META_FILE,
    SyntheticConfig,
    describe,
    distinct_persons,
    draw_person,
    ensure_synthetic,
    generate_synthetic,
    sample_person,
    save_sample_grid,
)
from tipr.data.synthetic.writer import SyntheticSpecError

SMALL = SyntheticConfig(num_train_ids=5, num_val_ids=2, num_test_ids=3, images_per_id=2, captions_per_image=2, image_size=(64, 32))


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = folder_bytes(generate_synthetic(tmp_path / "a", SMALL))
    b = folder_bytes(generate_synthetic(tmp_path / "b", SMALL))
    c = folder_bytes(generate_synthetic(tmp_path / "c", SMALL, seed=1))
    assert a == b
    assert a.keys() == c.keys()
    assert a["reid_raw.json"] != c["reid_raw.json"]
    assert a["imgs/train/00001_0.jpg"] != c["imgs/train/00001_0.jpg"]


@pytest.mark.parametrize(
    ("fmt", "annotation", "first_id", "splits"),
    [("CUHK-PEDES", "reid_raw.json", 1, {"train": 5, "val": 2, "test": 3}),
     ("ICFG-PEDES", "ICFG-PEDES.json", 0, {"train": 5, "test": 3}),
     ("RSTPReid", "data_captions.json", 0, {"train": 5, "val": 2, "test": 3})],
)
def test_each_format_reads_back_with_the_real_reader(tmp_path, fmt, annotation, first_id, splits):
    folder = generate_synthetic(tmp_path / fmt, SMALL, format=fmt)
    assert (folder / annotation).is_file()
    b = read_benchmark_folder(folder, fmt)
    assert {name: s.num_ids for name, s in b.splits.items()} == splits
    for s in b.splits.values():
        assert s.num_images == 2 * s.num_ids and s.num_captions == 4 * s.num_ids
    all_ids = [set(s.image_pids.tolist()) for s in b.splits.values()]
    assert min(min(ids) for ids in all_ids) == first_id
    assert sum(len(ids) for ids in all_ids) == len(set().union(*all_ids))  # disjoint identities
    with Image.open(folder / "imgs" / b.split("test").image_paths[0]) as im:
        assert (im.height, im.width) == (64, 32) and im.mode == "RGB"
    if fmt == "CUHK-PEDES":
        entry = json.loads((folder / annotation).read_text())[0]
        assert sorted(entry) == ["captions", "file_path", "id", "processed_tokens", "split"]
        assert entry["processed_tokens"][0][:2] == entry["captions"][0].lower().split()[:2]


def test_identities_differ_in_what_every_caption_mentions():
    persons = distinct_persons(300, np.random.default_rng(0))
    keys = {(p.upper, p.upper_colour, p.stripes, p.lower, p.lower_colour) for p in persons}
    assert len(keys) == 300


def test_captions_name_the_garments_and_give_pruning_work():
    rng = np.random.default_rng(5)
    for _ in range(40):
        person = sample_person(rng)
        caption = describe(person, rng)
        words = caption.lower().replace(".", " ").replace(",", " ").split()
        for colour in (person.upper_colour, person.lower_colour):
            assert colour in words or (colour == "gray" and "grey" in words), (colour, caption)
        assert caption[0].isupper() and caption.endswith(".")
    captions = [describe(sample_person(rng), rng) for _ in range(50)]
    pruned = prune_captions(captions)
    assert sum(len(p.split()) for p in pruned) < 0.75 * sum(len(c.split()) for c in captions)
    assert len(set(captions)) == 50


def test_images_show_the_garment_colours():
    """The upper garment's colour is the most common named colour in the middle of the torso."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(20):
        person = sample_person(rng)
        img = np.asarray(draw_person(person, rng, (128, 64)), dtype=float)
        chest = img[34:50, 28:36].reshape(-1, 3)  # (N, 3) pixels in the middle of the torso
        names = list(COLOURS)
        table = np.array([COLOURS[n] for n in names], dtype=float)
        nearest = np.argmin(((chest[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
        hits += names[np.bincount(nearest, minlength=len(names)).argmax()] == person.upper_colour
    assert hits >= 17  # lighting and stripes may shift a few


def test_a_painter_draws_only_its_own_part():
    """Adding glasses or a scarf to an identity (same image generator) changes only the rows of the face or the neck."""
    from PIL import ImageDraw

    from tipr.data.synthetic.painters import Figure, paint_background

    person = dataclasses.replace(sample_person(np.random.default_rng(3)), glasses=False, scarf_colour=None)
    H, W = 128, 64

    def render(p):
        return np.asarray(draw_person(p, np.random.default_rng(9), (H, W), supersample=1)).astype(int)

    rng = np.random.default_rng(9)  # the figure draw_person places: the same draws in the same order
    paint_background(ImageDraw.Draw(Image.new("RGB", (W, H))), W, H, rng)
    figure = Figure.place(person, rng, W, H)
    plain = render(person)
    for change, (top, bottom) in [({"glasses": True}, (figure.head_y - figure.head_r, figure.head_y + figure.head_r)),
                                  ({"scarf_colour": "green"}, (figure.y(12.5), figure.y(28)))]:
        rows = np.flatnonzero((render(dataclasses.replace(person, **change)) != plain).any(axis=(1, 2)))
        assert rows.size and top - 1 <= rows.min() and rows.max() <= bottom + 1, (change, rows, top, bottom)


def test_ensure_synthetic_reuses_its_own_spec_and_never_replaces_another(tmp_path, monkeypatch):
    """Only a missing or empty folder is written; another spec's benchmark (or generator version's, or an unreadable
    synthetic.json) is refused with one line naming the folder, the fields that differ and what to do."""
    import tipr.data.synthetic.writer as writer

    out = tmp_path / "synthetic"
    ensure_synthetic(out, SMALL)
    before = folder_bytes(out)
    stamp = (out / "reid_raw.json").stat().st_mtime_ns
    ensure_synthetic(out, SMALL)
    assert (out / "reid_raw.json").stat().st_mtime_ns == stamp  # reused
    bigger = dataclasses.replace(SMALL, num_train_ids=6, format="ICFG-PEDES")
    with pytest.raises(SyntheticSpecError) as refused:
        ensure_synthetic(out, bigger)
    message = str(refused.value)
    assert isinstance(refused.value, FileExistsError) and "\n" not in message
    assert message == (f"{out} holds a synthetic benchmark of another spec (num_train_ids 5 -> 6, format CUHK-PEDES -> "
                       f"ICFG-PEDES); it is not replaced: write it to another folder (e.g. {out}-6-icfg) or delete {out} "
                       "to regenerate it")
    assert str(refused.value.advise("--out")).endswith(f"give another --out (e.g. --out={out}-6-icfg) or delete {out} "
                                                       "to regenerate it")
    monkeypatch.setattr(writer, "GENERATOR_VERSION", 2)
    with pytest.raises(SyntheticSpecError, match=r"another spec \(generator_version 1 -> 2\); .* \(e.g. .*synthetic-v2\)"):
        ensure_synthetic(out, SMALL)
    monkeypatch.undo()
    assert folder_bytes(out) == before  # untouched
    ensure_synthetic(tmp_path / "bigger", bigger)  # another folder: written
    assert read_benchmark_folder(tmp_path / "bigger", "ICFG-PEDES").num_classes == 6
    with pytest.raises(FileExistsError, match="generate_synthetic writes only a new or empty one"):
        generate_synthetic(out, SMALL)  # the low-level writer does not overwrite either
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger", "synthetic"]  # no temporary folders left

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text("{not json")
    with pytest.raises(SyntheticSpecError, match=f"{broken} holds a synthetic.json that cannot be read .* or delete {broken}"):
        ensure_synthetic(broken, SMALL)
    assert (broken / META_FILE).read_text() == "{not json"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{foreign} exists but holds no synthetic.json"):
        ensure_synthetic(foreign, SMALL)


def test_a_killed_generation_leaves_a_hidden_partial_and_the_next_one_writes_the_folder(tmp_path):
    """A generation killed before its rename leaves ``.<name>.<pid>.<random>.partial`` beside the target, never a
    half-written target: the next call writes the target (an empty one too) and leaves that folder alone."""
    partial = tmp_path / ".synthetic.4242.deadbeef.partial"
    (partial / "imgs" / "train").mkdir(parents=True)
    (partial / "imgs" / "train" / "00001_0.jpg").write_bytes(b"half")
    (tmp_path / "synthetic").mkdir()  # an empty target is written, as a missing one
    ensure_synthetic(tmp_path / "synthetic", SMALL)
    assert folder_bytes(tmp_path / "synthetic") == folder_bytes(generate_synthetic(tmp_path / "fresh", SMALL))
    assert (partial / "imgs" / "train" / "00001_0.jpg").read_bytes() == b"half"


def test_the_command_writes_reuses_and_refuses_naming_out(tmp_path, capsys):
    """``python -m tipr.data.synthetic --out X``: the same spec is reused; another one fails (exit 1) in one
    line that names X, the fields and ``--out``; X is left as it was."""
    from tipr.data.synthetic.__main__ import main

    out = tmp_path / "synthetic"
    small = ["--num-train-ids", "5", "--num-val-ids", "2", "--num-test-ids", "3", "--images-per-id", "2",
             "--image-size", "64", "32"]
    main(["--out", str(out), *small])
    before = folder_bytes(out)
    main(["--out", str(out), *small])
    assert f"synthetic benchmark (CUHK-PEDES format) in {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), *small, "--seed", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert err == (f"python -m tipr.data.synthetic: error: {out} holds a synthetic benchmark of another spec (seed 0 -> 3); "
                   f"it is not replaced: give another --out (e.g. --out={out}-seed3) or delete {out} to regenerate it\n")
    assert folder_bytes(out) == before


def test_sample_grid_shows_the_images_as_read_back_with_their_captions(tmp_path):
    folder = generate_synthetic(tmp_path / "s", SMALL)
    png = save_sample_grid(folder, tmp_path / "grid.png", num_ids=4, images_per_id=2, scale=2, ids_per_row=2)
    train = read_benchmark_folder(folder, "CUHK-PEDES").split("train")
    with Image.open(png) as im:
        sheet = np.asarray(im.convert("RGB"))
    pad, tile_h, tile_w = 4, 128, 64  # image_grid's default pad; the 64 x 32 images at scale 2
    # 4 identities x 2 images, 2 identities a row: 2 rows of 4 tiles, each tile with its caption under it.
    assert sheet.shape[1] == pad + 4 * (tile_w + pad) and sheet.shape[0] > 2 * (tile_h + pad) + 2 * 12
    for n, path in enumerate(train.image_paths[:4]):  # row 0: identities 1 and 2, their images in order
        with Image.open(folder / "imgs" / path) as image:
            expected = np.asarray(image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST))
        x = pad + n * (tile_w + pad)
        assert np.array_equal(sheet[pad:pad + tile_h, x:x + tile_w], expected), path
        below = sheet[pad + tile_h + 2:pad + tile_h + 14, x:x + tile_w]
        assert (below < 128).any(), f"no caption text under tile {n}"
    with pytest.raises(ValueError, match="split 'train' has no images to show"):
        save_sample_grid(folder, tmp_path / "none.png", num_ids=0)


def test_bad_config():
    with pytest.raises(ValueError, match="format must be one of"):
        SyntheticConfig(format="Market-1501")
    with pytest.raises(ValueError, match="needs >= 1 train/test identity"):
        SyntheticConfig(num_test_ids=0)
