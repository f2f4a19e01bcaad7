"""WIDEN streamed over row blocks equals the straightforward whole-tensor computation (WIDEN: Yu et al.,
2024, arXiv 2408.03092)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge
from mllm.merge.methods.base import TensorInfo
from mllm.merge.methods.widen import Widen, WidenParams

EMBED = "model.embed_tokens.weight"


def reference_widen(tensors: dict[str, torch.Tensor], base: torch.Tensor, name: str, p: WidenParams) -> torch.Tensor:
    """WIDEN on whole fp32 tensors, step by step as in the paper's code (the former implementation)."""
    def rank(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x, dim=1, stable=True)
        ranks = torch.arange(x.shape[1], dtype=torch.float32).div(x.shape[1]).expand_as(order)
        return torch.zeros_like(ranks).scatter_(1, order, ranks)

    def scores(sig: torch.Tensor) -> torch.Tensor:
        s = torch.softmax(sig, dim=0)
        s[sig > sig.mean(dim=1, keepdim=True) * p.above_average_value_ratio] = p.score_calibration_value
        return s

    transpose = name == EMBED and base.dim() == 2
    w0 = base.float().t() if transpose else base.float()
    ws = [t.float().t() if transpose else t.float() for t in tensors.values()]
    taus = torch.stack([w - w0 for w in ws])
    if w0.dim() != 2:
        flat = taus.reshape(len(ws), -1)
        return w0 + (flat * scores(flat.abs())).sum(0).reshape(w0.shape)
    m0 = w0.norm(dim=0)
    d0 = w0 / m0.clamp_min(1e-12)
    dm = torch.stack([(w.norm(dim=0) - m0).abs() for w in ws])
    dd = torch.stack([1.0 - torch.cosine_similarity(w / w.norm(dim=0).clamp_min(1e-12), d0, dim=0) for w in ws])
    weight = 0.5 * (scores(rank(dm)) + scores(rank(dd)))
    merged = w0 + (taus * weight.unsqueeze(1)).sum(0)
    return merged.t() if transpose else merged


def widen_in_blocks(tensors: dict[str, torch.Tensor], base: torch.Tensor, name: str, p: WidenParams,
                    rows: int) -> tuple[torch.Tensor, int]:
    """What the engine does: scan the row blocks, then merge them one by one; returns (output, blocks)."""
    shape = tuple(base.shape)
    starts = list(range(0, shape[0], rows)) if base.dim() else [0]
    cut = (lambda t, r: t[r:r + rows]) if base.dim() else (lambda t, r: t)
    state: dict = {}
    for r in starts:
        Widen.scan_block(state, {m: cut(t, r) for m, t in tensors.items()}, cut(base, r), p,
                         TensorInfo(name, None, 2, shape=shape, row_start=r))
    prepared = Widen.scan_result(state, p, TensorInfo(name, None, 2, shape=shape))
    out = [Widen.merge({m: cut(t, r) for m, t in tensors.items()}, cut(base, r), p,
                       TensorInfo(name, None, 2, shape=shape, row_start=r, prepared=prepared)) for r in starts]
    return (torch.cat(out) if base.dim() else out[0]), len(starts)


CASES = {  # name -> shape; 2-D weights, the transposed token embedding, 1-D, 0-D and 3-D tensors
    "model.layers.0.mlp.up_proj.weight": (7, 5),
    EMBED: (9, 4),
    "model.norm.weight": (6,),
    "model.layers.0.scale": (),
    "vision.patch_embed.weight": (5, 3, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("params", [WidenParams(), WidenParams(above_average_value_ratio=0.8, score_calibration_value=0.7)])
def test_blockwise_widen_equals_the_whole_tensor_reference(name: str, params: WidenParams) -> None:
    g = torch.Generator().manual_seed(len(name))
    shape = CASES[name]
    base = torch.randn(shape, generator=g)
    if len(shape) == 2:
        base[:, 1] = 0.0  # a zero column (and, for the embedding, a zero token: row 1 of the transposed view)
        base[1] = 0.0
    tensors = {m: base + 0.3 * torch.randn(shape, generator=g) for m in ("a", "b", "c")}
    want = reference_widen(tensors, base, name, params)
    got, blocks = widen_in_blocks(tensors, base, name, params, rows=2)
    assert blocks == (math.ceil(shape[0] / 2) if shape else 1)
    assert torch.allclose(got, want, atol=1e-6, rtol=0), name
    whole = Widen.merge(tensors, base, params, TensorInfo(name, None, 2))  # direct call: scanned as one block
    assert torch.allclose(whole, want, atol=1e-6, rtol=0), name


def test_embedding_tokens_are_columns_merged_one_row_block_at_a_time() -> None:
    """test_methods' hand-computed 2 x 2 case, stored as an embedding (tokens = rows) and streamed in
    blocks of one token: token 0 gains magnitude and turns 45 deg for a, is unchanged for b; token 1
    gains 0.5 magnitude for a, turns 45 deg for b (+0.41 magnitude). Ranks (magnitude and direction)
    a: [0.5, 0], b: [0, 0.5]; the higher one is calibrated to 1, the other keeps 1 - q = 1/(1 + e^0.5)."""
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[3.0, 3.0], [0.0, 1.5]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r = 1 / (1 + math.exp(0.5))
    got, blocks = widen_in_blocks({"a": a, "b": b}, w0, EMBED, WidenParams(), rows=1)
    assert blocks == 2
    assert torch.allclose(got, torch.tensor([[3.0, 3.0], [1.0, 1.0 + r * 0.5]]), atol=1e-6)


def test_engine_merges_widen_in_row_blocks(tmp_path: Path, ckpt, llamas, monkeypatch) -> None:
    from mllm.merge import engine

    calls: list[tuple[str, int, int]] = []
    merge = Widen.merge

    def spy(tensors, base, params, info):
        calls.append((info.name, base.shape[0] if base.dim() else 1, info.row_start))
        return merge(tensors, base, params, info)

    monkeypatch.setattr(Widen, "merge", staticmethod(spy))
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)  # the 48 x 16 embedding -> 8 blocks of 6 rows
    cfg = {"merge_method": "widen", "base_model": str(llamas["base"]), "dtype": "float32",
           "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}]}
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert [(rows, start) for name, rows, start in calls if name == EMBED] == [(6, 6 * i) for i in range(8)]
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    a, b = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    for name in base:
        want = reference_widen({"a": a[name], "b": b[name]}, base[name], name, WidenParams())
        assert torch.allclose(merged[name], want, atol=1e-6, rtol=0), name
