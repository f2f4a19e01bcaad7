"""LLaVA data: JSON / JSONL read unchanged, images under a root (escapes refused), bad images skipped
or fatal, text-only samples, and the same samples from ``datasets`` (disk, parquet, streamed JSON)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from train.data.collate import Collator
from train.data.llava import (
    DataError,
    LlavaDataConfig,
    LlavaDataset,
    LlavaStream,
    load_llava,
    read_llava_json,
)

RECORDS = [
    {"id": "s1", "image": "a.png",
     "conversations": [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]},
    {"id": "s2",
     "conversations": [{"from": "human", "value": "how many?"}, {"from": "gpt", "value": "2"}]},
    {"id": "s3", "image": "sub/b.png",
     "conversations": [{"from": "human", "value": "what colour?\n<image>"}, {"from": "gpt", "value": "blue"},
                       {"from": "human", "value": "is the square left?"}, {"from": "gpt", "value": "yes"}]},
]
COLOURS = {"a.png": (255, 0, 0), "sub/b.png": (0, 0, 255)}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    for name, colour in COLOURS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), colour).save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path


def _check_samples(samples: list[Any]) -> None:
    assert [s["id"] for s in samples] == ["s1", "s2", "s3"]
    assert [s["conversations"] for s in samples] == [r["conversations"] for r in RECORDS]
    assert samples[0]["image"].size == (6, 4) and samples[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert samples[1]["image"] is None
    assert samples[2]["image"].getpixel((5, 3)) == (0, 0, 255)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_llava_json_and_jsonl_read_unchanged(root: Path, name: str) -> None:
    assert read_llava_json(root / name) == RECORDS
    data = load_llava(LlavaDataConfig(path=str(root / name)))
    assert isinstance(data, LlavaDataset) and len(data) == 3
    _check_samples([data[i] for i in range(3)])
    assert data.lengths(image_tokens=10) == [6 + 1 + 10, 2 + 1, 3 + 1 + 4 + 1 + 10]  # words (+ image)
    assert load_llava(LlavaDataConfig(path=str(root / name), limit=2)).records == RECORDS[:2]


def test_image_root_is_separate_from_the_data_file(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("json") / "train.json"
    elsewhere.write_text(json.dumps(RECORDS))
    data = load_llava(LlavaDataConfig(path=str(elsewhere), image_root=str(root)))
    _check_samples([data[i] for i in range(3)])


@pytest.mark.parametrize("bad", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused_at_load(root: Path, bad: str) -> None:
    records = [*RECORDS, {"id": "evil", "image": bad, "conversations": RECORDS[0]["conversations"]}]
    (root / "evil.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"evil.json: record 3 \(id evil\): image path .* (leaves the image root|is absolute)"):
        load_llava(LlavaDataConfig(path=str(root / "evil.json")))


BAD_TURNS = {  # turns of record 1 -> what follows "record 1 (id x): "
    "system": ([{"from": "system", "value": "be brief"}, *RECORDS[1]["conversations"]],
               "turn 0: role 'system'; expected 'human' or 'gpt' (no other role is trained)"),
    "order": ([{"from": "gpt", "value": "2"}, {"from": "human", "value": "how many?"}],
              "turn 0: role 'gpt' out of order; expected alternating 'human', 'gpt' turns starting with 'human'"),
    "unanswered": (RECORDS[1]["conversations"][:1], "1 turns; expected pairs of 'human', 'gpt' turns"),
}


@pytest.mark.parametrize("case", sorted(BAD_TURNS))
def test_bad_roles_are_refused_before_training_naming_file_record_and_role(root: Path, case: str) -> None:
    turns, message = BAD_TURNS[case]
    path = root / "bad.json"
    path.write_text(json.dumps([RECORDS[0], {"id": "x", "conversations": turns}]))
    with pytest.raises(DataError) as err:
        load_llava(LlavaDataConfig(path=str(path)))
    assert str(err.value) == f"{path}: record 1 (id x): {message}"


def test_bad_records_name_the_record(root: Path) -> None:
    (root / "bad.json").write_text(json.dumps([RECORDS[0], {"id": "x", "conversation": []}]))
    with pytest.raises(DataError, match=r"bad.json: record 1 \(id x\): expected a 'conversations'"):
        load_llava(LlavaDataConfig(path=str(root / "bad.json")))
    (root / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="bad.jsonl: line 2: malformed JSON"):
        load_llava(LlavaDataConfig(path=str(root / "bad.jsonl")))
    with pytest.raises(DataError, match="data file not found"):
        load_llava(LlavaDataConfig(path=str(root / "nope.json")))


def test_bad_images_are_skipped_and_counted_or_fatal(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    conv = RECORDS[0]["conversations"]
    records = [RECORDS[0], *({"id": n, "image": f"{n}.png", "conversations": conv} for n in ("missing", "corrupt", "truncated"))]
    (root / "mixed.json").write_text(json.dumps(records))
    data = load_llava(LlavaDataConfig(path=str(root / "mixed.json")))
    with caplog.at_level(logging.WARNING, logger="mllm.data"):
        samples = [data[i] for i in range(4)]
    assert samples[0] is not None and samples[1:] == [None, None, None]
    assert data.skipped == 3
    for name in ("missing.png", "corrupt.png", "truncated.png"):
        assert str(root / name) in caplog.text
    collate = Collator(_tokenizer(), "plain", "<image>", 2, lambda im: torch.zeros(3, 2, 2), 64)
    batch = collate(samples[:2])
    assert batch["input_ids"].shape[0] == 1 and collate.skipped == 1
    strict = load_llava(LlavaDataConfig(path=str(root / "mixed.json"), bad_images="error"))
    with pytest.raises(DataError, match=rf"record 2 \(id corrupt\): image {root / 'corrupt.png'}"):
        strict[2]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "USER ASSISTANT : what colour is the circle square ? red blue how many 2 yes left".split()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=["<image>"])


def test_text_only_rows_mix_with_image_rows(root: Path) -> None:
    data = load_llava(LlavaDataConfig(path=str(root / "data.json")))

    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.tensor(image.getpixel((0, 0)), dtype=torch.float).view(3, 1, 1)

    collate = Collator(_tokenizer(), "plain", "<image>", 2, preprocess, 64)
    batch = collate([data[0], data[1], data[2]])
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]  # rows 0 and 2, in order
    image_id = 4
    assert ((batch["input_ids"] == image_id).sum(1)).tolist() == [2, 0, 2]
    only_text = collate([data[1]])
    assert "pixel_values" not in only_text and only_text["has_image"].tolist() == [False]


def test_datasets_sources_give_the_same_samples(root: Path) -> None:
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    table.save_to_disk(str(root / "disk"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(root / "disk_dict"))
    table.to_parquet(str(root / "data.parquet"))
    for cfg in (LlavaDataConfig(path=str(root / "disk"), image_root=str(root)),
                LlavaDataConfig(path=str(root / "disk_dict"), image_root=str(root)),
                LlavaDataConfig(path=str(root / "data.parquet"))):
        data = load_llava(cfg)
        assert isinstance(data, LlavaDataset)
        _check_samples([data[i] for i in range(3)])
        assert data.lengths(10) == [17, 3, 19]
    stream = load_llava(LlavaDataConfig(path=str(root / "data.jsonl"), streaming=True))
    assert isinstance(stream, LlavaStream)
    _check_samples(list(stream))
    with pytest.raises(DataError, match="no split 'val'; it has train"):
        load_llava(LlavaDataConfig(path=str(root / "disk_dict"), split="val"))


def test_datasets_with_embedded_images_and_chat_messages(root: Path) -> None:
    import datasets

    rows = {
        "image": [Image.new("RGB", (3, 3), (0, 255, 0)), None],
        "messages": [[{"role": "user", "content": "<image>\nwhat colour?"}, {"role": "assistant", "content": "red"}],
                     [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "2"}]],
    }
    features = datasets.Features({"image": datasets.Image(),
                                  "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "embedded"))
    data = load_llava(LlavaDataConfig(path=str(root / "embedded")))
    first, second = data[0], data[1]
    assert first["id"] == "0" and first["image"].getpixel((1, 1)) == (0, 255, 0)
    assert first["conversations"] == [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
    assert second["image"] is None
    assert data.lengths(5) == [4 + 5, 3]


def test_config_checks() -> None:
    with pytest.raises(DataError, match="bad_images: expected skip or error"):
        LlavaDataConfig(path="x.json", bad_images="ignore")
    with pytest.raises(DataError, match="streaming: source llava_json is read whole"):
        LlavaDataConfig(path="x.json", source="llava_json", streaming=True)
    with pytest.raises(DataError, match="cannot tell the format"):
        load_llava(LlavaDataConfig(path="x.csv"))
