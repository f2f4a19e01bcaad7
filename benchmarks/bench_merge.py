"""Our streaming merge vs ``mergekit-yaml`` on the same YAML and the same ~1 GB random Llama models.

    python benchmarks/bench_merge.py [--method ties] [--hidden 1536] [--layers 16] [--workdir DIR]

Builds (or reuses, in --workdir) a bf16 base model and two fine-tunes (base + small noise), writes one
mergekit-style YAML, then runs each merger in its own child process and measures wall time and the
child's peak RSS (the kernel's high-water mark, from ``os.wait4``). Prints a table, then as the last
line a JSON object: ratio (our wall time / mergekit's), peak_rss_gib, mergekit_peak_rss_gib,
largest_tensor_gib, and the raw figures. Goals (issue 6): ratio <= 0.5, peak RSS <= 2 x largest
tensor + 1 GiB. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

GIB = 1024**3


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """base + two fine-tunes, bf16 safetensors written tensor by tensor (never a whole model in RAM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.merge.tensors import ShardWriter, TensorSpec

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                      tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()]
    paths = {k: root / k for k in ("base", "a", "b")}
    marker = root / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"hidden": hidden, "layers": layers, "vocab": vocab}:
        return paths
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        cfg.save_pretrained(p)  # config.json only
    gen = torch.Generator().manual_seed(0)
    writers = {k: ShardWriter(p, specs, max_shard_bytes=2 * GIB) for k, p in paths.items()}
    for spec in specs:
        base = torch.randn(spec.shape, generator=gen) * 0.02
        writers["base"].write(spec.name, base.to(torch.bfloat16))
        for k in ("a", "b"):
            writers[k].write(spec.name, (base + torch.randn(spec.shape, generator=gen) * 0.002).to(torch.bfloat16))
    for w in writers.values():
        w.close()
    marker.write_text(json.dumps({"hidden": hidden, "layers": layers, "vocab": vocab}))
    return paths


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="ties", choices=["linear", "task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models here between runs")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each merger, alternating order; min time kept")
    ap.add_argument("--mergekit-threads", type=int, default=None, help="mergekit-yaml -j (default: its own)")
    args = ap.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    root.mkdir(parents=True, exist_ok=True)
    paths = build_models(root, args.hidden, args.layers, args.vocab)
    per_model = {"weight": 0.5} if args.method == "linear" else {"weight": 0.5, "density": 0.5}
    if args.method == "task_arithmetic":
        per_model = {"weight": 0.5}
    config = {"merge_method": args.method, "dtype": "bfloat16",
              "models": [{"model": str(paths[k]), "parameters": per_model} for k in ("a", "b")]}
    if args.method != "linear":
        config["base_model"] = str(paths["base"])
    cfg_path = root / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))

    from mllm.merge.tensors import ModelReader

    reader = ModelReader(paths["base"])
    sizes = [reader.shape(n) for n in reader.names()]
    elems = [torch.Size(s).numel() for s in sizes]
    model_gib, largest_gib = 2 * sum(elems) / GIB, 2 * max(elems) / GIB

    outs = {k: root / f"out_{k}" for k in ("ours", "mergekit")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    ours_cmd = [sys.executable, "-c",
                f"from mllm.merge import run_merge; run_merge({str(cfg_path)!r}, {str(outs['ours'])!r})"]
    mk_cmd = [str(Path(sys.executable).with_name("mergekit-yaml")), str(cfg_path), str(outs["mergekit"]),
              "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    if args.mergekit_threads:
        mk_cmd += ["-j", str(args.mergekit_threads)]
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "mergekit": []}
    for i in range(args.repeat):  # alternate the order so drifting machine load hits both
        for name in (("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours")):
            shutil.rmtree(outs[name], ignore_errors=True)
            runs[name].append(run_child(ours_cmd if name == "ours" else mk_cmd))
    ours_s, mk_s = min(w for w, _ in runs["ours"]), min(w for w, _ in runs["mergekit"])
    ours_rss, mk_rss = max(r for _, r in runs["ours"]), max(r for _, r in runs["mergekit"])

    a, b = ModelReader(outs["ours"]), ModelReader(outs["mergekit"])
    max_diff = max(float((a.get(n).float() - b.get(n).float()).abs().max()) for n in reader.names())
    print(f"{'':10s}{'wall s (min of ' + str(args.repeat) + ')':>20s}{'peak RSS GiB':>15s}")
    print(f"{'ours':10s}{ours_s:20.1f}{ours_rss:15.2f}")
    print(f"{'mergekit':10s}{mk_s:20.1f}{mk_rss:15.2f}")
    print(f"method {args.method}, 3 x {model_gib:.2f} GiB bf16 models, largest tensor {largest_gib:.3f} GiB, "
          f"max |ours - mergekit| = {max_diff:.2e} (mergekit computes in bf16, ours in fp32)")
    print(json.dumps({
        "ratio": round(ours_s / mk_s, 3), "peak_rss_gib": round(ours_rss, 3),
        "mergekit_peak_rss_gib": round(mk_rss, 3), "largest_tensor_gib": round(largest_gib, 4),
        "ours_s": round(ours_s, 2), "mergekit_s": round(mk_s, 2), "model_gib": round(model_gib, 3),
        "method": args.method, "rss_goal_gib": round(2 * largest_gib + 1, 3), "repeat": args.repeat,
        "mergekit_threads": args.mergekit_threads, "ours_runs_s": [round(w, 1) for w, _ in runs["ours"]],
        "mergekit_runs_s": [round(w, 1) for w, _ in runs["mergekit"]],
    }))


if __name__ == "__main__":
    main()
