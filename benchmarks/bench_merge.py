"""Our streaming merge vs ``mergekit-yaml`` on the same YAML and the same ~1 GB random Llama models.

    python benchmarks/bench_merge.py [--methods ties,linear,task_arithmetic,dare_ties,slerp,passthrough]
                                     [--hidden 1536] [--layers 16] [--workdir DIR]

Builds (or reuses, in --workdir) a bf16 base model and two fine-tunes (base + small noise), writes one
mergekit-style YAML per method (``--method`` and ``--methods`` are one option: a comma-separated list
of the methods both mergers have; slerp: base and a at t = 0.5; passthrough: a ``slices:`` layer stack,
a's first three quarters of the layers then b's last three quarters), then runs each merger in its own child process and measures wall
time and the child's peak RSS (the kernel's high-water mark, from ``os.wait4`` in a small launcher
process, so that this script's own memory is not counted: see LAUNCHER). Prints one table row
per method and merger, then as the last line a JSON object: for TIES (or the first method when TIES
is not run) ratio (our wall time / mergekit's), peak_rss_gib, mergekit_peak_rss_gib,
largest_tensor_gib and the raw figures, as before; under "methods" the same figures per method.
Goals: ratio <= 0.5, peak RSS <= 2 x largest tensor + 1 GiB. Not part of the test run.
DARE draws its masks from its own RNG in each merger, so only its time and memory compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

GIB = 1024**3


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """base + two fine-tunes, bf16 safetensors written tensor by tensor (never a whole model in RAM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.merge.tensors import ShardWriter, TensorSpec

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
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


# Starts the command given as its arguments and prints its wall seconds, exit code and ru_maxrss (KiB
# on Linux). A process' ru_maxrss includes the RSS high-water mark of the address space it was
# spawned from (Linux folds the old one's peak in at exec, and fork and vfork both start from the
# parent's): spawned from this script -- torch, transformers and, once models were built or outputs
# compared, whole tensors: 0.7 to 1.4 GiB -- every merger reported that much at least. Spawned from
# this small interpreter (no site, ~10 MiB), a merger's figure is its own.
LAUNCHER = """import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - start, os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process, started by LAUNCHER."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=False)
    try:
        wall, code, maxrss_kib = proc.stdout.split()
    except ValueError:
        raise SystemExit(f"launcher failed ({proc.returncode}):\n{proc.stderr[-3000:]}") from None
    if int(code) != 0:
        raise SystemExit(f"{cmd[0]} failed ({code}):\n{proc.stderr[-3000:]}")
    return float(wall), int(maxrss_kib) * 1024 / GIB


METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "passthrough")  # the ones mergekit also has
# per-model parameters; the shared ones are left to both mergers' defaults, which agree (normalize on
# for TIES only, DARE's rescale on, lambda 1)
MODEL_PARAMS: dict[str, dict[str, float]] = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
}
SHARED_PARAMS: dict[str, dict[str, float]] = {"slerp": {"t": 0.5}}


def method_list(text: str) -> list[str]:
    """``ties`` or ``ties,linear``: the methods to run, in order, each once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METHODS)}; got {text!r}")
    return names


