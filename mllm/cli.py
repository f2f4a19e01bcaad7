"""The ``mllm`` command: demo | train | eval | chat | merge | probe | convert.

Each sub-command parses its flags and calls one function of :mod:`mllm.run` (or the merge / convert
entry point). Flags are checked by argparse before anything is loaded; a user error — any
:class:`~common.errors.UserError`, or an ``OSError`` on a file we were pointed at — prints one line
naming the file / field and what was expected, as the last line on the terminal, and exits with
status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.errors import UserError
from mllm.registry import EVAL_TASKS
from mllm.schema import suggest


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (checked before any model is loaded)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _task(name: str) -> str:
    """argparse type: a registered eval task name."""
    if name not in EVAL_TASKS:
        names = EVAL_TASKS.names()
        raise argparse.ArgumentTypeError(f"unknown eval task {name!r}{suggest(name, names)} "
                                         f"(expected one of: {', '.join(names)})")
    return name


def _task_list(text: str) -> list[str]:
    """argparse type: comma-separated registered eval task names, each once."""
    names = [_task(name.strip()) for name in text.split(",") if name.strip()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not names or repeated:
        raise argparse.ArgumentTypeError(f"expected distinct task names separated by commas, got {text!r}")
    return names


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype(text: str) -> str:
    """argparse type: a torch floating dtype name, or ``auto`` (the checkpoint's)."""
    if text not in (*FLOAT_DTYPES, "auto"):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FLOAT_DTYPES)} or auto, got {text!r}")
    return text


