from pathlib import Path

import pytest

from common.atomic import atomic_folder, atomic_write


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    assert atomic_write(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temp file left


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        assert not target.exists() and tmp.parent == tmp_path
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"


def test_atomic_folder_replaces_only_when_asked_and_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("v1")
    with pytest.raises(FileExistsError, match="model: already exists"), atomic_folder(target):
        pass
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as tmp:
        (tmp / "weights").write_text("v2")
        raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "v1"  # data already written is not lost
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old copy and the temp folder are gone
