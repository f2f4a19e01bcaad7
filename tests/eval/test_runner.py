"""The runner: batch order, batch-size invariance, resume without recompute or loss, sharding, files, errors."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from eval import runner
from eval.runner import (
    Dist,
    EvalConfig,
    EvalError,
    format_table,
    gather,
    generate_shard,
    plan_shard,
    run_task,
    schedule,
)
from eval.tasks.shapesworld import ShapesWorldTask

N = 8  # items in the hand-made scenes
SINGLE = Dist()  # one process, no accelerate state needed


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_hand_checked(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    gen = fake()
    metrics = run_task(gen, task, EvalConfig(batch_size=3), tmp_path, dist=SINGLE, progress=False)
    assert metrics["vqa_accuracy"] == pytest.approx(0.6)
    assert metrics["grounding_accuracy"] == pytest.approx(2 / 3)
    assert metrics["grounding_mean_iou"] == pytest.approx(0.5)
    assert metrics["per_type"] == {
        "colour": 1.0, "count": 1.0, "exists": 1.0, "grounding": pytest.approx(2 / 3), "relpos": 0.0, "shape": 0.0,
    }
    assert metrics["n"] == N and metrics["n_vqa"] == 5 and metrics["n_grounding"] == 3
    proto = metrics["protocol"]
    assert proto["coordinate_convention"] == "0-1000"
    assert proto["prompt_version"] == "shapesworld-v1"
    assert proto["generation_kwargs"] == {"max_new_tokens": 24}
    assert gen.kwargs == [{"max_new_tokens": 24}] * 3  # ceil(8 / 3) calls, each with the recorded kwargs
    # What is on disk is what was returned; the table has one row per type.
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    table = (tmp_path / "results.md").read_text()
    assert "| grounding | 3 | 0.6667 |" in table and "| vqa_accuracy | 0.6000 |" in table
    records = _lines(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in records] == list(range(N))
    first = records[0]
    assert first["id"] == "test-000000-0" and first["prompt"] == "<image>\nWhat colour is the circle?"
    assert first["prediction"] == "Red." and first["parsed"] == "red" and first["score"] == 1.0
    assert records[5]["parsed"] == [0.0, 0.0, 200.0, 200.0] and records[5]["reference"] == [0, 0, 200, 400]
    assert records[7]["parsed"] is None and records[7]["score"] == 0.0


def test_schedule_buckets_by_type_longest_prompt_first(task: ShapesWorldTask) -> None:
    samples = list(enumerate(task.samples()))
    # Types in order: colour, count, grounding, shape, exists, grounding, relpos, grounding. The grounding
    # prompts: 2 "Where is the red circle?" and 5 "... red square?" (24 characters), 7 "... blue square?" (25).
    order = {bs: [[i for i, _, _ in batch] for batch in schedule(task, samples, bs)] for bs in (1, 2, 3, 8)}
    assert order[2] == [[7, 2], [0, 1], [5, 3], [4, 6]]  # one full grounding batch, then the leftovers
    assert order[3] == [[7, 2, 5], [0, 1, 3], [4, 6]]
    assert order[1] == [[0], [1], [7], [2], [5], [3], [4], [6]]
    assert order[8] == [[0, 1, 7, 2, 5, 3, 4, 6]]
    batch = schedule(task, samples, 3)[0]
    assert [(s.id, prompt) for _, s, prompt in batch] == [
        ("test-000002-1", "<image>\nWhere is the blue square?"), ("test-000000-2", "<image>\nWhere is the red circle?"),
        ("test-000001-2", "<image>\nWhere is the red square?"),
    ]


def test_batches_run_in_schedule_order_and_land_in_dataset_order(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    gen = fake()
    run_task(gen, task, EvalConfig(batch_size=3), tmp_path, dist=SINGLE, progress=False)
    prompts = [task.build_prompt(s) for s in task.samples()]
    assert gen.calls == [[prompts[i] for i in batch] for batch in ([7, 2, 5], [0, 1, 3], [4, 6])]
    records = _lines(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in records] == list(range(N))
    assert [r["prompt"] for r in records] == prompts


def test_fsync_at_the_end_and_every_sync_interval(
    task: ShapesWorldTask, tmp_path: Path, fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []  # records on disk at each fsync of the predictions file
    path = tmp_path / "predictions.jsonl"
    monkeypatch.setattr(runner.os, "fsync", lambda fd: synced.append(len(_lines(path))))
    shard = plan_shard(task, EvalConfig(), tmp_path, SINGLE)
    assert generate_shard(fake(), task, EvalConfig(batch_size=3), shard, progress=False) == 3
    assert synced == [N]  # a short run: once, at the end; every batch was flushed as it finished
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_shard(fake(fail_on=3), task, EvalConfig(batch_size=2), shard, progress=False)
    assert synced == [N, N + 4]  # a crash still syncs the batches that finished
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0.0)
    path.unlink()
    generate_shard(fake(), task, EvalConfig(batch_size=3), shard, progress=False)
    assert synced[2:] == [3, 6, 8, 8]  # after every batch, then at the end


def test_batch_size_does_not_change_outputs(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    results = {}
    for bs in (1, 7):
        out = tmp_path / f"bs{bs}"
        gen = fake()
        results[bs] = run_task(gen, task, EvalConfig(batch_size=bs), out, dist=SINGLE, progress=False)
        assert len(gen.calls) == -(-N // bs)
        assert [len(c) for c in gen.calls] == ([1] * N if bs == 1 else [7, 1])
    assert (tmp_path / "bs1" / "predictions.jsonl").read_bytes() == (tmp_path / "bs7" / "predictions.jsonl").read_bytes()
    for m in results.values():
        m["protocol"].pop("batch_size")
    assert results[1] == results[7]


@pytest.mark.parametrize("resume_batch", [2, 3])
def test_resume_after_crash_neither_recomputes_nor_loses(task: ShapesWorldTask, tmp_path: Path, fake: Any, resume_batch: int) -> None:
    reference = tmp_path / "uninterrupted"
    run_task(fake(), task, EvalConfig(batch_size=2), reference, dist=SINGLE, progress=False)

    out = tmp_path / "run"
    crashing = fake(fail_on=3)  # two batches of 2 succeed, the third call raises
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_task(crashing, task, EvalConfig(batch_size=2), out, dist=SINGLE, progress=False)
    assert len(_lines(out / "predictions.jsonl")) == 4
    assert not (out / "metrics.json").exists()
    # A write torn mid-record must be dropped, not kept nor glued to the next record.
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "test-000001-1", "ind')

    resumed = fake()
    metrics = run_task(resumed, task, EvalConfig(batch_size=resume_batch), out, resume=True, dist=SINGLE, progress=False)
    done_before = {p for call in crashing.calls for p in call}
    done_after = [p for call in resumed.calls for p in call]
    assert len(done_before) == 4 and len(done_after) == 4  # the 4 unfinished, each exactly once
    assert done_before.isdisjoint(done_after)
    assert len(resumed.calls) == -(-4 // resume_batch)
    assert (out / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert metrics["vqa_accuracy"] == pytest.approx(0.6) and metrics["n"] == N

    # Resuming a finished run generates nothing and reproduces the metrics.
    idle = fake()
    again = run_task(idle, task, EvalConfig(batch_size=2), out, resume=True, dist=SINGLE, progress=False)
    assert idle.calls == [] and again["per_type"] == metrics["per_type"]


def test_limit_then_larger_limit(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    gen = fake()
    small = run_task(gen, task, EvalConfig(batch_size=4, limit=3), tmp_path, dist=SINGLE, progress=False)
    assert small["n"] == 3 and small["n_grounding"] == 1 and small["vqa_accuracy"] == 1.0
    full = run_task(gen, task, EvalConfig(batch_size=4), tmp_path, resume=True, dist=SINGLE, progress=False)
    assert full["n"] == N and sum(len(c) for c in gen.calls) == N
    # A smaller limit again scores 3 samples but keeps all 8 on disk.
    again = run_task(gen, task, EvalConfig(limit=3), tmp_path, resume=True, dist=SINGLE, progress=False)
    assert again["n"] == 3 and len(_lines(tmp_path / "predictions.jsonl")) == N


def test_existing_predictions_need_resume(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    run_task(fake(), task, EvalConfig(limit=2), tmp_path, dist=SINGLE, progress=False)
    with pytest.raises(EvalError, match="predictions exist"):
        run_task(fake(), task, EvalConfig(), tmp_path, dist=SINGLE, progress=False)
    with pytest.raises(EvalError, match=r"different protocol; changed: generation_kwargs"):
        run_task(fake(), task, EvalConfig(max_new_tokens=5), tmp_path, resume=True, dist=SINGLE)


def test_corrupt_record_names_file_and_line(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    run_task(fake(), task, EvalConfig(limit=2), tmp_path, dist=SINGLE, progress=False)
    path = tmp_path / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(EvalError, match=r"predictions.jsonl:2: corrupt prediction record"):
        run_task(fake(), task, EvalConfig(), tmp_path, resume=True, dist=SINGLE)


def test_generator_returning_wrong_count(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    class Short(fake):  # type: ignore[misc,valid-type]
        def generate(self, images, prompts, **kw):  # type: ignore[no-untyped-def]
            return super().generate(images, prompts, **kw)[:-1]

    with pytest.raises(EvalError, match="1 texts for a batch of 2"):
        run_task(Short(), task, EvalConfig(batch_size=2), tmp_path, dist=SINGLE, progress=False)


def test_two_process_shards_gather_to_the_single_process_result(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    single = run_task(fake(), task, EvalConfig(batch_size=2), tmp_path / "one", dist=SINGLE, progress=False)

    out, cfg = tmp_path / "two", EvalConfig(batch_size=2)
    out.mkdir()
    ranks = [Dist(rank=r, world=2) for r in (0, 1)]
    shards = [plan_shard(task, cfg, out, d) for d in ranks]  # every process plans before any writes
    assert [[i for i, _ in s.samples] for s in shards] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    gens = [fake(), fake()]
    for gen, shard in zip(gens, shards, strict=True):
        generate_shard(gen, task, cfg, shard, progress=False)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    # A record duplicated across files (e.g. a re-run shard) is kept once.
    dup = (out / "predictions.rank0.jsonl").read_text().splitlines()[0]
    with (out / "predictions.rank1.jsonl").open("a") as f:
        f.write(dup + "\n")
    merged = gather(task, cfg, out, shards[0].n_total)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["predictions.jsonl"]
    assert (out / "predictions.jsonl").read_bytes() == (tmp_path / "one" / "predictions.jsonl").read_bytes()
    assert {k: v for k, v in merged.items() if k != "protocol"} == {k: v for k, v in single.items() if k != "protocol"}


def test_missing_shard_is_an_error(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    cfg = EvalConfig()
    shard = plan_shard(task, cfg, tmp_path, Dist(rank=0, world=2))
    generate_shard(fake(), task, cfg, shard, progress=False)
    with pytest.raises(EvalError, match="4 predictions for 8 samples"):
        gather(task, cfg, tmp_path, shard.n_total)


def test_empty_task_is_an_error(tmp_path: Path) -> None:
    from train.data.shapesworld import ShapesWorldConfig

    empty = ShapesWorldTask(ShapesWorldConfig(), data=[])
    with pytest.raises(EvalError, match="task shapesworld: no samples"):
        plan_shard(empty, EvalConfig(), tmp_path, SINGLE)


def test_default_dist_is_the_accelerate_state(task: ShapesWorldTask, tmp_path: Path, fake: Any) -> None:
    dist = Dist.from_accelerate()
    assert (dist.rank, dist.world, dist.is_main) == (0, 1, True)
    metrics = run_task(fake(), task, EvalConfig(limit=2), tmp_path, progress=False)
    assert metrics["n"] == 2


def test_format_table_handles_missing_metrics() -> None:
    table = format_table({"task": "x", "accuracy": None, "n": 3, "per_type": {"a": 0.5}, "n_per_type": {"a": 3}})
    assert table.splitlines()[4] == "| n | 3 |" and "| a | 3 | 0.5000 |" in table


def test_eval_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=0)


def test_an_error_in_the_loop_is_the_last_line_printed(
    task: ShapesWorldTask, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Short:
        def generate(self, images: list, prompts: list[str], **kw: Any) -> list[str]:
            return ["red"]  # one text for a whole batch

    shard = plan_shard(task, EvalConfig(), tmp_path, SINGLE)
    try:
        generate_shard(Short(), task, EvalConfig(batch_size=2), shard, progress=True)
    except EvalError as err:  # what the command line does with a user error
        print(f"mllm eval: error: {err}", file=sys.stderr)
    gc.collect()  # an unclosed bar would redraw here, after the error
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "mllm eval: error: generate returned 1 texts for a batch of 2"
