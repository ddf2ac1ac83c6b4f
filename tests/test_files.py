"""tipr.files: a write either replaces the target completely or leaves it as it was, with nothing left behind."""

import os
import subprocess
import sys

import pytest

import tipr.files as files
from tipr.files import atomic_folder, atomic_write, replace_folder


class Boom(Exception):
    pass


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_the_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "gallery.bin"
    target.write_bytes(b"old contents")
    with atomic_write(target) as f:
        f.write(b"new ")
        # While writing: the target is still the old file, the new bytes go to a hidden file beside it.
        (partial,) = [p for p in tmp_path.iterdir() if p != target]
        assert partial.name.startswith(f".gallery.bin.{os.getpid()}.") and partial.name.endswith(".partial")
        assert target.read_bytes() == b"old contents"
        f.write(b"contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()  # as open() would create it, not 0o600


def test_a_failing_write_keeps_the_old_file_and_removes_the_partial(tmp_path):
    target = tmp_path / "tokens.pt"
    target.write_bytes(b"previous")
    with pytest.raises(Boom):
        with atomic_write(target) as f:
            f.write(b"half of the new")
            raise Boom
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.pt"]
    # An interrupt too; and with no previous file there is still none.
    fresh = tmp_path / "fresh.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(fresh) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["tokens.pt"]


def test_a_failing_rename_keeps_the_old_file_and_removes_the_partial(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(PermissionError):
        with atomic_write(target) as f:
            f.write(b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_text_mode_and_bad_modes(tmp_path):
    target = tmp_path / "meta.json"
    with atomic_write(target, "w") as f:
        f.write('{"name": "café"}')
    assert target.read_bytes() == '{"name": "café"}'.encode("utf-8")
    with atomic_write(target, "w", encoding="latin-1") as f:
        f.write("é")
    assert target.read_bytes() == b"\xe9"
    with pytest.raises(ValueError, match="atomic_write mode must be 'wb' or 'w', got 'ab'"):
        with atomic_write(target, "ab"):
            pass
    assert target.read_bytes() == b"\xe9" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_two_writers_of_one_target_use_separate_partials(tmp_path):
    target = tmp_path / "cache.pt"
    with atomic_write(target) as first, atomic_write(target) as second:
        first.write(b"first")
        second.write(b"second")
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(".partial")]) == 2
    assert target.read_bytes() == b"first"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_atomic_folder_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "synthetic"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".synthetic.") and partial.is_dir()
        assert sorted(os.listdir(partial)) == []
        (partial / "imgs").mkdir()
        (partial / "imgs" / "1.jpg").write_bytes(b"jpeg")
        assert (target / "old.txt").read_text() == "old"  # untouched until the block ends
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["imgs", "imgs/1.jpg"]
    assert (target / "imgs" / "1.jpg").read_bytes() == b"jpeg"
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no partial, no old folder left
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask()  # as mkdir() would create it, not 0o700
    with atomic_folder(tmp_path / "new") as partial:  # nothing there before
        (partial / "a").write_text("a")
    assert (tmp_path / "new" / "a").read_text() == "a"


def test_a_failing_folder_build_keeps_the_old_folder_and_removes_the_partial(tmp_path):
    target = tmp_path / "pretrained"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(Boom):
        with atomic_folder(target) as partial:
            (partial / "config.json").write_text('{"half": true}')
            raise Boom
    assert [p.name for p in target.iterdir()] == ["config.json"] and (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["pretrained"]


def test_replace_folder_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    target, partial = tmp_path / "out", tmp_path / "out.partial"
    target.mkdir()
    (target / "old").write_text("old")
    partial.mkdir()
    (partial / "new").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(partial):
            raise OSError(39, "Directory not empty", str(dst))  # as when another process got there first
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="Directory not empty"):
        replace_folder(partial, target)
    assert [p.name for p in target.iterdir()] == ["old"] and (partial / "new").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]  # no .old folder left
    monkeypatch.setattr(files.os, "rename", real_rename)
    assert replace_folder(partial, target) == target
    assert [p.name for p in target.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_refuses_a_file_and_names_it(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "target").write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'target'} exists and is not a folder"):
        replace_folder(tmp_path / "partial", tmp_path / "target")
    assert (tmp_path / "target").read_text() == "a file" and (tmp_path / "partial").is_dir()
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'missing'} is not a folder"):
        replace_folder(tmp_path / "missing", tmp_path / "elsewhere")


def test_importing_tipr_files_does_not_import_torch():
    code = "import sys, tipr.files; print(sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
