"""Every merge method's formula on hand-built tensors, against values computed by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, tensor_seed
from mllm.merge.methods.dare_linear import DareLinear, DareParams
from mllm.merge.methods.dare_ties import DareTies
from mllm.merge.methods.layer_swap import LayerSwap, LayerSwapParams, donor_weight
from mllm.merge.methods.linear import Linear, LinearParams
from mllm.merge.methods.lines import Lines, LinesParams
from mllm.merge.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams, uniform
from mllm.merge.methods.ties import Ties, TiesParams
from mllm.merge.methods.widen import Widen, WidenParams
from mllm.merge.tensors import MergeError
from mllm.registry import MERGE_METHODS

T = torch.tensor
INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", layer=0, num_layers=4)


@pytest.mark.parametrize("name", MERGE_METHODS.names())
def test_every_registered_method_loads_with_its_params_dataclass(name: str) -> None:
    cls = MERGE_METHODS.get(name)
    assert issubclass(cls, MergeMethod) and dataclasses.is_dataclass(cls.config_cls)
    assert MERGE_METHODS.config_cls(name) is cls.config_cls
    assert not hasattr(cls, "name")  # the registry key is the method's one name (MergePlan.method_name)


def test_linear_weighted_average_and_unnormalised_sum() -> None:
    a, b = T([1.0, 2.0, -4.0]), T([3.0, 0.0, 8.0])
    out = Linear.merge({"a": a, "b": b}, None, LinearParams(weight={"a": 1.0, "b": 3.0}), INFO)
    assert torch.allclose(out, T([2.5, 0.5, 5.0]))  # (a + 3b) / 4
    out = Linear.merge({"a": a, "b": b}, None, LinearParams(weight={"a": 1.0, "b": 3.0}, normalize=False), INFO)
    assert torch.allclose(out, T([10.0, 2.0, 20.0]))
    with pytest.raises(MergeError, match="sum to 0"):
        LinearParams(weight={"a": 1.0, "b": -1.0})


def test_linear_keeps_bf16_inputs_exact_in_fp32() -> None:
    a = T([1.0, 3.0]).to(torch.bfloat16)
    out = Linear.merge({"a": a, "b": a}, None, LinearParams(weight={"a": 0.5, "b": 0.5}), INFO)
    assert out.dtype == torch.float32 and torch.equal(out, T([1.0, 3.0]))
    assert torch.equal(a, T([1.0, 3.0]).to(torch.bfloat16))  # scaled in its fp32 copy, not in place
    f = T([1.0, 3.0])
    Linear.merge({"a": f, "b": f}, None, LinearParams(weight={"a": 0.5, "b": 0.5}), INFO)
    assert torch.equal(f, T([1.0, 3.0]))  # an fp32 input is the copy's source too: left as it was


def test_task_arithmetic_is_base_plus_lambda_weighted_sum() -> None:
    base = T([1.0, 1.0, 1.0])
    a, b = T([2.0, 1.0, 0.0]), T([1.0, 3.0, 1.0])  # tau_a = [1, 0, -1], tau_b = [0, 2, 0]
    p = TaskArithmeticParams(weight={"a": 1.0, "b": 0.5}, lambda_=2.0)
    assert torch.allclose(TaskArithmetic.merge({"a": a, "b": b}, base, p, INFO), T([3.0, 3.0, -1.0]))
    p = TaskArithmeticParams(weight={"a": 1.0, "b": 0.5}, normalize=True)  # divide by 1.5
    assert torch.allclose(TaskArithmetic.merge({"a": a, "b": b}, base, p, INFO), T([1 + 1 / 1.5, 1 + 1 / 1.5, 1 - 1 / 1.5]))


def test_ties_trim_elect_disjoint_mean() -> None:
    base = torch.zeros(4)
    t1, t2 = T([1.0, -2.0, 3.0, 0.5]), T([-1.0, -1.0, 2.0, 4.0])
    # trim to 2 of 4: t1 -> [0, -2, 3, 0], t2 -> [0, 0, 2, 4]; sum [0, -2, 5, 4] -> signs [+, -, +, +]
    # kept: t1 at 1, 2; t2 at 2, 3 -> mean [0, -2, 2.5, 4]
    p = TiesParams(weight={"a": 1.0, "b": 1.0}, density={"a": 0.5, "b": 0.5})
    assert torch.allclose(Ties.merge({"a": t1, "b": t2}, base, p, INFO), T([0.0, -2.0, 2.5, 4.0]))
    # weights scale before the election: 3*t1 = [0, -6, 9, 0], t2 -> sum [0, -6, 11, 4]; divisor [1, 3, 4, 1]
    p = TiesParams(weight={"a": 3.0, "b": 1.0}, density={"a": 0.5, "b": 0.5})
    assert torch.allclose(Ties.merge({"a": t1, "b": t2}, base, p, INFO), T([0.0, -2.0, 11 / 4, 4.0]))


def test_ties_sign_election_drops_the_minority() -> None:
    base = torch.ones(2)
    a, b, c = base + T([1.0, -1.0]), base + T([2.0, 3.0]), base + T([-1.0, 1.0])
    # sums [2, 3] -> signs [+, +]; entry 0 keeps a, b (mean 1.5), entry 1 keeps b, c (mean 2)
    p = TiesParams(weight={"a": 1.0, "b": 1.0, "c": 1.0}, density={"a": 1.0, "b": 1.0, "c": 1.0})
    assert torch.allclose(Ties.merge({"a": a, "b": b, "c": c}, base, p, INFO), T([2.5, 3.0]))


def test_ties_bf16_tau_is_exact_where_mergekit_computing_in_bf16_rounds_it() -> None:
    """mergekit computes in its ``dtype`` (``dtype: bfloat16``: tau = theta - theta_0 rounded to bf16); we take
    tau in fp32, where the difference of two bf16 numbers is exact. Given the same fp32 compute, mergekit agrees."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    bf16 = torch.bfloat16
    base, a = T([-1.0, 0.0], dtype=bf16), T([2.0**-10, 0.5], dtype=bf16)
    # tau = [1 + 2^-10, 0.5]; density 0.5 keeps tau[0], so theta = base + [1 + 2^-10, 0] = [2^-10, 0]
    p = TiesParams(weight={"a": 1.0}, density={"a": 0.5})
    assert torch.equal(Ties.merge({"a": a}, base, p, INFO).to(bf16), T([2.0**-10, 0.0], dtype=bf16))
    group = TensorGroup.from_tensors([base, a], ids=["base", "a"], base_index=0)
    mk = {dtype: registry.get("ties")([group], parameters={"weight": {"a": 1.0}, "density": {"a": 0.5}},
                                      dtype=dtype, out_dtype=bf16)[0] for dtype in (torch.float32, bf16)}
    assert torch.equal(mk[torch.float32], T([2.0**-10, 0.0], dtype=bf16))
    assert torch.equal(mk[bf16], T([0.0, 0.0], dtype=bf16))  # bf16(1 + 2^-10) = 1 (ulp 2^-7): -1 + 1 = 0


