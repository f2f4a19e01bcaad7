"""MODEL+LORA references: a peft adapter applied per tensor before merging, as peft's merge_and_unload
(which mergekit runs) would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, run_merge


def _adapter(base: Path, out: Path, rslora: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a random LoRA adapter of ``base`` to ``out``; returns peft's merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                     use_rslora=rslora, alpha_pattern={"down_proj": 3} if rslora else {})
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_is_applied_as_peft_merges_it(tmp_path: Path, ckpt, llamas, rslora: bool) -> None:
    want = _adapter(llamas["a"], tmp_path / "adapter", rslora)
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": f"{llamas['a']}+{tmp_path / 'adapter'}", "layer_range": [0, 4]}]}]}
    got = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out"))
    a = ckpt.state_of(llamas["a"])
    assert sorted(got) == sorted(want)
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=0, atol=1e-6), n
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], a["model.layers.0.self_attn.k_proj.weight"])


def test_ties_with_a_lora_model_matches_mergekit(tmp_path: Path, ckpt, llamas, monkeypatch) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    from mllm.merge import engine

    _adapter(llamas["a"], tmp_path / "adapter", seed=3)
    cfg = {"merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
           "models": [{"model": f"{llamas['a']}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.7, "density": 0.5}},
                      {"model": str(llamas["b"]), "parameters": {"weight": 0.4, "density": 0.6}}]}
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)  # the update is applied row block by row block
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    mergekit_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False,
                                        lora_merge_cache=str(tmp_path / "lora_cache")))
    mk = ckpt.state_of(tmp_path / "mk")
    assert sorted(ours) == sorted(mk)
    for n in ours:
        assert torch.allclose(ours[n], mk[n], rtol=0, atol=1e-6), n


def test_adapter_that_does_not_fit_is_refused(tmp_path: Path, ckpt, llamas) -> None:
    import json

    _adapter(llamas["a"], tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    cfg = {"merge_method": "linear", "models": [{"model": f"{llamas['a']}+{tmp_path / 'adapter'}",
                                                 "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeError, match=r"adapter_config.json: use_dora: DoRA adapters are not supported"):
        run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()
