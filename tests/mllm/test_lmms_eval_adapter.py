"""lmms-eval runs its tasks on our checkpoints as ``--model mllm`` (mllm/lmms_eval_model.py).

Skipped without the ``lmms`` extra. A tiny local lmms-eval task (YAML over a ``save_to_disk`` dataset of
five images and questions) runs through lmms-eval's own evaluator on a tiny checkpoint of ours and on a
tiny transformers LLaVA folder; its predictions equal the model's ``generate`` on the same prompts, one
sample at a time, cut where lmms-eval's ``until`` says, and its exact_match is the hand count.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

import torch  # noqa: E402
from hf_families import IMAGES, QUESTIONS, save_family  # noqa: E402

from mllm import run  # noqa: E402
from mllm.config import load_config  # noqa: E402
from mllm.hf_native import load_generator  # noqa: E402
from mllm.lmms_eval_model import (  # noqa: E402
    LmmsRequestError,
    MLLMEval,
    cut_at_stops,
    decoding,
)

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "data.image_size=32",
]
N = 5
# Two tasks over one data set: different generation_kwargs (lmms-eval batches each apart), one cut at a space.
TASKS = {"mllm_tiny_cut": {"max_new_tokens": 6, "until": [" "]}, "mllm_tiny_long": {"max_new_tokens": 8}}


def task_yaml(name: str, data: Path, gen: dict[str, Any]) -> str:
    until = f"\n  until: {gen['until']!r}" if "until" in gen else ""
    return f"""task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {gen['max_new_tokens']}{until}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(root: Path, answers: list[str]) -> Path:
    """The data set (five images, questions and ``answers``) and one YAML per task of :data:`TASKS`."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = {"image": IMAGES[:N], "question": QUESTIONS[:N], "answer": answers}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(root / "data")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, gen in TASKS.items():
        (tasks / f"{name}.yaml").write_text(task_yaml(name, root / "data", gen))
    return tasks


def evaluate(model_dir: Path, tasks: Path) -> dict[str, Any]:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    # lmms-eval 0.7.3 patches filelock through ``filelock._api``, a module filelock 4 no longer has; the
    # patch guards nested dataset loads, which a save_to_disk task does not do, so it is marked done.
    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True
    return evaluator.simple_evaluate(
        model="mllm", model_args=f"pretrained={model_dir},device=cpu", tasks=sorted(TASKS), batch_size=2,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
    )


def predictions(out: dict[str, Any], task: str) -> list[str]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


def ours(folder: Path) -> Path:
    """A tiny checkpoint of ours whose weights are redrawn wide enough that answers differ by image."""
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["ours", "llava"])
def test_lmms_eval_predictions_equal_generate(kind: str, tmp_path: Path) -> None:
    model_dir = ours(tmp_path / "model") if kind == "ours" else save_family("llava", tmp_path / "model")
    model = load_generator(model_dir, device="cpu")
    # Ours places a marker-less prompt's image as it was trained; a transformers model gets it first.
    prompts = QUESTIONS[:N] if kind == "ours" else [f"<image>\n{q}" for q in QUESTIONS[:N]]
    want = {name: [model.generate([im], [p], max_new_tokens=gen["max_new_tokens"])[0]
                   for im, p in zip(IMAGES[:N], prompts, strict=True)]
            for name, gen in TASKS.items()}
    assert len(set(want["mllm_tiny_long"])) > 1  # the answers depend on the image and question
    want["mllm_tiny_cut"] = [text.split(" ")[0] for text in want["mllm_tiny_cut"]]
    answers = [want["mllm_tiny_cut"][0], "-", want["mllm_tiny_cut"][2], "-", "-"]

    out = evaluate(model_dir, write_tasks(tmp_path, answers))

    for name in TASKS:
        assert predictions(out, name) == want[name]
    hits = sum(p == a for p, a in zip(want["mllm_tiny_cut"], answers, strict=True))
    assert out["results"]["mllm_tiny_cut"]["exact_match,none"] == pytest.approx(hits / N)


def test_registered_as_an_entry_point() -> None:
    from lmms_eval import models

    assert "mllm" in models.list_available_models()
    assert models.get_model("mllm") is MLLMEval


def test_decoding_and_stops() -> None:
    assert decoding({"until": ["\n"], "temperature": 0, "do_sample": False}, 1024) == {"max_new_tokens": 1024}
    assert decoding({"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "num_beams": 1}, 1024) == {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert decoding({"num_beams": 3, "top_p": None}, 8) == {"max_new_tokens": 8, "num_beams": 3}
    assert cut_at_stops("A. yes\n\nQ: next", ["\n\n", "Q:"]) == "A. yes"
    assert cut_at_stops("yes", ["", "\n"]) == "yes"


def request(task: str, visuals: Any) -> Any:
    from lmms_eval.api.instance import Instance

    return Instance(request_type="generate_until", arguments=("q", {"until": ["\n"]}, lambda doc: visuals, 0, task,
                                                              "test"), idx=0,
                    metadata={"task": task, "doc_id": 0, "repeats": 1})


def test_refusals(tmp_path: Path) -> None:
    model_dir = ours(tmp_path / "model")
    with pytest.raises(LmmsRequestError, match="batch_size: expected an integer >= 1, got 'auto'"):
        MLLMEval(str(model_dir), batch_size="auto")
    lm = MLLMEval(str(model_dir), device="cpu")
    lm.task_dict = {"t": {"test": [{}]}}
    for visuals, got in (([], r"gave 0 visual\(s\) \(none\)"), ([IMAGES[0], IMAGES[1]], "gave 2 visual"),
                         (["clip.mp4"], r"\(str\)")):
        with pytest.raises(LmmsRequestError, match=rf"task t \(test\), doc 0: model mllm answers one image .*{got}"):
            lm.generate_until([request("t", visuals)])
    bad = request("t", [IMAGES[0]])
    bad.arguments[1]["until"] = 3
    with pytest.raises(LmmsRequestError, match="generation_kwargs.until: expected a string or a list"):
        lm.generate_until([bad])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([bad])
