"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression comprehension: Acc@0.5 on boxes read from text.

Files: the common exports, one record per referred object — ``.json`` (a list), ``.jsonl`` or
``.parquet`` (never a pickle) — with a referring expression (``expression_key``: a string, or a list
of strings that each become a sample), a COCO box (``bbox_key``, ``[x, y, w, h]`` pixels, or
``xyxy``), an image (``image_key``: a file name under ``images``, or embedded bytes as parquet
exports store them) and optionally ``width``/``height``, ``split`` and an id.

The model's box is parsed in ``convention`` (0-1000 integers, the house format; 0-1 floats as
LLaVA-1.5; pixels) relative to the image it saw — with ``square_pad`` the image padded to a centred
square as LLaVA-1.5's "pad" preprocessing does — and mapped back to the original image's pixels. A hit
is IoU >= 0.5 against the ground-truth box (:func:`eval.metrics.grounding_hit`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from eval.metrics import box_iou, grounding_hit, parse_box, xywh_to_xyxy
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    image_file,
    mean_score,
    per_type,
    read_json,
    read_jsonl,
)
from eval.tasks.hub_copies import lmms_eval_entry

REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {question}"


@dataclass
class RefCOCOConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n" + REC_PROMPT  # LLaVA-1.5's REC instruction
    convention: Literal["0-1000", "0-1", "pixels"] = "0-1000"
    square_pad: bool = False  # boxes refer to the image padded to a centred square (LLaVA-1.5: true)
    split: str | None = None  # keep the records whose "split" field equals this; None = all
    expression_key: str = "sent"
    image_key: str = "file_name"
    bbox_key: str = "bbox"
    bbox_format: Literal["xywh", "xyxy"] = "xywh"
    id_key: str | None = None  # None = the record's position in the file


def read_rows(path: Path) -> list[Any]:
    """Records of a .json (list), .jsonl or .parquet export."""
    if path.suffix == ".parquet":
        if not path.is_file():
            raise EvalDataError(f"{path}: file not found")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise EvalDataError(f"{path}: expected a JSON list of records")
    return rows


class RefCOCOTask(FileTask[RefCOCOConfig]):
    config_cls = RefCOCOConfig
    name = "refcoco"
    prompt_version = "llava-1.5"

    @cached_property
    def _folder(self) -> Path:
        """The image folder, looked up only when a record names an image file (not embedded bytes)."""
        return self.image_folder(Path(self.cfg.data).parent)

    def _image(self, row: Mapping[str, Any], where: str) -> Path | bytes:
        value = row.get(self.cfg.image_key)
        if isinstance(value, Mapping) and isinstance(value.get("bytes"), bytes):
            return value["bytes"]
        if isinstance(value, bytes):
            return value
        return image_file(self._folder, field_of(row, self.cfg.image_key, str, where), where)

    def _size(self, row: Mapping[str, Any], image: Path | bytes, where: str) -> list[int]:
        if "width" in row and "height" in row:
            return [field_of(row, "width", int, where), field_of(row, "height", int, where)]
        try:  # reads the header only
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
                return list(img.size)
        except OSError as err:
            raise EvalDataError(f"{where}: cannot read the image size: {err}") from err

    def samples(self) -> Iterator[EvalSample]:
        cfg, path = self.cfg, Path(self.cfg.data)
        for i, row in enumerate(read_rows(path)):
            where = f"{path}: record {i}"
            split = field_of(row, "split", str, where) if cfg.split is not None else "all"
            if cfg.split is not None and split != cfg.split:
                continue
            box = field_of(row, cfg.bbox_key, list, where)
            if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
                raise EvalDataError(f"{where}: field {cfg.bbox_key!r} should be 4 numbers, got {box!r}")
            gt = list(xywh_to_xyxy(box)) if cfg.bbox_format == "xywh" else [float(v) for v in box]
            expressions = field_of(row, cfg.expression_key, (str, list), where)
            if isinstance(expressions, str):
                expressions = [expressions]
            rid = str(field_of(row, cfg.id_key, (int, str), where)) if cfg.id_key else str(i)
            image = self._image(row, where)
            size = self._size(row, image, where)
            for k, text in enumerate(expressions):
                if not isinstance(text, str):
                    raise EvalDataError(f"{where}: field {cfg.expression_key!r}[{k}] should be str, got {text!r}")
                sid = rid if len(expressions) == 1 else f"{rid}-{k}"
                yield EvalSample(sid, image, text, gt, split, {"image_size": size})

    def parse(self, sample: EvalSample, text: str) -> Any:
        """The box in original-image pixels (None when the text holds none)."""
        w, h = sample.meta["image_size"]
        side = max(w, h)
        frame = (side, side) if self.cfg.square_pad else (w, h)
        box = parse_box(text, self.cfg.convention, frame)
        if box is None:
            return None
        # LLaVA's expand2square pastes the image at ((side - w) // 2, (side - h) // 2).
        dx, dy = ((side - w) // 2, (side - h) // 2) if self.cfg.square_pad else (0, 0)
        return [box[0] - dx, box[1] - dy, box[2] - dx, box[3] - dy]

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return grounding_hit(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        ious = [box_iou(r["parsed"], r["reference"]) if r["parsed"] else 0.0 for r in records]
        accuracy, mean_iou = mean_score(records), sum(ious) / len(ious)
        # lmms-eval's REC tasks are one per split (refcoco_bbox_rec_val, ...); all splits at once have no match.
        task = f"{self.name}_bbox_rec_{self.cfg.split}"
        entries = [lmms_eval_entry(task, "refcoco_ACC@0.5", accuracy), lmms_eval_entry(task, "refcoco_IoU", mean_iou)]
        return {
            "accuracy": accuracy, "mean_iou": mean_iou, **per_type(records), "n": len(records),
            "lmms_eval": entries if self.cfg.split is not None else [],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "coordinate_convention": self.cfg.convention, "square_pad": self.cfg.square_pad,
            "iou_threshold": 0.5, "gt_box_format": self.cfg.bbox_format, "split": self.cfg.split,
        }


class RefCOCOPlusTask(RefCOCOTask):
    name = "refcoco+"


class RefCOCOgTask(RefCOCOTask):
    name = "refcocog"
