"""DARE's random masks (Yu et al., 2023, arXiv 2311.03099, Eq. 1-2): each task-vector entry is dropped with
probability p = 1 - density and the rest kept. Ours draws entry i's uniform u_i from a generator seeded by
(plan seed, tensor name, model position, i's block of RNG_BLOCK entries) and keeps it where u_i < density;
these tests redraw that Bernoulli mask from the same generators, check the rescale given the mask
(none, or mergekit's L1 factor), and the drop rate on a large tensor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge
from mllm.merge.methods.base import TensorInfo, tensor_seed
from mllm.merge.methods.dare_linear import DareLinear, DareParams
from mllm.merge.methods.task_arithmetic import RNG_BLOCK

NAME = "model.layers.1.mlp.up_proj.weight"


def drawn_keep(info_seed: int, model_pos: int, n: int, density: float) -> torch.Tensor:
    """Keep mask of a tensor's n entries (flat order): u < density, u from each draw block's own generator."""
    seed = tensor_seed(info_seed, f"model{model_pos}")
    draws = [torch.rand(min(RNG_BLOCK, n - lo), generator=torch.Generator().manual_seed(
        tensor_seed(seed, f"block{lo // RNG_BLOCK}"))) for lo in range(0, n, RNG_BLOCK)]
    return torch.cat(draws) < density


def _large() -> tuple[torch.Tensor, torch.Tensor]:
    """base and one fine-tune of 3 x 50_000 entries: the flat indices cross two draw-block boundaries."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 50_000, generator=g)
    return base, base + torch.randn(3, 50_000, generator=g)


def test_mask_is_the_seeded_bernoulli_draw_and_kept_entries_are_unchanged_without_rescale() -> None:
    base, ft = _large()
    info = TensorInfo(NAME, 1, 4, seed=tensor_seed(7, NAME), shape=tuple(base.shape))
    params = DareParams(weight={"a": 1.0}, density={"a": 0.3}, rescale=False)
    out = DareLinear.merge({"a": ft}, base, params, info) - base
    keep = drawn_keep(info.seed, 0, base.numel(), 0.3).reshape(base.shape)
    tau = ft - base
    assert torch.equal(out != 0, keep)
    assert torch.equal(out[keep], tau[keep])  # kept entries are tau itself, exactly
    # the second model's mask comes from its own generators (model position 1), not the first one's
    two = DareLinear.merge({"a": ft, "b": base + 2 * tau}, base, DareParams(
        weight={"a": 0.0, "b": 1.0}, density={"a": 0.3, "b": 0.6}, rescale=False), info) - base
    assert torch.equal(two != 0, drawn_keep(info.seed, 1, base.numel(), 0.6).reshape(base.shape))


def test_rescale_is_the_l1_factor_given_the_mask() -> None:
    """``rescale: true``: kept entries times s = ||tau||_1 / ||m * tau||_1 (mergekit's rule), exactly; the
    paper's 1 / (1 - p) is what s comes to in expectation."""
    _, tau32 = _large()  # over a zero base, so that the output is the rescaled delta itself (no cancellation)
    base = torch.zeros_like(tau32)
    info = TensorInfo(NAME, 1, 4, seed=tensor_seed(7, NAME), shape=tuple(base.shape))
    out = DareLinear.merge({"a": tau32}, base, DareParams(weight={"a": 1.0}, density={"a": 0.3}), info)
    keep = drawn_keep(info.seed, 0, base.numel(), 0.3).reshape(base.shape)
    tau = tau32.double()
    s = float(tau.abs().sum() / (tau * keep).abs().sum())
    assert torch.equal(out != 0, keep)
    assert torch.allclose(out[keep].double(), s * tau[keep], rtol=1e-6, atol=0)
    assert out.double().abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-6)
    assert s == pytest.approx(1 / 0.3, rel=0.02)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_drop_rate_on_a_large_tensor(density: float) -> None:
    """The dropped fraction is p = 1 - density within 5 binomial standard deviations, overall and in each
    draw block; two models' masks are independent (both kept on a density^2 fraction)."""
    base, ft = _large()
    info = TensorInfo(NAME, 1, 4, seed=tensor_seed(3, NAME), shape=tuple(base.shape))
    params = DareParams(weight={"a": 1.0, "b": 1.0}, density={"a": density, "b": density}, rescale=False)
    kept_a = (DareLinear.merge({"a": ft}, base, DareParams(weight={"a": 1.0}, density={"a": density},
                                                           rescale=False), info) != base).reshape(-1)
    both = DareLinear.merge({"a": ft, "b": ft}, base, params, info) - base
    n, p = kept_a.numel(), 1 - density

    def close(rate: float, want: float, count: int) -> bool:
        return abs(rate - want) < 5 * math.sqrt(want * (1 - want) / count)

    assert close(1 - kept_a.float().mean().item(), p, n)
    for lo in range(0, n, RNG_BLOCK):
        block = kept_a[lo:lo + RNG_BLOCK]
        assert close(1 - block.float().mean().item(), p, block.numel()), lo
    # where both kept, the sum is 2 tau; where one kept, tau; else 0
    both_kept = torch.isclose(both, 2 * (ft - base), rtol=1e-5).reshape(-1)
    assert close(both_kept.float().mean().item(), density ** 2, n)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_engine_seeds_each_tensor_by_plan_seed_and_name(tmp_path: Path, ckpt, llamas, method: str) -> None:
    """Through the YAML (``seed: 11``): every tensor's mask is the draw seeded by (11, its name)."""
    out = run_merge(ckpt.write_yaml(tmp_path / "d.yaml", {
        "merge_method": method, "base_model": str(llamas["base"]), "seed": 11,
        "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0, "density": 0.4}}],
        "parameters": {"rescale": False},
    }), tmp_path / "out")
    merged, base, a = ckpt.state_of(out), ckpt.state_of(llamas["base"]), ckpt.state_of(llamas["a"])
    for n in base:
        keep = drawn_keep(tensor_seed(11, n), 0, base[n].numel(), 0.4).reshape(base[n].shape)
        assert torch.equal(merged[n] != base[n], keep), n
        assert torch.allclose(merged[n][keep], a[n][keep], rtol=0, atol=1e-6), n
