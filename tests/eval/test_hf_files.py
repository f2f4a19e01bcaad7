"""The shared reader of local Hugging Face dataset copies: parquet files, shard folders, save_to_disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_rows import hf_image, png, save_to_disk, write_parquet

from eval.tasks.base import EvalDataError
from eval.tasks.hf_files import image_bytes, is_hf_copy, read_rows, read_split, revision_files

ROWS = [{"question_id": i, "question": f"q{i}", "image": hf_image(png((10 * i, 0, 0)))} for i in range(5)]


def test_parquet_file_and_sorted_shards_give_the_rows_in_order(tmp_path: Path) -> None:
    one = write_parquet(ROWS, tmp_path / "one", "test")
    assert list(read_rows(one / "test-00000-of-00001.parquet")) == ROWS
    many = write_parquet(ROWS, tmp_path / "many", "test", shards=3)
    assert list(read_rows(many)) == ROWS  # shard files read in sorted order
    assert list(read_rows(tmp_path / "many")) == ROWS  # found recursively under the snapshot folder


def test_save_to_disk_folder_gives_the_same_rows(tmp_path: Path) -> None:
    folder = save_to_disk(ROWS, tmp_path / "saved")
    rows = list(read_rows(folder))
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [image_bytes(r["image"], "x") for r in rows] == [r["image"]["bytes"] for r in ROWS]


def test_bad_paths_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="missing.parquet: file not found"):
        read_rows(tmp_path / "missing.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="empty: no .parquet files"):
        read_rows(tmp_path / "empty")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(EvalDataError, match="bad.parquet: not a readable parquet file"):
        list(read_rows(bad))
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(EvalDataError, match="rows.json: expected a .parquet file"):
        read_rows(tmp_path / "rows.json")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(EvalDataError, match="dd: a DatasetDict folder"):
        read_rows(tmp_path / "dd")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "state.json").write_text("{}")
    with pytest.raises(EvalDataError, match="state.json: not a datasets save_to_disk state file"):
        read_rows(tmp_path / "st")


def test_image_bytes() -> None:
    data = png((1, 2, 3))
    assert image_bytes({"bytes": data, "path": "a.png"}, "w") == data
    assert image_bytes(data, "w") == data
    with pytest.raises(EvalDataError, match="row 3: the image is stored by path only"):
        image_bytes({"bytes": None, "path": "a.png"}, "row 3")
    with pytest.raises(EvalDataError, match="row 3: expected an embedded image"):
        image_bytes("a.png", "row 3")


def test_read_split_picks_the_split_shards_of_a_snapshot(tmp_path: Path) -> None:
    write_parquet(ROWS[:2], tmp_path / "hub", "val", shards=2)
    write_parquet(ROWS[2:], tmp_path / "hub", "test")
    assert [r["question_id"] for r in read_split(tmp_path / "hub", "val")] == [0, 1]
    assert [r["question_id"] for r in read_split(tmp_path / "hub", "test")] == [2, 3, 4]
    assert [Path(f).name for f in revision_files(tmp_path / "hub", "val")] == \
        ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert is_hf_copy(tmp_path / "hub") and not is_hf_copy(tmp_path / "hub" / "missing.json")
