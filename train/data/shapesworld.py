"""ShapesWorld: a deterministic, seeded generator of coloured-shape scenes with VQA and grounding items.

The embedded default data set: what ``mllm demo`` trains and evaluates on, and what the tests use.
A scene places 1..``max_objects`` shapes in distinct cells of a ``grid x grid`` layout of the image, each jittered
inside its cell with a one-pixel margin, so objects never touch and "left of" / "above" are defined by
cell column / row. Scene ``i`` of split ``s`` is drawn from its own generator
``np.random.default_rng([seed, s, i])``: random access, byte-identical repeats, splits disjoint by seed.

Boxes are the tight extent of the drawn pixels, written as ``[x1, y1, x2, y2]`` in 0-1000 integer
coordinates of the image, ``x = round(1000 * pixel_edge / image_size)`` (x2, y2 are the far pixel
edges, i.e. last pixel + 1).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_write

VQA_TYPES = ("colour", "shape", "count", "exists", "relpos")
GROUNDING_TYPE = "grounding"
SPLITS = ("train", "val", "test")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "above", "below")
BACKGROUND = (32, 32, 32)

Q_COLOUR = "What colour is the {ref}?"
Q_SHAPE = "What shape is the {ref}?"
Q_COUNT_ALL = "How many objects are there?"
Q_COUNT_SHAPE = "How many {plural} are there?"
Q_COUNT_COLOUR = "How many {colour} objects are there?"
Q_EXISTS = "Is there {article} {colour} {shape}?"
Q_LEFT_RIGHT = "Is the {a} left or right of the {b}?"
Q_ABOVE_BELOW = "Is the {a} above or below the {b}?"
Q_WHERE = "Where is the {ref}?"

# Attribute sets tried in order to name an object uniquely; the first that matches one object wins.
# A colour question must not name the colour, a shape question not the shape.
REF_COLOUR_Q = (("shape",), ("size", "shape"))
REF_SHAPE_Q = (("colour",), ("size", "colour"))
REF_FULL = (("colour", "shape"), ("size", "colour", "shape"))


@dataclass
class ShapesWorldConfig:
    seed: int = 0  # scenes of split s are drawn from default_rng([seed, s, i])
    image_size: int = 64  # pixels per side
    grid: int = 4  # grid x grid cells, at most one object per cell
    min_objects: int = 1
    max_objects: int = 5
    train_images: int = 20000
    val_images: int = 200
    test_images: int = 500
    questions_per_image: int = 4  # training turns per sample
    grounding_fraction: float = 0.25  # expected share of grounding turns in training conversations
    # Relative weights of the VQA types in training turns, e.g. {relpos: 2}; types left out weigh 1,
    # empty = uniform. The val/test splits always ask every type once per image.
    question_mix: dict[str, float] = field(default_factory=dict)
    image_first: bool = True  # "<image>\n{question}" (LLaVA's usual first turn) or "{question}\n<image>"

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed}")
        if self.grid < 1 or self.image_size % self.grid or self.image_size // self.grid < 8:
            raise ValueError(
                f"grid: image_size ({self.image_size}) must be a multiple of grid ({self.grid}) "
                "with cells of at least 8 pixels"
            )
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(
                f"min_objects/max_objects: expected 1 <= min_objects <= max_objects <= grid**2 "
                f"({self.grid**2}), got {self.min_objects}, {self.max_objects}"
            )
        for name in ("train_images", "val_images", "test_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)}")
        if self.questions_per_image < 1:
            raise ValueError(f"questions_per_image: expected >= 1, got {self.questions_per_image}")
        if not 0.0 <= self.grounding_fraction <= 1.0:
            raise ValueError(f"grounding_fraction: expected a number in [0, 1], got {self.grounding_fraction}")
        unknown = sorted(set(self.question_mix) - set(VQA_TYPES))
        if unknown or any(not w >= 0 for w in self.question_mix.values()) or not sum(self.mix_weights(VQA_TYPES)) > 0:
            raise ValueError(
                f"question_mix: expected non-negative weights of {', '.join(VQA_TYPES)} with a positive sum, "
                f"got {self.question_mix}"
            )

    def mix_weights(self, kinds: Sequence[str]) -> list[float]:
        """The weight of each of ``kinds`` (1 where ``question_mix`` is silent)."""
        return [float(self.question_mix.get(kind, 1.0)) for kind in kinds]


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # 0-1000 image coordinates, tight to the drawn pixels

    def words(self, attrs: tuple[str, ...]) -> str:
        text = " ".join(getattr(self, a) for a in attrs)
        return text if "shape" in attrs else f"{text} object"

    def as_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "box": list(self.box), "cell": [self.row, self.col]}


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, extent: int, fill: tuple[int, int, int]) -> None:
    """Aliased (deterministic) drawing of one shape inside the square [x0, x0 + extent)."""
    x1, y1 = x0 + extent - 1, y0 + extent - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        # apex one pixel wide for odd extents, two for even ones: symmetric either way
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1 + 1) // 2, y0), ((x0 + x1) // 2, y0)], fill=fill)
    else:  # cross: a plus sign with bars a third as thick as the extent, centred exactly
        thick = extent // 3 + (extent - extent // 3) % 2
        off = (extent - thick) // 2
        draw.rectangle([x0 + off, y0, x0 + off + thick - 1, y1], fill=fill)
        draw.rectangle([x0, y0 + off, x1, y0 + off + thick - 1], fill=fill)


def _scene(cfg: ShapesWorldConfig, rng: np.random.Generator) -> tuple[Image.Image, list[_Object]]:
    """Draw one scene; each object's box is measured from the pixels of its (object-exclusive) cell."""
    size, cell = cfg.image_size, cfg.image_size // cfg.grid
    extents = {"small": (round(0.45 * cell), round(0.5 * cell)), "large": (round(0.7 * cell), cell - 2)}
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(cfg.grid**2, size=n, replace=False)
    specs = []
    for c in cells:
        row, col = divmod(int(c), cfg.grid)
        shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        size_name = SIZES[rng.integers(len(SIZES))]
        lo, hi = extents[size_name]
        extent = int(rng.integers(lo, hi + 1))
        dx, dy = (int(v) for v in rng.integers(0, cell - 2 - extent + 1, size=2))
        _draw(draw, shape, col * cell + 1 + dx, row * cell + 1 + dy, extent, COLOURS[colour])
        specs.append((shape, colour, size_name, row, col))
    pixels = np.asarray(image)
    objects = []
    for shape, colour, size_name, row, col in specs:
        mask = (pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] != BACKGROUND).any(-1)
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        edges = (col * cell + xs[0], row * cell + ys[0], col * cell + xs[-1] + 1, row * cell + ys[-1] + 1)
        x1, y1, x2, y2 = ((2000 * int(e) + size) // (2 * size) for e in edges)  # round(1000 * e / size)
        objects.append(_Object(shape, colour, size_name, row, col, (x1, y1, x2, y2)))
    return image, objects


def _reference(obj: _Object, objects: list[_Object], options: tuple[tuple[str, ...], ...]) -> str | None:
    """The first attribute phrase in ``options`` that picks ``obj`` alone out of the scene, else None."""
    for attrs in options:
        key = [getattr(obj, a) for a in attrs]
        if sum([getattr(o, a) for a in attrs] == key for o in objects) == 1:
            return obj.words(attrs)
    return None


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _pick_kind(rng: np.random.Generator, cfg: ShapesWorldConfig, kinds: Sequence[str]) -> str:
    """One of ``kinds`` (VQA types) drawn by ``cfg.question_mix``; an empty mix keeps the unweighted draw,
    so the default data stays as it was. Falls back to uniform when every one of ``kinds`` weighs 0."""
    if not cfg.question_mix:
        return _pick(rng, kinds)
    weights = np.asarray(cfg.mix_weights(kinds))
    if not weights.sum() > 0:
        return _pick(rng, kinds)
    return kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]


