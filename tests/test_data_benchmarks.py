"""Benchmark readers: the three public formats, read into the common form, and every bad input named."""

import json

import numpy as np
import pytest
from PIL import Image

from tipr.data.benchmarks import BenchmarkError, read_benchmark, split_table

# (split, image path, id, captions): identities are deliberately not contiguous and not sorted.
CUHK_ENTRIES = [
    ("train", "cam_a/0005_1.jpg", 5, ["A man in a red shirt.", "He wears a red shirt and jeans."]),
    ("train", "cam_a/0005_2.jpg", 5, ["The man has a red shirt.", "A red shirt, blue jeans."]),
    ("train", "cam_b/0009_1.jpg", 9, ["A woman with a green bag.", "She carries a green bag."]),
    ("train", "cam_b/0003_1.jpg", 3, ["Someone in black."]),
    ("val", "cam_c/0020_1.jpg", 20, ["val one a", "val one b"]),
    ("val", "cam_c/0021_1.jpg", 21, ["val two a", "val two b"]),
    ("test", "cam_d/0030_1.jpg", 30, ["test thirty a", "test thirty b"]),
    ("test", "cam_d/0031_1.jpg", 31, ["test thirty-one a", "test thirty-one b"]),
    ("test", "cam_d/0030_2.jpg", 30, ["test thirty c", "test thirty d"]),
]


def write_benchmark(root, name, entries, annotation=None, path_key="file_path", images=True, extra=None):
    """Write ``entries`` (split, path, id, captions) as benchmark ``name`` under ``root``; return the annotation path."""
    folder = root / name
    rows = []
    for split, path, pid, captions in entries:
        row = {"split": split, "captions": captions, path_key: path, "id": pid}
        row.update(extra or {})
        rows.append(row)
        if images:
            (folder / "imgs" / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), (pid * 7 % 256, 10, 20)).save(folder / "imgs" / path)
    folder.mkdir(parents=True, exist_ok=True)
    annotation = folder / (annotation or {"CUHK-PEDES": "reid_raw.json", "ICFG-PEDES": "ICFG-PEDES.json",
                                          "RSTPReid": "data_captions.json"}[name])
    annotation.write_text(json.dumps(rows))
    return annotation


def test_cuhk_pedes_common_form(tmp_path):
    write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES, extra={"processed_tokens": [["a"]]})
    b = read_benchmark("CUHK-PEDES", tmp_path)
    train = b.split("train")
    assert train.image_paths == ("cam_a/0005_1.jpg", "cam_a/0005_2.jpg", "cam_b/0009_1.jpg", "cam_b/0003_1.jpg")
    assert train.num_ids == 3 and train.num_images == 4 and train.num_captions == 7
    # Identity remapping: sorted identity numbers 3, 5, 9 -> labels 0, 1, 2.
    assert b.num_classes == 3
    assert b.train_ids.tolist() == [3, 5, 9]
    assert b.train_labels.tolist() == [1, 1, 2, 0]
    assert train.caption_images.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert b.train_labels[train.caption_images].tolist() == [1, 1, 1, 1, 2, 2, 0]
    assert train.captions[4] == "A woman with a green bag."
    # Evaluation sets keep the benchmark's own identity numbers.
    test = b.split("test")
    assert test.image_pids.tolist() == [30, 31, 30]
    assert test.caption_pids.tolist() == [30, 30, 31, 31, 30, 30]
    assert test.captions == ("test thirty a", "test thirty b", "test thirty-one a", "test thirty-one b", "test thirty c", "test thirty d")
    assert b.split("val").image_pids.tolist() == [20, 21]
    assert b.image_dir == tmp_path / "CUHK-PEDES" / "imgs"


def test_icfg_pedes_zero_based_no_val_and_alternate_file_name(tmp_path):
    entries = [("train", "train/0000/a.jpg", 0, ["zero"]), ("train", "train/0002/b.jpg", 2, ["two"]),
               ("train", "train/0000/c.jpg", 0, ["zero again"]), ("test", "test/0007/d.jpg", 7, ["seven"])]
    write_benchmark(tmp_path, "ICFG-PEDES", entries, annotation="ICFG_PEDES.json")
    b = read_benchmark("ICFG-PEDES", tmp_path)
    assert b.annotation.name == "ICFG_PEDES.json"
    assert sorted(b.splits) == ["test", "train"]
    assert b.num_classes == 2 and b.train_labels.tolist() == [0, 1, 0]
    assert b.split("test").caption_pids.tolist() == [7]
    rows = [line.split() for line in split_table(b).splitlines()[1:]]
    assert rows == [["split", "ids", "images", "captions"], ["train", "2", "3", "3"], ["test", "1", "1", "1"]]


def test_rstpreid_uses_img_path(tmp_path):
    entries = [("train", "0000_c1_0.jpg", 0, ["a", "b"]), ("train", "0001_c1_0.jpg", 1, ["c", "d"]),
               ("val", "0100_c1_0.jpg", 100, ["e", "f"]), ("test", "0200_c2_0.jpg", 200, ["g", "h"])]
    write_benchmark(tmp_path, "RSTPReid", entries, path_key="img_path")
    b = read_benchmark("RSTPReid", tmp_path)
    assert b.split("train").num_captions == 4 and b.num_classes == 2
    assert b.split("val").caption_pids.tolist() == [100, 100]
    assert b.split("test").image_paths == ("0200_c2_0.jpg",)
    # The same file with CUHK's key is rejected, naming the key RSTPReid expects.
    write_benchmark(tmp_path, "RSTPReid", entries, path_key="file_path")
    with pytest.raises(BenchmarkError, match=r"data_captions\.json entry 0: missing key 'img_path'"):
        read_benchmark("RSTPReid", tmp_path)


