"""GPU acceptance check: training throughput and MFU, batched vs one-by-one evaluation, checkpoint load time.

Run on the GPU machine from the repository's root, with what is installed there (nothing is downloaded,
and the repository need not be installed: the script puts its root on ``sys.path``):

    python3 benchmarks/gpu_check.py

Options: ``--budget-s 420`` (the wall-time budget the script watches) and ``--cpu-smoke`` (tiny sizes on the
CPU, a few steps: the test suite's run of this same code). Without CUDA and without ``--cpu-smoke`` it prints
one line saying so and exits 2. The GPU run is not part of ``make test``; the ``--cpu-smoke`` run is
(tests/benchmarks/test_gpu_check.py).

Every model has random weights built from configs. The model is the ``tiny`` recipe's data, template and
tokenizer around a ViT-B/16 at 224 px (``timm_vit``, 196 patch tokens), the LLaVA ``mlp`` projector and a
Qwen2-0.5B-shaped LLM (hidden 896, 24 layers, 14 heads, 2 key-value heads, intermediate 4864, tied
embeddings, vocabulary 151936). The tokenizer is the recipe's word-level one, its vocabulary filled up to
151936 with filler words, so that every id the LM head can emit decodes to a word. Each figure prints one
JSON line ``{"figure": ..., "card": torch.cuda.get_device_name(), ...}``, after an ``environment`` line:

* ``train`` (once with ``attn_implementation`` sdpa, once with flash_attention_2 when ``import flash_attn``
  works, else a line saying why not): warm-up, then timed steps of forward + backward + AdamW step (the trainer's
  :func:`train.trainer.build_optimizer`; no clipping, no schedule) training encoder, projector and LLM on 8 rows of 1024 tokens (<s>,
  196 image tokens, random words, every word labelled) under ``torch.autocast`` bf16 with fp32 weights, as
  ``train.mixed_precision: bf16`` runs. Median step time, tokens/s, peak memory, and MFU = model FLOPs per
  second over the card's dense bf16 peak (:func:`train.throughput.peak_flops`; unknown card or CPU: null),
  with the model FLOPs of a training step ``6 (N_llm T + N_vision I P)`` (:meth:`mllm.model.MLLM.flops_counter`,
  the trainer's count too): 2N forward and 4N backward per
  token (Kaplan et al. 2020, arXiv 2001.08361, Sec. 2.1; PaLM's MFU, Chowdhery et al. 2022, arXiv
  2204.02311, App. B, attention's sequence-length term left out as the trainer's logged MFU leaves it),
  for ``T`` LLM tokens and ``I`` images of ``P`` patches through encoder and projector. The LM head's
  logits are computed only at labelled positions (the model's ``logits_to_keep``), so the count slightly
  overstates the head's work.
* ``eval``: :func:`eval.runner.run_task` on ShapesWorld's first samples with batch size 32 and 1, same
  model in float32 with TF32 off: a random model's top logits are nearly tied, so any rounding difference
  between batch shapes would flip a token, and the check is about the runner (padding, positions, cache).
  Samples/s of both, their ratio (batched over one-by-one), and whether every prediction is identical.
* ``load``: benchmarks/bench_load.py's ~1B Llama checkpoint (bf16), loaded onto the device by
  ``MLLM.from_pretrained`` and by transformers' ``AutoModelForCausalLM.from_pretrained`` of the same LLM,
  alternately in this process (the first round also warms the page cache); median wall times, ratio.

A figure the budget has no room left for (its ``needs`` in the sizes below, rough upper bounds from the FLOP counts and
file sizes, not measurements) is skipped with a line saying so; each line carries the figure's own
``wall_s`` to set them better. A figure that fails prints a line with its error (traceback on stderr) and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a bare copy of the repository, not pip-installed
    sys.path.insert(1, str(ROOT))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # no hub, ever
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
from bench_load import build as build_load_checkpoints  # noqa: E402  (benchmarks/ is first on sys.path)
from bench_train_step import train_step  # noqa: E402

from mllm import run  # noqa: E402
from mllm.config import ModelConfig, RunConfig, from_dict, load_config  # noqa: E402
from mllm.model import MLLM  # noqa: E402
from train.templates import IGNORE_INDEX  # noqa: E402
from train.throughput import peak_flops  # noqa: E402
from train.trainer import TrainConfig, build_optimizer  # noqa: E402

GIB = 1024**3


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (figures of any size stay readable and keep their precision)."""
    return float(f"{x:.{digits}g}")


