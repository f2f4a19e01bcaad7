"""The interpolation merge methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion) on small tensors, against values computed by hand; and merged in row blocks (scan, then
merge) equal to merged whole."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mllm.merge.methods.arcee_fusion import ArceeFusion, ArceeFusionParams
from mllm.merge.methods.base import MergeMethod, TensorInfo
from mllm.merge.methods.karcher import Karcher, KarcherParams
from mllm.merge.methods.model_stock import ModelStock, ModelStockParams
from mllm.merge.methods.multislerp import Multislerp, MultislerpParams
from mllm.merge.methods.nearswap import Nearswap, NearswapParams
from mllm.merge.methods.nuslerp import Nuslerp, NuslerpParams
from mllm.merge.methods.slerp import Slerp, SlerpParams
from mllm.merge.tensors import MergeError

T = torch.tensor
INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", layer=0, num_layers=4)
E1, E2 = T([1.0, 0.0]), T([0.0, 1.0])
R = math.sqrt(0.5)


def _merge(cls: type[MergeMethod], tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: Any,
           rows: int | None = None) -> torch.Tensor:
    """As the engine does: scan and prepare on the whole tensor, merge in blocks of ``rows`` rows (None: whole)."""
    shape = tuple((base if base is not None else next(iter(tensors.values()))).shape)
    info = TensorInfo(INFO.name, 0, 4, shape=shape)
    if rows is None:
        return cls.merge(tensors, base, params, info)
    prepared: dict[str, Any] = {}
    if cls.needs_scan(params):
        state: dict[str, Any] = {}
        for r in range(0, shape[0], rows):
            cls.scan_block(state, {m: t[r:r + rows] for m, t in tensors.items()},
                           None if base is None else base[r:r + rows], params, TensorInfo(INFO.name, 0, 4, shape=shape,
                                                                                           row_start=r))
        prepared = cls.scan_result(state, params, info)
    elif cls.needs_prepare(params):
        prepared = {m: cls.prepare(t.clone(), base, params, info, m) for m, t in tensors.items()}
    out = [cls.merge({m: t[r:r + rows] for m, t in tensors.items()}, None if base is None else base[r:r + rows],
                     params, TensorInfo(INFO.name, 0, 4, shape=shape, row_start=r, prepared=prepared))
           for r in range(0, shape[0], rows)]
    return torch.cat(out)


def test_slerp_of_orthogonal_vectors_follows_the_arc() -> None:
    out = Slerp.merge({"b": E2}, E1, SlerpParams(t=0.5), INFO)
    assert torch.allclose(out, T([R, R]))  # 45 degrees
    out = Slerp.merge({"b": E2}, E1, SlerpParams(t=0.25), INFO)
    assert torch.allclose(out, T([0.92387953, 0.38268343]))  # cos, sin of 22.5 degrees
    out = Slerp.merge({"b": T([0.0, 4.0])}, T([3.0, 0.0]), SlerpParams(t=0.5), INFO)
    assert torch.allclose(out, T([3 * R, 4 * R]))  # sin(pi/4) / sin(pi/2) of each: lengths are not normalised


def test_slerp_of_collinear_vectors_is_linear() -> None:
    out = Slerp.merge({"b": T([2.0, 4.0])}, T([1.0, 2.0]), SlerpParams(t=0.25), INFO)
    assert torch.allclose(out, T([1.25, 2.5]))
    out = Slerp.merge({"b": T([-1.0, -2.0])}, T([1.0, 2.0]), SlerpParams(t=0.25), INFO)  # antipodal: linear too
    assert torch.allclose(out, T([0.5, 1.0]))


def test_slerp_spans_the_whole_tensor_also_in_row_blocks() -> None:
    base, other = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 1.0]])  # orthogonal as flat vectors
    assert torch.allclose(_merge(Slerp, {"b": other}, base, SlerpParams(t=0.5), rows=1), T([[R, 0.0], [0.0, R]]))


def test_nuslerp_t_from_weights_over_task_vectors() -> None:
    p = NuslerpParams(weight={"a": 1.0, "b": 3.0})  # t = 3 / 4
    out = Nuslerp.merge({"a": E1, "b": E2}, None, p, INFO)
    assert torch.allclose(out, T([0.38268343, 0.92387953]))  # sin(pi/8), sin(3 pi/8)
    base = T([1.0, 1.0])
    out = Nuslerp.merge({"a": base + E1, "b": base + E2}, base, p, INFO)
    assert torch.allclose(out, T([1.38268343, 1.92387953]))
    zero = NuslerpParams(weight={"a": 1.0, "b": -1.0})  # weights summing to 0: t = 0.5
    assert torch.allclose(Nuslerp.merge({"a": E1, "b": E2}, None, zero, INFO), T([R, R]))


def test_nuslerp_rows_and_columns() -> None:
    a, b = T([[1.0, 3.0], [0.0, 3.0]]), T([[0.0, 1.0], [1.0, 1.0]])
    rows = NuslerpParams(weight={"a": 1.0, "b": 1.0}, nuslerp_flatten=False)  # vectors along the last dim
    cols = NuslerpParams(weight={"a": 1.0, "b": 1.0}, nuslerp_flatten=False, nuslerp_row_wise=True)
    # column 0: (1, 0) and (0, 1) orthogonal -> (R, R); column 1: (3, 3) and (1, 1) collinear -> (2, 2)
    want = T([[R, 2.0], [R, 2.0]])
    assert torch.allclose(Nuslerp.merge({"a": a, "b": b}, None, cols, INFO), want)
    assert torch.allclose(_merge(Nuslerp, {"a": a, "b": b}, None, cols, rows=1), want)
    # rows of the transposed pair give the same numbers
    assert torch.allclose(Nuslerp.merge({"a": a.T, "b": b.T}, None, rows, INFO), want.T)


def test_multislerp_is_the_normalised_weighted_mean_direction_at_the_mean_norm() -> None:
    p = MultislerpParams(weight={"a": 1.0, "b": 3.0})  # normalised to 0.25, 0.75
    out = Multislerp.merge({"a": 2 * E1, "b": 4 * E2}, None, p, INFO)
    # direction (0.25, 0.75) / |.| = (0.316228, 0.948683); norm 0.25 * 2 + 0.75 * 4 = 3.5
    assert torch.allclose(out, T([1.1067972, 3.3203917]))
    base = T([1.0, -1.0])
    assert torch.allclose(Multislerp.merge({"a": base + 2 * E1, "b": base + 4 * E2}, base, p, INFO),
                          T([2.1067972, 2.3203917]))
    assert torch.equal(Multislerp.merge({"a": 2 * E1}, base, p, INFO), 2 * E1)  # one model: itself


def test_multislerp_antipodal_inputs_fall_back_or_refuse() -> None:
    p = MultislerpParams(weight={"a": 1.0, "b": 1.0})
    assert torch.allclose(Multislerp.merge({"a": E1, "b": -E1}, None, p, INFO), T([0.0, 0.0]))  # linear fallback
    p3 = MultislerpParams(weight={"a": 1.0, "b": 1.0, "c": 2.0})
    with pytest.raises(MergeError, match="weighted sum"):
        Multislerp.merge({"a": E1, "b": E1, "c": -E1}, None, p3, INFO)


def test_karcher_mean_of_angles_on_a_circle() -> None:
    # unit vectors at 0, 0 and 90 degrees: the Karcher mean is at 30 degrees (the extrinsic mean at 26.57)
    out = Karcher.merge({"a": E1, "b": E1, "c": E2}, None, KarcherParams(), INFO)
    assert torch.allclose(out, T([0.8660254, 0.5]))
    start = Karcher.merge({"a": E1, "b": E1, "c": E2}, None, KarcherParams(max_iter=0), INFO)
    assert torch.allclose(start, T([0.8944272, 0.4472136]))  # (2, 1) / sqrt(5)
    # norms 2 and 4, orthogonal: 45 degrees at the mean norm 3; the base counts as one more input
    assert torch.allclose(Karcher.merge({"a": 2 * E1}, 4 * E2, KarcherParams(), INFO), T([3 * R, 3 * R]))
    # a zero input takes no part in the direction but counts in the mean norm: (2 + 0) / 2
    assert torch.allclose(Karcher.merge({"a": 2 * E1, "b": 0 * E1}, None, KarcherParams(), INFO), T([1.0, 0.0]))


def test_model_stock_ratio_from_the_angle_between_task_vectors() -> None:
    base = T([1.0, 1.0])
    a, b = base + E1, base + T([0.5, 0.8660254])  # 60 degrees: cos = 0.5, t = 2 * 0.5 / 1.5 = 2/3
    out = ModelStock.merge({"a": a, "b": b}, base, ModelStockParams(), INFO)
    assert torch.allclose(out, T([1.5, 1.2886751]))  # base + 2/3 * mean task vector (0.75, 0.4330127)
    assert torch.allclose(ModelStock.merge({"a": base + E1, "b": base + E2}, base, ModelStockParams(), INFO), base)
    # antiparallel: 1 + (N - 1) cos = 0, singular -> t = 0 (the base)
    assert torch.allclose(ModelStock.merge({"a": base + E1, "b": base - E1}, base, ModelStockParams(), INFO), base)


def test_model_stock_filter_wise_one_ratio_per_row() -> None:
    base = torch.zeros(2, 2)
    a, b = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.5, 0.8660254], [0.0, 1.0]])  # rows at 60 and 90 degrees
    want = T([[0.5, 0.2886751], [0.0, 0.0]])
    assert torch.allclose(ModelStock.merge({"a": a, "b": b}, base, ModelStockParams(filter_wise=True), INFO), want)
    assert torch.allclose(_merge(ModelStock, {"a": a, "b": b}, base, ModelStockParams(filter_wise=True), rows=1), want)
    # whole tensor: cos = 0.5 / (1.4142 * 1.4142) = 0.25, t = 0.5 / 1.25 = 0.4; mean (a + b) / 2
    whole = _merge(ModelStock, {"a": a, "b": b}, base, ModelStockParams(), rows=1)
    assert torch.allclose(whole, 0.4 * (a + b) / 2)


def test_nearswap_takes_near_entries_whole_and_far_ones_partly() -> None:
    base, other = T([0.0, 0.0, 0.0, 2.0]), T([0.005, 0.02, -0.1, 2.0])
    out = Nearswap.merge({"b": other}, base, NearswapParams(t=0.01), INFO)
    assert torch.allclose(out, T([0.005, 0.01, -0.01, 2.0]))  # weights 1, 0.5, 0.1, 1


def test_arcee_fusion_keeps_outlying_importance_only() -> None:
    base, other = torch.zeros(5), T([0.1, 0.2, 0.3, 0.4, 2.0])
    # one row: I = |diff| * KL; quartiles at sorted indices 1, 2, 3 -> 0.2, 0.3, 0.4 (times KL);
    # threshold (0.3 + 1.5 * 0.2) KL = 0.6 KL: only the 2.0 entry is taken
    out = ArceeFusion.merge({"b": other}, base, ArceeFusionParams(), INFO)
    assert torch.allclose(out, T([0.0, 0.0, 0.0, 0.0, 2.0]))


def test_arcee_fusion_a_shifted_row_changes_no_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    other = base + 0.3 * torch.randn(6, 8, generator=g)
    other[2] = base[2] + 5.0  # far from the base, but its softmax is the base's: KL = 0, never taken
    out = ArceeFusion.merge({"b": other}, base, ArceeFusionParams(), INFO)
    assert torch.equal(out[2], base[2])
    assert torch.equal(_merge(ArceeFusion, {"b": other}, base, ArceeFusionParams(), rows=4), out)
    taken = out != base
    assert 0 < int(taken.sum()) < 48 // 2


@pytest.mark.parametrize(("cls", "params", "with_base"), [
    (Slerp, SlerpParams(t=0.3), True),
    (Nuslerp, NuslerpParams(weight={"a": 0.2, "b": 0.5}), True),
    (Nuslerp, NuslerpParams(weight={"a": 0.2, "b": 0.5}, nuslerp_flatten=False, nuslerp_row_wise=True), False),
    (Multislerp, MultislerpParams(weight={"a": 0.2, "b": 0.5}), True),
    (Karcher, KarcherParams(), True),
    (ModelStock, ModelStockParams(), True),
    (Nearswap, NearswapParams(t=0.5), True),
    (ArceeFusion, ArceeFusionParams(), True),
])
@pytest.mark.parametrize("shape", [(7, 5), (9,), (3, 4, 2)])
def test_row_blocks_equal_the_whole_tensor(cls: type[MergeMethod], params: Any, with_base: bool,
                                           shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g)
    ids = ["a"] if cls.max_models == 1 else ["a", "b"]
    tensors = {m: base + torch.randn(shape, generator=g) for m in ids}
    whole = _merge(cls, tensors, base if with_base else None, params)
    for rows in (1, 2):
        assert torch.allclose(_merge(cls, tensors, base if with_base else None, params, rows=rows), whole,
                              rtol=1e-5, atol=1e-6), rows
