"""eval/tasks/arithmetic.py and eval/tasks/compositional.py: samples, parsing, scoring, aggregation."""

from __future__ import annotations

from eval.tasks.arithmetic import ArithmeticTask
from eval.tasks.compositional import CompositionalConfig, CompositionalTask
from train.data.arithmetic import ArithmeticConfig
from train.data.shapesworld import ShapesWorld, ShapesWorldConfig


def test_arithmetic_task_scores_the_stated_result() -> None:
    task = ArithmeticTask(ArithmeticConfig(test_size=5))
    samples = list(task.samples())
    assert len(samples) == 5 and all(task.build_prompt(s).startswith("Compute ") for s in samples)
    s = samples[0]
    right = f"{s.reference - 1} + 1 = {s.reference} → {s.reference}"
    assert task.score(s, task.parse(s, right)) == 1.0
    assert task.score(s, task.parse(s, f"{s.reference} → {s.reference + 1}")) == 0.0
    assert task.score(s, task.parse(s, "")) == 0.0


def test_compositional_reference_is_count_then_operation() -> None:
    data = ShapesWorldConfig(test_images=20)
    task = CompositionalTask(CompositionalConfig(data=data))
    scenes = ShapesWorld(data).split("test")
    for i, s in enumerate(task.samples()):
        objects = scenes[i]["objects"]
        q, op, k = s.question.rsplit(" ", 2)
        if q == "How many objects are there?":
            count = len(objects)
        elif q.endswith(" objects are there?"):
            count = sum(o["colour"] == q.split()[2] for o in objects)
        else:
            count = sum(o["shape"] + ("es" if o["shape"] == "cross" else "s") == q.split()[2] for o in objects)
        assert s.meta == {"count": count, "op": op, "k": int(k)}
        assert s.reference == (count + int(k) if op == "+" else count - int(k)) >= 0
        assert task.build_prompt(s) == f"<image>\n{s.question}"


def test_compositional_aggregate_separates_count_from_result() -> None:
    task = CompositionalTask(CompositionalConfig(data=ShapesWorldConfig(test_images=2)))
    a, b = list(task.samples())
    good = f"{a.meta['count']} {a.meta['op']} {a.meta['k']} = {a.reference} → {a.reference}"
    wrong_sum = f"{b.meta['count']} {b.meta['op']} {b.meta['k']} = 99 → 99"
    records = [{"type": s.type, "score": task.score(s, p), "parsed": p, "meta": s.meta}
               for s, p in ((a, task.parse(a, good)), (b, task.parse(b, wrong_sum)))]
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == 0.5 and metrics["count_accuracy"] == 1.0 and metrics["n"] == 2


def test_compositional_prompt_follows_the_data_layout() -> None:
    """A model trained on question-first ShapesWorld turns is asked question first here too."""
    task = CompositionalTask(CompositionalConfig(data=ShapesWorldConfig(test_images=2, image_first=False)))
    s = next(iter(task.samples()))
    assert task.build_prompt(s) == f"{s.question}\n<image>"
    assert task.protocol()["prompt_template"] == "{question}\n<image>"
