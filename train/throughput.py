"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the device's peak.

Training costs about ``6 N`` FLOPs per token for ``N`` parameters (2N forward, 4N backward;
Kaplan et al. 2020, Sec. 2.1; PaLM, Chowdhery et al. 2022, App. B), attention's sequence-length
term left out, so ``MFU = 6 N tokens_per_s / peak_flops``; a model that runs parts of itself per
image patch rather than per token counts its own (``flops_counter()``, the MLLM's). Peaks are dense
BF16/FP16 tensor-core figures per device from the vendors' data sheets; an fp32 run is measured
against the same peak.
"""

from __future__ import annotations

import torch

# (name fragment, peak dense bf16 TFLOP/s), most specific first: device names contain each other.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device``: the override, else the table for known GPUs, else ``None`` (CPU,
    unknown GPU: no MFU is reported rather than a guessed one)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_TFLOPS:
        if fragment in name:
            return tflops * 1e12
    return None


def token_flops(num_params: int, tokens: int) -> float:
    """``6 N T``: a training step's model FLOPs over ``T`` tokens of an ``N``-parameter model."""
    return 6.0 * num_params * tokens


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak; ``None`` without a peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak
