"""Object heads: the auxiliary per-patch loss, its targets, and how the model and the run use it as a
registered auxiliary head (``model.aux_heads: [{name: object_heads, ...}]``)."""

from __future__ import annotations

import math

import pytest
import torch

from mllm import run
from mllm.config import ConfigError, load_config
from mllm.heads.base import HeadError, HeadInputs, HeadSpec
from mllm.heads.object_heads import ObjectHeads, ObjectHeadsConfig, PatchHeads, cell_means
from train.data.cell_targets import CellTargetError, cell_targets
from train.data.shapesworld import ShapesWorld, ShapesWorldConfig

SAMPLE = {
    "id": "s0",
    "objects": [
        {"shape": "square", "colour": "blue", "size": "small", "box": [100, 200, 250, 400], "cell": [0, 0]},
        {"shape": "cross", "colour": "orange", "size": "large", "box": [510, 520, 740, 760], "cell": [1, 1]},
    ],
}


def test_cell_targets_by_hand() -> None:
    classes, boxes = cell_targets(SAMPLE, grid=2)
    # attribute order shape, colour, size; value i -> class i + 1; square = SHAPES[1], blue = 3rd colour
    assert classes.tolist() == [[2, 3, 1], [0, 0, 0], [0, 0, 0], [4, 6, 2]]
    torch.testing.assert_close(boxes, torch.tensor([[0.10, 0.20, 0.25, 0.40], [0, 0, 0, 0], [0, 0, 0, 0],
                                                    [0.51, 0.52, 0.74, 0.76]]))


def test_cell_targets_errors_name_the_sample() -> None:
    with pytest.raises(CellTargetError, match="sample x1: no 'objects' list"):
        cell_targets({"id": "x1", "conversations": []}, grid=2)
    with pytest.raises(CellTargetError, match=r"sample s0: object cell \[1, 1\] outside the 1x1 grid"):
        cell_targets(SAMPLE, grid=1)


def _zero_heads(cfg: ObjectHeadsConfig) -> PatchHeads:
    heads = PatchHeads(4, [3, 2], cfg)
    for p in heads.parameters():
        torch.nn.init.zeros_(p)
    return heads


def test_loss_by_hand() -> None:
    # zero heads: uniform logits, so every cell's CE is ln(classes), whatever its class; the box prediction is 0
    heads = _zero_heads(ObjectHeadsConfig(weight=2.0, box_weight=5.0, box_beta=0.1))
    tokens = torch.randn(1, 2, 4)
    classes = torch.tensor([[[1, 1], [0, 0]]])  # cell 0 holds an object, cell 1 is empty
    boxes = torch.tensor([[[0.05, 0.2, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0]]])  # the empty cell's box is never read
    # smooth L1 (beta 0.1) of |d| = 0.05, 0.2, 0, 1: 0.5 * 0.05^2 / 0.1, 0.2 - 0.05, 0, 1 - 0.05; mean over 4
    box = (0.0125 + 0.15 + 0.0 + 0.95) / 4
    expected = 2.0 * (math.log(3) + math.log(2) + 5.0 * box)
    assert heads.loss(tokens, classes, boxes).item() == pytest.approx(expected, rel=1e-6)


def test_loss_without_objects_or_box_weight_is_the_classifiers_alone() -> None:
    heads = _zero_heads(ObjectHeadsConfig(weight=1.0, box_weight=5.0))
    tokens, empty = torch.randn(2, 3, 4), torch.zeros(2, 3, 2, dtype=torch.long)
    assert heads.loss(tokens, empty, torch.ones(2, 3, 4)).item() == pytest.approx(math.log(3) + math.log(2))
    heads = _zero_heads(ObjectHeadsConfig(box_weight=0.0))
    full = torch.ones(2, 3, 2, dtype=torch.long)
    assert heads.loss(tokens, full, torch.ones(2, 3, 4)).item() == pytest.approx(math.log(3) + math.log(2))


def test_loss_refuses_targets_of_another_grid() -> None:
    heads = _zero_heads(ObjectHeadsConfig())
    with pytest.raises(ValueError, match=r"targets \(1, 3, 2\) do not match tokens \(1, 2\)"):
        heads.loss(torch.randn(1, 2, 4), torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 4))