def test_dare_drop_and_rescale_is_seeded_and_unbiased() -> None:
    base = torch.zeros(20000)
    tau = torch.full((20000,), 2.0)
    p = DareParams(weight={"a": 1.0}, density={"a": 0.25})
    out = DareLinear.merge({"a": tau}, base, p, INFO)
    kept = out != 0
    k = int(kept.sum())
    # mergekit's L1 rule: s = ||tau||_1 / ||m * tau||_1 = (20000 * 2) / (k * 2), so every kept entry is
    # 2 * 20000 / k (the paper's 1 / density would give 8 exactly) and the output's sum is 40000
    assert torch.allclose(out[kept], torch.tensor(40000.0 / k), rtol=1e-6)
    assert out.sum().item() == pytest.approx(40000.0, rel=1e-6)
    assert abs(k / 20000 - 0.25) < 0.02
    assert torch.equal(out, DareLinear.merge({"a": tau}, base, p, INFO))  # same seed, same mask
    other = TensorInfo("model.layers.1.mlp.up_proj.weight", 1, 4, seed=tensor_seed(0, "x"))
    assert not torch.equal(out, DareLinear.merge({"a": tau}, base, p, other))
    no_rescale = DareParams(weight={"a": 1.0}, density={"a": 0.25}, rescale=False)
    assert set(DareLinear.merge({"a": tau}, base, no_rescale, INFO).unique().tolist()) == {0.0, 2.0}


def test_dare_ties_equals_dare_linear_for_agreeing_signs() -> None:
    base = torch.zeros(1000)
    a, b = torch.rand(1000) + 0.1, torch.rand(1000) + 0.1  # all positive: consensus keeps every kept entry
    p = DareParams(weight={"a": 1.0, "b": 1.0}, density={"a": 0.5, "b": 0.5})
    lin, ties = DareLinear.merge({"a": a, "b": b}, base, p, INFO), DareTies.merge({"a": a, "b": b}, base, p, INFO)
    assert torch.allclose(lin, ties)
    flipped = DareTies.merge({"a": a, "b": -b}, base, p, INFO)  # signs disagree: each entry keeps one side
    # s_t = ||tau_t||_1 / ||m_t * tau_t||_1 with the seeded masks (about 2 = 1 / density)
    masks = [uniform(tensor_seed(INFO.seed, f"model{i}"), 0, 1000) < 0.5 for i in range(2)]
    s_a, s_b = (float(t.sum() / (t * m).sum()) for t, m in zip((a, b), masks, strict=True))
    assert 1.8 < s_a < 2.2 and 1.8 < s_b < 2.2
    assert torch.all((flipped == 0) | ((flipped - s_a * a).abs() < 1e-5) | ((flipped + s_b * b).abs() < 1e-5))


