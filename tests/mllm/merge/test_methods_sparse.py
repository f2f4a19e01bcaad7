"""Breadcrumbs, DELLA, SCE, RAM and RAM+ on hand-built tensors, against values computed by hand; DELLA's
random masks by their statistics and by the closed form given the mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mllm.merge.methods.base import TensorInfo, tensor_seed
from mllm.merge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsParams
from mllm.merge.methods.breadcrumbs_ties import BreadcrumbsTies
from mllm.merge.methods.dare_linear import DareLinear
from mllm.merge.methods.dare_ties import DareTies
from mllm.merge.methods.della import Della, DellaParams, keep_probs
from mllm.merge.methods.della_linear import DellaLinear, DellaLinearParams
from mllm.merge.methods.ram import Ram, RamParams
from mllm.merge.methods.ramplus_tl import RamPlusParams, RamPlusTL
from mllm.merge.methods.sce import Sce, SceParams
from mllm.merge.methods.task_arithmetic import uniform
from mllm.merge.methods.ties import Ties, TiesParams
from mllm.merge.tensors import MergeError

T = torch.tensor
INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", layer=0, num_layers=4, seed=tensor_seed(0, "w"))
TEN = T([0.1, -0.9, 0.3, 0.5, -0.2, 0.8, 0.05, -0.6, 0.4, 1.0])  # |.| sorted: .05 .1 .2 .3 .4 .5 .6 .8 .9 1


def _blocks(method, tensors, base, params, info, rows: int) -> torch.Tensor:
    """``method`` merged row block by row block, with the statistics the engine would hand it."""
    info = TensorInfo(info.name, info.layer, info.num_layers, info.seed, shape=tuple(base.shape))
    prepared: dict = {}
    if method.needs_scan(params):
        state: dict = {}
        for r in range(0, base.shape[0], rows):
            blk = TensorInfo(info.name, info.layer, info.num_layers, info.seed, shape=info.shape, row_start=r)
            method.scan_block(state, {k: t[r:r + rows] for k, t in tensors.items()}, base[r:r + rows], params, blk)
        prepared = method.scan_result(state, params, info)
    elif method.needs_prepare(params):
        prepared = {k: method.prepare(t.clone(), base, params, info, k) for k, t in tensors.items()}
    out = [method.merge({k: t[r:r + rows] for k, t in tensors.items()}, base[r:r + rows], params,
                        TensorInfo(info.name, info.layer, info.num_layers, info.seed, shape=info.shape,
                                   row_start=r, prepared=prepared))
           for r in range(0, base.shape[0], rows)]
    return torch.cat(out)


# --- Breadcrumbs ------------------------------------------------------------------------------------
def test_breadcrumbs_cuts_both_tails_of_ten_values() -> None:
    # density 0.5, gamma 0.2: k = 5 kept, 2 outliers (1.0, 0.9) and b = 10 - 5 - 2 = 3 small ones (.05 .1 .2) cut
    p = BreadcrumbsParams(weight={"a": 2.0}, density={"a": 0.5}, gamma={"a": 0.2}, lambda_=0.5)
    out = Breadcrumbs.merge({"a": TEN + 1.0}, torch.ones(10), p, INFO)
    assert torch.allclose(out, 1.0 + T([0.0, 0.0, 0.3, 0.5, 0.0, 0.8, 0.0, -0.6, 0.4, 0.0]))  # 2 * 0.5 = 1
    # rescale: kept entries scaled by ||tau||_1 / ||kept||_1 = 4.85 / 2.6 (mergekit's L1 rescaling)
    p = BreadcrumbsParams(weight={"a": 1.0}, density={"a": 0.5}, gamma={"a": 0.2}, rescale=True)
    out = Breadcrumbs.merge({"a": TEN}, torch.zeros(10), p, INFO)
    assert torch.allclose(out, T([0.0, 0.0, 0.3, 0.5, 0.0, 0.8, 0.0, -0.6, 0.4, 0.0]) * (4.85 / 2.6))
    assert out.abs().sum().item() == pytest.approx(4.85)


def test_breadcrumbs_outlier_cut_shrinks_to_keep_the_density() -> None:
    # density 0.9, gamma 0.2: k = 9 leaves room for one outlier only: b = max(0, 10 - 9 - 2) = 0
    p = BreadcrumbsParams(weight={"a": 1.0}, density={"a": 0.9}, gamma={"a": 0.2})
    want = TEN.clone()
    want[9] = 0.0
    assert torch.allclose(Breadcrumbs.merge({"a": TEN}, torch.zeros(10), p, INFO), want)
    p = BreadcrumbsParams(weight={"a": 1.0}, density={"a": 1.0}, gamma={"a": 0.2})  # density 1: tau whole
    assert torch.allclose(Breadcrumbs.merge({"a": TEN}, torch.zeros(10), p, INFO), TEN)
    p = BreadcrumbsParams(weight={"a": 1.0}, density={"a": 0.05}, gamma={"a": 0.2})  # k = 0: nothing kept
    assert torch.equal(Breadcrumbs.merge({"a": TEN}, torch.zeros(10), p, INFO), torch.zeros(10))
    with pytest.raises(MergeError, match="gamma"):
        BreadcrumbsParams(weight={"a": 1.0}, gamma={"a": 1.5})


def test_breadcrumbs_ties_elects_the_sign_after_the_cut() -> None:
    base = torch.zeros(4)
    a, b = T([0.1, -2.0, 3.0, -5.0]), T([-4.0, 1.0, -0.2, 2.0])
    # density 0.5, gamma 0.25: n = 4, k = 2, g = 1, b = 1 -> a keeps |.| in {2, 3}, b keeps {2, 1}
    # a -> [0, -2, 3, 0], b -> [0, 1, 0, 2]; sums [0, -1, 3, 2] -> signs [+, -, +, +]; b's 1 is dropped at 1
    p = BreadcrumbsParams(weight={"a": 1.0, "b": 1.0}, density={"a": 0.5, "b": 0.5}, gamma={"a": 0.25, "b": 0.25})
    assert torch.allclose(BreadcrumbsTies.merge({"a": a, "b": b}, base, p, INFO), T([0.0, -2.0, 3.0, 2.0]))
    assert torch.allclose(Breadcrumbs.merge({"a": a, "b": b}, base, p, INFO), T([0.0, -1.0, 3.0, 2.0]))


def test_breadcrumbs_prepare_then_row_blocks_equals_the_whole_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 5, generator=g)
    tensors = {k: base + torch.randn(12, 5, generator=g) for k in "ab"}
    for method in (Breadcrumbs, BreadcrumbsTies):
        p = BreadcrumbsParams(weight={"a": 0.7, "b": 0.4}, density={"a": 0.4, "b": 0.6}, gamma={"a": 0.1, "b": 0.05},
                              rescale=True)
        whole = method.merge(tensors, base, p, INFO)
        assert torch.allclose(_blocks(method, tensors, base, p, INFO, rows=5), whole, atol=1e-6)
        assert int((whole != base).sum()) <= 24 + 36  # at most 0.4 * 60 + 0.6 * 60 entries changed


# --- DELLA ------------------------------------------------------------------------------------------
def test_della_keep_probabilities_for_a_four_element_ranking() -> None:
    # ranks of |.| = [2, 0, 3, 1] -> p = 0.5 - 0.15 + 0.3 * rank / 3
    assert torch.allclose(keep_probs(T([0.3, -0.1, 2.0, 0.5]), 0.5, 0.15), T([0.45, 0.35, 0.65, 0.55]))
    # a matrix is ranked along each row (dim 1), as mergekit does
    m = T([[0.3, -0.1, 2.0, 0.5], [4.0, 3.0, -2.0, 1.0]])
    assert torch.allclose(keep_probs(m, 0.4, 0.1), T([[0.4 - 0.1 / 3, 0.3, 0.5, 0.4 + 0.1 / 3],
                                                      [0.5, 0.4 + 0.1 / 3, 0.4 - 0.1 / 3, 0.3]]))
    with pytest.raises(MergeError, match="epsilon"):
        DellaParams(weight={"a": 1.0}, density={"a": 0.9}, epsilon={"a": 0.15})  # 0.9 + 0.15 >= 1
    assert DellaParams(weight={"a": 1.0}).normalize and not DellaLinearParams(weight={"a": 1.0}).normalize


def test_della_drop_frequencies_follow_the_magnitude_ranking() -> None:
    n = 40000
    tau = torch.randn(2, n, generator=torch.Generator().manual_seed(1))
    p = DellaLinearParams(weight={"a": 1.0}, density={"a": 0.4}, epsilon={"a": 0.2}, rescale=False)
    out = DellaLinear.merge({"a": tau}, torch.zeros(2, n), p, INFO)
    assert torch.equal(out, DellaLinear.merge({"a": tau}, torch.zeros(2, n), p, INFO))  # seeded
    kept = (out != 0).float()
    assert torch.equal(out, tau * kept)
    assert kept.mean().item() == pytest.approx(0.4, abs=0.01)
    order = tau.abs().argsort(dim=1)
    by_rank = kept.gather(1, order).reshape(2, 5, n // 5).mean(dim=(0, 2))  # quintiles, smallest first
    want = T([0.24, 0.32, 0.40, 0.48, 0.56])  # 0.2 + 0.4 * (quintile middle)
    assert torch.allclose(by_rank, want, atol=0.015)


def test_della_matches_mergekit_magprune_in_distribution() -> None:
    from mergekit.sparsify import RescaleNorm, della_magprune

    tau = torch.randn(4, 20000, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    mk = della_magprune(tau, density=0.3, epsilon=0.1, rescale_norm=RescaleNorm.l1)
    p = DellaLinearParams(weight={"a": 1.0}, density={"a": 0.3}, epsilon={"a": 0.1})
    ours = DellaLinear.merge({"a": tau}, torch.zeros_like(tau), p, INFO)
    order = tau.abs().argsort(dim=1)
    for out in (ours, mk):
        assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)  # L1 rescaled
    rates = [(x != 0).float().gather(1, order).reshape(4, 10, -1).mean(dim=(0, 2)) for x in (ours, mk)]
    assert torch.allclose(rates[0], rates[1], atol=0.02)  # keep rate per magnitude decile
    scale = [x[x != 0].abs().sum() / tau.abs()[x != 0].sum() for x in (ours, mk)]
    assert scale[0].item() == pytest.approx(scale[1].item(), rel=0.01)


def test_della_closed_form_given_the_mask() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 50, generator=g)
    tau = {k: torch.randn(6, 50, generator=g) for k in "ab"}
    w, d, e, lam = {"a": 0.6, "b": 0.9}, {"a": 0.5, "b": 0.3}, {"a": 0.2, "b": 0.1}, 1.5
    kept = {}
    for i, k in enumerate("ab"):  # the mask the draws give: u_i < p_i, u seeded by (tensor, model position)
        mask = uniform(tensor_seed(INFO.seed, f"model{i}"), 0, 300).reshape(6, 50) < keep_probs(tau[k], d[k], e[k])
        kept[k] = tau[k] * mask * (tau[k].abs().sum() / (tau[k] * mask).abs().sum())
    tensors = {k: base + tau[k] for k in "ab"}
    lin = DellaLinear.merge(tensors, base, DellaLinearParams(weight=w, density=d, epsilon=e, lambda_=lam), INFO)
    assert torch.allclose(lin, base + lam * (w["a"] * kept["a"] + w["b"] * kept["b"]), atol=1e-5)
    dd = {k: w[k] * kept[k] for k in "ab"}
    sign = torch.where(dd["a"] + dd["b"] >= 0, 1.0, -1.0)
    agree = {k: (dd[k] * sign > 0).float() for k in "ab"}
    divisor = (w["a"] * agree["a"] + w["b"] * agree["b"]).clamp(min=1e-12)
    divisor[divisor < 1e-12] = 1.0
    want = base + lam * (dd["a"] * agree["a"] + dd["b"] * agree["b"]) / divisor
    ties = Della.merge(tensors, base, DellaParams(weight=w, density=d, epsilon=e, lambda_=lam), INFO)
    assert torch.allclose(ties, want, atol=1e-5)
    assert torch.allclose(_blocks(Della, tensors, base, DellaParams(weight=w, density=d, epsilon=e, lambda_=lam),
                                  INFO, rows=4), ties, atol=1e-6)  # scanned, then merged in row blocks


def test_della_one_dimensional_tensor_is_ranked_whole_across_blocks() -> None:
    g = torch.Generator().manual_seed(4)
    base, tau = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    p = DellaLinearParams(weight={"a": 0.5}, density={"a": 0.6}, epsilon={"a": 0.3})
    whole = DellaLinear.merge({"a": base + tau}, base, p, INFO)
    assert torch.allclose(_blocks(DellaLinear, {"a": base + tau}, base, p, INFO, rows=300), whole, atol=1e-6)
    assert abs((whole != base).float().mean().item() - 0.6) < 0.05


def test_dare_takes_mergekit_rescale_with_its_default() -> None:
    for method in (DareLinear, DareTies):  # mergekit: rescale defaults to true for dare_linear / dare_ties
        assert method.config_cls(weight={"a": 1.0}).rescale is True
    p = DareLinear.config_cls(weight={"a": 1.0}, density={"a": 0.5}, rescale=False)
    out = DareLinear.merge({"a": torch.full((100,), 3.0)}, torch.zeros(100), p, INFO)
    assert set(out.unique().tolist()) <= {0.0, 3.0}


def test_dare_rescale_closed_form_given_the_mask() -> None:
    """theta_0 + lambda * consensus(w_t s_t m_t tau_t), s_t = ||tau_t||_1 / ||m_t tau_t||_1 over the whole tensor
    (mergekit's L1 rule), with m_t the seeded draws u < density; merged whole and in row blocks (scan first)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 50, generator=g)
    tau = {k: torch.randn(6, 50, generator=g) for k in "ab"}
    w, d, lam = {"a": 0.6, "b": 0.9}, {"a": 0.5, "b": 0.3}, 1.5
    kept = {}
    for i, k in enumerate("ab"):
        mask = uniform(tensor_seed(INFO.seed, f"model{i}"), 0, 300).reshape(6, 50) < d[k]
        kept[k] = tau[k] * mask * (tau[k].abs().sum() / (tau[k] * mask).abs().sum())
        assert kept[k].abs().sum().item() == pytest.approx(tau[k].abs().sum().item(), rel=1e-6)
    tensors = {k: base + tau[k] for k in "ab"}
    p = DareLinear.config_cls(weight=w, density=d, lambda_=lam)
    lin = DareLinear.merge(tensors, base, p, INFO)
    assert torch.allclose(lin, base + lam * (w["a"] * kept["a"] + w["b"] * kept["b"]), atol=1e-5)
    dd = {k: w[k] * kept[k] for k in "ab"}
    sign = torch.where(dd["a"] + dd["b"] >= 0, 1.0, -1.0)
    want = base + lam * sum(dd[k] * (dd[k] * sign > 0) for k in "ab")  # normalize off (mergekit's default)
    ties = DareTies.merge(tensors, base, p, INFO)
    assert torch.allclose(ties, want, atol=1e-5)
    assert DareTies.needs_scan(p) and not DareTies.needs_scan(dataclasses.replace(p, rescale=False))
    for method, whole in ((DareLinear, lin), (DareTies, ties)):
        assert torch.allclose(_blocks(method, tensors, base, p, INFO, rows=4), whole, atol=1e-6)


def test_dare_rescale_statistics_match_mergekit_bernoulli() -> None:
    """Random masks: ours (seeded) and mergekit's ``bernoulli`` (global RNG) keep about a density fraction
    and, with L1 rescaling, exactly ||tau||_1; the scale lies near the paper's 1 / density."""
    from mergekit.sparsify import RescaleNorm, bernoulli

    tau = torch.randn(8, 5000, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    mk = bernoulli(tau, density=0.3, rescale_norm=RescaleNorm.l1)
    ours = DareLinear.merge({"a": tau}, torch.zeros_like(tau), DareLinear.config_cls(weight={"a": 1.0},
                                                                                        density={"a": 0.3}), INFO)
    for out in (ours, mk):
        assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
        assert abs((out != 0).float().mean().item() - 0.3) < 0.01
        kept = out != 0
        scale = (out[kept] / tau[kept]).unique()
        assert float(scale.max() - scale.min()) < 1e-5 and abs(scale[0].item() - 1 / 0.3) < 0.1


def test_ties_rescale_matches_the_l1_norm_of_the_trimmed_task_vector() -> None:
    # density 0.5 keeps |tau| >= 0.5 (k = 5: 1, .9, .8, .6, .5), L1 3.8 of 4.85: s = 4.85 / 3.8
    p = TiesParams(weight={"a": 1.0}, density={"a": 0.5}, rescale=True)
    out = Ties.merge({"a": TEN}, torch.zeros(10), p, INFO)
    trimmed = TEN * (TEN.abs() >= 0.5)
    assert torch.allclose(out, trimmed * (4.85 / 3.8))
    assert out.abs().sum().item() == pytest.approx(4.85)
    big = {k: torch.randn(40, 30, generator=torch.Generator().manual_seed(i)) for i, k in enumerate("ab")}
    p = TiesParams(weight={"a": 0.7, "b": 0.4}, density={"a": 0.3, "b": 0.6}, rescale=True)
    base = torch.zeros(40, 30)
    whole = Ties.merge(big, base, p, INFO)
    assert torch.allclose(_blocks(Ties, big, base, p, INFO, rows=7), whole, atol=1e-6)  # prepare, then blocks


# --- SCE --------------------------------------------------------------------------------------------
def test_sce_weights_by_mean_square_and_erases_minority_signs() -> None:
    base = torch.ones(4)
    a, b = base + T([1.0, -2.0, 3.0, 0.0]), base + T([3.0, 2.0, -1.0, 2.0])
    # w = mean tau^2 normalised: a 14/4, b 18/4 -> 7/16, 9/16; sums [4, 0, 2, 2] -> all signs +
    # entry 0: (7/16 * 1 + 9/16 * 3) / 1; entry 1: only b (a's -2 erased); entry 2: only a; entry 3: only b
    out = Sce.merge({"a": a, "b": b}, base, SceParams(), INFO)
    assert torch.allclose(out, 1.0 + T([2.125, 2.0, 3.0, 2.0]))
    # select_topk 0.5: variances [1, 4, 4, 1] -> the 2 largest kept: a -> [0, -2, 3, 0], b -> [0, 2, -1, 0]
    out = Sce.merge({"a": a, "b": b}, base, SceParams(select_topk=0.5), INFO)
    assert torch.allclose(out, 1.0 + T([0.0, 2.0, 3.0, 0.0]))
    assert torch.equal(Sce.merge({"a": a, "b": b}, base, SceParams(select_topk=0.0), INFO), base)


def test_sce_statistics_pass_then_row_blocks_equals_the_whole_tensor() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(10, 6, generator=g)
    tensors = {k: base + torch.randn(10, 6, generator=g) for k in "abc"}
    p = SceParams(select_topk=0.4)
    info = TensorInfo(INFO.name, 0, 4, shape=(10, 6))
    state: dict = {}
    for r in range(0, 10, 3):
        Sce.scan_block(state, {k: t[r:r + 3] for k, t in tensors.items()}, base[r:r + 3], p, info)
    prepared = Sce.scan_result(state, p, info)
    sums: dict = {}
    for r in range(0, 10, 3):
        blk = TensorInfo(INFO.name, 0, 4, shape=(10, 6), row_start=r, prepared=prepared)
        for key, v in Sce.collect({k: t[r:r + 3] for k, t in tensors.items()}, base[r:r + 3], p, blk).items():
            sums[key] = sums.get(key, 0.0) + v
    stats = Sce.finalize({0: sums}, p, 4)
    assert sum(stats[INFO.name].values()) == pytest.approx(1.0) and len(stats[INFO.name]) == 3
    blocks = [Sce.merge({k: t[r:r + 3] for k, t in tensors.items()}, base[r:r + 3], p,
                        TensorInfo(INFO.name, 0, 4, shape=(10, 6), row_start=r, prepared=prepared, stats=stats))
              for r in range(0, 10, 3)]
    whole = Sce.merge(tensors, base, p, INFO)
    assert torch.allclose(torch.cat(blocks), whole, atol=1e-6)
    assert int((whole != base).any(dim=0).sum()) <= 6 and int((whole != base).sum()) == 24  # 0.4 * 60 selected


# --- RAM, RAM+ --------------------------------------------------------------------------------------
RAM_TAUS = {"a": T([0.5, 0.05, 0.3, 0.0]), "b": T([0.2, 0.4, -0.01, 0.0]), "c": T([0.0, 0.0, 0.6, 0.0])}


def test_ram_unique_entries_whole_shared_entries_averaged() -> None:
    base = torch.full((4,), 2.0)
    tensors = {k: base + t for k, t in RAM_TAUS.items()}
    # epsilon 0.1: changed a [1, 0, 1, 0], b [1, 1, 0, 0], c [0, 0, 1, 0] -> counts [2, 1, 2, 0]
    out = Ram.merge(tensors, base, RamParams(epsilon=0.1), INFO)
    assert torch.allclose(out, 2.0 + T([0.35, 0.4, 0.45, 0.0]))
    # default epsilon 1e-5: b's -0.01 and a's 0.05 count too -> entry 1 = (0.05 + 0.4) / 2, entry 2 = 0.89 / 3
    out = Ram.merge(tensors, base, RamParams(), INFO)
    assert torch.allclose(out, 2.0 + T([0.35, 0.225, 0.89 / 3, 0.0]))


def test_ramplus_tl_scales_unique_entries_by_the_shared_ratio() -> None:
    base = torch.zeros(4)
    tensors = {k: base + t for k, t in RAM_TAUS.items()}
    # b: S = 1 shared (entry 0), U = 1 unique (entry 1): rho = 1 -> lambda_b = 1 + r * min(rho, alpha)
    out = RamPlusTL.merge(tensors, base, RamPlusParams(epsilon=0.1, r=0.5, alpha=3.0), INFO)
    assert torch.allclose(out, T([0.35, 0.4 * 1.5, 0.45, 0.0]))
    out = RamPlusTL.merge(tensors, base, RamPlusParams(epsilon=0.1, r=0.5), INFO)  # alpha 0.2 clips rho
    assert torch.allclose(out, T([0.35, 0.4 * 1.1, 0.45, 0.0]))
    g = torch.Generator().manual_seed(6)
    mat = {k: torch.randn(9, 4, generator=g) * (torch.rand(9, 4, generator=g) < 0.4) for k in "ab"}
    p = RamPlusParams(r=0.3, alpha=2.5)
    whole = RamPlusTL.merge(mat, torch.zeros(9, 4), p, INFO)
    assert torch.allclose(_blocks(RamPlusTL, mat, torch.zeros(9, 4), p, INFO, rows=2), whole, atol=1e-6)


SPARSE_METHODS = {
    "breadcrumbs": (Breadcrumbs, BreadcrumbsParams(weight={"a": 0.5, "b": 0.5}, density={"a": 0.3, "b": 0.3},
                                                   rescale=True)),
    "breadcrumbs_ties": (BreadcrumbsTies, BreadcrumbsParams(weight={"a": 0.5, "b": 0.5}, density={"a": 0.3, "b": 0.3})),
    "della": (Della, DellaParams(weight={"a": 0.5, "b": 0.5}, density={"a": 0.3, "b": 0.3})),
    "della_linear": (DellaLinear, DellaLinearParams(weight={"a": 0.5, "b": 0.5}, density={"a": 0.3, "b": 0.3})),
    "sce": (Sce, SceParams(select_topk=0.3)),
    "ram": (Ram, RamParams()),
    "ramplus_tl": (RamPlusTL, RamPlusParams()),
}


@pytest.mark.parametrize("name", sorted(SPARSE_METHODS))
def test_copies_of_the_base_merge_to_the_base(name: str) -> None:
    method, params = SPARSE_METHODS[name]
    base = torch.randn(7, 3, generator=torch.Generator().manual_seed(8)) * 2.5
    out = method.merge({"a": base.clone(), "b": base.clone()}, base, params, INFO)
    assert torch.isfinite(out).all() and torch.allclose(out, base, atol=1e-6)
