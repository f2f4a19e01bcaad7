"""Where does the answer form? A linear probe of the answer at the last prompt token, per LLM layer.

    python benchmarks/answer_probe.py runs/demo runs/frank_toy/mllm/model --type colour [--scenes 600]

For each model (a run folder written by ``mllm train``, or a model folder: then ShapesWorld at the model's
image size and prompt layout, default grid), the ShapesWorld test questions of one ``--type`` are asked as
``generate`` asks them; the hidden state at the last prompt token -- the position whose next-token logits
give the first answer token -- is kept after the embeddings and after every decoder layer, and a
:func:`mllm.injection.diagnose.linear_probe` per layer is fitted on 70 % of the questions to predict the
answer and scored on the rest. A model that answers from the image reads the answer there by its last
layers (``tiny``: colour 1.00 from layer 3 of 4); a model whose probe stays at the majority rate in every
layer never moves the asked object's attribute to where it answers, whatever its visual attention share.
Prints one Markdown row per model: the majority rate of the scored questions, then the accuracy per entry of
transformers' ``hidden_states`` (the first decoder layer's input, then each layer's output). An injector that
rewrites a layer's input (``gated_xattn``) is inside the first entry already: there it is the embeddings plus the
first cross-attention block's read.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mllm import run
from mllm.injection.diagnose import linear_probe
from train.data.shapesworld import VQA_TYPES, ShapesWorld, ShapesWorldConfig
from train.templates import encode_prompt

FIT_FRACTION = 0.7


def load(folder: Path, scenes: int) -> tuple[Any, ShapesWorldConfig]:
    """The model (eval mode) and the ShapesWorld config its questions come from, ``scenes`` test scenes."""
    from mllm.model import MLLM

    if (folder / "config.yaml").is_file():
        model, cfg = run.load_run(folder)
        data = cfg.data
    else:
        model = MLLM.from_pretrained(folder).eval()
        data = ShapesWorldConfig(image_size=model.encoder.image_size[0], image_first=model.cfg.image_first)
    return model, dataclasses.replace(data, test_images=scenes)


def questions(data: ShapesWorldConfig, kind: str) -> list[tuple[Any, str, str]]:
    """``(image, question, answer)`` of every test item of type ``kind``, in scene order."""
    test = ShapesWorld(data).split("test")
    return [(s["image"], it["question"], it["answer"]) for s in (test[i] for i in range(len(test)))
            for it in s["items"] if it["type"] == kind]


@torch.no_grad()
def last_token_states(model: Any, items: Sequence[tuple[Any, str, str]], batch_size: int = 64) -> torch.Tensor:
    """``[N, layers + 1, d]``: per item, the hidden state at its last prompt token after the embeddings and
    after each decoder layer (prompts of one length share a batch, so no padding enters)."""
    rows = [encode_prompt(model.tokenizer, q, model.template, model.cfg.image_token, model.num_image_tokens,
                          model.cfg.image_first) for _, q, _ in items]
    by_length: dict[int, list[int]] = defaultdict(list)
    for k, ids in enumerate(rows):
        by_length[len(ids)].append(k)
    states: list[torch.Tensor | None] = [None] * len(items)
    for ks in by_length.values():
        for start in range(0, len(ks), batch_size):
            chunk = ks[start:start + batch_size]
            ids = torch.tensor([rows[k] for k in chunk])
            pixels = torch.stack([model.preprocess(items[k][0]) for k in chunk])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                        output_hidden_states=True)
            last = torch.stack([h[:, -1] for h in out.hidden_states], dim=1)  # [b, layers + 1, d]
            for j, k in enumerate(chunk):
                states[k] = last[j]
    return torch.stack(states)  # type: ignore[arg-type]


def answer_probe(folder: Path, kind: str, scenes: int) -> dict[str, Any]:
    """The majority rate of the scored questions and the probe's held-out accuracy per layer."""
    model, data = load(folder, scenes)
    items = questions(data, kind)
    answers = sorted({a for _, _, a in items})
    labels = torch.tensor([answers.index(a) for _, _, a in items])
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))
    states, labels = last_token_states(model, items)[perm], labels[perm]
    split = int(FIT_FRACTION * len(items))
    majority = float((labels[split:] == labels[:split].mode().values).float().mean())
    return {"questions": len(items), "majority": majority,
            "layers": [linear_probe(states[:, layer], labels, split) for layer in range(states.shape[1])]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="run folders (RUN/config.yaml) or model folders")
    parser.add_argument("--type", default="colour", choices=VQA_TYPES, help="the question type probed")
    parser.add_argument("--scenes", type=int, default=600, help="ShapesWorld test scenes (about one question of each type)")
    args = parser.parse_args(argv)
    results = {str(folder): answer_probe(folder, args.type, args.scenes) for folder in args.models}
    width = max(len(r["layers"]) for r in results.values())
    print(f"| model ({args.type}) | questions | majority | " + " | ".join(
        ["input", *(f"layer {i}" for i in range(width - 1))]) + " |")
    print("|---" * (width + 3) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['questions']} | {r['majority']:.2f} | " + " | ".join(f"{a:.2f}" for a in r["layers"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
