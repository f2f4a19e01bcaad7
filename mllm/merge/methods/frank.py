"""FRANK: training-free layer-wise merge of a reasoning LLM into an MLLM.

Wei & Chen, 2025, "Training-Free Reasoning and Reflection in MLLMs", arXiv 2505.16151 (v1); equation
numbers are v1's.

Models, in this order: V = the MLLM (its language-model tensors found through the plan's
``name_map``), R = the reasoning LLM; ``base_model`` = theta_0, their common ancestor. For decoder block
l, with all of its parameters (every tensor under ``model.layers.{l}.`` after name mapping) flattened
into one vector and the task vectors tau = theta - theta_0 taken in fp32 (Eq. 3):

    theta_f(l) = theta_0(l) + lambda_V(l) tau_V(l) + lambda_R(l) tau_R(l)                    (Eq. 4)
    lambda_t(l) = ||tau_t(l)||^2 / (||tau_V(l)||^2 + ||tau_R(l)||^2)                    (Eq. 13, no prior)
    lambda_t(l) = w_t(l) ||tau_t(l)||^2 / (w_V(l) ||tau_V(l)||^2 + w_R(l) ||tau_R(l)||^2)   (Eq. 15)

The attention prior (§3.2.3, Appendix A.9): the visual share a_l of text-query attention per layer (``mllm
probe``) is fitted by OLS as a_l ~ C e^(-alpha l), l = 1..L (Eq. 40-44), and

    w_V(l) = e^(-alpha l) / sum_j e^(-alpha j)     (prior_norm: sum, as printed, Eq. 16/45)
    w_V(l) = e^(-alpha (l - 1))                    (prior_norm: max, an alternative: the printed w_V sums to 1
                                                    over the layers, so it is ~1/L in every layer)
    w_R(l) = 1 - w_V(l).

``alpha`` may be given directly (the paper's fixed-decay ablation) instead of a probe file. When both
norms of a block are 0 the block equals theta_0 whatever lambda is; lambda_V = w_V is reported.

Outside the decoder blocks (not specified by the paper): vision tower, projector and any
tensor R lacks come from the MLLM; embeddings, final norm and lm_head come from the MLLM
(``outside: mllm``, default), from R (``outside: reasoner``, shapes must match) or are merged with
Eq. 13 per tensor (``outside: frank``). FRANK is two-pass: pass 1 streams the block tensors to sum
||tau||^2 per layer, pass 2 merges. ``report`` writes frank_coefficients.json and .png.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, single_value
from mllm.merge.tensors import MergeError

COEFFICIENTS_JSON = "frank_coefficients.json"
COEFFICIENTS_PNG = "frank_coefficients.png"
_WHOLE = "FRANK's prior and coefficients are computed per decoder layer over the whole model"


@dataclass(frozen=True, kw_only=True)
class FrankParams:
    prior: str | None = single_value(_WHOLE, None)  # probe JSON (``mllm probe``) with per-layer "visual_share"; None = Eq. 13
    alpha: float | None = single_value(_WHOLE, None)  # fixed decay rate instead of a probe file
    prior_norm: Literal["sum", "max"] = single_value(_WHOLE, "sum")  # normalisation of w_V over layers
    outside: Literal["mllm", "reasoner", "frank"] = single_value(_WHOLE, "mllm")  # embeddings / final norm / lm_head

    def __post_init__(self) -> None:
        if self.prior is not None and self.alpha is not None:
            raise MergeError("set either prior (a probe JSON) or alpha, not both")


def fit_decay(share: Sequence[float]) -> tuple[float, float]:
    """OLS fit of ln a_l = ln C - alpha l over l = 1..L (Eq. 40-44); returns (alpha, C)."""
    if len(share) < 2:
        raise MergeError("at least two layers are needed to fit the decay")
    if min(share) <= 0:
        raise MergeError(f"visual shares must be > 0 to take logs, got {min(share)}")
    xs = range(1, len(share) + 1)
    ys = [math.log(a) for a in share]
    xm, ym = sum(xs) / len(share), sum(ys) / len(share)
    b1 = sum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True)) / sum((x - xm) ** 2 for x in xs)
    return -b1, math.exp(ym - b1 * xm)


def prior_weights(alpha: float, num_layers: int, norm: Literal["sum", "max"]) -> list[float]:
    """w_V(l) for l = 1..L (Eq. 16 / 45).

    ``sum``: e^{-alpha l} / sum_j e^{-alpha j} (as printed). ``max``: e^{-alpha l} / max_j e^{-alpha j},
    which is e^{-alpha (l-1)} for a decaying share (alpha >= 0) and stays <= 1 when the share rises with
    depth (alpha < 0), so w_R = 1 - w_V never goes negative.
    """
    # the common factor e^{-alpha} cancels in both normalisations
    raw = [math.exp(-alpha * (k - 1)) for k in range(1, num_layers + 1)]
    scale = sum(raw) if norm == "sum" else max(raw)
    return [r / scale for r in raw]


def coefficients(norm_v: float, norm_r: float, w_v: float, w_r: float) -> tuple[float, float]:
    """(lambda_V, lambda_R) of Eq. 15 (Eq. 13 when w_V = w_R)."""
    den = w_v * norm_v + w_r * norm_r
    if den == 0.0:
        lam_v = w_v / (w_v + w_r)
        return lam_v, 1.0 - lam_v
    lam_v = w_v * norm_v / den
    return lam_v, 1.0 - lam_v


def load_share(path: str | Path) -> list[float]:
    """The per-layer visual attention share written by ``mllm probe``."""
    p = Path(path)
    if not p.is_file():
        raise MergeError(f"{p}: FRANK prior file not found")
    try:
        share = json.loads(p.read_text())["visual_share"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MergeError(f"{p}: expected a JSON object with a 'visual_share' list: {err}") from err
    if not isinstance(share, list) or not all(isinstance(a, (int, float)) for a in share):
        raise MergeError(f"{p}: 'visual_share' must be a list of numbers")
    return [float(a) for a in share]


class Frank(MergeMethod):
    config_cls = FrankParams
    min_models = 2
    max_models = 2
    reference = "first"
    no_slices = "it pairs every MLLM decoder layer with the same reasoner layer, its prior fitted per MLLM layer"

    @classmethod
    def two_pass(cls, params: FrankParams) -> bool:
        return True  # the per-layer ||tau||^2 of Eq. 13/15

    @classmethod
    def selects(cls, info: TensorInfo, params: FrankParams) -> bool:
        return info.layer is not None or (params.outside != "mllm" and info.complete)

    @classmethod
    def prior(cls, params: FrankParams, num_layers: int) -> tuple[list[float] | None, dict[str, Any]]:
        """w_V per layer (None without a prior) and the fit it came from."""
        if params.alpha is not None:
            return prior_weights(params.alpha, num_layers, params.prior_norm), {"alpha": params.alpha}
        if params.prior is None:
            return None, {}
        share = load_share(params.prior)
        if len(share) != num_layers:
            raise MergeError(f"{params.prior}: visual_share has {len(share)} layers, the model has {num_layers}")
        try:
            alpha, c = fit_decay(share)
        except ValueError as err:
            raise MergeError(f"{params.prior}: {err}") from err
        return prior_weights(alpha, num_layers, params.prior_norm), {"alpha": alpha, "C": c, "visual_share": share}

    @classmethod
    def validate(cls, params: FrankParams, model_ids: list[str], num_layers: int) -> None:
        if num_layers == 0:
            raise MergeError("frank: no decoder layers found (check layer_pattern and name_map)")
        cls.prior(params, num_layers)

    @classmethod
    def collect(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: FrankParams,
                info: TensorInfo) -> Mapping[str, float]:
        assert base is not None
        b = fp32(base)
        v, r = (fp32(t) - b for t in tensors.values())
        # squares in fp32, accumulated in fp64: a block has up to ~1e9 entries
        return {"V": float(torch.sum(v * v, dtype=torch.float64)), "R": float(torch.sum(r * r, dtype=torch.float64))}

    @classmethod
    def finalize(cls, sums: Mapping[int | str, Mapping[str, float]], params: FrankParams,
                 num_layers: int) -> dict[str, Any]:
        w_v, fit = cls.prior(params, num_layers)
        lam: dict[int | str, tuple[float, float]] = {}
        rows: dict[int | str, dict[str, float]] = {}
        for group, s in sums.items():
            wv = w_v[group] if (w_v is not None and isinstance(group, int)) else 0.5
            lam[group] = coefficients(s["V"], s["R"], wv, 1.0 - wv)
            rows[group] = {"norm_sq_V": s["V"], "norm_sq_R": s["R"], "w_V": wv, "w_R": 1.0 - wv,
                           "lambda_V": lam[group][0], "lambda_R": lam[group][1]}
        return {"lambda": lam, "rows": rows, "fit": fit, "prior": w_v is not None}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: FrankParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        v, r = tensors.values()
        if info.layer is None and params.outside == "reasoner":
            return r
        lam_v, lam_r = info.stats["lambda"][info.group]
        b = fp32(base)
        return b + lam_v * (fp32(v) - b) + lam_r * (fp32(r) - b)

    @classmethod
    def report(cls, stats: Mapping[str, Any], params: FrankParams, out_dir: Path) -> list[str]:
        rows = stats["rows"]
        layers = sorted(g for g in rows if isinstance(g, int))
        doc = {
            "method": "frank", "equation": "Eq. 15" if stats["prior"] else "Eq. 13",
            "prior_norm": params.prior_norm, "outside": params.outside, "fit": stats["fit"],
            "layers": [{"layer": g, **rows[g]} for g in layers],
            "other_tensors": {g: rows[g] for g in rows if not isinstance(g, int)},
        }
        (out_dir / COEFFICIENTS_JSON).write_text(json.dumps(doc, indent=2))
        _plot(layers, [rows[g] for g in layers], stats["prior"], out_dir / COEFFICIENTS_PNG)
        return [COEFFICIENTS_JSON, COEFFICIENTS_PNG]


def _plot(layers: list[int], rows: list[dict[str, float]], with_prior: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, [r["lambda_V"] for r in rows], marker="o", label=r"$\lambda_V$ (MLLM)")
    ax.plot(layers, [r["lambda_R"] for r in rows], marker="s", label=r"$\lambda_R$ (reasoner)")
    if with_prior:
        ax.plot(layers, [r["w_V"] for r in rows], linestyle="--", label=r"prior $w_V$")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("coefficient")
    ax.set_title("FRANK per-layer coefficients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
