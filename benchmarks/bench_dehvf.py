"""DEHVF FFN memory vs plain LLaVA splicing: forward time at 576 visual tokens, same LLM.

    python benchmarks/bench_dehvf.py [--repeats 5] [--batch 1] [--threads 1] [--taps 4]

One random ~100M-parameter Llama (12 layers, d = 768, d_ff = 2560, sdpa) and one LLaVA-1.5
``mlp2x_gelu`` projector (1024 -> 768 -> 768), used both ways on the same random CLIP-L-like
features (``--taps`` encoder layers of 576 tokens x 1024):
* splice: the projected last tapped layer (576 tokens) spliced between 4 prefix and 40 text tokens,
  the LLM runs on 620 tokens;
* DEHVF (``mllm.injection.ffn_embed`` in every layer): the LLM runs on the 44 text tokens; each layer
  selects a mix of the tapped layers from its hidden state, projects it (the same projector, once per
  layer: the default ``order: fuse_then_project``) and reads it as FFN key/value memory;
  ``order: project_then_fuse`` (projections of the tapped layers shared by all layers) is timed too.
Forward = encoder features -> logits for every position (the encoder itself, identical for both, is
outside the measurement), uncached. Last line: JSON with ``ratio`` = DEHVF (default order) / splice
time (goal <= 0.6), ``ratio_project_then_fuse``, and the analytic FLOPs (the prefill block formula of
``injection_bench.LLMShape.block_flops``, projector, memory read).
Not part of the test run.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from injection_bench import PREFIX, TEXT, VISUAL, LLMShape, bench_args, build_llm, timed

from mllm.injection.base import InjectionSpec, VisualContext
from mllm.injection.ffn_embed import FFNEmbedConfig, FFNEmbedInjector
from projectors.mlp import MLPProjector, MLPProjectorConfig

ENCODER_DIM = 1024


def main() -> None:
    args = bench_args(
        __doc__.split("\n")[0],
        lambda p: p.add_argument("--taps", type=int, default=4, help="encoder layers the fuser selects from"),
    )

    shape = LLMShape()
    llm = build_llm(shape)
    params = sum(p.numel() for p in llm.parameters())
    projector = MLPProjector(MLPProjectorConfig(depth=2), ENCODER_DIM, shape.hidden).eval()
    taps = tuple(range(args.taps))
    spec = InjectionSpec(hidden_size=shape.hidden, num_layers=shape.layers, num_visual_tokens=VISUAL,
                         visual_grid=None, encoder_layers=taps, encoder_dim=ENCODER_DIM)
    dehvf = FFNEmbedInjector(FFNEmbedConfig(), spec).eval()
    dehvf.attach(llm)

    torch.manual_seed(1)
    feats = {m: torch.randn(args.batch, VISUAL, ENCODER_DIM) for m in taps}
    prefix = torch.randn(args.batch, PREFIX, shape.hidden) * 0.02
    text = torch.randn(args.batch, TEXT, shape.hidden) * 0.02
    text_only = torch.cat([prefix, text], dim=1)
    ones = torch.ones(args.batch, PREFIX + TEXT, dtype=torch.long)
    ctx = VisualContext(attention_mask=ones, query_mask=ones.bool(), layers=feats, project=projector)

    def splice() -> object:
        visual = projector(feats[taps[-1]])
        return llm(inputs_embeds=torch.cat([prefix, visual, text], dim=1), use_cache=False)

    def ffn_embed(order: str) -> Callable[[], object]:
        def run() -> object:
            dehvf.cfg.order = order
            with dehvf.use(ctx):
                return llm(inputs_embeds=text_only, use_cache=False)

        return run

    secs = timed({"splice": splice, "dehvf": ffn_embed("fuse_then_project"),
                  "dehvf_ptf": ffn_embed("project_then_fuse")}, args.repeats)
    n_text = PREFIX + TEXT
    proj_flops = 2 * VISUAL * (ENCODER_DIM * shape.hidden + shape.hidden * shape.hidden)
    memory_flops = 2 * 2 * n_text * VISUAL * shape.hidden  # x K^T and SiLU(.) V per layer
    text_flops = shape.layers * (shape.block_flops(n_text) + memory_flops)
    flops = {
        "splice": proj_flops + shape.layers * shape.block_flops(n_text + VISUAL),
        "dehvf": text_flops + shape.layers * proj_flops,
        "dehvf_ptf": text_flops + args.taps * proj_flops,
    }
    print(f"LLM: Llama {params / 1e6:.0f}M params, {shape.layers} layers, d={shape.hidden}; batch {args.batch}; "
          f"{VISUAL} visual tokens x {args.taps} tapped layers of {ENCODER_DIM}; torch threads {torch.get_num_threads()}")
    print(f"{'variant':<8} {'LLM tokens':>10} {'forward s':>10} {'GFLOPs':>8}")
    print(f"{'splice':<8} {n_text + VISUAL:>10} {secs['splice']:>10.3f} {flops['splice'] / 1e9:>8.1f}")
    print(f"{'dehvf':<8} {n_text:>10} {secs['dehvf']:>10.3f} {flops['dehvf'] / 1e9:>8.1f}   fuse_then_project")
    print(f"{'dehvf':<8} {n_text:>10} {secs['dehvf_ptf']:>10.3f} {flops['dehvf_ptf'] / 1e9:>8.1f}   project_then_fuse")
    print(json.dumps({
        "ratio": round(secs["dehvf"] / secs["splice"], 4),
        "ratio_project_then_fuse": round(secs["dehvf_ptf"] / secs["splice"], 4),
        "dehvf_seconds": round(secs["dehvf"], 4), "dehvf_ptf_seconds": round(secs["dehvf_ptf"], 4),
        "splice_seconds": round(secs["splice"], 4),
        "flops_ratio": round(flops["dehvf"] / flops["splice"], 4),
        "flops_ratio_project_then_fuse": round(flops["dehvf_ptf"] / flops["splice"], 4),
        "params": params, "batch": args.batch, "taps": args.taps,
    }))


if __name__ == "__main__":
    main()
