"""mergekit parity of Breadcrumbs, SCE, RAM and RAM+ on the tiny Llama checkpoints (fp32), merged whole
and in small row blocks (the ``prepare`` / scan / statistics-pass paths); DELLA's seeded masks end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge

REL_TOL = 1e-5  # max |ours - mergekit| / max |mergekit|, per tensor
PARITY = {
    "breadcrumbs": {"models": [("a", {"weight": 0.7, "density": 0.4, "gamma": 0.05}),
                               ("b", {"weight": 0.5, "density": 0.6, "gamma": 0.1})],
                    "parameters": {"lambda": 0.9}},
    "breadcrumbs_rescale": {"method": "breadcrumbs",
                            "models": [("a", {"weight": 0.7, "density": 0.3}), ("b", {"weight": 0.5, "density": 0.5})],
                            "parameters": {"rescale": True, "normalize": True}},
    "breadcrumbs_ties": {"models": [("a", {"weight": 0.7, "density": 0.4, "gamma": 0.05}),
                                    ("b", {"weight": 0.5, "density": 0.6, "gamma": 0.02})],
                         "parameters": {"normalize": True, "int8_mask": True}},
    "breadcrumbs_ties_default": {"method": "breadcrumbs_ties",
                                 "models": [("a", {"weight": 1.0, "density": 0.5}), ("b", {"weight": 0.3, "density": 0.5})],
                                 "parameters": {}},
    "ties_rescale": {"method": "ties", "models": [("a", {"weight": 0.7, "density": 0.3}),
                                                  ("b", {"weight": 0.5, "density": 0.6})],
                     "parameters": {"rescale": True, "lambda": 0.8}},
    "sce": {"models": [("a", {}), ("b", {}), ("sparse", {})], "parameters": {"select_topk": 0.3}},
    "sce_all": {"method": "sce", "models": [("a", {}), ("b", {})], "parameters": {}},
    "ram": {"models": [("a", {}), ("sparse", {})], "parameters": {}},
    "ram_epsilon": {"method": "ram", "models": [("a", {}), ("b", {}), ("sparse", {})], "parameters": {"epsilon": 0.02}},
    "ramplus_tl": {"models": [("a", {}), ("sparse", {})], "parameters": {}},
    "ramplus_tl_params": {"method": "ramplus_tl", "models": [("a", {}), ("b", {}), ("sparse", {})],
                          "parameters": {"r": 0.5, "alpha": 3.0, "epsilon": 0.01}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, ckpt, llamas) -> dict[str, Path]:
    """The conftest Llamas plus ``sparse``: base + noise on a random 30 % of the entries (the rest
    unchanged), so that RAM sees entries changed by one model only and SCE zero variances."""
    base = ckpt.state_of(llamas["base"])
    g = torch.Generator().manual_seed(7)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
             for k, v in base.items()}
    return {**llamas, "sparse": ckpt.save_llama(tmp_path_factory.mktemp("sparse") / "sparse", state)}


def _config(llamas, method: str, models, parameters) -> dict:
    return {
        "merge_method": method, "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas[k]), "parameters": p} for k, p in models],
        "parameters": parameters, "dtype": "float32",
    }


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


def _max_rel_error(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert sorted(ours) == sorted(theirs)
    return max(float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp(min=1e-12)) for n in ours)


@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
@pytest.mark.parametrize("case", sorted(PARITY))
def test_parity_with_mergekit(tmp_path: Path, ckpt, models, monkeypatch, case: str, blocked: bool) -> None:
    from mllm.merge import engine

    spec = PARITY[case]
    cfg = _config(models, spec.get("method", case), spec["models"], spec["parameters"])
    if blocked:
        monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)  # the 48 x 16 embedding -> 8 blocks of 6 rows
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    theirs = ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    assert _max_rel_error(ours, theirs) <= REL_TOL
    base = ckpt.state_of(models["base"])
    assert all(not torch.equal(ours[n], base[n]) for n in ours)  # every tensor was merged


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_seeded_blockwise_and_distributed_as_mergekit(tmp_path: Path, ckpt, models, monkeypatch,
                                                            method: str) -> None:
    """DELLA's draws are seeded: the same YAML gives the same bytes, merged whole or in row blocks. Its
    masks are random, so against mergekit (global torch RNG) the check is on statistics over the ~11k
    entries: one model without rescaling keeps tau exactly on a ``density`` fraction of them; with L1
    rescaling every tensor's delta keeps ||tau||_1; two models merge to deltas of the same total size."""
    from mllm.merge import engine

    base, a = ckpt.state_of(models["base"]), ckpt.state_of(models["a"])
    one = _config(models, method, [("a", {"weight": 1.0, "density": 0.5, "epsilon": 0.2})], {"rescale": False})
    two = _config(models, method, [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.5, "density": 0.6})],
                  {"lambda": 1.2})
    l1 = _config(models, method, [("a", {"weight": 1.0, "density": 0.3, "epsilon": 0.1})], {"normalize": False})
    results: dict[str, list[dict[str, torch.Tensor]]] = {}
    for key, cfg in (("one", one), ("two", two), ("l1", l1)):
        path = ckpt.write_yaml(tmp_path / f"{key}.yaml", cfg)
        results[key] = [ckpt.state_of(run_merge(path, tmp_path / f"{key}_ours")),
                        ckpt.state_of(_mergekit(cfg, tmp_path / f"{key}_mk"))]
    with monkeypatch.context() as m:
        m.setattr(engine, "BLOCK_ELEMS", 100)
        blocked = ckpt.state_of(run_merge(tmp_path / "two.yaml", tmp_path / "two_blocked"))
    again = ckpt.state_of(run_merge(tmp_path / "two.yaml", tmp_path / "two_again"))
    for n in base:
        assert torch.equal(blocked[n], results["two"][0][n]) and torch.equal(again[n], results["two"][0][n]), n

    for out in results["one"]:  # ours, mergekit
        delta = {n: out[n] - base[n] for n in base}
        tau = {n: a[n] - base[n] for n in base}
        assert all(torch.allclose(delta[n], tau[n] * (delta[n] != 0), atol=1e-6) for n in base)
        kept = sum(int((delta[n] != 0).sum()) for n in base) / sum(t.numel() for t in base.values())
        assert abs(kept - 0.5) < 0.02
    for out in results["l1"]:
        for n in base:
            tau_l1 = float((a[n] - base[n]).abs().sum())
            assert float((out[n] - base[n]).abs().sum()) == pytest.approx(tau_l1, rel=1e-4), n
    size = [sum(float((out[n] - base[n]).abs().sum()) for n in base) for out in results["two"]]
    assert size[0] == pytest.approx(size[1], rel=0.05)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescale_seeded_blockwise_and_l1_as_mergekit(tmp_path: Path, ckpt, models, monkeypatch,
                                                          method: str) -> None:
    """DARE with mergekit's default ``rescale: true`` (L1 rule): the same bytes merged whole or in row blocks
    (the scan redraws the merge's masks), and, as mergekit's, one model's delta keeps ||tau||_1 in every
    tensor on about a ``density`` fraction of the entries, each kept entry scaled by one number per tensor."""
    from mllm.merge import engine

    base, a = ckpt.state_of(models["base"]), ckpt.state_of(models["a"])
    one = _config(models, method, [("a", {"weight": 1.0, "density": 0.4})], {})
    two = _config(models, method, [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.5, "density": 0.6})],
                  {"lambda": 1.2})
    outs = [ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "one.yaml", one), tmp_path / "one_ours")),
            ckpt.state_of(_mergekit(one, tmp_path / "one_mk"))]
    path = ckpt.write_yaml(tmp_path / "two.yaml", two)
    whole = ckpt.state_of(run_merge(path, tmp_path / "two_whole"))
    with monkeypatch.context() as m:
        m.setattr(engine, "BLOCK_ELEMS", 100)
        blocked = ckpt.state_of(run_merge(path, tmp_path / "two_blocked"))
    assert all(torch.equal(blocked[n], whole[n]) for n in base)
    for out in outs:  # ours, mergekit
        kept = 0
        for n in base:
            tau, delta = a[n] - base[n], out[n] - base[n]
            assert float(delta.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-4), n
            nz = delta != 0
            scale = delta[nz] / tau[nz]
            assert float(scale.max() - scale.min()) < 1e-3 * float(scale.mean()), n
            kept += int(nz.sum())
        assert abs(kept / sum(t.numel() for t in base.values()) - 0.4) < 0.02


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_on_bf16_models_differs_from_mergekit_only_by_its_tie_rule(tmp_path: Path, ckpt, bf16_llamas,
                                                                               monkeypatch, method: str) -> None:
    """bf16 deltas are coarse, so many tie in magnitude with an edge of the kept band: mergekit's sort keeps
    an arbitrary subset of those, we keep them all. With our rule patched into mergekit (both computing in
    fp32: ``dtype: float32``, ``out_dtype: bfloat16``) the outputs are bit-identical."""
    from mergekit import sparsify

    from mllm.merge.methods.breadcrumbs import outlier_band

    models = [("a", {"weight": 0.7, "density": 0.4, "gamma": 0.05}), ("b", {"weight": 0.5, "density": 0.6})]
    cfg = {**_config(bf16_llamas, method, models, {}), "out_dtype": "bfloat16"}
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    mk = ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    assert any(not torch.equal(ours[n], mk[n]) for n in ours)  # ties at the band edges are common in bf16

    def keep_ties(tensor: torch.Tensor, density: float, rescale_norm: object = None, gamma: float = 0.01):
        assert rescale_norm is None and 0 < density < 1
        band = outlier_band(tensor, density, gamma)
        return tensor * ((tensor.abs() >= band.lo) & (tensor.abs() <= band.hi))

    monkeypatch.setattr(sparsify, "magnitude_outliers", keep_ties)
    mk = ckpt.state_of(_mergekit(cfg, tmp_path / "mk_keep_ties"))
    for name, out in ours.items():
        assert out.dtype == torch.bfloat16 and torch.equal(out, mk[name]), name


