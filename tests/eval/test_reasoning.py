"""Reasoning chains: the split itself by hand, then through the runner for every registered task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.reasoning import chain_counts, split_reasoning
from eval.runner import Dist, EvalConfig, EvalError, run_task
from eval.tasks.shapesworld import ShapesWorldTask
from mllm.registry import EVAL_TASKS
from train.data.arithmetic import ARROW
from train.data.shapesworld import ShapesWorldConfig

SINGLE = Dist()


@pytest.mark.parametrize(("text", "expected"), [
    # no chain: the text untouched, whitespace included (each task parses what it always parsed)
    ("Red.", ("", "Red.", "none")),
    ("  two \n", ("", "  two \n", "none")),
    ("", ("", "", "none")),
    # a closed chain: the answer after it, stripped
    ("<think>The circle is red.</think>Red.", ("The circle is red.", "Red.", "closed")),
    ("<think>\nhmm\n</think>\n\n yes \n", ("hmm", "yes", "closed")),
    ("<think>\n\n</think>\n\nNo", ("", "No", "closed")),  # an empty chain (thinking switched off) is a chain
    # no opening tag: the chat template opened it, the output starts inside the chain
    ("Let me count: 1, 2.\n</think>\n\n2", ("Let me count: 1, 2.", "2", "closed")),
    # several closing tags: the answer after the last
    ("<think>a</think>no<think>wait, b</think> yes", ("a\nno\nwait, b", "yes", "closed")),
    ("x </think> y </think>  z", ("x\ny", "z", "closed")),
    # unterminated: the budget ran out mid-chain; the answer is what precedes the open chain
    ("<think>Is it red? Maybe no", ("Is it red? Maybe no", "", "unterminated")),
    ("  <think>\n", ("", "", "unterminated")),
    ("yes <think> on second thought", ("on second thought", "yes", "unterminated")),
    ("<think>a</think> no <think> b", ("a\nb", "no", "unterminated")),  # reopened after the answer
    # a chain with nothing after it is closed, its answer empty
    ("<think>done</think>", ("done", "", "closed")),
])
def test_split_reasoning(text: str, expected: tuple[str, str, str]) -> None:
    assert split_reasoning(text) == expected


def test_chain_counts() -> None:
    records = [{"chain": s} for s in ("none", "closed", "unterminated", "closed", "none")]
    assert chain_counts(records) == {"n_chain": 3, "n_unterminated": 1}
    assert chain_counts([]) == {"n_chain": 0, "n_unterminated": 0}


class Thinking:
    """Wraps a generator: every answer comes after a chain full of distractors that each task's parser
    would pick up (a 'No' for POPE, a box, an arrow and a number, an answer letter), every other one
    without the opening tag; the prompts in ``cut`` get an unterminated chain."""

    CHAIN = f"<think> No, [0, 0, 1000, 1000] {ARROW} 7? The answer is A. Let me think.\n</think>\n\n"

    def __init__(self, inner: Any, cut: tuple[str, ...] = ()) -> None:
        self.inner, self.cut = inner, cut

    def generate(self, images: list, prompts: list[str], **kw: Any) -> list[str]:
        answers = self.inner.generate(images, prompts, **kw)
        return [
            "<think>No, [0, 0, 1000, 1000]; 7" if any(c in p for c in self.cut)
            else self.CHAIN[len("<think>"):] + a if i % 2 else self.CHAIN + a
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runner_scores_the_answer_keeps_the_raw_text_and_counts_chains(task: ShapesWorldTask, tmp_path: Path,
                                                                        fake: Any) -> None:
    plain = run_task(fake(), task, EvalConfig(batch_size=3), tmp_path / "plain", dist=SINGLE, progress=False)
    cut = ("Where is the blue square?", "Is there a blue cross?")
    chained = run_task(Thinking(fake(), cut), task, EvalConfig(batch_size=3), tmp_path / "think", dist=SINGLE,
                       progress=False)
    assert plain["n_chain"] == 0 and plain["n_unterminated"] == 0
    assert chained["n_chain"] == 8 and chained["n_unterminated"] == 2
    # The two cut answers: the blue square was a miss anyway; "no" (right) became no answer (wrong):
    # VQA 3/5 -> 2/5, grounding unchanged.
    assert chained["vqa_accuracy"] == pytest.approx(0.4) and chained["grounding_accuracy"] == plain["grounding_accuracy"]
    assert chained["main_metric"] == plain["main_metric"] == "vqa_accuracy"
    before, after = _lines(tmp_path / "plain" / "predictions.jsonl"), _lines(tmp_path / "think" / "predictions.jsonl")
    assert [c["chain"] for c in after] == ["closed"] * 4 + ["unterminated", "closed", "closed", "unterminated"]
    for p, c in zip(before, after, strict=True):
        assert p["chain"] == "none" and p["answer"] == p["prediction"]
        if c["chain"] == "closed":  # the raw text is kept whole; the answer and its score are the plain run's
            assert c["prediction"].endswith("</think>\n\n" + p["prediction"]) and c["answer"] == p["answer"]
            assert (c["parsed"], c["score"]) == (p["parsed"], p["score"])
        else:  # no answer: an empty VQA answer, no box
            assert c["prediction"].startswith("<think>No") and c["answer"] == "" and c["score"] == 0.0
            assert c["parsed"] == ("" if c["type"] == "exists" else None)
    assert "| n_unterminated | 2 |" in (tmp_path / "think" / "results.md").read_text()


def _registered(name: str, bench: Any, scenes: Any) -> Any:
    """A registered task on its smallest data: the hand-made scenes, a default generator, or the fixture files
    of ``conftest.BENCHMARKS`` (a task whose fixtures live beside its own tests is skipped here)."""
    if name == "shapesworld":
        return ShapesWorldTask(ShapesWorldConfig(), split="test", data=scenes)
    if EVAL_TASKS.get(name).generated:
        return EVAL_TASKS.build(name, {}, split="test")
    try:
        files = bench({"refcoco+": "refcoco", "refcocog": "refcoco"}.get(name, name))
    except KeyError:
        pytest.skip(f"{name}: no fixture files in tests/eval/conftest.py")
    return EVAL_TASKS.build(name, files)


class Echo:
    """Answers each sample with a fixed mix: a word, a letter, a number and a box, so every parser finds something."""

    def generate(self, images: list, prompts: list[str], **kw: Any) -> list[str]:
        return [f"B. Yes {i} [100, 200, 300, {400 + i}]" for i in range(len(prompts))]


@pytest.mark.parametrize("name", EVAL_TASKS.names())
def test_every_task_parses_the_answer_after_the_chain(name: str, bench: Any, task: Any, tmp_path: Path) -> None:
    built = _registered(name, bench, task._data)
    plain = run_task(Echo(), built, EvalConfig(batch_size=4), tmp_path / "plain", dist=SINGLE, progress=False)
    chained = run_task(Thinking(Echo()), built, EvalConfig(batch_size=4), tmp_path / "think", dist=SINGLE,
                       progress=False)
    keep = ("id", "parsed", "score", "reference")
    assert [{k: r[k] for k in keep} for r in _lines(tmp_path / "think" / "predictions.jsonl")] == [
        {k: r[k] for k in keep} for r in _lines(tmp_path / "plain" / "predictions.jsonl")
    ]
    assert chained["n_chain"] == chained["n"] and chained["n_unterminated"] == 0
    drop = ("protocol", "n_chain")
    assert {k: v for k, v in chained.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}


def test_resuming_predictions_written_before_answer_extraction_is_refused(task: ShapesWorldTask, tmp_path: Path,
                                                                           fake: Any) -> None:
    run_task(fake(), task, EvalConfig(limit=2), tmp_path, dist=SINGLE, progress=False)
    # What an older runner left: records without "answer" / "chain", a protocol without the extraction rule.
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    del protocol["answer_extraction"]
    (tmp_path / "protocol.json").write_text(json.dumps(protocol))
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("answer", "chain")}) + "\n"
                            for r in _lines(path)))
    with pytest.raises(EvalError, match=r"protocol.json: cannot resume under a different protocol; "
                                        r"changed: answer_extraction \(None -> 'answer after the last </think>"):
        run_task(fake(), task, EvalConfig(), tmp_path, resume=True, dist=SINGLE, progress=False)