def write_config(root: Path, method: str, paths: dict[str, Path], layers: int) -> Path:
    """The mergekit YAML both mergers read: experts a and b, base_model for the task-vector methods; slerp
    interpolates base and a; passthrough stacks a's layers [0, 3L/4) on b's [L/4, L)."""
    config: dict[str, object] = {"merge_method": method, "dtype": "bfloat16"}
    if method == "passthrough":
        config["slices"] = [{"sources": [{"model": str(paths["a"]), "layer_range": [0, layers * 3 // 4]}]},
                            {"sources": [{"model": str(paths["b"]), "layer_range": [layers // 4, layers]}]}]
    elif method == "slerp":
        config["models"] = [{"model": str(paths[k])} for k in ("base", "a")]
    else:
        config["models"] = [{"model": str(paths[k]), "parameters": MODEL_PARAMS[method]} for k in ("a", "b")]
    if method not in ("linear", "passthrough"):
        config["base_model"] = str(paths["base"])
    if method in SHARED_PARAMS:
        config["parameters"] = SHARED_PARAMS[method]
    path = root / f"merge_{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bench_method(root: Path, method: str, paths: dict[str, Path], repeat: int, mergekit_threads: int | None,
                 layers: int) -> dict[str, object]:
    """Run both mergers ``repeat`` times on one method's YAML; min wall time, max peak RSS, max |diff|."""
    from mllm.merge.tensors import ModelReader

    cfg_path = write_config(root, method, paths, layers)
    outs = {k: root / f"out_{method}_{k}" for k in ("ours", "mergekit")}
    ours_cmd = [sys.executable, "-c",
                f"from mllm.merge import run_merge; run_merge({str(cfg_path)!r}, {str(outs['ours'])!r})"]
    mk_cmd = [str(Path(sys.executable).with_name("mergekit-yaml")), str(cfg_path), str(outs["mergekit"]),
              "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    if mergekit_threads:
        mk_cmd += ["-j", str(mergekit_threads)]
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "mergekit": []}
    for i in range(repeat):  # alternate the order so drifting machine load hits both
        for name in (("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours")):
            shutil.rmtree(outs[name], ignore_errors=True)
            runs[name].append(run_child(ours_cmd if name == "ours" else mk_cmd))
    a, b = ModelReader(outs["ours"]), ModelReader(outs["mergekit"])
    max_diff = max(float((a.get(n).float() - b.get(n).float()).abs().max()) for n in a.names())
    for out in outs.values():  # the next method's outputs need the disk space
        shutil.rmtree(out, ignore_errors=True)
    ours_s, mk_s = min(w for w, _ in runs["ours"]), min(w for w, _ in runs["mergekit"])
    return {
        "ratio": round(ours_s / mk_s, 3), "peak_rss_gib": round(max(r for _, r in runs["ours"]), 3),
        "mergekit_peak_rss_gib": round(max(r for _, r in runs["mergekit"]), 3),
        "ours_s": round(ours_s, 2), "mergekit_s": round(mk_s, 2), "max_abs_diff": max_diff,
        "ours_runs_s": [round(w, 1) for w, _ in runs["ours"]],
        "mergekit_runs_s": [round(w, 1) for w, _ in runs["mergekit"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", "--methods", dest="methods", type=method_list, default=["ties"],
                    help=f"comma-separated, from {', '.join(METHODS)} (default: ties)")
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

    from mllm.merge.tensors import ModelReader

    reader = ModelReader(paths["base"])
    elems = [torch.Size(reader.shape(n)).numel() for n in reader.names()]
    model_gib, largest_gib = 2 * sum(elems) / GIB, 2 * max(elems) / GIB

    results = {m: bench_method(root, m, paths, args.repeat, args.mergekit_threads, args.layers) for m in args.methods}
    print(f"{'method':16s}{'merger':10s}{'wall s (min of ' + str(args.repeat) + ')':>20s}{'peak RSS GiB':>15s}"
          f"{'max |ours - mk|':>17s}")
    for m, r in results.items():
        print(f"{m:16s}{'ours':10s}{r['ours_s']:20.1f}{r['peak_rss_gib']:15.2f}{r['max_abs_diff']:17.2e}")
        print(f"{'':16s}{'mergekit':10s}{r['mergekit_s']:20.1f}{r['mergekit_peak_rss_gib']:15.2f}")
    print(f"3 x {model_gib:.2f} GiB bf16 models, largest tensor {largest_gib:.3f} GiB (mergekit computes in "
          f"bf16, ours in fp32; dare_ties' masks differ between the two)")
    headline = "ties" if "ties" in results else args.methods[0]
    print(json.dumps({
        **results[headline], "largest_tensor_gib": round(largest_gib, 4), "model_gib": round(model_gib, 3),
        "method": headline, "rss_goal_gib": round(2 * largest_gib + 1, 3), "repeat": args.repeat,
        "mergekit_threads": args.mergekit_threads, "methods": results,
    }))


if __name__ == "__main__":
    main()
