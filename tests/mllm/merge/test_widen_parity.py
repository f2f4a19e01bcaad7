"""WIDEN (Yu et al., 2024, arXiv 2408.03092) against the official code, re-implemented here line by line.

Reference: github.com/yule-BUAA/MergeLLM, ``model_merging_methods/merging_methods.py``,
``MergingMethod.widen_merging`` at commit 9178ef93846aa1df9a3a2c28886a346184edfa79 (its helpers
``transpose_token_embeddings``, ``compute_param_magnitude_direction``,
``compute_param_magnitude_direction_differences``, ``rank_per_param_magnitude_or_direction_within_model``,
``compute_importance_scores``, ``merge_per_param_magnitude_direction`` and the 1-D branch of
``merge_param_magnitude_direction``), with the same torch calls on whole fp32 tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge
from mllm.merge.methods.base import TensorInfo
from mllm.merge.methods.widen import Widen, WidenParams

EMBED = "model.embed_tokens.weight"  # the one tensor the official code transposes


def official_widen(name: str, pretrained: torch.Tensor, finetuned: list[torch.Tensor], ratio: float,
                   calibration: float) -> torch.Tensor:
    """``widen_merging`` for one parameter, as MergeLLM computes it."""
    def importance(significance: torch.Tensor) -> torch.Tensor:  # compute_importance_scores
        scores = torch.softmax(significance, dim=0)
        scores[significance > torch.mean(significance, dim=1, keepdim=True) * ratio] = calibration
        return scores

    def rank(diff: torch.Tensor) -> torch.Tensor:  # rank_per_param_magnitude_or_direction_within_model
        order = torch.argsort(diff, dim=1, descending=False, stable=True)
        ranks = (torch.arange(diff.shape[1]) / diff.shape[1]).repeat(diff.shape[0]).reshape(diff.shape)
        return torch.scatter(input=torch.zeros(ranks.shape), dim=1, index=order, src=ranks)

    tr = (lambda w: w.transpose(0, 1)) if name == EMBED else (lambda w: w)  # transpose_token_embeddings
    pre, fts = tr(pretrained), [tr(f) for f in finetuned]
    deltas = torch.stack([f - pre for f in fts])  # TaskVector
    if pre.dim() == 1:  # norms and biases: softmax of |theta_t - theta_0|
        return pre + (deltas * importance(torch.abs(torch.stack(fts) - pre))).sum(dim=0)
    m0 = torch.norm(pre, p=2, dim=0)
    d0 = pre / m0
    dm = torch.stack([torch.abs(torch.norm(f, p=2, dim=0) - m0) for f in fts])
    dd = torch.stack([1.0 - torch.cosine_similarity(f / torch.norm(f, p=2, dim=0), d0, dim=0) for f in fts])
    weight = 0.5 * (importance(rank(dm)) + importance(rank(dd)))
    return tr(pre + (deltas * weight.unsqueeze(dim=1)).sum(dim=0))


SHAPES = {"model.layers.0.mlp.up_proj.weight": (6, 10), EMBED: (12, 5), "lm_head.weight": (12, 5),
          "model.layers.0.input_layernorm.weight": (10,)}


@pytest.mark.parametrize("ratio, calibration", [(1.0, 1.0), (0.8, 0.4), (1.3, 0.9)])
@pytest.mark.parametrize("name", list(SHAPES))
def test_widen_equals_the_official_code_on_random_tensors(name: str, ratio: float, calibration: float) -> None:
    g = torch.Generator().manual_seed(len(name))
    base = torch.randn(SHAPES[name], generator=g)
    # three experts whose deltas differ in scale, so rankings and calibration differ between them
    fts = [base + s * torch.randn(SHAPES[name], generator=g) for s in (0.01, 0.05, 0.2)]
    params = WidenParams(above_average_value_ratio=ratio, score_calibration_value=calibration)
    ours = Widen.merge(dict(zip("abc", fts, strict=True)), base, params, TensorInfo(name, None, 1, shape=SHAPES[name]))
    want = official_widen(name, base, fts, ratio, calibration)
    assert torch.allclose(ours, want, atol=1e-6), (ours - want).abs().max()


def test_widen_merge_of_checkpoints_equals_the_official_code(tmp_path: Path, ckpt, llamas, monkeypatch) -> None:
    """Whole Llama checkpoints through the engine, streamed in small row blocks: every tensor as MergeLLM's."""
    from mllm.merge import engine

    monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)
    out = run_merge(ckpt.write_yaml(tmp_path / "w.yaml", {
        "merge_method": "widen", "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}],
        "parameters": {"above_average_value_ratio": 0.9, "score_calibration_value": 0.7},
    }), tmp_path / "out")
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    fts = [ckpt.state_of(llamas[k]) for k in "ab"]
    for n in base:
        want = official_widen(n, base[n], [f[n] for f in fts], 0.9, 0.7)
        assert torch.allclose(merged[n], want, atol=1e-6), n
