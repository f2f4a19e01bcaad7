"""Images read with their batch, and ``skip_bad``: a corrupt or missing image skipped, recorded and not scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_copies import vizwiz_hf_rows, vizwiz_release
from hf_rows import hf_image

from eval import runner
from eval.runner import Dist, EvalConfig, gather, generate_shard, plan_shard, run_task
from eval.tasks import hf_files
from eval.tasks.base import EvalDataError
from eval.tasks.hf_files import ImageRef
from mllm.registry import EVAL_TASKS

# By hand (as in test_vizwiz): "Soup." scores 0.9 on the first question, "Unanswerable" 1.0 on the second,
# "2" 0.6 on the third. With the second skipped: accuracy (0.9 + 0.6) / 2 = 0.75 over the two scored.
ANSWERS = {"What is this": "Soup.", "What color": "Unanswerable", "How many": "2"}
CORRUPT = 1  # the row whose image is not an image


class Recording:
    """Answers from ANSWERS; records the prompts of each call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate(self, images: list[Any], prompts: list[str], **kw: Any) -> list[str]:
        self.calls.append(prompts)
        return [next(v for k, v in ANSWERS.items() if k in p) for p in prompts]


def hub_copy(root: Path) -> Path:
    """The VizWiz rows as a hub parquet shard, one row per row group, row CORRUPT's image bytes not an image."""
    rows = vizwiz_hf_rows()
    rows[CORRUPT]["image"] = hf_image(b"not an image")
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "val-00000-of-00001.parquet", row_group_size=1)
    return root / "data"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_hold_references_and_each_batch_reads_its_rows_only(tmp_path: Path, monkeypatch: Any) -> None:
    data = hub_copy(tmp_path)
    task = EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(data)})
    assert [s.image for s in task.samples()] == [
        ImageRef(str(data / "val-00000-of-00001.parquet"), "parquet", g, 0, "image") for g in range(3)]
    read = hf_files._read_chunk
    chunks: list[int] = []
    monkeypatch.setattr(hf_files, "_read_chunk", lambda path, layout, chunk, column: chunks.append(chunk) or read(
        path, layout, chunk, column))
    run_task(Recording(), task, EvalConfig(batch_size=1), tmp_path / "out", dist=Dist(), progress=False,
             skip_bad=True)
    assert chunks == [0, 1, 2]  # one batch per type, in order: each read its own row group and nothing else


def test_corrupt_image_stops_the_run_then_resume_skips_it(tmp_path: Path) -> None:
    task = EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(hub_copy(tmp_path))})
    gen = Recording()
    with pytest.raises(EvalDataError, match=r"val-00000-of-00001\.parquet: row group 1 row 0 column image: cannot read "
                       r"the image of sample 'VizWiz_val_00000001'"):
        run_task(gen, task, EvalConfig(batch_size=1), tmp_path / "out", dist=Dist(), progress=False)
    assert [r["id"] for r in _lines(tmp_path / "out" / "predictions.jsonl")] == ["VizWiz_val_00000000"]
    assert json.loads((tmp_path / "out" / "protocol.json").read_text())["skip_bad"] is False

    # Resumed with skip_bad (a setting a resumed run may change): the first sample is not generated again.
    m = run_task(gen, task, EvalConfig(batch_size=1), tmp_path / "out", resume=True, dist=Dist(), progress=False,
                 skip_bad=True)
    assert len(gen.calls) == 2 and "How many" in gen.calls[1][0]
    assert m["accuracy"] == pytest.approx(0.75) and m["n"] == 2 and m["skipped"] == 1
    assert m["per_type"] == {"number": pytest.approx(0.6), "other": pytest.approx(0.9)}
    assert m["protocol"]["skip_bad"] is True
    assert json.loads((tmp_path / "out" / "protocol.json").read_text())["skip_bad"] is True
    (skip,) = _lines(tmp_path / "out" / "skipped.jsonl")
    assert skip["id"] == "VizWiz_val_00000001" and skip["index"] == 1 and "cannot identify image file" in skip["reason"]
    assert [r["id"] for r in _lines(tmp_path / "out" / "predictions.jsonl")] == [
        "VizWiz_val_00000000", "VizWiz_val_00000002"]


