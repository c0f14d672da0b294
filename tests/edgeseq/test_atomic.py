"""Atomic writers: the target appears whole or not at all, nothing is left beside it, and a
failed overwrite (an exception or Ctrl-C) puts the old target back."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeseq.atomic import atomic_dir, atomic_file
from edgeseq.errors import OutputExistsError


class Boom(Exception):
    pass


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def contents(path: Path) -> dict[str, bytes] | bytes:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    return path.read_bytes()


def write_dir(tmp: Path, text: str) -> None:
    (tmp / "a.txt").write_text(text)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text(text)


# ---- directories -------------------------------------------------------------------------
def test_dir_renamed_into_place(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        write_dir(tmp, "new")
    assert (target / "sub" / "b.txt").read_text() == "new"
    assert names(target.parent) == ["out"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_dir_leaves_nothing(tmp_path, error):
    target = tmp_path / "out"
    with pytest.raises(error):
        with atomic_dir(target) as tmp:
            write_dir(tmp, "half")
            raise error
    assert names(tmp_path) == []  # neither the target nor the temporary directory


def test_existing_dir_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists; choose another output path or pass --overwrite"):
        with atomic_dir(target):
            pytest.fail("the body ran although the target exists")
    assert contents(target) == {"keep.txt": b"old"} and names(tmp_path) == ["out"]


@pytest.mark.parametrize("old_kind", ["dir", "file"])
def test_dir_overwrite_replaces_the_old_target(tmp_path, old_kind):
    target = tmp_path / "out"
    target.mkdir() if old_kind == "dir" else target.write_text("old")
    with atomic_dir(target, overwrite=True) as tmp:
        write_dir(tmp, "new")
    assert (target / "a.txt").read_text() == "new" and names(target) == ["a.txt", "sub"]
    assert names(tmp_path) == ["out"]  # the old one is not left aside


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("old_kind", ["dir", "file"])
def test_failed_dir_overwrite_restores_the_old_target(tmp_path, error, old_kind):
    target = tmp_path / "out"
    if old_kind == "dir":
        target.mkdir()
        write_dir(target, "old")
    else:
        target.write_text("old")
    before = contents(target)
    with pytest.raises(error):
        with atomic_dir(target, overwrite=True) as tmp:
            write_dir(tmp, "new")
            raise error
    assert contents(target) == before and names(tmp_path) == ["out"]


def test_failed_final_rename_restores_the_old_target(tmp_path, monkeypatch):
    """The old target is already moved aside when the last rename fails (a full disk, a
    signal): it must come back."""
    import edgeseq.atomic

    target = tmp_path / "out"
    target.mkdir()
    write_dir(target, "old")
    before = contents(target)
    real = edgeseq.atomic.os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).suffix == ".tmp":  # the new one going in; not the restore
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(edgeseq.atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, overwrite=True) as tmp:
            write_dir(tmp, "new")
    monkeypatch.undo()
    assert contents(target) == before and names(tmp_path) == ["out"]


# ---- files -------------------------------------------------------------------------------
def test_file_renamed_into_place(tmp_path):
    target = tmp_path / "deep" / "report.json"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_file() and not target.exists()
        tmp.write_text("{}")
    assert target.read_text() == "{}" and names(target.parent) == ["report.json"]


def test_file_overwrites_by_default(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    inode = target.stat().st_ino
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # a reader sees the old file until the rename
    assert target.read_text() == "new" and target.stat().st_ino != inode
    assert names(tmp_path) == ["report.json"]


def test_file_refused_without_overwrite(tmp_path):
    target = tmp_path / "golden.safetensors"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match="already exists; choose another path or pass overwrite=True"):
        with atomic_file(target, overwrite=False):
            pytest.fail("the body ran although the target exists")
    assert target.read_text() == "old" and names(tmp_path) == ["golden.safetensors"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("existed", [False, True])
def test_failed_file_leaves_the_old_state(tmp_path, error, existed):
    target = tmp_path / "report.json"
    if existed:
        target.write_text("old")
    with pytest.raises(error):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise error
    assert names(tmp_path) == (["report.json"] if existed else [])
    if existed:
        assert target.read_text() == "old"


def test_file_over_a_directory_restores_it_on_failure(tmp_path):
    target = tmp_path / "report.json"
    target.mkdir()
    (target / "x").write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            tmp.write_text("new")
            raise Boom
    assert contents(target) == {"x": b"old"} and names(tmp_path) == ["report.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and names(tmp_path) == ["report.json"]
