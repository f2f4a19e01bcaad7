"""FRANK's prior options (Wei & Chen, 2025, arXiv 2505.16151, Eq. 15 with the prior of §3.2.3 / A.9 and the
prior ablation): the fitted share, the layer-indexed linear decay and a fixed decay rate, each by hand;
their validation; and what frank_coefficients.json / the plot record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, run_merge
from mllm.merge.methods.frank import Frank, FrankParams, coefficient_figure, linear_prior, prior_weights


def test_share_prior_is_the_fitted_share_clipped_to_one(tmp_path: Path) -> None:
    # 1.6 * 2^-l, l = 1..4: an exact exponential, so the fitted share is the measured one
    probe = _write_probe(tmp_path / "probe.json", [0.8, 0.4, 0.2, 0.1])
    stats = Frank.finalize({g: {"V": 1.0, "R": 1.0} for g in range(4)}, FrankParams(prior=str(probe),
                                                                                    prior_norm="share"), 4)
    assert [stats["rows"][g]["w_V"] for g in range(4)] == pytest.approx([0.8, 0.4, 0.2, 0.1])
    # equal norms: lambda_V = w_V
    assert [stats["lambda"][g][0] for g in range(4)] == pytest.approx([0.8, 0.4, 0.2, 0.1])
    assert stats["prior"]["C"] == pytest.approx(1.6) and stats["prior"]["alpha"] == pytest.approx(math.log(2))
    # a share rising with depth: 0.3 * 2^l = 0.6, 1.2, 2.4 -> clipped so that w_R = 1 - w_V >= 0
    assert prior_weights(-math.log(2), 3, "share", c=0.3) == pytest.approx([0.6, 1.0, 1.0])
    with pytest.raises(ValueError, match="fitted C"):
        prior_weights(0.1, 3, "share")


def _write_probe(path: Path, share: list[float]) -> Path:
    path.write_text(json.dumps({"visual_share": share}))
    return path


def test_linear_prior_by_hand_and_its_defaults() -> None:
    assert linear_prior(0.9, 0.3, 4) == pytest.approx([0.9, 0.7, 0.5, 0.3])
    assert linear_prior(0.6, 0.1, 1) == [0.6]
    # defaults 1 -> 0: block 1 all MLLM, the last all reasoner, whatever the norms
    stats = Frank.finalize({0: {"V": 9.0, "R": 4.0}, 1: {"V": 1.0, "R": 9.0}, 2: {"V": 2.0, "R": 2.0},
                            3: {"V": 5.0, "R": 1.0}}, FrankParams(prior="linear"), 4)
    assert [stats["rows"][g]["w_V"] for g in range(4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    lam_v = [stats["lambda"][g][0] for g in range(4)]
    # block 2: (2/3 * 1) / (2/3 * 1 + 1/3 * 9); block 3: (1/3 * 2) / (1/3 * 2 + 2/3 * 2)
    assert lam_v == pytest.approx([1.0, (2 / 3) / (2 / 3 + 3), 1 / 3, 0.0])
    assert stats["prior"] == {"option": "linear", "prior_first": 1.0, "prior_last": 0.0}


def test_fixed_decay_rate_is_alpha_of_the_exponential() -> None:
    """The ablation's fixed decay factor 0.3 read as alpha: w_V(l) ~ e^{-0.3 l}."""
    e = math.exp(-0.3)
    assert prior_weights(0.3, 3, "max") == pytest.approx([1.0, e, e * e])
    assert prior_weights(0.3, 3, "sum") == pytest.approx([x / (1 + e + e * e) for x in (1.0, e, e * e)])
    w, prior = Frank.prior(FrankParams(alpha=0.3), 3)
    assert w == pytest.approx(prior_weights(0.3, 3, "sum"))  # sum, as printed, stays the default
    assert prior == {"option": "fixed_alpha", "prior_norm": "sum", "alpha": 0.3}


@pytest.mark.parametrize(("params", "match"), [
    ({"prior": "linear", "alpha": 0.3}, "^alpha: applies to the exponential prior"),
    ({"prior": "linear", "prior_norm": "sum"}, "^prior_norm: applies to the exponential prior"),
    ({"alpha": 0.3, "prior_first": 0.5}, "^prior_first: only used with prior: linear"),
    ({"prior_last": 0.1}, "^prior_last: only used with prior: linear"),
    ({"prior": "linear", "prior_first": 1.5}, r"^prior_first: expected a prior weight w_V in \[0, 1\], got 1.5"),
    ({"prior": "linear", "prior_last": -0.1}, r"^prior_last: expected a prior weight w_V in \[0, 1\]"),
    ({"alpha": 0.3, "prior_norm": "share"}, "^prior_norm: share is the fitted share"),
    ({"prior_norm": "max"}, "^prior_norm: normalises a prior"),
    ({"alpha": math.inf}, "^alpha: expected a finite decay rate"),
    ({"prior": "p.json", "alpha": 0.1}, "^alpha: set either prior"),
])
def test_invalid_prior_settings_name_the_key(params: dict, match: str) -> None:
    with pytest.raises(MergeError, match=match):
        FrankParams(**params)