def test_missing_release_image_fails_before_generation_or_is_skipped(tmp_path: Path) -> None:
    cfg = vizwiz_release(tmp_path / "rel")
    (tmp_path / "rel" / "val" / "VizWiz_val_00000001.jpg").unlink()
    task = EVAL_TASKS.build("vizwiz_vqa_val", cfg)
    gen = Recording()
    with pytest.raises(EvalDataError, match=r"val\.json: \[1\]: image .*VizWiz_val_00000001\.jpg not found"):
        run_task(gen, task, EvalConfig(batch_size=2), tmp_path / "strict", dist=Dist(), progress=False)
    assert gen.calls == [] and not (tmp_path / "strict" / "predictions.jsonl").exists()
    m = run_task(gen, task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False, skip_bad=True)
    assert m["skipped"] == 1 and m["n"] == 2 and m["accuracy"] == pytest.approx(0.75)
    (skip,) = _lines(tmp_path / "out" / "skipped.jsonl")
    assert skip["id"] == "VizWiz_val_00000001"
    assert "VizWiz_val_00000001.jpg: cannot read the image of sample 'VizWiz_val_00000001': [Errno 2]" in skip["reason"]
    assert "| skipped | 1 |" in (tmp_path / "out" / "results.md").read_text()


def test_two_processes_gather_their_skipped_samples(tmp_path: Path) -> None:
    task = EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(hub_copy(tmp_path))})
    cfg = EvalConfig(batch_size=1)
    (tmp_path / "out").mkdir()
    shards = [plan_shard(task, cfg, tmp_path / "out", Dist(rank, 2), skip_bad=True) for rank in range(2)]
    for shard in shards:
        generate_shard(Recording(), task, cfg, shard, progress=False, skip_bad=True)
    assert (tmp_path / "out" / "skipped.rank1.jsonl").is_file()  # rank 1 holds the second sample
    m = gather(task, cfg, tmp_path / "out", shards[0].n_total, processes=2, skip_bad=True)
    assert m["skipped"] == 1 and m["accuracy"] == pytest.approx(0.75)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "metrics.json", "predictions.jsonl", "results.md", "skipped.jsonl"]


def test_every_sample_skipped_is_an_error(tmp_path: Path) -> None:
    rows = vizwiz_hf_rows()[:1]
    rows[0]["image"] = hf_image(b"junk")
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "val.parquet")
    task = EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(tmp_path / "data" / "val.parquet")})
    with pytest.raises(runner.EvalError, match="all 1 samples skipped"):
        run_task(Recording(), task, EvalConfig(), tmp_path / "out", dist=Dist(), progress=False, skip_bad=True)


def test_an_image_stored_by_path_only_is_missing_unless_skipped(tmp_path: Path) -> None:
    rows = vizwiz_hf_rows()
    rows[2]["image"] = {"bytes": None, "path": "VizWiz_val_00000002.jpg"}
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "val.parquet")
    task = EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(tmp_path / "data" / "val.parquet")})
    gen = Recording()
    with pytest.raises(EvalDataError, match=r"val\.parquet: val row 2: the image is stored by path only"):
        run_task(gen, task, EvalConfig(), tmp_path / "strict", dist=Dist(), progress=False)
    assert gen.calls == []  # found while planning, before any generation
    m = run_task(gen, task, EvalConfig(), tmp_path / "out", dist=Dist(), progress=False, skip_bad=True)
    # "Soup." 0.9 and "Unanswerable" 1.0 scored, the third skipped: (0.9 + 1.0) / 2.
    assert m["skipped"] == 1 and m["accuracy"] == pytest.approx(0.95)
    (skip,) = _lines(tmp_path / "out" / "skipped.jsonl")
    assert skip["index"] == 2 and "stored by path only ('VizWiz_val_00000002.jpg')" in skip["reason"]