def _item(kind: str, question: str, answer: str, box: list[int] | None = None) -> dict[str, Any]:
    return {"type": kind, "question": question, "answer": answer, "box": box}


def _ask_colour(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any] | None:
    refs = [(o, r) for o in objects if (r := _reference(o, objects, REF_COLOUR_Q))]
    if not refs:
        return None
    obj, ref = _pick(rng, refs)
    return _item("colour", Q_COLOUR.format(ref=ref), obj.colour)


def _ask_shape(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any] | None:
    refs = [(o, r) for o in objects if (r := _reference(o, objects, REF_SHAPE_Q))]
    if not refs:
        return None
    obj, ref = _pick(rng, refs)
    return _item("shape", Q_SHAPE.format(ref=ref), obj.shape)


def _ask_count(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any]:
    """Pick the answer uniformly among the counts this scene can produce, then a question giving it."""
    by_answer: dict[int, list[str]] = {len(objects): [Q_COUNT_ALL]}
    for s in SHAPES:
        by_answer.setdefault(sum(o.shape == s for o in objects), []).append(Q_COUNT_SHAPE.format(plural=PLURALS[s]))
    for c in COLOURS:
        by_answer.setdefault(sum(o.colour == c for o in objects), []).append(Q_COUNT_COLOUR.format(colour=c))
    answer = _pick(rng, sorted(by_answer))
    return _item("count", _pick(rng, by_answer[answer]), str(answer))