def test_cell_means_by_hand() -> None:
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 patch grid, row-major, value = index
    # cells of 2x2 patches: (0, 1, 4, 5) -> 2.5, (2, 3, 6, 7) -> 4.5, (8, 9, 12, 13) -> 10.5, (10, 11, 14, 15) -> 12.5
    assert cell_means(tokens, (4, 4), 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert cell_means(tokens, (4, 4), 4) is tokens  # one patch per cell: the tokens themselves


def test_a_finer_patch_grid_is_read_per_cell() -> None:
    spec = HeadSpec(dim=4, grid=(8, 8), num_tokens=64)
    heads = ObjectHeads(ObjectHeadsConfig(), spec)
    tokens, classes = torch.randn(2, 64, 4), torch.randint(0, 2, (2, 16, 3))
    boxes = torch.rand(2, 16, 4)
    by_hand = tokens.reshape(2, 4, 2, 4, 2, 4).mean(dim=(2, 4)).reshape(2, 16, 4)  # each cell's 2x2 patches
    expected = heads.patches.loss(by_hand, classes, boxes)
    torch.testing.assert_close(heads.loss(HeadInputs(tokens), {"cell_classes": classes, "cell_boxes": boxes}), expected)
    targets = heads.sample_targets(ShapesWorldConfig(grid=4))(SAMPLE)  # 8x8 patches on a 4x4 scene: accepted
    assert targets["cell_classes"].shape == (16, 3)


@pytest.mark.parametrize("field,value", [("weight", 0.0), ("box_weight", -1.0), ("box_beta", 0.0)])
def test_config_checks(field: str, value: float) -> None:
    with pytest.raises(ValueError, match="object_heads: expected weight > 0"):
        ObjectHeadsConfig(**{field: value})


TINY = ["model.encoder.depth=1", "model.llm.arch.num_hidden_layers=1", "model.aux_heads[0].weight=0.5"]


@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201
    cfg = load_config("tiny", TINY)
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg))
    samples = [ShapesWorld(cfg.data).split("train")[i] for i in range(3)]
    return cfg, model, run.make_collator(model, cfg)(samples), samples


def test_training_loss_is_answer_loss_plus_heads_on_the_tapped_layer(tiny) -> None:  # noqa: ANN001
    cfg, model, batch, samples = tiny
    assert batch["cell_classes"].shape == (3, 16, 3) and batch["cell_boxes"].shape == (3, 16, 4)
    expected_classes = torch.stack([cell_targets(s, cfg.data.grid)[0] for s in samples])
    assert torch.equal(batch["cell_classes"], expected_classes)
    model.train()
    model.encoder.eval()  # batch-norm in eval mode: the separate encoder call below sees the same statistics
    plain = {k: v for k, v in batch.items() if not k.startswith("cell_")}
    answer = model(**plain).loss
    assert [type(h) for h in model.aux_heads] == [ObjectHeads] and model.aux_heads[0].patches.cfg.weight == 0.5
    feats = model.encoder_features(batch["pixel_values"])[model.encoder.layers[-1]]
    heads = model.aux_heads[0].patches.loss(feats, batch["cell_classes"], batch["cell_boxes"])
    total = model(**batch).loss
    torch.testing.assert_close(total, answer + heads)
    model.eval()
    torch.testing.assert_close(model(**batch).loss, model(**plain).loss)  # inference ignores the targets


def test_heads_teach_the_encoder_and_follow_its_freezing(tiny) -> None:  # noqa: ANN001
    _, model, batch, _ = tiny
    model.train()
    model.zero_grad()
    model.set_trainable(["encoder", "projector", "llm"])
    model(**batch).loss.backward()
    assert model.aux_heads[0].patches.box.weight.grad is not None and model.aux_heads[0].patches.box.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.set_trainable(["projector", "llm"])  # a frozen encoder: the heads would teach nothing
    assert not any(p.requires_grad for p in model.aux_heads.parameters())
    plain = {k: v for k, v in batch.items() if not k.startswith("cell_")}
    torch.testing.assert_close(model(**batch).loss, model(**plain).loss)
    model.set_trainable(["encoder", "projector", "llm"])