@pytest.mark.parametrize(("layer", "scale"), [(0, 0.2), (1, 0.4), (3, 0.8), (None, 0.2)])
def test_lines_scales_linearly_with_depth(layer: int | None, scale: float) -> None:
    base, a = T([1.0, -1.0]), T([2.0, 1.0])  # tau = [1, 2]
    p = LinesParams(alpha=0.2, beta=0.6)  # lambda(l) = 0.2 + 0.6 l / 3
    out = Lines.merge({"a": a}, base, p, TensorInfo("x", layer, 4))
    assert torch.allclose(out, base + scale * T([1.0, 2.0]))


def test_layer_swap_zones_and_transition() -> None:
    p = LayerSwapParams(swap={"lang": True, "math": False}, bottom=1, top=1, transition=1)
    assert [donor_weight(layer, 6, p) for layer in range(6)] == [1.0, 0.5, 0.0, 0.0, 0.5, 1.0]
    assert donor_weight(None, 6, p) == 0.0
    lang, math_ = T([10.0]), T([2.0])
    out = [LayerSwap.merge({"lang": lang, "math": math_}, None, p, TensorInfo("x", layer, 6)).item() for layer in range(6)]
    assert out == [10.0, 6.0, 2.0, 2.0, 6.0, 10.0]


def test_layer_swap_transition_only_beside_a_swapped_zone() -> None:
    bottom_only = LayerSwapParams(swap={"lang": True, "math": False}, bottom=2, top=0, transition=2)
    assert [donor_weight(layer, 6, bottom_only) for layer in range(6)] == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    top_only = LayerSwapParams(swap={"lang": True, "math": False}, bottom=0, top=1, transition=1)
    assert [donor_weight(layer, 4, top_only) for layer in range(4)] == [0.0, 0.0, 0.5, 1.0]
    LayerSwap.validate(bottom_only, ["lang", "math"], 4)  # 2 + 0 + one transition of 2 fits 4 blocks
    with pytest.raises(MergeError, match="transition per swapped zone = 5 exceeds the 4 decoder layers"):
        LayerSwap.validate(LayerSwapParams(swap={"lang": True, "math": False}, bottom=2, top=1, transition=1),
                           ["lang", "math"], 4)


def test_widen_vector_params_softmax_and_calibration() -> None:
    base = torch.zeros(3)
    t1, t2 = T([1.0, 0.0, 2.0]), T([0.0, 3.0, 1.0])
    # softmax over experts of |tau|: col0 [s, 1-s], col1 [1/(1+e^3), ...], col2 [s, 1-s] with s = e/(1+e);
    # above-average (mean 1 and 4/3): t1 col2, t2 col1 -> score 1
    s = math.e / (1 + math.e)
    expected = T([s * 1.0, 3.0, 2.0 + (1 - s) * 1.0])
    out = Widen.merge({"a": t1, "b": t2}, base, WidenParams(), TensorInfo("model.norm.weight", None, 4))
    assert torch.allclose(out, expected, atol=1e-6)


def test_widen_matrix_columns_by_magnitude_and_direction_ranks() -> None:
    w0 = T([[1.0, 0.0], [0.0, 1.0]])
    w1 = T([[3.0, 0.0], [3.0, 1.5]])  # col0: |m| +3.24, rotated 45 deg; col1: |m| +0.5, same direction
    w2 = T([[1.0, 1.0], [0.0, 1.0]])  # col0 unchanged; col1: |m| +0.41, rotated 45 deg
    # ranks (mag and dir): w1 [0.5, 0], w2 [0, 0.5]; softmax per column -> the higher one gets
    # q = e^0.5/(1+e^0.5), then calibrated to 1 (rank 0.5 > mean 0.25); the other keeps 1 - q.
    r = 1 / (1 + math.exp(0.5))
    expected = T([[3.0, 1.0], [3.0, 1.0 + r * 0.5]])
    out = Widen.merge({"a": w1, "b": w2}, w0, WidenParams(), TensorInfo("model.layers.0.mlp.up_proj.weight", 0, 4))
    assert torch.allclose(out, expected, atol=1e-6)
    # a token embedding is transposed first (tokens are columns): same numbers on transposed inputs
    emb = Widen.merge({"a": w1.t(), "b": w2.t()}, w0.t(), WidenParams(), TensorInfo("model.embed_tokens.weight", None, 4))
    assert torch.allclose(emb, expected.t(), atol=1e-6)


def test_widen_zero_column_gives_no_nan() -> None:
    w0 = torch.zeros(3, 2)
    out = Widen.merge({"a": torch.ones(3, 2)}, w0, WidenParams(), INFO)
    assert torch.isfinite(out).all()
