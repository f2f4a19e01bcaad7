"""Loading a saved checkpoint: ``MLLM.from_pretrained`` vs transformers' ``AutoModelForCausalLM.from_pretrained``
of the same LLM, same dtype, each in a fresh child process.

    python benchmarks/bench_load.py [--params 1e9] [--dtype bfloat16] [--repeats 3] [--workdir DIR]

Builds (or reuses, in --workdir) a random Llama of about ``--params`` parameters (vocabulary 32000,
untied, written tensor by tensor), an MLLM around it (a tiny timm ViT and an MLP projector, so the LLM
is nearly all of it) saved with ``MLLM.save_pretrained``, and the LLM alone saved with transformers'
``save_pretrained``. Then, ``--repeats`` times and alternately, a fresh Python process loads each on
the CPU (our checkpoint with ``MLLM.from_pretrained(..., device="cpu")``, which keeps the stored dtype;
transformers' with ``dtype=--dtype``) and reports the wall time of the load call (both children first
import the same libraries -- torch, transformers' Llama, timm, mllm -- so imports are excluded) and
the process' peak RSS (``resource.getrusage``, the kernel's high-water mark, which covers the imports
too) besides its RSS just before the load. The peak is taken after every weight has been read once
(as a first forward reads them): a loader that maps the file defers those reads past its return. The first round also warms the page cache.

Prints one line per load, then as the last line a JSON object: ``ratio`` (median wall time, ours /
transformers', goal <= 1.2), ``ratio_with_first_read`` (the same up to the end of that first read of
every weight: both loaders map the files, so the load call itself defers the disk reads), ``rss_ratio`` (our peak RSS / our checkpoint's bytes, goal <= 1.3),
``rss_growth_ratio`` (our peak RSS minus the RSS just before the load, over the checkpoint bytes: the
load's own cost; at a small --params the ~1 GiB that importing torch and transformers maps dominates
``rss_ratio``) and the raw figures. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GIB = 1024**3
VOCAB = 32000

CHILD = """import json, os, resource, sys, time
import torch
import timm, transformers.models.llama.modeling_llama  # both children import the same libraries first
from mllm.model import MLLM
from transformers import AutoModelForCausalLM
which, path, dtype = sys.argv[1:4]
if which == "ours":
    load = lambda: MLLM.from_pretrained(path, device="cpu")
else:
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), device_map="cpu",
                                                        local_files_only=True)
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # RSS now
t0 = time.perf_counter()
model = load()
wall = time.perf_counter() - t0
with torch.no_grad():  # read every weight once, as a first forward does: mapped pages count from here
    touched = sum(float(p.sum()) for p in model.parameters())
read = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"wall_s": wall, "read_s": read, "rss_before": before, "rss_peak": peak,
                  "params": sum(p.numel() for p in model.parameters()), "dtypes": dtypes}))
"""


def llama_shape(params: float) -> dict[str, int]:
    """A Llama config of about ``params`` parameters (untied embeddings, vocabulary 32000)."""
    hidden = 2048 if params >= 6e8 else 1024 if params >= 2e8 else 768
    inter = hidden * 8 // 3 // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * VOCAB * hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


def build(root: Path, params: float, dtype: str) -> tuple[Path, Path]:
    """(our checkpoint, the LLM alone as transformers saves it), built once per (params, dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.config import ModelConfig, from_dict
    from mllm.merge.tensors import ShardWriter, TensorSpec
    from mllm.model import MLLM
    from train.data.tokenizer import build_tokenizer

    ours, theirs, raw = root / "ours", root / "hf_llm", root / "raw_llm"
    marker = root / "built.json"
    key = {"params": params, "dtype": dtype}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return ours, theirs
    shutil.rmtree(root, ignore_errors=True)
    raw.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    cfg = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, dtype=dtype,
                      architectures=["LlamaForCausalLM"], **llama_shape(params))
    cfg.save_pretrained(raw)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(raw, [TensorSpec(n, s, torch_dtype) for n, s in shapes.items()], 50 * GIB) as writer:
        for name, shape in shapes.items():  # random weights, never the whole model at once
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype))
        writer.close()
    tokenizer = build_tokenizer(["what colour is the circle ?", "red green blue"])
    model_cfg = from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2,
                    "num_heads": 2, "layers": [-1]},
        "projector": {"name": "mlp"},
        "llm": {"path": str(raw), "dtype": dtype},
    })
    model = MLLM(model_cfg, tokenizer).to(torch_dtype)
    model.save_pretrained(ours)
    model.llm.save_pretrained(theirs)
    del model
    shutil.rmtree(raw)
    marker.write_text(json.dumps(key))
    return ours, theirs


def run_child(which: str, path: Path, dtype: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, str(path), dtype], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"{which} load failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="LLM parameters (default 1e9)")
    parser.add_argument("--dtype", default="bfloat16", help="stored and loaded dtype (default bfloat16)")
    parser.add_argument("--repeats", type=int, default=3, help="loads of each, alternating (median reported)")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (reused when the size matches)")
    args = parser.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_load-"))
    try:
        ours, theirs = build(root, args.params, args.dtype)
        ckpt_bytes = sum(p.stat().st_size for p in ours.glob("*.safetensors"))
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "transformers": []}
        for i in range(args.repeats):
            for which, path in (("ours", ours), ("transformers", theirs)):
                r = run_child(which, path, args.dtype)
                runs[which].append(r)
                print(f"round {i + 1} {which:<12} load {r['wall_s']:6.2f} s (load + first read {r['read_s']:5.2f} s)  peak RSS {r['rss_peak'] / GIB:6.2f} GiB "
                      f"(before the load {r['rss_before'] / GIB:5.2f} GiB)  {r['params'] / 1e6:,.0f}M params "
                      f"{'+'.join(r['dtypes'])}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    read = {k: statistics.median(r["read_s"] for r in v) for k, v in runs.items()}
    peak = max(r["rss_peak"] for r in runs["ours"])
    growth = max(r["rss_peak"] - r["rss_before"] for r in runs["ours"])
    print(json.dumps({
        "ratio": round(wall["ours"] / wall["transformers"], 3),
        "rss_ratio": round(peak / ckpt_bytes, 3),
        "rss_growth_ratio": round(growth / ckpt_bytes, 3),
        "ratio_with_first_read": round(read["ours"] / read["transformers"], 3),
        "ours_wall_s": round(wall["ours"], 3), "transformers_wall_s": round(wall["transformers"], 3),
        "ours_peak_rss_gib": round(peak / GIB, 3),
        "transformers_peak_rss_gib": round(max(r["rss_peak"] for r in runs["transformers"]) / GIB, 3),
        "checkpoint_gib": round(ckpt_bytes / GIB, 3), "params": runs["ours"][0]["params"], "dtype": args.dtype,
        "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