def test_split_table_shows_public_counts(tmp_path):
    write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    table = split_table(read_benchmark("CUHK-PEDES", tmp_path), {"train": (11003, 34054, 68126)}, title="CUHK-PEDES")
    lines = table.splitlines()
    assert lines[1].split() == ["split", "ids", "images", "captions", "public", "ids/images/captions"]
    assert lines[2].split() == ["train", "3", "4", "7", "11,003/34,054/68,126"]
    assert lines[3].split() == ["val", "2", "2", "4", "-"]


# ------------------------------------------------------------------ bad input, one test each


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "CUHK-PEDES")):
        read_benchmark("CUHK-PEDES", tmp_path / "nowhere")


def test_missing_annotation(tmp_path):
    (tmp_path / "ICFG-PEDES" / "imgs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ICFG-PEDES.json or .*ICFG_PEDES.json"):
        read_benchmark("ICFG-PEDES", tmp_path)


def test_json_that_does_not_parse(tmp_path):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    annotation.write_text(annotation.read_text()[:-5])
    with pytest.raises(BenchmarkError, match=rf"{annotation}: not valid JSON \(.* line 1, column"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_top_level_not_a_list(tmp_path):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    annotation.write_text(json.dumps({"train": []}))
    with pytest.raises(BenchmarkError, match=rf"{annotation}: expected a JSON list .* got a dict"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_entry_missing_a_key(tmp_path):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    rows = json.loads(annotation.read_text())
    del rows[2]["file_path"]
    annotation.write_text(json.dumps(rows))
    with pytest.raises(BenchmarkError, match=rf"{annotation} entry 2: missing key 'file_path'"):
        read_benchmark("CUHK-PEDES", tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("id", "5", r"entry 1 \(cam_a/0005_2.jpg\): 'id' must be a non-negative integer, got '5'"),
        ("id", True, r"entry 1 \(cam_a/0005_2.jpg\): 'id' must be a non-negative integer"),
        ("captions", "a red shirt", r"entry 1 \(cam_a/0005_2.jpg\): 'captions' must be a non-empty list of strings"),
        ("captions", ["ok", 3], r"entry 1 \(cam_a/0005_2.jpg\): caption 1 must be a string, got int"),
        ("file_path", 12, r"entry 1: 'file_path' must be a non-empty string"),
        ("split", 1, r"entry 1: 'split' must be a string, got int"),
    ],
)
def test_entry_with_wrong_type(tmp_path, key, value, message):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    rows = json.loads(annotation.read_text())
    rows[1][key] = value
    annotation.write_text(json.dumps(rows))
    with pytest.raises(BenchmarkError, match=f"{annotation} {message}"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_unknown_split(tmp_path):
    entries = [*CUHK_ENTRIES[:4], ("validation", "cam_c/0020_1.jpg", 20, ["x"]), *CUHK_ENTRIES[6:]]
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(BenchmarkError, match=rf"{annotation} entry 4: unknown split 'validation'; CUHK-PEDES splits are train, val, test"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_icfg_has_no_val_split(tmp_path):
    entries = [("train", "a.jpg", 0, ["x"]), ("val", "b.jpg", 1, ["y"]), ("test", "c.jpg", 2, ["z"])]
    annotation = write_benchmark(tmp_path, "ICFG-PEDES", entries)
    with pytest.raises(BenchmarkError, match=rf"{annotation} entry 1: unknown split 'val'; ICFG-PEDES splits are train, test"):
        read_benchmark("ICFG-PEDES", tmp_path)


def test_empty_caption(tmp_path):
    entries = [*CUHK_ENTRIES[:2], ("train", "cam_b/0009_1.jpg", 9, ["fine", "   "]), *CUHK_ENTRIES[3:]]
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(BenchmarkError, match=rf"{annotation} entry 2 \(cam_b/0009_1.jpg\): caption 1 is empty"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_missing_images_are_reported_together(tmp_path):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    for path in ("cam_a/0005_2.jpg", "cam_c/0021_1.jpg", "cam_d/0030_2.jpg"):
        (tmp_path / "CUHK-PEDES" / "imgs" / path).unlink()
    with pytest.raises(FileNotFoundError) as info:
        read_benchmark("CUHK-PEDES", tmp_path)
    message = str(info.value)
    assert message.startswith(f"3 of 9 images listed in {annotation} do not exist under {tmp_path / 'CUHK-PEDES' / 'imgs'}/")
    assert "cam_a/0005_2.jpg (train), cam_c/0021_1.jpg (val), cam_d/0030_2.jpg (test)" in message
    # Without the image check the annotation itself is fine.
    assert read_benchmark("CUHK-PEDES", tmp_path, check_images=False).num_classes == 3


def test_a_split_without_entries(tmp_path):
    annotation = write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES[:6])
    with pytest.raises(BenchmarkError, match=rf"{annotation}: no entries with split 'test'"):
        read_benchmark("CUHK-PEDES", tmp_path)


def test_unknown_benchmark_name(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'CUHK'"):
        read_benchmark("CUHK", tmp_path)


def test_labels_are_int64(tmp_path):
    write_benchmark(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    b = read_benchmark("CUHK-PEDES", tmp_path)
    assert b.train_labels.dtype == np.int64 and b.split("test").caption_pids.dtype == np.int64