def test_run_refuses_a_grid_mismatch_and_llava_data(tmp_path) -> None:  # noqa: ANN001
    cfg = load_config("tiny", [*TINY, "data.grid=8"])  # fewer patches than cells
    model = run.build_model(cfg, run.build_tokenizer_for(cfg))
    with pytest.raises(HeadError, match=r"k x k encoder patches per ShapesWorld cell, but the encoder's patch grid is "
                                        r"\(4, 4\) and data.grid is 8"):
        run.make_collator(model, cfg)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: tiny\ntrain_data:\n  path: x.json\n")
    with pytest.raises(ConfigError, match=r"model.aux_heads\[0\] \(object_heads\): its targets come from ShapesWorld "
                                          r"samples; train_data \(LLaVA JSON\) has none"):
        load_config(str(recipe))


def test_saved_model_keeps_the_heads(tiny, tmp_path) -> None:  # noqa: ANN001
    from mllm.model import MLLM

    _, model, batch, _ = tiny
    model.save_pretrained(tmp_path / "m")
    loaded = MLLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.aux_heads[0].patches.box.weight, model.aux_heads[0].patches.box.weight)


def _fused_model(overrides: list[str]):  # noqa: ANN202
    cfg = load_config("ftz", ["model.llm.arch.num_hidden_layers=1", *overrides])
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg))
    samples = [ShapesWorld(cfg.data).split("train")[i] for i in range(2)]
    return model, run.make_collator(model, cfg)(samples)


def test_tower_heads_add_one_loss_per_tower_of_a_fused_encoder() -> None:
    model, batch = _fused_model(["model.aux_heads[0].towers=true"])
    assert len(model.aux_heads[0].towers) == 2 and model.aux_heads[0].reads_towers
    model.train()
    model.encoder.eval()  # batch-norm in eval mode: the separate tower calls below see the same statistics
    plain = {k: v for k, v in batch.items() if not k.startswith("cell_")}
    answer = model(**plain).loss
    fused = model.aux_heads[0].patches.loss(model.encoder_features(batch["pixel_values"])[0],
                                            batch["cell_classes"], batch["cell_boxes"])
    per_tower = []
    for t, (tower, heads) in enumerate(zip(model.encoder.towers, model.aux_heads[0].towers, strict=True)):
        tokens = tower(batch["pixel_values"][:, 3 * t : 3 * t + 3])[tower.layers[-1]]  # both towers: 64 px, 4x4
        assert tokens.shape == (2, 16, 128)
        per_tower.append(heads.loss(tokens, batch["cell_classes"], batch["cell_boxes"]))
    torch.testing.assert_close(model(**batch).loss, answer + fused + per_tower[0] + per_tower[1])


@pytest.mark.parametrize("towers", [False, True])
def test_tower_heads_reach_a_tower_behind_a_closed_gate(towers: bool) -> None:
    # FtZ's zero-initialised gate: at step 0 the augmenting tower (1) gets no gradient from the fused output
    model, batch = _fused_model([f"model.aux_heads[0].towers={str(towers).lower()}", "model.encoder.fusion.gate=true"])
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for p in model.encoder.towers[1].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads) == towers


def test_tower_heads_need_a_fused_encoder() -> None:
    cfg = load_config("tiny", [*TINY, "model.aux_heads[0].towers=true"])
    with pytest.raises(HeadError, match="object_heads.towers: true needs a fused encoder"):
        run.build_model(cfg, run.build_tokenizer_for(cfg))


def test_object_heads_is_a_registered_head_that_declares_its_batch_keys() -> None:
    spec = HeadSpec(dim=4, grid=(2, 2), num_tokens=4)
    head = ObjectHeads(ObjectHeadsConfig(weight=1.0, box_weight=0.0), spec)
    for p in head.parameters():
        torch.nn.init.zeros_(p)
    assert ObjectHeads.batch_keys == ("cell_classes", "cell_boxes") and not head.reads_towers
    targets = head.sample_targets(ShapesWorldConfig(grid=2, image_size=32, max_objects=3))(SAMPLE)
    assert set(targets) == {"cell_classes", "cell_boxes"} and targets["cell_classes"].shape == (4, 3)
    batch = {k: v.unsqueeze(0) for k, v in targets.items()}
    # zero weights: uniform logits over 4 shapes + empty, 6 colours + empty, 2 sizes + empty (cell_targets' classes)
    loss = head.loss(HeadInputs(torch.randn(1, 4, 4)), batch)
    assert loss.item() == pytest.approx(math.log(5) + math.log(7) + math.log(3), rel=1e-6)
