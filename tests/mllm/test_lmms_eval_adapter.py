"""lmms-eval runs its tasks on our checkpoints as ``--model mllm`` (mllm/lmms_eval_model.py).

Skipped without the ``lmms`` extra. Tiny local lmms-eval tasks (YAML over a ``save_to_disk`` dataset of
five images and questions) run through lmms-eval's own evaluator on a tiny checkpoint of ours and on a
tiny transformers LLaVA folder: generated answers equal the model's ``generate`` on the same prompts, one
sample at a time, cut where lmms-eval's ``until`` says, and exact_match is the hand count.
Loglikelihood requests are served by :func:`continuation_logprob`, which equals the sum of the
log-softmax of ``generate``'s own step scores (KV-cached decoding) over the greedy tokens. (lmms-eval
0.7's evaluator turns every non-text model output into its ``str`` before scoring, so its own
multiple-choice tasks cannot be run here; the requests are built as its tasks build them.)
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
from mllm.hf_native import image_prompt_batch, load_generator  # noqa: E402
from mllm.lmms_eval_model import (  # noqa: E402
    LmmsRequestError,
    MLLMEval,
    continuation_logprob,
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


def greedy_steps(model: Any, kind: str, image: Any, question: str) -> tuple[list[int], list[torch.Tensor]]:
    """The greedy new tokens of ``generate`` and the log-softmax of its step scores."""
    options = {"max_new_tokens": 3, "output_scores": True, "return_dict_in_generate": True}
    if kind == "ours":
        out = model.generate_ids([image], [question], **options)
        ids = out.sequences[0].tolist()
    else:
        batch = image_prompt_batch(model, [image], question)
        out = model.model.generate(**batch, do_sample=False, **options)
        ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    return ids, [step[0].float().log_softmax(-1) for step in out.scores]


@pytest.mark.parametrize("kind", ["ours", "qwen2_vl"])
def test_continuation_logprob_equals_generate_scores(kind: str, tmp_path: Path) -> None:
    """Greedy tokens from ``generate`` (their step scores: KV-cached decoding), decoded, score as the sum
    of the scores' log-softmax at those tokens and are greedy; a runner-up first token is not greedy and
    scores its own log-probability. Samples whose random tokens do not come back from their decoded text
    are passed over. (Qwen2-VL: a processor batch with per-token modality ids.)"""
    model = load_generator(ours(tmp_path / "m") if kind == "ours" else save_family(kind, tmp_path / "m"), device="cpu")
    tok = model.tokenizer

    def back(ids: list[int]) -> bool:
        return tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids

    with torch.no_grad():
        cases = ((im, q, *greedy_steps(model, kind, im, q)) for q in QUESTIONS for im in IMAGES[:2])
        image, question, ids, steps = next(c for c in cases if back(c[2]))
        assert continuation_logprob(model, image, question, tok.decode(ids)) == (
            pytest.approx(sum(s[i].item() for s, i in zip(steps, ids, strict=True)), abs=1e-4), True)
        other = next(int(i) for i in steps[0].topk(20).indices[1:] if back([int(i)]))
        assert continuation_logprob(model, image, question, tok.decode([other])) == (
            pytest.approx(steps[0][other].item(), abs=1e-4), False)


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


def request(task: str, visuals: Any, second: Any = None, kind: str = "generate_until") -> Any:
    """An lmms-eval request on document 0 of ``task``'s test split: ``("q", second, doc_to_visual, 0,
    task, "test")``, ``second`` being the generation kwargs or the continuation (or doc_to_target)."""
    from lmms_eval.api.instance import Instance

    second = {"until": ["\n"]} if second is None else second
    return Instance(request_type=kind, arguments=("q", second, lambda doc: visuals, 0, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": 0, "repeats": 1})


def test_loglikelihood_requests(tmp_path: Path) -> None:
    """A continuation given as text (multiple_choice: " " + choice) or by the task's doc_to_target."""
    lm = MLLMEval(str(ours(tmp_path / "model")), device="cpu")
    lm.task_dict = {"t": {"test": [{"answer": " blue"}]}}
    got = lm.loglikelihood([request("t", [IMAGES[2]], " red", "loglikelihood"),
                            request("t", [IMAGES[2]], lambda doc: doc["answer"], "loglikelihood")])
    with torch.no_grad():
        assert got == [continuation_logprob(lm.model, IMAGES[2], "q", c) for c in (" red", " blue")]
    assert got[0][0] != got[1][0]


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
    with pytest.raises(LmmsRequestError, match="the continuation '' has no tokens"):
        continuation_logprob(lm.model, IMAGES[0], "q", "")
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([bad])