def _ask_exists(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any]:
    """Yes/no with probability 1/2; a "no" names an absent pair sharing a colour or shape with the scene."""
    present = [(o.colour, o.shape) for o in objects]
    if rng.random() < 0.5:
        colour, shape = _pick(rng, present)
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = _pick(rng, near or absent)
    article = "an" if colour[0] in "aeiou" else "a"
    answer = "yes" if (colour, shape) in present else "no"
    return _item("exists", Q_EXISTS.format(article=article, colour=colour, shape=shape), answer)


def _ask_relpos(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any] | None:
    """Left/right for two objects in different columns, above/below for different rows."""
    named = [(o, r) for o in objects if (r := _reference(o, objects, REF_FULL))]
    pairs = [(a, b) for i, a in enumerate(named) for b in named[i + 1:]]
    by_axis = {axis: [(a, b) for a, b in pairs if getattr(a[0], axis) != getattr(b[0], axis)] for axis in ("col", "row")}
    axes = [(axis, axis_pairs) for axis, axis_pairs in by_axis.items() if axis_pairs]
    if not axes:
        return None
    axis, axis_pairs = _pick(rng, axes)
    (a, ra), (b, rb) = _pick(rng, axis_pairs)[:: 1 if rng.random() < 0.5 else -1]
    if axis == "col":
        return _item("relpos", Q_LEFT_RIGHT.format(a=ra, b=rb), "left" if a.col < b.col else "right")
    return _item("relpos", Q_ABOVE_BELOW.format(a=ra, b=rb), "above" if a.row < b.row else "below")


def _ask_grounding(objects: list[_Object], rng: np.random.Generator) -> dict[str, Any] | None:
    refs = [(o, r) for o in objects if (r := _reference(o, objects, REF_FULL))]
    if not refs:
        return None
    obj, ref = _pick(rng, refs)
    return _item(GROUNDING_TYPE, Q_WHERE.format(ref=ref), box_text(obj.box), list(obj.box))


_ASK: dict[str, Callable[[list[_Object], np.random.Generator], dict[str, Any] | None]] = {
    "colour": _ask_colour, "shape": _ask_shape, "count": _ask_count, "exists": _ask_exists,
    "relpos": _ask_relpos, GROUNDING_TYPE: _ask_grounding,
}


def scene_text(objects: Iterable[Mapping[str, Any]]) -> str:
    """A scene in words of the closed vocabulary: ``size colour shape row column`` per object (a sample's
    ``objects``, cells counted from the top left), comma-separated -- what a text-only model reads instead
    of the image, e.g. ``"large red square 0 2, small blue circle 3 1"``."""
    return ", ".join(f"{o['size']} {o['colour']} {o['shape']} {o['cell'][0]} {o['cell'][1]}" for o in objects)


