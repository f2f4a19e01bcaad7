"""DPN pyramid vs plain LLaVA splicing: LLM FLOPs spent on visual tokens, and forward time.

    python benchmarks/bench_dpn.py [--repeats 5] [--batch 1] [--threads 1]

One random ~100M-parameter Llama (12 layers, d = 768, d_ff = 2560, sdpa), used both ways: plain, and
with ``mllm.injection.pyramid`` hooked in (pooling after layers 2, 5 and 8 — DPN's 7/15/23 of 32
scaled to 12 layers — experts (1,1), (1,2), (2,2)). The input is a spliced prompt's
``inputs_embeds``: 4 prefix tokens, 576 visual tokens (24 x 24 grid), 40 text tokens; the encoder
and projector are identical for both and outside the measurement. Forward = the uncached prefill
over the whole sequence (``use_cache=False``), logits for every position.

Routing: the routers are untrained, so the benchmark pins every row to one expert (``PyramidInjector.pin``). The
headline pins the most-compressing expert (2,2) at every stage: with ``c = (0, 1, 2)`` the routing
loss ``max(0, 1.5 - mean(c_k p_k))`` is zero only when nearly every decision is that expert, so it
is the routing DPN's loss trains toward; (1,2) everywhere and the random routers' own argmax are
printed beside it. Visual FLOPs = ``sum_l [F(n_text + n_v(l)) - F(n_text)]`` with the prefill block formula
of ``injection_bench.LLMShape.block_flops``, ``n_v(l)`` read from the injector (``LLMShape.visual_flops``). Last line: JSON with ``flops_ratio`` (goal
<= 0.5) and ``time_ratio``, DPN / splice. Not part of the test run.
"""

from __future__ import annotations

import json

import torch
from injection_bench import GRID, PREFIX, TEXT, VISUAL, LLMShape, bench_args, build_llm, timed

from mllm.injection.base import InjectionSpec, VisualContext
from mllm.injection.pyramid import PyramidConfig, PyramidInjector

POOL_AFTER = [2, 5, 8]


def main() -> None:
    args = bench_args(__doc__.split("\n")[0])

    shape = LLMShape()
    llm = build_llm(shape)
    params = sum(p.numel() for p in llm.parameters())
    spec = InjectionSpec(hidden_size=shape.hidden, num_layers=shape.layers, num_visual_tokens=VISUAL,
                         visual_grid=GRID, encoder_layers=(0,), encoder_dim=shape.hidden)
    dpn = PyramidInjector(PyramidConfig(layers=POOL_AFTER), spec).eval()
    dpn.attach(llm)

    length = PREFIX + VISUAL + TEXT
    torch.manual_seed(1)
    embeds = torch.randn(args.batch, length, shape.hidden) * 0.02
    image = torch.zeros(args.batch, length, dtype=torch.bool)
    image[:, PREFIX: PREFIX + VISUAL] = True
    ones = torch.ones(args.batch, length, dtype=torch.long)
    ctx = VisualContext(attention_mask=ones, query_mask=ones.bool(), image_mask=image)

    def plain() -> object:
        return llm(inputs_embeds=embeds, use_cache=False)

    def pyramid() -> object:
        with dpn.use(ctx):
            return llm(inputs_embeds=embeds, use_cache=False)

    splice_flops = shape.visual_flops(PREFIX + TEXT, [float(VISUAL)] * shape.layers)
    rows = {}
    for label, expert in [("x1/4 every stage (headline)", 2), ("x1/2 every stage", 1), ("random routers' argmax", None)]:
        dpn.pin(None if expert is None else [expert] * len(POOL_AFTER))
        dpn.reset_stats()
        with torch.inference_mode():
            pyramid()
        per_layer = dpn.tokens_per_layer()
        secs = timed({"splice": plain, "dpn": pyramid}, args.repeats)
        rows[label] = {
            "visual_tokens_per_layer": per_layer,
            "flops_ratio": shape.visual_flops(PREFIX + TEXT, per_layer) / splice_flops,
            "time_ratio": secs["dpn"] / secs["splice"],
            "dpn_s": secs["dpn"], "splice_s": secs["splice"],
        }

    print(f"LLM: Llama {params / 1e6:.0f}M params, {shape.layers} layers, d={shape.hidden}; batch {args.batch}, "
          f"{length} tokens ({VISUAL} visual, 24x24); torch threads {torch.get_num_threads()}")
    print(f"{'routing':<30} {'visual tokens per layer':<44} {'FLOPs':>6} {'time':>6} {'dpn s':>7} {'splice s':>8}")
    for label, r in rows.items():
        tokens = ",".join(f"{n:g}" for n in r["visual_tokens_per_layer"])
        print(f"{label:<30} {tokens:<44} {r['flops_ratio']:>6.3f} {r['time_ratio']:>6.3f} "
              f"{r['dpn_s']:>7.3f} {r['splice_s']:>8.3f}")
    head = rows["x1/4 every stage (headline)"]
    print(json.dumps({
        "flops_ratio": round(head["flops_ratio"], 4), "time_ratio": round(head["time_ratio"], 4),
        "dpn_seconds": round(head["dpn_s"], 4), "splice_seconds": round(head["splice_s"], 4),
        "visual_flops_splice": splice_flops, "params": params, "batch": args.batch,
        "others": {k: {"flops_ratio": round(v["flops_ratio"], 4), "time_ratio": round(v["time_ratio"], 4),
                       "visual_tokens_per_layer": v["visual_tokens_per_layer"]}
                   for k, v in rows.items() if v is not head},
    }))


if __name__ == "__main__":
    main()