@dataclass(frozen=True)
class Sizes:
    encoder: dict[str, Any]  # model.encoder
    llm: dict[str, Any]  # model.llm.arch of a qwen2 LLM
    vocab: int  # tokenizer and LM head rows (filler words added to reach it)
    batch: int  # training rows
    seq_len: int  # tokens per training row
    warmup: int  # untimed training steps
    steps: int  # timed training steps
    eval_samples: int
    eval_batch: int
    load_params: float  # LLM parameters of the load figure's checkpoint
    load_repeats: int
    needs: dict[str, float]  # seconds a figure may take, for the budget


# Qwen2-0.5B's shape (Yang et al. 2024, "Qwen2 Technical Report", arXiv 2407.10671, Table 1; its config's
# vocabulary of 151936 rows is set through the tokenizer); Qwen2Config's defaults otherwise.
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "tie_word_embeddings": True}
GPU = Sizes(  # ViT-B/16 at 224 px: 196 patch tokens
    encoder={"name": "timm_vit", "model_name": "vit_base_patch16_224", "image_size": 224, "layers": [-1]},
    llm=QWEN2_05B, vocab=151936, batch=8, seq_len=1024, warmup=3, steps=20, eval_samples=64, eval_batch=32,
    load_params=1e9, load_repeats=3, needs={"train": 60.0, "eval": 120.0, "load": 150.0},
)
SMOKE = Sizes(
    encoder={"name": "timm_vit", "model_name": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 16,
             "embed_dim": 64, "depth": 2, "num_heads": 2, "layers": [-1]},
    llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": True},
    # load_params below bench_load's smallest shape (hidden 768, one layer, vocabulary 32000: ~56M) gets that shape
    vocab=2200, batch=2, seq_len=32, warmup=1, steps=2, eval_samples=6, eval_batch=4,
    load_params=1e6, load_repeats=1, needs={"train": 30.0, "eval": 30.0, "load": 60.0},
)


@dataclass(frozen=True)
class Fillers:
    """``count`` filler words for :func:`mllm.run.build_tokenizer_for`'s ``train_data``: "λa", "λb", ...
    (base 26 after a letter no ShapesWorld or template text holds, so each is a new token)."""

    count: int

    def vocabulary_texts(self) -> list[str]:
        return [" ".join("λ" + _letters(i) for i in range(self.count))] if self.count else []


def _letters(n: int) -> str:
    """``n`` in base 26 with digits a..z: 0 -> "a", 25 -> "z", 26 -> "ba" (distinct for distinct ``n``)."""
    rest, digit = divmod(n, 26)
    return (_letters(rest) if rest else "") + chr(ord("a") + digit)


def build_tokenizer(recipe: RunConfig, vocab: int) -> Any:
    """The recipe's tokenizer with filler words up to ``vocab`` tokens (none when it already has that many)."""
    base = len(run.build_tokenizer_for(recipe))
    return run.build_tokenizer_for(recipe, Fillers(max(0, vocab - base)))


def build_model(recipe: RunConfig, sizes: Sizes, tokenizer: Any, attn: str) -> MLLM:
    """ViT + mlp projector + qwen2 LLM from ``sizes``, the recipe's template; the same weights every call."""
    cfg = from_dict(ModelConfig, {
        "encoder": sizes.encoder, "projector": {"name": "mlp"},
        "llm": {"model_type": "qwen2", "arch": sizes.llm, "attn_implementation": attn},
        "template": recipe.model.template, "tokenizer_numbers": recipe.model.tokenizer_numbers,
        "image_first": recipe.data.image_first, "max_length": sizes.seq_len,
    }, "model")
    torch.manual_seed(0)
    return MLLM(cfg, tokenizer)


