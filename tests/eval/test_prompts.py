"""Prompt snapshots, one per registered task: a prompt change must show up as a reviewed diff here.

Parametrised over the registry, so a newly registered task fails until its snapshot is added.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from eval.tasks.base import Task
from mllm.registry import EVAL_TASKS
from train.data.shapesworld import ShapesWorldConfig

SHORT = "\nAnswer the question using a single word or phrase."
SNAPSHOTS = {
    "shapesworld": "<image>\nWhat colour is the circle?",
    "vqav2": "<image>\nWhat color is the cat?" + SHORT,
    "gqa": "<image>\nIs the sky blue?" + SHORT,
    "textvqa": "<image>\nwhat brand is this?\nReference OCR token: coca, cola" + SHORT,
    "scienceqa_img": "<image>\nWhich is a mammal?\nA. frog\nB. whale\nC. trout\n"
                     "Answer with the option's letter from the given choices directly.",
    "pope": "<image>\nIs there a fork in the image?" + SHORT,  # adversarial sorts before random
    "refcoco": "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
               "man on left",
}
SNAPSHOTS["refcoco+"] = SNAPSHOTS["refcocog"] = SNAPSHOTS["refcoco"]
SNAPSHOTS["arithmetic"] = "Compute 9 + 2 - 7"  # text only: no image marker
SNAPSHOTS["compositional"] = "<image>\nHow many green objects are there? + 2"
SNAPSHOTS["vizwiz_vqa_val"] = ("<image>\nWhat is this?\nWhen the provided information is insufficient, respond with "
                              "'Unanswerable'." + SHORT)  # lmms-eval capitalises the question
SNAPSHOTS["chartqa"] = "<image>\nHow many bars are there?\nAnswer the question with a single word."
SNAPSHOTS["docvqa_val"] = "<image>\nWhat is the date?" + SHORT
SNAPSHOTS["ocrbench"] = "<image>\nwhat is written in the image?"  # lmms-eval: the question alone
SNAPSHOTS["ai2d"] = ("<image>\nWhich label shows the sun?\nA. moon\nB. sun\nC. earth\nD. mars\n"
                     "Answer with the option's letter from the given choices directly.")
MC = "\nAnswer with the option's letter from the given choices directly."
SNAPSHOTS["mme"] = "<image>\nIs there a dog in the image?" + SHORT  # " Please answer yes or no." replaced
SNAPSHOTS["mmbench_en_dev"] = "<image>\nWhat colour is the sky?\nA. blue\nB. red\nC. green" + MC
SNAPSHOTS["seedbench"] = "<image>\nWhere is this photo taken?\nA. beach\nB. forest\nC. city\nD. desert" + MC
SNAPSHOTS["mmmu_val"] = "<image>\nWhich colour is the sky in <image 1>?\nA. red\nB. blue\nC. green\n" + MC
SNAPSHOTS["mathvista_testmini"] = ("<image>\nHow far is the spring compressed? (Unit: m)\n"
                                   "Answer the question using a single floating-point number with one decimal place.")
GENERATED = {"arithmetic": {}, "compositional": {}}  # default generator configs
FIXTURE = {"refcoco+": "refcoco", "refcocog": "refcoco"}


def _build(name: str, bench: Any, scenes: Any) -> Task:
    if name == "shapesworld":
        return EVAL_TASKS.build(name, ShapesWorldConfig(), split="test", data=scenes)
    if name in GENERATED:
        return EVAL_TASKS.build(name, GENERATED[name], split="test")
    return EVAL_TASKS.build(name, bench(FIXTURE.get(name, name)))


@pytest.mark.parametrize("name", EVAL_TASKS.names())
def test_prompt_snapshot_and_contract(name: str, bench: Any, task: Any) -> None:
    cls = EVAL_TASKS.get(name)
    assert cls.name == name and dataclasses.is_dataclass(EVAL_TASKS.config_cls(name))
    built = _build(name, bench, task._data)
    assert isinstance(built, Task)
    first = next(iter(built.samples()))
    assert built.build_prompt(first) == SNAPSHOTS[name]
    protocol = built.protocol()
    assert protocol["task"] == name and protocol["prompt_version"] and "{question}" in protocol["prompt_template"]


def test_scienceqa_context_line(bench: Any) -> None:
    task = EVAL_TASKS.build("scienceqa_img", bench("scienceqa_img"))
    second = list(task.samples())[1]
    assert task.build_prompt(second) == (
        "<image>\nContext: A poem.\nWhich word rhymes?\nA. cat\nB. dog\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_prompt_template_is_configurable(bench: Any) -> None:
    task = EVAL_TASKS.build("gqa", {**bench("gqa"), "prompt": "<image>\nQ: {question} A:"})
    assert task.build_prompt(next(iter(task.samples()))) == "<image>\nQ: Is the sky blue? A:"
    assert task.protocol()["prompt_template"] == "<image>\nQ: {question} A:"
    with pytest.raises(ValueError, match=r"gqa.prompt: the template must contain '\{question\}'"):
        EVAL_TASKS.build("gqa", {**bench("gqa"), "prompt": "no placeholder"})