def box_text(box: Iterable[int]) -> str:
    """The answer text of a box: ``[x1, y1, x2, y2]``."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _training_items(cfg: ShapesWorldConfig, objects: list[_Object], rng: np.random.Generator) -> list[dict[str, Any]]:
    """``questions_per_image`` distinct items; the grounding count is ``q * f`` rounded stochastically."""
    q = cfg.questions_per_image
    n_ground = int(q * cfg.grounding_fraction + rng.random())
    kinds = [GROUNDING_TYPE] * n_ground + [_pick_kind(rng, cfg, VQA_TYPES) for _ in range(q - n_ground)]
    items: list[dict[str, Any]] = []
    applicable = list(VQA_TYPES)  # count and exists always apply; the others need nameable objects
    for kind in kinds:
        for _ in range(16):  # a duplicate or an inapplicable kind is redrawn from the applicable ones
            item = _ASK[kind](objects, rng)
            if item is None and kind in applicable:
                applicable.remove(kind)
            elif item is not None and all(item["question"] != it["question"] for it in items):
                items.append(item)
                break
            kind = _pick_kind(rng, cfg, applicable)
    # Shuffled: eval asks every question as the first turn (beside the image), so every type
    # must be seen there in training too, not only the grounding turns drawn first above.
    return [items[i] for i in rng.permutation(len(items))]


def _eval_items(objects: list[_Object], rng: np.random.Generator) -> list[dict[str, Any]]:
    """One item of every applicable VQA type, then one grounding item (for val/test samples)."""
    items = [_ASK[kind](objects, rng) for kind in (*VQA_TYPES, GROUNDING_TYPE)]
    return [it for it in items if it is not None]


def first_turn(question: str, image_first: bool) -> str:
    """The first user turn: the image marker before the question, or after it (both LLaVA-valid).

    With the image after the question a causal LLM reads the visual tokens already knowing the
    question, so each visual token can test itself against it.
    """
    return f"<image>\n{question}" if image_first else f"{question}\n<image>"


def _conversation(items: list[dict[str, Any]], image_first: bool = True) -> list[dict[str, str]]:
    turns = []
    for k, item in enumerate(items):
        turns.append({"from": "human", "value": first_turn(item["question"], image_first) if k == 0 else item["question"]})
        turns.append({"from": "gpt", "value": item["answer"]})
    return turns


class ShapesWorldSplit(Sequence[dict[str, Any]]):
    """One split as a random-access sequence of samples, each generated on demand."""

    def __init__(self, cfg: ShapesWorldConfig, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {name!r}")
        self.cfg, self.name, self.split_id = cfg, name, SPLITS.index(name)
        self._len = int(getattr(cfg, f"{name}_images"))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"ShapesWorldSplit indices must be integers, got {type(index).__name__}")
        i = int(index) + (self._len if index < 0 else 0)
        if not 0 <= i < self._len:
            raise IndexError(f"{self.name} split index {index} out of range for {self._len} samples")
        rng = np.random.default_rng([self.cfg.seed, self.split_id, i])
        image, objects = _scene(self.cfg, rng)
        items = _training_items(self.cfg, objects, rng) if self.name == "train" else _eval_items(objects, rng)
        return {"id": f"{self.name}-{i:06d}", "image": image, "conversations": _conversation(items, self.cfg.image_first),
                "items": items, "objects": [o.as_dict() for o in objects]}


class ShapesWorld:
    """The generator: ``split(name)`` samples, the closed vocabulary, and a LLaVA JSON export."""

    def __init__(self, cfg: ShapesWorldConfig) -> None:
        self.cfg = cfg

    def split(self, name: str) -> ShapesWorldSplit:
        return ShapesWorldSplit(self.cfg, name)

    def vocabulary_texts(self) -> list[str]:
        """Every template filled with every word, every answer, and every word both first and after a space."""
        texts = [f"<image>\n{Q_COUNT_ALL}", box_text(range(10)), box_text([1000])]
        for size in SIZES:
            for colour in COLOURS:
                for shape in SHAPES:
                    full = f"{size} {colour} {shape}"
                    texts += [Q_COLOUR.format(ref=f"{size} {shape}"), Q_SHAPE.format(ref=f"{size} {colour} object"),
                              Q_COUNT_SHAPE.format(plural=PLURALS[shape]), Q_COUNT_COLOUR.format(colour=colour),
                              *(Q_EXISTS.format(article=art, colour=colour, shape=shape) for art in ("a", "an")),
                              Q_LEFT_RIGHT.format(a=full, b=full), Q_ABOVE_BELOW.format(a=full, b=full),
                              Q_WHERE.format(ref=full)]
        # every 0-1000 coordinate, so a whole-number tokenizer knows each box value as one token
        answers = [*COLOURS, *SHAPES, *DIRECTIONS, "yes", "no", *(str(n) for n in range(1001))]
        words = sorted({w for t in texts + answers for w in t.replace("?", " ").replace("\n", " ").split()})
        return texts + answers + [" " + " ".join(words), "\n".join(words)]  # each word after a space, and first

    def write_llava(self, split: str, out_dir: str | os.PathLike[str], limit: int | None = None) -> Path:
        """Write ``out_dir/images/<id>.png`` and ``out_dir/<split>.json`` (LLaVA conversation format).

        Every file is written to a temporary name and renamed, so a reader never sees a partial file;
        the JSON, written last, lists only images already in place.
        """
        samples = self.split(split)
        n = len(samples) if limit is None else min(limit, len(samples))
        out, images = Path(out_dir), Path(out_dir) / "images"
        images.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            sample = samples[i]
            rel, png = f"images/{sample['id']}.png", io.BytesIO()
            sample["image"].save(png, format="PNG")
            atomic_write(out / rel, png.getvalue())
            records.append({"id": sample["id"], "image": rel, "conversations": sample["conversations"]})
        return atomic_write(out / f"{split}.json", json.dumps(records, indent=1))


def split_items(samples: Sequence[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """All items of the first ``limit`` samples (all samples when None), in order."""
    n = len(samples) if limit is None else min(limit, len(samples))
    return [item for i in range(n) for item in samples[i]["items"]]


def majority_baseline(train_items: Iterable[dict[str, Any]], test_items: Iterable[dict[str, Any]]) -> float:
    """Accuracy on the test VQA items of answering each question type's most frequent train answer."""
    counts: dict[str, Counter[str]] = {}
    for item in train_items:
        if item["type"] in VQA_TYPES:
            counts.setdefault(item["type"], Counter())[item["answer"]] += 1
    majority = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
    scored = [item["answer"] == majority.get(item["type"]) for item in test_items if item["type"] in VQA_TYPES]
    if not scored:
        raise ValueError("majority_baseline: test_items hold no VQA item")
    return sum(scored) / len(scored)
