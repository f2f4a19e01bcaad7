"""The dependency direction (README, "Layout"), checked on the source: every import of ours points down a floor.

Function-level imports count too (heavy back-ends are imported lazily, our own modules must still
respect the floors).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mllm", "encoders", "projectors", "train", "eval", "common")
# package (or sub-package) -> top-level packages of ours it must never import
FORBIDDEN = {
    "common": {"mllm", "train", "eval", "encoders", "projectors"},  # floor 0: imports nothing of ours
    "encoders": {"mllm", "train", "eval", "projectors"},
    "projectors": {"mllm", "train", "eval", "encoders"},
    "train": {"mllm", "eval"},
    "eval": {"mllm"},
    "mllm/merge": {"train"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in OURS]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_the_floors(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}: no sources found"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not bad, "imports against the dependency floors:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from mllm.model import MLLM\n    import train.trainer\n")
    assert _imports(source) == [(4, "mllm.model"), (5, "train.trainer")]