def training_batch(model: MLLM, sizes: Sizes) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq_len`` tokens: <s>, the image's slots, then random words, every word labelled;
    random pixels."""
    tok, slots = model.tokenizer, model.num_image_tokens
    if sizes.seq_len <= slots + 1:
        raise ValueError(f"seq_len {sizes.seq_len} leaves no room for text after {slots} image tokens")
    gen = torch.Generator().manual_seed(0)
    words = torch.tensor(sorted(set(range(len(tok))) - set(tok.all_special_ids)))
    text = words[torch.randint(len(words), (sizes.batch, sizes.seq_len - 1 - slots), generator=gen)]
    input_ids = torch.cat([torch.full((sizes.batch, 1), tok.bos_token_id),
                           torch.full((sizes.batch, slots), model.image_token_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + slots] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values": torch.randn(sizes.batch, 3, *model.encoder.image_size, generator=gen)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def train_figure(recipe: RunConfig, sizes: Sizes, tokenizer: Any, device: torch.device, attn: str) -> dict[str, Any]:
    model = build_model(recipe, sizes, tokenizer, attn).to(device)
    model.train()
    model.set_trainable(["encoder", "projector", "llm"])
    optimizer, _ = build_optimizer(model, TrainConfig(log_with=[]))
    batch = {k: v.to(device) for k, v in training_batch(model, sizes).items()}

    def forward() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(**batch)

    reset_peak(device)
    losses = [train_step(optimizer, forward) for _ in range(sizes.warmup)]
    times = []
    for _ in range(sizes.steps):  # train_step ends reading the loss: the step's kernels have run
        start = time.perf_counter()
        losses.append(train_step(optimizer, forward))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops_per_s = model.flops_counter()(batch, batch["input_ids"].numel()) / step_s  # every token attended
    peak = peak_flops(device)
    n_llm, n_vision = model.param_counts()
    return {
        "autocast": "bfloat16", "weights": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": sizes.batch, "seq_len": sizes.seq_len, "image_tokens": model.num_image_tokens,
        "params_llm": n_llm, "params_vision": n_vision,
        "warmup_steps": sizes.warmup, "steps": sizes.steps, "step_s": sig(step_s),
        "tokens_per_s": sig(batch["input_ids"].numel() / step_s), "tflops": sig(flops_per_s / 1e12),
        "mfu": None if peak is None else sig(flops_per_s / peak, 3), "peak_memory_gib": peak_gib(device),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
    }


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 matrix products and convolutions without TF32 (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def eval_figure(recipe: RunConfig, sizes: Sizes, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    from eval.runner import EvalConfig, read_records, run_task

    model = build_model(recipe, sizes, tokenizer, "sdpa").to(device).eval()
    task = run.eval_task(recipe)
    first = next(iter(task.samples()))
    seconds, predictions = {}, {}
    with exact_fp32(), tempfile.TemporaryDirectory(prefix="gpu_check-eval-") as tmp:
        model.generate([first.load_image()], [task.build_prompt(first)], max_new_tokens=recipe.eval.max_new_tokens)
        for batch_size in (1, sizes.eval_batch):  # warmed up above: kernels chosen, caches allocated
            cfg = EvalConfig(batch_size=batch_size, max_new_tokens=recipe.eval.max_new_tokens, limit=sizes.eval_samples)
            out = Path(tmp) / f"batch{batch_size}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the runner prints its table: stdout holds JSON lines only
                run_task(model, task, cfg, out, progress=False)
            seconds[batch_size] = time.perf_counter() - start
            predictions[batch_size] = {r["id"]: r["prediction"] for r in read_records(out / "predictions.jsonl")}
    one, batched = predictions[1], predictions[sizes.eval_batch]
    n = len(one)
    return {
        "dtype": "float32", "samples": n, "batch_size": sizes.eval_batch, "max_new_tokens": recipe.eval.max_new_tokens,
        "one_by_one_samples_per_s": sig(n / seconds[1]), "batched_samples_per_s": sig(n / seconds[sizes.eval_batch]),
        "ratio": sig(seconds[1] / seconds[sizes.eval_batch]),
        "identical": one == batched, "mismatches": sum(one[k] != batched.get(k) for k in one),
    }


def load_figure(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    loaders: dict[str, Callable[[Path], Any]] = {
        "ours": lambda path: MLLM.from_pretrained(path, device=device),
        "transformers": lambda path: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=str(device), local_files_only=True),
    }
    walls: dict[str, list[float]] = {name: [] for name in loaders}
    params: dict[str, int] = {}
    peaks: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-load-") as tmp:
        paths = dict(zip(loaders, build_load_checkpoints(Path(tmp) / "ckpt", sizes.load_params, "bfloat16"), strict=True))
        ckpt_bytes = sum(p.stat().st_size for p in paths["ours"].glob("*.safetensors"))
        for _ in range(sizes.load_repeats):
            for name, load in loaders.items():
                free(device)
                reset_peak(device)
                start = time.perf_counter()
                model = load(paths[name])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                walls[name].append(time.perf_counter() - start)
                params[name], peaks[name] = sum(p.numel() for p in model.parameters()), peak_gib(device)
                del model
    median = {name: statistics.median(w) for name, w in walls.items()}
    return {
        "dtype": "bfloat16", "device": str(device), "params": params, "checkpoint_gib": round(ckpt_bytes / GIB, 3),
        "repeats": sizes.load_repeats, "ours_s": sig(median["ours"]),
        "transformers_s": sig(median["transformers"]), "ratio": sig(median["ours"] / median["transformers"]),
        "walls": {name: [sig(w) for w in ws] for name, ws in walls.items()}, "peak_memory_gib": peaks,
    }


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flash_unavailable(device: torch.device) -> str | None:
    """Why flash_attention_2 cannot run here, or None."""
    if device.type != "cuda":
        return "flash_attention_2 needs a CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        return f"import flash_attn failed: {err}"
    return None


def environment(budget_s: float, smoke: bool) -> dict[str, Any]:
    import transformers

    try:
        from flash_attn import __version__ as flash_version
    except ImportError:
        flash_version = None
    return {"sizes": "cpu-smoke" if smoke else "gpu", "budget_s": budget_s, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "flash_attn": flash_version}


class Report:
    """Prints one JSON line per figure, watching the budget; remembers whether a figure failed."""

    def __init__(self, card: str, budget_s: float) -> None:
        self.card, self.budget_s, self.start, self.failed = card, budget_s, time.perf_counter(), False

    def line(self, figure: str, values: dict[str, Any]) -> None:
        print(json.dumps({"figure": figure, "card": self.card, **values}), flush=True)

    def figure(self, figure: str, labels: dict[str, Any], need: float, measure: Callable[[], dict[str, Any]],
               device: torch.device) -> None:
        """``measure``'s values, or a skip when less than ``need`` seconds of the budget are left, or its error."""
        left = self.budget_s - (time.perf_counter() - self.start)
        if left < need:
            self.line(figure, {**labels, "skipped": f"budget: {max(left, 0):.0f} s of --budget-s {self.budget_s:g} "
                                                    f"left, this figure needs about {need:g} s"})
            return
        start = time.perf_counter()
        try:
            values = measure()
        except Exception as err:  # one figure's failure must not cost the others their run on the lent machine
            traceback.print_exc()
            self.failed = True
            values = {"error": f"{type(err).__name__}: {err}"}
        finally:
            free(device)
        self.line(figure, {**labels, **values, "wall_s": round(time.perf_counter() - start, 1)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget in seconds (default 420)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    args = parser.parse_args(argv)
    if args.budget_s < 0:
        parser.error(f"--budget-s: expected seconds >= 0, got {args.budget_s:g}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(json.dumps({"figure": "environment", "card": None, "error": "no CUDA device (torch.cuda.is_available() "
                          "is false): run this on a GPU machine, or pass --cpu-smoke"}), flush=True)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sizes, device = (SMOKE, torch.device("cpu")) if args.cpu_smoke else (GPU, torch.device("cuda"))
    report = Report(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", args.budget_s)
    report.line("environment", environment(args.budget_s, args.cpu_smoke))
    recipe = load_config("tiny")
    tokenizer = build_tokenizer(recipe, sizes.vocab)
    for attn in ("sdpa", "flash_attention_2"):
        labels = {"attn_implementation": attn}
        why_not = flash_unavailable(device) if attn == "flash_attention_2" else None
        if why_not is not None:
            report.line("train", {**labels, "skipped": why_not})
            continue
        report.figure("train", labels, sizes.needs["train"],
                      lambda attn=attn: train_figure(recipe, sizes, tokenizer, device, attn), device)
    report.figure("eval", {}, sizes.needs["eval"], lambda: eval_figure(recipe, sizes, tokenizer, device), device)
    report.figure("load", {}, sizes.needs["load"], lambda: load_figure(sizes, device), device)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
