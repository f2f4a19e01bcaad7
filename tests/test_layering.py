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


# --- no import circle, inside a package or across packages ------------------------------------------
def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that ``path`` imports when it runs (at module or function level; imports under
    ``if TYPE_CHECKING:`` never run). ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    return {name: _runtime_imports(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_circle() -> None:
    assert not _cycles(_graph(ROOT, OURS)), "import circles (modules importing each other, directly or not)"


def test_the_circle_check_finds_one(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n")
    (tmp_path / "pkg" / "d.py").write_text("import pkg.c\n")
    assert _cycles(_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]
