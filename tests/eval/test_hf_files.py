"""The shared reader of local Hugging Face dataset copies: parquet files, shard folders, save_to_disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_rows import hf_image, png, save_to_disk, write_parquet

from eval.tasks import hf_files
from eval.tasks.base import EvalDataError, EvalSample
from eval.tasks.hf_files import (
    ImageReader,
    ImageRef,
    image_bytes,
    is_hf_copy,
    read_rows,
    read_split,
    revision_files,
)

ROWS = [{"question_id": i, "question": f"q{i}", "image": hf_image(png((10 * i, 0, 0)))} for i in range(5)]


def resolved(value: Any) -> Any:
    """``value`` with every :class:`ImageRef` read back into its bytes."""
    if isinstance(value, ImageRef):
        return value.read()
    if isinstance(value, dict):
        return {k: resolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v) for v in value]
    return value


def test_parquet_file_and_sorted_shards_give_the_rows_in_order(tmp_path: Path) -> None:
    one = write_parquet(ROWS, tmp_path / "one", "test")
    assert resolved(list(read_rows(one / "test-00000-of-00001.parquet"))) == ROWS
    many = write_parquet(ROWS, tmp_path / "many", "test", shards=3)
    assert resolved(list(read_rows(many))) == ROWS  # shard files read in sorted order
    assert resolved(list(read_rows(tmp_path / "many"))) == ROWS  # found recursively under the snapshot folder


def test_save_to_disk_folder_gives_the_same_rows(tmp_path: Path) -> None:
    folder = save_to_disk(ROWS, tmp_path / "saved")
    rows = list(read_rows(folder))
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [image_bytes(r["image"], "x").read() for r in rows] == [r["image"]["bytes"] for r in ROWS]


def test_rows_hold_references_that_read_back_their_own_image(tmp_path: Path) -> None:
    """150 rows in row groups of 40 (and Arrow batches of 64 within them): each reference names its row group
    and row, and a batch's references read back each row's image, also from a list-of-images column."""
    rows = [{"id": i, "image": hf_image(png((i, 0, 0))), "images": [hf_image(png((i, k, 0))) for k in range(i % 3)]}
            for i in range(150)]
    rows[7]["image"] = {"bytes": None, "path": "on/disk.png"}
    rows[8]["images"] = None
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=40)
    got = list(read_rows(path))
    assert got[45]["image"]["bytes"] == ImageRef(str(path), "parquet", 1, 5, "image")
    assert got[5]["images"][1]["bytes"] == ImageRef(str(path), "parquet", 0, 5, "images", 1)
    assert got[7]["image"] == {"bytes": None, "path": "on/disk.png"} and got[8]["images"] is None
    refs = [r["image"]["bytes"] for r in got if r["id"] != 7] + [v["bytes"] for r in got if r["images"] for v in r["images"]]
    read = ImageReader().read(refs)
    assert resolved(got) == rows and [read[r] for r in refs] == [resolved(r) for r in refs]
    saved = list(read_rows(save_to_disk(rows[10:90], tmp_path / "saved", ("image",))))
    assert saved[70]["image"]["bytes"] == ImageRef(str(tmp_path / "saved" / "data-00000-of-00001.arrow"), "arrow", 0, 70,
                                                   "image")
    assert resolved(saved) == rows[10:90]


def test_a_reference_that_cannot_be_read_names_the_file_and_sample(tmp_path: Path) -> None:
    write_parquet(ROWS, tmp_path, "test")
    ref = image_bytes(next(iter(read_rows(tmp_path / "data")))["image"], "x")
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(b"gone")
    assert isinstance(ImageReader().read([ref])[ref], EvalDataError)
    sample = EvalSample(id="q0", image=ref, question="?", reference="a")
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001\.parquet: cannot read 'image' .*\(sample 'q0'\)"):
        sample.load_image()


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


@pytest.mark.parametrize(("budget", "reads"), [(1 << 20, [2, 0, 0, 0]), (0, [2, 2, 2, 2])])
def test_reader_keeps_what_later_batches_need_within_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int, reads: list[int]
) -> None:
    """8 rows in row groups of 4, read by batches that each take one row of each group, the last row twice
    (two samples of one row): with room, each group is decoded once and later batches read what was kept;
    with none, every batch decodes both groups again. Every batch gets its own rows' images."""
    rows = [{"id": i, "image": hf_image(png((i, 0, 0)))} for i in range(8)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    refs = [r["image"]["bytes"] for r in read_rows(path)]
    batches = [[refs[0], refs[4]], [refs[1], refs[7]], [refs[2], refs[6]], [refs[3], refs[7]]]
    decoded: list[int] = []
    real = hf_files._read_chunk
    monkeypatch.setattr(hf_files, "_read_chunk", lambda *key: decoded.append(key[2]) or real(*key))
    reader = ImageReader([ref for batch in batches for ref in batch], budget=budget)
    for batch, n in zip(batches, reads, strict=True):
        before = len(decoded)
        got = reader.read(batch)
        assert len(decoded) - before == n
        assert [got[ref] for ref in batch] == [rows[ref.chunk * 4 + ref.row]["image"]["bytes"] for ref in batch]
    assert reader._kept == {} and reader._room == budget  # nothing held once the last batch has read
