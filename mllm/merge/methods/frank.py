"""FRANK: training-free layer-wise merge of a reasoning LLM into an MLLM.

Wei & Chen, 2025, "Training-Free Reasoning and Reflection in MLLMs", arXiv 2505.16151 (v1); equation
numbers are v1's.

Models, in this order: V = the MLLM (its language-model tensors found through the plan's
``name_map``, detected from its config and weights when the YAML sets none: ``mllm/merge/families.py``),
R = the reasoning LLM; ``base_model`` = theta_0, their common ancestor. For decoder block
l, with all of its parameters (every tensor under ``model.layers.{l}.`` after name mapping) flattened
into one vector and the task vectors tau = theta - theta_0 taken in fp32 (Eq. 3):

    theta_f(l) = theta_0(l) + lambda_V(l) tau_V(l) + lambda_R(l) tau_R(l)                    (Eq. 4)
    lambda_t(l) = ||tau_t(l)||^2 / (||tau_V(l)||^2 + ||tau_R(l)||^2)                    (Eq. 13, no prior)
    lambda_t(l) = w_t(l) ||tau_t(l)||^2 / (w_V(l) ||tau_V(l)||^2 + w_R(l) ||tau_R(l)||^2)   (Eq. 15)

with w_R(l) = 1 - w_V(l). The prior w_V (§3.2.3, Appendix A.9) comes from one of:

* ``prior: <probe JSON>`` -- the visual share a_l of text-query attention per layer (``mllm probe``),
  fitted by OLS as a_l ~ C e^(-alpha l), l = 1..L (Eq. 40-44), then normalised by ``prior_norm``:

      sum    w_V(l) = e^{-alpha l} / sum_j e^{-alpha j}    (as printed, Eq. 16/45; the default)
      max    w_V(l) = e^{-alpha l} / max_j e^{-alpha j}    (= e^{-alpha (l-1)} for a decaying share)
      share  w_V(l) = clip(C e^{-alpha l}, 0, 1)          (the fitted share itself)

  The printed ``sum`` makes w_V a distribution over the layers (~1/L in every block), so lambda_V is
  small everywhere; ``max`` gives w_R = 0 in block 1 and lambda_V ~ 1 wherever the share decays
  slowly; ``share`` keeps a block's MLLM weight at the fraction of attention its text queries give
  the image, so shallow blocks that look at the image stay with V and deep ones that do not go to R
  for any L -- the picture the paper describes. Which one the authors ran is not stated.
* ``alpha: <rate>`` -- the ablation's fixed decay factor (FRANK-15B, MMMU: 0.3 -> 59.1, 0.5 -> 56.3;
  fitted 61.3): the decay rate alpha of e^{-alpha l} given instead of fitted, normalised by ``sum``
  or ``max``. "Fixed decay factor" could also mean a per-layer ratio w_V(l+1) / w_V(l) = 0.3; it is
  read here as alpha, the prior's one decay parameter, under which both rows decay from shallow to
  deep and the faster decay (0.5) scores lower, as the table shows. The ratio reading q is ``alpha:
  -ln q`` (q = 0.3 -> alpha = 1.204). ``share`` needs the fitted C, so it takes a probe file, not
  ``alpha``.
* ``prior: linear`` -- the ablation's layer-indexed linear decay (59.6): w_V(l) = first + (last -
  first) (l - 1) / (L - 1), with ``prior_first`` (default 1) and ``prior_last`` (default 0); a probe
  file that is itself named ``linear`` is given as ``./linear``.

Without ``prior`` and ``alpha`` it is Eq. 13 (w_V = w_R). When both norms of a block are 0 the block
equals theta_0 whatever lambda is; lambda_V = w_V is reported.

Outside the decoder blocks (not specified by the paper): vision tower, projector and any
tensor R lacks come from the MLLM; embeddings, final norm and lm_head come from the MLLM
(``outside: mllm``, default), from R (``outside: reasoner``, shapes must match) or are merged with
Eq. 13 per tensor (``outside: frank``). FRANK is two-pass: pass 1 streams the block tensors to sum
||tau||^2 per layer, pass 2 merges. ``report`` writes frank_coefficients.json (the prior option and,
per block, w_V, w_R, lambda_V, lambda_R) and a plot of those four.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, single_value
from mllm.merge.tensors import MergeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COEFFICIENTS_JSON = "frank_coefficients.json"
COEFFICIENTS_PNG = "frank_coefficients.png"
LINEAR = "linear"  # ``prior: linear``: the layer-indexed linear decay instead of a probe file
PriorNorm = Literal["sum", "max", "share"]
_WHOLE = "FRANK's prior and coefficients are computed per decoder layer over the whole model"


@dataclass(frozen=True, kw_only=True)
class FrankParams:
    prior: str | None = single_value(_WHOLE, None)  # probe JSON (``mllm probe``, "visual_share"), or linear; None = Eq. 13
    alpha: float | None = single_value(_WHOLE, None)  # fixed decay rate of e^{-alpha l} instead of a probe file
    prior_norm: PriorNorm | None = single_value(_WHOLE, None)  # exponential prior: sum (default), max or share
    prior_first: float | None = single_value(_WHOLE, None)  # prior: linear: w_V of the first block (default 1)
    prior_last: float | None = single_value(_WHOLE, None)  # prior: linear: w_V of the last block (default 0)
    outside: Literal["mllm", "reasoner", "frank"] = single_value(_WHOLE, "mllm")  # embeddings / final norm / lm_head

    def __post_init__(self) -> None:
        if self.prior == LINEAR:
            for key in ("alpha", "prior_norm"):
                if getattr(self, key) is not None:
                    raise MergeError(f"{key}: applies to the exponential prior; prior: linear takes prior_first "
                                     f"and prior_last")
        else:
            for key in ("prior_first", "prior_last"):
                if getattr(self, key) is not None:
                    raise MergeError(f"{key}: only used with prior: linear")
            if self.prior is not None and self.alpha is not None:
                raise MergeError("alpha: set either prior (a probe JSON) or alpha, not both")
            if self.prior_norm is not None and self.prior is None and self.alpha is None:
                raise MergeError("prior_norm: normalises a prior; set prior (a probe JSON) or alpha too")
            if self.prior_norm == "share" and self.prior is None:
                raise MergeError("prior_norm: share is the fitted share C e^{-alpha l}, which needs prior (a "
                                 "probe JSON); alpha alone has no C")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise MergeError(f"alpha: expected a finite decay rate, got {self.alpha}")
        for key in ("prior_first", "prior_last"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise MergeError(f"{key}: expected a prior weight w_V in [0, 1], got {value}")


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


def prior_weights(alpha: float, num_layers: int, norm: PriorNorm, c: float | None = None) -> list[float]:
    """w_V(l) for l = 1..L from the decay e^{-alpha l} (Eq. 16 / 45).

    ``sum``: e^{-alpha l} / sum_j e^{-alpha j} (as printed). ``max``: e^{-alpha l} / max_j e^{-alpha j},
    which is e^{-alpha (l-1)} for a decaying share (alpha >= 0) and stays <= 1 when the share rises with
    depth (alpha < 0), so w_R = 1 - w_V never goes negative. ``share``: the fitted share C e^{-alpha l}
    itself (``c`` = C of Eq. 44), clipped to [0, 1] for the same reason.
    """
    if norm == "share":
        if c is None:
            raise ValueError("prior_weights: norm 'share' needs the fitted C")
        return [min(1.0, max(0.0, c * math.exp(-alpha * k))) for k in range(1, num_layers + 1)]
    # the common factor e^{-alpha} cancels in both normalisations
    raw = [math.exp(-alpha * (k - 1)) for k in range(1, num_layers + 1)]
    scale = sum(raw) if norm == "sum" else max(raw)
    return [r / scale for r in raw]


def linear_prior(first: float, last: float, num_layers: int) -> list[float]:
    """w_V(l) = first + (last - first) (l - 1) / (L - 1), l = 1..L: the layer-indexed linear decay of the
    paper's prior ablation (``first`` alone for one layer)."""
    if num_layers == 1:
        return [first]
    return [first + (last - first) * k / (num_layers - 1) for k in range(num_layers)]


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
        """w_V per layer (None without a prior) and a record of the option it came from."""
        if params.prior == LINEAR:
            first = 1.0 if params.prior_first is None else params.prior_first
            last = 0.0 if params.prior_last is None else params.prior_last
            return linear_prior(first, last, num_layers), {"option": "linear", "prior_first": first, "prior_last": last}
        norm: PriorNorm = params.prior_norm or "sum"
        if params.alpha is not None:
            return prior_weights(params.alpha, num_layers, norm), {"option": "fixed_alpha", "prior_norm": norm,
                                                                   "alpha": params.alpha}
        if params.prior is None:
            return None, {"option": "none"}
        share = load_share(params.prior)
        if len(share) != num_layers:
            raise MergeError(f"{params.prior}: visual_share has {len(share)} layers, the model has {num_layers}")
        try:
            alpha, c = fit_decay(share)
        except ValueError as err:
            raise MergeError(f"{params.prior}: {err}") from err
        return prior_weights(alpha, num_layers, norm, c), {"option": "fitted", "prior_norm": norm, "file": params.prior,
                                                           "alpha": alpha, "C": c, "visual_share": share}

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
        w_v, prior = cls.prior(params, num_layers)
        lam: dict[int | str, tuple[float, float]] = {}
        rows: dict[int | str, dict[str, float]] = {}
        for group, s in sums.items():
            wv = w_v[group] if (w_v is not None and isinstance(group, int)) else 0.5
            lam[group] = coefficients(s["V"], s["R"], wv, 1.0 - wv)
            rows[group] = {"norm_sq_V": s["V"], "norm_sq_R": s["R"], "w_V": wv, "w_R": 1.0 - wv,
                           "lambda_V": lam[group][0], "lambda_R": lam[group][1]}
        return {"lambda": lam, "rows": rows, "prior": prior}

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
        rows, prior = stats["rows"], stats["prior"]
        layers = sorted(g for g in rows if isinstance(g, int))
        doc = {
            "method": "frank", "equation": "Eq. 13" if prior["option"] == "none" else "Eq. 15",
            "prior": prior, "outside": params.outside,
            "layers": [{"layer": g, **rows[g]} for g in layers],
            "other_tensors": {g: rows[g] for g in rows if not isinstance(g, int)},
        }
        (out_dir / COEFFICIENTS_JSON).write_text(json.dumps(doc, indent=2))
        fig = coefficient_figure(layers, [rows[g] for g in layers], prior)
        fig.savefig(out_dir / COEFFICIENTS_PNG, dpi=100)
        return [COEFFICIENTS_JSON, COEFFICIENTS_PNG]


PLOTTED = {"w_V": r"prior $w_V$", "w_R": r"prior $w_R$", "lambda_V": r"$\lambda_V$ (MLLM)",
           "lambda_R": r"$\lambda_R$ (reasoner)"}  # row key -> legend label, in plotting order


def coefficient_figure(layers: list[int], rows: list[dict[str, float]], prior: Mapping[str, Any]) -> Figure:
    """w_V, w_R (dashed) and lambda_V, lambda_R per decoder block, titled with the prior option."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))  # not pyplot: no global figure registry to leak into
    ax = fig.add_subplot()
    for key, label in PLOTTED.items():
        style = {"linestyle": "--"} if key.startswith("w_") else {"marker": "o"}
        ax.plot(layers, [r[key] for r in rows], label=label, **style)
    option = prior["option"] + (f", prior_norm {prior['prior_norm']}" if "prior_norm" in prior else "")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("coefficient")
    ax.set_title(f"FRANK per-layer coefficients (prior: {option})")
    ax.legend()
    fig.tight_layout()
    return fig
