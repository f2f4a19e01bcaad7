"""Writers of the local Hugging Face dataset layouts (parquet shards, ``save_to_disk``) for task tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> bytes:
    """A tiny PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(data: bytes) -> dict[str, Any]:
    """An ``Image`` column value as the hub's parquet files store it."""
    return {"bytes": data, "path": None}


def write_parquet(rows: list[dict[str, Any]], folder: Path, split: str, shards: int = 1) -> Path:
    """``rows`` as ``folder/data/<split>-0000k-of-0000n.parquet`` (hub snapshot naming); returns ``folder/data``."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // shards)
    for k in range(shards):
        table = pa.Table.from_pylist(rows[k * step:(k + 1) * step])
        pq.write_table(table, data / f"{split}-{k:05d}-of-{shards:05d}.parquet")
    return data


def save_to_disk(rows: list[dict[str, Any]], folder: Path, image_columns: tuple[str, ...] = ("image",)) -> Path:
    """``rows`` as ``datasets.Dataset.save_to_disk`` writes them, image columns typed ``Image``."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    for column in image_columns:
        ds = ds.cast_column(column, datasets.Image())
    ds.save_to_disk(str(folder))
    return folder


def sample_view(task: Any) -> list[tuple[Any, ...]]:
    """What a task hands the runner, images decoded: equal views mean equal samples in equal order."""
    return [(s.id, task.build_prompt(s), s.reference, s.type, s.meta, s.load_image().tobytes()) for s in task.samples()]