def test_sce_on_bf16_models_differs_from_mergekit_only_by_its_tie_rule(tmp_path: Path, ckpt, bf16_llamas,
                                                                      monkeypatch) -> None:
    """As for Breadcrumbs: variances of coarse bf16 deltas tie at the k-th largest, where mergekit's topk
    keeps an arbitrary subset and we keep them all; with our rule patched into mergekit they agree."""
    from mergekit.merge_methods import sce

    from mllm.merge.methods.sce import variance_threshold

    cfg = {**_config(bf16_llamas, "sce", [("a", {}), ("b", {})], {"select_topk": 0.3}), "out_dtype": "bfloat16"}
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    assert any(not torch.equal(ours[n], t) for n, t in ckpt.state_of(_mergekit(cfg, tmp_path / "mk")).items())

    def keep_ties(tvs: torch.Tensor, density: float, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
        var = torch.var(tvs, dim=0, unbiased=False)
        return (var >= variance_threshold(var, density)).to(mask_dtype or tvs.dtype)

    monkeypatch.setattr(sce, "sce_mask", keep_ties)
    mk = ckpt.state_of(_mergekit(cfg, tmp_path / "mk_keep_ties"))
    assert max(float((ours[n].float() - mk[n].float()).abs().max() / mk[n].float().abs().max()) for n in ours) <= REL_TOL
