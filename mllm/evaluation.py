"""Eval tasks as the roof builds them: from ``mllm eval`` flags, and from ``train.eval_tasks`` during training.

A generated task (ShapesWorld, arithmetic, compositional) takes its config from options over the ShapesWorld
settings of the run: those saved beside our checkpoint (``RUN/config.yaml``), or the training run's own
``data``; a transformers folder has none, so the task's defaults. Every other task reads the benchmark's
public files (``data``, ``images``) plus options. Every task is built, so every file checked, before a
model loads or a training step runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from mllm.config import ConfigError, RunConfig, apply_overrides, load_config, to_dict

EvalFn = Callable[[int], dict[str, float]]  # the trainer's evaluation callback: step -> scalars to log


class Where(NamedTuple):
    """How errors name the inputs of one task: command-line flags, or the keys of a training config."""

    data: str
    images: str
    files: str  # both, for a generated task given either
    options: str


FLAGS = Where("--data", "--images", "--data/--images", "--opt key=value")


def build_eval_task(task: str, data: str | None, images: str | None, opts: dict[str, Any],
                    scenes: Callable[[], dict[str, Any] | None], where: Where = FLAGS) -> Any:
    """The registered ``task``, ready to run. ``scenes()`` gives the run's ShapesWorld settings (or None)
    and is called only for a generated task that reads them."""
    from mllm.registry import EVAL_TASKS

    if EVAL_TASKS.get(task).generated:
        if data is not None or images is not None:
            raise ConfigError(f"{where.files}: task {task!r} generates its samples; set them with {where.options}")
        opts = dict(opts)
        split = opts.pop("split", "test")
        return EVAL_TASKS.build(task, generated_task_config(task, opts, scenes), split=split)
    if data is None:
        raise ConfigError(f"{where.data}: task {task!r} needs the benchmark file (questions / annotations)")
    return EVAL_TASKS.build(task, {"data": data, **({"images": images} if images else {}), **opts})


def generated_task_config(task: str, opts: dict[str, Any], scenes: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """A generated task's config mapping: ``opts`` over the run's ShapesWorld settings where the task reads
    ShapesWorld — the whole config of ``shapesworld``, the ``data`` field of ``compositional``; the
    text-only ``arithmetic`` takes ``opts`` alone."""
    from mllm.registry import EVAL_TASKS
    from train.data.shapesworld import ShapesWorldConfig

    cfg_cls = EVAL_TASKS.config_cls(task)
    whole = cfg_cls is ShapesWorldConfig
    if not whole and "data" not in {f.name for f in dataclasses.fields(cfg_cls)}:
        return opts
    settings = scenes()
    if settings is None:
        return opts
    if whole:
        return {**settings, **opts}
    return {**opts, "data": {**settings, **opts.get("data", {})}}


def checkpoint_scenes(checkpoint: Path, task: str) -> dict[str, Any] | None:
    """The ShapesWorld settings our checkpoint was trained on (``RUN/config.yaml``); None for a transformers
    folder, which was trained on no scenes of ours."""
    from mllm.hf_native import is_native

    if is_native(checkpoint):
        return None
    run_cfg = checkpoint.parent / "config.yaml"
    if not run_cfg.is_file():
        raise ConfigError(f"{run_cfg}: {task} needs the run config saved next to the checkpoint (its ShapesWorld settings)")
    return to_dict(load_config(str(run_cfg)).data)


def per_task_inputs(
    tasks: list[str], data: list[str], images: list[str], options: list[str]
) -> dict[str, tuple[str | None, str | None, dict[str, Any]]]:
    """``{task: (data, images, options)}`` from ``--data TASK=PATH``, ``--images TASK=PATH`` and
    ``--opt TASK.KEY=VALUE`` items; each must name one of ``tasks``, a path at most once per task."""
    listed = ", ".join(tasks)
    paths: dict[str, dict[str, str]] = {"--data": {}, "--images": {}}
    for flag, items in (("--data", data), ("--images", images)):
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not path or name not in tasks:
                raise ConfigError(f"{flag} {item}: with --tasks, expected TASK=PATH with TASK one of {listed}")
            if name in paths[flag]:
                raise ConfigError(f"{flag} {item}: task {name!r} was given a path already")
            paths[flag][name] = path
    opts: dict[str, list[str]] = {name: [] for name in tasks}
    for item in options:
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest or name not in tasks:
            raise ConfigError(f"--opt {item}: with --tasks, expected TASK.KEY=VALUE with TASK one of {listed}")
        opts[name].append(rest)
    return {name: (paths["--data"].get(name), paths["--images"].get(name), apply_overrides({}, opts[name]))
            for name in tasks}


# --- during training ----------------------------------------------------------------------------------
def training_tasks(cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{name: (task, runner settings)}`` of ``train.eval_tasks``: ``eval``'s batch size and generation
    budget unless the entry sets its own, the entry's ``limit``. Errors name the entry."""
    from eval.runner import EvalConfig
    from mllm.registry import EVAL_TASKS

    built = {}
    for i, spec in enumerate(cfg.train.eval_tasks):
        key = f"train.eval_tasks[{i}]"
        if spec.task not in EVAL_TASKS:
            raise ConfigError(f"{key}.task: unknown eval task {spec.task!r}; expected one of: "
                              f"{', '.join(EVAL_TASKS.names())}")
        where = Where(f"{key}.data", f"{key}.images", f"{key}.data/images", f"{key}.options")
        task = build_eval_task(spec.task, spec.data, spec.images, spec.options, lambda: to_dict(cfg.data), where)
        runner = EvalConfig(batch_size=cfg.eval.batch_size, max_new_tokens=spec.max_new_tokens or cfg.eval.max_new_tokens,
                            limit=spec.limit)
        built[spec.task] = (task, runner)
    return built


def with_eval_tasks(model: Any, cfg: RunConfig, out_dir: Path, run_eval: EvalFn | None) -> EvalFn | None:
    """The trainer's callback: ``run_eval`` (the run's own task, when periodic) and then every task of
    ``train.eval_tasks`` into ``out_dir/eval_tasks/step-N`` (:func:`eval.suite.run_tasks`), their scalar
    metrics logged as ``TASK/METRIC``. The tasks are built here, before training starts."""
    if not cfg.train.eval_tasks:
        return run_eval
    from eval.suite import run_tasks

    tasks = training_tasks(cfg)

    def eval_fn(step: int) -> dict[str, float]:
        scalars = run_eval(step) if run_eval is not None else {}
        model.eval()
        # resume: a training run resumed from an earlier checkpoint may evaluate this step again
        metrics = run_tasks(model, tasks, out_dir / "eval_tasks" / f"step-{step:07d}", resume=True, progress=False)
        return {**scalars, **flat_scalars(metrics)}

    return eval_fn


def flat_scalars(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"TASK/METRIC": number}`` of every top-level number in each task's metrics (tables and the
    protocol are in the task's folder)."""
    return {f"{name}/{key}": value for name, m in metrics.items() for key, value in m.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "processes"}
