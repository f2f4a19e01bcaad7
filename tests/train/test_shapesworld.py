"""ShapesWorld: determinism, boxes tight to the drawn pixels, answers re-derived from the scene, balance."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from functools import cache

import numpy as np
import pytest
from PIL import Image

from train.data.shapesworld import (
    BACKGROUND,
    COLOURS,
    GROUNDING_TYPE,
    PLURALS,
    SHAPES,
    VQA_TYPES,
    ShapesWorld,
    ShapesWorldConfig,
    majority_baseline,
    scene_text,
    split_items,
)

CFG = ShapesWorldConfig(seed=3, train_images=500, val_images=20, test_images=300)
SINGULAR = {p: s for s, p in PLURALS.items()}


@cache
def samples(split: str) -> list[dict]:
    data = ShapesWorld(CFG).split(split)
    return [data[i] for i in range(len(data))]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixel_box(box: list[int], size: int) -> tuple[int, ...]:
    return tuple(round(v * size / 1000) for v in box)


def test_same_config_gives_byte_identical_samples_in_any_order() -> None:
    fresh = ShapesWorld(ShapesWorldConfig(**vars(CFG))).split("train")
    for i in (17, 3, 0, 499):  # out of order: every sample has its own generator
        a, b = samples("train")[i], fresh[i]
        assert png(a["image"]) == png(b["image"])
        assert a["image"].tobytes() == b["image"].tobytes()
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert fresh[-1]["id"] == "train-000499" and len(fresh) == 500
    with pytest.raises(IndexError):
        fresh[500]


def test_splits_and_seeds_differ() -> None:
    other_seed = ShapesWorld(ShapesWorldConfig(seed=4)).split("train")
    for other in (samples("test"), samples("val"), other_seed):
        same = sum(samples("train")[i]["image"].tobytes() == other[i]["image"].tobytes() for i in range(20))
        assert same <= 2  # a one-object scene may repeat by chance, most must not


def test_scene_layout_one_object_per_cell_sizes_and_colours() -> None:
    cell = CFG.image_size // CFG.grid
    counts = Counter()
    for s in samples("train")[:200]:
        image = np.asarray(s["image"])
        assert image.shape == (64, 64, 3) and s["image"].mode == "RGB"
        objects = s["objects"]
        assert CFG.min_objects <= len(objects) <= CFG.max_objects
        assert len({tuple(o["cell"]) for o in objects}) == len(objects)
        drawn = (image != BACKGROUND).any(-1).sum()
        covered = 0
        for o in objects:
            x1, y1, x2, y2 = pixel_box(o["box"], 64)
            row, col = o["cell"]
            # inside its own cell with a one-pixel margin
            assert col * cell < x1 < x2 < (col + 1) * cell and row * cell < y1 < y2 < (row + 1) * cell
            extent = max(x2 - x1, y2 - y1)
            assert (extent <= cell // 2) if o["size"] == "small" else (extent >= 0.7 * cell - 1)
            region = image[y1:y2, x1:x2]
            mask = (region != BACKGROUND).any(-1)
            covered += mask.sum()
            # every drawn pixel in the box has exactly the object's colour (no antialiasing) ...
            assert (region[mask] == COLOURS[o["colour"]]).all()
            # ... the centre too, and the box is tight: each of its edge rows and columns is drawn on
            assert tuple(image[(y1 + y2) // 2, (x1 + x2) // 2]) == COLOURS[o["colour"]]
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            counts[o["colour"]] += 1
        assert covered == drawn  # nothing drawn outside the boxes: the cell outside the box is background
    assert set(counts) == set(COLOURS) and max(counts.values()) < 2 * min(counts.values())


def _find(objects: list[dict], ref: str) -> dict:
    """The unique object matching a referring phrase such as 'small red object' or 'blue circle'."""
    words = [w for w in ref.split() if w != "object"]
    hits = [o for o in objects if all(w in (o["size"], o["colour"], o["shape"]) for w in words)]
    assert len(hits) == 1, (ref, objects)
    return hits[0]


def _expected(item: dict, objects: list[dict]) -> str:
    q = item["question"]
    if m := re.fullmatch(r"What colour is the (.+)\?", q):
        return _find(objects, m[1])["colour"]
    if m := re.fullmatch(r"What shape is the (.+)\?", q):
        return _find(objects, m[1])["shape"]
    if q == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(o["shape"] == SINGULAR[m[1]] for o in objects))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        assert ("an" in q.split()) == (m[1][0] in "aeiou")
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"Is the (.+) (left or right of|above or below) the (.+)\?", q):
        a, b = _find(objects, m[1]), _find(objects, m[3])
        axis = 1 if m[2] == "left or right of" else 0
        assert a["cell"][axis] != b["cell"][axis]  # the relation is well defined
        first, second = ("left", "right") if axis else ("above", "below")
        return first if a["cell"][axis] < b["cell"][axis] else second
    if m := re.fullmatch(r"Where is the (.+)\?", q):
        obj = _find(objects, m[1])
        assert item["box"] == obj["box"]
        return "[{}, {}, {}, {}]".format(*obj["box"])
    raise AssertionError(f"unexpected question {q!r}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_follow_from_the_scene(split: str) -> None:
    for s in samples(split):
        for item in s["items"]:
            assert item["answer"] == _expected(item, s["objects"]), (s["id"], item)
            assert (item["box"] is not None) == (item["type"] == GROUNDING_TYPE)


def test_colour_answer_is_the_drawn_colour() -> None:
    for s in samples("test")[:100]:
        image = np.asarray(s["image"])
        for item in s["items"]:
            if item["type"] == "colour":
                ref = re.fullmatch(r"What colour is the (.+)\?", item["question"])[1]
                x1, y1, x2, y2 = pixel_box(_find(s["objects"], ref)["box"], 64)
                assert tuple(image[(y1 + y2) // 2, (x1 + x2) // 2]) == COLOURS[item["answer"]]


def test_conversation_format_and_training_mix() -> None:
    kinds = Counter()
    for s in samples("train"):
        conv, items = s["conversations"], s["items"]
        assert len(items) == CFG.questions_per_image and len(conv) == 2 * len(items)
        assert [t["from"] for t in conv] == ["human", "gpt"] * len(items)
        assert conv[0]["value"] == "<image>\n" + items[0]["question"]
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert [t["value"] for t in conv[1::2]] == [it["answer"] for it in items]
        assert len({it["question"] for it in items}) == len(items)
        kinds.update(it["type"] for it in items)
    total = sum(kinds.values())
    assert abs(kinds[GROUNDING_TYPE] / total - CFG.grounding_fraction) < 0.03
    vqa = [kinds[k] for k in VQA_TYPES]
    assert min(vqa) > 0.6 * max(vqa)  # roughly uniform (relpos needs two nameable objects)


def test_question_mix_weights_training_turns_only() -> None:
    """{exists: 3, colour: 0}: exists takes 3/6 of the VQA turns (relpos and shape redraws aside), colour none;
    the test split, which asks every type once, is byte-identical to the unweighted one."""
    mixed = ShapesWorldConfig(seed=3, train_images=1500, test_images=20, questions_per_image=1,
                              grounding_fraction=0.0, question_mix={"exists": 3, "colour": 0})
    data = ShapesWorld(mixed).split("train")
    kinds = Counter(data[i]["items"][0]["type"] for i in range(len(data)))
    assert kinds["colour"] == 0 and kinds[GROUNDING_TYPE] == 0
    assert abs(kinds["exists"] / len(data) - 3 / 6) < 0.04
    assert abs(kinds["count"] / len(data) - 1 / 6) < 0.04
    plain = ShapesWorldConfig(seed=3, test_images=20)
    for a, b in zip(ShapesWorld(mixed).split("test"), ShapesWorld(plain).split("test"), strict=True):
        assert a["items"] == b["items"] and png(a["image"]) == png(b["image"])


def test_eval_samples_hold_every_type_once_when_possible() -> None:
    full = 0
    for s in samples("test"):
        types = [it["type"] for it in s["items"]]
        assert types == [t for t in (*VQA_TYPES, GROUNDING_TYPE) if t in types]  # fixed order, no repeats
        assert {"count", "exists"} <= set(types)  # always answerable
        full += len(types) == 6
    assert full > 0.6 * len(samples("test"))


def test_majority_baseline_stays_low_and_answers_spread() -> None:
    train, test = split_items(samples("train")), split_items(samples("test"))
    assert len(train) == 4 * 500
    baseline = majority_baseline(train, test)
    assert 0.15 < baseline <= 0.45
    answers = {k: Counter(it["answer"] for it in test if it["type"] == k) for k in VQA_TYPES}
    assert set(answers["colour"]) == set(COLOURS) and set(answers["shape"]) == set(SHAPES)
    assert set(answers["relpos"]) == {"left", "right", "above", "below"}
    assert set(answers["count"]) >= {"0", "1", "2", "3", "4", "5"}
    assert abs(answers["exists"]["yes"] - answers["exists"]["no"]) < 0.15 * len(samples("test"))


def test_majority_baseline_hand_computed() -> None:
    def item(kind: str, answer: str) -> dict:
        return {"type": kind, "question": "q", "answer": answer, "box": None}

    train = [item("colour", "red"), item("colour", "red"), item("colour", "blue"), item("exists", "no")]
    test = [item("colour", "red"), item("colour", "blue"), item("exists", "no"), item("shape", "circle"),
            item(GROUNDING_TYPE, "[1, 2, 3, 4]")]
    assert majority_baseline(train, test) == pytest.approx(2 / 4)  # grounding ignored, unseen type wrong
    with pytest.raises(ValueError, match="no VQA item"):
        majority_baseline(train, [item(GROUNDING_TYPE, "[1, 2, 3, 4]")])


def test_write_llava_round_trip(tmp_path) -> None:
    world = ShapesWorld(CFG)
    path = world.write_llava("test", tmp_path / "out", limit=5)
    assert path == tmp_path / "out" / "test.json"
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == [f"test-{i:06d}" for i in range(5)]
    for record, sample in zip(records, samples("test")[:5], strict=True):
        assert record["image"] == f"images/{sample['id']}.png"
        assert record["conversations"] == sample["conversations"]
        with Image.open(path.parent / record["image"]) as img:
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(sample["image"]))
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == sorted(
        ["test.json", *(f"test-{i:06d}.png" for i in range(5))]
    )


def test_bad_config_and_split_names() -> None:
    with pytest.raises(ValueError, match="grid"):
        ShapesWorldConfig(image_size=64, grid=5)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorldConfig(grid=2, max_objects=5)
    with pytest.raises(ValueError, match="grounding_fraction"):
        ShapesWorldConfig(grounding_fraction=1.5)
    for mix in ({"size": 1.0}, {"exists": -1.0}, {t: 0.0 for t in VQA_TYPES}):
        with pytest.raises(ValueError, match="question_mix"):
            ShapesWorldConfig(question_mix=mix)
    with pytest.raises(ValueError, match="expected one of"):
        ShapesWorld(CFG).split("dev")


def test_every_question_type_opens_some_training_conversations() -> None:
    """Eval asks each question as the first turn after the image; training must show that too."""
    from collections import Counter

    from train.data.shapesworld import ShapesWorld, ShapesWorldConfig

    split = ShapesWorld(ShapesWorldConfig(train_images=400)).split("train")
    first = Counter(split[i]["items"][0]["type"] for i in range(400))
    assert set(first) == {"colour", "shape", "count", "exists", "relpos", "grounding"}
    assert max(first.values()) < 0.4 * 400


def test_image_position_follows_config_in_training_and_eval() -> None:
    from eval.tasks.shapesworld import ShapesWorldTask
    from train.data.shapesworld import ShapesWorld, ShapesWorldConfig

    for image_first, expected in ((True, "<image>\n{q}"), (False, "{q}\n<image>")):
        cfg = ShapesWorldConfig(image_first=image_first, train_images=3, test_images=2)
        sample = ShapesWorld(cfg).split("train")[0]
        first = sample["conversations"][0]["value"]
        assert first == expected.format(q=sample["items"][0]["question"])
        assert all("<image>" not in t["value"] for t in sample["conversations"][1:])
        task = ShapesWorldTask(cfg, split="test")
        item = next(iter(task.samples()))
        assert task.build_prompt(item) == expected.format(q=item.question)


def test_scene_text_names_each_object_and_its_cell() -> None:
    objects = [{"shape": "square", "colour": "red", "size": "large", "cell": [0, 2], "box": [500, 0, 750, 250]},
               {"shape": "circle", "colour": "blue", "size": "small", "cell": [3, 1], "box": [266, 766, 484, 984]}]
    assert scene_text(objects) == "large red square 0 2, small blue circle 3 1"
    s = samples("train")[0]  # a generated scene: one phrase per object, its cell from the object's box
    phrases = scene_text(s["objects"]).split(", ")
    assert len(phrases) == len(s["objects"])
    for phrase, o in zip(phrases, s["objects"], strict=True):
        size, colour, shape, row, col = phrase.split()
        cell = 1000 // CFG.grid
        assert (size, colour, shape) == (o["size"], o["colour"], o["shape"])
        assert (int(row), int(col)) == (o["box"][1] // cell, o["box"][0] // cell)
