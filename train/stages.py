"""Training stages as data: which module groups train, LoRA on the LLM, per-group learning rates.

The named plans follow LLaVA-1.5's recipe (Liu et al. 2023, "Improved Baselines"):

* ``align`` (stage 1, feature alignment): the projector (and the fusion parts, where the model has
  them: a fused encoder's fusion module, LLM-side injectors) trains; the vision encoder and the LLM
  stay frozen.
* ``instruct`` (stage 2, visual instruction tuning): projector (+ fusion parts) and the LLM train,
  in full or, with ``train.lora``, through LoRA adapters only (peft).

``train.unfreeze_encoder`` adds the vision encoder to either plan. Without a stage, ``train.trainable``
lists the groups directly (``encoder``, ``projector``, ``llm``, ``fusion``, ``injectors``). Per-group learning
rates are ``train.lr_groups``, keyed by parameter-name prefix (see :func:`train.trainer.param_groups`).
The model applies a plan (``MLLM.set_trainable``), which logs the trainable / frozen table.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES: dict[str, tuple[str, ...]] = {
    "align": ("projector", "fusion", "injectors"),
    "instruct": ("projector", "fusion", "injectors", "llm"),
}
DEFAULT_TRAINABLE = ("encoder", "projector", "llm")


@dataclass
class LoraConfig:
    """LoRA on the LLM: ``W x + (alpha / r) B A x`` with rank-``r`` ``A``, ``B`` (Hu et al. 2021, Eq. 3)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # peft: module names, a regex, or all-linear (no lm_head)

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"lora: r and alpha must be positive, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a value in [0, 1), got {self.dropout}")


def plan_groups(
    stage: str | None, trainable: list[str], unfreeze_encoder: bool, lora: LoraConfig | None
) -> list[str]:
    """The module groups a run trains; ``ValueError`` for a contradictory plan."""
    if stage is None:
        if unfreeze_encoder:
            raise ValueError("unfreeze_encoder applies to a stage; without one, list 'encoder' in trainable")
        groups = list(trainable)
    else:
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
        if list(trainable) != list(DEFAULT_TRAINABLE):
            raise ValueError("set stage or trainable, not both (a stage names its own trainable groups)")
        groups = [*STAGES[stage], *(["encoder"] if unfreeze_encoder else [])]
    if lora is not None and "llm" not in groups:
        raise ValueError("lora: the LLM does not train in this plan (use stage instruct, or 'llm' in trainable)")
    return groups

