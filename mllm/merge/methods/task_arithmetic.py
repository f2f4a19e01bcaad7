"""Generalized task arithmetic: task arithmetic, TIES and DARE as one implementation.

For base theta_0 and models t with task vectors tau_t = theta_t - theta_0 (fp32), weights w_t:

1. sparsify (per tensor, per model): ``none``; ``magnitude`` (TIES trim: keep the entries with
   |tau_t| >= the k-th largest |tau_t|, k = max(1, floor(density * n)), per tensor as in
   MergeLLM/mergekit rather than the TIES paper's whole-model threshold; entries tied with the
   threshold are all kept, so one number per tensor decides alike in every row block, where mergekit
   keeps the k its unstable argsort puts first -- ties are common in bf16 models, whose deltas are
   coarse); ``random`` (DARE: keep each entry with probability density; the uniform draw of entry i
   depends only on (seed, tensor name, model position, i), so a tensor merged whole or in row blocks
   gets the same mask).
   ``rescale: true`` (mergekit's ``rescaled_masked_tensor`` with ``RescaleNorm.l1``) multiplies the kept
   entries by one number per tensor and model, s_t = ||tau_t||_1 / ||m_t * tau_t||_1 over the whole tensor
   (s_t = 1 when either norm is below 1e-7), so the sparsified tau_t keeps tau_t's L1 norm. This is
   mergekit's rule, not the DARE paper's (Yu et al., 2023, arXiv 2311.03099, eq. 2: each kept entry
   divided by 1 - p = density): both are unbiased-in-scale corrections, the paper's in expectation
   per entry, mergekit's exactly in L1 per tensor, and they differ by the ratio of the kept fraction
   of |tau_t| to the density. Defaults follow mergekit's registry: on for dare_ties / dare_linear,
   off for task_arithmetic and ties (where ``rescale: true`` applies the same rule to the magnitude mask).
   Streaming: s_t is a whole-tensor statistic. For the magnitude mask ``prepare`` returns it with the
   threshold; for the random mask a scan draws the same seeded mask block by block and sums |tau_t| and
   |m_t * tau_t| in fp64 before any block is merged (the draws are made twice, the memory stays a block).
2. d_t = w_t * sparsified tau_t.
3. sign consensus (TIES elect + disjoint merge, when ``consensus``): gamma = sign(sum_t d_t) with 0
   counted as +; keep d_t only where sign(d_t) = gamma; divisor = sum_t w_t over kept entries.
   Without consensus the divisor is sum_t w_t.
4. tau_m = sum_t d_t (/ divisor if ``normalize``);  theta = theta_0 + lambda * tau_m.

Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089) = no sparsifier, no consensus; TIES
(Yadav et al., NeurIPS 2023, arXiv 2306.01708) = magnitude + consensus + normalize; DARE (Yu et al.,
ICML 2024, arXiv 2311.03099) = random + rescale, with (dare_ties) or without (dare_linear) consensus.
Methods with a sparsifier of their own (Breadcrumbs' magnitude band, DELLA's ranked drop probabilities)
return it from ``sparsifier_for``; steps 2-4 are this module's.
This follows mergekit's generalized_task_arithmetic, so the same YAML gives the same numbers (tested for TA and TIES) up to
the tie rule above, and up to mergekit's compute dtype: its ``dtype`` (bfloat16, say) is the dtype it
computes tau in, ours is only the output's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model, tensor_seed, yaml_key
from mllm.merge.tensors import MergeError

Sparsifier = Literal["none", "magnitude", "random"]
# A method's own sparsifier (Breadcrumbs, DELLA): (tau, model id, model position) -> tau sparsified in place
SparsifyFn = Callable[[torch.Tensor, str, int], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TaskArithmeticParams:
    weight: dict[str, float] = per_model()  # w_t, per model (required)
    density: dict[str, float] = per_model(1.0)  # kept fraction of tau_t for the sparsifier
    normalize: bool = False  # divide by the (kept) sum of weights
    lambda_: float = yaml_key("lambda", 1.0)  # global scale of the merged task vector
    rescale: bool = False  # match the L1 norm of the kept entries to tau's, per tensor (mergekit)
    int8_mask: bool = False  # accepted for mergekit YAML; masks are boolean here, so it changes nothing

    def __post_init__(self) -> None:
        for mid, d in self.density.items():
            if not 0.0 <= d <= 1.0:
                raise MergeError(f"density of {mid!r} must be in [0, 1], got {d}")


RNG_BLOCK = 1 << 16  # elements per independently seeded block of DARE's uniform draws. Small next to the engine's
# row block (BLOCK_ELEMS = 4 x this) because a row block that starts inside a draw block redraws that block's prefix:
# at 1 << 20 every draw was made 2.5 times over (DARE-TIES 18 s vs mergekit's 29 s on bench_merge)
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescaling when either L1 norm is below this


def l1_scale(total: float, kept: float) -> float:
    """||tau||_1 / ||kept tau||_1, or 1 when either is below L1_EPS (mergekit's ``RescaleNorm.l1``)."""
    return 1.0 if total < L1_EPS or kept < L1_EPS else total / kept


class Kept(NamedTuple):
    """Whole-tensor statistics of one model's sparsified tau: the magnitude threshold (None for the
    random mask) and the L1 factor s_t (1 without ``rescale``)."""

    threshold: float | None
    scale: float


def magnitude_threshold(tau: torch.Tensor, density: float, overwrite: bool = False) -> float:
    """The k-th largest |tau| with k = max(1, floor(density * n)) (O(n) selection; ``overwrite``
    lets it scramble ``tau`` instead of copying it)."""
    return magnitude_trim(tau, density, False, overwrite).threshold  # type: ignore[return-value]


def magnitude_trim(tau: torch.Tensor, density: float, rescale: bool, overwrite: bool = False) -> Kept:
    """``magnitude_threshold`` and, with ``rescale``, s_t = ||tau||_1 / ||tau with |tau| >= threshold||_1
    (fp64 sums; the partition only permutes |tau|, so the sums are those of the whole tensor)."""
    a = tau.detach().to(torch.float32, copy=not overwrite).abs_().reshape(-1).numpy()
    k = max(1, int(density * a.size))
    a.partition(a.size - k)  # in place: no second copy
    threshold = float(a[a.size - k])
    if not rescale:
        return Kept(threshold, 1.0)
    total = float(a.sum(dtype="float64"))
    return Kept(threshold, l1_scale(total, float(a.sum(dtype="float64", where=a >= threshold))))


def delta_threshold(tensor: torch.Tensor, base: torch.Tensor, density: float, rescale: bool = False) -> Kept:
    """``magnitude_trim`` of tensor - base for ``prepare``, computed in ``tensor`` (fp32), which
    it overwrites: no second whole-tensor copy (subtracting a bf16 base in one go would cast all of
    it to fp32 first, so go by slices)."""
    flat, flat_base, step = tensor.reshape(-1), base.reshape(-1), 1 << 20
    for i in range(0, flat.numel(), step):
        flat[i:i + step].sub_(flat_base[i:i + step])
    return magnitude_trim(tensor, density, rescale, overwrite=True)


def uniform(seed: int, start: int, n: int) -> torch.Tensor:
    """U[0, 1) draws for flat indices start..start+n-1; draw i depends only on (seed, i).

    Each block of RNG_BLOCK indices has its own generator; torch's CPU generator is sequential, so a
    prefix of a block's draws does not depend on how many are drawn (checked in the tests).
    """
    out = torch.empty(n)
    for b in range(start // RNG_BLOCK, (start + n - 1) // RNG_BLOCK + 1 if n else 0):
        lo, hi = max(start, b * RNG_BLOCK), min(start + n, (b + 1) * RNG_BLOCK)
        gen = torch.Generator().manual_seed(tensor_seed(seed, f"block{b}"))
        out[lo - start:hi - start] = torch.rand(hi - b * RNG_BLOCK, generator=gen)[lo - b * RNG_BLOCK:]
    return out


def random_mask(tau: torch.Tensor, density: float, seed: int, offset: int) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask of a block of ``tau`` starting at flat index ``offset``."""
    return uniform(seed, offset, tau.numel()).reshape(tau.shape) < density


def sparsify_(tau: torch.Tensor, density: float, method: Sparsifier, rescale: bool,
              prepared: Kept | None, seed: int, offset: int) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tau`` in place (magnitude threshold or Bernoulli draws), times s_t
    with ``rescale``. ``prepared``: the whole tensor's statistics; None when ``tau`` is the whole tensor."""
    if method == "none" or density >= 1.0:
        return tau
    if density <= 0.0:
        return tau.zero_()
    total = float(tau.abs().sum(dtype=torch.float64)) if rescale and prepared is None else 0.0
    if method == "magnitude":
        threshold = prepared.threshold if prepared is not None else magnitude_threshold(tau, density)
        keep = tau.abs() >= threshold
    else:
        keep = random_mask(tau, density, seed, offset)
    tau.mul_(keep)
    if not rescale:
        return tau
    scale = prepared.scale if prepared is not None else l1_scale(total, float(tau.abs().sum(dtype=torch.float64)))
    return tau.mul_(scale)


def elected_sign(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' elected sign of stacked deltas [n_models, ...]: sign(sum_t d_t), 0 counted as + (mergekit's
    ``sum`` consensus); d_t takes part where d_t * sign > 0 (a zero entry never does)."""
    return torch.where(deltas.sum(0) >= 0, 1.0, -1.0)


def merged_delta(tensors: dict[str, torch.Tensor], base: torch.Tensor, params: TaskArithmeticParams,
                 info: TensorInfo, sparsifier: Sparsifier | SparsifyFn, consensus: bool) -> torch.Tensor:
    """tau_m of steps 1-4 (before lambda) for an fp32 ``base``; peak about n_models + 3 fp32 copies.
    ``sparsifier``: one of the built-in ones, or a method's own function (step 1)."""
    weights = [params.weight[m] for m in tensors]
    offset = info.offset(base)
    deltas = torch.empty((len(tensors), *base.shape)) if consensus else None
    mixed: torch.Tensor | None = None
    for i, (mid, t) in enumerate(tensors.items()):
        tau = torch.sub(t, base, out=deltas[i]) if deltas is not None else fp32(t) - base
        if callable(sparsifier):
            sparsifier(tau, mid, i)
        else:
            sparsify_(tau, params.density[mid], sparsifier, params.rescale, info.prepared.get(mid),
                      tensor_seed(info.seed, f"model{i}"), offset)
        tau.mul_(weights[i])
        if deltas is None:
            mixed = tau if mixed is None else mixed.add_(tau)
    if deltas is not None:  # TIES: elected sign (0 counts as +), disjoint sum
        sign = elected_sign(deltas)
        divisor = torch.zeros(base.shape) if params.normalize else None
        for w, d in zip(weights, deltas, strict=True):
            keep = d.mul(sign) > 0
            d.mul_(keep)
            mixed = d if mixed is None else mixed.add_(d)
            if divisor is not None:
                divisor.add_(keep, alpha=w)
        if divisor is not None:
            divisor[divisor == 0] = 1.0
    else:
        total = sum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
    assert mixed is not None
    return mixed.div_(divisor) if params.normalize else mixed


class TaskArithmetic(MergeMethod):
    """theta_0 + lambda * sum_t w_t tau_t (mergekit ``task_arithmetic``)."""

    config_cls = TaskArithmeticParams
    sparsifier: ClassVar[Sparsifier] = "none"
    consensus: ClassVar[bool] = False

    @classmethod
    def builtin_sparsifier(cls, params: Any) -> Sparsifier:
        """The built-in sparsifier in use: the class's, or a ``sparsifier`` parameter (LiNeS)."""
        return getattr(params, "sparsifier", cls.sparsifier)

    @classmethod
    def needs_prepare(cls, params: TaskArithmeticParams) -> bool:
        return cls.builtin_sparsifier(params) == "magnitude"

    @classmethod
    def prepare(cls, tensor: torch.Tensor, base: torch.Tensor | None, params: TaskArithmeticParams,
                info: TensorInfo, model_id: str) -> Kept:
        assert base is not None
        return delta_threshold(tensor, base, params.density[model_id], params.rescale)

    @classmethod
    def needs_scan(cls, params: TaskArithmeticParams) -> bool:
        """The random mask's L1 factor s_t: a scan of the tensor, drawing the mask the merge will draw."""
        return cls.builtin_sparsifier(params) == "random" and params.rescale

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: TaskArithmeticParams, info: TensorInfo) -> None:
        assert base is not None
        base = fp32(base)
        for i, (mid, t) in enumerate(tensors.items()):
            d = params.density[mid]
            if not 0.0 < d < 1.0:
                continue
            a = (fp32(t) - base).abs_()
            keep = random_mask(a, d, tensor_seed(info.seed, f"model{i}"), info.offset(a))
            acc = state.setdefault(mid, [0.0, 0.0])
            acc[0] += float(a.sum(dtype=torch.float64))
            acc[1] += float(a.mul_(keep).sum(dtype=torch.float64))

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: TaskArithmeticParams, info: TensorInfo) -> dict[str, Kept]:
        return {mid: Kept(None, l1_scale(total, kept)) for mid, (total, kept) in state.items()}

    @classmethod
    def sparsifier_for(cls, params: Any, info: TensorInfo, base: torch.Tensor) -> Sparsifier | SparsifyFn:
        """Step 1 for one row block of ``base``'s rows: the class's built-in sparsifier, or (overridden
        by Breadcrumbs, DELLA) a function of the method's own."""
        return cls.sparsifier

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
              params: TaskArithmeticParams, info: TensorInfo) -> torch.Tensor:
        assert base is not None
        base = fp32(base)
        sparsifier = cls.sparsifier_for(params, info, base)
        return merged_delta(tensors, base, params, info, sparsifier, cls.consensus).mul_(params.lambda_).add_(base)