def test_unknown_prior_norm_is_refused_from_the_yaml(tmp_path: Path, ckpt, llamas) -> None:
    path = _yaml(ckpt, tmp_path, llamas, prior="linear", prior_fisrt=0.5)
    with pytest.raises(MergeError, match=r"parameters\.prior_fisrt: unknown parameter"):
        run_merge(path, tmp_path / "out")
    path = _yaml(ckpt, tmp_path, llamas, alpha=0.3, prior_norm="mean")
    with pytest.raises(MergeError, match=r"parameters\.prior_norm: expected one of \['sum', 'max', 'share'\]"):
        run_merge(path, tmp_path / "out")
    path = _yaml(ckpt, tmp_path, llamas, prior="linear", prior_first=2)
    with pytest.raises(MergeError, match=r"f\.yaml: parameters: prior_first: expected a prior weight"):
        run_merge(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _yaml(ckpt, tmp_path: Path, llamas: dict[str, Path], **params) -> Path:
    """FRANK with V = llama a, R = llama b over their base (both fine-tunes of it, same layout)."""
    return ckpt.write_yaml(tmp_path / "f.yaml", {
        "merge_method": "frank", "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}], "parameters": params,
    })


def _block_norms(ckpt, llamas: dict[str, Path]) -> tuple[list[float], list[float]]:
    """||tau_V||^2 and ||tau_R||^2 per decoder block, from the checkpoints on disk."""
    base, v, r = (ckpt.state_of(llamas[k]) for k in ("base", "a", "b"))
    layers = range(ckpt.num_layers)
    names = [[n for n in base if n.startswith(f"model.layers.{g}.")] for g in layers]
    return ([sum(float(((v[n] - base[n]) ** 2).sum()) for n in ns) for ns in names],
            [sum(float(((r[n] - base[n]) ** 2).sum()) for n in ns) for ns in names])


@pytest.mark.parametrize("option", ["linear", "share"])
def test_prior_options_end_to_end(tmp_path: Path, ckpt, llamas, option: str) -> None:
    """Each block merged with Eq. 15 under the chosen prior; the JSON records the option and w, lambda."""
    if option == "linear":
        params, w = {"prior": "linear", "prior_first": 0.9, "prior_last": 0.3}, [0.9, 0.7, 0.5, 0.3]
    else:
        params, w = {"prior": str(_write_probe(tmp_path / "probe.json", [0.8, 0.4, 0.2, 0.1])),
                     "prior_norm": "share"}, [0.8, 0.4, 0.2, 0.1]
    out = run_merge(_yaml(ckpt, tmp_path, llamas, **params), tmp_path / "out")
    doc = json.loads((out / "frank_coefficients.json").read_text())
    assert doc["equation"] == "Eq. 15" and doc["prior"]["option"] == ("linear" if option == "linear" else "fitted")
    nv, nr = _block_norms(ckpt, llamas)
    lam = [wv * a / (wv * a + (1 - wv) * b) for wv, a, b in zip(w, nv, nr, strict=True)]
    rows = doc["layers"]
    assert [r["w_V"] for r in rows] == pytest.approx(w) and [r["w_R"] for r in rows] == pytest.approx([1 - x for x in w])
    assert [r["lambda_V"] for r in rows] == pytest.approx(lam, rel=1e-5)
    assert [r["lambda_R"] for r in rows] == pytest.approx([1 - x for x in lam], rel=1e-5)
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    v, r = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    n = "model.layers.2.self_attn.q_proj.weight"
    assert torch.allclose(merged[n], base[n] + lam[2] * (v[n] - base[n]) + (1 - lam[2]) * (r[n] - base[n]), atol=1e-6)
    assert (out / "frank_coefficients.png").stat().st_size > 0


def test_plot_draws_w_and_lambda_of_every_block() -> None:
    rows = [{"w_V": 0.8, "w_R": 0.2, "lambda_V": 0.7, "lambda_R": 0.3},
            {"w_V": 0.4, "w_R": 0.6, "lambda_V": 0.1, "lambda_R": 0.9}]
    fig = coefficient_figure([0, 1], rows, {"option": "fitted", "prior_norm": "share"})
    ax = fig.axes[0]
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {r"prior $w_V$": [0.8, 0.4], r"prior $w_R$": [0.2, 0.6], r"$\lambda_V$ (MLLM)": [0.7, 0.1],
                     r"$\lambda_R$ (reasoner)": [0.3, 0.9]}
    assert ax.get_title() == "FRANK per-layer coefficients (prior: fitted, prior_norm share)"
