"""Every registered part has a hand-computed test of its own (one file per part, one test beside it).

The rule, checked on the test sources with ``ast`` (no test is run here), for every name in every
``Registry`` table of ``mllm/registry.py``:

1. **Where.** The part's class lives in module ``a.b.c`` (e.g. ``encoders.fusion.comm``); its test is
   in a test file under the mirrored folder ``tests/a/b/`` or one of its ancestors down to
   ``tests/a/`` (so ``tests/encoders/fusion/``, ``tests/encoders/``), never in ``tests/`` itself.
2. **Its own.** A test function (``def test_*``, its decorators included) of that file names the part:
   its class name as an identifier, or its registry key as a string literal -- in the function, or in
   a module-level constant or helper function the function uses (``XATTN = {"name": "gated_xattn",
   ...}``, ``def _convgate(): return ConvGateFusion(...)``). A test parametrised over ``REG.names()``
   names no part and does not count.
3. **Hand-computed.** That same function asserts against a number written by hand: an ``assert``
   statement, or a call of ``assert_close`` / ``allclose`` / ``equal`` / ``approx`` / ``isclose`` /
   ``array_equal``, contains a numeric literal other than 0 and 1 -- directly, or through a local
   variable the function assigned from an expression containing one. (0 and 1 are left out: "no
   NaN", "sums to one" and "is empty" are invariants, not values someone computed.)

A part with no such test fails here with the rule it broke; write the test rather than loosening this.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import mllm.registry as registry_module
from mllm.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
ASSERT_CALLS = {"assert_close", "allclose", "equal", "approx", "isclose", "array_equal", "assert_allclose"}
TABLES = {name: reg for name, reg in vars(registry_module).items() if isinstance(reg, Registry)}
PARTS = [(table, key) for table, reg in sorted(TABLES.items()) for key in reg.names()]


def _numbers(node: ast.AST) -> bool:
    """Whether ``node`` holds a numeric literal other than 0 and 1 (booleans are not numbers here)."""
    return any(isinstance(n, ast.Constant) and type(n.value) in (int, float) and n.value not in (0, 1)
               for n in ast.walk(node))


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _hand_computed(fn: ast.FunctionDef) -> bool:
    local = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and _numbers(n.value)
             for t in ast.walk(n) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
    checks = [n.test for n in ast.walk(fn) if isinstance(n, ast.Assert)]
    checks += [n for n in ast.walk(fn) if isinstance(n, ast.Call) and _call_name(n) in ASSERT_CALLS]
    return any(_numbers(c) or any(isinstance(n, ast.Name) and n.id in local for n in ast.walk(c)) for c in checks)


def _mentions(node: ast.AST, key: str, cls_name: str) -> bool:
    return any((isinstance(n, ast.Constant) and n.value == key) or (isinstance(n, ast.Name) and n.id == cls_name)
               or (isinstance(n, ast.Attribute) and n.attr == cls_name) for n in ast.walk(node))


@cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _own_tests(path: Path, key: str, cls_name: str) -> list[tuple[str, bool]]:
    """(test name, hand-computed?) of every test function in ``path`` that names the part."""
    tree = _parsed(path)
    constants = {t.id for n in tree.body if isinstance(n, ast.Assign) and _mentions(n.value, key, cls_name)
                 for t in n.targets if isinstance(t, ast.Name)}
    constants |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")
                  and _mentions(n, key, cls_name)}  # helpers that build the part
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
            uses = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            if _mentions(fn, key, cls_name) or uses & constants:
                found.append((fn.name, _hand_computed(fn)))
    return found


def _mirrored_test_files(module: str) -> list[Path]:
    package = module.split(".")[:-1]
    folders = [TESTS.joinpath(*package[:i]) for i in range(len(package), 0, -1)]
    return [f for folder in folders for f in sorted(folder.glob("test_*.py"))]


@pytest.mark.parametrize(("table", "key"), PARTS, ids=[f"{t}:{k}" for t, k in PARTS])
def test_every_registered_part_has_a_hand_computed_test_of_its_own(table: str, key: str) -> None:
    cls = TABLES[table].get(key)
    files = _mirrored_test_files(cls.__module__)
    assert files, f"{table}[{key!r}] ({cls.__module__}): no test file under tests/{cls.__module__.split('.')[0]}/"
    named = {f"{f.relative_to(ROOT)}::{name}": hand for f in files for name, hand in _own_tests(f, key, cls.__name__)}
    assert named, (f"{table}[{key!r}]: no test function names {cls.__name__} or {key!r} in "
                   f"{sorted({str(f.parent.relative_to(ROOT)) for f in files})}")
    assert any(named.values()), (f"{table}[{key!r}]: the tests naming it ({', '.join(sorted(named))}) assert "
                                 "against no hand-written number other than 0 and 1")


def test_the_tables_are_the_ones_the_house_names() -> None:
    assert {"ENCODERS", "ENCODER_FUSIONS", "PROJECTORS", "INJECTORS", "MERGE_METHODS", "EVAL_TASKS"} <= set(TABLES)


def test_the_rule_on_hand_written_sources(tmp_path: Path) -> None:
    src = tmp_path / "test_x.py"
    src.write_text(
        'CFG = {"name": "thing"}\n\n'
        "def test_value():\n    out = Thing()(2)\n    want = [4.5]\n    assert out == want\n\n"
        "def test_shape_only():\n    assert Thing()(CFG) is not None\n\n"
        "def test_other():\n    assert Other()(3) == 6\n\n"
        "def _make():\n    return Thing()\n\n"
        "def test_helper():\n    assert _make()(1) == 2\n\n"
        "@pytest.mark.parametrize('k', ['thing'])\ndef test_param(k):\n    assert torch.allclose(f(k), T([0.5]))\n"
    )
    assert _own_tests(src, "thing", "Thing") == [
        ("test_value", True), ("test_shape_only", False), ("test_helper", True), ("test_param", True)]
