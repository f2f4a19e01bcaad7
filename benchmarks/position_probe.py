"""Do a trained run's visual tokens carry their grid position? A ridge probe, per run.

    python benchmarks/position_probe.py runs/rp/mix6_s0 runs/rp/ftz_mix6_s0 ...

For each run (a folder written by ``mllm train``) the projected visual tokens — what the LLM reads — of
``--images`` ShapesWorld test scenes are regressed, token by token, on the token's column and row index
(closed-form ridge, ``w = (XᵀX + λI)⁻¹ Xᵀy`` with a bias column); the first ``--fit`` scenes fit, the
rest score. It prints held-out R² per run: near 1 means the position is linearly readable, so a
run that still answers relpos at chance lacks the LLM-side comparison, not the information. Needs a
single encoder grid with one token per patch (``encoder.grid_size``), as every ShapesWorld recipe has.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mllm import run
from train.data.shapesworld import ShapesWorld


def ridge_r2(x: torch.Tensor, y: torch.Tensor, fit: int, lam: float = 1e-2) -> float:
    """Held-out R² of ``y ≈ [x, 1] w`` fitted by ridge on the first ``fit`` rows, scored on the others."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    a, b = xa[:fit], y[:fit]
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(xa.shape[1], dtype=x.dtype), a.T @ b)
    pred, true = xa[fit:] @ w, y[fit:]
    return float(1 - ((pred - true) ** 2).mean() / true.var(unbiased=False))


def position_r2(run_dir: Path, images: int, fit: int) -> dict[str, float]:
    model, cfg = run.load_run(run_dir)
    rows, cols = model.encoder.grid_size
    if model.num_visual_tokens != rows * cols:
        raise SystemExit(f"{run_dir}: {model.num_visual_tokens} visual tokens for a {rows}x{cols} grid; one per patch needed")
    test = ShapesWorld(cfg.data).split("test")
    pixels = torch.stack([model.preprocess(test[i]["image"]) for i in range(images)])
    with torch.no_grad():
        tokens = torch.cat([model.encode_images(chunk) for chunk in pixels.split(64)]).double()  # [B, N, D]
    x = tokens.reshape(-1, tokens.shape[-1])
    index = torch.arange(rows * cols, dtype=torch.float64).repeat(images)
    split = fit * rows * cols
    return {"column": ridge_r2(x, index % cols, split), "row": ridge_r2(x, index // cols, split)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=384, help="test scenes encoded (default 384)")
    parser.add_argument("--fit", type=int, default=256, help="of those, scenes the probe is fitted on (default 256)")
    args = parser.parse_args()
    if not 0 < args.fit < args.images:
        parser.error("--fit: expected 0 < fit < images")
    print("| run | column R² | row R² |\n|---|---|---|")
    for run_dir in args.runs:
        r2 = position_r2(run_dir, args.images, args.fit)
        print(f"| {run_dir.name} | {r2['column']:.3f} | {r2['row']:.3f} |")


if __name__ == "__main__":
    main()