def _device(text: str) -> str:
    """argparse type: a torch device name such as cpu, cuda or cuda:1."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from err
    return text


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default=None,
                   help="where the model runs, e.g. cuda, cuda:1, cpu (default: CUDA when available, else CPU)")
    p.add_argument("--dtype", type=_dtype, default=None,
                   help=f"weights dtype: {' | '.join(FLOAT_DTYPES)} | auto (default: the checkpoint's)")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread a model larger than one GPU over the GPUs, then the CPU (accelerate's "
                        "big-model loading; instead of --device)")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set train.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm", description="Compose, train, merge and evaluate multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the tiny recipe on ShapesWorld, evaluate, print the table")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--recipe", default="tiny", help="recipe name or YAML path (default: tiny)")
    _add_overrides(demo)

    train = sub.add_parser("train", help="train a recipe (name shipped in mllm/recipes, or a YAML path)")
    train.add_argument("recipe", help="recipe name or YAML path")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in --out) or a checkpoint path")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation (the recipe's eval.task)")
    train.add_argument("--stage", choices=["align", "instruct"], default=None,
                       help="freeze plan: align (projector / fusion) or instruct (projector + LLM); "
                       "same as --set train.stage=NAME")
    _add_overrides(train)

    ev = sub.add_parser("eval", help="evaluate a saved checkpoint on one task, or on several with one model load")
    ev.add_argument("checkpoint", help="folder written by save_pretrained (e.g. RUN/model), or a transformers "
                    "image-text-to-text folder")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--task", default=None, type=_task,
                       help="one task, written to --out (default: shapesworld): " + " | ".join(EVAL_TASKS.names()))
    which.add_argument("--tasks", default=None, type=_task_list, metavar="TASK,TASK,...",
                       help="several tasks, one model load: each written to OUT/TASK, and a summary of their "
                       "headline metrics to OUT/results.json and OUT/results.md; per-task inputs then name their "
                       "task: --data TASK=PATH, --images TASK=PATH, --opt TASK.KEY=VALUE")
    ev.add_argument("--data", action="append", default=[], metavar="PATH",
                    help="the benchmark's question/annotation file (public format); with --tasks, TASK=PATH "
                    "(repeatable, one per file-based task)")
    ev.add_argument("--images", action="append", default=[], metavar="PATH",
                    help="image folder of the benchmark; with --tasks, TASK=PATH (repeatable)")
    ev.add_argument("--opt", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. --opt annotations=v2_mscoco_val2014_annotations.json; with --tasks, "
                    "TASK.KEY=VALUE, e.g. --opt arithmetic.test_size=50 (repeatable)")
    ev.add_argument("--out", required=True, help="output directory for predictions.jsonl and metrics.json")
    ev.add_argument("--batch-size", type=_positive, default=None)
    ev.add_argument("--max-new-tokens", type=_positive, default=None,
                    help="generation budget per answer (default 24), recorded in protocol.json; a reasoning model "
                    "writes its <think> chain first and needs far more (e.g. 4096): chains cut short are counted "
                    "as n_unterminated in metrics.json")
    ev.add_argument("--limit", type=_positive, default=None, help="evaluate the first N samples only")
    ev.add_argument("--resume", action="store_true", help="keep finished samples of an interrupted run")
    ev.add_argument("--skip-bad", action="store_true",
                    help="skip a sample whose image is missing or unreadable: not scored, counted as 'skipped' in "
                    "metrics.json and listed with the reason in skipped.jsonl (default: the first such image stops "
                    "the run naming the file and sample; the finished batches stay for --resume)")
    _add_placement(ev)

    chat = sub.add_parser("chat", help="one answer to a question about an image")
    chat.add_argument("model", help="our checkpoint (RUN/model) or a transformers image-text-to-text folder")
    chat.add_argument("question", help="the question, e.g. 'what is in the image?'")
    chat.add_argument("--image", required=True, help="image file")
    chat.add_argument("--max-new-tokens", type=_positive, default=64)
    _add_placement(chat)

    merge = sub.add_parser("merge", help="merge models from a mergekit-style YAML (streaming, training-free)")
    merge.add_argument("config", help="merge YAML (models, merge_method, base_model, parameters, dtype, ...)")
    merge.add_argument("--out", required=True, help="output folder (written atomically)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument("--threads", type=_positive, default=1, help="torch threads for the merge arithmetic")
    merge.add_argument("--dry-run", action="store_true",
                       help="print each output tensor's sources, method and resolved parameters (reads only "
                       "the file headers) and write nothing")

    probe = sub.add_parser("probe", help="per-layer attention mass on visual tokens (FRANK's prior)")
    probe.add_argument("model", help="our checkpoint (RUN/model) or a transformers image-text-to-text folder")
    probe.add_argument("--images", default=None,
                       help="a folder of images, each probed with one --prompt (any model); with --data, the "
                       "image root of a LLaVA JSON file")
    probe.add_argument("--prompt", default=None,
                       help="the one prompt of --images DIR (default: 'Describe this image in detail.'); "
                       "the image goes first unless it holds <image>")
    probe.add_argument("--data", default=None,
                       help="conversations, for our checkpoints: 'shapesworld' (the run's generator, val split; "
                       "the default without --images) or a LLaVA JSON/JSONL file")
    probe.add_argument("--limit", type=_positive, default=256,
                       help="the first N images / samples (FRANK used ~1k MSCOCO val images)")
    probe.add_argument("--batch-size", type=_positive, default=16)
    probe.add_argument("--out", required=True, help="folder for probe.json and probe.png")
    _add_placement(probe)

    conv = sub.add_parser("convert", help="import / export transformers LlavaForConditionalGeneration folders")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="LLAVA_DIR", help="a transformers Llava folder to import as our checkpoint")
    way.add_argument("--to-hf", metavar="CKPT", help="our checkpoint (save_pretrained folder) to export as Llava")
    conv.add_argument("--out", required=True, help="new output folder (an existing one is refused)")

    return parser


def _evaluate(args: argparse.Namespace) -> None:
    """``mllm eval``: one task (``--task``, written to --out) or several (``--tasks``, one folder each)."""
    from mllm import run

    shared = {"options": args.options, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "limit": args.limit, "resume": args.resume, "skip_bad": args.skip_bad, "device": args.device,
              "dtype": args.dtype, "device_map": args.device_map}
    if args.tasks:
        run.evaluate_tasks(Path(args.checkpoint), args.tasks, Path(args.out), data=args.data, images=args.images,
                           **shared)
        return
    for flag, values in (("--data", args.data), ("--images", args.images)):
        if len(values) > 1:
            raise UserError(f"{flag}: given {len(values)} times; one task reads one (several tasks: --tasks A,B "
                            f"with {flag} TASK=PATH)")
    run.evaluate_checkpoint(Path(args.checkpoint), args.task or "shapesworld", Path(args.out),
                            data=next(iter(args.data), None), images=next(iter(args.images), None), **shared)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mllm import run

    try:
        if args.command == "demo":
            run.demo(args.recipe, Path(args.out), args.overrides)
        elif args.command == "train":
            stage = [f"train.stage={args.stage}"] if args.stage else []
            run.train(args.recipe, Path(args.out), [*args.overrides, *stage], resume=args.resume,
                      evaluate=not args.no_eval)
        elif args.command == "eval":
            _evaluate(args)
        elif args.command == "chat":
            print(run.chat(Path(args.model), Path(args.image), args.question, max_new_tokens=args.max_new_tokens,
                           device=args.device, dtype=args.dtype, device_map=args.device_map))
        elif args.command == "merge":
            from mllm.merge import run_merge

            run_merge(args.config, args.out, overwrite=args.overwrite, progress=not args.dry_run,
                      threads=args.threads, dry_run=args.dry_run)
        elif args.command == "probe":
            run.probe(Path(args.model), args.data, Path(args.out), images=args.images, prompt=args.prompt,
                      limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                      device_map=args.device_map)
        elif args.command == "convert":
            from mllm import hf

            if args.from_hf:
                hf.import_llava(args.from_hf, args.out)
            else:
                hf.export_llava(args.to_hf, args.out)
            print(f"wrote {args.out}")
    except (UserError, OSError) as err:
        print(f"mllm {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
