"""LiNeS' automatic multi-task alpha (Wang et al., ICLR 2025, arXiv 2410.17146) on a hand-built three-tensor model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mllm.merge import MergeError, run_merge
from mllm.merge.methods.lines import ALPHA_JSON

T = torch.tensor
L0, L1, NORM = "model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight"
BASE = {L0: torch.ones(2, 2), L1: torch.ones(2, 2), NORM: torch.ones(2)}
TAU = {  # task vectors of the two experts
    "a": {L0: T([[1.0, -2.0], [0.0, 3.0]]), L1: T([[-1.0, 1.0], [0.5, 0.0]]), NORM: T([0.5, 1.0])},
    "b": {L0: T([[3.0, 1.0], [2.0, -1.0]]), L1: T([[-1.0, 1.0], [-1.5, 0.0]]), NORM: T([-1.5, 1.0])},
}
# ||tau_a + tau_b||_1: L0 |[[4, -1], [2, 2]]| = 9, L1 |[[-2, 2], [-1, 0]]| = 5, norm |[-1, 2]| = 3 -> 17
L1_SUM = 17.0


def _folder(path: Path, state: dict[str, torch.Tensor]) -> str:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(path)


def _merge(tmp_path: Path, ckpt, parameters: dict, name: str = "out") -> tuple[dict[str, torch.Tensor], Path]:
    root = tmp_path / f"models_{name}"
    root.mkdir()
    base = _folder(root / "base", BASE)
    experts = [_folder(root / m, {k: BASE[k] + TAU[m][k] for k in BASE}) for m in ("a", "b")]
    cfg = {"merge_method": "lines", "base_model": base, "models": [{"model": e} for e in experts],
           "parameters": parameters, "dtype": "float32"}
    out = run_merge(ckpt.write_yaml(root / "m.yaml", cfg), tmp_path / name)
    return ckpt.state_of(out), out


def _expected(alpha: float, beta: float, tau_mtl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta_0 + lambda(l) tau_MTL with L = 2 blocks: lambda(0) = alpha, lambda(1) = alpha + beta."""
    scale = {L0: alpha, L1: alpha + beta, NORM: alpha}
    return {k: BASE[k] + scale[k] * tau_mtl[k] for k in BASE}


@pytest.mark.parametrize("block_elems", [None, 2])
def test_auto_alpha_with_sign_consensus(tmp_path: Path, ckpt, monkeypatch, block_elems: int | None) -> None:
    from mllm.merge import engine

    if block_elems is not None:  # one row per block: the norms are summed over blocks
        monkeypatch.setattr(engine, "BLOCK_ELEMS", block_elems)
    # elected signs (0 counts as +) keep: L0 [[a+b, a], [b, a]] = [[4, -2], [2, 3]] (L1 norm 11);
    # L1 [[a+b, a+b], [b, -]] = [[-2, 2], [-1.5, 0]] (5.5); norm [b, a+b] = [-1.5, 2] (3.5) -> 20
    tau_mtl = {L0: T([[4.0, -2.0], [2.0, 3.0]]), L1: T([[-2.0, 2.0], [-1.5, 0.0]]), NORM: T([-1.5, 2.0])}
    alpha = L1_SUM / 20.0 / 2  # = 0.425
    merged, out = _merge(tmp_path, ckpt, {"alpha": "auto", "beta": 0.5, "consensus": True})
    for k, want in _expected(alpha, 0.5, tau_mtl).items():
        assert torch.allclose(merged[k], want, atol=1e-6), k
    doc = json.loads((out / ALPHA_JSON).read_text())
    assert doc["alpha"] == pytest.approx(0.425)
    assert doc["l1_mean_task_vector"] == pytest.approx(8.5) and doc["l1_merged_task_vector"] == pytest.approx(20.0)
    assert [r["scale"] for r in doc["layers"]] == pytest.approx([0.425, 0.925])


@pytest.mark.parametrize("block_elems", [None, 2])
def test_auto_alpha_uses_whole_tensor_trim_thresholds(tmp_path: Path, ckpt, monkeypatch, block_elems: int | None) -> None:
    """TIES trim per tensor (density 0.5: keep |tau| >= the k-th largest, ties kept). With one row per
    block the statistics pass must still use the whole tensor's threshold: trimming L1's tau_a row by
    row would keep its 0.5."""
    from mllm.merge import engine

    if block_elems is not None:
        monkeypatch.setattr(engine, "BLOCK_ELEMS", block_elems)
    # L0: a keeps |.| >= 2 -> [[0, -2], [0, 3]], b keeps >= 2 -> [[3, 0], [2, 0]]; sum [[3, -2], [2, 3]] (10)
    # L1: a keeps >= 1 -> [[-1, 1], [0, 0]], b keeps >= 1 -> [[-1, 1], [-1.5, 0]]; sum [[-2, 2], [-1.5, 0]] (5.5)
    # norm (k = 1): a keeps 1 -> [0, 1], b keeps 1.5 -> [-1.5, 0]; sum [-1.5, 1] (2.5)         -> 18
    tau_mtl = {L0: T([[3.0, -2.0], [2.0, 3.0]]), L1: T([[-2.0, 2.0], [-1.5, 0.0]]), NORM: T([-1.5, 1.0])}
    alpha = L1_SUM / 18.0 / 2
    params = {"alpha": "auto", "beta": 0.25, "sparsifier": "magnitude"}
    merged, out = _merge(tmp_path, ckpt, {**params, "density": 0.5})
    for k, want in _expected(alpha, 0.25, tau_mtl).items():
        assert torch.allclose(merged[k], want, atol=1e-6), k
    assert json.loads((out / ALPHA_JSON).read_text())["alpha"] == pytest.approx(17 / 36)


def test_numeric_alpha_needs_no_statistics_pass(tmp_path: Path, ckpt, monkeypatch) -> None:
    from mllm.merge import engine

    def no_pass(*args, **kw):
        raise AssertionError("statistics pass run for a numeric alpha")

    monkeypatch.setattr(engine, "statistics_pass", no_pass)
    tau_sum = {k: TAU["a"][k] + TAU["b"][k] for k in BASE}
    merged, out = _merge(tmp_path, ckpt, {"alpha": 0.3, "beta": 0.5})
    for k, want in _expected(0.3, 0.5, tau_sum).items():
        assert torch.allclose(merged[k], want, atol=1e-6), k
    assert not (out / ALPHA_JSON).exists()


def test_alpha_must_be_a_number_or_auto(tmp_path: Path, ckpt) -> None:
    with pytest.raises(MergeError, match=r"parameters.alpha: expected a number or one of \['auto'\], got 'automatic'"):
        _merge(tmp_path, ckpt, {"alpha": "automatic", "beta": 0.5})
