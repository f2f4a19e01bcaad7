"""``--device`` / ``--dtype`` on ``mllm eval``, ``probe`` and ``chat``: checked by argparse before any load (one
line, exit 2), passed to ``MLLM.from_pretrained``, and recorded in the eval's ``protocol.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm import cli, run
from mllm.model import MLLM

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.tokenizer_numbers=digits",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.train_images=8", "data.test_images=3",
    "data.val_images=3", "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4",
]


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("argv", [
    ["eval", "NOPE", "--out", "o"],
    ["probe", "NOPE", "--out", "o"],
    ["chat", "NOPE", "what?", "--image", "x.png"],
])
@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--dtype", "float33", "expected one of float32, bfloat16, float16, float64 or auto, got 'float33'"),
    ("--dtype", "int8", "expected one of float32, bfloat16, float16, float64 or auto, got 'int8'"),
    ("--device", "gpu0", "expected a torch device such as cpu, cuda or cuda:1, got 'gpu0'"),
])
def test_bad_device_or_dtype_is_one_line_before_loading(argv: list[str], flag: str, value: str, expected: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, flag, value])
    assert exit_.value.code == 2  # the checkpoint NOPE does not exist: the flag is refused first
    assert _last_line(capsys.readouterr().err) == f"mllm {argv[0]}: error: argument {flag}: {expected}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run.train("tiny", out, SMALL, evaluate=False)
    return out / "model"


def test_eval_loads_as_asked_and_records_it(checkpoint: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    load = MLLM.from_pretrained.__func__

    def spy(cls: type, path: object, device: object = None, dtype: object = None, device_map: object = None) -> MLLM:
        asked.append((device, dtype))
        return load(cls, path, device=device, dtype=dtype, device_map=device_map)

    monkeypatch.setattr(MLLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "e"
    argv = ["eval", str(checkpoint), "--out", str(out), "--limit", "2", "--device", "cpu", "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    assert asked == [("cpu", "bfloat16")]
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["device"] == "cpu" and protocol["dtype"] == "bfloat16"
    assert json.loads((out / "metrics.json").read_text())["protocol"]["dtype"] == "bfloat16"
    # resuming under another dtype is refused, naming it; the same placement resumes
    assert cli.main([*argv[:-1], "float32", "--resume"]) == 2
    assert cli.main([*argv, "--resume"]) == 0


def test_eval_defaults_record_the_checkpoints_dtype(checkpoint: Path, tmp_path: Path) -> None:
    assert cli.main(["eval", str(checkpoint), "--out", str(tmp_path / "e"), "--limit", "1"]) == 0
    protocol = json.loads((tmp_path / "e" / "protocol.json").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert protocol["device"] == expected and protocol["dtype"] == "float32"


def test_probe_takes_device_and_dtype(checkpoint: Path, tmp_path: Path) -> None:
    argv = ["probe", str(checkpoint), "--out", str(tmp_path / "p"), "--limit", "2", "--batch-size", "2",
            "--device", "cpu", "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert doc["num_samples"] == 2 and len(doc["visual_share"]) == 1
