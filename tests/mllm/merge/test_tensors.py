"""Streaming safetensors I/O: lazy sharded reader, streaming shard writer, atomic output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.merge.tensors import (
    INDEX_FILE,
    MergeError,
    ModelReader,
    ShardWriter,
    TensorSpec,
    copy_side_files,
    ensure_output_free,
    tokenizer_files,
)


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "c": torch.ones(5, 4, dtype=torch.float16),
    "scalar": torch.tensor(3.0),
}


def test_writer_caps_shards_writes_index_and_round_trips(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, _specs(TENSORS), max_shard_bytes=30) as w:
        for n, t in TENSORS.items():
            w.write(n, t)
        files = w.close()
    # a: 24 B; b: 4 B (a+b = 28 <= 30); c: 40 B > cap -> own shard; scalar: 4 B -> a fourth? no: new shard after c
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {"a": files[0], "b": files[0], "c": files[1], "scalar": files[2]}
    assert index["metadata"]["total_size"] == 24 + 4 + 40 + 4
    assert load_file(tmp_path / files[0]).keys() == {"a", "b"}  # the safetensors library reads our files
    reader = ModelReader(tmp_path)
    assert reader.names() == ["a", "b", "c", "scalar"]
    assert reader.shape("c") == (5, 4) and reader.dtype("b") == torch.bfloat16
    for n, t in TENSORS.items():
        assert torch.equal(reader.get(n), t)


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, _specs(TENSORS), max_shard_bytes=10**9) as w:
        for n, t in TENSORS.items():
            w.write(n, t)
        assert w.close() == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], TENSORS["a"])


def test_writer_refuses_out_of_order_wrong_shape_and_missing(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, _specs(TENSORS), 10**9)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("b", TENSORS["b"])
    with pytest.raises(RuntimeError, match=r"got 'a' \(3, 2\) torch.float32, expected \(2, 3\)"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", TENSORS["a"])
    with pytest.raises(RuntimeError, match="3 tensors were never written"):
        w.close()


def test_writer_streams_row_blocks(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, _specs(TENSORS), 10**9) as w:
        w.write("a", iter([TENSORS["a"][:1], TENSORS["a"][1:]]))
        w.write("b", TENSORS["b"])
        w.write("c", (TENSORS["c"][i:i + 2] for i in range(0, 5, 2)))
        w.write("scalar", TENSORS["scalar"])
        w.close()
    reader = ModelReader(tmp_path)
    assert all(torch.equal(reader.get(n), t) for n, t in TENSORS.items())
    assert torch.equal(reader.get("c", (1, 3)), TENSORS["c"][1:3])  # row slices read back too
    w = ShardWriter(tmp_path / "x", _specs(TENSORS), 10**9)
    (tmp_path / "x").mkdir()
    with pytest.raises(RuntimeError, match="got 1 rows"):
        w.write("a", [TENSORS["a"][:1]])


def test_reader_errors_name_the_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="model folder not found"):
        ModelReader(tmp_path / "nope")
    with pytest.raises(MergeError, match="no model.safetensors"):
        ModelReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(MergeError, match="does not exist"):
        ModelReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(MergeError, match="malformed index"):
        ModelReader(tmp_path)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, bytes(12), r"'w': data_offsets \[0, 12\] do not fit"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "lie outside the file"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "'w': unsupported dtype"),
    (["w"], b"", "not a JSON object"),
])
def test_reader_checks_every_header_entry_it_reads_by(tmp_path: Path, header, data: bytes, message: str) -> None:
    _raw_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(MergeError, match=message):
        ModelReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 12)  # a header length past the end of the file
    with pytest.raises(MergeError, match="not a safetensors file"):
        ModelReader(tmp_path)


def test_reads_copy_bytes_without_mapping_the_file(tmp_path: Path) -> None:
    """A memory-mapped input's touched pages would count in the merge's RSS: reads go into fresh buffers."""
    with ShardWriter(tmp_path, _specs(TENSORS), 10**9) as w:
        for n, t in TENSORS.items():
            w.write(n, t)
        w.close()
    reader = ModelReader(tmp_path)
    held = [reader.get("c"), reader.get("c", (1, 3)), reader.get("scalar")]
    assert torch.equal(held[1], TENSORS["c"][1:3]) and torch.equal(held[2], TENSORS["scalar"])
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert str(tmp_path / "model.safetensors") not in maps.read_text()


def test_reader_reads_save_pretrained_sharded_checkpoints(tmp_path: Path, ckpt) -> None:
    path = ckpt.save_llama(tmp_path / "m", max_shard_size="20KB")
    assert (path / INDEX_FILE).is_file()
    reader = ModelReader(path)
    assert len({reader.file_of(n) for n in reader.names()}) > 1
    state = ckpt.state_of(path)
    assert "model.layers.3.mlp.down_proj.weight" in state and len(state) == 2 + 1 + 9 * ckpt.num_layers


def test_ensure_output_free_refuses_an_existing_folder_unless_overwrite(tmp_path: Path) -> None:
    # the atomic build itself is common.atomic.atomic_folder's (tests/common/test_atomic.py)
    out = tmp_path / "merged"
    ensure_output_free(out, overwrite=False)  # absent: fine
    out.mkdir()
    with pytest.raises(MergeError, match="already exists"):
        ensure_output_free(out, overwrite=False)
    ensure_output_free(out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeError, match="not a folder"):
        ensure_output_free(tmp_path / "file", overwrite=True)


def test_side_files_and_tokenizer_source(tmp_path: Path) -> None:
    ref, tok, out = tmp_path / "ref", tmp_path / "tok", tmp_path / "out"
    for d in (ref, tok, out):
        d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "model.safetensors", "README.md"):
        (ref / name).write_text("ref")
    (ref / "llm").mkdir()  # an MLLM folder: llm/config.json comes along, weights never do
    (ref / "llm" / "config.json").write_text("llm")
    (ref / "llm" / "extra.safetensors").write_text("w")
    (tok / "tokenizer.json").write_text("tok")
    copy_side_files(ref, out, tokenizer_src=tok)
    # the reference's tokenizer files are not mixed in (no stale tokenizer.model), weights/card skipped
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "llm", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == "tok"
    assert [p.name for p in (out / "llm").iterdir()] == ["config.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match="no tokenizer files"):
        tokenizer_files(empty)
